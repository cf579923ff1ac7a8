"""Transformer blocks built from the layers: pre-norm (ViT) and post-norm (BERT)."""
from __future__ import annotations

import numpy as np

from .attention import MultiHeadAttention
from .core import Module
from .layers import Dropout, LayerNorm, Linear, make_activation


class FeedForward(Module):
    """fc2(act(fc1(x))): (..., d) -> (..., d_ff) -> (..., d).

    BERT calls fc1 ``intermediate.dense`` and fc2 ``output.dense``; the ViT
    calls them ``mlp.fc1`` and ``mlp.fc2``. ``activation`` is "gelu" (the exact
    GELU of BERT and the ViT), "gelu_tanh" or "relu" (OPT).
    """

    def __init__(self, d: int, d_ff: int, rng: np.random.Generator, init_std: float = 0.02,
                 activation: str = "gelu"):
        self.fc1 = Linear(d, d_ff, rng, init_std=init_std)
        self.act = make_activation(activation)
        self.fc2 = Linear(d_ff, d, rng, init_std=init_std)

    def forward(self, x):
        h, c1 = self.fc1.forward(x)  # (..., d) @ (d, d_ff) -> (..., d_ff)
        a, c2 = self.act.forward(h)
        y, c3 = self.fc2.forward(a)  # (..., d_ff) @ (d_ff, d) -> (..., d)
        return y, (c1, c2, c3)

    def backward(self, dy, cache):
        c1, c2, c3 = cache
        da = self.fc2.backward(dy, c3)  # undoes y = fc2(a)
        dh = self.act.backward(da, c2)  # undoes a = act(h)
        return self.fc1.backward(dh, c1)  # undoes h = fc1(x)


class GatedFeedForward(Module):
    """wo(act(wi_0(x)) * wi_1(x)): (..., d) -> two (..., d_ff) -> (..., d), no biases.

    The gated feed-forward of T5 v1.1 and FlanT5 (Hugging Face
    ``T5DenseGatedActDense``): one projection, through the activation, gates the
    other element by element. FlanT5 uses the tanh GELU ("gelu_new"); BLIP-2
    overrides it with the exact GELU (LAVIS ``blip2_t5.py``: ``dense_act_fn =
    "gelu"``), the default here. HF initialises ``wi`` with std d^-1/2 and
    ``wo`` with std d_ff^-1/2 (``T5PreTrainedModel._init_weights``, factor 1).
    """

    def __init__(self, d: int, d_ff: int, rng: np.random.Generator, activation: str = "gelu",
                 init_factor: float = 1.0):
        self.wi_0 = Linear(d, d_ff, rng, bias=False, init_std=init_factor * d ** -0.5)
        self.wi_1 = Linear(d, d_ff, rng, bias=False, init_std=init_factor * d ** -0.5)
        self.act = make_activation(activation)
        self.wo = Linear(d_ff, d, rng, bias=False, init_std=init_factor * d_ff ** -0.5)

    def forward(self, x):
        g, c0 = self.wi_0.forward(x)  # (..., d) @ (d, d_ff) -> (..., d_ff)
        a, c_act = self.act.forward(g)
        u, c1 = self.wi_1.forward(x)  # (..., d) @ (d, d_ff) -> (..., d_ff)
        y, c_o = self.wo.forward(a * u)  # (..., d_ff) @ (d_ff, d) -> (..., d)
        return y, (c0, c_act, c1, c_o, a, u)

    def backward(self, dy, cache):
        c0, c_act, c1, c_o, a, u = cache
        dh = self.wo.backward(dy, c_o)  # undoes y = wo(a * u)
        dx = self.wi_1.backward(dh * a, c1)  # undoes u = wi_1(x), through h = a * u
        dg = self.act.backward(dh * u, c_act)  # undoes a = act(g)
        return dx + self.wi_0.backward(dg, c0)  # undoes g = wi_0(x); x fed both projections


class PreNormBlock(Module):
    """The ViT block (timm ``Block``, used by salesforce/BLIP ``models/vit.py``;
    LAVIS ``eva_vit.py Block`` without layer scale), also OPT's decoder layer
    (``OPTDecoderLayer`` with ``do_layer_norm_before``):

        x = x + Attn(LN1(x))
        x = x + FFN(LN2(x))
    """

    def __init__(self, d: int, n_heads: int, d_ff: int, rng: np.random.Generator,
                 eps: float = 1e-6, dropout: float = 0.0, init_std: float = 0.02,
                 activation: str = "gelu", qkv_bias: bool = True, key_bias: bool | None = None):
        self.ln1 = LayerNorm(d, eps)
        self.attn = MultiHeadAttention(d, n_heads, rng, dropout=dropout, init_std=init_std,
                                       bias=qkv_bias, key_bias=key_bias)
        self.ln2 = LayerNorm(d, eps)
        self.mlp = FeedForward(d, d_ff, rng, init_std=init_std, activation=activation)
        self.drop = Dropout(dropout)

    def forward(self, x, mask=None, rng=None, past_kv=None):
        """x (B, T, d), mask broadcastable to (B, T, [P +] T) -> (B, T, d).
        ``past_kv`` (generation): the attention's cached keys and values of P
        earlier positions, a constant for ``backward``. The cache's ``"present"``
        holds the keys and values of every position so far, the next call's
        ``past_kv``."""
        h, c_ln1 = self.ln1.forward(x)
        a, c_attn = self.attn.forward(h, mask=mask, rng=rng, past_kv=past_kv)
        a, c_d1 = self.drop.forward(a, rng)
        x1 = x + a
        h2, c_ln2 = self.ln2.forward(x1)
        f, c_mlp = self.mlp.forward(h2)
        f, c_d2 = self.drop.forward(f, rng)
        cache = (c_ln1, c_attn, c_d1, c_ln2, c_mlp, c_d2)
        return x1 + f, {"parts": cache, "present": c_attn["present"]}

    def backward(self, dy, cache):
        """dy (B, T, d) -> dx (B, T, d)."""
        c_ln1, c_attn, c_d1, c_ln2, c_mlp, c_d2 = cache["parts"]
        df = self.drop.backward(dy, c_d2)
        dx1 = dy + self.ln2.backward(self.mlp.backward(df, c_mlp), c_ln2)  # undoes x1 + FFN(LN2(x1))
        da = self.drop.backward(dx1, c_d1)
        dh, _ = self.attn.backward(da, c_attn)
        return dx1 + self.ln1.backward(dh, c_ln1)  # undoes x + Attn(LN1(x))


class PostNormBlock(Module):
    """The BERT layer with optional cross-attention (salesforce/BLIP ``med.py``
    ``BertLayer``):

        h = LN_sa(x + SelfAttn(x))
        h = LN_ca(h + CrossAttn(h, context))      if context is given
        y = LN_ffn(h + FFN(h))

    The three sub-blocks are separate attributes so a decoder can share some of
    them with an encoder by holding the same module objects.
    """

    def __init__(self, d: int, n_heads: int, d_ff: int, rng: np.random.Generator,
                 eps: float = 1e-12, dropout: float = 0.0, cross_attention: bool = False,
                 d_context: int | None = None, init_std: float = 0.02):
        self.self_attn = MultiHeadAttention(d, n_heads, rng, dropout=dropout, init_std=init_std)
        self.self_attn_ln = LayerNorm(d, eps)
        self.cross_attn = None
        self.cross_attn_ln = None
        if cross_attention:
            self.cross_attn = MultiHeadAttention(d, n_heads, rng, d_context=d_context,
                                                 dropout=dropout, init_std=init_std)
            self.cross_attn_ln = LayerNorm(d, eps)
        self.ffn = FeedForward(d, d_ff, rng, init_std=init_std)
        self.ffn_ln = LayerNorm(d, eps)
        self.drop = Dropout(dropout)

    def forward(self, x, mask=None, context=None, context_mask=None, rng=None, past_kv=None,
                context_kv=None):
        """x (B, T, d); mask broadcastable to (B, T, T [+ past]); context (B, S, d_context)
        or None to skip cross-attention; context_mask broadcastable to (B, T, S).
        For generation only: ``context_kv`` = the cross-attention (k, v) of the
        context, already projected (``cross_attn.project_kv``), used instead of
        ``context`` (a constant for ``backward``).
        Returns y (B, T, d) and the cache (its ``"present"`` holds this layer's
        self-attention keys and values, for generation)."""
        a, c_sa = self.self_attn.forward(x, mask=mask, rng=rng, past_kv=past_kv)
        a, c_d1 = self.drop.forward(a, rng)
        h, c_ln1 = self.self_attn_ln.forward(x + a)
        c_ca = c_d2 = c_ln2 = None
        if context is not None or context_kv is not None:
            if self.cross_attn is None:
                raise ValueError("this block was built without cross-attention, "
                                 "but a context was given")
            ca, c_ca = self.cross_attn.forward(h, context, mask=context_mask, rng=rng,
                                               context_kv=context_kv)
            ca, c_d2 = self.drop.forward(ca, rng)
            h, c_ln2 = self.cross_attn_ln.forward(h + ca)
        f, c_ffn = self.ffn.forward(h)
        f, c_d3 = self.drop.forward(f, rng)
        y, c_ln3 = self.ffn_ln.forward(h + f)
        cache = (c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_ffn, c_d3, c_ln3)
        return y, {"parts": cache, "present": c_sa["present"]}

    def backward(self, dy, cache):
        """dy (B, T, d) -> (dx, dcontext); dcontext is None without cross-attention."""
        c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_ffn, c_d3, c_ln3 = cache["parts"]
        ds = self.ffn_ln.backward(dy, c_ln3)  # undoes y = LN(h + f)
        dh = ds + self.ffn.backward(self.drop.backward(ds, c_d3), c_ffn)
        dcontext = None
        if c_ca is not None:
            ds = self.cross_attn_ln.backward(dh, c_ln2)  # undoes h = LN(h0 + CrossAttn(h0))
            dh0, dcontext = self.cross_attn.backward(self.drop.backward(ds, c_d2), c_ca)
            dh = ds + dh0
        ds = self.self_attn_ln.backward(dh, c_ln1)  # undoes h0 = LN(x + SelfAttn(x))
        dx, _ = self.self_attn.backward(self.drop.backward(ds, c_d1), c_sa)
        return ds + dx, dcontext
