"""minires: a small, readable, fast deep-learning engine for residual networks.

Autograd over NumPy (CPU) and CuPy (GPU) arrays with hand-written Numba kernels.
"""
from minires.tensor import Tensor, Parameter, Function, no_grad, is_grad_enabled
from minires.tensor import tensor, zeros, ones, randn
from minires import ops, nn, optim, models
from minires.checkpoint import save, load
from minires.profile import profile
from minires.anomaly import detect_anomaly

__version__ = "0.1.0"
