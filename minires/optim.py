"""Optimizers (SGD, Adam, AdamW; PyTorch semantics) and per-step learning-rate schedules
(CosineLR, OneCycleLR). Imports minires.tensor and minires.backend only.

State is created lazily at a parameter's first update, on that parameter's device, and keyed
by the parameter's index in the list given to the optimizer. Move the model first
(`model.to(device)`), then build the optimizer or at least take its first step: a parameter
that changes device under existing state raises an error rather than mixing devices.
"""
import math

from minires import backend, kernels
from minires.tensor import Tensor


def _check_params(params, name):
    if isinstance(params, Tensor) or hasattr(params, "named_parameters"):
        raise TypeError(f"{name}: expected an iterable of Parameters, got a "
                        f"{type(params).__name__}; pass model.parameters()")
    params = list(params)
    if not params:
        raise ValueError(f"{name}: got an empty parameter list")
    seen = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise TypeError(f"{name}: parameter {i} must be a Tensor that requires grad "
                            f"(a Parameter), got {type(p).__name__}")
        if id(p) in seen:
            raise ValueError(f"{name}: parameter {i} appears more than once")
        seen.add(id(p))
    return params


def _check_range(name, arg, value, low, high=math.inf, high_open=False):
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        raise ValueError(f"{name}: {arg} must be in [{low}, {high}{')' if high_open else ']'}, "
                         f"got {value}")


class Optimizer:
    """Base class: holds `params` (a list), `lr`, lazy per-parameter `state` (index -> dict
    of arrays and the int 'step') and `steps` (completed step() calls).

    Subclasses set STATE (the array names a parameter's state holds) and implement
    `_init_state(p)` and `_update(p, g, state)`.
    """

    STATE = ()

    def __init__(self, params, lr):
        name = type(self).__name__
        self.params = _check_params(params, name)
        _check_range(name, "lr", lr, 0.0)
        self.lr, self.state, self.steps = float(lr), {}, 0

    def zero_grad(self):
        """Set every parameter's gradient to None."""
        for p in self.params:
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient (those with grad None are skipped): on
        the GPU through the subclass's multi-tensor kernel (_step_fused) where it has one and
        it applies, else tensor by tensor (_update)."""
        todo = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        fused = getattr(self, "_step_fused", None)
        if (fused is not None and todo and backend.device_of(todo[0][1].data) == "cuda"
                and fused(todo)):
            self.steps += 1
            return
        for i, p in todo:
            self._update(p, p.grad, self._state_for(i, p))
        self.steps += 1

    def _state_for(self, i, p):
        state = self.state.get(i)
        if state is None:
            state = self.state[i] = self._init_state(p)
            return state
        for key in self.STATE:
            if key in state and backend.device_of(state[key]) != p.device:
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {i} {tuple(p.shape)} is on {p.device} "
                    f"but its optimizer state is on {backend.device_of(state[key])}; call "
                    f"model.to(device) before the optimizer's first step (or reload the "
                    f"optimizer's state_dict after moving)")
        return state

    def _init_state(self, p):
        return {}

    def _required(self):
        """The keys every per-parameter state entry holds."""
        return set()

    def _update(self, p, g, state):
        raise NotImplementedError

    # --- state dicts ------------------------------------------------------------------------
    def state_dict(self):
        """A flat dict: 'lr', 'steps', 'num_params' and 'state.<i>.<name>' (array copies on
        the parameters' devices, and int 'step' counts). Round-trips exactly."""
        out = {"lr": self.lr, "steps": self.steps, "num_params": len(self.params)}
        for i, state in sorted(self.state.items()):
            for key, value in state.items():
                out[f"state.{i}.{key}"] = value.copy() if key in self.STATE else int(value)
        return out

    def load_state_dict(self, sd):
        """Restore lr, steps and per-parameter state from `state_dict()` output (values may be
        0-d arrays, e.g. read back from .npz). Everything is validated before anything
        changes; a ValueError names the first bad key. Arrays land on each parameter's device.
        """
        name = type(self).__name__
        for key in ("lr", "steps", "num_params"):
            if key not in sd:
                raise ValueError(f"{name}.load_state_dict: missing key {key!r}")
        if int(sd["num_params"]) != len(self.params):
            raise ValueError(f"{name}.load_state_dict: state is for {int(sd['num_params'])} "
                             f"parameters, this optimizer has {len(self.params)}")
        state = {}
        for key, value in sd.items():
            if key in ("lr", "steps", "num_params"):
                continue
            i, field = self._parse_key(key)
            state.setdefault(i, {})[field] = self._checked(key, i, field, value)
        for i, entry in state.items():
            missing = sorted(self._required() - set(entry))
            if missing:
                raise ValueError(f"{name}.load_state_dict: state of parameter {i} lacks "
                                 f"{missing}")
        self.lr, self.steps, self.state = float(sd["lr"]), int(sd["steps"]), state

    def _parse_key(self, key):
        parts = key.split(".")
        ok = len(parts) == 3 and parts[0] == "state" and parts[1].isdigit()
        if not ok or int(parts[1]) >= len(self.params) or (
                parts[2] not in self.STATE and parts[2] != "step"):
            raise ValueError(f"{type(self).__name__}.load_state_dict: unexpected key {key!r} "
                             f"(expected state.<i>.<name>, i < {len(self.params)}, name in "
                             f"{list(self.STATE) + ['step']})")
        return int(parts[1]), parts[2]

    def _checked(self, key, i, field, value):
        if field == "step":
            return int(value)
        p = self.params[i]
        raw = value.data if isinstance(value, Tensor) else value
        if getattr(raw, "shape", None) != p.shape or getattr(raw, "dtype", None) != p.dtype:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {key!r} has shape "
                             f"{getattr(raw, 'shape', None)} and dtype "
                             f"{getattr(raw, 'dtype', None)}; parameter {i} has shape "
                             f"{p.shape} and dtype {p.dtype}")
        return backend.to_device(raw, p.device).copy()


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and (coupled,
    L2) weight decay, as torch.optim.SGD with dampening 0:

        g = grad + weight_decay * p
        buf = g (first step) else momentum * buf + g
        g = g + momentum * buf (nesterov) else buf
        p -= lr * g
    """

    STATE = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        _check_range("SGD", "momentum", momentum, 0.0)
        _check_range("SGD", "weight_decay", weight_decay, 0.0)
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.nesterov = bool(nesterov)

    def _required(self):
        return {"momentum_buffer"} if self.momentum else set()

    def _step_fused(self, todo):
        """The multi-tensor update of `todo` [(index, parameter)]; False if it does not apply
        (nothing changed then). New momentum buffers are allocated here and kept only when the
        kernel ran; the state keeps its per-parameter layout (state_dict unchanged)."""
        states = [self._state_for(i, p) for i, p in todo]
        bufs, fresh = [], []
        if self.momentum:
            xp = backend.array_module(todo[0][1].data)
            for (_, p), state in zip(todo, states):
                buf = state.get("momentum_buffer")
                fresh.append(buf is None)
                bufs.append(xp.empty_like(p.data) if buf is None else buf)
        else:
            fresh = [False] * len(todo)
        if not kernels.sgd_update([p.data for _, p in todo], [p.grad for _, p in todo], bufs,
                                  fresh, self.lr, self.momentum, self.weight_decay,
                                  self.nesterov):
            return False
        for state, buf, new in zip(states, bufs, fresh):
            if new:
                state["momentum_buffer"] = buf
        return True

    def _update(self, p, g, state):
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma and Ba) with bias correction, as torch.optim.Adam (amsgrad off):

        g = grad + weight_decay * p          (coupled L2; AdamW decays p directly instead)
        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;  t += 1
        p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
    """

    STATE = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        name = type(self).__name__
        b1, b2 = (float(b) for b in betas)
        _check_range(name, "betas[0]", b1, 0.0, 1.0, high_open=True)
        _check_range(name, "betas[1]", b2, 0.0, 1.0, high_open=True)
        _check_range(name, "eps", eps, 0.0)
        _check_range(name, "weight_decay", weight_decay, 0.0)
        self.betas, self.eps, self.weight_decay = (b1, b2), float(eps), float(weight_decay)

    def _init_state(self, p):
        xp = backend.array_module(p.data)
        return {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}

    def _required(self):
        return {"step", "exp_avg", "exp_avg_sq"}

    def _step_fused(self, todo):
        """The multi-tensor update of `todo` [(index, parameter)]; False (nothing changed) if
        it does not apply. Step counts advance only when the kernel ran."""
        states = [self._state_for(i, p) for i, p in todo]
        steps = [s["step"] + 1 for s in states]
        if not kernels.adam_update([p.data for _, p in todo], [p.grad for _, p in todo],
                                   [s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states], steps, self.lr,
                                   self.betas, self.eps, self.weight_decay, self.decoupled):
            return False
        for state, t in zip(states, steps):
            state["step"] = t
        return True

    def _update(self, p, g, state):
        (b1, b2), xp = self.betas, backend.array_module(p.data)
        if self.decoupled:
            p.data *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            g = g + self.weight_decay * p.data
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        denom = xp.sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
        p.data -= (self.lr / (1 - b1 ** t)) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW:
    p *= 1 - lr * weight_decay before the Adam step, which sees the raw gradient."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


# --- learning-rate schedules (call step() once per batch, after optimizer.step()) ----------
class _Schedule:
    """Sets optimizer.lr = lr_at(t) for t = 0 at construction, then t += 1 on each step()."""

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected an Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer, self.t = optimizer, 0
        optimizer.lr = self.lr_at(0)

    def step(self):
        self.t += 1
        self.optimizer.lr = self.lr_at(self.t)

    @property
    def lr(self):
        return self.lr_at(self.t)

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, sd):
        if "t" not in sd:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing key 't'")
        self.t = int(sd["t"])
        self.optimizer.lr = self.lr_at(self.t)


class CosineLR(_Schedule):
    """Linear warm-up to the optimizer's lr over `warmup_steps` (lr*(t+1)/warmup_steps),
    then cosine decay to min_lr at t = total_steps; constant min_lr afterwards.

    With warmup_steps=0 this is torch's CosineAnnealingLR(T_max=total_steps, eta_min=min_lr).
    """

    def __init__(self, optimizer, total_steps, warmup_steps=0, min_lr=0.0):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps or min_lr < 0:
            raise ValueError(f"CosineLR: need total_steps >= 1, 0 <= warmup_steps <= "
                             f"total_steps and min_lr >= 0, got {total_steps}, "
                             f"{warmup_steps}, {min_lr}")
        self.base_lr, self.total_steps = optimizer.lr, int(total_steps)
        self.warmup_steps, self.min_lr = int(warmup_steps), float(min_lr)
        super().__init__(optimizer)

    def lr_at(self, t):
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        progress = min((t - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1)
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2

    def state_dict(self):
        return {"t": self.t, "base_lr": self.base_lr}

    def load_state_dict(self, sd):
        self.base_lr = float(sd.get("base_lr", self.base_lr))
        super().load_state_dict(sd)


class OneCycleLR(_Schedule):
    """The one-cycle policy (Smith), as torch's OneCycleLR with cosine annealing and no
    momentum cycling: lr rises from max_lr/div_factor to max_lr over the first pct_start of
    total_steps, then falls to max_lr/div_factor/final_div_factor at step total_steps - 1
    (held there for later steps)."""

    def __init__(self, optimizer, max_lr, total_steps, pct_start=0.3, div_factor=25.0,
                 final_div_factor=1e4):
        if total_steps < 2 or not 0 < pct_start < 1 or max_lr <= 0:
            raise ValueError(f"OneCycleLR: need total_steps >= 2, 0 < pct_start < 1 and "
                             f"max_lr > 0, got {total_steps}, {pct_start}, {max_lr}")
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.initial_lr = self.max_lr / div_factor
        self.final_lr = self.initial_lr / final_div_factor
        self.peak_step = float(pct_start * total_steps) - 1  # as torch counts it
        super().__init__(optimizer)

    def lr_at(self, t):
        t = min(t, self.total_steps - 1)
        if t <= self.peak_step:
            pct = t / self.peak_step if self.peak_step > 0 else 1.0
            start, end = self.initial_lr, self.max_lr
        else:
            span = self.total_steps - 1 - self.peak_step
            start, end, pct = self.max_lr, self.final_lr, (t - self.peak_step) / span
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
