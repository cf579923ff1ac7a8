"""Training utilities: AdamW, gradient clipping and the learning-rate schedule.

* :func:`decay_mask` decides which Params get weight decay: only the weight
  matrices ``W`` of :class:`~minblip.layers.Linear` modules.
* :class:`AdamW` is ``torch.optim.AdamW`` (Loshchilov & Hutter, "Decoupled
  Weight Decay Regularization") written out in NumPy, with a ``state_dict``
  that a checkpoint can store and restore exactly.
* :func:`clip_grad_norm` is ``torch.nn.utils.clip_grad_norm_``.
* :func:`warmup_cosine_lr` is the linear-warmup-then-cosine schedule BLIP-2
  trains with (LAVIS ``linear_warmup_cosine_lr``).

The optimiser only reads ``Param.grad`` and writes ``Param.data`` in place, so a
tied Param (one object reachable by two names) is updated exactly once.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from .core import Module, Param
from .layers import Linear


def _linear_weight_roles(obj, visiting: set, linear_w: set, other: set) -> None:
    """Sort every Param reachable from ``obj`` by the role it is reached in.

    ``linear_w`` collects ids of Params reached as the ``W`` attribute of a
    Linear, ``other`` ids of Params reached in any other way. The walk visits
    what ``Module.named_params`` visits (attributes, lists, tuples, dicts).
    """
    if isinstance(obj, Module):
        if id(obj) in visiting:  # a module reachable from itself would loop forever
            return
        visiting = visiting | {id(obj)}
        for key, value in vars(obj).items():
            if isinstance(value, Param):
                (linear_w if isinstance(obj, Linear) and key == "W" else other).add(id(value))
            else:
                _linear_weight_roles(value, visiting, linear_w, other)
    elif isinstance(obj, (list, tuple, dict)):
        for value in (obj.values() if isinstance(obj, dict) else obj):
            if isinstance(value, Param):
                other.add(id(value))
            else:
                _linear_weight_roles(value, visiting, linear_w, other)


def decay_mask(module: Module) -> dict[str, bool]:
    """Which Params of ``module`` get weight decay, by their ``named_params`` name.

    Rule: a Param decays if and only if it is the weight matrix ``W`` of a
    :class:`~minblip.layers.Linear` (any Linear subclass counts). Biases,
    LayerNorm gamma/beta, Embedding tables, cls tokens, position embeddings,
    query tokens, temperatures and every other Param do not. This is minGPT's
    ``configure_optimizers`` rule (Linear weights whitelisted, LayerNorm and
    Embedding blacklisted). For comparison: salesforce/BLIP decays every Param
    (``optim.AdamW(model.parameters(), weight_decay=0.05)``), and LAVIS's
    ``get_optimizer_params`` skips Params with ``ndim < 2`` or "bias"/"ln" in
    the name, so it still decays embedding tables.

    The rule is decided by module type while walking the module tree, never by
    matching names. A Param that is reachable both as a Linear ``W`` and in any
    other role (say, an embedding table that is also a Linear's weight) does
    NOT decay: the non-decaying role wins, so a word embedding tied to an LM
    head is never shrunk. A Linear shared by two parents is still a Linear.

    Returns a dict ``{name: decays}`` in ``named_params`` order.
    """
    if not isinstance(module, Module):
        raise TypeError(f"decay_mask expects a Module, got {type(module).__name__}")
    linear_w: set[int] = set()
    other: set[int] = set()
    _linear_weight_roles(module, set(), linear_w, other)
    return {name: id(p) in linear_w and id(p) not in other
            for name, p in module.named_params()}


def _named(params, what: str) -> list[tuple[str, Param]]:
    """A Module or a list of (name, Param) pairs -> checked list of unique pairs."""
    if isinstance(params, Module):
        return params.named_params()
    try:
        pairs = list(params)
    except TypeError:
        raise TypeError(
            f"{what} expects a Module or a list of (name, Param) pairs, "
            f"got {type(params).__name__}") from None
    seen_names: set[str] = set()
    seen_ids: dict[int, str] = {}
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], Param)):
            raise TypeError(f"{what} expects (name, Param) pairs, got {item!r}")
        name, p = item
        if name in seen_names:
            raise ValueError(f"{what}: the name {name!r} is listed twice")
        if id(p) in seen_ids:
            # updating one array twice per step would silently double its learning rate
            raise ValueError(
                f"{what}: one Param is listed twice, as {seen_ids[id(p)]!r} and {name!r}")
        seen_names.add(name)
        seen_ids[id(p)] = name
    return pairs


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
    lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    return lr


class AdamW:
    """AdamW with decoupled weight decay, exactly as ``torch.optim.AdamW``.

    For every Param p with gradient g, at step t (counted from 1)::

        p <- p * (1 - lr * weight_decay)           # only where decay is on
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g * g
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    The decay multiplies p by a constant instead of adding ``wd * p`` to the
    gradient, so it is not rescaled by Adam's ``1/sqrt(v)``: that is the
    "decoupled" in the name. ``m`` and ``v`` start at zero, and the bias
    corrections undo their pull towards zero in the first steps.

    Every Param is updated on every step. A Param whose ``grad`` is all zero
    still decays and keeps moving along its momentum, as in PyTorch when the
    gradient tensor is zero (PyTorch skips only Params whose ``grad is None``,
    which a minblip Param never is). The step count is shared by all Params.

    Arguments:
        params: a Module (its ``named_params()``) or a list of (name, Param)
            pairs; names key the ``state_dict``.
        lr: the learning rate used when ``step()`` is called without one.
        betas, eps: Adam's moment decay rates and denominator guard.
        weight_decay: the decoupled decay rate (BLIP and BLIP-2 use 0.05).
        no_decay: names of Params that get no weight decay. ``None`` means
            :func:`decay_mask` when ``params`` is a Module, and "every Param
            decays" (PyTorch's behaviour for a plain list) otherwise.

    Moments are kept in each Param's dtype and the update runs in that dtype
    (float32 in training).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.05, no_decay=None):
        pairs = _named(params, "AdamW")
        self.lr = _check_lr(lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= float(b) < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        if no_decay is None:
            mask = decay_mask(params) if isinstance(params, Module) else {}
            self.decay = [mask.get(name, True) for name in self.names]
        else:
            if isinstance(no_decay, str):
                raise TypeError("no_decay must be a collection of Param names, not one string")
            no_decay = set(no_decay)
            unknown = sorted(no_decay - set(self.names))
            if unknown:
                raise ValueError(f"no_decay names no Param of this optimiser: {unknown}")
            self.decay = [name not in no_decay for name in self.names]
        self.step_count = 0
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def zero_grad(self) -> None:
        """Reset every Param's ``grad`` to zero (call at the start of a step)."""
        for p in self.params:
            p.zero_grad()

    def step(self, lr: float | None = None) -> None:
        """Update every trainable Param in place from its ``grad`` (a Param frozen
        since the optimiser was built is left alone, moments and all).

        ``lr`` overrides the stored learning rate for this step only; a
        schedule passes ``warmup_cosine_lr(step, ...)`` here.
        """
        lr = self.lr if lr is None else _check_lr(lr)
        for name, p, m in zip(self.names, self.params, self.m):
            if p.data.dtype != m.dtype or p.data.shape != m.shape:
                raise TypeError(
                    f"AdamW: Param {name!r} is now {p.data.dtype} {p.data.shape} but the "
                    f"optimiser state is {m.dtype} {m.shape}; build the optimiser after "
                    "Module.to()")
        beta1, beta2 = self.betas
        self.step_count += 1
        t = self.step_count
        step_size = lr / (1.0 - beta1 ** t)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
        for p, m, v, decays in zip(self.params, self.m, self.v, self.decay):
            if p.frozen:  # frozen after the optimiser was built: it stays as it is
                continue
            g = p.grad
            if decays and self.weight_decay != 0.0:
                p.data *= 1.0 - lr * self.weight_decay  # decoupled: applied before, not via g
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * (g * g)
            denom = np.sqrt(v)
            denom /= bias_correction2_sqrt
            denom += self.eps
            p.data -= step_size * (m / denom)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimiser state as arrays: ``step`` (int64 scalar), ``m/<name>``, ``v/<name>``.

        The arrays are copies, so later steps do not change a saved state.
        Hyper-parameters (lr, betas, eps, weight_decay, no_decay) are not part
        of the state: they belong to the run's configuration.
        """
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, m, v in zip(self.names, self.m, self.v):
            out[f"m/{name}"] = m.copy()
            out[f"v/{name}"] = v.copy()
        return out

    def validate_state_dict(self, state: dict) -> None:
        """Raise ValueError unless ``state`` fits this optimiser (used before loading anything)."""
        if not isinstance(state, dict):
            raise TypeError(f"optimiser state must be a dict, got {type(state).__name__}")
        expected = {"step"} | {f"{k}/{n}" for n in self.names for k in ("m", "v")}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        mismatched = []
        for name, p in zip(self.names, self.params):
            for k in ("m", "v"):
                key = f"{k}/{name}"
                if key in state:
                    a = np.asarray(state[key])
                    if a.shape != p.shape or not np.issubdtype(a.dtype, np.floating):
                        mismatched.append(
                            f"{key}: expected {p.shape} floating, found {a.shape} {a.dtype}")
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        if mismatched:
            problems.append(f"shape/dtype mismatch {mismatched}")
        if "step" in state:
            step = np.asarray(state["step"])
            if step.shape != () or not np.issubdtype(step.dtype, np.integer) or step < 0:
                problems.append(
                    f"step must be an integer scalar >= 0, found {step.dtype} {step.shape} {step}")
        if problems:
            raise ValueError("AdamW state does not match this optimiser: " + "; ".join(problems))

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; checks everything before changing anything."""
        self.validate_state_dict(state)
        self.step_count = int(state["step"])
        for name, m, v in zip(self.names, self.m, self.v):
            m[...] = state[f"m/{name}"]
            v[...] = state[f"v/{name}"]


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients together so their joint L2 norm is at most ``max_norm``.

    ``params``: a Module, a list of Params, or a list of (name, Param) pairs; a
    Param listed twice is counted and scaled once. Returns the total norm
    sqrt(sum of every grad entry squared) measured *before* clipping. As in
    ``torch.nn.utils.clip_grad_norm_``, the grads are multiplied in place by
    ``max_norm / (norm + 1e-6)`` when that factor is below 1 (the 1e-6 keeps a
    zero gradient from dividing by zero), and left alone otherwise. A
    non-finite norm is returned as is (PyTorch's default
    ``error_if_nonfinite=False``); a training loop should check it.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating, np.integer)):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if isinstance(params, Module):
        plist = params.params()
    else:
        plist = []
        for item in params:
            p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
            if not isinstance(p, Param):
                raise TypeError(f"clip_grad_norm expects Params, got {item!r}")
            plist.append(p)
    unique = list({id(p): p for p in plist}.values())
    squares = 0.0
    for p in unique:
        # float64, so a float32 model's norm is not itself rounded away
        g = p.grad.reshape(-1).astype(np.float64, copy=False)
        squares += float(g @ g)  # one BLAS dot product instead of np.sum(np.square(g))
    total = math.sqrt(squares)
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for p in unique:
            p.grad *= scale
    return total


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int,
                     min_lr: float = 0.0, warmup_start_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (0-based) of a linear warmup then cosine decay.

    For ``step < warmup_steps`` the rate rises linearly from
    ``warmup_start_lr`` (at step 0) towards ``base_lr``; from ``warmup_steps``
    to ``total_steps`` it follows half a cosine from ``base_lr`` down to
    ``min_lr``::

        lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * s / S)) / 2,
        s = step - warmup_steps,  S = total_steps - warmup_steps

    so the rate is ``base_lr`` at the end of warmup, the mean of ``base_lr``
    and ``min_lr`` halfway through the decay, and ``min_lr`` at
    ``step == total_steps``.

    The two pieces are LAVIS's ``warmup_lr_schedule`` and ``cosine_lr_schedule``
    (``lavis/common/optims.py``, driven by ``LinearWarmupCosineLRScheduler``;
    BLIP-2 stage 1 uses base 1e-4, min 1e-5, warmup start 1e-6, 5000 warmup
    steps). One difference: LAVIS evaluates the cosine per *epoch* and counts
    the warmup inside epoch 0, whereas here both run per step and the cosine
    starts when the warmup ends, so the curve is continuous.
    """
    try:
        step, total_steps, warmup_steps = (operator.index(step), operator.index(total_steps),
                                           operator.index(warmup_steps))
    except TypeError:
        raise TypeError(
            "step, total_steps and warmup_steps must be integers, got "
            f"{step!r}, {total_steps!r}, {warmup_steps!r}") from None
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    for label, value in (("base_lr", base_lr), ("min_lr", min_lr),
                         ("warmup_start_lr", warmup_start_lr)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{label} must be a finite number >= 0, got {value}")
    if min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed base_lr ({base_lr})")
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
