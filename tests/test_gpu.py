"""Real-GPU tests (marker gpu): kernels.cuda on CuPy arrays against the reference and the CPU
kernels, streams, determinism, float64 gradcheck of the kernel ops on the device, and a tiny
training run. Skipped unless CuPy sees a GPU (minires.backend.cupy_available()).
"""
import numpy as np
import pytest

from minires import kernels
import minires
import minires.ops as F
from conftest import fwd_tol, to_numpy, tol
from minires.kernels import reference as ref
from minires import backend
from minires.gradcheck import away_from_kinks, distinct, gradcheck

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cupy_available(), reason="no usable GPU/CuPy")]

DTYPES = [np.float32, np.float64]
# (x shape, w shape, stride, padding): the seed net's middle conv, strided, rectangular, 1x1
CONVS = [((8, 16, 28, 28), (16, 16, 3, 3), (1, 1), (1, 1)),
         ((3, 5, 17, 13), (7, 5, 3, 2), (2, 1), (1, 2)),
         ((3, 5, 17, 13), (4, 5, 1, 1), (2, 2), (0, 0)),
         ((2, 3, 11, 9), (6, 3, 5, 4), (3, 2), (2, 0))]
POOLS = [((4, 16, 28, 28), (4, 4), (4, 4)), ((3, 5, 17, 13), (3, 2), (2, 1))]


@pytest.fixture(scope="module")
def cp():
    import cupy
    return cupy


@pytest.fixture(scope="module")
def kc():
    from minires.kernels import cuda  # must import on a GPU machine: no skip here
    return cuda


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def close(actual, desired, dtype, reduce=False):
    assert actual.dtype == desired.dtype and actual.shape == desired.shape
    np.testing.assert_allclose(to_numpy(actual), to_numpy(desired), **fwd_tol(dtype, reduce))


def gpu_vs_cpu(actual, desired, dtype):
    """A CUDA kernel's result against the CPU kernel's (float32: TOL gpu_vs_cpu_f32)."""
    assert actual.dtype == desired.dtype and actual.shape == desired.shape
    kw = tol("gpu_vs_cpu_f32") if dtype == np.float32 else fwd_tol(dtype)
    np.testing.assert_allclose(to_numpy(actual), to_numpy(desired), **kw)


def test_dispatch_uses_the_cuda_kernels(cp, kc):
    x = cp.zeros((2, 3), cp.float32)
    assert kernels.backend_for(x) is kc and kernels.backend_name(x) == "numba-cuda"
    with pytest.raises(TypeError, match="expected CuPy"):
        kc.relu_forward(np.zeros((2, 3), np.float32))  # never copied to the device silently


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONVS)
def test_conv2d_vs_reference_and_cpu(cp, kc, rng, dtype, x_shape, w_shape, stride, padding):
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, w_shape[0], dtype)
    gy = randn(rng, ref.conv2d_forward(x, w, b, stride, padding).shape, dtype)
    dx, dw, db, dgy = (cp.asarray(a) for a in (x, w, b, gy))
    y = kc.conv2d_forward(dx, dw, db, stride, padding)
    assert isinstance(y, cp.ndarray) and y.device == dx.device and y.flags.c_contiguous
    close(y, ref.conv2d_forward(dx, dw, db, stride, padding), dtype, reduce=True)
    gpu_vs_cpu(y, kernels.conv2d_forward(x, w, b, stride, padding), dtype)
    gx = kc.conv2d_backward_input(dgy, dw, x_shape, stride, padding)
    close(gx, ref.conv2d_backward_input(dgy, dw, x_shape, stride, padding), dtype, reduce=True)
    gpu_vs_cpu(gx, kernels.conv2d_backward_input(gy, w, x_shape, stride, padding), dtype)
    gw, gb = kc.conv2d_backward_weight(dgy, dx, w_shape, stride, padding, True)
    gw_ref, gb_ref = ref.conv2d_backward_weight(dgy, dx, w_shape, stride, padding, True)
    close(gw, gw_ref, dtype, reduce=True)
    close(gb, gb_ref, dtype, reduce=True)
    gw_cpu, gb_cpu = kernels.conv2d_backward_weight(gy, x, w_shape, stride, padding, True)
    gpu_vs_cpu(gw, gw_cpu, dtype)
    gpu_vs_cpu(gb, gb_cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_vs_reference_and_cpu(cp, kc, rng, dtype):
    x, gy = randn(rng, (4, 8, 9, 7), dtype), randn(rng, (4, 8, 9, 7), dtype)
    y = kc.relu_forward(cp.asarray(x))
    np.testing.assert_array_equal(to_numpy(y), ref.relu_forward(x))
    gx = kc.relu_backward(cp.asarray(gy), y)
    np.testing.assert_array_equal(to_numpy(gx), ref.relu_backward(gy, ref.relu_forward(x)))
    gpu_vs_cpu(gx, kernels.relu_backward(gy, kernels.relu_forward(x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_residual_add_vs_reference_and_cpu(cp, kc, rng, dtype, relu, with_alpha):
    # 300k elements: the first galpha stage hits its block cap and loops
    x, fx, gy = (randn(rng, (12, 16, 40, 40), dtype) for _ in range(3))
    alpha = np.array(0.7, dtype=dtype) if with_alpha else None
    dx, dfx, dgy = cp.asarray(x), cp.asarray(fx), cp.asarray(gy)
    dalpha = None if alpha is None else cp.asarray(alpha)
    y = kc.residual_add_forward(dx, dfx, dalpha, relu)
    close(y, ref.residual_add_forward(dx, dfx, dalpha, relu), dtype)
    gpu_vs_cpu(y, kernels.residual_add_forward(x, fx, alpha, relu), dtype)
    got = kc.residual_add_backward(dgy, y, dfx, dalpha, relu)
    want = ref.residual_add_backward(dgy, y, dfx, dalpha, relu)
    cpu = kernels.residual_add_backward(gy, to_numpy(y), fx, alpha, relu)
    for i in range(2):
        close(got[i], want[i], dtype)
        gpu_vs_cpu(got[i], cpu[i], dtype)
    if with_alpha:
        assert got[2].shape == alpha.shape
        close(got[2], want[2], dtype, reduce=True)
        gpu_vs_cpu(got[2], cpu[2], dtype)
        again = kc.residual_add_backward(dgy, y, dfx, dalpha, relu)[2]
        # a device reduction in a fixed order: bitwise repeatable
        np.testing.assert_array_equal(to_numpy(again), to_numpy(got[2]))
    else:
        assert got[2] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, kernel, stride", POOLS)
def test_max_pool2d_vs_reference_and_cpu(cp, kc, rng, dtype, x_shape, kernel, stride):
    x = rng.integers(-3, 4, size=x_shape).astype(dtype)  # ties: the first maximum must win
    y, argmax = kc.max_pool2d_forward(cp.asarray(x), kernel, stride)
    y_ref, argmax_ref = ref.max_pool2d_forward(x, kernel, stride)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(argmax), argmax_ref)
    assert argmax.dtype == np.int32
    gy = randn(rng, y_ref.shape, dtype)
    gx = kc.max_pool2d_backward(cp.asarray(gy), argmax, x_shape, kernel, stride)
    close(gx, ref.max_pool2d_backward(gy, argmax_ref, x_shape, kernel, stride), dtype)
    gpu_vs_cpu(gx, kernels.max_pool2d_backward(gy, argmax_ref, x_shape, kernel, stride), dtype)


def test_conv2d_backward_weight_is_deterministic(cp, kc, rng):
    dx = cp.asarray(randn(rng, (16, 8, 20, 20), np.float32))
    dgy = cp.asarray(randn(rng, (16, 8, 20, 20), np.float32))
    first = kc.conv2d_backward_weight(dgy, dx, (8, 8, 3, 3), (1, 1), (1, 1), True)
    again = kc.conv2d_backward_weight(dgy, dx, (8, 8, 3, 3), (1, 1), (1, 1), True)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_kernels_run_on_cupys_current_stream(cp, kc, rng):
    """Producer, kernel and consumer on one non-blocking stream stay in order."""
    x = randn(rng, (64, 16, 28, 28), np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        dx = cp.asarray(x) * 2  # queued on `stream`, maybe not finished when the kernel starts
        y = kc.relu_forward(dx) + 1
        w = cp.asarray(randn(rng, (8, 16, 3, 3), np.float32))
        z = kc.conv2d_forward(y, w, None, (1, 1), (1, 1))
    stream.synchronize()
    np.testing.assert_array_equal(to_numpy(y), np.maximum(x * 2, 0) + 1)
    close(z, ref.conv2d_forward(cp.asarray(to_numpy(y)), w, None, (1, 1), (1, 1)), np.float32,
          reduce=True)


def test_non_contiguous_device_inputs(cp, kc, rng):
    x = cp.asarray(randn(rng, (2, 3, 9, 8), np.float64)).transpose(0, 1, 3, 2)
    w = cp.asarray(randn(rng, (4, 3, 6, 3), np.float64))[:, :, ::2]
    close(kc.conv2d_forward(x, w, None, (1, 1), (1, 1)),
          ref.conv2d_forward(cp.ascontiguousarray(x), cp.ascontiguousarray(w), None, (1, 1),
                             (1, 1)), np.float64, reduce=True)


# ------------------------------------------------------------- gradcheck on the device (float64)

def _device(rng, *shape, scale=1.0):
    import cupy
    return cupy.asarray(scale * rng.standard_normal(shape))


def test_gradcheck_conv2d_on_device(rng):
    x, w, b = _device(rng, 2, 3, 7, 6), _device(rng, 4, 3, 3, 2), _device(rng, 4)
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=1), [x, w, b],
              **tol("grad_f64"))
    gradcheck(lambda x, w: F.conv2d(x, w), [x, _device(rng, 2, 3, 1, 1)], **tol("grad_f64"))


def test_gradcheck_relu_on_device(rng):
    gradcheck(F.relu, [away_from_kinks(_device(rng, 2, 3, 5, 4))], **tol("grad_f64"))


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_residual_add_on_device(rng, relu):
    # |x| >= 0.5 and |alpha * fx| <= 0.14: the ReLU kink at x + alpha * fx = 0 is far away
    x = away_from_kinks(_device(rng, 2, 3, 5, 4), margin=0.5)
    fx = _device(rng, 2, 3, 5, 4).clip(-2, 2) * 0.1
    alpha = _device(rng, 1).clip(0.5, 1.0)
    gradcheck(lambda x, fx, a: F.residual_add(x, fx, a, relu=relu), [x, fx, alpha],
              **tol("grad_f64"))
    gradcheck(lambda x, fx: F.residual_add(x, fx, relu=relu), [x, fx], **tol("grad_f64"))


@pytest.mark.parametrize("kernel_size, stride", [(2, None), (3, 2)])
def test_gradcheck_max_pool2d_on_device(rng, kernel_size, stride):
    x = distinct(_device(rng, 2, 3, 7, 6))
    gradcheck(lambda x: F.max_pool2d(x, kernel_size, stride), [x], **tol("grad_f64"))


# ------------------------------------------------------------- a tiny training run

def train_losses(device, dtype, steps=15, lr=0.1):
    """SGD on a fixed batch through conv, relu, residual_add, max_pool2d and linear."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 1, 12, 12)).astype(dtype)
    labels = rng.integers(0, 4, size=16)
    shapes = [(4, 1, 3, 3), (4,), (4, 4, 3, 3), (4,), (4, 4 * 6 * 6), (4,)]
    params = [minires.tensor((0.3 * rng.standard_normal(s)).astype(dtype), requires_grad=True,
                             device=device) for s in shapes]
    x, y = minires.tensor(images, device=device), backend.to_device(labels, device)
    losses = []
    for _ in range(steps):
        w1, b1, w2, b2, w3, b3 = params
        h = F.relu(F.conv2d(x, w1, b1, padding=1))
        h = F.residual_add(h, F.conv2d(h, w2, b2, padding=1), relu=True)
        h = F.flatten(F.max_pool2d(h, 2))
        loss = F.cross_entropy(F.linear(h, w3, b3), y)
        loss.backward()
        losses.append(loss.item())
        for p in params:
            p.data -= lr * p.grad
            p.grad = None
    return losses


def test_training_step_on_device_decreases_loss_and_matches_cpu():
    gpu = train_losses("cuda", np.float32)
    assert gpu[-1] < 0.1 * gpu[0], f"loss did not fall: {gpu}"  # CPU: 5.71 -> 0.063
    # float64, same init and data: the device run retraces the CPU run
    np.testing.assert_allclose(train_losses("cuda", np.float64, steps=5),
                               train_losses("cpu", np.float64, steps=5), **fwd_tol(np.float64))
