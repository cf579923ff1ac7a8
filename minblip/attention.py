"""Scaled dot-product attention, multi-head attention (self and cross) and masks.

Masks are boolean arrays broadcastable to (B, Tq, Tk): ``True`` means "query i
may attend to key j". A masked score is set to -inf before the softmax, so a
masked key gets exactly zero weight. BERT instead adds -10000 to masked scores;
exp(-10000) underflows to 0 in float32 and float64, so the two agree except on a
row whose every key is masked. There BERT's softmax sees every score shifted by
the same -10000, which changes nothing, so the row attends as if unmasked; plain
-inf would give 0/0 = NaN; minblip returns all-zero weights (and a zero output).
"""
from __future__ import annotations

import math

import numpy as np

from .core import Module, check_float, check_ndim, row_max, row_sum
from .layers import Dropout, Linear


def padding_mask(valid):
    """valid: (B, Tk) with 1/True for real tokens -> (B, 1, Tk) boolean mask."""
    valid = np.asarray(valid)
    if valid.ndim != 2:
        raise ValueError(f"padding mask: expected (B, Tk), got shape {valid.shape}")
    return valid.astype(bool)[:, None, :]


def causal_mask(t_query: int, t_key: int | None = None):
    """(1, Tq, Tk) mask where query i sees keys j <= i + (Tk - Tq).

    With Tk > Tq the first Tk - Tq keys are a prefix every query sees (cached
    keys of earlier tokens during generation); this is the lower-triangular
    mask of BERT's ``get_extended_attention_mask`` for decoders.
    """
    t_key = t_query if t_key is None else t_key
    if t_key < t_query:
        raise ValueError(f"causal mask: need at least as many keys as queries, got "
                         f"Tq={t_query}, Tk={t_key}")
    i = np.arange(t_query)[:, None]
    j = np.arange(t_key)[None, :]
    return (j <= i + (t_key - t_query))[None]


class ScaledDotProductAttention(Module):
    """softmax(Q K^T / sqrt(dh) + mask) V, heads kept as a batch axis.

    Has no parameters; the optional dropout acts on the attention weights,
    as in BERT (``attention_probs_dropout_prob``).
    """

    def __init__(self, dropout: float = 0.0):
        self.dropout = Dropout(dropout)

    def forward(self, q, k, v, mask=None, rng=None):
        """q (B, H, Tq, dh), k and v (B, H, Tk, dh), mask broadcastable to
        (B, Tq, Tk) -> out (B, H, Tq, dh). The cache holds the weights P."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = q @ k.swapaxes(-1, -2)  # (B,H,Tq,dh) @ (B,H,dh,Tk) -> (B,H,Tq,Tk)
        scores *= scale  # in place from here on: scores is a fresh array
        if mask is not None:
            # + 0 where allowed, + -inf where masked; built at (B, Tq, Tk), shared by every head
            scores += np.where(mask, 0.0, -np.inf).astype(scores.dtype)[:, None]
        top = row_max(scores)
        top[~np.isfinite(top)] = 0.0  # a fully masked row: exp(-inf) = 0, no NaN
        scores -= top
        p = np.exp(scores, out=scores)  # scores is spent: reuse its memory for P
        total = row_sum(p)
        total[total == 0.0] = 1.0
        p /= total
        p_drop, c_drop = self.dropout.forward(p, rng)
        out = p_drop @ v  # (B,H,Tq,Tk) @ (B,H,Tk,dh) -> (B,H,Tq,dh)
        return out, (q, k, v, p, p_drop, c_drop, scale)

    def backward(self, dout, cache):
        """dout (B, H, Tq, dh) -> (dq, dk, dv).

        ``cache`` is (q, k, v, p, p_drop, c_drop, scale): the inputs, the weights P
        (B, H, Tq, Tk) (exactly 0 at masked keys), P after dropout, the dropout's
        cache and 1/sqrt(dh). Exercise 2.1 (notebooks/02_attention)."""
        ### BEGIN SOLUTION
        q, k, v, p, p_drop, c_drop, scale = cache
        dv = p_drop.swapaxes(-1, -2) @ dout  # undoes out = P V
        dp = self.dropout.backward(dout @ v.swapaxes(-1, -2), c_drop)
        dscores = p * (dp - row_sum(dp * p))  # undoes the softmax
        dscores *= scale  # undoes the 1/sqrt(dh); masked entries already have p = 0
        dq = dscores @ k  # undoes Q K^T
        dk = dscores.swapaxes(-1, -2) @ q
        return dq, dk, dv
        ### END SOLUTION


def split_heads(x, n_heads: int):
    """(B, T, D) -> (B, H, T, D/H)."""
    B, T, D = x.shape
    return x.reshape(B, T, n_heads, D // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, dh) -> (B, T, H*dh)."""
    B, H, T, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * dh)


class MultiHeadAttention(Module):
    """Multi-head attention with query/key/value/output projections.

    Self-attention: ``forward(x)``, keys and values come from x.
    Cross-attention: ``forward(x, context)``, keys and values come from a
    context of another length and width ``d_context`` (BLIP's text attending to
    image tokens). The output projection is part of this module: BERT calls it
    ``attention.output.dense``, the ViT ``attn.proj``.

    The ViT in salesforce/BLIP stores q, k, v as one fused (3D, D) ``qkv``
    Linear; it computes the same thing as three separate projections, which is
    how BERT stores them and how minblip does.

    ``bias=False`` leaves the q, k and v projections without bias;
    ``key_bias=False`` drops only the key's, as the EVA ViT of BLIP-2 does
    (LAVIS ``eva_vit.py Attention``: ``q_bias`` and ``v_bias``, no k bias). A
    key bias could not change the output anyway: it adds the same q.b to every
    score of a query's row, which the softmax ignores.
    """

    def __init__(self, d_model: int, n_heads: int, rng: np.random.Generator,
                 d_context: int | None = None, dropout: float = 0.0, init_std: float = 0.02,
                 bias: bool = True, key_bias: bool | None = None):
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"MultiHeadAttention: n_heads must divide d_model, got "
                             f"d_model={d_model}, n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.d_context = d_model if d_context is None else d_context
        key_bias = bias if key_bias is None else key_bias
        self.query = Linear(d_model, d_model, rng, bias=bias, init_std=init_std)
        self.key = Linear(self.d_context, d_model, rng, bias=key_bias, init_std=init_std)
        self.value = Linear(self.d_context, d_model, rng, bias=bias, init_std=init_std)
        self.out = Linear(d_model, d_model, rng, init_std=init_std)
        self.attention = ScaledDotProductAttention(dropout)

    def project_kv(self, source):
        """Keys and values of a source sequence (B, S, d_context) -> two (B, H, S, dh).
        Generation calls this once per image and per token, then reuses the result."""
        k, _ = self.key.forward(source)
        v, _ = self.value.forward(source)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def _check(self, x, context):
        check_float(x, "attention input")
        check_ndim(x, 3, "attention input", "(B, T, D)")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"attention input: expected width {self.d_model}, got shape {x.shape}")
        if context is not None:
            check_float(context, "attention context")
            check_ndim(context, 3, "attention context", "(B, S, D_context)")
            if context.shape[-1] != self.d_context:
                raise ValueError(f"attention context: expected width {self.d_context}, "
                                 f"got shape {context.shape}")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"attention: batch sizes differ, input {x.shape} "
                                 f"and context {context.shape}")

    def forward(self, x, context=None, mask=None, rng=None, past_kv=None, context_kv=None):
        """x (B, T, D); context (B, S, d_context) or None for self-attention;
        mask broadcastable to (B, T, S) (True = may attend).

        For generation only: ``past_kv`` = (k, v) of earlier positions, each
        (B, H, P, dh), is prepended to the self-attention keys and values, and
        ``context_kv`` replaces the projection of ``context``. Both are treated
        as constants by ``backward``. The cache's ``"present"`` entry holds the
        full (k, v) to pass as ``past_kv`` on the next step.

        Returns out (B, T, D) and the cache.
        """
        self._check(x, context)
        B, T, _ = x.shape
        q_lin, c_q = self.query.forward(x)
        q = split_heads(q_lin, self.n_heads)
        source = x if context is None else context
        c_k = c_v = None
        if context_kv is not None:
            k, v = context_kv
        else:
            k_lin, c_k = self.key.forward(source)
            v_lin, c_v = self.value.forward(source)
            k, v = split_heads(k_lin, self.n_heads), split_heads(v_lin, self.n_heads)
        n_past = 0
        if past_kv is not None:
            n_past = past_kv[0].shape[2]
            k = np.concatenate([past_kv[0], k], axis=2)
            v = np.concatenate([past_kv[1], v], axis=2)
        if mask is not None:
            mask = np.asarray(mask)
            if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
                # a float mask is most likely BERT's additive 0 / -10000, which
                # astype(bool) would silently invert
                raise TypeError(f"attention mask: expected a boolean array (True = may "
                                f"attend), got dtype {mask.dtype}")
            mask = mask.astype(bool)
            want = (B, T, k.shape[2])
            try:
                np.broadcast_shapes(mask.shape, want)
            except ValueError:
                raise ValueError(f"attention mask: expected a shape broadcastable to "
                                 f"(B, Tq, Tk) = {want}, got {mask.shape}") from None
            if mask.ndim != 3:
                raise ValueError(f"attention mask: expected 3 dims (B, Tq, Tk) = {want}, "
                                 f"got shape {mask.shape}")
        ctx, c_att = self.attention.forward(q, k, v, mask, rng)
        out, c_out = self.out.forward(merge_heads(ctx))
        cache = {"q": c_q, "k": c_k, "v": c_v, "att": c_att, "out": c_out,
                 "self": context is None, "n_past": n_past, "present": (k, v)}
        return out, cache

    def backward(self, dout, cache):
        """dout (B, T, D) -> (dx, dcontext); dcontext is None for self-attention."""
        dctx = self.out.backward(dout, cache["out"])  # undoes the output projection
        dq, dk, dv = self.attention.backward(split_heads(dctx, self.n_heads), cache["att"])
        n_past = cache["n_past"]
        dk, dv = dk[:, :, n_past:], dv[:, :, n_past:]  # the past is a constant
        dx = self.query.backward(merge_heads(dq), cache["q"])
        if cache["k"] is None:  # keys and values were given (context_kv): constants
            return dx, None
        dsource = self.key.backward(merge_heads(dk), cache["k"])
        dsource += self.value.backward(merge_heads(dv), cache["v"])
        if cache["self"]:
            return dx + dsource, None  # x fanned out to queries, keys and values
        return dx, dsource
