"""RNN, LSTM and SequenceOnly (minires/nn/recurrent.py): closed-form steps, gradcheck of one cell
and of a short unrolled sequence, PyTorch parity (optional), skip wrappers and errors."""
import numpy as np
import pytest

import minires.ops as F
from conftest import fwd_tol, to_numpy, tol
from helpers import check_grad
from minires import backend
from minires.nn import ReZero, Residual, Sequential
from minires.nn.recurrent import LSTM, RNN, SequenceOnly
from minires.tensor import Tensor

WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def lstm_step_np(layer, x, h, c):
    """One LSTM step in closed form (NumPy, float64): gates i, f, g, o in row blocks."""
    w_ih, w_hh, b_ih, b_hh = (to_numpy(getattr(layer, n)).astype(np.float64) for n in WEIGHTS)
    z = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = np.split(z, 4, axis=1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def rnn_step_np(layer, x, h):
    w_ih, w_hh, b_ih, b_hh = (to_numpy(getattr(layer, n)).astype(np.float64) for n in WEIGHTS)
    return np.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def _data(rng, n, t, f, h, dtype):
    draw = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return draw(n, t, f), draw(n, h), draw(n, h)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lstm_matches_closed_form_over_two_steps(xp, rng, dtype):
    layer = LSTM(3, 4, rng=1, dtype=dtype).to(backend.device_of(xp.empty(0)))
    x, h0, c0 = _data(rng, 2, 2, 3, 4, dtype)
    seq, (h, c) = layer(xp.asarray(x), (xp.asarray(h0), xp.asarray(c0)))
    h1, c1 = lstm_step_np(layer, x[:, 0].astype(np.float64), h0, c0)
    h2, c2 = lstm_step_np(layer, x[:, 1].astype(np.float64), h1, c1)
    assert seq.shape == (2, 2, 4) and seq.dtype == dtype and h.dtype == dtype
    t = fwd_tol(dtype, reduce=True)
    np.testing.assert_allclose(to_numpy(seq), np.stack([h1, h2], axis=1), **t)
    np.testing.assert_allclose(to_numpy(h), h2, **t)
    np.testing.assert_allclose(to_numpy(c), c2, **t)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rnn_matches_closed_form_over_two_steps(xp, rng, dtype):
    layer = RNN(3, 4, rng=1, dtype=dtype).to(backend.device_of(xp.empty(0)))
    x, h0, _ = _data(rng, 2, 2, 3, 4, dtype)
    seq, h = layer(xp.asarray(x), xp.asarray(h0))
    h1 = rnn_step_np(layer, x[:, 0].astype(np.float64), h0)
    h2 = rnn_step_np(layer, x[:, 1].astype(np.float64), h1)
    t = fwd_tol(dtype, reduce=True)
    np.testing.assert_allclose(to_numpy(seq), np.stack([h1, h2], axis=1), **t)
    np.testing.assert_allclose(to_numpy(h), h2, **t)


def test_zero_initial_state_equals_explicit_zeros(rng):
    layer = LSTM(3, 4, rng=2, dtype=np.float64)
    x, _, _ = _data(rng, 2, 3, 3, 4, np.float64)
    zeros = np.zeros((2, 4))
    seq_a, (h_a, c_a) = layer(x)
    seq_b, (h_b, c_b) = layer(x, (zeros, zeros))
    np.testing.assert_array_equal(seq_a.data, seq_b.data)
    np.testing.assert_array_equal(c_a.data, c_b.data)
    h1, _ = lstm_step_np(layer, x[:, 0], zeros, zeros)
    np.testing.assert_allclose(seq_a.data[:, 0], h1, **tol("fwd_f64"))


def test_cell_equals_one_step_of_forward(rng):
    layer = LSTM(3, 4, rng=3, dtype=np.float64)
    x, h0, c0 = _data(rng, 2, 1, 3, 4, np.float64)
    seq, (h, c) = layer(x, (h0, c0))
    h_cell, (h_again, c_cell) = layer.cell(x[:, 0], (h0, c0))
    assert h_cell is h_again
    np.testing.assert_allclose(h_cell.data, seq.data[:, 0], **tol("fwd_f64"))
    np.testing.assert_allclose(c_cell.data, c.data, **tol("fwd_f64"))
    np.testing.assert_allclose(layer.cell(x[:, 0])[0].data, layer(x)[0].data[:, 0],
                               **tol("fwd_f64"))  # state None: zeros, in both


# --- gradcheck (float64, every input including the four weights) ------------------------------
def _with_weights(layer, weights):
    for name, w in zip(WEIGHTS, weights):
        setattr(layer, name, w)
    return layer


def test_gradcheck_lstm_cell(rng):
    layer = LSTM(3, 2, rng=4, dtype=np.float64)
    x, h0, c0 = _data(rng, 2, 1, 3, 2, np.float64)
    weights = [getattr(layer, n).data for n in WEIGHTS]

    def cell(x, h, c, *ws):
        h, (_, c) = _with_weights(layer, ws).cell(x, (h, c))
        return F.concat([h, c], axis=1)

    check_grad(cell, [x[:, 0], h0, c0, *weights])


def test_gradcheck_lstm_sequence(rng):
    layer = LSTM(3, 2, rng=5, dtype=np.float64)
    x, h0, c0 = _data(rng, 2, 3, 3, 2, np.float64)
    weights = [getattr(layer, n).data for n in WEIGHTS]

    def unrolled(x, h, c, *ws):
        seq, (_, c) = _with_weights(layer, ws)(x, (h, c))
        return F.concat([F.reshape(seq, (2, -1)), c], axis=1)  # every step's h, and c_T

    check_grad(unrolled, [x, h0, c0, *weights])


def test_gradcheck_rnn_cell_and_sequence(rng):
    layer = RNN(3, 2, rng=6, dtype=np.float64)
    x, h0, _ = _data(rng, 2, 3, 3, 2, np.float64)
    weights = [getattr(layer, n).data for n in WEIGHTS]
    check_grad(lambda x, h, *ws: _with_weights(layer, ws).cell(x, h)[0],
               [x[:, 0], h0, *weights])
    check_grad(lambda x, h, *ws: _with_weights(layer, ws)(x, h)[0],
               [x, h0, *weights])


# --- PyTorch parity (optional) -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_matches_torch_outputs_and_gradients(rng, kind):
    torch = pytest.importorskip("torch")
    ours = {"LSTM": LSTM, "RNN": RNN}[kind](5, 4, rng=7, dtype=np.float64)
    theirs = getattr(torch.nn, kind)(5, 4, batch_first=True).double()
    with torch.no_grad():
        for name in WEIGHTS:
            getattr(theirs, name + "_l0").copy_(torch.from_numpy(getattr(ours, name).data))
    x, h0, c0 = _data(rng, 3, 6, 5, 4, np.float64)
    xt = torch.from_numpy(x).requires_grad_()
    if kind == "LSTM":
        seq, (h, _) = ours(Tensor(x, requires_grad=True), (h0, c0))
        seq_t, (h_t, _) = theirs(xt, (torch.from_numpy(h0)[None], torch.from_numpy(c0)[None]))
    else:
        seq, h = ours(Tensor(x, requires_grad=True), h0)
        seq_t, h_t = theirs(xt, torch.from_numpy(h0)[None])
    np.testing.assert_allclose(seq.data, seq_t.detach().numpy(), **tol("fwd_f64"))
    np.testing.assert_allclose(h.data, h_t[0].detach().numpy(), **tol("fwd_f64"))
    gy = rng.standard_normal(seq.shape)
    seq.backward(gy)
    seq_t.backward(torch.from_numpy(gy))
    for name in WEIGHTS:
        np.testing.assert_allclose(getattr(ours, name).grad,
                                   getattr(theirs, name + "_l0").grad.numpy(), **tol("fwd_f64"))


# --- initialisation, parameters ----------------------------------------------------------------
def test_init_is_uniform_in_pytorch_bounds_and_seeded():
    a, b = LSTM(6, 16, rng=8), LSTM(6, 16, rng=8)
    a64 = LSTM(6, 16, rng=8, dtype=np.float64)
    assert [n for n, _ in a.named_parameters()] == list(WEIGHTS)
    shapes = [(64, 6), (64, 16), (64,), (64,)]
    for name, shape in zip(WEIGHTS, shapes):
        w = getattr(a, name).data
        assert w.shape == shape and w.dtype == np.float32
        assert np.abs(w).max() <= 0.25 and np.abs(w).max() > 0.2  # bound 1/sqrt(16)
        np.testing.assert_array_equal(w, getattr(b, name).data)
        np.testing.assert_array_equal(w, getattr(a64, name).data.astype(np.float32))
    assert RNN(6, 16, rng=0).weight_hh.shape == (16, 16)


# --- skip connections ---------------------------------------------------------------------------
def test_residual_wraps_an_lstm_like_any_block(rng):
    lstm = LSTM(4, 4, rng=9, dtype=np.float64)
    block = Residual(SequenceOnly(lstm), track_grad_norms=True)
    x = Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    y = block(x)
    np.testing.assert_allclose(y.data, x.data + lstm(x.data)[0].data, **tol("fwd_f64"))
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    # dL/dx = gy (skip) + the LSTM's own input gradient
    x2 = Tensor(x.data, requires_grad=True)
    lstm(x2)[0].backward(gy)
    np.testing.assert_allclose(x.grad, gy + x2.grad, **tol("fwd_f64"))
    (x_in, x_res), = block.grad_norms
    np.testing.assert_allclose([x_in, x_res], [np.linalg.norm(x2.grad), np.linalg.norm(gy)],
                               **tol("fwd_f64"))


def test_rezero_lstm_starts_as_identity_and_stacks(rng):
    net = Sequential(*[ReZero(SequenceOnly(LSTM(4, 4, rng=i))) for i in range(3)])
    x = Tensor(rng.standard_normal((2, 5, 4)).astype(np.float32), requires_grad=True)
    y = net(x)
    np.testing.assert_array_equal(y.data, x.data)
    y.backward(np.ones(y.shape, np.float32))
    assert all(abs(float(m.alpha.grad)) > 0 for m in net)  # alpha does receive a gradient
    assert net[0].block.module.weight_ih.grad is not None


def test_residual_rejects_an_lstm_that_changes_width(rng):
    block = Residual(SequenceOnly(LSTM(4, 3, rng=0)))
    with pytest.raises(ValueError, match=r"Residual.*\(2, 5, 4\).*\(2, 5, 3\)"):
        block(rng.standard_normal((2, 5, 4)).astype(np.float32))


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 0, 4)])
def test_bad_input_shape_is_named(shape):
    with pytest.raises(ValueError, match=r"LSTM: expected input \(N, T, 4\)"):
        LSTM(4, 3, rng=0)(np.zeros(shape, np.float32))


def test_bad_dtype_and_state_are_named():
    layer = LSTM(4, 3, rng=0)
    x = np.zeros((2, 5, 4), np.float32)
    with pytest.raises(TypeError, match="input dtype float64 .* float32"):
        layer(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 3\), got \(2, 4\)"):
        layer(x, (np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"LSTM.cell: expected input \(N, 4\), got shape"):
        layer.cell(x)
    with pytest.raises(TypeError, match="LSTM.cell: input dtype float64"):
        layer.cell(x[:, 0].astype(np.float64))
    with pytest.raises(TypeError, match="pair"):
        layer(x, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="c0 must have shape"):
        layer(x, (np.zeros((2, 3), np.float32), np.zeros((1, 3), np.float32)))
    with pytest.raises(ValueError, match=r"RNN: input_size and hidden_size must be >= 1"):
        RNN(0, 3)
    with pytest.raises(TypeError, match="SequenceOnly: expected a Module"):
        SequenceOnly(lambda x: x)
