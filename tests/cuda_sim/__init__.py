"""A package, so that its conftest is imported as cuda_sim.conftest and the tests'
`from conftest import ...` still finds tests/conftest.py."""
