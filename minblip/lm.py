"""A small decoder-only language model in the style of OPT, the frozen LLM of BLIP-2.

BLIP-2 stage 2 (salesforce/LAVIS ``lavis/models/blip2_models/blip2_opt.py``) puts a
frozen OPT (Hugging Face ``OPTForCausalLM``) behind the Q-Former. This module is
that OPT, shrunk to the synthetic world:

    x = [prefix_embeds | embed_tokens(ids)] + embed_positions[0 .. P+T-1]   (B, P+T, D)
    x = block(x) for each pre-norm causal block         (OPTDecoderLayer, do_layer_norm_before)
    h = final_layer_norm(x)
    logits = h @ embed_tokens.weight^T                   (lm_head tied to the token table)

``prefix_embeds`` are soft prompts: vectors that sit where token embeddings would
be. BLIP-2 builds ``inputs_embeds = cat(projected queries, embed_tokens(ids))``
and hands OPT the concatenation; the positions therefore run over prefix and
text together, and the queries sit inside the causal mask (query i sees queries
<= i, every text token sees every query).

Kept from OPT: learned absolute positions, pre-norm blocks with LayerNorm eps
1e-5, a final LayerNorm, an output head tied to the token embeddings with no
bias, dropout after the embeddings and in every block, plain cross-entropy (no
label smoothing) with HF's shift (logits at position t score token t + 1).

The blocks are ``minblip.transformer.PreNormBlock`` (the ViT's block) with the
feed-forward activation switched to ReLU, as OPT has it (``activation_function
"relu"``); ``LMConfig(activation="gelu")`` keeps the ViT's exact GELU. ReLU is
also about 40 times cheaper than the erf GELU in NumPy.

Departures, all deliberate:

* OPT's ``OPTLearnedPositionalEmbedding`` adds an offset of 2 to every position
  index (a leftover of fairseq) and derives positions from the cumulative sum
  of the attention mask. Here position t is simply row t of the table. With
  right padding the two agree on every real token.
* OPT's tokenizer is byte-level BPE with ``</s>`` (id 2) as BOS, and BLIP-2
  appends "\\n" to every caption and stops generating at "\\n". Here the
  tokenizer is ``minblip.tokenizer.Tokenizer`` over whole words: ``[CLS]``
  is the BOS token, ``[SEP]`` the EOS token, ``[PAD]`` (id 0) the padding.

Freezing: ``freeze()`` marks a module frozen. A frozen module's Params are
left out of ``params()`` (of the module itself and of any model built with
:func:`trainable_named_params`, such as ``Blip2Stage2``), so no optimiser
ever sees or changes them. Its backward computes no weight gradient at all: it
only carries the gradient through to its inputs (here the soft prompt), which
needs the weights but never ``X^T dY``. The input-only backward functions below
mirror the layer backwards line by line without their Param lines.

Also here: a word tokenizer with the question-answer words, generators of
question-answer text about ``minblip.world`` scenes, :func:`pretrain_lm`, and
generation through ``minblip.generation`` (greedy, beam, nucleus; keys and
values are cached, and the soft prompt's keys and values are computed once).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import world
from .attention import (MultiHeadAttention, causal_mask, merge_heads, padding_mask,
                        split_heads)
from .core import Module, check_float, check_ids, check_ndim
from .generation import generate
from .layers import Dropout, Embedding, LayerNorm, Linear
from .optim import AdamW, clip_grad_norm, warmup_cosine_lr
from .softmax import CrossEntropyLoss
from .tokenizer import Tokenizer
from .transformer import PreNormBlock

IGNORE_INDEX = -100
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


class ReLU(Module):
    """max(x, 0), OPT's feed-forward activation. Its derivative at exactly 0 is
    taken as 0, as in PyTorch."""

    def forward(self, x):
        check_float(x, "ReLU input")
        keep = x > 0
        return x * keep, keep

    def backward(self, dy, cache):
        return dy * cache  # undoes x * (x > 0)


# ---------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------

def freeze(module: Module) -> Module:
    """Mark ``module`` frozen (any Module); returns it. See :func:`trainable_named_params`."""
    if not isinstance(module, Module):
        raise TypeError(f"freeze: expected a Module, got {type(module).__name__}")
    module.frozen = True
    return module


def unfreeze(module: Module) -> Module:
    if not isinstance(module, Module):
        raise TypeError(f"unfreeze: expected a Module, got {type(module).__name__}")
    module.frozen = False
    return module


def is_frozen(module) -> bool:
    return bool(getattr(module, "frozen", False))


def _modules(obj, visiting: set):
    """Every Module reachable from ``obj`` through attributes, lists, tuples and dicts."""
    if isinstance(obj, Module):
        if id(obj) in visiting:
            return
        visiting.add(id(obj))
        yield obj
        children = vars(obj).values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, dict):
        children = obj.values()
    else:
        return
    for child in children:
        yield from _modules(child, visiting)


def all_named_params(module: Module, prefix: str = "") -> list:
    """Every Param of the tree once, frozen or not (``Module.named_params`` ignoring freezing)."""
    return Module.named_params(module, prefix)


def trainable_named_params(module: Module, prefix: str = "") -> list:
    """``(name, Param)`` pairs of ``module`` minus every Param of a frozen sub-module
    (``module`` itself included). A Param shared by a frozen and a trainable
    module counts as frozen: the frozen module computes no gradient for it."""
    frozen = {id(p) for m in _modules(module, set()) if is_frozen(m)
              for _, p in Module.named_params(m)}
    return [(n, p) for n, p in Module.named_params(module, prefix) if id(p) not in frozen]


def frozen_named_params(module: Module, prefix: str = "") -> list:
    """The complement of :func:`trainable_named_params`."""
    keep = {id(p) for _, p in trainable_named_params(module)}
    return [(n, p) for n, p in Module.named_params(module, prefix) if id(p) not in keep]


def cast_all(module: Module, dtype) -> Module:
    """``Module.to`` for every Param, frozen ones included (``to`` itself only walks
    ``params()``, which leaves frozen Params out)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"minblip runs in float32 or float64, got {dtype}")
    for _, p in Module.named_params(module):
        p.astype(dtype)
    return module


# ---------------------------------------------------------------------------
# Input-only backward passes. Each mirrors the backward of the layer named in
# its docstring with the Param lines removed: a frozen layer still needs its
# weights to carry the gradient to its input (dx = dy W^T), but never the
# weight gradient (dW = x^T dy), which is a third of a training backward's
# matrix products.
# ---------------------------------------------------------------------------

def _linear_dx(layer: Linear, dy):
    """``Linear.backward`` without dW, db: dy (..., d_out) -> dx (..., d_in)."""
    return dy @ layer.W.data.T  # undoes x @ W: (..., d_out) @ (d_out, d_in)


def _layernorm_dx(ln: LayerNorm, dy, cache):
    """``LayerNorm.backward`` without dgamma, dbeta."""
    xhat, rstd = cache
    dxhat = dy * ln.gamma.data  # undoes * gamma
    # undoes xhat = (x - mu) * rstd
    return rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                   - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))


def _self_attention_dx(attn: MultiHeadAttention, dout, cache):
    """``MultiHeadAttention.backward`` (self-attention) without the projection grads."""
    dctx = _linear_dx(attn.out, dout)  # undoes the output projection
    dq, dk, dv = attn.attention.backward(split_heads(dctx, attn.n_heads), cache["att"])
    n_past = cache["n_past"]
    dk, dv = dk[:, :, n_past:], dv[:, :, n_past:]  # the past is a constant
    dx = _linear_dx(attn.query, merge_heads(dq))  # undoes q = x Wq
    dx += _linear_dx(attn.key, merge_heads(dk))  # undoes k = x Wk (x fanned out)
    dx += _linear_dx(attn.value, merge_heads(dv))  # undoes v = x Wv
    return dx


def _block_dx(block: PreNormBlock, dy, cache):
    """``PreNormBlock.backward`` without any Param gradient."""
    c_ln1, c_attn, c_d1, c_ln2, c_mlp, c_d2 = cache
    c_fc1, c_act, c_fc2 = c_mlp
    df = block.drop.backward(dy, c_d2)
    da = _linear_dx(block.mlp.fc2, df)  # undoes f = fc2(a)
    dh2 = _linear_dx(block.mlp.fc1, block.mlp.act.backward(da, c_act))  # undoes a = act(fc1(h2))
    dx1 = dy + _layernorm_dx(block.ln2, dh2, c_ln2)  # undoes x1 + FFN(LN2(x1))
    da = block.drop.backward(dx1, c_d1)
    dh = _self_attention_dx(block.attn, da, c_attn)
    return dx1 + _layernorm_dx(block.ln1, dh, c_ln1)  # undoes x + Attn(LN1(x))


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

def _check_01(mask, shape: tuple, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} of 0/1, got {mask.shape}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name}: expected only 0/1 values, got {np.unique(mask)[:5].tolist()}")
    return mask


class LanguageModel(Module):
    """OPT-style decoder-only LM (Hugging Face ``OPTForCausalLM``).

    Attributes follow OPT's names: ``embed_tokens`` (V, D), ``embed_positions``
    (max_positions, D), ``layers`` (pre-norm causal blocks), ``final_layer_norm``.
    The output head is ``embed_tokens.weight`` itself (``lm_head`` tied, no bias).
    """

    def __init__(self, cfg: LMConfig, rng: np.random.Generator):
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"LanguageModel: expected an LMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.frozen = False
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.width, rng, init_std=cfg.init_std)
        # nn.Embedding(padding_idx=pad): HF's _init_weights zeroes that row
        self.embed_tokens.weight.data[cfg.pad_id] = 0.0
        self.embed_positions = Embedding(cfg.max_positions, cfg.width, rng, init_std=cfg.init_std)
        self.dropout = Dropout(cfg.dropout)
        self.layers = [PreNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, rng, eps=cfg.eps,
                                    dropout=cfg.dropout, init_std=cfg.init_std)
                       for _ in range(cfg.depth)]
        if cfg.activation == "relu":
            for layer in self.layers:
                layer.mlp.act = ReLU()
        self.final_layer_norm = LayerNorm(cfg.width, cfg.eps)

    # ---- freezing -----------------------------------------------------------------
    def freeze(self) -> "LanguageModel":
        """Frozen: ``params()`` is empty, backward computes no Param gradient (only the
        gradient of the soft prompt), so no optimiser can change a weight."""
        return freeze(self)

    def unfreeze(self) -> "LanguageModel":
        return unfreeze(self)

    def named_params(self, prefix: str = "") -> list:
        """The trainable Params: all of them, or none when frozen."""
        return trainable_named_params(self, prefix)

    def to(self, dtype) -> "LanguageModel":
        """Switch every Param, frozen or not, to ``dtype``."""
        return cast_all(self, dtype)

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    # ---- forward ------------------------------------------------------------------
    def _checked_embeds(self, x, name: str, length: str):
        """x (B, length, D) float -> x in the model's dtype, or a named error."""
        D = self.cfg.width
        check_float(x, name)
        check_ndim(x, 3, name, f"(B, {length}, {D})")
        if x.shape[-1] != D:
            raise ValueError(f"{name}: expected width {D} (the LM width), got shape {x.shape}")
        return x.astype(self.dtype, copy=False)

    def _embed(self, ids, inputs_embeds, prefix_embeds):
        """Validates the inputs and builds [prefix | tokens]; returns the pieces."""
        if ids is not None and inputs_embeds is not None:
            raise ValueError("LanguageModel: give ids or inputs_embeds, not both")
        c_tok = None
        if ids is not None:
            ids = check_ids(ids, self.cfg.vocab_size, "LanguageModel ids")
            if ids.ndim != 2:
                raise ValueError(f"LanguageModel ids: expected a 2-d array (B, T), "
                                 f"got shape {ids.shape}")
            tok, c_tok = self.embed_tokens.forward(ids)  # (B, T) -> (B, T, D)
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

    def forward(self, ids=None, attention_mask=None, inputs_embeds=None, prefix_embeds=None,
                rng=None):
        """ids (B, T) int, or inputs_embeds (B, T, D) float; attention_mask (B, T) of
        0/1 for the text (None: no padding); prefix_embeds (B, P, D) soft prompts,
        always attended (BLIP-2's ``ones(B, 32)`` mask for the queries).
        ``rng`` drives dropout (None: evaluation).

        Returns logits (B, P + T, V) over the whole sequence and the cache.
        Row t scores the token at position t + 1.
        """
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy Generator or None, got {type(rng).__name__}")
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
        if attention_mask is None:
            attention_mask = np.ones((B, T), dtype=np.int64)
        elif tok is None:
            raise ValueError("attention_mask was given without ids or inputs_embeds")
        attention_mask = _check_01(attention_mask, (B, T), "attention_mask")

        x = np.concatenate(parts, axis=1)  # blip2_opt.py: cat([inputs_opt, embed_tokens(ids)])
        x = x + self.embed_positions.weight.data[:L]  # (B, L, D) + (L, D): positions run over both
        x, c_drop = self.dropout.forward(x, rng)
        visible = np.concatenate([np.ones((B, P), dtype=bool), attention_mask.astype(bool)], axis=1)
        mask = causal_mask(L) & padding_mask(visible)  # (1, L, L) & (B, 1, L) -> (B, L, L)
        c_layers = []
        for layer in self.layers:
            x, c = layer.forward(x, mask=mask, rng=rng)  # (B, L, D) -> (B, L, D)
            c_layers.append(c)
        h, c_ln = self.final_layer_norm.forward(x)
        logits = h @ self.embed_tokens.weight.data.T  # (B, L, D) @ (D, V) -> (B, L, V)
        cache = {"tok": c_tok, "P": P, "L": L, "ids": ids is not None,
                 "inputs": inputs_embeds is not None, "drop": c_drop, "layers": c_layers,
                 "ln": c_ln, "h": h, "shape": logits.shape}
        return logits, cache

    # ---- backward -----------------------------------------------------------------
    def backward(self, dlogits, cache):
        """dlogits (B, P + T, V) -> the gradients of the float inputs, in argument
        order: d_inputs_embeds (B, T, D) if inputs_embeds were given, d_prefix_embeds
        (B, P, D) if a prefix was given (a tuple when both), None when neither.

        Trainable: adds into every Param. Frozen: adds into no Param and computes
        no Param gradient; the input gradients are the same either way."""
        if np.shape(dlogits) != cache["shape"]:
            raise ValueError(f"LanguageModel.backward: expected dlogits of shape "
                             f"{cache['shape']}, got {np.shape(dlogits)}")
        grads = not self.frozen
        E = self.embed_tokens.weight
        V, D = E.shape
        P, L = cache["P"], cache["L"]
        if grads:  # undoes logits = h @ E^T, the head half of the tied table: (V, N) @ (N, D)
            E.grad += dlogits.reshape(-1, V).T @ cache["h"].reshape(-1, D)
        dh = dlogits @ E.data  # undoes h @ E^T: (B, L, V) @ (V, D) -> (B, L, D)
        if grads:
            dx = self.final_layer_norm.backward(dh, cache["ln"])  # undoes h = LN(x)
        else:
            dx = _layernorm_dx(self.final_layer_norm, dh, cache["ln"])
        for layer, c in zip(reversed(self.layers), reversed(cache["layers"])):
            dx = layer.backward(dx, c) if grads else _block_dx(layer, dx, c)  # last block first
        dx = self.dropout.backward(dx, cache["drop"])
        if grads:  # undoes + embed_positions[:L], broadcast over the batch
            self.embed_positions.weight.grad[:L] += dx.sum(axis=0)
        d_prefix, d_tok = dx[:, :P], dx[:, P:]  # undoes the concatenation
        if cache["ids"] and grads:
            self.embed_tokens.backward(d_tok, cache["tok"])  # scatter-add into the token rows
        out = []
        if cache["inputs"]:
            out.append(d_tok)
        if P:
            out.append(d_prefix)
        if not out:
            return None
        return out[0] if len(out) == 1 else tuple(out)

    # ---- generation ---------------------------------------------------------------
    def forward_incremental(self, ids=None, past=None, start: int = 0, prefix_embeds=None):
        """Forward only, for generation: the new positions start..start+t-1 attend
        causally to the cached keys and values ``past`` and to themselves.

        ids (B, t) and/or prefix_embeds (B, P, D) (new positions: prefix first);
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
        if start + t > self.cfg.max_positions:
            raise ValueError(f"LanguageModel: positions up to {start + t - 1} exceed "
                             f"max_positions={self.cfg.max_positions}")
        x = x + self.embed_positions.weight.data[start:start + t]
        mask = causal_mask(t, n_past + t)  # (1, t, past + t)
        present = []
        for i, layer in enumerate(self.layers):  # PreNormBlock.forward with a key/value cache
            h, _ = layer.ln1.forward(x)
            a, c = layer.attn.forward(h, mask=mask, past_kv=None if past is None else past[i])
            x = x + a
            h2, _ = layer.ln2.forward(x)
            f, _ = layer.mlp.forward(h2)
            x = x + f
            present.append(c["present"])
        h, _ = self.final_layer_norm.forward(x)
        return h @ self.embed_tokens.weight.data.T, present


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------

def causal_lm_targets(ids, attention_mask, n_prefix: int = 0, prompt_length: int = 0):
    """Labels for the whole sequence [prefix | text], as blip2_opt.py builds them:

        targets = ids with padding -> -100; the first ``prompt_length`` text
        tokens -> -100; then cat(full((B, n_prefix), -100), targets).

    Returns int64 (B, n_prefix + T). The loss pairs logits[:, :-1] with
    targets[:, 1:], so the last prefix position is trained to predict the
    first text token (BOS): with the empty pre-training prompt LAVIS does not
    mask it either.
    """
    ids = np.asarray(ids)
    mask = np.asarray(attention_mask)
    ### BEGIN SOLUTION
    targets = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(np.int64)
    targets[:, :prompt_length] = IGNORE_INDEX
    ignore = np.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=np.int64)
    return np.concatenate([ignore, targets], axis=1)
    ### END SOLUTION


def lm_step(lm: LanguageModel, ids, attention_mask, prefix_embeds=None, prompt_length: int = 0,
            rng=None, backward: bool = True):
    """One causal-LM loss (HF ``OPTForCausalLM`` with labels): forward, and if
    ``backward`` the mirrored backward. Returns (loss, d_prefix_embeds or None)."""
    logits, cache = lm.forward(ids, attention_mask, prefix_embeds=prefix_embeds, rng=rng)
    P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    targets = causal_lm_targets(ids, attention_mask, P, prompt_length)
    ce = CrossEntropyLoss()  # OPT: plain CE, no label smoothing
    loss, c_ce = ce.forward(logits[:, :-1], targets[:, 1:])  # HF's shift: t predicts t + 1
    if not backward:
        return loss, None
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = ce.backward(1.0, c_ce)  # undoes the shift: the last position predicts nothing
    return loss, lm.backward(dlogits, cache)


# ---------------------------------------------------------------------------
# Text about the world: captions and question-answer pairs
# ---------------------------------------------------------------------------

QUESTION = "question"
ANSWER = "answer"
NUMBER_WORDS = ("one", "two", "three")
# Words the question-answer text needs beyond the captions' vocabulary.
QA_WORDS = (QUESTION, ANSWER, "colour", "shape", "size", "object", "objects", "how", "many",
            "are", *NUMBER_WORDS)
QUESTION_KINDS = ("colour", "shape", "size", "count", "shape_at")
TEXT_KINDS = ("caption", "qa", "caption_qa", "paraphrase")


def lm_vocabulary() -> list[str]:
    """The world's caption words (same ids as BLIP's tokenizer) followed by QA_WORDS."""
    words = world.vocabulary()
    return words + [w for w in QA_WORDS if w not in words]


def build_lm_tokenizer() -> Tokenizer:
    """The LM's tokenizer. Conventions: ``[CLS]`` is BOS (OPT's ``</s>``), ``[SEP]`` is
    EOS (BLIP-2's "\\n"), ``[PAD]`` = 0 pads on the right."""
    return Tokenizer(lm_vocabulary())


def scene_questions(scene: world.Scene) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously: (kind, question, answer).

    * colour: "what colour is the circle" (only for a shape that occurs once)
    * shape: "what shape is the red object" (only for a colour that occurs once)
    * size: "what size is the red circle" (colour and shape name one object)
    * count: "how many objects are there"
    * shape_at: "what shape is on the left" (a position phrase names one cell)
    Answers are one canonical word ("purple", not "violet"; "large", not "big").
    """
    if not isinstance(scene, world.Scene):
        raise TypeError(f"scene_questions expects a world.Scene, got {type(scene).__name__}")
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    out = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            out.append(("colour", f"what colour is the {o.shape}", o.colour))
        if colours[o.colour] == 1:
            out.append(("shape", f"what shape is the {o.colour} object", o.shape))
        out.append(("size", f"what size is the {o.colour} {o.shape}", o.size))
        out.append(("shape_at", f"what shape is {world.POSITION_PHRASES[(o.row, o.col)][0]}",
                    o.shape))
    out.append(("count", "how many objects are there", NUMBER_WORDS[len(scene.objects) - 1]))
    return out


def qa_text(question: str, answer: str | None = None) -> str:
    """ "question <question> answer <answer>"; without an answer, the prompt that asks for it."""
    text = f"{QUESTION} {question} {ANSWER}"
    return text if answer is None else f"{text} {answer}"


def answer_choices(kind: str, max_objects: int = world.MAX_OBJECTS) -> tuple[str, ...]:
    """The possible answers of a question kind (chance = 1 / len)."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"question kind must be one of {QUESTION_KINDS}, got {kind!r}")
    if kind == "colour":
        return tuple(world.COLOURS)
    if kind == "size":
        return world.SIZES
    if kind == "count":
        return NUMBER_WORDS[:max_objects]
    return world.SHAPES


def random_scenes(n: int, rng: np.random.Generator, max_objects: int = 2,
                  held_out=world.HELD_OUT_COMBOS) -> list[world.Scene]:
    """n random scenes of the world (repeats allowed), never using a held-out
    (colour, shape) combination, so the compositional split stays unseen."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(max_objects, bool) or not 1 <= int(max_objects) <= world.MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{world.MAX_OBJECTS}, got {max_objects!r}")
    held = {tuple(c) for c in held_out}
    combos = [(c, s) for c in world.COLOURS for s in world.SHAPES if (c, s) not in held]
    backgrounds = list(world.BACKGROUNDS)
    scenes = []
    for _ in range(int(n)):
        k = int(rng.integers(1, max_objects + 1))
        cells = rng.choice(world.GRID * world.GRID, size=k, replace=False)
        chosen = rng.choice(len(combos), size=k, replace=False)
        objects = tuple(world.Object(combos[j][0], combos[j][1],
                                     world.SIZES[int(rng.integers(len(world.SIZES)))],
                                     int(cell) // world.GRID, int(cell) % world.GRID)
                        for j, cell in zip(chosen, cells))
        scenes.append(world.Scene(objects, backgrounds[int(rng.integers(len(backgrounds)))]))
    return scenes


def lm_text(scene: world.Scene, kind: str, rng: np.random.Generator,
            n_questions: int = 2) -> list[str]:
    """One pretraining document about ``scene``, as a list of segments (each
    becomes ``[CLS] words [SEP]``, see :func:`encode_documents`):

    * "caption": [a caption from ``world.describe``]
    * "qa": ["question <q> answer <a>"], one random question
    * "caption_qa": [caption, "question <q1> answer <a1> question <q2> answer <a2>"]
      with ``n_questions`` different questions (fewer if the scene has fewer).
      The questions are a segment of their own after the caption, so the LM
      learns to answer from what came before its ``[CLS]``: where the soft
      prompt will sit in stage 2. (A caption still ends in ``[SEP]``, so
      captioning stops there.)
    * "paraphrase": [caption, another caption of the same scene]. The second
      is predictable from the first, so the LM learns to describe a scene it
      was told about before its ``[CLS]``: the skill stage 2 relies on when
      it asks the frozen LM to caption the scene a soft prompt describes.
    """
    if kind not in TEXT_KINDS:
        raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {kind!r}")
    caption = world.describe(scene, rng)
    if kind == "caption":
        return [caption]
    if kind == "paraphrase":
        return [caption, world.describe(scene, rng)]
    questions = scene_questions(scene)
    if kind == "qa":
        _, question, answer = questions[int(rng.integers(len(questions)))]
        return [qa_text(question, answer)]
    picks = rng.choice(len(questions), size=min(n_questions, len(questions)), replace=False)
    return [caption, " ".join(qa_text(questions[i][1], questions[i][2]) for i in picks)]


def encode_documents(tokenizer: Tokenizer, documents, max_length: int = 48):
    """documents: N lists of segments (str) -> (ids, attention_mask), int64 (N, max_length):
    each segment ``[CLS] words [SEP]``, the segments of a document one after the
    other (documents packed the way LLM pretraining packs them, BOS/EOS between),
    then ``[PAD]``. A document longer than ``max_length`` tokens raises ValueError."""
    ids = np.full((len(documents), max_length), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(documents), max_length), dtype=np.int64)
    for n, segments in enumerate(documents):
        if isinstance(segments, str) or not segments:
            raise TypeError(f"encode_documents: document {n} must be a non-empty list of "
                            f"str segments, got {segments!r}")
        row = []
        for segment in segments:
            seg_ids, _ = tokenizer.encode(segment, max_length=max_length)
            row += seg_ids[0].tolist()
        if len(row) > max_length:
            raise ValueError(f"encode_documents: document {n} has {len(row)} tokens, more than "
                             f"max_length={max_length}: {segments!r}")
        ids[n, :len(row)] = row
        mask[n, :len(row)] = 1
    return ids, mask


def lm_corpus(n: int, rng: np.random.Generator, kinds=TEXT_KINDS, kind_weights=None,
              max_objects: int = 2) -> list[list[str]]:
    """n pretraining documents about random scenes, each of a kind drawn from
    ``kinds`` with probabilities ``kind_weights`` (uniform by default)."""
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds must name at least one of {TEXT_KINDS}")
    for k in kinds:
        if k not in TEXT_KINDS:
            raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {k!r}")
    if kind_weights is None:
        p = np.full(len(kinds), 1.0 / len(kinds))
    else:
        p = np.asarray(kind_weights, dtype=np.float64)
        if p.shape != (len(kinds),) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"kind_weights: expected {len(kinds)} non-negative numbers, "
                             f"not all zero, got {kind_weights!r}")
        p = p / p.sum()
    drawn = rng.choice(len(kinds), size=n, p=p)
    return [lm_text(scene, kinds[k], rng) for scene, k in zip(random_scenes(n, rng, max_objects),
                                                              drawn)]


# ---------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------

def pretrain_lm(lm: LanguageModel, tokenizer: Tokenizer, *, steps: int = 1000,
                batch_size: int = 32, lr: float = 5e-3, min_lr: float = 1e-4,
                warmup_steps: int = 20, weight_decay: float = 0.05, grad_clip: float = 1.0,
                kinds=("paraphrase", "caption_qa"), kind_weights=(1.0, 0.4),
                corpus_size: int = 4096,
                max_objects: int = 2, max_length: int = 48, seed: int = 0,
                log_every: int = 0) -> dict:
    """Pretrain ``lm`` (trainable) on text about the world with AdamW, a
    warmup-cosine schedule and gradient clipping (the recipe of BLIP's other
    training loops; OPT itself was pretrained the same way at scale).

    The default mixture is what stage 2 needs from its frozen LM: most
    documents are two captions of one scene ("paraphrase") or a caption and
    questions about it ("caption_qa"), so besides writing captions and
    answers the LM learns to *read* a description placed before its ``[CLS]``.
    Trained on single captions only, a small LM ignores everything before
    ``[CLS]``, and no soft prompt can then tell it what the image shows.
    This reading skill appears abruptly, after about 500-800 steps at the
    sizes of the notebook.

    A corpus of ``corpus_size`` documents (:func:`lm_corpus`) is written and
    tokenised once (:func:`encode_documents`); each step draws ``batch_size`` of
    them at random. Returns {"loss": per-step losses, "seconds": wall time,
    "corpus": the documents}.
    """
    if lm.frozen:
        raise ValueError("pretrain_lm: the language model is frozen; call unfreeze() first")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"pretrain_lm: expected a Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != lm.cfg.vocab_size:
        raise ValueError(f"pretrain_lm: tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"LM's vocab_size is {lm.cfg.vocab_size}")
    if max_length > lm.cfg.max_positions:
        raise ValueError(f"pretrain_lm: max_length={max_length} exceeds the LM's "
                         f"max_positions={lm.cfg.max_positions}")
    if steps < 1 or batch_size < 1 or corpus_size < batch_size:
        raise ValueError(f"pretrain_lm: need steps >= 1 and 1 <= batch_size <= corpus_size, got "
                         f"steps={steps}, batch_size={batch_size}, corpus_size={corpus_size}")
    rng = np.random.default_rng([seed, 7])
    start = time.perf_counter()
    corpus = lm_corpus(corpus_size, rng, kinds, kind_weights, max_objects)
    all_ids, all_mask = encode_documents(tokenizer, corpus, max_length)
    optimizer = AdamW(lm, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        rows = rng.choice(corpus_size, size=batch_size, replace=False)
        width = int(all_mask[rows].sum(axis=1).max())  # pad to the batch's longest text only
        ids, mask = all_ids[rows, :width], all_mask[rows, :width]
        lm.zero_grad()
        loss, _ = lm_step(lm, ids, mask, rng=rng)
        clip_grad_norm(lm, grad_clip)
        optimizer.step(lr=warmup_cosine_lr(step, steps, lr, min(warmup_steps, steps - 1),
                                           min_lr=min(min_lr, lr)))
        losses.append(loss)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"LM step {step:4d}  loss {loss:.3f}")
    return {"loss": losses, "seconds": time.perf_counter() - start, "corpus": corpus}


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

class _SoftPromptDecoder:
    """Adapts the LM to ``minblip.generation.generate``, which drives a BLIP decoder
    through ``bert.image_kv(image)`` (computed once per image, reordered with the
    beams) and ``forward_incremental(ids, past, image_kv, start)``.

    The soft prompt plays the image's part: its per-layer keys and values are
    computed once (prefix positions never depend on later tokens, so they are
    exact) and stand in front of the token cache at every step.
    """

    def __init__(self, lm: LanguageModel, suppress_ids=()):
        self.lm = lm
        self.bert = self
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


def generate_text(lm: LanguageModel, tokenizer: Tokenizer, prefix_embeds=None, prompt: str = "",
                  batch_size: int | None = None, method: str = "greedy", max_length: int = 20,
                  min_length: int = 1, num_beams: int = 5, top_p: float = 0.9,
                  repetition_penalty: float = 1.0, suppress_words=(), rng=None) -> list[str]:
    """Continue ``[CLS] prompt`` after an optional soft prompt (B, P, D), one text per
    row, until ``[SEP]`` or ``max_length`` tokens (counting BOS and the prompt).
    Words in ``suppress_words`` are never generated (HF ``suppress_tokens``).

    Uses ``minblip.generation.generate`` (greedy, beam or nucleus, HF logit
    processors, cached keys and values). BLIP-2 OPT defaults: beam search with
    5 beams, min_length 1, repetition penalty 1.0. Returns the generated words
    without the prompt. Without a prefix, ``batch_size`` texts are generated
    (default 1).
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"generate_text: expected a Tokenizer, got {type(tokenizer).__name__}")
    D = lm.cfg.width
    if prefix_embeds is None:
        prefix_embeds = np.zeros((1 if batch_size is None else batch_size, 0, D), lm.dtype)
    else:
        check_float(prefix_embeds, "prefix_embeds")
        check_ndim(prefix_embeds, 3, "prefix_embeds", f"(B, P, {D})")
        if prefix_embeds.shape[-1] != D:
            raise ValueError(f"prefix_embeds: expected width {D}, got shape {prefix_embeds.shape}")
        prefix_embeds = prefix_embeds.astype(lm.dtype, copy=False)
    if isinstance(suppress_words, str):
        suppress_words = (suppress_words,)
    unknown = [w for w in suppress_words if tokenizer.token_to_id(w) == tokenizer.unk_id]
    if unknown:
        raise ValueError(f"suppress_words: {unknown} are not in the vocabulary")
    suppress = [tokenizer.token_to_id(w) for w in suppress_words]
    prompt_ids, _ = tokenizer.encode(prompt, max_length=max_length)
    prompt_ids = prompt_ids[0, :-1]  # drop [SEP]: generation continues the prompt
    out = generate(_SoftPromptDecoder(lm, suppress), prefix_embeds, prompt_ids,
                   sep_id=tokenizer.sep_id,
                   method=method, max_length=max_length, min_length=min_length,
                   num_beams=num_beams, top_p=top_p, repetition_penalty=repetition_penalty,
                   rng=rng)
    return [tokenizer.decode(t) for t in out.tokens]


def next_token_logits(lm: LanguageModel, tokenizer: Tokenizer, prompts, prefix_embeds=None):
    """Logits (B, V) of the token that follows ``[CLS] prompt`` (one prompt per row,
    lengths may differ) after an optional soft prompt (B, P, D). One batched
    forward: the text is right-padded and each row is read at its own last token,
    which the causal mask keeps blind to the padding after it."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids, mask = tokenizer.encode(list(prompts), max_length=lm.cfg.max_positions)
    ids, mask = ids[:, :-1], mask[:, :-1].copy()  # drop the final column: [SEP] or [PAD]
    mask[ids == tokenizer.sep_id] = 0
    ids = np.where(mask.astype(bool), ids, tokenizer.pad_id)
    logits, _ = lm.forward(ids, mask, prefix_embeds=prefix_embeds)
    P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    last = P + mask.sum(axis=1) - 1
    return logits[np.arange(len(ids)), last]
