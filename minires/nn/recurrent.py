"""Recurrent layers: RNN (tanh) and LSTM, batch-first, unrolled with a per-step Python loop of
existing ops; SequenceOnly drops the final state so Residual/ReZero can wrap them.

Imports minires.ops, minires.tensor, minires.backend and the other nn modules.
"""
import math

import numpy as np

import minires.ops as F
from minires import backend
from minires.nn import init
from minires.nn.module import Module
from minires.tensor import Parameter, Tensor

_ALL = slice(None)


def _uniform(shape, bound, rng, dtype):
    """Parameter drawn from U(-bound, bound) in float64, then rounded to dtype (so float32 and
    float64 layers built from one seed agree)."""
    return Parameter(rng.uniform(-bound, bound, size=shape).astype(dtype))


class _Recurrent(Module):
    """Shared parts of RNN and LSTM: parameters, argument checks and the time loop.

    Subclasses set GATES (row blocks stacked in the weights) and implement
    `_step(xw_t, state) -> (h, state)` (xw_t: the input half of the gates, (N, G*H)),
    `_zero_state(x)` and `_check_state(x, state)`.
    """

    GATES = 1

    def __init__(self, input_size, hidden_size, rng=None, dtype=np.float32):
        super().__init__()
        name = type(self).__name__
        dtype = init.float_dtype(dtype, name)
        if int(input_size) < 1 or int(hidden_size) < 1:
            raise ValueError(f"{name}: input_size and hidden_size must be >= 1, got "
                             f"{input_size} and {hidden_size}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        rng, rows = init.as_rng(rng), self.GATES * self.hidden_size
        bound = 1.0 / math.sqrt(self.hidden_size)  # PyTorch's default for RNN/LSTM
        # PyTorch's names and shapes, so torch.nn.LSTM/RNN weights copy over one to one
        self.weight_ih = _uniform((rows, self.input_size), bound, rng, dtype)
        self.weight_hh = _uniform((rows, self.hidden_size), bound, rng, dtype)
        self.bias_ih = _uniform((rows,), bound, rng, dtype)
        self.bias_hh = _uniform((rows,), bound, rng, dtype)

    def forward(self, x, state=None):
        """Run the whole sequence.

        Args:
            x: (N, T, input_size) Tensor or array, batch first, the layer's dtype.
            state: initial state (see the subclass), None for zeros.
        Returns:
            (output (N, T, hidden_size): h at every step, final state).
        """
        x = self._check_input(x)
        state = self._zero_state(x) if state is None else self._check_state(x, state)
        # Input half of every step's gates in ONE matmul over all T steps (N, T, G*H): it does
        # not depend on h, so only h @ weight_hh.T stays inside the loop.
        xw = F.linear(x, self.weight_ih, self.bias_ih)
        n, t_steps = x.shape[0], x.shape[1]
        outputs = []
        for t in range(t_steps):
            h, state = self._step(F.getitem(xw, (_ALL, t)), state)
            outputs.append(F.reshape(h, (n, 1, self.hidden_size)))
        seq = outputs[0] if t_steps == 1 else F.concat(outputs, axis=1)
        return seq, state

    def cell(self, x_t, state=None):
        """One time step: x_t (N, input_size) and a state (None: zeros) -> (h (N, H), state)."""
        x_t = self._check_input(x_t, step=True)
        state = self._zero_state(x_t) if state is None else self._check_state(x_t, state)
        return self._step(F.linear(x_t, self.weight_ih, self.bias_ih), state)

    def _gates(self, xw_t, h):
        """All G gate pre-activations (N, G*H): xw_t + h @ weight_hh.T + bias_hh."""
        return F.add(xw_t, F.linear(h, self.weight_hh, self.bias_hh))

    def _check_input(self, x, step=False):
        """x as a Tensor: (N, T >= 1, input_size), or (N, input_size) for one step."""
        name = type(self).__name__ + (".cell" if step else "")
        x = Tensor(x) if not isinstance(x, Tensor) else x
        if step and (x.ndim != 2 or x.shape[1] != self.input_size):
            raise ValueError(f"{name}: expected input (N, {self.input_size}), got shape "
                             f"{tuple(x.shape)}")
        if not step and (x.ndim != 3 or x.shape[2] != self.input_size or x.shape[1] < 1):
            raise ValueError(f"{name}: expected input (N, T, {self.input_size}) with T >= 1 "
                             f"(batch first), got shape {tuple(x.shape)}")
        if x.dtype != self.weight_ih.dtype:
            raise TypeError(f"{name}: input dtype {x.dtype} does not match the layer's dtype "
                            f"{self.weight_ih.dtype}")
        return x

    def _check_tensor(self, what, a, x):
        """a as a Tensor of shape (N, hidden_size) with x's dtype and device (else an error)."""
        name = type(self).__name__
        a = Tensor(a) if not isinstance(a, Tensor) else a
        want = (x.shape[0], self.hidden_size)
        if tuple(a.shape) != want:
            raise ValueError(f"{name}: {what} must have shape {want}, got {tuple(a.shape)}")
        if a.dtype != x.dtype or a.device != x.device:
            raise TypeError(f"{name}: {what} is {a.dtype} on {a.device} but the input is "
                            f"{x.dtype} on {x.device}")
        return a

    def _zeros(self, x):
        xp = backend.array_module(x.data)
        return Tensor(xp.zeros((x.shape[0], self.hidden_size), dtype=x.dtype))

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, dtype={self.weight_ih.dtype}"


class RNN(_Recurrent):
    """Elman RNN, one layer: h_t = tanh(x_t @ weight_ih.T + bias_ih + h_{t-1} @ weight_hh.T
    + bias_hh).

    weight_ih (H, F), weight_hh (H, H), bias_ih (H,), bias_hh (H,), all U(-1/sqrt(H),
    1/sqrt(H)) like torch.nn.RNN (whose weight_ih_l0 ... copy over directly).
    forward(x (N, T, F), h0 (N, H) or None) -> (output (N, T, H), h_T (N, H)).
    """

    GATES = 1

    def _zero_state(self, x):
        return self._zeros(x)

    def _check_state(self, x, state):
        return self._check_tensor("h0", state, x)

    def _step(self, xw_t, h):
        h = F.tanh(self._gates(xw_t, h))
        return h, h


class LSTM(_Recurrent):
    """Long short-term memory, one layer, gates in PyTorch's order (i, f, g, o).

    All four gates come from one fused pre-activation per step,
    z = x_t @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh  (N, 4H), split in row
    blocks [i | f | g | o]:  i, f, o = sigmoid(.), g = tanh(.),
    c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t).
    weight_ih (4H, F), weight_hh (4H, H), bias_ih (4H,), bias_hh (4H,), all U(-1/sqrt(H),
    1/sqrt(H)); torch.nn.LSTM's weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0 copy over.
    forward(x (N, T, F), (h0, c0) or None) -> (output (N, T, H), (h_T, c_T)).
    """

    GATES = 4

    def _zero_state(self, x):
        return self._zeros(x), self._zeros(x)

    def _check_state(self, x, state):
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"LSTM: state must be a pair (h0, c0), got {type(state).__name__}")
        return self._check_tensor("h0", state[0], x), self._check_tensor("c0", state[1], x)

    def _step(self, xw_t, state):
        h, c = state
        z, size = self._gates(xw_t, h), self.hidden_size
        i, f, g, o = (F.getitem(z, (_ALL, slice(k * size, (k + 1) * size))) for k in range(4))
        c = F.add(F.mul(F.sigmoid(f), c), F.mul(F.sigmoid(i), F.tanh(g)))
        h = F.mul(F.sigmoid(o), F.tanh(c))
        return h, (h, c)


class SequenceOnly(Module):
    """Keep only the output sequence of a recurrent layer: SequenceOnly(lstm)(x) == lstm(x)[0].

    Lets Residual / ReZero / Sequential wrap an RNN or LSTM (whose forward returns a pair)
    like any other block: Residual(SequenceOnly(LSTM(64, 64)))(x) = x + lstm(x)[0].
    """

    def __init__(self, module):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"SequenceOnly: expected a Module, got {type(module).__name__}")
        self.module = module

    def forward(self, x):
        out = self.module(x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"SequenceOnly: {type(self.module).__name__} must return "
                            f"(sequence, state), got {type(out).__name__}")
        return out[0]
