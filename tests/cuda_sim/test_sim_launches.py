"""kernels.cuda under the simulator: the launch counter, the multi-tensor SGD update (against
minires.optim.SGD's per-tensor path, bit for bit) and the fused conv + bias + ReLU.

Run as tests/cuda_sim/test_sim_kernels.py is: `NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cuda
tests/cuda_sim`. Tiny shapes only.
"""
import os
import sys

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (tests/test_kernels_cuda.py runs it that way)",
                allow_module_level=True)
pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def kc():
    pytest.importorskip("numba.cuda", reason="numba.cuda (numba-cuda) not installed")
    from minires.kernels import cuda
    assert cuda.SIMULATOR
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield cuda
    sys.setswitchinterval(interval)


def test_launch_counter_counts_each_launch(kc):
    x = np.ones((2, 3), np.float32)
    kc.reset_launch_counts()
    with kc.count_launches() as inner:
        y = kc.relu_forward(x)
        kc.relu_backward(x, y)
        kc.relu_forward(np.zeros((0, 3), np.float32))  # empty: no launch
    kc.relu_forward(x)
    assert dict(inner) == {"relu_forward_kernel": 1, "relu_backward_kernel": 1}
    assert kc.launch_counts() == {"relu_forward_kernel": 2, "relu_backward_kernel": 1}
    kc.reset_launch_counts()
    assert kc.launch_counts() == {}


def _sgd_reference(params, grads, lr, momentum, weight_decay, nesterov, steps):
    """minires.optim.SGD's per-tensor update on NumPy (the CPU path), `steps` times."""
    import minires
    from minires import optim
    ps = [minires.Parameter(p.copy()) for p in params]
    opt = optim.SGD(ps, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g.copy()
        opt.step()
    bufs = [opt.state[i]["momentum_buffer"] if momentum else None for i in range(len(ps))]
    return [p.data for p in ps], bufs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, weight_decay, nesterov",
                         [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True),
                          (0.0, 5e-3, False)])
def test_sgd_update_matches_the_per_tensor_optimizer_bitwise(kc, rng, dtype, momentum,
                                                             weight_decay, nesterov):
    """18 tensors (two launches of at most 16), one of them empty, two steps (the first makes
    the momentum buffers)."""
    shapes = [(3, 2), (5,), (0,), (2, 2, 3)] + [(i % 4 + 1,) for i in range(14)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    want, want_bufs = _sgd_reference(params, grads, 0.1, momentum, weight_decay, nesterov, 2)
    got = [p.copy() for p in params]
    bufs = [np.empty_like(p) for p in params] if momentum else []
    kc.reset_launch_counts()
    for fresh in (True, False):
        kc.sgd_update(got, grads, bufs, [fresh] * len(got), 0.1, momentum, weight_decay,
                      nesterov)
    assert kc.launch_counts() == {"sgd_kernel": 4}  # 2 steps x ceil(18 / 16)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    for a, b in zip(bufs, want_bufs if momentum else []):
        np.testing.assert_array_equal(a, b)


def test_sgd_update_mixed_fresh_buffers(kc, rng):
    """A buffer marked fresh is set to the gradient; the others are updated."""
    params = [rng.standard_normal(4).astype(np.float32) for _ in range(2)]
    grads = [np.ones(4, np.float32), np.ones(4, np.float32)]
    bufs = [np.full(4, 2.0, np.float32), np.full(4, 123.0, np.float32)]
    kc.sgd_update(params, grads, bufs, [False, True], 0.5, 0.5, 0.0, False)
    np.testing.assert_array_equal(bufs[0], np.full(4, 2.0, np.float32))  # 0.5 * 2 + 1
    np.testing.assert_array_equal(bufs[1], np.ones(4, np.float32))


# --- conv + bias + ReLU fused (the API of kernels.cpu.conv: relu=True forward, y= backward) ---
FUSED = [((2, 3, 6, 5), (4, 3, 3, 3), (1, 1), (1, 1)), ((1, 2, 7, 5), (3, 2, 2, 3), (3, 2), (0, 1))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", FUSED)
def test_conv_bias_relu_fused(kc, rng, dtype, x_shape, w_shape, stride, padding):
    from conftest import fwd_tol
    from minires.kernels import reference as ref
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    kc.reset_launch_counts()
    y = kc.conv2d_forward(x, w, b, stride, padding, relu=True)
    want = ref.relu_forward(ref.conv2d_forward(x, w, b, stride, padding))
    np.testing.assert_allclose(y, want, **fwd_tol(dtype, True))
    assert (y == 0).any() and (y > 0).any()  # the mask is really exercised
    gy = rng.standard_normal(y.shape).astype(dtype)
    g = ref.relu_backward(gy, y)
    gx = kc.conv2d_backward_input(gy, w, x_shape, stride, padding, y=y)
    np.testing.assert_allclose(gx, ref.conv2d_backward_input(g, w, x_shape, stride, padding),
                               **fwd_tol(dtype, True))
    gw, gb = kc.conv2d_backward_weight(gy, x, w_shape, stride, padding, True, y=y)
    gw_ref, gb_ref = ref.conv2d_backward_weight(g, x, w_shape, stride, padding, True)
    np.testing.assert_allclose(gw, gw_ref, **fwd_tol(dtype, True))
    np.testing.assert_allclose(gb, gb_ref, **fwd_tol(dtype, True))
    # one launch each: no relu kernels
    assert kc.launch_counts() == {"conv2d_forward_kernel": 1, "conv2d_backward_input_kernel": 1,
                                  "conv2d_backward_weight_kernel": 1}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_conv_relu_mask_propagates_nan_as_relu_backward(kc):
    """A masked inf in gy gives NaN (inf * 0), as relu_backward: the fused backward equals
    relu_backward followed by the plain conv backward, special values included."""
    x = np.ones((1, 1, 3, 3), np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    y = kc.conv2d_forward(x, w, np.array([-2.0], np.float32), (1, 1), (0, 0), relu=True)
    assert (y == 0).all()
    gy = np.full(y.shape, np.inf, np.float32)
    gx = kc.conv2d_backward_input(gy, w, x.shape, (1, 1), (0, 0), y=y)
    plain = kc.conv2d_backward_input(kc.relu_backward(gy, y), w, x.shape, (1, 1), (0, 0))
    assert np.isnan(gx).all() and np.isnan(plain).all()


def test_bench_launches_gpu_branch_runs_on_the_simulated_device(kc, capsys):
    """bench.launches.count as `--device cuda` runs it (no CuPy estimate; CUPTI absent here,
    so CuPy's kernels are reported as not counted), on bench._simcupy's stand-in device."""
    from bench import launches
    with launches.simulated_device(kc):
        row = launches.count("cuda", 1, 1, per_tensor=False, torch=None)
    assert row["minires_kernels"]["sgd_kernel"] == 1 and row["launches_per_step"] is None
    assert row["minires_launches"] == sum(row["minires_kernels"].values()) >= 20
    assert "not counted" in row["how"] and row["cupti"] is None
    launches.print_report({"model": "seed", "mode": "gpu", "gpu": "x", "batch": 1,
                           "channels": 1, "rows": [row, row]})
    assert "launches per step" in capsys.readouterr().out


def _adam_reference(params, grads, steps, **kwargs):
    import minires
    from minires import optim
    ps = [minires.Parameter(p.copy()) for p in params]
    opt = (optim.AdamW if kwargs.pop("decoupled") else optim.Adam)(ps, **kwargs)
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g.copy()
        opt.step()
    return [p.data for p in ps], opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decoupled, weight_decay", [(False, 0.0), (False, 0.1), (True, 0.05)])
def test_adam_update_matches_the_per_tensor_optimizer_bitwise(kc, rng, dtype, decoupled,
                                                              weight_decay):
    """14 tensors (two launches of at most 12), one empty, two steps; tensor 0 one step
    behind the others (its own bias correction)."""
    shapes = [(3, 2), (0,), (2, 2, 3)] + [(i % 3 + 1,) for i in range(11)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay,
                  decoupled=decoupled)
    want, opt = _adam_reference(params, grads, 2, **dict(kwargs))
    got = [p.copy() for p in params]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    kc.reset_launch_counts()
    for t in (1, 2):
        kc.adam_update(got, grads, ms, vs, [t] * len(got), kwargs["lr"], kwargs["betas"],
                       kwargs["eps"], weight_decay, decoupled)
    assert kc.launch_counts() == {"adam_kernel": 4}
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ms[i], opt.state[i]["exp_avg"])
        np.testing.assert_array_equal(vs[i], opt.state[i]["exp_avg_sq"])
    # per-tensor step counts: tensor 0 at its first step while the others are at their third
    one = [params[0].copy()]
    m0, v0 = [np.zeros_like(params[0])], [np.zeros_like(params[0])]
    kc.adam_update(one + got[1:], grads, m0 + ms[1:], v0 + vs[1:], [1] + [3] * 13,
                   kwargs["lr"], kwargs["betas"], kwargs["eps"], weight_decay, decoupled)
    first, _ = _adam_reference(params[:1], grads[:1], 1, **dict(kwargs))
    np.testing.assert_array_equal(one[0], first[0])
