"""A small decoder-only language model in the style of OPT, the frozen LLM of BLIP-2.

BLIP-2 stage 2 (salesforce/LAVIS ``lavis/models/blip2_models/blip2_opt.py``) puts a
frozen OPT (Hugging Face ``OPTForCausalLM``) behind the Q-Former. This module is
that OPT, shrunk to the synthetic world:

    e = [prefix_embeds | embed_tokens(ids)]                        (B, P+T, E)
    x = project_in(e) + embed_positions[offset .. offset+P+T-1]   (B, P+T, D)
    x = block(x) for each pre-norm causal block      (OPTDecoderLayer, do_layer_norm_before)
    h = project_out(final_layer_norm(x))                           (B, P+T, E)
    logits = h @ embed_tokens.weight^T              (lm_head tied to the token table)

E is the width of the token embeddings, OPT's ``word_embed_proj_dim``. It equals
the model width D in every OPT that BLIP-2 uses, and then ``project_in`` and
``project_out`` do not exist (identities); the smaller OPTs (350m) embed tokens
at E = 512 inside a D = 1024 model and project in and out without bias.

``prefix_embeds`` are soft prompts: vectors that sit where token embeddings would
be. BLIP-2 builds ``inputs_embeds = cat(projected queries, embed_tokens(ids))``
and hands OPT the concatenation; the positions therefore run over prefix and
text together, and the queries sit inside the causal mask (query i sees queries
<= i, every text token sees every query).

Kept from OPT: learned absolute positions, pre-norm blocks with LayerNorm eps
1e-5, a final LayerNorm, an output head tied to the token embeddings with no
bias, dropout after the embeddings and in every block, plain cross-entropy (no
label smoothing) with HF's shift (logits at position t score token t + 1).

The blocks are ``minblip.transformer.PreNormBlock`` (the ViT's block) built
with OPT's ReLU feed-forward (``activation_function "relu"``);
``LMConfig(activation="gelu")`` keeps the ViT's exact GELU.

Positions: OPT's ``OPTLearnedPositionalEmbedding`` has two rows more than
``max_position_embeddings`` and reads position t from row t + 2 (a leftover of
fairseq's padding offset); ``LMConfig(position_offset=2)`` does the same, for
checkpoints. minblip's own small LM uses offset 0: position t is row t.

Departures, all deliberate:

* OPT derives positions from the cumulative sum of the attention mask, so a
  left-padded row starts counting at its first real token. Here position t is
  always t. With right padding (minblip's) the two agree on every real token.
* OPT's tokenizer is byte-level BPE with ``</s>`` (id 2) as BOS, and BLIP-2
  appends "\\n" to every caption and stops generating at "\\n". Here the
  tokenizer is ``minblip.tokenizer.Tokenizer`` over whole words: ``[CLS]``
  is the BOS token, ``[SEP]`` the EOS token, ``[PAD]`` (id 0) the padding.

Freezing is the core contract's (``lm.freeze()``): a frozen model's Params are
in no ``params()``, and its backward, the same code as when it trains, returns
the gradient of the soft prompt and adds into no Param.

Also here: :func:`lm_step`, the causal-LM loss with its mirrored backward, and
:class:`SoftPromptDecoder`, which lets ``minblip.generation`` decode after a
soft prompt (greedy, beam, nucleus; keys and values cached, the soft prompt's
computed once).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import causal_mask, padding_mask
from .core import (Module, check_float, check_mask01, check_ndim, check_rng,
                   check_token_matrix)
from .layers import Dropout, Embedding, LayerNorm, Linear
from .objectives import NextTokenLoss, causal_lm_targets
from .transformer import PreNormBlock

ACTIVATIONS = ("relu", "gelu")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass
class LMConfig:
    """Sizes of the language model. The defaults are a toy; OPT-2.7B (BLIP-2's
    smallest OPT) is vocab_size 50272, width 2560, depth 32, heads 32, mlp_dim
    10240, max_positions 2048, dropout 0.1, init_std 0.02."""

    vocab_size: int
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 256
    max_positions: int = 48  # must cover the soft prompt plus the text
    eps: float = 1e-5  # OPT's nn.LayerNorm default
    dropout: float = 0.0
    init_std: float = 0.02
    pad_id: int = 0
    activation: str = "relu"  # OPT's; "gelu" is the exact GELU of the ViT block
    position_offset: int = 0  # OPT checkpoints: 2 (position t is row t + 2)
    word_embed_dim: int | None = None  # E, OPT's word_embed_proj_dim; None: E = width
    final_norm: bool = True  # OPT's final_layer_norm (older fine-tuned OPTs have none)

    @property
    def token_width(self) -> int:
        """E, the width of the token embeddings and of a soft prompt."""
        return self.width if self.word_embed_dim is None else self.word_embed_dim

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LMConfig.activation: expected one of {ACTIVATIONS}, "
                             f"got {self.activation!r}")
        for name in ("vocab_size", "width", "depth", "heads", "mlp_dim", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"LMConfig.{name}: expected a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"LMConfig: heads must divide width, got width={self.width}, "
                             f"heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LMConfig.dropout: expected a value in [0, 1), got {self.dropout}")
        if not self.eps > 0:
            raise ValueError(f"LMConfig.eps: expected a positive number, got {self.eps}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"LMConfig.pad_id: expected an id in [0, {self.vocab_size}), "
                             f"got {self.pad_id}")
        if (isinstance(self.position_offset, bool)
                or not isinstance(self.position_offset, (int, np.integer))
                or self.position_offset < 0):
            raise ValueError(f"LMConfig.position_offset: expected an int >= 0, got "
                             f"{self.position_offset!r}")
        E = self.word_embed_dim
        if E is not None and (isinstance(E, bool) or not isinstance(E, (int, np.integer))
                              or E < 1):
            raise ValueError(f"LMConfig.word_embed_dim: expected a positive int or None, "
                             f"got {E!r}")


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class LanguageModel(Module):
    """OPT-style decoder-only LM (Hugging Face ``OPTForCausalLM``).

    Attributes follow OPT's names: ``embed_tokens`` (V, E), ``embed_positions``
    (position_offset + max_positions, D), ``project_in`` (E -> D) and
    ``project_out`` (D -> E) or None when E = D, ``layers`` (pre-norm causal
    blocks), ``final_layer_norm`` (or None). The output head is
    ``embed_tokens.weight`` itself (``lm_head`` tied, no bias).
    """

    def __init__(self, cfg: LMConfig, rng: np.random.Generator):
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"LanguageModel: expected an LMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        D, E = cfg.width, cfg.token_width
        self.embed_tokens = Embedding(cfg.vocab_size, E, rng, init_std=cfg.init_std)
        # nn.Embedding(padding_idx=pad): HF's _init_weights zeroes that row
        self.embed_tokens.weight.data[cfg.pad_id] = 0.0
        self.embed_positions = Embedding(cfg.position_offset + cfg.max_positions, D, rng,
                                         init_std=cfg.init_std)
        # OPTDecoder: nn.Linear(E, D, bias=False) in, nn.Linear(D, E, bias=False) out
        self.project_in = (Linear(E, D, rng, bias=False, init_std=cfg.init_std)
                           if E != D else None)
        self.project_out = (Linear(D, E, rng, bias=False, init_std=cfg.init_std)
                            if E != D else None)
        self.dropout = Dropout(cfg.dropout)
        self.layers = [PreNormBlock(D, cfg.heads, cfg.mlp_dim, rng, eps=cfg.eps,
                                    dropout=cfg.dropout, init_std=cfg.init_std,
                                    activation=cfg.activation)
                       for _ in range(cfg.depth)]
        self.final_layer_norm = LayerNorm(D, cfg.eps) if cfg.final_norm else None

    # ---- forward ------------------------------------------------------------------
    def _checked_embeds(self, x, name: str, length: str):
        """x (B, length, E) float -> x in the model's dtype, or a named error."""
        E = self.cfg.token_width
        check_float(x, name)
        check_ndim(x, 3, name, f"(B, {length}, {E})")
        if x.shape[-1] != E:
            raise ValueError(f"{name}: expected width {E} (the LM's token width), got "
                             f"shape {x.shape}")
        return x.astype(self.dtype, copy=False)

    def _embed(self, ids, inputs_embeds, prefix_embeds):
        """Validates the inputs and builds [prefix | tokens]; returns the pieces."""
        if ids is not None and inputs_embeds is not None:
            raise ValueError("LanguageModel: give ids or inputs_embeds, not both")
        c_tok = None
        if ids is not None:
            ids = check_token_matrix(ids, self.cfg.vocab_size, "LanguageModel ids")
            tok, c_tok = self.embed_tokens.forward(ids)  # (B, T) -> (B, T, E)
        elif inputs_embeds is not None:
            tok = self._checked_embeds(inputs_embeds, "inputs_embeds", "T")
        else:
            tok = None
        if prefix_embeds is not None:
            prefix_embeds = self._checked_embeds(prefix_embeds, "prefix_embeds", "P")
            if tok is not None and tok.shape[0] != prefix_embeds.shape[0]:
                raise ValueError(f"prefix_embeds: batch size {prefix_embeds.shape[0]} does not "
                                 f"match the {tok.shape[0]} texts")
        if tok is None and prefix_embeds is None:
            raise ValueError("LanguageModel: expected ids, inputs_embeds or prefix_embeds, "
                             "got none")
        return tok, c_tok, prefix_embeds

    def _positions(self, start: int, length: int):
        """Rows of the position table for positions start..start+length-1 -> ((length, D),
        cache). OPT checkpoints read position t from row t + position_offset."""
        if start + length > self.cfg.max_positions:
            raise ValueError(f"LanguageModel: positions up to {start + length - 1} exceed "
                             f"max_positions={self.cfg.max_positions}")
        offset = self.cfg.position_offset
        return self.embed_positions.forward(np.arange(start + offset, start + offset + length))

    def _head(self, x):
        """x (B, L, D) after the blocks -> (logits (B, L, V), cache, h (B, L, E)): final
        LayerNorm, project_out, then the tied output layer reading h."""
        c_ln = c_out = None
        if self.final_layer_norm is not None:
            x, c_ln = self.final_layer_norm.forward(x)
        if self.project_out is not None:
            x, c_out = self.project_out.forward(x)  # (B, L, D) @ (D, E) -> (B, L, E)
        logits = x @ self.embed_tokens.weight.data.T  # (B, L, E) @ (E, V) -> (B, L, V)
        return logits, (c_ln, c_out), x

    def forward(self, ids=None, attention_mask=None, inputs_embeds=None, prefix_embeds=None,
                rng=None):
        """ids (B, T) int, or inputs_embeds (B, T, E) float; attention_mask (B, T) of
        0/1 for the text (None: no padding); prefix_embeds (B, P, E) soft prompts,
        always attended (BLIP-2's ``ones(B, 32)`` mask for the queries).
        ``rng`` drives dropout (None: evaluation).

        Returns logits (B, P + T, V) over the whole sequence and the cache.
        Row t scores the token at position t + 1.
        """
        check_rng(rng)
        tok, c_tok, prefix = self._embed(ids, inputs_embeds, prefix_embeds)
        parts = [a for a in (prefix, tok) if a is not None]
        B = parts[0].shape[0]
        P = 0 if prefix is None else prefix.shape[1]
        T = 0 if tok is None else tok.shape[1]
        L = P + T
        if L == 0:
            raise ValueError("LanguageModel: the sequence is empty (no prefix and no tokens)")
        if L > self.cfg.max_positions:
            raise ValueError(f"LanguageModel: {P} prefix + {T} text positions exceed "
                             f"max_positions={self.cfg.max_positions}")
        pos, c_pos = self._positions(0, L)  # (L, D): over prefix and text
        if attention_mask is None:
            attention_mask = np.ones((B, T), dtype=np.int64)
        elif tok is None:
            raise ValueError("attention_mask was given without ids or inputs_embeds")
        attention_mask = check_mask01(attention_mask, (B, T), "attention_mask")

        x = np.concatenate(parts, axis=1)  # blip2_opt.py: cat([inputs_opt, embed_tokens(ids)])
        c_in = None
        if self.project_in is not None:
            x, c_in = self.project_in.forward(x)  # (B, L, E) @ (E, D) -> (B, L, D)
        x = x + pos  # (B, L, D) + (L, D), the same positions for every row
        x, c_drop = self.dropout.forward(x, rng)
        visible = np.concatenate([np.ones((B, P), dtype=bool), attention_mask.astype(bool)], axis=1)
        mask = causal_mask(L) & padding_mask(visible)  # (1, L, L) & (B, 1, L) -> (B, L, L)
        c_layers = []
        for layer in self.layers:
            x, c = layer.forward(x, mask=mask, rng=rng)  # (B, L, D) -> (B, L, D)
            c_layers.append(c)
        logits, c_head, h = self._head(x)
        cache = {"tok": c_tok, "pos": c_pos, "P": P, "inputs": inputs_embeds is not None,
                 "in": c_in, "drop": c_drop, "layers": c_layers, "head": c_head, "h": h,
                 "shape": logits.shape}
        return logits, cache

    # ---- backward -----------------------------------------------------------------
    def backward(self, dlogits, cache):
        """dlogits (B, P + T, V) -> (d_inputs_embeds (B, T, E) or None, d_prefix_embeds
        (B, P, E) or None): the gradients of the two float inputs, None for one
        that was not given. Adds into the trainable Params only (none when frozen)."""
        if np.shape(dlogits) != cache["shape"]:
            raise ValueError(f"LanguageModel.backward: expected dlogits of shape "
                             f"{cache['shape']}, got {np.shape(dlogits)}")
        table = self.embed_tokens.weight
        V, E = table.shape
        P = cache["P"]
        c_ln, c_out = cache["head"]
        h = cache["h"]
        if table.trainable:  # undoes logits = h @ table^T, the head's use of the table
            table.grad += dlogits.reshape(-1, V).T @ h.reshape(-1, E)  # (V, N) @ (N, E)
        dx = dlogits @ table.data  # undoes h @ table^T: (B, L, V) @ (V, E) -> (B, L, E)
        if self.project_out is not None:
            dx = self.project_out.backward(dx, c_out)  # undoes h = x @ W_out: -> (B, L, D)
        if self.final_layer_norm is not None:
            dx = self.final_layer_norm.backward(dx, c_ln)  # undoes x = LN(x)
        for layer, c in zip(reversed(self.layers), reversed(cache["layers"])):
            dx = layer.backward(dx, c)  # last block first
        dx = self.dropout.backward(dx, cache["drop"])
        # undoes x + pos: the same positions were added to every row, so sum over the batch
        self.embed_positions.backward(dx.sum(axis=0), cache["pos"])
        if self.project_in is not None:
            dx = self.project_in.backward(dx, cache["in"])  # undoes x = e @ W_in: -> (B, L, E)
        d_prefix, d_tok = dx[:, :P], dx[:, P:]  # undoes the concatenation
        if cache["tok"] is not None:
            self.embed_tokens.backward(d_tok, cache["tok"])  # scatter-add into the token rows
        return (d_tok if cache["inputs"] else None), (d_prefix if P else None)

    # ---- generation ---------------------------------------------------------------
    def forward_incremental(self, ids=None, past=None, start: int = 0, prefix_embeds=None):
        """Forward only, for generation: the new positions start..start+t-1 attend
        causally to the cached keys and values ``past`` and to themselves.

        ids (B, t) and/or prefix_embeds (B, P, E) (new positions: prefix first);
        past None or, per layer, (k, v) each (B, H, start, dh). Returns
        (logits (B, P + t, V), present) with present the per-layer (k, v) of
        every position so far. No padding: generation batches are unpadded.
        """
        tok, _, prefix = self._embed(ids, None, prefix_embeds)
        x = np.concatenate([a for a in (prefix, tok) if a is not None], axis=1)
        B, t, _ = x.shape
        n_past = 0 if past is None else past[0][0].shape[2]
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"past: expected {len(self.layers)} (k, v) pairs, got {len(past)}")
        if start != n_past:
            raise ValueError(f"forward_incremental: start must equal the number of cached "
                             f"positions ({n_past}), got start={start}")
        pos, _ = self._positions(start, t)
        if self.project_in is not None:
            x, _ = self.project_in.forward(x)
        x = x + pos
        mask = causal_mask(t, n_past + t)  # (1, t, past + t)
        present = []
        for i, layer in enumerate(self.layers):
            x, c = layer.forward(x, mask=mask, past_kv=None if past is None else past[i])
            present.append(c["present"])
        return self._head(x)[0], present


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------

def lm_step(lm: LanguageModel, ids, attention_mask, prefix_embeds=None, prompt_length: int = 0,
            rng=None, backward: bool = True):
    """One causal-LM loss (HF ``OPTForCausalLM`` with labels): forward, and if
    ``backward`` the mirrored backward. Returns (loss, d_prefix_embeds or None)."""
    logits, cache = lm.forward(ids, attention_mask, prefix_embeds=prefix_embeds, rng=rng)
    P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    targets = causal_lm_targets(ids, attention_mask, P, prompt_length)
    next_token = NextTokenLoss()  # OPT: plain cross-entropy, no label smoothing
    loss, c_loss = next_token.forward(logits, targets)
    if not backward:
        return loss, None
    _, d_prefix = lm.backward(next_token.backward(1.0, c_loss), cache)
    return loss, d_prefix


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

class SoftPromptDecoder:
    """Adapts the LM to ``minblip.generation.generate``, which drives a decoder
    through ``image_kv(image)`` (computed once per image, reordered with the
    beams) and ``forward_incremental(ids, past, image_kv, start)``.

    The soft prompt (B, P, D) plays the image's part: its per-layer keys and
    values are computed once (prefix positions never depend on later tokens, so
    they are exact) and stand in front of the token cache at every step. Ids in
    ``suppress_ids`` are never generated (HF ``suppress_tokens``).
    """

    def __init__(self, lm: LanguageModel, suppress_ids=()):
        self.lm = lm
        self.suppress_ids = list(suppress_ids)

    def image_kv(self, prefix):
        if prefix.shape[1] == 0:
            return []
        _, present = self.lm.forward_incremental(prefix_embeds=prefix)
        return present

    def forward_incremental(self, ids, past, image_kv, start):
        n_prefix = image_kv[0][0].shape[2] if image_kv else 0
        if image_kv:
            full = image_kv if past is None else [
                (np.concatenate([pk, k], axis=2), np.concatenate([pv, v], axis=2))
                for (pk, pv), (k, v) in zip(image_kv, past)]
        else:
            full = past
        logits, present = self.lm.forward_incremental(ids, full, start=n_prefix + start)
        if self.suppress_ids:  # HF SuppressTokensLogitsProcessor: never generated
            logits[..., self.suppress_ids] = -np.inf
        # generation counts token positions only: hand back the cache without the prefix
        return logits, [(k[:, :, n_prefix:], v[:, :, n_prefix:]) for k, v in present]
