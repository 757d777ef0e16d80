"""Conv + ReLU fusion: the CPU kernels (relu=True forward, the ReLU output y masking gy in both
backward kernels) against kernels.reference at odd shapes and the ResNet shapes the register
tiles were tuned for, on one and two threads; the op F.conv2d(..., relu=True) (gradcheck,
reference); nn.Sequential's fusion of a layer's forward_relu with the nn.ReLU after it."""
import numpy as np
import pytest

import minires
import minires.ops as F
from conftest import fwd_tol, tol
from minires import nn
from minires.gradcheck import away_from_kinks, gradcheck
from minires.kernels import reference as ref

cpu = pytest.importorskip("minires.kernels.cpu", reason="Numba CPU kernels unavailable")
numba = pytest.importorskip("numba")

DTYPES = [np.float32, np.float64]
# x shape, w shape, stride, padding: odd channel counts (not a multiple of the tile's 4 rows
# or its columns), stride 2 with odd sizes, 1x1 projections, a rectangular kernel, padding
# wider than the kernel (the explicit-pad path) and the threaded seed-net batch.
FUSED_CASES = [
    ((2, 3, 7, 9), (5, 3, 3, 3), (1, 1), (1, 1)),
    ((3, 5, 9, 7), (7, 5, 3, 3), (2, 2), (1, 1)),
    ((2, 6, 9, 9), (9, 6, 1, 1), (2, 2), (0, 0)),
    ((1, 2, 6, 5), (3, 2, 2, 3), (3, 2), (0, 1)),
    ((2, 3, 5, 6), (4, 3, 1, 1), (1, 1), (1, 1)),
    ((4, 16, 14, 14), (32, 16, 3, 3), (2, 2), (1, 1)),
    ((64, 16, 7, 7), (16, 16, 3, 3), (1, 1), (1, 1)),
    # image slots of 16 and 64 grid positions: moved a vector at a time on AVX-512
    ((5, 3, 3, 3), (4, 3, 3, 3), (1, 1), (1, 1)),
    ((4, 3, 4, 4), (5, 3, 1, 1), (1, 1), (0, 0)),
    ((3, 6, 14, 14), (5, 6, 3, 3), (2, 2), (1, 1)),
]


def _data(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _check(actual, expected, dtype):
    assert actual.dtype == np.dtype(dtype)
    np.testing.assert_allclose(actual, expected, **fwd_tol(dtype, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", FUSED_CASES)
def test_fused_relu_matches_reference(rng, dtype, x_shape, w_shape, stride, padding):
    x, w, b = (_data(rng, s, dtype) for s in (x_shape, w_shape, w_shape[:1]))
    before = [a.copy() for a in (x, w, b)]
    wide = [a.astype(np.float64) for a in (x, w, b)]
    y = cpu.conv2d_forward(x, w, b, stride, padding, relu=True)
    _check(y, ref.relu_forward(ref.conv2d_forward(*wide, stride, padding)), dtype)
    assert (y == 0).any() and (y > 0).any()  # the mask is really exercised
    gy = _data(rng, y.shape, dtype)
    g = ref.relu_backward(gy.astype(np.float64), y)
    gx = cpu.conv2d_backward_input(gy, w, x_shape, stride, padding, y=y)
    _check(gx, ref.conv2d_backward_input(g, wide[1], x_shape, stride, padding), dtype)
    gw, gb = cpu.conv2d_backward_weight(gy, x, w_shape, stride, padding, True, y=y)
    gw_ref, gb_ref = ref.conv2d_backward_weight(g, wide[0], w_shape, stride, padding, True)
    _check(gw, gw_ref, dtype)
    _check(gb, gb_ref, dtype)
    for a, kept in zip((x, w, b), before):
        np.testing.assert_array_equal(a, kept)


def test_relu_mask_treats_special_values_as_relu_backward(rng):
    """The fused backward equals kernels.cpu.relu_backward followed by the plain conv
    backward, special values included (a masked inf or NaN gives 0, as in PyTorch); NaN
    passes the forward ReLU, as numpy.maximum."""
    x = np.ones((1, 1, 3, 3), np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    y = cpu.conv2d_forward(x, w, np.array([-2.0], np.float32), (1, 1), (0, 0), relu=True)
    assert (y == 0).all()
    y[0, 0, 0, 0] = 1.0  # one position passes the mask
    gy = np.full(y.shape, np.inf, np.float32)
    gy[0, 0, 1, 1] = np.nan
    g = cpu.relu_backward(gy, y)
    np.testing.assert_array_equal(cpu.conv2d_backward_input(gy, w, x.shape, (1, 1), (0, 0), y=y),
                                  cpu.conv2d_backward_input(g, w, x.shape, (1, 1), (0, 0)))
    for a, b in zip(cpu.conv2d_backward_weight(gy, x, w.shape, (1, 1), (0, 0), True, y=y),
                    cpu.conv2d_backward_weight(g, x, w.shape, (1, 1), (0, 0), True)):
        np.testing.assert_array_equal(a, b)
    x = np.array([[[[-1.0, np.nan, 1.0]]]], np.float32)
    y = cpu.conv2d_forward(x, w, None, (1, 1), (0, 0), relu=True)
    assert y[0, 0, 0, 0] == 0 and np.isnan(y[0, 0, 0, 1]) and y[0, 0, 0, 2] == 1


@pytest.mark.parametrize("nthreads", [1, 2])
def test_fused_relu_work_split(rng, nthreads):
    """Uneven image blocks and output-channel chunks (N=1), with the mask, on 1 and 2 threads."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
    try:
        for x_shape, w_shape in [((1, 7, 9, 9), (13, 7, 3, 3)), ((37, 3, 6, 6), (5, 3, 3, 3))]:
            test_fused_relu_matches_reference(rng, np.float64, x_shape, w_shape, (1, 1), (1, 1))
    finally:
        numba.set_num_threads(before)


# --- the op (F.conv2d(..., relu=True)), the layer and Sequential's fusion ----------------
OP_CASES = [((2, 3, 6, 7), (4, 3, 3, 2), 1, 1), ((2, 3, 7, 5), (5, 3, 3, 3), 2, (0, 1)),
            ((1, 2, 5, 5), (3, 2, 1, 1), 2, 0)]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", OP_CASES)
def test_conv2d_relu_op_gradcheck(rng, x_shape, w_shape, stride, padding):
    """Every input, float64; the pre-activation is kept away from the ReLU's kink."""
    x, w = away_from_kinks(rng.standard_normal(x_shape)), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    # shift the bias per channel until no pre-activation is within 0.05 of 0
    pre = F.conv2d(x, w, None, stride=stride, padding=padding).numpy()
    for o in range(w_shape[0]):
        v = pre[:, o].ravel() + b[o]
        while np.abs(v).min() < 0.05:
            b[o] += 0.013
            v = pre[:, o].ravel() + b[o]
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding, relu=True),
              [x, w, b], **tol("grad_f64"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", OP_CASES)
def test_conv2d_relu_op_matches_reference(rng, dtype, x_shape, w_shape, stride, padding):
    x, w, b = (_data(rng, s, dtype) for s in (x_shape, w_shape, w_shape[:1]))
    def pair(v):
        return (v, v) if isinstance(v, int) else v
    y = F.conv2d(x, w, b, stride=stride, padding=padding, relu=True)
    want = ref.relu_forward(ref.conv2d_forward(*(a.astype(np.float64) for a in (x, w, b)),
                                               pair(stride), pair(padding)))
    _check(y.numpy(), want, dtype)


def _seq(rng, fuse):
    """A small conv/ReLU/pool stack, including a ReLU after a non-fusing module."""
    model = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1, rng=rng, dtype=np.float64), nn.ReLU(),
                          nn.Conv2d(5, 6, 3, stride=2, padding=1, rng=rng, dtype=np.float64),
                          nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 2 * 2, 3, rng=rng, dtype=np.float64))
    model.fuse = fuse
    return model


def test_sequential_fused_equals_unfused(rng):
    """Same output and the same gradients (to float tolerance) with and without fusion; the
    fused model records no ReLU ops for the two conv + ReLU pairs."""
    x = rng.standard_normal((4, 1, 9, 9))
    results = []
    for fuse in (True, False):
        model = _seq(np.random.default_rng(7), fuse)
        xt = minires.tensor(x, requires_grad=True)
        y = model(xt)
        (y * y).sum().backward()
        results.append((y.numpy(), xt.grad, [p.grad for p in model.parameters()]))
    (y1, gx1, g1), (y2, gx2, g2) = results
    np.testing.assert_allclose(y1, y2, **fwd_tol(np.float64, True))
    np.testing.assert_allclose(gx1, gx2, **fwd_tol(np.float64, True))
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, **fwd_tol(np.float64, True))


def test_sequential_fuses_only_conv_then_exact_relu(rng):
    calls = []

    class Spy(nn.ReLU):  # a ReLU subclass is not "exactly nn.ReLU": it must run
        def forward(self, x):
            calls.append("spy")
            return super().forward(x)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), Spy(), nn.Conv2d(2, 2, 1, rng=rng),
                          nn.ReLU())
    relu_calls = []
    model[3].forward = lambda x: relu_calls.append(1) or F.relu(x)  # a hook on the instance
    model(np.ones((1, 1, 5, 5), np.float32))
    assert calls == ["spy"] and relu_calls == [1]


def test_sequential_never_fuses_a_subclass_that_overrides_forward(rng):
    """A Conv2d subclass with its own forward keeps it: fusing would call Conv2d's conv."""
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    conv = Doubled(1, 2, 3, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((1, 1, 5, 5))
    y = nn.Sequential(conv, nn.ReLU())(x)
    np.testing.assert_array_equal(y.data, np.maximum(conv(x).data, 0))


def test_trace_modules_still_tags_fused_layers(rng):
    """viz.trace_modules wraps each module's forward: those modules run unfused, tagged."""
    from minires import viz
    model = _seq(np.random.default_rng(1), True)
    x = minires.tensor(rng.standard_normal((2, 1, 9, 9)))
    with viz.trace_modules(model) as tags:
        y = model(x)
    names = set(tags.values())
    assert {"0", "1", "2", "3"} <= names, names
    assert y.shape == (2, 3)


def test_thread_team_after_fork_and_errors(rng):
    """A forked child (after the parent used two threads) convolves on two threads; an error
    in a share reaches the caller and the team keeps working."""
    import multiprocessing
    from minires.kernels.cpu.conv_threads import team
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        x, w = rng.standard_normal((8, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
        want = cpu.conv2d_forward(x, w, None, (1, 1), (1, 1))
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply(cpu.conv2d_forward, (x, w, None, (1, 1), (1, 1)))
        np.testing.assert_array_equal(got, want)

        def fail(share, n):
            if share == n - 1:
                raise RuntimeError("share failed")
        with pytest.raises(RuntimeError, match="share failed"):
            team.run(fail, (), 2)
        np.testing.assert_array_equal(cpu.conv2d_forward(x, w, None, (1, 1), (1, 1)), want)
    finally:
        numba.set_num_threads(before)


def test_weight_gradient_does_not_depend_on_threads(rng):
    """Work items are claimed by whichever thread is free, yet gw and gb are the same bits on
    one and two threads and from run to run (image blocks summed in fixed groups)."""
    x = rng.standard_normal((37, 5, 9, 9)).astype(np.float32)
    gy = rng.standard_normal((37, 6, 9, 9)).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for nthreads in (1, 2, 2, 1):
            numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
            results.append(cpu.conv2d_backward_weight(gy, x, (6, 5, 3, 3), (1, 1), (1, 1),
                                                      True))
    finally:
        numba.set_num_threads(before)
    for gw, gb in results[1:]:
        np.testing.assert_array_equal(gw, results[0][0])
        np.testing.assert_array_equal(gb, results[0][1])
