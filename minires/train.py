"""Training loops: train_epoch, evaluate and fit (progress bar, metrics CSV, checkpoints,
bit-identical resume, stop on a non-finite loss or gradient).

Imports minires.ops, tensor, backend and checkpoint; models, optimizers and loaders come in as
arguments (nn, optim, data objects).
"""
import csv
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

import minires.ops as F
from minires import backend, checkpoint
from minires.tensor import Tensor, no_grad

CSV_FIELDS = ("step", "epoch", "loss", "accuracy", "lr", "x_in", "x_res")
CHECKPOINT_NAME = "checkpoint.npz"
_KIND = "minires.train"  # marks a training checkpoint (vs. any file written by minires.save)


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (wrong kind, model or settings)."""


class NonFiniteLoss(RuntimeError):
    """The loss or a gradient became NaN or infinite; `.step` is the (1-based) step that
    produced it and `.parameter` the first parameter (definition order) whose gradient is
    not finite, or None."""

    def __init__(self, message, step, parameter=None):
        super().__init__(message)
        self.step, self.parameter = step, parameter


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, permission denied, ...); the previous
    checkpoint file is intact and no temp file is left behind."""


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


def _tracked_skip(model):
    """The model's `.skip` module if it records (x_in, x_res) gradient norms, else None."""
    skip = getattr(model, "skip", None)
    return skip if getattr(skip, "track_grad_norms", False) else None


def train_epoch(model, loader, optimizer, scheduler=None, *, step=0, on_step=None,
                progress=None, desc="train"):
    """Train over the rest of the DataLoader's current epoch (from its saved position).

    on_step(record) is called after every step with a dict of CSV_FIELDS; its step is global
    (`step` + steps taken here). progress: True shows a tqdm bar on stderr, None only on a
    terminal, False never. Returns {"loss", "accuracy", "steps", "images", "seconds",
    "images_per_s"} over the steps taken here.
    """
    model.train()
    skip = _tracked_skip(model)
    done = loader.state_dict()["batch"] * loader.batch_size  # images already seen (resume)
    total_loss, correct, images, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    with tqdm(total=len(loader.labels), initial=min(done, len(loader.labels)), unit="img",
              desc=desc, disable=_disabled(progress), file=sys.stderr,
              dynamic_ncols=True) as bar:
        for x, y in loader:
            seen = len(skip.grad_norms) if skip is not None else 0
            loss, ok, lr = train_step(model, x, y, optimizer, scheduler, step + steps + 1)
            steps, images = steps + 1, images + len(y)
            total_loss, correct = total_loss + loss * len(y), correct + ok
            # the norms this step's backward recorded, if any
            fresh = skip is not None and len(skip.grad_norms) > seen
            x_in, x_res = skip.grad_norms[-1] if fresh else (None, None)
            if on_step is not None:
                on_step(dict(step=step + steps, epoch=loader.epoch, loss=loss,
                             accuracy=ok / len(y), lr=lr, x_in=x_in, x_res=x_res))
            bar.update(len(y))
            bar.set_postfix({"loss": f"{loss:.4f}", "acc": f"{correct / images:.4f}"},
                            refresh=False)
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(images, 1), "accuracy": correct / max(images, 1),
            "steps": steps, "images": images, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else float("nan")}


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


def _rng_states(model):
    """Bit-generator states of every numpy Generator a module holds (e.g. Dropout's)."""
    states = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                states[f"{name}.{attr}" if name else attr] = value.bit_generator.state
    return states


def _set_rng_states(model, states):
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            key = f"{name}.{attr}" if name else attr
            if isinstance(value, np.random.Generator) and key in states:
                value.bit_generator.state = states[key]


def training_state(model, optimizer, scheduler, loader, step, hparams):
    """Everything a bit-identical resume needs, as a dict for checkpoint.save."""
    return {"kind": _KIND, "hparams": dict(hparams or {}), "step": int(step),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "loader": loader.state_dict(), "rng": _rng_states(model)}


def restore(path, model, optimizer, scheduler, loader, hparams=None):
    """Load a training checkpoint into the given objects; returns its global step.

    Raises ResumeError (a ValueError) when the file is unreadable or not a training
    checkpoint, or its model name (or any other entry of `hparams` it also records) or the
    shapes of its state differ from this run's. All or nothing: on any error, the model,
    optimizer, scheduler and loader are left exactly as they were.
    """
    try:
        state = checkpoint.load(path)
    except (OSError, ValueError) as err:
        raise ResumeError(f"resume: {err}") from None
    if not isinstance(state, dict) or state.get("kind") != _KIND:
        raise ResumeError(f"resume: {path} is not a minires training checkpoint")
    saved = state["hparams"]
    for key, value in (hparams or {}).items():
        if key in saved and saved[key] != value:
            raise ResumeError(f"resume: {path} was written with {key}={saved[key]!r} but "
                              f"this run has {key}={value!r}")
    if (state["scheduler"] is None) != (scheduler is None):
        raise ResumeError(f"resume: {path} has {'no ' if state['scheduler'] is None else ''}"
                          f"scheduler state but this run has "
                          f"{'one' if scheduler is not None else 'none'}")
    parts = [(model, "model"), (optimizer, "optimizer"), (loader, "loader")]
    parts += [(scheduler, "scheduler")] if scheduler is not None else []
    before = [obj.state_dict() for obj, _ in parts]  # to roll back a half-done restore
    rngs = _rng_states(model)
    try:
        for obj, key in parts:
            obj.load_state_dict(state[key])
        _set_rng_states(model, state["rng"])
    except (ValueError, TypeError, KeyError) as err:
        for (obj, _), old in reversed(list(zip(parts, before))):  # optimizer's lr last
            obj.load_state_dict(old)
        _set_rng_states(model, rngs)
        raise ResumeError(f"resume: {path} does not fit this run: {err}; nothing was "
                          f"loaded") from None
    return state["step"]


class _Metrics:
    """metrics.csv in `out`: rows appended per step; on resume, rows after `step` dropped.

    The kept rows are rewritten atomically (temp file, then rename), so a kill during a
    resume never loses rows that the checkpoint's run had written.
    """

    def __init__(self, path, step):
        rows = _kept_rows(path, step) if step and path.exists() else []
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, CSV_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        checkpoint.remove_stale_temps(path)  # left by a run killed in this very spot
        self.file = open(path, "a", newline="", buffering=1)  # line-buffered: tail -f works
        self.writer = csv.DictWriter(self.file, CSV_FIELDS)

    def __call__(self, record):
        self.writer.writerow({k: "" if record[k] is None else record[k] for k in CSV_FIELDS})

    def close(self):
        self.file.close()


def _kept_rows(path, step):
    """The rows of metrics.csv up to `step`, stopping at a torn line (a kill mid-write)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if None in r or None in r.values() or not r["step"].isdigit() \
                    or int(r["step"]) > step:
                break
            rows.append(r)
    return rows


def fit(model, loader, optimizer, scheduler=None, *, epochs=1, test_loader=None, out=None,
        checkpoint_every=0, resume=None, hparams=None, progress=None, log=None):
    """Train for `epochs` epochs (counted by the loader), then evaluate on test_loader.

    out: folder for metrics.csv and checkpoint.npz (None: write nothing). A checkpoint is
    written every `checkpoint_every` steps (0: never) and at each epoch end, atomically, so
    the last good one survives a kill or a NaN. resume: a checkpoint path to continue from
    (bit-identically); `hparams` (model name, optimizer, ...) is stored and checked on resume.
    log: callable for one-line messages (default: print to stderr).
    Returns {"step", "train" (last epoch's metrics or None), "test" (or None), "images"
    (trained on in this call), "train_seconds", "seconds" (training + evaluation)}.
    Raises NonFiniteLoss (with the last checkpoint named in its message) on NaN/inf.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    step = restore(resume, model, optimizer, scheduler, loader, hparams) if resume else 0
    if resume:
        log(f"resumed from {resume} at step {step} (epoch {loader.epoch}, batch "
            f"{loader.batch})")
    out = pathlib.Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / "metrics.csv", step) if out is not None else None
    saved = {"step": step, "path": resume} if resume else {"step": None, "path": None}
    start, train, images = time.perf_counter(), None, 0

    def save():
        if out is not None:
            state = training_state(model, optimizer, scheduler, loader, step, hparams)
            try:
                checkpoint.save(state, out / CHECKPOINT_NAME)
            except OSError as err:
                raise CheckpointError(err.errno, f"cannot write checkpoint "
                                      f"{out / CHECKPOINT_NAME} at step {step} "
                                      f"({err.strerror or err}); {_last_good(saved)}") from err
            saved.update(step=step, path=out / CHECKPOINT_NAME)

    def on_step(record):
        nonlocal step
        step = record["step"]
        if metrics is not None:
            metrics(record)
        if checkpoint_every and step % checkpoint_every == 0:
            save()

    try:
        while loader.epoch < epochs:
            train = train_epoch(model, loader, optimizer, scheduler, step=step,
                                on_step=on_step, progress=progress,
                                desc=f"epoch {loader.epoch + 1}/{epochs}")
            images += train["images"]
            if saved["step"] != step:
                save()
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}; {_last_good(saved)}", err.step, err.parameter) from None
    finally:
        if metrics is not None:
            metrics.close()
    train_seconds = time.perf_counter() - start
    test = evaluate(model, test_loader) if test_loader is not None else None
    return {"step": step, "train": train, "test": test, "images": images,
            "train_seconds": train_seconds, "seconds": time.perf_counter() - start}


def _last_good(saved):
    """Where the last complete checkpoint is, for error messages."""
    return (f"last good checkpoint: {saved['path']} (step {saved['step']})"
            if saved["path"] is not None else "no checkpoint was written")
