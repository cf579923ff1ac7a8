"""The basic layers: Linear, Embedding, LayerNorm, RMSNorm, GELU, ReLU and Dropout.

Every layer follows the contract of :mod:`minblip.core`: ``forward`` returns
``(out, cache)`` and keeps nothing on ``self``; ``backward(dout, cache)``
returns the input gradient and adds (``+=``) into its trainable Params' ``grad``.
A frozen Param gets nothing, and its weight gradient is not even computed: the
input gradient needs the weights, never the weight gradient.
"""
from __future__ import annotations

import math

import numpy as np

from .core import Module, Param, check_float, check_ids, check_last_dim, col_sum, row_mean


class Linear(Module):
    """y = x @ W + b over the last axis, for any number of leading axes.

    W is stored as (d_in, d_out) so the math reads left to right; PyTorch's
    ``nn.Linear.weight`` is (d_out, d_in), its transpose (the checkpoint loader
    transposes). Initialisation: normal(0, init_std), bias 0, as BERT and
    BLIP's ViT do (``_init_weights`` in both, std 0.02).
    """

    def __init__(self, d_in: int, d_out: int, rng: np.random.Generator, bias: bool = True,
                 init_std: float = 0.02):
        self.d_in, self.d_out = d_in, d_out
        self.W = Param(rng.normal(0.0, init_std, (d_in, d_out)))
        self.b = Param(np.zeros(d_out)) if bias else None

    def forward(self, x):
        """x: (..., d_in) -> y: (..., d_out)."""
        check_float(x, "Linear input")
        check_last_dim(x, self.d_in, "Linear input")
        y = x @ self.W.data  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
        if self.b is not None:
            y += self.b.data
        return y, x

    def backward(self, dy, cache):
        """dy: (..., d_out) -> dx: (..., d_in)."""
        x = cache
        dy2 = dy.reshape(-1, self.d_out)
        if self.W.trainable:  # undoes x @ W: (d_in, N) @ (N, d_out)
            self.W.grad += x.reshape(-1, self.d_in).T @ dy2
        if self.b is not None and self.b.trainable:
            self.b.grad += col_sum(dy2)  # b was broadcast over every leading position
        # undoes x @ W for x: (N, d_out) @ (d_out, d_in), then the leading axes back. One 2-D
        # product: NumPy runs a stacked (B, T, d_out) @ W.T as B small ones, several times slower
        return (dy2 @ self.W.data.T).reshape(*dy.shape[:-1], self.d_in)


class Embedding(Module):
    """A lookup table: ids (...) -> vectors (..., dim).

    A token id can appear several times in a batch, and each occurrence adds
    its gradient to the same row: ``grad[ids] += d`` would keep only one of
    them. ``np.add.at`` does the repeated-index scatter right but slowly, so the
    backward sorts the ids and sums each id's rows first (same result).
    ``backward`` returns None: ids have no gradient.
    """

    def __init__(self, num: int, dim: int, rng: np.random.Generator, init_std: float = 0.02):
        self.num, self.dim = num, dim
        self.weight = Param(rng.normal(0.0, init_std, (num, dim)))

    def forward(self, ids):
        """ids: integer array (...) in [0, num) -> (..., dim)."""
        ids = check_ids(ids, self.num, "Embedding ids")
        return self.weight.data[ids], ids

    def backward(self, dout, cache):
        """Accumulates into the rows that were gathered; ids have no gradient."""
        ids = cache.reshape(-1)
        if ids.size == 0 or self.weight.frozen:  # nothing to add into
            return None
        dout = dout.reshape(ids.size, self.dim)
        # np.add.at(grad, ids, dout) done faster: group equal ids, sum each group's rows
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # first of each id
        self.weight.grad[sorted_ids[starts]] += np.add.reduceat(dout[order], starts, axis=0)
        return None


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis.

    The variance is the biased one, as in PyTorch. BLIP uses eps 1e-6 in its ViT
    and 1e-12 in BERT; BLIP-2's ``ln_vision`` uses 1e-5.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        self.dim, self.eps = dim, eps
        self.gamma = Param(np.ones(dim))
        self.beta = Param(np.zeros(dim))

    def forward(self, x):
        """x: (..., dim) -> y: (..., dim)."""
        check_float(x, "LayerNorm input")
        check_last_dim(x, self.dim, "LayerNorm input")
        xhat = x - row_mean(x)  # (..., dim) - (..., 1): centred
        var = row_mean(xhat * xhat)  # (..., 1), the biased variance
        rstd = 1.0 / np.sqrt(var + self.eps)
        xhat *= rstd  # in place: xhat is a fresh array
        y = xhat * self.gamma.data
        y += self.beta.data
        return y, (xhat, rstd)

    def backward(self, dy, cache):
        """dy (..., dim) -> dx (..., dim); adds into gamma.grad and beta.grad.

        ``cache`` is (xhat (..., dim), rstd (..., 1)) from the forward. Exercise 1.2
        (notebooks/01_backprop_and_gradcheck)."""
        ### BEGIN SOLUTION
        xhat, rstd = cache
        if self.gamma.trainable:
            self.gamma.grad += col_sum(dy * xhat)  # undoes * gamma (broadcast over rows)
        if self.beta.trainable:
            self.beta.grad += col_sum(dy)  # undoes + beta
        dxhat = dy * self.gamma.data
        # undoes xhat = (x - mu) * rstd, where mu and rstd depend on every x of the row:
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        return rstd * (dxhat - row_mean(dxhat) - xhat * row_mean(dxhat * xhat))
        ### END SOLUTION


class RMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis: T5's layer norm
    (Hugging Face ``T5LayerNorm``), which neither subtracts the mean nor adds a
    bias. T5 uses eps 1e-6 and starts ``weight`` at 1.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        self.dim, self.eps = dim, eps
        self.weight = Param(np.ones(dim))

    def forward(self, x):
        """x: (..., dim) -> y: (..., dim)."""
        check_float(x, "RMSNorm input")
        check_last_dim(x, self.dim, "RMSNorm input")
        rstd = 1.0 / np.sqrt(row_mean(x * x) + self.eps)  # (..., 1)
        xhat = x * rstd  # (..., dim), unit root-mean-square
        return xhat * self.weight.data, (xhat, rstd)

    def backward(self, dy, cache):
        """dy (..., dim) -> dx (..., dim); adds into weight.grad."""
        xhat, rstd = cache
        if self.weight.trainable:  # undoes * weight (broadcast over every row)
            self.weight.grad += np.sum(dy * xhat, axis=tuple(range(dy.ndim - 1)))
        dxhat = dy * self.weight.data
        # undoes xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2) depending on the whole row:
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)); LayerNorm's formula without the mean
        return rstd * (dxhat - xhat * row_mean(dxhat * xhat))


# ---------------------------------------------------------------------------
# erf for the exact GELU. NumPy has no erf, and the fidelity checks compare
# with PyTorch at 1e-8, so a 1e-7 textbook approximation is not enough.
# We use piecewise Taylor polynomials: |x| in [0, 6) is cut into intervals of
# width 1/8, and on each one erf is expanded to degree 10 about the interval's
# centre c. The coefficients are exact closed forms,
#     erf^(m)(c) = 2/sqrt(pi) * (-1)^(m-1) * H_{m-1}(c) * exp(-c^2)
# (H = physicists' Hermite polynomials, by their recurrence), anchored at
# math.erf(c) from the C library. The truncation error is below
# (1/16)^11 * max|erf^(11)| / 11! ~ 1e-17, so the result is within about one
# unit in the last place of float64 (the test measures it against math.erf on a
# dense grid). erf(6) rounds to 1.0 in float64, so |x| >= 6 returns +-1.
# It is vectorised, so it costs ~12 multiply-adds per element instead of a
# Python call per element.
# ---------------------------------------------------------------------------
_ERF_WIDTH = 0.125
_ERF_DEGREE = 10
_ERF_XMAX = 6.0


def _erf_taylor_table():
    n = int(round(_ERF_XMAX / _ERF_WIDTH))
    centres = (np.arange(n) + 0.5) * _ERF_WIDTH
    coef = np.zeros((_ERF_DEGREE + 1, n))
    coef[0] = [math.erf(c) for c in centres]
    gauss = 2.0 / math.sqrt(math.pi) * np.exp(-centres * centres)
    h_prev, h = np.zeros(n), np.ones(n)  # H_{-1} = 0, H_0 = 1
    factorial = 1.0
    for m in range(1, _ERF_DEGREE + 1):
        factorial *= m
        coef[m] = gauss * (-1.0) ** (m - 1) * h / factorial
        h, h_prev = 2.0 * centres * h - 2.0 * (m - 1) * h_prev, h
    return centres, coef


_ERF_CENTRES, _ERF_COEF = _erf_taylor_table()


# Abramowitz & Stegun 7.1.26: erf(x) = 1 - (a1 t + ... + a5 t^5) exp(-x^2), t = 1/(1 + p x),
# maximum absolute error 1.5e-7, about one float32 rounding step near 1.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf_float32(x, scale: float = 1.0):
    """(erf(s x), exp(-(s x)^2)) for float32 x and a constant s: A&S 7.1.26, with no
    table gathers. The Gaussian is a by-product that GELU's backward reuses, and s
    is folded into the constants, so GELU's erf(x / sqrt 2) costs no pass of its own.

    Evaluated in place on two fresh arrays (one temporary per operation would
    be ~14 arrays of x's size). Far out, (s x)^2 overflows to inf and
    exp(-inf) = 0, which is the right limit: erf is then exactly +-1.
    """
    f32 = np.float32
    gauss = np.abs(x)
    t = gauss * f32(_AS_P * scale)
    t += f32(1.0)
    np.divide(f32(1.0), t, out=t)  # t = 1 / (1 + p|s x|); faster than np.reciprocal
    poly = t * f32(_AS_A[4])
    for a in _AS_A[3::-1]:  # Horner, ending with poly = (a1 + a2 t + ... + a5 t^4) t
        poly += f32(a)
        poly *= t
    with np.errstate(over="ignore"):  # |x| above ~1e19: x^2 = inf, exp(-inf) = 0
        np.square(gauss, out=gauss)
        gauss *= f32(-scale * scale)
    np.exp(gauss, out=gauss)  # exp(-(s x)^2)
    poly *= gauss
    np.subtract(f32(1.0), poly, out=poly)  # erf(|s x|)
    np.copysign(poly, x, out=poly)
    return poly, gauss


def erf(x):
    """The error function of a float array.

    float64 (and other non-float32 input): the Taylor table above, within about
    one unit in the last place. float32: Abramowitz & Stegun 7.1.26 (max error
    1.5e-7 in exact arithmetic, a few float32 roundings more when evaluated in
    float32; tests/test_layers.py bounds it), since float32 itself only resolves
    ~6e-8 near 1 and training runs in float32.
    """
    x = np.asarray(x)
    if x.dtype == np.float32:
        return _erf_float32(x)[0]
    if not np.issubdtype(x.dtype, np.floating):  # integers would truncate t and the table
        x = x.astype(np.float64)
    ax = np.abs(x)
    # Clip before the integer cast (inf or |x| > 2^63 would cast to garbage and
    # overflow the polynomial); np.minimum keeps NaN, and fmin sends it to the last
    # interval, where t stays NaN and so does the result.
    axc = np.minimum(ax, _ERF_XMAX)
    k = np.fmin(axc * (1.0 / _ERF_WIDTH), _ERF_CENTRES.size - 1).astype(np.intp)
    t = (axc - _ERF_CENTRES[k]).astype(x.dtype, copy=False)
    coef = _ERF_COEF.astype(x.dtype)
    y = coef[_ERF_DEGREE][k]
    for j in range(_ERF_DEGREE - 1, -1, -1):  # Horner
        y *= t
        y += coef[j][k]
    y = np.where(ax >= _ERF_XMAX, 1.0, y)  # np.where, not y[...] =: x may be 0-d
    return np.copysign(y, x)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GELU(Module):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF.

    ``approximate="none"`` is the exact erf form that BERT, BLIP's ViT and
    PyTorch's ``nn.GELU()`` use; ``"tanh"`` is the approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of ``nn.GELU("tanh")``.
    """

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        check_float(x, "GELU input")
        if self.approximate == "none":
            if x.dtype == np.float32:
                # erf(x/sqrt 2) comes with exp(-x^2/2), which the backward needs: keep it
                cdf, gauss = _erf_float32(x, _SQRT_HALF)
            else:
                cdf, gauss = erf(x * _SQRT_HALF), None
            cdf += 1.0
            cdf *= 0.5  # Phi(x) = (1 + erf(x / sqrt 2)) / 2, in place
            return x * cdf, (x, cdf, gauss)
        x2 = x * x  # x * x * x instead of x ** 3: NumPy's power is far slower
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x2 * x)
        th = np.tanh(inner)
        return 0.5 * x * (1.0 + th), (x, th)

    def backward(self, dy, cache):
        if self.approximate == "none":
            x, cdf, gauss = cache
            if gauss is None:
                gauss = np.exp(-0.5 * x * x)
            grad = x * gauss
            grad *= _INV_SQRT_2PI  # x phi(x)
            grad += cdf
            return dy * grad  # d/dx x Phi(x) = Phi(x) + x phi(x)
        x, th = cache
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return dy * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dinner)


class ReLU(Module):
    """max(x, 0), OPT's feed-forward activation. Its derivative at exactly 0 is
    taken as 0, as in PyTorch."""

    def forward(self, x):
        check_float(x, "ReLU input")
        keep = x > 0
        return x * keep, keep

    def backward(self, dy, cache):
        return dy * cache  # undoes x * (x > 0)


ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def make_activation(name: str) -> Module:
    """The feed-forward activation called ``name``: "gelu" (exact, BERT and the
    ViT), "gelu_tanh" (the tanh approximation) or "relu" (OPT)."""
    if name == "gelu":
        return GELU()
    if name == "gelu_tanh":
        return GELU("tanh")
    if name == "relu":
        return ReLU()
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


class Dropout(Module):
    """Inverted dropout with an explicit random generator.

    ``forward(x, rng)``: with ``rng=None`` (evaluation) or ``p=0`` it is the
    identity; otherwise each element is kept with probability 1-p and scaled by
    1/(1-p). The mask comes from ``rng``, so a step can be repeated exactly by
    passing a generator with the same seed.
    """

    def __init__(self, p: float = 0.0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x, rng: np.random.Generator | None = None):
        if rng is None or self.p == 0.0:
            return x, None
        mask = (rng.random(x.shape) >= self.p).astype(x.dtype) * (1.0 / (1.0 - self.p))
        return x * mask, mask

    def backward(self, dy, cache):
        mask = cache
        return dy if mask is None else dy * mask
