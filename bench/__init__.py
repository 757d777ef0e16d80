"""Timing suite: `python -m bench` (kernel table) and `python -m bench step` (a seed-net
training step), minires vs kernels.reference vs PyTorch (when installed). See bench/README.md.
"""
