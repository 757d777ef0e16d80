"""Real-GPU tests (marker gpu) of the training path: Module.to, optimizer state and DataLoader
on the device, one device-to-host copy per training step (the logged scalars), checkpoints
moved between GPU and CPU, and `minires train --device cuda`. Skipped without a usable GPU.
"""
import numpy as np
import pytest

import minires
from minires import backend, cli, models, optim, train
from minires.data import DataLoader
from minires.tensor import Tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cupy_available(), reason="no usable GPU/CuPy")]


def tiny_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def test_module_to_cuda_keeps_parameter_identity_and_moves_buffers():
    model = models.resnet(blocks=(1, 1, 1), channels=4, rng=0)
    params = list(model.parameters())
    model.to("cuda")
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(p.device == "cuda" for p in params)
    assert all(backend.device_of(a) == "cuda" for a in model.state_dict().values())


def test_training_step_copies_only_the_logged_scalars_once(monkeypatch):
    model = models.seed_net(rng=0).to("cuda")
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(*tiny_data(), batch_size=32, device="cuda")
    batches = iter(loader)
    train.train_step(model, *next(batches), opt)  # warm-up: JIT, lazy optimizer state
    copies = []
    real_to_device, real_item = backend.to_device, Tensor.item

    def counting_to_device(array, device):
        if device == "cpu" and backend.device_of(array) == "cuda":
            copies.append(("to_device", getattr(array, "shape", None)))
        return real_to_device(array, device)

    def counting_item(self):
        copies.append(("item", self.shape))
        return real_item(self)

    monkeypatch.setattr(backend, "to_device", counting_to_device)
    monkeypatch.setattr(Tensor, "item", counting_item)
    x, y = next(batches)
    train.train_step(model, x, y, opt)
    # the loss, the correct count and the gradient-finite flags cross together, once
    assert len(copies) == 1 and copies[0][0] == "to_device", f"copies in one step: {copies}"
    momenta = [v for v in opt.state_dict().values() if hasattr(v, "shape")]
    assert momenta and all(backend.device_of(v) == "cuda" for v in momenta)


def test_dataloader_batches_live_on_the_device():
    x, y = next(iter(DataLoader(*tiny_data(), batch_size=16, device="cuda")))
    assert backend.device_of(x) == "cuda" and backend.device_of(y) == "cuda"
    assert x.shape == (16, 1, 28, 28) and x.dtype == np.float32


def test_checkpoint_from_gpu_loads_on_cpu_and_back(tmp_path):
    gpu = models.seed_net(rng=0).to("cuda")
    minires.save({"model": gpu.state_dict()}, tmp_path / "ckpt.npz")
    state = minires.load(tmp_path / "ckpt.npz")["model"]
    cpu = models.seed_net(rng=1)
    cpu.load_state_dict(state)
    for (name, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    back = models.seed_net(rng=2).to("cuda")
    back.load_state_dict(cpu.state_dict())
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with minires.no_grad():
        np.testing.assert_array_equal(back(minires.tensor(x, device="cuda")).numpy(),
                                      gpu(minires.tensor(x, device="cuda")).numpy())


def test_cli_train_on_cuda(tmp_path, mnist_dir):
    code = cli.main(["train", "--device", "cuda", "--limit", "512", "--data", str(mnist_dir),
                     "--out", str(tmp_path), "--checkpoint-every", "0"])
    assert code == 0
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "checkpoint.npz").exists()
