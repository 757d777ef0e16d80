"""minires.optim: SGD/Adam/AdamW steps against hand computations (and PyTorch when installed),
lazy state, state_dict round trips and errors, and the learning-rate schedules."""
import math

import numpy as np
import pytest

import minires
from minires import backend, optim
from minires.tensor import Parameter

from conftest import to_numpy, tol

P0 = np.array([1.0, -2.0, 0.5])
GRADS = [np.array([0.5, 0.25, -1.0]), np.array([-1.0, 2.0, 0.125]), np.array([0.3, -0.2, 0.1])]
for _a in [P0] + GRADS:
    _a.flags.writeable = False  # a test that updates a shared array in place fails loudly


def _run(opt_cls, steps=2, **kwargs):
    """Parameter values after `steps` steps from P0 with GRADS (float64)."""
    p = Parameter(P0.copy())
    opt = opt_cls([p], **kwargs)
    for g in GRADS[:steps]:
        p.grad = g.copy()
        opt.step()
    return p.data, opt


def test_sgd_plain_step_literal():
    p, _ = _run(optim.SGD, steps=1, lr=0.1)
    np.testing.assert_allclose(p, [0.95, -2.025, 0.6], **tol("fwd_f64"))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_nesterov_weight_decay(nesterov):
    lr, mu, wd = 0.1, 0.9, 0.01
    got, opt = _run(optim.SGD, lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    p, buf = P0.copy(), None
    for g in GRADS[:2]:
        d = g + wd * p
        buf = d if buf is None else mu * buf + d
        p = p - lr * (d + mu * buf if nesterov else buf)
    np.testing.assert_allclose(got, p, **tol("fwd_f64"))
    np.testing.assert_allclose(opt.state[0]["momentum_buffer"], buf, **tol("fwd_f64"))


def _adam_reference(lr, b1, b2, eps, wd, decoupled, steps=2):
    p, m, v = P0.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADS[:steps], start=1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adam_first_step_is_lr_times_sign():
    p, opt = _run(optim.Adam, steps=1, lr=0.1, eps=0.0)
    np.testing.assert_allclose(p, P0 - 0.1 * np.sign(GRADS[0]), **tol("fwd_f64"))
    assert opt.state[0]["step"] == 1


@pytest.mark.parametrize("cls, decoupled, wd", [(optim.Adam, False, 0.0), (optim.Adam, False, 0.1),
                                                (optim.AdamW, True, 0.1)])
def test_adam_and_adamw_against_hand_computation(cls, decoupled, wd):
    got, _ = _run(cls, steps=3, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    np.testing.assert_allclose(got, _adam_reference(0.05, 0.8, 0.95, 1e-6, wd, decoupled, 3),
                               **tol("fwd_f64"))


def test_adamw_default_decay_differs_from_adam():
    assert optim.AdamW([Parameter(P0.copy())]).weight_decay == 1e-2
    assert optim.Adam([Parameter(P0.copy())]).weight_decay == 0


def test_step_skips_parameters_without_grad_and_zero_grad():
    a, b = Parameter(P0.copy()), Parameter(P0.copy())
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = GRADS[0].copy()
    opt.step()
    np.testing.assert_array_equal(b.data, P0)
    assert list(opt.state) == [0] and opt.steps == 1
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_float32_parameters_stay_float32():
    p = Parameter(P0.astype(np.float32))
    for opt in (optim.SGD([p], lr=0.1, momentum=0.9), optim.AdamW([p])):
        p.grad = GRADS[0].astype(np.float32)
        opt.step()
        assert p.data.dtype == np.float32
        assert all(a.dtype == np.float32 for a in opt.state[0].values() if hasattr(a, "dtype"))


@pytest.mark.parametrize("make, match", [
    (lambda p: optim.SGD([], lr=0.1), "empty parameter list"),
    (lambda p: optim.SGD([P0], lr=0.1), "parameter 0 must be a Tensor"),
    (lambda p: optim.SGD([p, p], lr=0.1), "parameter 1 appears more than once"),
    (lambda p: optim.SGD([p], lr=-1), "lr must be in"),
    (lambda p: optim.SGD([p], lr=0.1, nesterov=True), "nesterov=True needs momentum"),
    (lambda p: optim.Adam([p], betas=(0.9, 1.0)), "betas\\[1\\] must be in"),
])
def test_optimizer_argument_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make(Parameter(P0.copy()))


# --- state dicts --------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.AdamW(ps, lr=0.01)])
def test_state_dict_round_trips_through_npz(make, tmp_path):
    ps = [Parameter(P0.copy()), Parameter(np.ones((2, 2)))]
    opt = make(ps)
    for g in GRADS[:2]:
        ps[0].grad, ps[1].grad = g.copy(), np.full((2, 2), g[0])
        opt.step()
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    with np.load(tmp_path / "opt.npz") as f:
        loaded = dict(f)
    qs = [Parameter(p.data.copy()) for p in ps]
    opt2 = make(qs)
    opt2.load_state_dict(loaded)
    assert opt2.steps == opt.steps and opt2.lr == opt.lr
    for opt_, params in ((opt, ps), (opt2, qs)):
        params[0].grad, params[1].grad = GRADS[2].copy(), np.full((2, 2), 0.7)
        opt_.step()
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p.data, q.data)
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, opt2.state_dict()[key])


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd.__setitem__("num_params", 3), "state is for 3 parameters"),
    (lambda sd: sd.__setitem__("state.5.exp_avg", np.zeros(3)), "unexpected key 'state.5"),
    (lambda sd: sd.__setitem__("state.0.bogus", np.zeros(3)), "unexpected key 'state.0.bogus'"),
    (lambda sd: sd.__setitem__("state.0.exp_avg", np.zeros(4)), "'state.0.exp_avg' has shape"),
    (lambda sd: sd.pop("state.0.exp_avg_sq"), "lacks \\['exp_avg_sq'\\]"),
    (lambda sd: sd.pop("lr"), "missing key 'lr'"),
])
def test_load_state_dict_errors_change_nothing(corrupt, match):
    _, source = _run(optim.Adam, lr=0.1)
    sd = source.state_dict()
    corrupt(sd)
    _, opt = _run(optim.Adam, steps=1, lr=0.2)
    before = {k: np.copy(v) for k, v in opt.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_moving_a_parameter_under_existing_state_raises(monkeypatch):
    p = Parameter(P0.copy())
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = GRADS[0].copy()
    opt.step()
    buf, real = opt.state[0]["momentum_buffer"], backend.device_of
    monkeypatch.setattr(backend, "device_of", lambda a: "cuda" if a is buf else real(a))
    with pytest.raises(RuntimeError, match="parameter 0 \\(3,\\) is on cpu but its optimizer "
                                           "state is on cuda; call model.to"):
        opt.step()


def test_state_lives_on_the_parameter_device(xp):
    device = "cpu" if xp is np else "cuda"
    p = Parameter(minires.tensor(P0.copy(), device=device).data)
    opt = optim.Adam([p], lr=0.1)
    p.grad = xp.asarray(GRADS[0])
    opt.step()
    assert all(type(opt.state[0][k]) is xp.ndarray for k in ("exp_avg", "exp_avg_sq"))
    np.testing.assert_allclose(to_numpy(p.data), _adam_reference(0.1, 0.9, 0.999, 1e-8, 0, False,
                                                                 1), **tol("fwd_f64"))


# --- the multi-tensor GPU step (kernels.sgd_update) ---------------------------------------------
@pytest.mark.parametrize("opt_cls, kwargs", [
    (optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    (optim.Adam, dict(lr=0.1, weight_decay=0.01)), (optim.AdamW, dict(lr=0.1))])
def test_the_cpu_never_takes_the_multi_tensor_path(monkeypatch, opt_cls, kwargs):
    """CPU results stay those of the per-tensor code above: the fused kernels are not asked."""
    def refuse(*args, **kw):
        raise AssertionError("a multi-tensor kernel was called on the CPU")
    monkeypatch.setattr(optim.kernels, "sgd_update", refuse)
    monkeypatch.setattr(optim.kernels, "adam_update", refuse)
    got, _ = _run(opt_cls, **kwargs)
    assert got.dtype == np.float64


def test_multi_tensor_dispatch_declines_host_arrays():
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    assert optim.kernels.sgd_update([p], [g], [], [False], 0.1, 0.0, 0.0, False) is False
    assert optim.kernels.adam_update([p], [g], [g.copy()], [g.copy()], [1], 0.1, (0.9, 0.99),
                                     1e-8, 0.0, False) is False
    assert np.array_equal(p, np.ones(3, np.float32))  # nothing changed


def _pair(opt_cls, device, steps=3, dtype=np.float32, **kwargs):
    """Parameters (host copies) and the state_dict (host copies) after `steps` steps of
    opt_cls over 18 parameters of mixed shapes, one empty (two launches on the GPU), with the
    same gradients on every device."""
    rng = np.random.default_rng(3)
    shapes = [(4, 3, 3, 3), (4,), (0,), (10, 36)] + [(i % 5 + 1,) for i in range(14)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    params = [Parameter(minires.tensor(a, device=device).data) for a in start]
    opt = opt_cls(params, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = backend.to_device(g, device)
        opt.step()
    sd = opt.state_dict()
    return [to_numpy(p.data) for p in params], {k: to_numpy(v) if hasattr(v, "shape") else v
                                                for k, v in sd.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(), reason="no usable GPU/CuPy")
@pytest.mark.parametrize("opt_cls, kwargs, kernel", [
    (optim.SGD, dict(lr=0.1), "sgd_kernel"),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), "sgd_kernel"),
    (optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2), "sgd_kernel"),
    (optim.Adam, dict(lr=0.01, weight_decay=1e-2), "adam_kernel"),
    (optim.AdamW, dict(lr=0.01), "adam_kernel")], ids=lambda v: getattr(v, "__name__", None))
def test_cuda_multi_tensor_step_matches_the_cpu(opt_cls, kwargs, kernel):
    """Two launches per step (18 parameters), same results and state_dict as the CPU's
    per-tensor update."""
    from minires.kernels import cuda
    cuda.reset_launch_counts()
    gpu, gpu_sd = _pair(opt_cls, "cuda", **kwargs)
    assert cuda.launch_counts() == {kernel: 3 * 2}  # 3 steps x 2 launches
    cpu, cpu_sd = _pair(opt_cls, "cpu", **kwargs)
    assert gpu_sd.keys() == cpu_sd.keys()  # the state_dict format is the same
    for a, b in zip(gpu, cpu):  # the GPU may contract a * b + c into one FMA: not bitwise
        np.testing.assert_allclose(a, b, **tol("gpu_vs_cpu_f32"))
    for k in cpu_sd:
        np.testing.assert_allclose(gpu_sd[k], cpu_sd[k], **tol("gpu_vs_cpu_f32"))


# --- schedules ----------------------------------------------------------------------------------
def _lrs(schedule, n):
    out = [schedule.optimizer.lr]
    for _ in range(n):
        schedule.step()
        out.append(schedule.optimizer.lr)
    return out


def test_cosine_lr_warmup_then_cosine():
    opt = optim.SGD([Parameter(P0.copy())], lr=1.0)
    lrs = _lrs(optim.CosineLR(opt, total_steps=10, warmup_steps=2, min_lr=0.1), 11)
    np.testing.assert_allclose(lrs[:3], [0.5, 1.0, 1.0], **tol("fwd_f64"))
    # t = 6 is halfway through the 8 cosine steps: the mean of base and min
    np.testing.assert_allclose(lrs[6], 0.55, **tol("fwd_f64"))
    np.testing.assert_allclose(lrs[4], 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2,
                               **tol("fwd_f64"))
    assert lrs[10] == lrs[11] == 0.1


def test_one_cycle_lr_key_points():
    opt = optim.SGD([Parameter(P0.copy())], lr=1.0)
    lrs = _lrs(optim.OneCycleLR(opt, max_lr=1.0, total_steps=11, pct_start=0.2,
                                div_factor=10, final_div_factor=100), 12)
    peak = 0.2 * 11 - 1  # torch's step index of the peak (1.2)
    np.testing.assert_allclose(lrs[0], 0.1, **tol("fwd_f64"))
    np.testing.assert_allclose(lrs[1], 1.0 - 0.45 * (1 + math.cos(math.pi / peak)),
                               **tol("fwd_f64"))
    np.testing.assert_allclose(lrs[10], 1e-3, **tol("fwd_f64"))
    assert max(lrs) < 1.0 and lrs[11] == lrs[12] == lrs[10]


def test_schedule_state_dict_round_trip():
    opt = optim.SGD([Parameter(P0.copy())], lr=0.5)
    sched = optim.CosineLR(opt, total_steps=20, warmup_steps=3)
    _lrs(sched, 7)
    sd = sched.state_dict()
    opt2 = optim.SGD([Parameter(P0.copy())], lr=9.0)
    sched2 = optim.CosineLR(opt2, total_steps=20, warmup_steps=3)
    sched2.load_state_dict(sd)
    assert _lrs(sched2, 5) == _lrs(sched, 5)
    with pytest.raises(ValueError, match="CosineLR: need"):
        optim.CosineLR(opt, total_steps=5, warmup_steps=6)


# --- PyTorch, where installed -------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.5)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.05)),
])
def test_steps_match_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal((3, 4)), rng.standard_normal((4, 3, 4))
    p, tp = Parameter(p0.copy()), torch.tensor(p0.copy(), requires_grad=True)
    opt, topt = getattr(optim, name)([p], **kwargs), getattr(torch.optim, name)([tp], **kwargs)
    for g in grads:
        p.grad, tp.grad = g.copy(), torch.tensor(g)
        opt.step()
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), **tol("fwd_f64"))


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    sched_t = torch.optim.lr_scheduler
    tp = torch.zeros(1, requires_grad=True)
    opt = optim.SGD([Parameter(np.zeros(1))], lr=0.3)
    topt = torch.optim.SGD([tp], lr=0.3)
    pairs = [(optim.CosineLR(opt, 12, min_lr=0.01), sched_t.CosineAnnealingLR(topt, 12, 0.01))]
    opt2, topt2 = optim.SGD([Parameter(np.zeros(1))], lr=0.3), torch.optim.SGD([tp], lr=0.3)
    pairs.append((optim.OneCycleLR(opt2, 0.3, 12, pct_start=0.25),
                  sched_t.OneCycleLR(topt2, 0.3, total_steps=12, pct_start=0.25,
                                     cycle_momentum=False)))
    for ours, theirs in pairs:
        expect = [theirs.optimizer.param_groups[0]["lr"]]
        for _ in range(11):
            theirs.optimizer.step()
            theirs.step()
            expect.append(theirs.optimizer.param_groups[0]["lr"])
        np.testing.assert_allclose(_lrs(ours, 11), expect, **tol("fwd_f64"))
