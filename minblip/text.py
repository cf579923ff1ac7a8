"""BLIP's text side: the multimodal mixture of encoder-decoder (MED).

One BERT-style transformer, used in three ways (BLIP paper section 3.1):

* unimodal text encoder: ``[CLS] text``, bidirectional self-attention, no
  cross-attention (``mode='text'``; its ``[CLS]`` output feeds ITC);
* image-grounded text encoder: ``[ENC] text``, bidirectional self-attention and
  cross-attention to the image tokens in every layer (its ``[ENC]`` output
  feeds ITM);
* image-grounded text decoder: ``[DEC] text``, causal self-attention and
  cross-attention, followed by the LM head (LM loss, captioning).

The decoder shares every parameter with the encoder except the self-attention
sub-blocks (salesforce/BLIP ``models/blip_pretrain.py
tie_encoder_decoder_weights(..., skip_key='/attention')``); :func:`build_med`
does that by handing the decoder the encoder's module objects.

Mirrors salesforce/BLIP ``models/med.py``: ``BertEmbeddings`` ->
:class:`TextEmbeddings`, ``BertModel`` (no pooler) -> :class:`TextTransformer`,
``BertLMPredictionHead`` -> :class:`LMHead`, ``BertLMHeadModel`` ->
:class:`TextDecoder`. Each ``BertLayer`` is a :class:`minblip.transformer.PostNormBlock`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import causal_mask, padding_mask
from .core import (Module, Param, check_float, check_mask01, check_ndim, check_rng,
                   check_token_matrix, col_sum)
from .layers import GELU, Dropout, Embedding, LayerNorm, Linear
from .transformer import PostNormBlock

SHARING_MODES = ("all_but_self_attention", "all", "none")


@dataclass
class TextConfig:
    """Sizes of the text transformer.

    BLIP base (``configs/med_config.json``) is vocab_size 30524, width 768,
    depth 12, heads 12, mlp_dim 3072, max_positions 512, eps 1e-12, dropout
    0.1, encoder_width 768 (1024 with ViT-L), init_std 0.02, pad_id 0.
    """

    vocab_size: int
    width: int = 64
    depth: int = 2
    heads: int = 2
    mlp_dim: int = 256
    max_positions: int = 40
    eps: float = 1e-12
    dropout: float = 0.0
    encoder_width: int = 64     # width of the image tokens cross-attention reads
    init_std: float = 0.02
    pad_id: int = 0             # the [PAD] row of the word embeddings starts at zero

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "heads", "mlp_dim", "max_positions",
                     "encoder_width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"TextConfig.{name}: expected a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"TextConfig: heads must divide width, got width={self.width}, "
                             f"heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TextConfig.dropout: expected a value in [0, 1), got {self.dropout}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"TextConfig.pad_id: expected an id in [0, {self.vocab_size}), "
                             f"got {self.pad_id}")


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def self_attention_mask(attention_mask, causal: bool = False):
    """The text self-attention mask (BERT ``get_extended_attention_mask`` before
    it becomes an additive -10000).

    attention_mask (B, T) of 0/1 -> (B, T, T) bool, True where query i may attend
    to key j: key j is a real token (encoder), and also j <= i (decoder,
    ``causal=True``).
    """
    valid = padding_mask(attention_mask)  # (B, 1, T): key j is a real token
    T = valid.shape[-1]
    if causal:
        return valid & causal_mask(T)  # (B, 1, T) & (1, T, T) -> (B, T, T)
    return np.broadcast_to(valid, (valid.shape[0], T, T))


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------

class TextEmbeddings(Module):
    """word embedding + position embedding -> LayerNorm -> Dropout
    (salesforce/BLIP ``med.py BertEmbeddings``).

    There is no token-type embedding: BLIP's ``BertEmbeddings`` has none.
    """

    def __init__(self, cfg: TextConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.width, rng, init_std=cfg.init_std)
        # nn.Embedding(padding_idx=pad_id): Hugging Face's _init_weights zeroes that row
        self.word_embeddings.weight.data[cfg.pad_id] = 0.0
        self.position_embeddings = Embedding(cfg.max_positions, cfg.width, rng,
                                             init_std=cfg.init_std)
        self.layer_norm = LayerNorm(cfg.width, cfg.eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, ids, start: int = 0, rng=None):
        """ids (B, T) -> emb (B, T, D). Token t gets position ``start + t``
        (``start`` > 0 when earlier tokens are cached during generation)."""
        ids = check_token_matrix(ids, self.cfg.vocab_size, "text ids")
        T = ids.shape[1]
        if start < 0 or start + T > self.cfg.max_positions:
            raise ValueError(f"text positions {start}..{start + T - 1} do not fit "
                             f"max_positions={self.cfg.max_positions} (got {T} tokens "
                             f"starting at {start})")
        w, c_w = self.word_embeddings.forward(ids)  # (B, T, D)
        p, c_p = self.position_embeddings.forward(np.arange(start, start + T))  # (T, D)
        e, c_ln = self.layer_norm.forward(w + p)  # p broadcast over the batch
        e, c_drop = self.dropout.forward(e, rng)
        return e, (c_w, c_p, c_ln, c_drop)

    def backward(self, demb, cache) -> None:
        """demb (B, T, D); accumulates into the two tables (ids have no gradient)."""
        c_w, c_p, c_ln, c_drop = cache
        dx = self.dropout.backward(demb, c_drop)  # undoes the dropout
        dx = self.layer_norm.backward(dx, c_ln)  # undoes e = LN(w + p)
        self.position_embeddings.backward(dx.sum(axis=0), c_p)  # undoes the broadcast over B
        self.word_embeddings.backward(dx, c_w)  # scatter-add: a repeated id collects every use
        return None


# ---------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------

class TextTransformer(Module):
    """BLIP's ``BertModel`` without the pooler: embeddings and ``depth``
    post-norm layers, each with a cross-attention sub-block to the image tokens.

    ``forward`` with ``image_embeds=None`` is BLIP's ``mode='text'`` (the
    cross-attention sub-blocks are skipped); with image tokens it is
    ``mode='multimodal'`` (cross-attention in every layer). ``causal=True`` makes
    it the decoder's ``is_decoder=True``.
    """

    def __init__(self, cfg: TextConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg, rng)
        self.layers = [PostNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, rng, eps=cfg.eps,
                                     dropout=cfg.dropout, cross_attention=True,
                                     d_context=cfg.encoder_width, init_std=cfg.init_std)
                       for _ in range(cfg.depth)]

    def _check_image(self, image_embeds, batch: int | None, name: str = "image_embeds") -> None:
        check_float(image_embeds, name)
        check_ndim(image_embeds, 3, name, "(B, S, encoder_width)")
        if image_embeds.shape[-1] != self.cfg.encoder_width:
            raise ValueError(f"{name}: expected width encoder_width={self.cfg.encoder_width}, "
                             f"got shape {image_embeds.shape}")
        if batch is not None and image_embeds.shape[0] != batch:
            raise ValueError(f"{name}: batch size {image_embeds.shape[0]} does not match "
                             f"the {batch} texts")

    def forward(self, ids, attention_mask=None, image_embeds=None, image_mask=None,
                causal: bool = False, rng=None):
        """ids (B, T); attention_mask (B, T) of 0/1 (None = no padding);
        image_embeds (B, S, encoder_width) or None (text mode); image_mask (B, S)
        of 0/1 or None; causal adds the decoder's causal mask.
        Returns hidden (B, T, D) and the cache."""
        ids = check_token_matrix(ids, self.cfg.vocab_size, "text ids")
        B, T = ids.shape
        check_rng(rng)
        if attention_mask is not None:
            attention_mask = check_mask01(attention_mask, (B, T), "attention_mask")
            mask = self_attention_mask(attention_mask, causal)  # (B, T, T)
        else:
            mask = causal_mask(T) if causal else None  # (1, T, T) or everything visible
        context_mask = None
        if image_embeds is not None:
            self._check_image(image_embeds, B)
            if image_mask is not None:
                image_mask = check_mask01(image_mask, image_embeds.shape[:2], "image_mask")
                context_mask = padding_mask(image_mask)  # (B, 1, S)
        elif image_mask is not None:
            raise ValueError("image_mask was given without image_embeds (text mode has no "
                             "cross-attention)")

        h, c_emb = self.embeddings.forward(ids, 0, rng)  # (B, T, D)
        c_layers = []
        for layer in self.layers:
            h, c = layer.forward(h, mask, image_embeds, context_mask, rng)  # None: no cross-attn
            c_layers.append(c)
        return h, {"emb": c_emb, "layers": c_layers, "shape": h.shape}

    def backward(self, dhidden, cache):
        """dhidden (B, T, D) -> d_image_embeds (B, S, encoder_width), or None in text mode."""
        if np.shape(dhidden) != cache["shape"]:
            raise ValueError(f"TextTransformer.backward: expected dhidden of shape "
                             f"{cache['shape']}, got {np.shape(dhidden)}")
        d_image = None
        dh = dhidden
        for layer, c in zip(reversed(self.layers), reversed(cache["layers"])):
            dh, dctx = layer.backward(dh, c)  # undoes h = layer(h, image_embeds)
            if dctx is not None:  # image_embeds fan out to the cross-attention of every layer
                d_image = dctx if d_image is None else d_image + dctx
        self.embeddings.backward(dh, cache["emb"])  # undoes h = embeddings(ids)
        return d_image

    def image_kv(self, image_embeds):
        """image_embeds (B, S, encoder_width) -> per layer the cross-attention
        (k, v), each (B, H, S, dh). Generation projects the image once with this
        and reuses the result at every step."""
        self._check_image(image_embeds, None)
        return [layer.cross_attn.project_kv(image_embeds) for layer in self.layers]

    def _check_kv_list(self, kv, batch: int, name: str) -> int:
        """Validates a list over layers of (k, v), each (B, H, L, dh); returns L."""
        H, dh = self.cfg.heads, self.cfg.width // self.cfg.heads
        if not isinstance(kv, (list, tuple)) or len(kv) != len(self.layers):
            raise ValueError(f"{name}: expected a list of {len(self.layers)} (k, v) pairs "
                             f"(one per layer), got {type(kv).__name__} of length "
                             f"{len(kv) if isinstance(kv, (list, tuple)) else '?'}")
        length = None
        for i, pair in enumerate(kv):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"{name}[{i}]: expected a (k, v) pair")
            for a in pair:
                shape = np.shape(a)
                if (len(shape) != 4 or shape[0] != batch or shape[1] != H or shape[3] != dh
                        or (length is not None and shape[2] != length)):
                    raise ValueError(f"{name}[{i}]: expected k and v of shape (B={batch}, H={H}, "
                                     f"L{'' if length is None else '=' + str(length)}, "
                                     f"dh={dh}), got {shape}")
                length = shape[2]
        return length

    def forward_incremental(self, ids, past=None, image_embeds=None, image_kv=None,
                            start: int = 0):
        """Forward only, for generation (the ``past_key_values`` path of med.py).

        ids (B, t): new tokens at positions start..start+t-1. past: None at the
        first call, else the ``present`` of the previous call (per layer the
        self-attention (k, v), each (B, H, P, dh)); ``start`` must equal P.
        The new tokens attend causally to [past | new]. Image tokens are given
        either as image_embeds (B, S, encoder_width) or, projected once per
        generation, as image_kv = ``self.image_kv(image_embeds)``; neither means
        text mode. No padding mask: generation batches are unpadded.
        Returns hidden (B, t, D) and present (per layer the full (k, v)).
        """
        ids = check_token_matrix(ids, self.cfg.vocab_size, "text ids")
        B, t = ids.shape
        if image_embeds is not None and image_kv is not None:
            raise ValueError("forward_incremental: pass image_embeds or image_kv, not both")
        if image_embeds is not None:
            self._check_image(image_embeds, B)
            image_kv = self.image_kv(image_embeds)
        if image_kv is not None:
            self._check_kv_list(image_kv, B, "image_kv")
        n_past = 0 if past is None else self._check_kv_list(past, B, "past")
        if start != n_past:
            raise ValueError(f"forward_incremental: start must equal the number of cached "
                             f"positions ({n_past}), got start={start}")
        mask = causal_mask(t, n_past + t)  # (1, t, P + t): every new token sees the whole past
        h, _ = self.embeddings.forward(ids, start)
        present = []
        for i, layer in enumerate(self.layers):
            h, c = layer.forward(h, mask, past_kv=None if past is None else past[i],
                                 context_kv=None if image_kv is None else image_kv[i])
            present.append(c["present"])
        return h, present


# ---------------------------------------------------------------------------
# The LM head and the decoder
# ---------------------------------------------------------------------------

class LMHead(Module):
    """BERT's prediction head (salesforce/BLIP ``med.py BertLMPredictionHead``):

        t = LayerNorm(GELU(h @ W + b))          (the "transform")
        logits = t @ E^T + bias                 E: the word-embedding table (V, D)

    The output projection is *tied* to the word embeddings (Hugging Face
    ``tie_weights``): this head holds the Embedding module it is given and has
    only ``bias`` of its own for the output layer. Its backward adds into
    ``E.grad``, the same Param the embedding lookup adds into.
    """

    def __init__(self, cfg: TextConfig, word_embeddings: Embedding, rng: np.random.Generator):
        if not isinstance(word_embeddings, Embedding):
            raise TypeError(f"LMHead: expected the word Embedding to tie to, got "
                            f"{type(word_embeddings).__name__}")
        if word_embeddings.weight.shape != (cfg.vocab_size, cfg.width):
            raise ValueError(f"LMHead: expected a word embedding of shape "
                             f"{(cfg.vocab_size, cfg.width)}, got {word_embeddings.weight.shape}")
        self.cfg = cfg
        self.dense = Linear(cfg.width, cfg.width, rng, init_std=cfg.init_std)
        self.act = GELU()
        self.layer_norm = LayerNorm(cfg.width, cfg.eps)
        self.word_embeddings = word_embeddings  # tied, not a copy
        self.bias = Param(np.zeros(cfg.vocab_size))

    @property
    def weight(self) -> Param:
        """The output projection (V, D): the word-embedding Param itself."""
        return self.word_embeddings.weight

    def forward(self, h):
        """h (B, T, D) -> logits (B, T, V)."""
        check_float(h, "LMHead input")
        if h.ndim < 2 or h.shape[-1] != self.cfg.width:
            raise ValueError(f"LMHead input: expected shape (..., {self.cfg.width}), "
                             f"got {h.shape}")
        a, c_dense = self.dense.forward(h)  # (B, T, D) @ (D, D) -> (B, T, D)
        g, c_act = self.act.forward(a)
        t, c_ln = self.layer_norm.forward(g)
        logits = t @ self.weight.data.T + self.bias.data  # (B, T, D) @ (D, V) -> (B, T, V)
        return logits, (c_dense, c_act, c_ln, t)

    def backward(self, dlogits, cache):
        """dlogits (B, T, V) -> dh (B, T, D); adds into bias, the transform and E."""
        c_dense, c_act, c_ln, t = cache
        V, D = self.weight.shape
        d2 = dlogits.reshape(-1, V)
        if self.bias.trainable:
            self.bias.grad += col_sum(d2)  # undoes + bias (broadcast over the B*T rows)
        if self.weight.trainable:  # undoes t @ E^T: (V, N) @ (N, D) -> (V, D)
            self.weight.grad += d2.T @ t.reshape(-1, D)
        dt = dlogits @ self.weight.data  # undoes t @ E^T: (B, T, V) @ (V, D) -> (B, T, D)
        dg = self.layer_norm.backward(dt, c_ln)  # undoes t = LN(g)
        da = self.act.backward(dg, c_act)  # undoes g = GELU(a)
        return self.dense.backward(da, c_dense)  # undoes a = h @ W + b


class TextDecoder(Module):
    """The image-grounded text decoder (salesforce/BLIP ``med.py
    BertLMHeadModel``): ``bert`` run causally with cross-attention, then
    ``head``. The head is tied to ``bert``'s word embeddings.

    ``bert`` may be passed in to share modules with an encoder (see :func:`build_med`).
    """

    def __init__(self, cfg: TextConfig, rng: np.random.Generator,
                 bert: TextTransformer | None = None):
        self.cfg = cfg
        self.bert = bert if bert is not None else TextTransformer(cfg, rng)
        self.head = LMHead(cfg, self.bert.embeddings.word_embeddings, rng)

    def forward(self, ids, attention_mask, image_embeds, image_mask=None, rng=None):
        """ids (B, T) starting with [DEC]; attention_mask (B, T) of 0/1 or None;
        image_embeds (B, S, encoder_width) (None: a text-only causal LM).
        Returns logits (B, T, V): row t scores the token at position t + 1."""
        h, c_bert = self.bert.forward(ids, attention_mask, image_embeds, image_mask,
                                      causal=True, rng=rng)
        logits, c_head = self.head.forward(h)
        return logits, (c_bert, c_head)

    def backward(self, dlogits, cache):
        """dlogits (B, T, V) -> d_image_embeds (B, S, encoder_width) or None."""
        c_bert, c_head = cache
        dh = self.head.backward(dlogits, c_head)  # undoes logits = head(h)
        return self.bert.backward(dh, c_bert)  # undoes h = bert(ids, image)

    def image_kv(self, image_embeds):
        """Per layer the cross-attention (k, v) of the image; see TextTransformer.image_kv."""
        return self.bert.image_kv(image_embeds)

    def forward_incremental(self, ids, past=None, image_kv=None, start: int = 0,
                            image_embeds=None):
        """Forward only, for generation: ids (B, t) at positions start..start+t-1
        -> logits (B, t, V) and present (see TextTransformer.forward_incremental)."""
        h, present = self.bert.forward_incremental(ids, past, image_embeds=image_embeds,
                                                   image_kv=image_kv, start=start)
        logits, _ = self.head.forward(h)
        return logits, present


# ---------------------------------------------------------------------------
# Encoder-decoder sharing
# ---------------------------------------------------------------------------

def build_med(cfg: TextConfig, rng: np.random.Generator,
              sharing: str = "all_but_self_attention"):
    """Build BLIP's text encoder and text decoder -> (encoder, decoder).

    ``"all_but_self_attention"`` (BLIP): salesforce/BLIP ``blip_pretrain.py``
    calls ``tie_encoder_decoder_weights(encoder, decoder.bert, '',
    '/attention')``, which ties every weight whose module path does not contain
    ``/attention``: the embeddings and, per layer, the cross-attention, its
    LayerNorm, the FFN and its LayerNorm (``/crossattention`` has no slash before
    "attention"). Here the decoder holds the *same module objects* for those and
    its own ``self_attn`` and ``self_attn_ln``.
    ``"all"``: ``decoder.bert`` is the encoder. ``"none"``: nothing is shared.
    In every mode the LM head's output weight is the word-embedding Param the
    decoder reads, so with sharing one (V, D) matrix serves the encoder input,
    the decoder input and the LM output.
    """
    if sharing not in SHARING_MODES:
        raise ValueError(f"build_med: sharing must be one of {SHARING_MODES}, got {sharing!r}")
    encoder = TextTransformer(cfg, rng)
    if sharing == "all":
        return encoder, TextDecoder(cfg, rng, bert=encoder)
    bert = TextTransformer(cfg, rng)
    if sharing == "all_but_self_attention":  # Exercise 8.1 (notebooks/08_med_pretraining_step)
        ### BEGIN SOLUTION
        bert.embeddings = encoder.embeddings
        for enc_layer, dec_layer in zip(encoder.layers, bert.layers):
            for name in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
                setattr(dec_layer, name, getattr(enc_layer, name))
        ### END SOLUTION
    return encoder, TextDecoder(cfg, rng, bert=bert)


def shared_parameter_names(encoder: Module, decoder: Module) -> list[str]:
    """Names (as in ``encoder.named_params()``) of the Params both modules hold."""
    in_decoder = {id(p) for p in decoder.params()}
    return [name for name, p in encoder.named_params() if id(p) in in_decoder]


def parameter_count_table(cfg: TextConfig, rng: np.random.Generator | None = None) -> list[dict]:
    """One row per sharing mode: the number of scalars in the encoder, in the
    decoder but not the encoder, shared by both, and in total (each Param once)."""
    rng = np.random.default_rng(0) if rng is None else rng
    rows = []
    for mode in SHARING_MODES:
        encoder, decoder = build_med(cfg, rng, mode)
        in_encoder = {id(p) for p in encoder.params()}
        dec = decoder.params()
        decoder_only = sum(p.size for p in dec if id(p) not in in_encoder)
        shared = sum(p.size for p in dec if id(p) in in_encoder)
        rows.append({"mode": mode, "encoder_params": encoder.param_count(),
                     "decoder_only_params": decoder_only, "shared_params": shared,
                     "total_params": encoder.param_count() + decoder_only})
    return rows
