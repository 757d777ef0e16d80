"""The CPU conv kernels fused with a ReLU (relu=True forward, the ReLU output y masking gy in
both backward kernels) against kernels.reference, at odd shapes and the ResNet shapes the
register tiles were tuned for, on one and two threads."""
import numpy as np
import pytest

from conftest import fwd_tol
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


def test_relu_mask_propagates_nan_as_reference(rng):
    """A masked inf in gy gives NaN (inf * 0), as kernels.reference.relu_backward; an unmasked
    one stays inf; NaN passes the forward ReLU, as numpy.maximum."""
    x = np.ones((1, 1, 3, 3), np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    y = cpu.conv2d_forward(x, w, np.array([-2.0], np.float32), (1, 1), (0, 0), relu=True)
    assert (y == 0).all()
    gy = np.full(y.shape, np.inf, np.float32)
    with np.errstate(invalid="ignore"):
        gx = cpu.conv2d_backward_input(gy, w, x.shape, (1, 1), (0, 0), y=y)
        gw, gb = cpu.conv2d_backward_weight(gy, x, w.shape, (1, 1), (0, 0), True, y=y)
    assert np.isnan(gx).all() and np.isnan(gw).all() and np.isnan(gb).all()
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
