"""Bad input gets a clear error (issue 8). Hostile and broken files: minires.load never
unpickles; damaged, foreign, wrong-model and wrong-shape checkpoints raise an error naming the
problem and change nothing; damaged MNIST files name the file. Then a catalogue of API
mistakes, each with the message it gets (float64 data into a float32 model is refused, never
cast: see nn.Linear / nn.Conv2d)."""
import gzip
import pickle
import re
import shutil
import zipfile

import numpy as np
import pytest

import minires.ops as F
from minires import backend, checkpoint, cli, data, models, nn, optim, run, train
from minires.tensor import Tensor


class _Marker:
    """Unpickling this creates the file at `path`: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _live_payload_check(make, load, tmp_path):
    """The hostile payload really runs code when loaded carelessly (so the test can fail)."""
    probe = tmp_path / "probe-marker"
    path = make(_Marker(probe), tmp_path / "probe.npz")
    load(path)
    assert probe.exists()


def _pickle_file(marker, path):
    path.write_bytes(pickle.dumps({"model": marker}))
    return path


def _object_npz(marker, path):
    np.savez(path, w=np.ones(2), bad=np.array([marker], dtype=object))  # pickles the array
    return path


def _pickle_member(marker, path):
    """A zip whose member is named like an array but holds a pickle."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__minires__.npy", pickle.dumps(marker))
    return path


HOSTILE = {  # builder, careless loader (proves the payload is live), expected error
    "pickle renamed .npz": (_pickle_file, lambda p: pickle.loads(p.read_bytes()),
                            r"not an \.npz \(zip\) archive; pickles .* refused"),
    "object array in .npz": (_object_npz, lambda p: np.load(p, allow_pickle=True)["bad"],
                             r"member 'bad\.npy' is an object array; refused"),
    "pickle as .npy member": (_pickle_member,
                              lambda p: pickle.loads(zipfile.ZipFile(p).read("__minires__.npy")),
                              r"the magic string is not correct"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_load_never_unpickles(case, tmp_path, capsys):
    make, careless, message = HOSTILE[case]
    _live_payload_check(make, careless, tmp_path)
    marker = tmp_path / "marker"
    path = make(_Marker(marker), tmp_path / "evil.npz")
    with pytest.raises(ValueError, match=rf"minires.load: .*evil\.npz: {message}"):
        checkpoint.load(path)
    assert cli.main(["train", "--resume", str(path)]) == 2  # the CLI's way in
    assert "evil.npz" in capsys.readouterr().err
    assert not marker.exists()


def test_npy_header_that_lies_about_its_size(tmp_path):
    path = tmp_path / "ck.npz"
    checkpoint.save({"w": np.arange(6.0)}, path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["w.npy"] = members["w.npy"].replace(b"(6,)", b"(9,)")  # claims 9 values
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    with pytest.raises(ValueError, match=r"member 'w\.npy' declares \(9,\) float64 \(200 "
                                         r"bytes\) but holds 176 bytes"):
        checkpoint.load(path)


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def test_every_single_bit_flip_is_caught_or_harmless(tmp_path, rng):
    """Flip one bit of every byte of a small checkpoint (bit i % 8 of byte i): load either
    raises a ValueError naming the file or returns exactly the original content (a flip in a
    field zip ignores, e.g. a timestamp) -- never different data."""
    path, bad = tmp_path / "ck.npz", tmp_path / "flipped.npz"
    checkpoint.save({"w": rng.standard_normal((3, 4)).astype(np.float32), "step": 3}, path)
    raw, original = path.read_bytes(), checkpoint.load(path)
    outcomes = {"error": 0, "same": 0}
    for i in range(len(raw)):
        damaged = bytearray(raw)
        damaged[i] ^= 1 << (i % 8)
        bad.write_bytes(damaged)
        try:
            got = checkpoint.load(bad)
        except ValueError as err:
            assert "flipped.npz" in str(err)
            outcomes["error"] += 1
        else:
            assert _same(original, got), i
            outcomes["same"] += 1
    assert outcomes["error"] > 0.75 * len(raw), outcomes  # data, CRCs, sizes, names checked


# --- broken checkpoints into a run: clear error, nothing changed --------------------------
@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return data.load_mnist("train", mnist_dir)


def _run(mnist, model="seed", channels=16, opt="adam", batch_size=16, steps=2):
    """(model, optimizer, scheduler, loader) after `steps` training steps."""
    x, y = mnist
    loader = data.DataLoader(x[:64], y[:64], batch_size=batch_size, seed=0)
    net = (models.seed_net(channels=channels, rng=0) if model == "seed" else
           models.resnet(depth=8, rng=0))
    optimizer = (optim.Adam(net.parameters(), 1e-3) if opt == "adam" else
                 optim.SGD(net.parameters(), 0.01, momentum=0.9))
    sched = optim.OneCycleLR(optimizer, 1e-3, 8)
    with cli._threads(1):
        for _, (xb, yb) in zip(range(steps), loader):
            train.train_step(net, xb, yb, optimizer, sched)
    return net, optimizer, sched, loader


def _everything(job):
    net, optimizer, sched, loader = job
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(), "loader": loader.state_dict(),
            "lr": optimizer.lr}


def _write(job, path, hparams):
    checkpoint.save(run.training_state(*job, step=3, hparams=hparams), path)
    return path


def _truncated(mnist, path):
    raw = _write(_run(mnist, steps=3), path, {"model": "seed"}).read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def _flipped(mnist, path):
    _write(_run(mnist, steps=3), path, {"model": "seed"})
    raw = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("model/features.2.weight.npy")
    raw[info.header_offset + 300] ^= 0x10  # one bit of a weight
    path.write_bytes(bytes(raw))


BROKEN = {  # how the file is made -> the error (this run: seed net, Adam, batch 16)
    "truncated": (_truncated, r"cannot read checkpoint .*ck\.npz"),
    "bit-flipped": (_flipped, r"member 'model/features\.2\.weight\.npy' is corrupted "
                              r"\(bad CRC-32\)"),
    "wrong model name": (lambda m, p: _write(_run(m), p, {"model": "rezero"}),
                         r"written with model='rezero' but this run has model='seed'"),
    "wrong architecture": (lambda m, p: _write(_run(m, model="resnet"), p, {}),
                           r"does not fit this run: load_state_dict\(Net\): missing keys "
                           r"\['features\.0\.weight'"),
    "wrong shape": (lambda m, p: _write(_run(m, channels=8), p, {}),
                    r"'features\.0\.weight' has shape \(8, 1, 3, 3\), the model expects "
                    r"\(16, 1, 3, 3\); nothing was loaded"),
    "wrong optimizer": (lambda m, p: _write(_run(m, opt="sgd"), p, {}),  # model part fits
                        r"Adam\.load_state_dict: unexpected key 'state\.0\.momentum_buffer'"),
    "wrong batching": (lambda m, p: _write(_run(m, batch_size=32), p, {}),  # model+opt fit
                       r"saved batch_size=32 but this loader has batch_size=16"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_changes_nothing(case, mnist, tmp_path):
    make, message = BROKEN[case]
    path = tmp_path / "ck.npz"
    make(mnist, path)
    job = _run(mnist)
    before = _everything(job)
    with pytest.raises(run.ResumeError, match=message):
        run.restore(path, *job, hparams={"model": "seed"})
    assert _same(before, _everything(job))  # every parameter, moment, position, lr


def test_good_checkpoint_does_change_the_run(mnist, tmp_path):
    """The control for the test above: a fitting checkpoint from a later step loads."""
    path = _write(_run(mnist, steps=3), tmp_path / "ck.npz", {"model": "seed"})
    job = _run(mnist)
    before = _everything(job)
    assert run.restore(path, *job, hparams={"model": "seed"}) == 3
    assert not _same(before, _everything(job))
    assert _same(_everything(_run(mnist, steps=3)), _everything(job))


# --- damaged MNIST files ------------------------------------------------------------------
def _gz(transform):
    def apply(path):
        body = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(transform(body), compresslevel=1))
    return apply


MNIST_DAMAGE = {  # (file, damage, expected message after "MNIST file <path>")
    "empty file": ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b""),
                   r": 0 bytes is too short for an IDX header"),
    "not gzip": ("t10k-labels-idx1-ubyte.gz",
                 lambda p: p.write_bytes(gzip.decompress(p.read_bytes())),
                 r" is unreadable or truncated .*Not a gzipped file"),
    "gzip cut short": ("t10k-images-idx3-ubyte.gz",
                       lambda p: p.write_bytes(p.read_bytes()[:-20]),
                       r" is unreadable or truncated"),
    "header only": ("t10k-images-idx3-ubyte.gz", _gz(lambda b: b[:12]),
                    r": 12 bytes is too short for an IDX header"),
    "wrong magic": ("t10k-labels-idx1-ubyte.gz", _gz(lambda b: b"\0\0\x08\x03" + b[4:]),
                    r": magic number 2051, expected 2049 \(labels file\)"),
    "wrong image size": ("t10k-images-idx3-ubyte.gz",
                         _gz(lambda b: b[:8] + (32).to_bytes(4, "big") + b[12:]),
                         r": images are 32x28, expected 28x28"),
    "content truncated": ("t10k-images-idx3-ubyte.gz", _gz(lambda b: b[:-784]),
                          r": header says 10000 items \(7840016 bytes\) but the file holds "
                          r"7839232 bytes"),
    "one pixel changed": ("t10k-images-idx3-ubyte.gz",
                          _gz(lambda b: b[:-1] + bytes([b[-1] ^ 1])),
                          r": MD5 [0-9a-f]{32}, expected 9fb629c4189551a2d022fa330f9573f3"),
}


@pytest.mark.parametrize("case", MNIST_DAMAGE)
def test_damaged_mnist_file_is_named(case, mnist_dir, tmp_path):
    name, damage, message = MNIST_DAMAGE[case]
    for other in data.FILES["test"]:
        shutil.copy(mnist_dir / other, tmp_path / other)
    damage(tmp_path / name)
    where = re.escape(str(tmp_path / name))
    with pytest.raises(data.MnistError, match=rf"^MNIST file {where}{message}"):
        data.load_mnist("test", root=tmp_path, download=False)


# --- the catalogue of API mistakes --------------------------------------------------------
def _net():
    return models.seed_net(rng=0)


def _img(*shape, dtype=np.float32):
    return Tensor(np.zeros(shape, dtype))


def _ints(*shape):
    return np.arange(int(np.prod(shape))).reshape(shape)


def _backward_twice():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    loss.backward()


CONV1 = r"Conv2d\(1, 16, kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(1, 1\), bias=True\)"
CATALOGUE = {  # mistake -> (call, exception, message regex)
    "image without batch axis": (lambda: _net()(_img(2, 28, 28)), ValueError,
                                 CONV1 + r": expected input of shape \(N, 1, H, W\), got "
                                         r"\(2, 28, 28\) \(add the batch axis: x\[None\]\)"),
    "RGB image into a 1-channel net": (lambda: _net()(_img(2, 3, 28, 28)), ValueError,
                                       CONV1 + r": expected input of shape \(N, 1, H, W\), "
                                               r"got \(2, 3, 28, 28\)$"),
    "feature map into Linear": (lambda: nn.Linear(144, 10)(_img(2, 16, 3, 3)), ValueError,
                                r"Linear\(144, 10, bias=True\): expected input of shape "
                                r"\(\.\.\., 144\), got \(2, 16, 3, 3\) \(flatten it first"),
    "wrong width into Linear": (lambda: nn.Linear(144, 10)(_img(2, 100)), ValueError,
                                r"Linear\(144, 10, bias=True\): expected input of shape "
                                r"\(\.\.\., 144\), got \(2, 100\)$"),
    "BatchNorm2d channel count": (lambda: nn.BatchNorm2d(8)(_img(2, 4, 5, 5)), ValueError,
                                  r"BatchNorm2d\(8, .*\): expected input of shape \(N, 8, H, "
                                  r"W\) or \(N, 8\), got \(2, 4, 5, 5\)"),
    "float64 data into a float32 model": (
        lambda: _net()(_img(2, 1, 28, 28, dtype=np.float64)), TypeError,
        CONV1 + r": input dtype float64 differs from the layer's float32 parameters; convert "
                r"the input \(x\.astype\(np\.float32\)\) or build the model with "
                r"dtype=np\.float64 \(inputs are never cast silently\)"),
    "float32 data into a float64 model": (
        lambda: nn.Linear(4, 2, dtype=np.float64)(_img(3, 4)), TypeError,
        r"Linear\(4, 2, bias=True\): input dtype float32 differs from the layer's float64"),
    "integer data into a layer": (lambda: nn.Linear(4, 2)(Tensor(_ints(3, 4))), TypeError,
                                  r"input dtype int64 differs from the layer's float32 "
                                  r"parameters; convert the input \(x\.astype\(np\.float32\)"
                                  r"\) \(inputs"),
    "label out of range": (lambda: F.cross_entropy(_img(3, 10), np.array([0, 10, 2])),
                           ValueError, r"cross_entropy: labels must be in \[0, 10\), got "
                                       r"values in \[0, 10\]"),
    "negative label": (lambda: F.cross_entropy(_img(2, 10), np.array([-1, 3])), ValueError,
                       r"cross_entropy: labels must be in \[0, 10\), got values in \[-1, 3\]"),
    "float labels": (lambda: F.cross_entropy(_img(2, 10), np.array([1.0, 3.0])), TypeError,
                     r"cross_entropy: labels must be integers, got float64"),
    "labels of another batch": (lambda: F.cross_entropy(_img(2, 10), np.array([1, 2, 3])),
                                ValueError, r"cross_entropy: expected logits \(N, K\) and "
                                            r"labels \(N,\), got logits \(2, 10\) and labels "
                                            r"\(3,\)"),
    "integer logits": (lambda: F.cross_entropy(_ints(2, 10), np.array([1, 2])), TypeError,
                       r"cross_entropy: expected a float32 or float64 input, got int64"),
    "integer tensor into relu": (lambda: F.relu(_ints(2, 3)), TypeError,
                                 r"relu: expected a float32 or float64 input, got int64"),
    "integer tensor into exp": (lambda: F.exp(_ints(2, 3)), TypeError,
                                r"exp: expected a float32 or float64 input, got int64; "
                                r"convert it first"),
    "integer tensor into log": (lambda: Tensor(_ints(3)).log(), TypeError,
                                r"log: expected a float32 or float64 input, got int64"),
    "integer tensor into sigmoid": (lambda: F.sigmoid(_ints(3)), TypeError,
                                    r"sigmoid: expected a float32 or float64 input"),
    "integer image into conv2d": (lambda: F.conv2d(_ints(1, 1, 4, 4), np.ones((1, 1, 3, 3),
                                                                             np.float32)),
                                  TypeError, r"conv2d: expected float32 or float64 inputs of "
                                             r"one dtype, got int64, float32"),
    "integer image into max_pool2d": (lambda: F.max_pool2d(_ints(1, 1, 4, 4), 2), TypeError,
                                      r"max_pool2d: expected a float32 or float64 input, "
                                      r"got int64"),
    "integer image into avg_pool2d": (lambda: F.avg_pool2d(_ints(1, 1, 4, 4), 2), TypeError,
                                      r"avg_pool2d: expected a float32 or float64 input, "
                                      r"got int64"),
    "integer tensors into residual_add": (lambda: F.residual_add(_ints(2, 3), _ints(2, 3)),
                                          TypeError, r"residual_add: expected float32 or "
                                                     r"float64 inputs of one dtype"),
    "requires_grad on integers": (lambda: Tensor(_ints(3), requires_grad=True), TypeError,
                                  r"requires_grad=True needs a floating-point tensor, got "
                                  r"dtype int64"),
    "backward of a non-scalar without gy": (
        lambda: (Tensor(np.ones(3, np.float32), requires_grad=True) * 2).backward(),
        RuntimeError, r"backward: gradient can be implied only for a one-element output, got "
                      r"shape \(3,\); pass gy"),
    "backward with a gy of the wrong shape": (
        lambda: (Tensor(np.ones(3, np.float32), requires_grad=True) * 2).backward(np.ones(2)),
        ValueError, r"backward: gy shape \(2,\) != tensor shape \(3,\)"),
    "backward twice": (_backward_twice, RuntimeError,
                       r"backward: the graph through Sum was already freed by an earlier "
                       r"backward; pass retain_graph=True"),
    "backward of a constant": (lambda: Tensor(np.ones(1)).backward(), RuntimeError,
                               r"backward: tensor does not require grad and has no graph"),
    "model passed to an optimizer": (lambda: optim.SGD(_net(), 0.1), TypeError,
                                     r"SGD: expected an iterable of Parameters, got a Net; "
                                     r"pass model\.parameters\(\)"),
    "skip and block of different shapes": (
        lambda: nn.Residual(nn.Conv2d(2, 3, 3, padding=1))(_img(1, 2, 4, 4)), ValueError,
        r"Residual: the shortcut output has shape \(1, 2, 4, 4\) but the block output has "
        r"shape \(1, 3, 4, 4\)"),
    "kernel larger than the image": (lambda: nn.Conv2d(1, 1, 5)(_img(1, 1, 3, 3)), ValueError,
                                     r"conv2d_forward: kernel \(5, 5\) larger than padded "
                                     r"input \(3, 3\)"),
    "stride 0": (lambda: F.conv2d(_img(1, 1, 4, 4), _img(1, 1, 3, 3), stride=0), ValueError,
                 r"conv2d_forward: stride must be >= 1"),
    "shapes that do not broadcast": (lambda: _img(2, 3) + _img(4), ValueError,
                                     r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"),
    "item() of many elements": (lambda: _img(2, 3).item(), ValueError,
                                r"item\(\): tensor of shape \(2, 3\) has 6 elements"),
}


@pytest.mark.parametrize("mistake", CATALOGUE)
def test_mistake_gets_a_clear_error(mistake):
    call, exc, message = CATALOGUE[mistake]
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "dtype"])
def test_load_state_dict_mismatch_loads_nothing(change):
    model, other = _net(), models.seed_net(rng=1)
    state = other.state_dict()
    if change == "missing":
        del state["head.2.bias"]
        message = r"missing keys \['head\.2\.bias'\], unexpected keys \[\]; nothing was loaded"
    elif change == "extra":
        state["head.3.weight"] = np.ones(3, np.float32)
        message = r"missing keys \[\], unexpected keys \['head\.3\.weight'\]; nothing was"
    elif change == "shape":
        state["head.2.bias"] = np.ones(11, np.float32)
        message = r"'head\.2\.bias' has shape \(11,\), the model expects \(10,\); nothing"
    else:
        state["head.2.bias"] = state["head.2.bias"].astype(np.float64)
        message = r"'head\.2\.bias' has dtype float64, the model expects float32; nothing"
    before = model.state_dict()
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    assert _same(before, model.state_dict())


@pytest.fixture
def fake_cuda(monkeypatch):
    """Simulated GPU on the CPU: arrays registered with the returned function report device
    'cuda' (backend.device_of patched); the arithmetic still runs in NumPy."""
    marked, real = [], backend.device_of
    monkeypatch.setattr(backend, "device_of",
                        lambda a: "cuda" if any(a is m for m in marked) else real(a))
    return marked.append


def test_model_on_gpu_data_on_cpu_simulated(fake_cuda):
    net = _net()
    for p in net.parameters():
        fake_cuda(p.data)
    with pytest.raises(ValueError, match=r"^Conv2d: inputs are on different devices \(\(2, 1, "
                                         r"28, 28\) on cpu, \(16, 1, 3, 3\) on cuda, \(16,\) on "
                                         r"cuda\); move them to one device with \.to\(\)$"):
        net(_img(2, 1, 28, 28))


def test_optimizer_state_then_model_moved_simulated(fake_cuda):
    """Documented rule (minires.optim): build the optimizer whenever, but move the model
    before its first step. Moving after it raises instead of mixing devices."""
    net = nn.Linear(4, 2, rng=0)
    opt = optim.Adam(net.parameters(), 1e-3)
    assert net.to("cpu") is net and opt.params == net.parameters()  # .to keeps identities
    F.sum(net(_img(3, 4))).backward()
    opt.step()  # state is created on the parameters' device
    for p in net.parameters():
        fake_cuda(p.data)  # as if net.to("cuda") ran now
    with pytest.raises(RuntimeError, match=r"Adam: parameter 0 \(2, 4\) is on cuda but its "
                                           r"optimizer state is on cpu; call model\.to\(device"
                                           r"\) before the optimizer's first step"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(), reason="no usable GPU/CuPy")
def test_model_on_gpu_data_on_cpu():
    net = _net().to("cuda")
    with pytest.raises(ValueError, match=r"Conv2d: inputs are on different devices \(\(2, 1, "
                                         r"28, 28\) on cpu, \(16, 1, 3, 3\) on cuda"):
        net(_img(2, 1, 28, 28))
