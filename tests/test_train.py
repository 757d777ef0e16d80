"""Training loops on real MNIST subsets: loss goes down, evaluate, checkpoints, bit-identical
resume in process (after a SIGKILL: tests/test_run.py), NaN stop."""
import gc
import os

import numpy as np
import pytest

import minires.ops as F
from conftest import TRAIN_SMOKE_ACCURACY
from helpers import param_copies, sgd_setup
from minires import checkpoint, cli, data, models, optim, run, runtime, train
from minires.tensor import Function, Tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 16-32 images: one thread is as fast, and far steadier on a busy machine."""
    with runtime.limit_threads(1):
        yield


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return data.load_mnist("train", mnist_dir), data.load_mnist("test", mnist_dir)


def _setup(mnist, n=256, batch_size=32, seed=0, lr=3e-3, epochs=1):
    (x, y), _ = mnist
    loader = data.DataLoader(x[:n], y[:n], batch_size=batch_size, seed=seed)
    model = models.seed_net(rng=seed, track_grad_norms=True)
    opt = optim.Adam(model.parameters(), lr=lr)
    sched = optim.OneCycleLR(opt, lr, epochs * len(loader))
    return model, loader, opt, sched


def test_train_epoch_reduces_loss(mnist):
    model, loader, opt, sched = _setup(mnist, n=512, batch_size=32)
    plain = data.DataLoader(*[a[:512] for a in mnist[0]], batch_size=256, shuffle=False)
    before = train.evaluate(model, plain)
    records = []
    result = train.train_epoch(model, loader, opt, sched, progress=False,
                               on_step=[train.SkipNorms(model.skip), records.append])
    after = train.evaluate(model, plain)
    assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] > before["accuracy"]
    assert (result["steps"], result["images"]) == (16, 512)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert records[0]["lr"] == pytest.approx(3e-3 / 25)  # one-cycle starts at max_lr / 25
    assert all(r["x_in"] > 0 and r["x_res"] > 0 for r in records)
    assert records[-1]["x_in"] == model.skip.grad_norms[-1][0]
    assert result["loss"] == pytest.approx(np.mean([r["loss"] for r in records]))


def test_evaluate_matches_direct_computation(mnist):
    _, (xt, yt) = mnist
    model = models.seed_net(rng=1)
    loader = data.DataLoader(xt[:300], yt[:300], batch_size=128, shuffle=False)
    got = train.evaluate(model, loader)
    x = data.DataLoader(xt[:300], yt[:300], batch_size=300, shuffle=False).images
    logits = model(Tensor(x))
    assert got["accuracy"] == np.mean(logits.data.argmax(1) == yt[:300])
    expected = F.cross_entropy(logits, yt[:300]).item()
    np.testing.assert_allclose(got["loss"], expected, **{"rtol": 1e-5, "atol": 1e-6})


def _crash_after(monkeypatch, n):
    """Make train.train_step raise KeyboardInterrupt on its (n+1)-th call."""
    real, calls = train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)


def _weights(path):
    state = checkpoint.load(path)
    return state["step"], state["model"], state["optimizer"]


def test_resume_in_process_is_bit_identical(mnist, tmp_path, monkeypatch):
    hp = {"model": "seed", "lr": 3e-3}
    straight = _setup(mnist, epochs=2)
    run.fit(*straight, epochs=2, out=tmp_path / "a", checkpoint_every=3, hparams=hp,
              progress=False)
    crashed = _setup(mnist, epochs=2)
    _crash_after(monkeypatch, 11)  # epoch 2 (8 steps per epoch), checkpoint at step 9
    with pytest.raises(KeyboardInterrupt):
        run.fit(*crashed, epochs=2, out=tmp_path / "b", checkpoint_every=3, hparams=hp,
                  progress=False)
    monkeypatch.undo()
    assert _weights(tmp_path / "b" / "checkpoint.npz")[0] == 9
    resumed = _setup(mnist, epochs=2)
    result = run.fit(*resumed, epochs=2, out=tmp_path / "b", checkpoint_every=3,
                       resume=tmp_path / "b" / "checkpoint.npz", hparams=hp, progress=False)
    assert result["step"] == 16
    step_a, model_a, opt_a = _weights(tmp_path / "a" / "checkpoint.npz")
    step_b, model_b, opt_b = _weights(tmp_path / "b" / "checkpoint.npz")
    assert step_a == step_b == 16
    for key in model_a:
        np.testing.assert_array_equal(model_a[key], model_b[key])
    for key in opt_a:
        np.testing.assert_array_equal(opt_a[key], opt_b[key])
    rows_a = (tmp_path / "a" / "metrics.csv").read_text()
    assert rows_a == (tmp_path / "b" / "metrics.csv").read_text()  # rows 10-11 not doubled
    assert len(rows_a.splitlines()) == 17


def test_resume_refuses_other_model(mnist, tmp_path):
    model, loader, opt, sched = _setup(mnist, n=64)
    run.fit(model, loader, opt, sched, out=tmp_path, hparams={"model": "seed"},
              progress=False)
    path = tmp_path / "checkpoint.npz"
    model, loader, opt, sched = _setup(mnist, n=64)
    with pytest.raises(run.ResumeError, match="model='seed' but this run has "
                                                 "model='rezero'"):
        run.fit(model, loader, opt, sched, resume=path, hparams={"model": "rezero"})
    other = models.seed_net(channels=8)
    opt = optim.Adam(other.parameters())
    with pytest.raises(run.ResumeError, match="does not fit this run"):
        run.fit(other, loader, opt, optim.OneCycleLR(opt, 1e-3, 2), resume=path)


def test_nan_loss_stops_and_keeps_last_checkpoint(mnist, tmp_path):
    model, loader, opt, sched = _setup(mnist)
    real_step, calls = opt.step, []

    def poisoned_step():
        real_step()
        calls.append(1)
        if len(calls) == 5:  # the 6th forward pass then produces a NaN loss
            model.head[2].weight.data[0, 0] = np.nan

    opt.step = poisoned_step
    with pytest.raises(train.NonFiniteLoss, match=r"loss is nan at step 6.*checkpoint\.npz "
                                                  r"\(step 4\)") as info:
        run.fit(model, loader, opt, sched, out=tmp_path, checkpoint_every=2,
                  progress=False)
    assert info.value.step == 6
    step, weights, _ = _weights(tmp_path / "checkpoint.npz")
    assert step == 4 and all(np.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_train_5000_images_reaches_threshold(mnist):
    """3 epochs on 5,000 images with the CLI's default optimizer (measured: 96.4% on the full
    test set)."""
    (x, y), (xt, yt) = mnist
    loader = data.DataLoader(x[:5000], y[:5000], batch_size=64, seed=0)
    model = models.seed_net(rng=0)
    opt = optim.SGD(model.parameters(), 0.05, momentum=0.9, nesterov=True)
    sched = optim.OneCycleLR(opt, 0.05, 3 * len(loader))
    test = data.DataLoader(xt, yt, batch_size=500, shuffle=False)
    result = run.fit(model, loader, opt, sched, epochs=3, test_loader=test, progress=False)
    assert result["test"]["accuracy"] >= TRAIN_SMOKE_ACCURACY


# --- numerical faults and memory of a step ------------------------------------------------
@pytest.fixture(scope="module")
def mnist_train(mnist):
    return mnist[0]


def test_inf_gradient_with_finite_loss_stops_before_the_update(mnist_train):
    model, loader, opt = sgd_setup(mnist_train)
    bias = model.head[2].bias
    bias.register_hook(lambda g: np.where(np.arange(g.size) == 2, np.inf, g).astype(g.dtype))
    before = param_copies(model)
    with runtime.limit_threads(1), pytest.raises(train.NonFiniteLoss) as info:
        run.fit(model, loader, opt, progress=False)
    assert str(info.value).startswith("gradient not finite at step 1 although the loss is "
                                      "finite (")
    assert "first parameter with a non-finite gradient: head.2.bias (10,)" in str(info.value)
    assert info.value.parameter == "head.2.bias"
    for name, value in param_copies(model).items():
        np.testing.assert_array_equal(value, before[name])


PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _live(cls):
    # type(o), not isinstance: some modules' objects warn when their __class__ is read
    return sum(1 for o in gc.get_objects() if issubclass(type(o), cls))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_thousand_steps_keep_memory_flat(mnist_train):
    """1,000 steps of the CLI's seed net (batch 8, Adam, one thread): resident memory after
    a 100-step warm-up grows by less than MEMORY_SLACK_MB (measured: about 0.1 MB; one
    leaked activation per step would add over 300 MB)."""
    x, y = mnist_train
    loader = data.DataLoader(x[:512], y[:512], batch_size=8, seed=0)
    model = cli.MODELS["seed"](0)
    opt = optim.Adam(model.parameters(), 1e-3)
    rss, step = [], 0
    with runtime.limit_threads(1):
        while step < 1000:
            for xb, yb in loader:
                train.train_step(model, xb, yb, opt, step=step + 1)
                step += 1
                if step % 100 == 0:
                    rss.append(_rss_mb())
                if step == 1000:
                    break
    assert max(rss[1:]) - rss[0] < MEMORY_SLACK_MB, rss


MEMORY_SLACK_MB = 3.0


def test_no_tensor_or_function_survives_a_step(mnist_train):
    """With the cycle collector off, a training step leaves no Function and no new Tensor
    behind: the graph is freed by reference counting alone (no cycles)."""
    x, y = mnist_train
    model = cli.MODELS["seed"](0)
    opt = optim.Adam(model.parameters(), 1e-3)
    xb, yb = data.DataLoader(x[:8], y[:8], batch_size=8).images, y[:8]
    with runtime.limit_threads(1):
        train.train_step(model, xb, yb, opt)  # state created: the optimizer's moments
        gc.collect()
        gc.disable()
        try:
            tensors, functions = _live(Tensor), _live(Function)
            train.train_step(model, xb, yb, opt)
            assert (_live(Tensor), _live(Function)) == (tensors, functions)
        finally:
            gc.enable()
    assert functions == 0 and tensors == len(opt.params)  # only the Parameters
