"""The core contract every layer and model in minblip follows.

* A trainable array is a :class:`Param` holding ``data`` and ``grad``. Sharing a
  weight means two modules hold the *same* ``Param`` object (or the same
  sub-module); nothing is ever copied.
* ``forward(...)`` returns ``(out, cache)`` and stores nothing on the module, so
  one layer can run several times in a step before one backward.
* ``backward(dout, cache)`` returns the input gradients and only ever *adds*
  into ``Param.grad``. The caller sums fan-out.
* ``Module.params()`` lists each ``Param`` once (deduplicated by identity), so a
  tied weight is updated and gradient-checked once.
* A frozen Param (``module.freeze()`` freezes every Param of a module tree) is
  left out of ``params()`` and ``named_params()`` of every module that holds it,
  so no optimiser, clipping, trainable-state checkpoint or gradient check can
  reach it. Its module's forward and backward run as usual: the backward still
  returns the input gradients, through the same formulas, and adds nothing
  into a frozen Param.
* ``backward`` returns one gradient per differentiable input of ``forward``, in
  ``forward``'s argument order: the array itself when there is one such input,
  a tuple when there are several (``None`` in the place of an input that was
  not given), and ``None`` when there is none (token ids are not
  differentiable). Targets and masks are constants.
* A checkpoint loader builds a model's structure without its values inside
  :func:`deferred_params`: every large Param then holds a placeholder (one
  zero seen at every index, no memory) until the loader sets its ``data``.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np

DEFAULT_DTYPE = np.float32
DEFERRED_MIN_SIZE = 4096  # smaller Params are made as usual inside deferred_params
_deferring = [False]


@contextmanager
def deferred_params():
    """Inside, a new Param of at least ``DEFERRED_MIN_SIZE`` elements does not copy its
    initial value: its ``data`` and ``grad`` are a placeholder of the right shape
    and dtype (a zero-stride view of one zero: no memory, and writes land on that
    one element). A loader builds a model this way, then gives every such Param
    its ``data`` from the checkpoint (``param.data = array``), so the model's
    values exist once: as the file's memory map, or as their one conversion.
    Using a placeholder for computing gives zeros; ``Param.placeholder`` tells."""
    previous = _deferring[0]
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = previous


def _placeholder(shape: tuple, dtype) -> np.ndarray:
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape),
                                           writeable=True)


class Param:
    """A trainable array and the gradient accumulated into it.

    ``data`` and ``grad`` always have the same shape and dtype. ``grad`` is only
    ever added to (``+=``) by backward passes and reset by ``zero_grad``.
    ``frozen`` Params receive no gradient: a layer's backward adds into a Param
    only when ``param.trainable``.
    """

    __slots__ = ("data", "grad", "frozen")

    def __init__(self, data, dtype=None):
        dtype = np.dtype(dtype if dtype is not None else DEFAULT_DTYPE)
        if _deferring[0] and np.size(data) >= DEFERRED_MIN_SIZE and dtype.kind == "f":
            self.data = self.grad = _placeholder(np.shape(data), dtype)  # see deferred_params
            self.frozen = False
            return
        data = np.array(data, dtype=dtype)
        if not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"Param data must be floating point, got dtype {data.dtype}")
        self.data = data
        # np.zeros, not zeros_like: the operating system hands out zeroed pages on first
        # touch, so a gradient no backward ever adds into (a frozen or inference-only
        # model) costs no memory
        self.grad = np.zeros(data.shape, data.dtype)
        self.frozen = False

    @property
    def trainable(self) -> bool:
        return not self.frozen

    @property
    def placeholder(self) -> bool:
        """True while the Param holds the placeholder of :func:`deferred_params`."""
        return self.data.size > 1 and not any(self.data.strides)

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def zero_grad(self) -> None:
        self.grad[...] = 0

    def astype(self, dtype) -> None:
        """Change the dtype in place; the object (and so all sharing) is kept.
        Nothing is copied when the dtype is already ``dtype``."""
        if self.data.dtype == dtype and self.grad.dtype == dtype:
            return
        if self.placeholder:
            self.data = self.grad = _placeholder(self.data.shape, dtype)
            return
        self.data = self.data.astype(dtype)
        self.grad = self.grad.astype(dtype)

    def __repr__(self) -> str:
        frozen = ", frozen" if self.frozen else ""
        return f"Param(shape={self.data.shape}, dtype={self.data.dtype}{frozen})"


class Module:
    """Base class: a container of Params and sub-modules with no per-call state.

    Sub-modules and Params are found by walking the instance attributes (and
    lists, tuples and dicts of them) in definition order, as PyTorch does.
    """

    def named_params(self, prefix: str = "", include_frozen: bool = False
                     ) -> list[tuple[str, Param]]:
        """Every trainable Param once, with the first dotted name it is reachable by.
        ``include_frozen=True`` lists the frozen ones too (for casting, saving a
        whole model, counting)."""
        seen: set[int] = set()
        out: list[tuple[str, Param]] = []
        for name, p in _walk(self, prefix, set()):
            if id(p) not in seen and (include_frozen or not p.frozen):
                seen.add(id(p))
                out.append((name, p))
        return out

    def modules(self) -> list["Module"]:
        """This module and every sub-module reachable from it, each once, in
        definition order (as PyTorch's ``modules()``)."""
        out: list[Module] = []
        seen: set[int] = set()

        def visit(obj):
            if isinstance(obj, Module):
                if id(obj) in seen:
                    return
                seen.add(id(obj))
                out.append(obj)
                children = vars(obj).values()
            elif isinstance(obj, (list, tuple)):
                children = obj
            elif isinstance(obj, dict):
                children = obj.values()
            else:
                return
            for child in children:
                visit(child)
        visit(self)
        return out

    def params(self, include_frozen: bool = False) -> list[Param]:
        """Every trainable Param once (a tied Param is listed, updated and checked once)."""
        return [p for _, p in self.named_params(include_frozen=include_frozen)]

    def param_count(self, include_frozen: bool = False) -> int:
        return sum(p.size for p in self.params(include_frozen))

    def parameter_counts(self) -> dict:
        """Scalars that train, that are frozen, and in total, for the whole tree and
        per top-level sub-module: {"trainable", "frozen", "total", "parts":
        {name: (trainable, total)}}. A tied Param counts once."""
        parts = {name: (value.param_count(), value.param_count(include_frozen=True))
                 for name, value in vars(self).items() if isinstance(value, Module)}
        trainable, total = self.param_count(), self.param_count(include_frozen=True)
        return {"trainable": trainable, "frozen": total - trainable, "total": total,
                "parts": parts}

    def zero_grad(self) -> None:
        for p in self.params():
            p.zero_grad()

    def freeze(self):
        """Freeze every Param of the tree (returns the module). A Param shared with
        another module is frozen there too: it is one object."""
        for p in self.params(include_frozen=True):
            p.frozen = True
        return self

    def unfreeze(self):
        """Undo :meth:`freeze` for every Param of the tree (returns the module)."""
        for p in self.params(include_frozen=True):
            p.frozen = False
        return self

    @property
    def frozen(self) -> bool:
        """True when the module has Params and every one of them is frozen."""
        every = self.params(include_frozen=True)
        return bool(every) and all(p.frozen for p in every)

    def to(self, dtype) -> "Module":
        """Switch every Param of the tree, frozen ones included, to ``dtype``
        (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"minblip runs in float32 or float64, got {dtype}")
        for p in self.params(include_frozen=True):
            p.astype(dtype)
        return self

    @property
    def dtype(self):
        """The dtype of the first Param (``to`` gives every Param the same one)."""
        for _, p in _walk(self, "", set()):  # stop at the first: no walk of the whole tree
            return p.dtype
        return np.dtype(DEFAULT_DTYPE)


def _walk(obj, prefix: str, visiting: set) -> Iterator[tuple[str, Param]]:
    if isinstance(obj, Param):
        yield prefix, obj
        return
    if isinstance(obj, Module):
        if id(obj) in visiting:  # a module reachable from itself would loop forever
            return
        visiting = visiting | {id(obj)}
        items = vars(obj).items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    elif isinstance(obj, dict):
        items = ((str(k), v) for k, v in obj.items())
    else:
        return
    for key, value in items:
        yield from _walk(value, f"{prefix}.{key}" if prefix else key, visiting)


# ---------------------------------------------------------------------------
# Input checks shared by every layer: they turn a NumPy broadcasting traceback
# from deep inside into a message that names what was expected and what came.
# ---------------------------------------------------------------------------

def check_float(x, name: str) -> np.ndarray:
    """Require a floating-point ndarray (integer pixels or ids are a mistake here)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":  # np.issubdtype(dtype, np.floating), without its overhead per call
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    return x


def check_last_dim(x: np.ndarray, width: int, name: str, min_ndim: int = 1) -> None:
    if x.ndim < min_ndim or x.shape[-1] != width:
        raise ValueError(
            f"{name}: expected shape (..., {width}) with at least {min_ndim} dims, got {x.shape}")


def check_ndim(x: np.ndarray, ndim: int, name: str, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array {layout}, got shape {x.shape}")


def check_rng(rng, name: str = "rng", optional: bool = True) -> None:
    """Require a ``np.random.Generator`` (or None when ``optional``: evaluation mode)."""
    if (rng is None and optional) or isinstance(rng, np.random.Generator):
        return
    expected = "a numpy Generator or None" if optional else "a numpy Generator"
    raise TypeError(f"{name}: expected {expected}, got {type(rng).__name__}")


def check_mask01(mask, shape: tuple, name: str) -> np.ndarray:
    """Require an array of exactly ``shape`` holding only 0 and 1 (a padding mask)."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} of 0/1, got {mask.shape}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name}: expected only 0/1 values, got {np.unique(mask)[:5].tolist()}")
    return mask


def check_token_matrix(ids, vocab_size: int, name: str) -> np.ndarray:
    """Require integer ids (B, T), T >= 1, in [0, vocab_size)."""
    ids = check_ids(ids, vocab_size, name)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-d array (B, T) with T >= 1, got shape {ids.shape}")
    return ids


def check_finite(x: np.ndarray, name: str) -> np.ndarray:
    """Require a float array with no NaN or inf. A NaN pixel or feature would
    otherwise turn the loss, every gradient and then every weight into NaN
    without a word; the message counts the bad values and gives the first."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise ValueError(f"{name}: expected finite values, got {len(bad)} NaN or inf of "
                         f"{x.size} (the first at index {first}: {x[first]})")
    return x


def nonfinite_params(named_params) -> list[str]:
    """``[(name, Param or array), ...]`` -> "name (k of n values)" for each one
    that holds a NaN or an inf (an empty list when every value is finite)."""
    out = []
    for name, p in named_params:
        data = p.data if isinstance(p, Param) else np.asarray(p)
        if data.dtype.kind == "f":
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                out.append(f"{name} ({bad} of {data.size} values)")
    return out


def check_ids(ids, vocab_size: int, name: str) -> np.ndarray:
    """Require an integer array of token ids in [0, vocab_size)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":  # signed or unsigned integers; not bool
        raise TypeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(
            f"{name}: token ids must lie in [0, {vocab_size}), got {bad.ravel()[:5].tolist()}")
    return ids


# ---------------------------------------------------------------------------
# Sums, means and maxima along the last axis, and sums down the columns. Rows
# here are short (16-256 values), and NumPy's reductions pay a fixed cost per
# row along a short contiguous axis. A matrix-vector product with a vector of
# ones does the same sum inside BLAS, and a max is cheaper down the columns of
# the transposed rows (benchmarks/bench_kernels.py measures both); a column sum
# (a bias gradient: every row's contribution added up) is faster as a
# vector-matrix product too. Sums and means equal np.sum / np.mean up to the
# order of the additions; maxima are exact.
# ---------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _filled(n: int, value: float, dtype: np.dtype) -> np.ndarray:
    """A read-only (n,) vector of ``value``, made once per size: the ones (and 1/n)
    the reductions below multiply by, a few hundred times a training step."""
    v = np.full(n, value, dtype)
    v.setflags(write=False)
    return v


def row_sum(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., 1): the sum over the last axis, keepdims."""
    return (x @ _filled(x.shape[-1], 1.0, x.dtype))[..., None]  # (..., D) @ (D,) -> (...)


def row_mean(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., 1): the mean over the last axis, keepdims."""
    return (x @ _filled(x.shape[-1], 1.0 / x.shape[-1], x.dtype))[..., None]


def col_sum(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (D,): the sum over every leading axis (the gradient of a Param
    that was broadcast over every row)."""
    rows = x.reshape(-1, x.shape[-1])
    return _filled(rows.shape[0], 1.0, x.dtype) @ rows  # (N,) @ (N, D) -> (D,)


def row_max(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., 1): the max over the last axis, keepdims (NaN if a row has one)."""
    columns = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)  # (D, rows)
    return columns.max(axis=0).reshape(x.shape[:-1] + (1,))  # D long element-wise maxima
