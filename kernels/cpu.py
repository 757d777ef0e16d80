"""Placeholder until the Numba CPU kernels land: raises ImportError so dispatch uses reference."""
raise ImportError("kernels.cpu is not implemented yet")
