"""The gradient checker: hand-written backward passes against central differences.

Two entry points:

* :func:`gradcheck` checks any deterministic loss ``loss_fn(backward) -> float``
  against the gradients it accumulates into a set of Params;
* :func:`check_layer` wraps one layer's ``forward``/``backward`` in the loss
  ``sum(out * R)`` with a fixed random R and checks its inputs and Params.

Both run in float64, compare with the combined tolerance
``|analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)``, print (on
request) a table of the worst error per Param, and raise :class:`GradcheckError`
when any check fails.

Why float64: a central difference (L(x+h) - L(x-h)) / 2h has truncation error
~h^2 and rounding error ~u |L| / h, u the unit roundoff. In float32 (u ~ 6e-8)
the best h gives errors around 1e-3 to 1e-2, too coarse to tell a subtly wrong
gradient from noise; in float64 (u ~ 1e-16) with h = 1e-5 both terms are ~1e-10
for a loss of size ~1 (h = 1e-6 makes the rounding term ten times larger).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .core import Module, Param


class GradcheckError(AssertionError):
    """Raised when an analytic gradient disagrees with finite differences;
    ``report`` is the :class:`GradcheckReport` whose table the message shows."""

    def __init__(self, message: str, report: "GradcheckReport | None" = None):
        super().__init__(message)
        self.report = report


def rel_error(a, b) -> float:
    """CS231n's max relative error max |a - b| / max(|a| + |b|, 1e-300)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-300)))


@dataclass
class ParamCheck:
    name: str
    shape: tuple
    n_checked: int
    max_abs_err: float
    max_rel_err: float
    passed: bool
    worst_index: tuple | None = None
    worst_values: tuple | None = None  # (analytic, numeric) at the worst coordinate


@dataclass
class GradcheckReport:
    rows: list[ParamCheck] = field(default_factory=list)
    directional: ParamCheck | None = None
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and (self.directional is None
                                                      or self.directional.passed)

    @property
    def max_rel_err(self) -> float:
        rows = self.rows + ([self.directional] if self.directional else [])
        return max((r.max_rel_err for r in rows), default=0.0)

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [24])
        lines = [f"{'param':<{w}}  {'shape':<16} {'checked':>7}  {'max abs err':>11}  "
                 f"{'max rel err':>11}  result"]
        for r in self.rows + ([self.directional] if self.directional else []):
            lines.append(f"{r.name:<{w}}  {str(r.shape):<16} {r.n_checked:>7}  "
                         f"{r.max_abs_err:>11.2e}  {r.max_rel_err:>11.2e}  "
                         f"{'ok' if r.passed else 'FAIL'}")
        lines.append(f"tolerance: |analytic - numeric| <= {self.atol:g} + {self.rtol:g} * "
                     f"max(|analytic|, |numeric|); "
                     f"{'all passed' if self.passed else 'FAILED'}")
        for r in self.rows + ([self.directional] if self.directional else []):
            if not r.passed and r.worst_values is not None:
                a, n = r.worst_values
                lines.append(f"  {r.name}{list(r.worst_index) if r.worst_index else ''}: "
                             f"analytic {a:.10g} vs numeric {n:.10g}")
        return "\n".join(lines)


def _named(params) -> list[tuple[str, Param]]:
    if isinstance(params, Module):
        return params.named_params()
    if isinstance(params, dict):
        items = list(params.items())
    elif isinstance(params, (list, tuple)):
        items = [tuple(p) if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                 else (f"param{i}", p) for i, p in enumerate(params)]
    else:
        raise TypeError(f"gradcheck: expected a Module, a dict name -> Param or a list of "
                        f"Params, got {type(params).__name__}")
    seen, out = set(), []
    for name, p in items:
        if not isinstance(p, Param):
            raise TypeError(f"gradcheck: expected Params, got {type(p).__name__} for {name!r}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _compare(analytic, numeric, atol, rtol):
    abs_err = np.abs(analytic - numeric)
    big = np.maximum(np.abs(analytic), np.abs(numeric))
    ok = abs_err <= atol + rtol * big
    rel = np.where(big > atol, abs_err / np.maximum(big, 1e-300), 0.0)
    return abs_err, rel, ok


def gradcheck(loss_fn, params, *, n_coords: int = 6, eps: float = 1e-5, atol: float = 1e-8,
              rtol: float = 1e-6, seed: int = 0, directional: bool = True,
              raise_on_fail: bool = True, verbose: bool = False) -> GradcheckReport:
    """Check the gradients a loss accumulates into ``params`` against central differences.

    ``loss_fn(backward: bool) -> float`` must be deterministic (dropout masks
    and sampled negatives fixed). With ``backward=True`` it must also add the
    gradient of the loss into every ``param.grad``. ``params`` is a Module, a
    dict name -> Param, or a list of Params or (name, Param) pairs; every Param
    must be float64.

    For each Param, ``n_coords`` coordinates are checked: the one with the largest
    analytic gradient and the rest at random (all of them if the Param is small).
    Then one random direction over all Params at once: a directional derivative
    costs two evaluations and catches a Param that got no gradient at all.
    Returns the report; raises GradcheckError if any check fails (unless
    ``raise_on_fail=False``).
    """
    named = _named(params)
    for name, p in named:
        if p.data.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 Params (call .to(np.float64)); "
                            f"{name!r} is {p.data.dtype}")
    rng = np.random.default_rng(seed)
    for _, p in named:
        p.grad[...] = 0.0
    loss_fn(True)
    analytic = {id(p): p.grad.copy() for _, p in named}

    def numeric_at(p, index):
        old = p.data[index]
        p.data[index] = old + eps
        up = loss_fn(False)
        p.data[index] = old - eps
        down = loss_fn(False)
        p.data[index] = old
        return (up - down) / (2.0 * eps)

    report = GradcheckReport(atol=atol, rtol=rtol)
    for name, p in named:
        g = analytic[id(p)]
        if p.size <= n_coords:
            flat = np.arange(p.size)
        else:
            first = int(np.argmax(np.abs(g)))
            others = rng.choice(np.delete(np.arange(p.size), first), n_coords - 1, replace=False)
            flat = np.concatenate([[first], others])
        idx = [np.unravel_index(int(f), p.shape) for f in flat]
        a = np.array([g[i] for i in idx], dtype=np.float64)
        n = np.array([numeric_at(p, i) for i in idx], dtype=np.float64)
        abs_err, rel, ok = _compare(a, n, atol, rtol)
        worst = int(np.argmax(abs_err - (atol + rtol * np.maximum(np.abs(a), np.abs(n)))))
        report.rows.append(ParamCheck(name, p.shape, len(idx), float(abs_err.max(initial=0.0)),
                                      float(rel.max(initial=0.0)), bool(ok.all()),
                                      tuple(int(v) for v in idx[worst]) if idx else None,
                                      (float(a[worst]), float(n[worst])) if idx else None))

    if directional and named:
        dirs = [rng.standard_normal(p.shape) for _, p in named]
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in dirs))
        dirs = [d / norm for d in dirs]
        originals = [p.data.copy() for _, p in named]
        for (_, p), d, o in zip(named, dirs, originals):
            p.data[...] = o + eps * d
        up = loss_fn(False)
        for (_, p), d, o in zip(named, dirs, originals):
            p.data[...] = o - eps * d
        down = loss_fn(False)
        for (_, p), o in zip(named, originals):
            p.data[...] = o
        n = (up - down) / (2.0 * eps)
        a = sum(float(np.sum(analytic[id(p)] * d)) for (_, p), d in zip(named, dirs))
        abs_err, rel, ok = _compare(np.array([a]), np.array([n]), atol, rtol)
        report.directional = ParamCheck("(random direction, all)", (), 1, float(abs_err[0]),
                                        float(rel[0]), bool(ok[0]), None, (a, n))
    for _, p in named:  # leave the analytic gradient in place for the caller
        p.grad[...] = analytic[id(p)]
    if verbose:
        print(report)
    if raise_on_fail and not report.passed:
        raise GradcheckError("gradient check failed\n" + str(report), report)
    return report


def check_layer(layer, *inputs, forward_kwargs=None, wrt=None, seed: int = 0,
                **gradcheck_kwargs) -> GradcheckReport:
    """Gradient-check one layer with the loss ``sum(out * R)``, R fixed and random.

    The layer is switched to float64 in place. Floating-point ``inputs`` are
    copied to float64 and checked along with the layer's trainable Params (as
    ``input0``, ``input1``, ...); other inputs (token ids, masks, None) are
    passed as they are. ``wrt`` lists the positions of the inputs to check
    (default: every float input). By the core contract ``backward`` returns one
    gradient per differentiable input, None for one that was not given: the
    gradients that are not None are matched to ``wrt`` in order.
    """
    layer.to(np.float64)
    forward_kwargs = forward_kwargs or {}
    rng = np.random.default_rng(seed)
    if wrt is None:
        wrt = [i for i, x in enumerate(inputs)
               if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)]
    wrapped = {i: Param(inputs[i], dtype=np.float64) for i in wrt}
    args = [wrapped[i].data if i in wrapped else x for i, x in enumerate(inputs)]
    out, _ = layer.forward(*args, **forward_kwargs)
    R = rng.standard_normal(np.shape(out))

    def loss_fn(backward):
        call = [wrapped[i].data if i in wrapped else x for i, x in enumerate(inputs)]
        out, cache = layer.forward(*call, **forward_kwargs)
        loss = float(np.sum(np.asarray(out) * R))
        if backward:
            grads = layer.backward(R, cache)
            grads = [g for g in (grads if isinstance(grads, tuple) else (grads,))
                     if g is not None]
            if len(grads) != len(wrt):
                raise ValueError(f"check_layer: backward returned {len(grads)} input "
                                 f"gradients for the {len(wrt)} inputs checked ({wrt})")
            for i, g in zip(wrt, grads):
                wrapped[i].grad += g
        return loss

    named = layer.named_params() + [(f"input{i}", wrapped[i]) for i in wrt]
    return gradcheck(loss_fn, named, seed=seed, **gradcheck_kwargs)
