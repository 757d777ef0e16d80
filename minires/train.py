"""Training loops: train_step, train_epoch and evaluate (plain loops returning metric dicts;
stop on a non-finite loss or gradient), and SkipNorms, the on-step callback that adds a skip
connection's (x_in, x_res) gradient norms to each step's record. Run bookkeeping (fit, metrics
CSV, checkpoints, resume) is minires.run.

Imports minires.ops, tensor and backend; models, optimizers and loaders come in as arguments.
"""
import math
import sys
import time

from tqdm import tqdm

import minires.ops as F
from minires import backend
from minires.tensor import Tensor, no_grad

FIELDS = ("step", "epoch", "loss", "accuracy", "lr")  # what every step's record holds


class NonFiniteLoss(RuntimeError):
    """The loss or a gradient became NaN or infinite; `.step` is the (1-based) step that
    produced it and `.parameter` the first parameter (definition order) whose gradient is
    not finite, or None."""

    def __init__(self, message, step, parameter=None):
        super().__init__(message)
        self.step, self.parameter = step, parameter


def train_step(model, x, y, optimizer, scheduler=None, step=None):
    """One optimisation step on a batch: forward, loss, backward, update, schedule.

    x: (B, ...) device array, y: (B,) int64. Returns (loss float, correct int, lr float),
    lr being the rate this step used. Raises NonFiniteLoss before touching the weights when
    the loss or any gradient is NaN/inf, naming the step and the first such parameter.
    """
    try:
        logits = model(Tensor(x))
        loss = F.cross_entropy(logits, y)
        model.zero_grad()
        loss.backward()  # also for a NaN loss: its gradients say which parameter went bad
    except FloatingPointError as err:  # minires.anomaly.detect_anomaly() named the op
        raise NonFiniteLoss(f"step {step}: {err}; training stopped", step) from None
    value, correct, bad = _step_summary(model, loss, logits, y)
    if bad is not None or not math.isfinite(value):
        raise NonFiniteLoss(_non_finite_message(model, value, step, bad), step,
                            bad and bad[0])
    lr = current_lr(optimizer)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return value, correct, lr


def _step_summary(model, loss, logits, y):
    """(loss float, correct count, (name, shape) of the first parameter whose gradient holds
    a NaN/inf or None), read with ONE device-to-host copy: on a GPU the per-step scalars are
    stacked on the device first, so a step waits for the device once."""
    xp = backend.array_module(loss.data)
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    finite = [xp.isfinite(p.grad).all() for _, p in named]
    correct = (logits.data.argmax(axis=1) == y).sum()
    host = backend.to_device(xp.stack([xp.asarray(v, dtype=xp.float64) for v in
                                       [loss.data, correct, *finite]]), "cpu")
    bad = next((i for i, ok in enumerate(host[2:]) if not ok), None)
    return (float(host[0]), int(host[1]),
            None if bad is None else (named[bad][0], tuple(named[bad][1].shape)))


def _non_finite_message(model, value, step, bad):
    head = (f"loss is {value} at step {step}" if not math.isfinite(value) else
            f"gradient not finite at step {step} although the loss is finite ({value:.4g})")
    parts = [head]
    if bad is not None:
        parts.append(f"first parameter with a non-finite gradient: {bad[0]} {bad[1]}")
    broken = next(((n, tuple(p.shape)) for n, p in model.named_parameters()
                   if not bool(backend.array_module(p.data).isfinite(p.data).all())), None)
    if broken is not None:
        parts.append(f"first parameter with a non-finite value: {broken[0]} {broken[1]}")
    parts.append("training stopped (minires train --detect-anomaly names the op)")
    return "; ".join(parts)


def current_lr(optimizer):
    """The learning rate the optimizer will use for its next step."""
    return float(optimizer.lr)


def train_epoch(model, loader, optimizer, scheduler=None, *, step=0, on_step=None,
                progress=None, desc="train"):
    """Train over the rest of the DataLoader's current epoch (from its saved position).

    on_step: a callable or a list of callables, each called in order after every step with
    that step's record, a dict of FIELDS (its step is global: `step` + steps taken here); a
    callback may add entries for the ones after it (e.g. SkipNorms). progress: True shows a
    tqdm bar on stderr, None only on a terminal, False never. Returns {"loss", "accuracy",
    "steps", "images", "seconds", "images_per_s"} over the steps taken here.
    """
    model.train()
    callbacks = as_callbacks(on_step)
    done = loader.state_dict()["batch"] * loader.batch_size  # images already seen (resume)
    total_loss, correct, images, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    with tqdm(total=len(loader.labels), initial=min(done, len(loader.labels)), unit="img",
              desc=desc, disable=_disabled(progress), file=sys.stderr,
              dynamic_ncols=True) as bar:
        for x, y in loader:
            loss, ok, lr = train_step(model, x, y, optimizer, scheduler, step + steps + 1)
            steps, images = steps + 1, images + len(y)
            total_loss, correct = total_loss + loss * len(y), correct + ok
            record = dict(step=step + steps, epoch=loader.epoch, loss=loss,
                          accuracy=ok / len(y), lr=lr)
            for callback in callbacks:
                callback(record)
            bar.update(len(y))
            bar.set_postfix({"loss": f"{loss:.4f}", "acc": f"{correct / images:.4f}"},
                            refresh=False)
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(images, 1), "accuracy": correct / max(images, 1),
            "steps": steps, "images": images, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else float("nan")}


def as_callbacks(on_step):
    """on_step as a list: None -> [], one callable -> [it], a list or tuple -> its items."""
    if on_step is None:
        return []
    return list(on_step) if isinstance(on_step, (list, tuple)) else [on_step]


def _disabled(progress):
    return None if progress is None else not progress  # tqdm: None = off when not a TTY


def evaluate(model, loader):
    """Mean cross-entropy and accuracy over every batch of loader, in eval mode, no graph.

    Returns {"loss": float, "accuracy": float}. Restores the model's training flag.
    """
    was_training = getattr(model, "training", True)
    model.eval()
    total_loss, correct, images = 0.0, 0, 0
    with no_grad():
        for x, y in loader:
            logits = model(Tensor(x))
            total_loss += F.cross_entropy(logits, y).item() * len(y)
            correct += int((logits.data.argmax(axis=1) == y).sum())
            images += len(y)
    model.train(was_training)
    return {"loss": total_loss / max(images, 1), "accuracy": correct / max(images, 1)}


class SkipNorms:
    """On-step callback for the residual experiments: adds `columns` (x_in, x_res) to each
    record, the gradient norms that `module` recorded in that step's backward (a skip module
    built with track_grad_norms=True: nn.Residual, nn.ReZero, ...); None when it recorded
    nothing this step, or does not record at all (any other module, or None).

    x_in is the norm of the gradient into the block's input along the block path, x_res the
    norm over the skip. Pass it first in on_step, and `columns=SkipNorms.columns` to run.fit.
    """

    columns = ("x_in", "x_res")

    def __init__(self, module):
        self.module = module
        self.seen = len(self._norms())

    def _norms(self):
        tracking = getattr(self.module, "track_grad_norms", False)
        return getattr(self.module, "grad_norms", []) if tracking else []

    def __call__(self, record):
        norms = self._norms()
        # a backward appends one pair; a shorter list was reset by its owner since
        fresh = len(norms) > self.seen or 0 < len(norms) < self.seen
        record["x_in"], record["x_res"] = norms[-1] if fresh else (None, None)
        self.seen = len(norms)
