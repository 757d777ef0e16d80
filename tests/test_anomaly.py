"""minires.anomaly: detect_anomaly names the op (forward or backward) that first produced a
NaN/inf, blames a non-finite leaf, changes no result, and nests with the profiler."""
import importlib

import numpy as np
import pytest

import minires.ops as F
from minires import data, models
from minires.anomaly import AnomalyError, detect_anomaly
from minires.profile import profile
from minires.tensor import Tensor


tensor_module = importlib.import_module("minires.tensor")  # `minires.tensor` is also a function


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return data.load_mnist("train", mnist_dir)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns, too
def test_detect_anomaly_names_the_forward_op():
    x = Tensor(np.array([1.0, -1.0, 4.0], np.float32), requires_grad=True)
    with detect_anomaly(), pytest.raises(AnomalyError) as info:
        F.log(x * 2.0)
    err = info.value
    assert (err.op, err.phase, err.shapes) == ("Log", "forward", ((3,),))
    assert str(err) == ("anomaly: Log forward produced 1 NaN and 0 inf values from finite "
                        "inputs; inputs (3,) float32")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns, too
def test_detect_anomaly_names_the_backward_op():
    x = Tensor(np.array([0.0, 1.0], np.float64), requires_grad=True)
    with detect_anomaly():
        y = F.pow(x, 0.5)  # finite forward; d/dx at 0 is infinite
        with pytest.raises(AnomalyError) as info:
            F.sum(y).backward()
    err = info.value
    assert (err.op, err.phase, err.shapes) == ("Pow", "backward", ((2,),))
    assert "Pow backward produced 0 NaN and 1 inf values in the gradient of input 0, from a " \
           "finite incoming gradient" in str(err)


def test_detect_anomaly_blames_a_non_finite_leaf():
    layer = models.seed_net(rng=0).head[2]
    layer.weight.data[0, 0] = np.inf
    with detect_anomaly(), pytest.raises(AnomalyError, match=r"^anomaly: Linear forward "
                                         r"produced .* its input 1 was already non-finite"):
        layer(Tensor(np.ones((2, 144), np.float32)))


def test_detect_anomaly_changes_nothing_and_restores_the_observer(mnist):
    """Same gradients with and without detection; nested in a profiler, both observers see
    every op, and each block restores the observer it found."""
    x, y = mnist
    xb = data.DataLoader(x[:8], y[:8], batch_size=8).images

    def grads():
        model = models.seed_net(rng=0)
        F.cross_entropy(model(Tensor(xb)), y[:8]).backward()
        return [p.grad for p in model.parameters()]

    plain = grads()
    with profile() as prof:
        with detect_anomaly() as detector:
            assert tensor_module._observer is detector
            checked = grads()
        assert tensor_module._observer is prof
    assert tensor_module._observer is None
    for a, b in zip(plain, checked):
        np.testing.assert_array_equal(a, b)
    assert sum(r["calls"] for r in prof.stats() if r["op"] == "Conv2d") == 5
