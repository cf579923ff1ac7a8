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
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

DEFAULT_DTYPE = np.float32


class Param:
    """A trainable array and the gradient accumulated into it.

    ``data`` and ``grad`` always have the same shape and dtype. ``grad`` is only
    ever added to (``+=``) by backward passes and reset by ``zero_grad``.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data, dtype=None):
        data = np.array(data, dtype=dtype if dtype is not None else DEFAULT_DTYPE)
        if not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"Param data must be floating point, got dtype {data.dtype}")
        self.data = data
        self.grad = np.zeros_like(data)

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
        """Change the dtype in place; the object (and so all sharing) is kept."""
        self.data = self.data.astype(dtype)
        self.grad = self.grad.astype(dtype)

    def __repr__(self) -> str:
        return f"Param(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: a container of Params and sub-modules with no per-call state.

    Sub-modules and Params are found by walking the instance attributes (and
    lists, tuples and dicts of them) in definition order, as PyTorch does.
    """

    def named_params(self, prefix: str = "") -> list[tuple[str, Param]]:
        """Every Param once, with the first dotted name it is reachable by."""
        seen: set[int] = set()
        out: list[tuple[str, Param]] = []
        for name, p in _walk(self, prefix, set()):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    def params(self) -> list[Param]:
        """Every Param once (a tied Param is listed, updated and checked once)."""
        return [p for _, p in self.named_params()]

    def param_count(self) -> int:
        return sum(p.size for p in self.params())

    def zero_grad(self) -> None:
        for p in self.params():
            p.zero_grad()

    def to(self, dtype) -> "Module":
        """Switch every Param of the module tree to ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"minblip runs in float32 or float64, got {dtype}")
        for p in self.params():
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
    if x.dtype.kind != "f":  # what np.issubdtype(dtype, np.floating) says, 15x cheaper
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    return x


def check_last_dim(x: np.ndarray, width: int, name: str, min_ndim: int = 1) -> None:
    if x.ndim < min_ndim or x.shape[-1] != width:
        raise ValueError(
            f"{name}: expected shape (..., {width}) with at least {min_ndim} dims, got {x.shape}")


def check_ndim(x: np.ndarray, ndim: int, name: str, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array {layout}, got shape {x.shape}")


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
# Sums, means and maxima along the last axis. Rows here are short (16-256
# values), and NumPy's reductions pay a fixed cost per row along a short
# contiguous axis. A matrix-vector product with a vector of ones does the same
# sum inside BLAS (3-5x faster), and a max runs 3x faster down the columns of
# the transposed rows (benchmarks/bench_kernels.py). Sums and means equal
# np.sum / np.mean up to the order of the additions; maxima are exact.
# ---------------------------------------------------------------------------

def row_sum(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., 1): the sum over the last axis, keepdims."""
    return (x @ np.ones(x.shape[-1], x.dtype))[..., None]  # (..., D) @ (D,) -> (...)


def row_mean(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., 1): the mean over the last axis, keepdims."""
    return (x @ np.full(x.shape[-1], 1.0 / x.shape[-1], x.dtype))[..., None]


def row_max(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., 1): the max over the last axis, keepdims (NaN if a row has one)."""
    columns = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)  # (D, rows)
    return columns.max(axis=0).reshape(x.shape[:-1] + (1,))  # D long element-wise maxima
