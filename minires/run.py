"""Run bookkeeping around the training loops: fit (epochs, progress, metrics CSV, checkpoints,
bit-identical resume) and the training checkpoint itself (training_state, read_checkpoint,
restore).

Imports minires.train (the loops), checkpoint, and through them ops, tensor and backend;
models, optimizers and loaders come in as arguments.
"""
import csv
import pathlib
import sys
import time

import numpy as np

from minires import checkpoint, train
from minires.train import NonFiniteLoss

CSV_FIELDS = train.FIELDS  # metrics.csv's columns, then those `columns=` adds
CHECKPOINT_NAME = "checkpoint.npz"
_KIND = "minires.train"  # marks a training checkpoint (vs. any file written by minires.save)
_PARTS = {"step", "model", "optimizer", "scheduler", "loader", "rng"}  # what it must hold


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (unreadable, wrong kind, model or settings).
    The message starts with "resume: "; `.detail` is the rest."""

    def __init__(self, detail):
        super().__init__(f"resume: {detail}")
        self.detail = detail


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, permission denied, ...); the previous
    checkpoint file is intact and no temp file is left behind."""


class TrainingCheckpoint:
    """An open training checkpoint: `.outline` (its nesting with checkpoint.Declared shapes
    in place of arrays, read without any array data), `.hparams`, `.step`, and `.state`,
    which reads the arrays the first time it is asked for (once) and closes the file."""

    def __init__(self, path, reader):
        self.path, self._reader, self._state = path, reader, None
        self.outline = reader.outline()

    @property
    def hparams(self):
        return self.outline["hparams"]

    @property
    def step(self):
        return self.outline["step"]

    @property
    def state(self):
        if self._state is None:
            try:
                self._state = self._reader.load()
            except ValueError as err:
                raise ResumeError(str(err)) from None
            finally:
                self._reader.close()
        return self._state


def read_checkpoint(path):
    """The training checkpoint at `path`, its index and array headers read and checked (no
    array data yet); ResumeError when unreadable or of another kind."""
    try:
        reader = checkpoint.Reader(path)
    except (OSError, ValueError) as err:
        raise ResumeError(str(err)) from None
    outline = reader.outline()
    if not isinstance(outline, dict) or outline.get("kind") != _KIND \
            or not isinstance(outline.get("hparams"), dict) or not _PARTS <= set(outline):
        reader.close()
        raise ResumeError(f"{path} is not a minires training checkpoint")
    return TrainingCheckpoint(path, reader)


def _check_declared(model, declared):
    """The checks of model.load_state_dict (same messages), on the shapes and dtypes the
    checkpoint declares: a model that does not fit is refused before any data is read."""
    own = model.state_dict()
    declared = declared if isinstance(declared, dict) else {}
    missing = [k for k in own if k not in declared]
    unexpected = [k for k in declared if k not in own]
    if missing or unexpected:
        raise ValueError(f"load_state_dict({type(model).__name__}): missing keys {missing}, "
                         f"unexpected keys {unexpected}; nothing was loaded")
    for key, target in own.items():
        shape, dtype = getattr(declared[key], "shape", None), getattr(declared[key], "dtype", None)
        if shape is not None and tuple(shape) != tuple(target.shape):
            raise ValueError(f"load_state_dict: {key!r} has shape {tuple(shape)}, the model "
                             f"expects {tuple(target.shape)}; nothing was loaded")
        if dtype is not None and dtype != target.dtype:
            raise ValueError(f"load_state_dict: {key!r} has dtype {dtype}, the model expects "
                             f"{target.dtype}; nothing was loaded")


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


def restore(source, model, optimizer, scheduler, loader, hparams=None):
    """Load a training checkpoint (a path, or a TrainingCheckpoint already read) into the
    given objects; returns its global step.

    Raises ResumeError (a ValueError) when the file is unreadable or not a training
    checkpoint, or its model name (or any other entry of `hparams` it also records) or the
    shapes of its state differ from this run's. All or nothing: on any error, the model,
    optimizer, scheduler and loader are left exactly as they were.
    """
    ck = source if isinstance(source, TrainingCheckpoint) else read_checkpoint(source)
    path, outline = ck.path, ck.outline
    for key, value in (hparams or {}).items():
        if key in ck.hparams and ck.hparams[key] != value:
            raise ResumeError(f"{path} was written with {key}={ck.hparams[key]!r} but this "
                              f"run has {key}={value!r}")
    if (outline["scheduler"] is None) != (scheduler is None):
        raise ResumeError(f"{path} has {'no ' if outline['scheduler'] is None else ''}"
                          f"scheduler state but this run has "
                          f"{'one' if scheduler is not None else 'none'}")
    try:
        _check_declared(model, outline["model"])
    except ValueError as err:
        raise ResumeError(_unfit(path, err)) from None
    state = ck.state  # only now are the arrays read
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
        raise ResumeError(_unfit(path, err)) from None
    return ck.step


def _unfit(path, err):
    """'<path> does not fit this run: <why>; nothing was loaded' (said once)."""
    why = str(err).removesuffix("; nothing was loaded")
    return f"{path} does not fit this run: {why}; nothing was loaded"


class _Metrics:
    """metrics.csv in `out`: rows appended per step; on resume, rows after `step` dropped.

    The kept rows are rewritten atomically (checkpoint.write_atomic), so a kill during a
    resume never loses rows that the checkpoint's run had written.
    """

    def __init__(self, path, step, columns=()):
        self.fields = CSV_FIELDS + tuple(columns)
        rows = _kept_rows(path, step) if step and path.exists() else []

        def write(f):
            writer = csv.DictWriter(f, self.fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

        checkpoint.write_atomic(path, write, mode="w", newline="")
        self.file = open(path, "a", newline="", buffering=1)  # line-buffered: tail -f works
        self.writer = csv.DictWriter(self.file, self.fields)

    def __call__(self, record):
        self.writer.writerow({k: "" if record.get(k) is None else record[k]
                              for k in self.fields})

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
        checkpoint_every=0, resume=None, hparams=None, progress=None, log=None, on_step=None,
        columns=()):
    """Train for `epochs` epochs (counted by the loader), then evaluate on test_loader.

    out: folder for metrics.csv and checkpoint.npz (None: write nothing). A checkpoint is
    written every `checkpoint_every` steps (0: at epoch ends only) and at each epoch end,
    atomically, so the last good one survives a kill or a NaN. resume: a checkpoint path (or
    a TrainingCheckpoint) to continue from, bit-identically; `hparams` (model name,
    optimizer, ...) is stored and checked on resume. on_step: callback(s) as in
    train.train_epoch, run before the step's metrics row is written; `columns`: the entries
    they add that metrics.csv records (e.g. SkipNorms.columns). log: callable for one-line
    messages (default: print to stderr).
    Returns {"step", "train" (last epoch's metrics or None), "test" (or None), "images"
    (trained on in this call), "train_seconds", "seconds" (training + evaluation)}.
    Raises NonFiniteLoss (with the last checkpoint named in its message) on NaN/inf.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if resume is not None and not isinstance(resume, TrainingCheckpoint):
        resume = read_checkpoint(resume)
    step = restore(resume, model, optimizer, scheduler, loader, hparams) if resume else 0
    if resume:
        log(f"resumed from {resume.path} at step {step} (epoch {loader.epoch}, batch "
            f"{loader.batch})")
    out = pathlib.Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / "metrics.csv", step, columns) if out is not None else None
    saved = {"step": step, "path": resume.path} if resume else {"step": None, "path": None}
    start, result, images = time.perf_counter(), None, 0

    def save():
        if out is not None:
            _save(training_state(model, optimizer, scheduler, loader, step, hparams),
                  out / CHECKPOINT_NAME, step, saved)

    def record(row):
        nonlocal step
        step = row["step"]
        if metrics is not None:
            metrics(row)
        if checkpoint_every and step % checkpoint_every == 0:
            save()

    try:
        while loader.epoch < epochs:
            result = train.train_epoch(model, loader, optimizer, scheduler, step=step,
                                       on_step=train.as_callbacks(on_step) + [record],
                                       progress=progress,
                                       desc=f"epoch {loader.epoch + 1}/{epochs}")
            images += result["images"]
            if saved["step"] != step:
                save()
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}; {_last_good(saved)}", err.step, err.parameter) from None
    finally:
        if metrics is not None:
            metrics.close()
    train_seconds = time.perf_counter() - start
    test = train.evaluate(model, test_loader) if test_loader is not None else None
    return {"step": step, "train": result, "test": test, "images": images,
            "train_seconds": train_seconds, "seconds": time.perf_counter() - start}


def _save(state, path, step, saved):
    """checkpoint.save, with a failure turned into CheckpointError naming the last good one."""
    try:
        checkpoint.save(state, path)
    except OSError as err:
        raise CheckpointError(err.errno, f"cannot write checkpoint {path} at step {step} "
                              f"({err.strerror or err}); {_last_good(saved)}") from err
    saved.update(step=step, path=path)


def _last_good(saved):
    """Where the last complete checkpoint is, for error messages."""
    return (f"last good checkpoint: {saved['path']} (step {saved['step']})"
            if saved["path"] is not None else "no checkpoint was written")
