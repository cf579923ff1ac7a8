"""BLIP-2's Querying Transformer (Q-Former).

A BERT-style transformer whose input is a set of ``num_queries`` *learned query
vectors*, optionally followed by text. Mirrors salesforce/LAVIS
``lavis/models/blip2_models/Qformer.py`` (``BertEmbeddings``, ``BertLayer``,
``BertModel``) and the way ``blip2_qformer.py`` calls it:

* embeddings: queries get no position embedding; text gets word + position
  embeddings with positions starting at 0 *for the text*; then one LayerNorm
  over ``cat(queries, text)`` (LAVIS ``BertEmbeddings``; Hugging Face
  ``qformer.layernorm``) and dropout;
* every layer (post-norm, as BERT): one self-attention shared by queries and
  text; in layers ``i % cross_attention_freq == 0`` a cross-attention to the
  image features **for the query positions only**; then two separate
  feed-forward networks, ``ffn_query`` for the query positions and ``ffn`` for
  the text positions (LAVIS ``intermediate_query``/``output_query`` and
  ``intermediate``/``output``).

Who sees whom is set by the self-attention mask, one per use (BLIP-2 paper,
figure 2; ``True`` = may attend; Q queries, T text tokens, p = text padding):

=========  ==========================================  ============================
mode       rows of queries                             rows of text
=========  ==========================================  ============================
queries    all queries (no text in the sequence)       --
text       --                                          all real text (no queries)
itc        all queries                                 all real text
itm        all queries and all real text               all queries and all real text
itg        all queries                                 all queries, text j <= i
=========  ==========================================  ============================

"queries" and "text" are the two separate passes LAVIS runs for ITC (the
image side and the text side); "itc" runs both in one sequence with the
block-diagonal mask, which gives exactly the same numbers. "itg" is the
UniLM-style "multimodal causal" mask.

ITG in LAVIS does not rerun the queries: it passes the text with the
``past_key_values`` of the ITC query pass (each layer's query keys and values)
and a causal mask over the text with the query columns prepended
(``Qformer.py get_extended_attention_mask``). minblip's ``mode="itg"`` instead
runs queries and text together under the dense UniLM mask. The forward is the
same function: under that mask the query rows see only queries, so they
compute exactly the hidden states (and keys and values) of the query pass, and
the text rows see the same keys and values as with the cache. So the gradient
is the same too; it reaches the query branch through this pass's own copy of
the query computation instead of through the cache. (With dropout on, LAVIS
reuses the query pass's dropout masks and minblip draws new ones.)
:meth:`QFormer.query_kv` and :meth:`QFormer.forward_incremental` implement
the cached formulation (forward only), for captioning and for the test that
the two agree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .attention import MultiHeadAttention, causal_mask
from .core import (Module, Param, check_float, check_ids, check_mask01, check_ndim, check_rng,
                   check_token_matrix)
from .layers import Dropout, Embedding, LayerNorm
from .transformer import FeedForward

MODES = ("queries", "text", "itc", "itm", "itg")


@dataclass
class QFormerConfig:
    """Sizes of the Q-Former. The defaults are a toy; BLIP-2's is BERT-base
    (width 768, depth 12, heads 12, mlp_dim 3072, max_positions 512, eps
    1e-12, dropout 0.1) with 32 queries, cross-attention every 2nd layer and
    encoder_width 1408 (EVA ViT-g) (LAVIS ``blip2.py init_Qformer``)."""

    vocab_size: int
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 256
    num_queries: int = 8
    cross_attention_freq: int = 2
    encoder_width: int = 64     # width of the image features the queries cross-attend to
    max_positions: int = 24     # text positions (the queries have none)
    eps: float = 1e-12
    dropout: float = 0.0
    init_std: float = 0.02
    pad_id: int = 0             # the [PAD] row of the word embeddings starts at zero

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "heads", "mlp_dim", "num_queries",
                     "cross_attention_freq", "encoder_width", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"QFormerConfig.{name}: expected a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"QFormerConfig: heads must divide width, got width={self.width}, "
                             f"heads={self.heads}")
        if not self.eps > 0:
            raise ValueError(f"QFormerConfig.eps: expected a positive number, got {self.eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"QFormerConfig.dropout: expected a value in [0, 1), "
                             f"got {self.dropout}")
        if not self.init_std >= 0:
            raise ValueError(f"QFormerConfig.init_std: expected >= 0, got {self.init_std}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"QFormerConfig.pad_id: expected an id in [0, {self.vocab_size}), "
                             f"got {self.pad_id}")

    def to_dict(self) -> dict:
        return asdict(self)


def qformer_mask(mode: str, num_queries: int, text_mask=None):
    """The dense self-attention mask of one Q-Former use.

    mode: one of ``MODES``; num_queries: Q (0 for a sequence without queries);
    text_mask: (B, T) of 0/1 (1 = real token) or None when there is no text.
    Returns a bool array (B, Q+T, Q+T) (B = 1 without text): entry (i, j) says
    whether position i may attend to position j. Positions 0..Q-1 are the
    queries, Q..Q+T-1 the text. Padded text positions are never attended to;
    the queries are never padding.
    """
    if mode not in MODES:
        raise ValueError(f"Q-Former mode: expected one of {MODES}, got {mode!r}")
    if isinstance(num_queries, bool) or not isinstance(num_queries, (int, np.integer)) \
            or num_queries < 0:
        raise ValueError(f"num_queries: expected an int >= 0, got {num_queries!r}")
    Q = int(num_queries)
    if text_mask is None:
        valid = np.ones((1, 0), dtype=bool)
    else:
        text_mask = np.asarray(text_mask)
        if text_mask.ndim != 2 or not np.all((text_mask == 0) | (text_mask == 1)):
            raise ValueError(f"text mask: expected a (B, T) array of 0/1, got shape "
                             f"{text_mask.shape} with values {np.unique(text_mask)[:5].tolist()}")
        valid = text_mask.astype(bool)
    # valid (B, T) bool: True at the real text tokens
    ### BEGIN SOLUTION
    B, T = valid.shape
    key_ok = np.concatenate([np.ones((B, Q), dtype=bool), valid], axis=1)  # (B, Q+T)
    mask = np.repeat(key_ok[:, None, :], Q + T, axis=1)  # (B, Q+T, Q+T): padding columns off
    is_query = np.arange(Q + T) < Q
    if mode in ("queries", "text", "itc"):
        mask &= is_query[:, None] == is_query[None, :]  # queries and text never meet
    elif mode == "itg":
        i = np.arange(Q + T)
        # query rows see query columns; text rows see query columns and text j <= i
        mask &= is_query[None, :] | (~is_query[:, None] & (i[None, :] <= i[:, None]))
    return mask
    ### END SOLUTION


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _check_text(ids, attention_mask, vocab_size: int):
    ids = check_token_matrix(ids, vocab_size, "Q-Former text ids")
    if attention_mask is None:
        return ids, np.ones(ids.shape, dtype=np.int64)
    return ids, check_mask01(attention_mask, ids.shape, "Q-Former attention_mask")


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------

class QFormerEmbeddings(Module):
    """LAVIS ``Qformer.py BertEmbeddings``: text -> word + position embedding;
    queries pass through as they are; ``LayerNorm(cat(queries, text))`` -> dropout.

    A LayerNorm acts on each row alone, so normalising the concatenation is the
    same as normalising queries and text separately with the same gamma, beta.
    """

    def __init__(self, cfg: QFormerConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.width, rng, init_std=cfg.init_std)
        self.word_embeddings.weight.data[cfg.pad_id] = 0.0  # nn.Embedding(padding_idx=0) init
        self.position_embeddings = Embedding(cfg.max_positions, cfg.width, rng,
                                             init_std=cfg.init_std)
        self.layer_norm = LayerNorm(cfg.width, cfg.eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, query_embeds=None, ids=None, start: int = 0, rng=None):
        """query_embeds (B, Q, D) or None; ids (B, T) or None, text token t at
        position ``start + t``. Returns (B, Q+T, D) and the cache."""
        parts, c_w, c_p = [], None, None
        Q = 0 if query_embeds is None else query_embeds.shape[1]
        if query_embeds is not None:
            parts.append(query_embeds)
        if ids is not None:
            T = ids.shape[1]
            if start < 0 or start + T > self.cfg.max_positions:
                raise ValueError(f"Q-Former text positions {start}..{start + T - 1} do not fit "
                                 f"max_positions={self.cfg.max_positions} (got {T} tokens "
                                 f"starting at {start})")
            w, c_w = self.word_embeddings.forward(ids)  # (B, T, D)
            p, c_p = self.position_embeddings.forward(np.arange(start, start + T))  # (T, D)
            parts.append(w + p)  # p broadcast over the batch
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # (B, Q+T, D)
        e, c_ln = self.layer_norm.forward(x)
        e, c_drop = self.dropout.forward(e, rng)
        return e, (Q, c_w, c_p, c_ln, c_drop)

    def backward(self, demb, cache):
        """demb (B, Q+T, D) -> d query_embeds (B, Q, D), or None without queries;
        accumulates into the two tables (ids have no gradient)."""
        Q, c_w, c_p, c_ln, c_drop = cache
        dx = self.dropout.backward(demb, c_drop)  # undoes the dropout
        dx = self.layer_norm.backward(dx, c_ln)  # undoes e = LN(x)
        if c_w is not None:
            dtext = dx[:, Q:]  # undoes the concatenation: the text part
            self.position_embeddings.backward(dtext.sum(axis=0), c_p)  # undoes the broadcast over B
            self.word_embeddings.backward(dtext, c_w)  # scatter-add over repeated ids
        return dx[:, :Q] if Q else None


# ---------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------

class QFormerLayer(Module):
    """LAVIS ``Qformer.py BertLayer``, post-norm:

        h      = LN_sa(x + SelfAttn(x; mask))                  all Q+T rows, shared weights
        h_q    = LN_ca(h_q + CrossAttn(h_q, image))            query rows only, if this layer has it
        y_q    = LN_ffn_query(h_q + FFN_query(h_q))            query rows
        y_t    = LN_ffn(h_t + FFN(h_t))                        text rows
        y      = cat(y_q, y_t)
    """

    def __init__(self, cfg: QFormerConfig, index: int, rng: np.random.Generator):
        d, std = cfg.width, cfg.init_std
        self.self_attn = MultiHeadAttention(d, cfg.heads, rng, dropout=cfg.dropout, init_std=std)
        self.self_attn_ln = LayerNorm(d, cfg.eps)
        self.cross_attn = self.cross_attn_ln = None
        if index % cfg.cross_attention_freq == 0:  # LAVIS BertLayer: layer_num % freq == 0
            self.cross_attn = MultiHeadAttention(d, cfg.heads, rng, d_context=cfg.encoder_width,
                                                 dropout=cfg.dropout, init_std=std)
            self.cross_attn_ln = LayerNorm(d, cfg.eps)
        self.ffn = FeedForward(d, cfg.mlp_dim, rng, init_std=std)
        self.ffn_ln = LayerNorm(d, cfg.eps)
        self.ffn_query = FeedForward(d, cfg.mlp_dim, rng, init_std=std)
        self.ffn_query_ln = LayerNorm(d, cfg.eps)
        self.drop = Dropout(cfg.dropout)

    def _ffn_block(self, ffn, ln, h, rng):
        f, c_ffn = ffn.forward(h)
        f, c_d = self.drop.forward(f, rng)
        y, c_ln = ln.forward(h + f)
        return y, (c_ffn, c_d, c_ln)

    def _ffn_block_backward(self, ffn, ln, dy, cache):
        c_ffn, c_d, c_ln = cache
        ds = ln.backward(dy, c_ln)  # undoes y = LN(h + FFN(h))
        return ds + ffn.backward(self.drop.backward(ds, c_d), c_ffn)  # h fanned out to both terms

    def forward(self, x, num_queries: int, mask=None, image_embeds=None, rng=None,
                past_kv=None):
        """x (B, Q+T, D), the first ``num_queries`` rows are queries; mask
        broadcastable to (B, Q+T, [P+] Q+T); image_embeds (B, S, encoder_width),
        required when there are query rows and this layer cross-attends.
        ``past_kv`` (forward only, for the cached formulation): keys and values
        prepended to the self-attention's own. Returns y (B, Q+T, D) and the cache."""
        Q = num_queries
        a, c_sa = self.self_attn.forward(x, mask=mask, rng=rng, past_kv=past_kv)
        a, c_d1 = self.drop.forward(a, rng)
        h, c_ln1 = self.self_attn_ln.forward(x + a)
        hq, ht = h[:, :Q], h[:, Q:]  # (B, Q, D), (B, T, D)
        c_ca = c_d2 = c_ln2 = c_fq = c_ft = None
        if Q and self.cross_attn is not None:
            ca, c_ca = self.cross_attn.forward(hq, image_embeds, rng=rng)  # (B, Q, D), keys: image
            ca, c_d2 = self.drop.forward(ca, rng)
            hq, c_ln2 = self.cross_attn_ln.forward(hq + ca)
        outs = []
        if Q:
            yq, c_fq = self._ffn_block(self.ffn_query, self.ffn_query_ln, hq, rng)
            outs.append(yq)
        if ht.shape[1]:
            yt, c_ft = self._ffn_block(self.ffn, self.ffn_ln, ht, rng)
            outs.append(yt)
        y = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
        cache = (Q, c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_fq, c_ft)
        return y, {"parts": cache, "present": c_sa["present"]}

    def backward(self, dy, cache):
        """dy (B, Q+T, D) -> (dx (B, Q+T, D), d image_embeds or None)."""
        Q, c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_fq, c_ft = cache["parts"]
        dh = np.zeros_like(dy)
        if c_fq is not None:  # undoes y_q = LN(h_q + FFN_query(h_q))
            dh[:, :Q] = self._ffn_block_backward(self.ffn_query, self.ffn_query_ln, dy[:, :Q], c_fq)
        if c_ft is not None:  # undoes y_t = LN(h_t + FFN(h_t))
            dh[:, Q:] = self._ffn_block_backward(self.ffn, self.ffn_ln, dy[:, Q:], c_ft)
        d_image = None
        if c_ca is not None:  # undoes h_q = LN(h_q0 + CrossAttn(h_q0, image))
            ds = self.cross_attn_ln.backward(dh[:, :Q], c_ln2)
            dhq0, d_image = self.cross_attn.backward(self.drop.backward(ds, c_d2), c_ca)
            dh[:, :Q] = ds + dhq0
        ds = self.self_attn_ln.backward(dh, c_ln1)  # undoes h = LN(x + SelfAttn(x))
        dx, _ = self.self_attn.backward(self.drop.backward(ds, c_d1), c_sa)
        return ds + dx, d_image


# ---------------------------------------------------------------------------
# The Q-Former
# ---------------------------------------------------------------------------

class QFormer(Module):
    """The learned queries, the embeddings and ``depth`` Q-Former layers.

    ``query_tokens`` (1, Q, D) ~ N(0, init_std) is one Param broadcast to every
    image of the batch (LAVIS ``query_tokens.expand(B, -1, -1)``), so its
    gradient is the sum over the batch. The query FFNs start as copies of the
    text FFNs (``blip2_qformer.py``: ``intermediate_query`` <- ``intermediate``
    after loading BERT) and are trained separately from then on.
    """

    def __init__(self, cfg: QFormerConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.query_tokens = Param(rng.normal(0.0, cfg.init_std, (1, cfg.num_queries, cfg.width)))
        self.embeddings = QFormerEmbeddings(cfg, rng)
        self.layers = [QFormerLayer(cfg, i, rng) for i in range(cfg.depth)]
        for layer in self.layers:
            for dst, src in zip(layer.ffn_query.params() + layer.ffn_query_ln.params(),
                                layer.ffn.params() + layer.ffn_ln.params()):
                dst.data[...] = src.data  # a copy of the values: the two stay separate Params

    # ---- checks -----------------------------------------------------------------------
    def _check_image(self, image_embeds, batch: int | None):
        check_float(image_embeds, "Q-Former image_embeds")
        check_ndim(image_embeds, 3, "Q-Former image_embeds", "(B, S, encoder_width)")
        if image_embeds.shape[-1] != self.cfg.encoder_width:
            raise ValueError(f"Q-Former image_embeds: expected width encoder_width="
                             f"{self.cfg.encoder_width}, got shape {image_embeds.shape}")
        if batch is not None and image_embeds.shape[0] != batch:
            raise ValueError(f"Q-Former image_embeds: batch size {image_embeds.shape[0]} does "
                             f"not match the {batch} texts")

    def attention_mask(self, mode: str, Q: int, attention_mask=None):
        """The dense (B, Q+T, Q+T) bool self-attention mask of ``mode`` for Q
        queries and a text mask (B, T) of 0/1 (None: no text). See :func:`qformer_mask`."""
        return qformer_mask(mode, Q, attention_mask)

    # ---- forward / backward --------------------------------------------------------------
    def forward(self, image_embeds=None, ids=None, attention_mask=None, mode: str = "itc",
                use_queries: bool = True, rng=None):
        """Run the Q-Former in one of its uses.

        image_embeds (B, S, encoder_width): the (frozen, ``ln_vision``-normed)
        image features; needed whenever the queries take part, refused otherwise.
        ids (B, T) token ids ([CLS] first for "text"/"itc"/"itm", [DEC] for
        "itg"); attention_mask (B, T) of 0/1 (None = no padding).
        mode: "queries" (queries only, cross-attending to the image: the image
        side of ITC and the stage-2 input), "text" (text only: the text side of
        ITC), "itc" (both in one sequence, never meeting), "itm" (bidirectional)
        or "itg" (UniLM mask). ``use_queries=False`` drops the queries and keeps
        the text rows and columns of the mode's mask ("text" is "itc" without
        queries; "itg" without queries is a plain causal text model).
        rng drives dropout; None means evaluation.

        Returns hidden (B, Q, D) for "queries", (B, T, D) for "text" or without
        queries, (B, Q+T, D) otherwise; and the cache.
        """
        if mode not in MODES:
            raise ValueError(f"Q-Former mode: expected one of {MODES}, got {mode!r}")
        check_rng(rng)
        has_queries = bool(use_queries) and mode != "text"
        if mode == "queries":
            if not use_queries:
                raise ValueError("Q-Former mode 'queries' with use_queries=False has no input")
            if ids is not None or attention_mask is not None:
                raise ValueError("Q-Former mode 'queries' takes no text; use 'itc', 'itm' or "
                                 "'itg' to run queries with text")
            text_mask = None
        else:
            if ids is None:
                raise ValueError(f"Q-Former mode {mode!r} needs text ids (B, T)")
            ids, text_mask = _check_text(ids, attention_mask, self.cfg.vocab_size)
        batch = None if ids is None else ids.shape[0]
        if has_queries:
            if image_embeds is None:
                raise ValueError(f"Q-Former mode {mode!r}: the queries cross-attend to the "
                                 f"image, so image_embeds (B, S, {self.cfg.encoder_width}) "
                                 f"is needed")
            self._check_image(image_embeds, batch)
            batch = image_embeds.shape[0]
            image_embeds = image_embeds.astype(self.dtype, copy=False)
        elif image_embeds is not None:
            raise ValueError(f"Q-Former mode {mode!r} without queries: only query positions "
                             f"cross-attend, so image_embeds must be None")

        Q = self.cfg.num_queries if has_queries else 0
        queries = None
        if has_queries:  # one (1, Q, D) Param for every image of the batch
            queries = np.broadcast_to(self.query_tokens.data, (batch, Q, self.cfg.width))
        mask = qformer_mask(mode, Q, text_mask)  # (B, Q+T, Q+T)
        h, c_emb = self.embeddings.forward(queries, ids, 0, rng)  # (B, Q+T, D)
        c_layers = []
        for layer in self.layers:
            h, c = layer.forward(h, Q, mask, image_embeds, rng)
            c_layers.append(c)
        return h, {"emb": c_emb, "layers": c_layers, "shape": h.shape, "Q": Q}

    def backward(self, dhidden, cache):
        """dhidden (shape of the forward's hidden) -> d image_embeds (B, S,
        encoder_width), or None when no image was used. Adds into every Param
        the forward used, ``query_tokens`` summed over the batch."""
        if np.shape(dhidden) != cache["shape"]:
            raise ValueError(f"QFormer.backward: expected dhidden of shape {cache['shape']}, "
                             f"got {np.shape(dhidden)}")
        d_image = None
        dh = dhidden
        for layer, c in zip(reversed(self.layers), reversed(cache["layers"])):
            dh, dctx = layer.backward(dh, c)  # undoes h = layer(h, image_embeds)
            if dctx is not None:  # the image fans out to every cross-attention layer
                d_image = dctx if d_image is None else d_image + dctx
        dq = self.embeddings.backward(dh, cache["emb"])  # undoes h = embeddings(queries, ids)
        if dq is not None and self.query_tokens.trainable:
            self.query_tokens.grad += dq.sum(axis=0, keepdims=True)  # undoes broadcast_to over B
        return d_image

    # ---- the cached formulation of ITG (forward only) -------------------------------------
    def query_kv(self, image_embeds):
        """image_embeds (B, S, encoder_width) -> per layer the self-attention
        (k, v) of the query positions, each (B, H, Q, dh): LAVIS's
        ``query_output.past_key_values`` from the ITC image pass."""
        _, cache = self.forward(image_embeds, mode="queries")
        return [c["present"] for c in cache["layers"]]

    def forward_incremental(self, ids, query_kv, past=None, start: int = 0):
        """Forward only: text ids (B, t) at text positions start..start+t-1,
        each attending to every query (through ``query_kv``, from
        :meth:`query_kv`), to the ``past`` text keys and values and causally to
        the new tokens. This is LAVIS's ITG call (``Qformer(ids,
        past_key_values=query_kv)``) and its captioning loop. No padding mask.

        past: None, or the ``present`` of the previous call (per layer the text
        (k, v), each (B, H, start, dh)). Returns hidden (B, t, D) and present.
        """
        ids = check_ids(ids, self.cfg.vocab_size, "Q-Former text ids")
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"Q-Former text ids: expected (B, t) with t >= 1, got {ids.shape}")
        B, t = ids.shape
        H, dh = self.cfg.heads, self.cfg.width // self.cfg.heads
        for name, kv in (("query_kv", query_kv), ("past", past)):
            if kv is None and name == "past":
                continue
            if not isinstance(kv, (list, tuple)) or len(kv) != len(self.layers) or any(
                    len(pair) != 2 or np.ndim(pair[0]) != 4 or np.shape(pair[0])[0] != B
                    or np.shape(pair[0])[1] != H or np.shape(pair[0])[3] != dh for pair in kv):
                raise ValueError(f"Q-Former forward_incremental: {name} must be a list of "
                                 f"{len(self.layers)} (k, v) pairs of shape (B={B}, H={H}, "
                                 f"L, dh={dh})")
        n_past = 0 if past is None else past[0][0].shape[2]
        if start != n_past:
            raise ValueError(f"Q-Former forward_incremental: start must equal the number of "
                             f"cached text positions ({n_past}), got start={start}")
        Q = query_kv[0][0].shape[2]
        mask = causal_mask(t, Q + n_past + t)  # (1, t, Q+P+t): queries and past all visible
        h, _ = self.embeddings.forward(None, ids, start)  # text positions start at 0
        present = []
        for i, layer in enumerate(self.layers):
            qk, qv = query_kv[i]
            prefix = (qk, qv) if past is None else (np.concatenate([qk, past[i][0]], axis=2),
                                                    np.concatenate([qv, past[i][1]], axis=2))
            h, c = layer.forward(h, 0, mask, past_kv=prefix)  # text rows only: no cross-attention
            k, v = c["present"]
            present.append((k[:, :, Q:], v[:, :, Q:]))  # keep the text part; queries stay fixed
        return h, present
