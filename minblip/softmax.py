"""Softmax, log-softmax, cross-entropy (with ignore_index and label smoothing)
and L2 normalisation, each with its hand-written backward."""
from __future__ import annotations

import numpy as np

from .core import Module, check_float


def softmax(x, axis: int = -1):
    """Numerically stable softmax: subtracting the row max changes nothing
    mathematically but keeps exp() from overflowing."""
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis: int = -1):
    """log(softmax(x)) computed as z - log(sum(exp(z))) with z = x - max(x)."""
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


class Softmax(Module):
    """p = softmax(x) along ``axis``."""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        check_float(x, "Softmax input")
        p = softmax(x, self.axis)
        return p, p

    def backward(self, dp, cache):
        """dp = dL/dp (same shape as x) -> dx; the cache is p itself."""
        ### BEGIN SOLUTION
        p = cache
        # Jacobian of softmax is diag(p) - p p^T, so dx = p * (dp - <dp, p>) along the axis
        return p * (dp - np.sum(dp * p, axis=self.axis, keepdims=True))
        ### END SOLUTION


class LogSoftmax(Module):
    """y = log_softmax(x) along ``axis``."""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        check_float(x, "LogSoftmax input")
        y = log_softmax(x, self.axis)
        return y, y

    def backward(self, dy, cache):
        y = cache
        # y_i = x_i - logsumexp(x), and d logsumexp / dx = softmax(x) = exp(y)
        return dy - np.exp(y) * np.sum(dy, axis=self.axis, keepdims=True)


class CrossEntropyLoss(Module):
    """Mean cross-entropy of logits against class ids or target distributions.

    Follows ``torch.nn.functional.cross_entropy``:

    * ``targets`` integer (...): class ids; positions equal to ``ignore_index``
      (default -100, the value BLIP writes into padding) are left out, and the
      mean is over the remaining positions;
    * ``targets`` float (..., K): a probability distribution per position (used
      by ITC's soft targets), mean over all positions;
    * ``label_smoothing`` eps mixes the target with the uniform distribution:
      t = (1 - eps) * onehot + eps / K (BLIP's LM loss uses 0.1).

    Departure: when every position is ignored PyTorch returns NaN; minblip
    returns 0 with zero gradient, so a batch of empty captions cannot poison a run.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        """logits (..., K); targets (...) int or (..., K) float -> scalar loss."""
        check_float(logits, "cross-entropy logits")
        K = logits.shape[-1]
        targets = np.asarray(targets)
        logp = log_softmax(logits.reshape(-1, K))  # (N, K)
        if np.issubdtype(targets.dtype, np.integer):
            if targets.shape != logits.shape[:-1]:
                raise ValueError(f"cross-entropy targets: expected shape {logits.shape[:-1]} "
                                 f"to match logits {logits.shape}, got {targets.shape}")
            t = targets.reshape(-1)
            valid = t != self.ignore_index
            bad = valid & ((t < 0) | (t >= K))
            if bad.any():
                raise ValueError(f"cross-entropy targets must lie in [0, {K}) or equal "
                                 f"ignore_index={self.ignore_index}, got {t[bad][:5].tolist()}")
            dist = np.zeros_like(logp)
            dist[np.flatnonzero(valid), t[valid]] = 1.0
        elif np.issubdtype(targets.dtype, np.floating):
            if targets.shape != logits.shape:
                raise ValueError(f"cross-entropy soft targets: expected shape {logits.shape}, "
                                 f"got {targets.shape}")
            dist = targets.reshape(-1, K).astype(logp.dtype)
            valid = np.ones(dist.shape[0], dtype=bool)
        else:
            raise TypeError(f"cross-entropy targets must be integer ids or float "
                            f"probabilities, got dtype {targets.dtype}")
        eps = self.label_smoothing
        if eps:
            dist = (1.0 - eps) * dist + (eps / K) * valid[:, None]
        n_valid = int(valid.sum())
        scale = 1.0 / max(n_valid, 1)
        loss = -np.sum(dist * logp) * scale
        return float(loss), (logp, dist, valid, scale, logits.shape)

    def backward(self, dloss, cache):
        """dloss: scalar -> dlogits (..., K).

        ``cache`` is (logp (N, K) log-probabilities, dist (N, K) the target
        distribution per row (smoothed; all zero on an ignored row), valid (N,),
        scale = 1 / number of kept rows, the logits' shape). Exercise 1.1
        (notebooks/01_backprop_and_gradcheck)."""
        ### BEGIN SOLUTION
        logp, dist, valid, scale, shape = cache
        # d/dz of -sum_k t_k log softmax(z)_k is softmax(z) * sum_k t_k - t
        row_mass = dist.sum(axis=-1, keepdims=True)
        dlogits = (np.exp(logp) * row_mass - dist) * (scale * dloss)
        return dlogits.reshape(shape)
        ### END SOLUTION


class L2Normalize(Module):
    """y = x / max(||x||, eps) along the last axis (``F.normalize``, eps 1e-12)."""

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def forward(self, x):
        check_float(x, "L2Normalize input")
        norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
        clipped = norm < self.eps
        denom = np.maximum(norm, self.eps)
        y = x / denom
        return y, (y, denom, clipped)

    def backward(self, dy, cache):
        y, denom, clipped = cache
        # for ||x|| > eps: dx = (dy - y <y, dy>) / ||x||; below eps the denominator
        # is the constant eps, so dx = dy / eps
        proj = np.where(clipped, 0.0, np.sum(y * dy, axis=-1, keepdims=True))
        return (dy - y * proj) / denom
