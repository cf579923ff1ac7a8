"""A small encoder-decoder language model in the style of T5 / FlanT5, the other
frozen LLM of BLIP-2.

BLIP-2 stage 2 has two designs (Li et al. 2023, section 3.3, Figure 3): a
decoder-only LLM (OPT, :mod:`minblip.lm`) trained with the language-modelling
loss, and an encoder-decoder LLM (FlanT5, salesforce/LAVIS
``lavis/models/blip2_models/blip2_t5.py``) trained with a *prefix*
language-modelling loss: the projected queries and the first part of the text
go to the encoder, the rest of the text is the decoder's target. This module
is that encoder-decoder (Hugging Face ``T5ForConditionalGeneration``), shrunk
to the synthetic world:

    e = dropout([prefix_embeds | shared(enc_ids)])                       (B, S, D)
    e = block(e, bias_enc) for each encoder block   bidirectional self-attention
    memory = dropout(RMSNorm(e))                                          (B, S, D)
    d = dropout(shared(dec_ids))                                          (B, T, D)
    d = block(d, bias_dec, memory) for each decoder block   causal self-attention,
                                                             cross-attention to memory
    logits = RMSNorm(d) @ lm_head                                         (B, T, V)

Kept from T5 (HF ``modeling_t5.py``):

* **pre-norm** blocks, ``x = x + f(norm(x))``, with T5's layer norm
  (:class:`minblip.layers.RMSNorm`): no mean subtraction, no bias, eps 1e-6;
  a final norm after each stack;
* **relative position biases** instead of position embeddings: a learned scalar
  per head and per *bucket* of the distance key - query, added to the attention
  scores. Buckets are exact for short distances and logarithmic up to
  ``max_distance`` (:func:`relative_position_buckets`); the encoder's are
  bidirectional (half the buckets for keys after the query), the decoder's
  causal. As in T5, each stack has **one** table, computed once and shared by
  every layer of the stack (HF keeps it in layer 0 and hands the bias on);
  cross-attention has no position bias;
* attention scores are **not** divided by sqrt(d_head): T5 folds that scale into
  the initialisation of the query projection (std (d * d_head)^-1/2); no
  projection has a bias;
* the **gated** feed-forward of T5 v1.1 / FlanT5
  (:class:`minblip.transformer.GatedFeedForward`) with the exact GELU, as LAVIS
  overrides FlanT5's ``gelu_new``;
* one token table ``shared`` for the encoder and decoder inputs, and an
  **untied** output head ``lm_head`` (FlanT5's ``tie_word_embeddings=False``, so
  T5's rescaling of the decoder output by d^-1/2 before a tied head does not
  apply); HF's initialisation (``_init_weights``, factor 1);
* the decoder starts from the pad token (``decoder_start_token_id = 0``) and
  its input is the target shifted right (:func:`shift_right`); the loss is
  plain cross-entropy with -100 ignored (no label smoothing).

Departures, all deliberate: the tokens are minblip's whole words
(``[PAD]`` = 0 is the decoder start, ``[SEP]`` plays T5's ``</s>``); the model
is pretrained by minblip on world text with a prefix-LM objective (T5 was
pretrained by span corruption, FlanT5 then instruction-tuned); dropout is off
by default.

Freezing is the core contract's (``model.freeze()``); the backward of a frozen
model is the one it trains with and returns the gradient of the soft prompt
(``prefix_embeds``) while adding into no Param.

:class:`EncoderDecoderCaptioner` lets :mod:`minblip.generation` decode with it
(greedy, beam, nucleus; the encoder runs once, the decoder caches its keys and
values, the cross-attention's keys and values are projected once).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .attention import causal_mask, merge_heads, padding_mask, split_heads
from .core import Module, check_float, check_ids, check_ndim
from .layers import Dropout, Embedding, Linear, RMSNorm
from .softmax import CrossEntropyLoss, Softmax
from .transformer import GatedFeedForward

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass
class T5Config:
    """Sizes of the encoder-decoder LM. The defaults are a toy; FlanT5-XL (BLIP-2's
    smaller T5) is vocab_size 32128, width (d_model) 2048, depth 24 encoder and
    24 decoder layers, heads 32, d_kv 64, mlp_dim (d_ff) 5120, 32 buckets,
    max_distance 128, eps 1e-6, dropout 0.1."""

    vocab_size: int
    width: int = 48
    depth: int = 2             # encoder layers, and decoder layers
    heads: int = 4
    mlp_dim: int = 128
    num_buckets: int = 32      # relative_attention_num_buckets
    max_distance: int = 128    # relative_attention_max_distance
    eps: float = 1e-6          # T5LayerNorm's layer_norm_epsilon
    dropout: float = 0.0
    init_factor: float = 1.0   # T5's initializer_factor
    max_positions: int = 64    # the longest encoder or decoder sequence accepted
    pad_id: int = 0            # also the decoder start token, as in T5
    eos_id: int = 3            # minblip's [SEP] plays T5's </s>

    @property
    def token_width(self) -> int:
        """The width of the token embeddings and of a soft prompt: T5 has no
        projection between them and the model (OPT's ``word_embed_proj_dim``)."""
        return self.width

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "heads", "mlp_dim", "num_buckets",
                     "max_distance", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"T5Config.{name}: expected a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"T5Config: heads must divide width, got width={self.width}, "
                             f"heads={self.heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"T5Config.num_buckets: expected an even number >= 4 (half of "
                             f"them per direction in the encoder), got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 2:
            raise ValueError(f"T5Config.max_distance: expected more than num_buckets // 2 = "
                             f"{self.num_buckets // 2} (the distances with a bucket each), got "
                             f"{self.max_distance}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"T5Config.dropout: expected a value in [0, 1), got {self.dropout}")
        for name in ("eps", "init_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"T5Config.{name}: expected a positive number, "
                                 f"got {getattr(self, name)}")
        for name in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"T5Config.{name}: expected an id in [0, {self.vocab_size}), "
                                 f"got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Relative positions
# ---------------------------------------------------------------------------

def relative_position_buckets(query_positions, key_positions, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
    """The bucket (Tq, Tk) int of every distance key - query (HF
    ``T5Attention._relative_position_bucket``).

    Bidirectional (the encoder): keys after the query use the upper half of the
    buckets. Causal (the decoder): keys after the query cannot be seen, so they
    share bucket 0 with distance 0 and all buckets count backwards distances.
    Within a direction, distances below half its buckets get a bucket each; the
    rest are binned logarithmically up to ``max_distance``, beyond which all
    distances share the last bucket.
    """
    relative = np.asarray(key_positions)[None, :] - np.asarray(query_positions)[:, None]
    buckets = np.zeros(relative.shape, dtype=np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    exact = num_buckets // 2
    # log-spaced beyond `exact`; np.maximum keeps log() away from 0 where is_small anyway
    large = exact + (np.log(np.maximum(distance, 1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(distance < exact, distance, large)


class RelativePositionBias(Module):
    """One learned scalar per (bucket, head): the additive attention bias
    (1, H, Tq, Tk) of a stack, shared by all of its layers."""

    def __init__(self, cfg: T5Config, bidirectional: bool, rng: np.random.Generator):
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        # HF: relative_attention_bias ~ N(0, factor * d_model^-1/2)
        self.table = Embedding(cfg.num_buckets, cfg.heads, rng,
                               init_std=cfg.init_factor * cfg.width ** -0.5)

    def forward(self, q_len: int, k_len: int, offset: int = 0):
        """Queries at positions offset .. offset+q_len-1, keys at 0 .. k_len-1
        -> bias (1, H, q_len, k_len) and the cache."""
        buckets = relative_position_buckets(np.arange(offset, offset + q_len), np.arange(k_len),
                                            self.bidirectional, self.num_buckets,
                                            self.max_distance)
        values, c = self.table.forward(buckets)  # (Tq, Tk) -> (Tq, Tk, H)
        return values.transpose(2, 0, 1)[None], c  # (1, H, Tq, Tk)

    def backward(self, dbias, cache) -> None:
        """dbias (1, H, Tq, Tk), summed over the batch and every layer that used it."""
        self.table.backward(dbias[0].transpose(1, 2, 0), cache)  # scatter-add per bucket


# ---------------------------------------------------------------------------
# Attention with an additive bias
# ---------------------------------------------------------------------------

class T5Attention(Module):
    """Multi-head attention as T5 computes it: projections without biases, scores
    ``q k^T + bias`` with no 1/sqrt(d_head) (HF ``T5Attention``), masked keys at
    -inf, softmax, dropout on the weights. Self-attention when ``context`` is None,
    cross-attention to ``context`` (B, S, D) otherwise."""

    def __init__(self, cfg: T5Config, rng: np.random.Generator):
        D, H, dh = cfg.width, cfg.heads, cfg.head_dim
        f = cfg.init_factor
        self.n_heads = H
        self.q = Linear(D, H * dh, rng, bias=False, init_std=f * (D * dh) ** -0.5)
        self.k = Linear(D, H * dh, rng, bias=False, init_std=f * D ** -0.5)
        self.v = Linear(D, H * dh, rng, bias=False, init_std=f * D ** -0.5)
        self.o = Linear(H * dh, D, rng, bias=False, init_std=f * (H * dh) ** -0.5)
        self.softmax = Softmax()
        self.dropout = Dropout(cfg.dropout)

    def project_kv(self, source):
        """Keys and values (B, H, S, dh) of a source sequence (B, S, D), for generation."""
        return (split_heads(self.k.forward(source)[0], self.n_heads),
                split_heads(self.v.forward(source)[0], self.n_heads))

    def forward(self, x, context=None, mask=None, bias=None, rng=None, past_kv=None,
                context_kv=None):
        """x (B, T, D); context (B, S, D) or None; mask bool broadcastable to
        (B, T, K) (True = may attend); bias (1 or B, H, T, K) added to the scores.
        For generation only: ``past_kv`` (k, v) of earlier positions prepended to the
        self-attention's, ``context_kv`` the projected context; both constants.
        Returns out (B, T, D) and the cache (its "present": the keys and values)."""
        q_lin, c_q = self.q.forward(x)
        q = split_heads(q_lin, self.n_heads)  # (B, H, T, dh)
        c_k = c_v = None
        if context_kv is not None:
            k, v = context_kv
        else:
            source = x if context is None else context
            k_lin, c_k = self.k.forward(source)
            v_lin, c_v = self.v.forward(source)
            k, v = split_heads(k_lin, self.n_heads), split_heads(v_lin, self.n_heads)
        n_past = 0
        if past_kv is not None:
            n_past = past_kv[0].shape[2]
            k = np.concatenate([past_kv[0], k], axis=2)
            v = np.concatenate([past_kv[1], v], axis=2)
        scores = q @ k.swapaxes(-1, -2)  # (B,H,T,dh) @ (B,H,dh,K) -> (B,H,T,K), no 1/sqrt(dh)
        if bias is not None:
            scores += bias
        if mask is not None:  # one additive -inf mask (B, T, K), shared by every head
            scores += np.where(mask, 0.0, -np.inf).astype(scores.dtype)[:, None]
        p, c_soft = self.softmax.forward(scores)
        p_drop, c_drop = self.dropout.forward(p, rng)
        out, c_o = self.o.forward(merge_heads(p_drop @ v))  # (B,H,T,K) @ (B,H,K,dh) -> (B,T,D)
        cache = {"q": c_q, "k": c_k, "v": c_v, "qkv": (q, k, v), "soft": c_soft,
                 "p_drop": p_drop, "drop": c_drop, "o": c_o, "n_past": n_past,
                 "self": context is None, "bias_shape": None if bias is None else bias.shape,
                 "present": (k, v)}
        return out, cache

    def backward(self, dout, cache):
        """dout (B, T, D) -> (dx, dcontext or None, dbias or None); dbias has the
        shape of the bias given (summed over the batch when it was broadcast)."""
        q, k, v = cache["qkv"]
        dctx = split_heads(self.o.backward(dout, cache["o"]), self.n_heads)  # undoes o(merge(.))
        dv = cache["p_drop"].swapaxes(-1, -2) @ dctx  # undoes out = P V
        dp = self.dropout.backward(dctx @ v.swapaxes(-1, -2), cache["drop"])
        dscores = self.softmax.backward(dp, cache["soft"])  # (B, H, T, K); 0 at masked keys
        dbias = None
        if cache["bias_shape"] is not None:  # undoes scores += bias, broadcast over the batch
            dbias = dscores if cache["bias_shape"][0] == dscores.shape[0] else \
                dscores.sum(axis=0, keepdims=True)
        dq = dscores @ k  # undoes q k^T
        n_past = cache["n_past"]
        dk = (dscores.swapaxes(-1, -2) @ q)[:, :, n_past:]  # the past is a constant
        dv = dv[:, :, n_past:]
        dx = self.q.backward(merge_heads(dq), cache["q"])
        if cache["k"] is None:  # keys and values were given: constants
            return dx, None, dbias
        dsource = self.k.backward(merge_heads(dk), cache["k"])
        dsource += self.v.backward(merge_heads(dv), cache["v"])
        if cache["self"]:
            return dx + dsource, None, dbias  # x fed the queries, keys and values
        return dx, dsource, dbias


# ---------------------------------------------------------------------------
# One block
# ---------------------------------------------------------------------------

class T5Block(Module):
    """A pre-norm T5 layer (HF ``T5Block``):

        x = x + SelfAttn(norm(x); bias)                 bidirectional or causal
        x = x + CrossAttn(norm(x), memory)              decoder only, no position bias
        x = x + FFN(norm(x))                            gated GELU
    """

    def __init__(self, cfg: T5Config, cross_attention: bool, rng: np.random.Generator):
        self.self_attn_norm = RMSNorm(cfg.width, cfg.eps)
        self.self_attn = T5Attention(cfg, rng)
        self.cross_attn_norm = self.cross_attn = None
        if cross_attention:
            self.cross_attn_norm = RMSNorm(cfg.width, cfg.eps)
            self.cross_attn = T5Attention(cfg, rng)
        self.ffn_norm = RMSNorm(cfg.width, cfg.eps)
        self.ffn = GatedFeedForward(cfg.width, cfg.mlp_dim, rng, init_factor=cfg.init_factor)
        self.drop = Dropout(cfg.dropout)

    def _sublayer(self, x, norm, attn_or_ffn, drop_rng, **kwargs):
        """x + dropout(f(norm(x), ...)) and its cache."""
        h, c_n = norm.forward(x)
        f, c_f = attn_or_ffn.forward(h, **kwargs)
        f, c_d = self.drop.forward(f, drop_rng)
        return x + f, (c_n, c_f, c_d)

    def forward(self, x, mask=None, bias=None, memory=None, memory_mask=None, rng=None,
                past_kv=None, memory_kv=None):
        """x (B, T, D); mask broadcastable to (B, T, [P +] T); bias (1, H, T, [P +] T);
        memory (B, S, D) the encoder's output (decoder only), memory_mask to (B, T, S).
        Generation only: ``past_kv`` the cached self-attention keys and values,
        ``memory_kv`` the projected memory. Returns y (B, T, D) and the cache."""
        x, c_sa = self._sublayer(x, self.self_attn_norm, self.self_attn, rng, mask=mask,
                                 bias=bias, rng=rng, past_kv=past_kv)
        c_ca = None
        if self.cross_attn is not None:
            x, c_ca = self._sublayer(x, self.cross_attn_norm, self.cross_attn, rng,
                                     context=memory, mask=memory_mask, rng=rng,
                                     context_kv=memory_kv)
        y, c_ff = self._sublayer(x, self.ffn_norm, self.ffn, rng)
        return y, {"parts": (c_sa, c_ca, c_ff), "present": c_sa[1]["present"]}

    def backward(self, dy, cache):
        """dy (B, T, D) -> (dx, dmemory or None, dbias)."""
        c_sa, c_ca, c_ff = cache["parts"]
        dx = dy + self._sublayer_backward(self.ffn_norm, self.ffn, dy, c_ff)
        dmemory = None
        if c_ca is not None:  # undoes x = x + CrossAttn(norm(x), memory)
            d_ca, dmemory, _ = self._sublayer_backward(self.cross_attn_norm, self.cross_attn,
                                                       dx, c_ca)
            dx = dx + d_ca
        d_sa, _, dbias = self._sublayer_backward(self.self_attn_norm, self.self_attn, dx, c_sa)
        return dx + d_sa, dmemory, dbias  # undoes x = x + SelfAttn(norm(x)): both paths

    def _sublayer_backward(self, norm, attn_or_ffn, dy, cache):
        """Undoes f(norm(x)) of x + dropout(f(norm(x))): the residual's second path.
        For attention returns (dx, dcontext, dbias), for the feed-forward dx."""
        c_n, c_f, c_d = cache
        grads = attn_or_ffn.backward(self.drop.backward(dy, c_d), c_f)
        if isinstance(grads, tuple):
            return (norm.backward(grads[0], c_n),) + grads[1:]
        return norm.backward(grads, c_n)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class T5Stack(Module):
    """An encoder (bidirectional, no cross-attention) or a decoder (causal, with
    cross-attention) of ``depth`` blocks, its relative position bias and its
    final norm. The token table is the model's ``shared``, not the stack's."""

    def __init__(self, cfg: T5Config, is_decoder: bool, rng: np.random.Generator):
        self.is_decoder = is_decoder
        self.relative_attention_bias = RelativePositionBias(cfg, not is_decoder, rng)
        self.blocks = [T5Block(cfg, is_decoder, rng) for _ in range(cfg.depth)]
        self.final_norm = RMSNorm(cfg.width, cfg.eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, mask, memory=None, memory_mask=None, rng=None):
        """x (B, T, D) embedded inputs; mask (B, T, T) bool; memory (B, S, D) and
        memory_mask (B, T, S) for a decoder. -> hidden (B, T, D) after the final
        norm, and the cache."""
        T = x.shape[1]
        bias, c_bias = self.relative_attention_bias.forward(T, T)  # once, for every layer
        h, c_in = self.drop.forward(x, rng)
        c_blocks = []
        for block in self.blocks:
            h, c = block.forward(h, mask, bias, memory, memory_mask, rng)
            c_blocks.append(c)
        h, c_norm = self.final_norm.forward(h)
        h, c_out = self.drop.forward(h, rng)
        return h, (c_bias, c_in, c_blocks, c_norm, c_out)

    def backward(self, dh, cache):
        """dh (B, T, D) -> (dx (B, T, D), dmemory (B, S, D) or None)."""
        c_bias, c_in, c_blocks, c_norm, c_out = cache
        dh = self.final_norm.backward(self.drop.backward(dh, c_out), c_norm)
        dbias = dmemory = None
        for block, c in zip(reversed(self.blocks), reversed(c_blocks)):
            dh, dm, db = block.backward(dh, c)
            dbias = db if dbias is None else dbias + db  # one bias, used by every layer
            if dm is not None:  # the memory fans out to every cross-attention
                dmemory = dm if dmemory is None else dmemory + dm
        self.relative_attention_bias.backward(dbias, c_bias)
        return self.drop.backward(dh, c_in), dmemory


def shift_right(labels, start_id: int = 0, pad_id: int = 0) -> np.ndarray:
    """The decoder's input for ``labels`` (B, T): the start token, then the labels
    one place later, -100 replaced by padding (HF ``T5PreTrainedModel._shift_right``)."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, pad_id, dtype=np.int64)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1]
    out[out == IGNORE_INDEX] = pad_id
    return out


class EncoderDecoderLM(Module):
    """T5-style encoder-decoder LM (HF ``T5ForConditionalGeneration``, FlanT5 layout):
    ``shared`` (V, D) token table, ``encoder`` and ``decoder`` stacks, untied
    ``lm_head`` (D, V)."""

    def __init__(self, cfg: T5Config, rng: np.random.Generator):
        if not isinstance(cfg, T5Config):
            raise TypeError(f"EncoderDecoderLM: expected a T5Config, got {type(cfg).__name__}")
        self.cfg = cfg
        f = cfg.init_factor
        self.shared = Embedding(cfg.vocab_size, cfg.width, rng, init_std=f * 1.0)  # HF: std f
        self.encoder = T5Stack(cfg, is_decoder=False, rng=rng)
        self.decoder = T5Stack(cfg, is_decoder=True, rng=rng)
        self.lm_head = Linear(cfg.width, cfg.vocab_size, rng, bias=False, init_std=f * 1.0)

    # ---- checks -------------------------------------------------------------------
    def _ids(self, ids, name: str) -> np.ndarray:
        ids = check_ids(ids, self.cfg.vocab_size, name)
        if ids.ndim != 2:
            raise ValueError(f"{name}: expected a 2-d array (B, T), got shape {ids.shape}")
        return ids

    def _mask(self, mask, shape: tuple, name: str) -> np.ndarray:
        if mask is None:
            return np.ones(shape, dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != shape or not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"{name}: expected shape {shape} of 0/1, got {mask.shape}")
        return mask.astype(bool)

    def _check_length(self, n: int, what: str) -> None:
        if n == 0:
            raise ValueError(f"EncoderDecoderLM: the {what} sequence is empty")
        if n > self.cfg.max_positions:
            raise ValueError(f"EncoderDecoderLM: {n} {what} positions exceed "
                             f"max_positions={self.cfg.max_positions}")

    # ---- the encoder --------------------------------------------------------------
    def encode(self, ids=None, attention_mask=None, prefix_embeds=None, rng=None):
        """The encoder over [prefix_embeds | shared(ids)]: ids (B, S) int or None,
        attention_mask (B, S) 0/1 for the tokens (None: no padding), prefix_embeds
        (B, P, D) soft prompts, always attended (LAVIS's ``ones(B, 32)``).
        Returns memory (B, P+S, D), its mask (B, P+S) bool and the cache."""
        parts, c_tok, P = [], None, 0
        if prefix_embeds is not None:
            check_float(prefix_embeds, "prefix_embeds")
            check_ndim(prefix_embeds, 3, "prefix_embeds", f"(B, P, {self.cfg.width})")
            if prefix_embeds.shape[-1] != self.cfg.width:
                raise ValueError(f"prefix_embeds: expected width {self.cfg.width} (the LM "
                                 f"width), got shape {prefix_embeds.shape}")
            parts.append(prefix_embeds.astype(self.dtype, copy=False))
            P = prefix_embeds.shape[1]
        if ids is not None:
            ids = self._ids(ids, "encoder ids")
            if parts and ids.shape[0] != parts[0].shape[0]:
                raise ValueError(f"encoder ids: batch size {ids.shape[0]} does not match the "
                                 f"{parts[0].shape[0]} soft prompts")
            tok, c_tok = self.shared.forward(ids)  # (B, S) -> (B, S, D)
            parts.append(tok)
        elif attention_mask is not None:
            raise ValueError("encoder attention_mask was given without encoder ids")
        if not parts:
            raise ValueError("EncoderDecoderLM.encode: expected ids or prefix_embeds, got none")
        B = parts[0].shape[0]
        S = 0 if ids is None else ids.shape[1]
        self._check_length(P + S, "encoder")
        visible = np.concatenate([np.ones((B, P), dtype=bool),
                                  self._mask(attention_mask, (B, S), "encoder attention_mask")],
                                 axis=1)  # blip2_t5.py: cat([atts_t5, input mask])
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        memory, c_enc = self.encoder.forward(x, padding_mask(visible), rng=rng)
        return memory, visible, {"tok": c_tok, "P": P, "enc": c_enc}

    # ---- the whole model ----------------------------------------------------------
    def forward(self, ids=None, attention_mask=None, decoder_ids=None,
                decoder_attention_mask=None, prefix_embeds=None, rng=None):
        """Encoder input ids (B, S) / attention_mask (B, S) / prefix_embeds (B, P, D)
        as in :meth:`encode`; decoder_ids (B, T) the decoder's input (start token
        first, :func:`shift_right`), decoder_attention_mask (B, T) 0/1 (None: all).
        ``rng`` drives dropout (None: evaluation). Returns logits (B, T, V): row t
        scores the decoder's token t + 1, the label at t. And the cache."""
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy Generator or None, got {type(rng).__name__}")
        if decoder_ids is None:
            raise ValueError("EncoderDecoderLM.forward: decoder_ids (B, T) are needed")
        memory, visible, c_enc = self.encode(ids, attention_mask, prefix_embeds, rng)
        decoder_ids = self._ids(decoder_ids, "decoder ids")
        B, T = decoder_ids.shape
        if B != memory.shape[0]:
            raise ValueError(f"decoder ids: batch size {B} does not match the encoder's "
                             f"{memory.shape[0]}")
        self._check_length(T, "decoder")
        dec_visible = self._mask(decoder_attention_mask, (B, T), "decoder_attention_mask")
        y, c_dtok = self.shared.forward(decoder_ids)  # (B, T) -> (B, T, D)
        self_mask = causal_mask(T) & padding_mask(dec_visible)  # (B, T, T)
        h, c_dec = self.decoder.forward(y, self_mask, memory, padding_mask(visible), rng)
        logits, c_head = self.lm_head.forward(h)  # (B, T, D) @ (D, V) -> (B, T, V)
        cache = {"enc": c_enc, "dtok": c_dtok, "dec": c_dec, "head": c_head,
                 "shape": logits.shape}
        return logits, cache

    def backward(self, dlogits, cache):
        """dlogits (B, T, V) -> d prefix_embeds (B, P, D), or None without a prefix:
        the one float input of :meth:`forward`. Adds into the trainable Params only
        (none when frozen)."""
        if np.shape(dlogits) != cache["shape"]:
            raise ValueError(f"EncoderDecoderLM.backward: expected dlogits of shape "
                             f"{cache['shape']}, got {np.shape(dlogits)}")
        dh = self.lm_head.backward(dlogits, cache["head"])  # undoes logits = h W
        dy, dmemory = self.decoder.backward(dh, cache["dec"])
        self.shared.backward(dy, cache["dtok"])  # the decoder's input tokens
        c = cache["enc"]
        dx, _ = self.encoder.backward(dmemory, c["enc"])  # the memory fed every cross-attention
        P = c["P"]
        if c["tok"] is not None:  # undoes the concatenation: the token part
            self.shared.backward(dx[:, P:], c["tok"])
        return dx[:, :P] if P else None


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------

def seq2seq_step(model: EncoderDecoderLM, enc_ids, enc_mask, labels, prefix_embeds=None,
                 rng=None, backward: bool = True):
    """One prefix-LM loss (HF ``T5ForConditionalGeneration`` with ``labels``):
    the encoder reads [prefix_embeds | enc_ids], the decoder reads the labels
    shifted right and is scored against the labels; -100 is ignored. Plain
    cross-entropy, no label smoothing. Returns (loss, d_prefix_embeds or None)
    and, if ``backward``, adds the gradients into the trainable Params.

    enc_ids (B, S) int or None; enc_mask (B, S) 0/1 or None; labels (B, T) int
    with -100 at padding; prefix_embeds (B, P, D) or None.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"seq2seq_step: expected integer labels (B, T), got "
                         f"{labels.dtype} {labels.shape}")
    dec_ids = shift_right(labels, model.cfg.pad_id, model.cfg.pad_id)
    dec_mask = np.ones(labels.shape, dtype=np.int64)
    dec_mask[:, 1:] = labels[:, :-1] != IGNORE_INDEX  # the start token and real labels
    logits, cache = model.forward(enc_ids, enc_mask, dec_ids, dec_mask, prefix_embeds, rng)
    ce = CrossEntropyLoss()  # T5: plain cross-entropy over the labels, -100 ignored
    loss, c_ce = ce.forward(logits, labels)
    if not backward:
        return loss, None
    return loss, model.backward(ce.backward(1.0, c_ce), cache)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

class EncoderDecoderCaptioner:
    """Adapts the model to ``minblip.generation.generate``: the "image" is the
    encoder's output (B, S, D), computed once (:meth:`EncoderDecoderLM.encode`,
    unpadded), whose cross-attention keys and values each decoder layer projects
    once (``image_kv``); ``forward_incremental`` runs the decoder on new tokens
    at positions start.., causal over the cached ones, with the decoder's
    relative position bias for those positions."""

    def __init__(self, model: EncoderDecoderLM, suppress_ids=()):
        self.model = model
        self.suppress_ids = list(suppress_ids)

    def image_kv(self, memory):
        return [block.cross_attn.project_kv(memory) for block in self.model.decoder.blocks]

    def forward_incremental(self, ids, past, image_kv, start):
        dec = self.model.decoder
        ids = self.model._ids(ids, "decoder ids")
        t = ids.shape[1]
        n_past = 0 if past is None else past[0][0].shape[2]
        if start != n_past:
            raise ValueError(f"forward_incremental: start must equal the number of cached "
                             f"positions ({n_past}), got start={start}")
        self.model._check_length(start + t, "decoder")
        bias, _ = dec.relative_attention_bias.forward(t, start + t, offset=start)
        mask = causal_mask(t, start + t)  # (1, t, start + t)
        h, _ = self.model.shared.forward(ids)
        present = []
        for i, block in enumerate(dec.blocks):
            h, c = block.forward(h, mask, bias, rng=None,
                                 past_kv=None if past is None else past[i], memory_kv=image_kv[i])
            present.append(c["present"])
        h, _ = dec.final_norm.forward(h)
        logits, _ = self.model.lm_head.forward(h)
        if self.suppress_ids:  # HF SuppressTokensLogitsProcessor: never generated
            logits[..., self.suppress_ids] = -np.inf
        return logits, present
