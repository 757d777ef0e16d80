"""A catalogue of API mistakes, each with the message it gets (float64 data into a float32
model is refused, never cast: see nn.Linear / nn.Conv2d); state dicts that do not fit load
nothing; mixed devices (simulated on the CPU, and on a real GPU when there is one)."""
import numpy as np
import pytest

import minires.ops as F
from helpers import same
from minires import backend, models, nn, optim
from minires.tensor import Tensor


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
    assert same(before, model.state_dict())


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
