"""BLIP-2 stage 2: the Q-Former talks to a frozen language model through soft prompts.

Section 3.3 of the BLIP-2 paper has two designs, both here. The decoder-only one
mirrors salesforce/LAVIS ``lavis/models/blip2_models/blip2_opt.py`` ``Blip2OPT``
(:func:`stage2_step`):

    image_embeds = ln_vision(ViT(image))                       (B, S, Dv)   ViT frozen
    queries      = QFormer(query_tokens, image_embeds)         (B, Q, Dq)   query path only
    prompt       = language_projection(queries)                (B, Q, Dlm)  "opt_proj"
    logits       = LM([prompt | embed_tokens(ids)])            (B, Q+T, V)  LM frozen
    loss         = CE(logits[:, :-1], targets[:, 1:]),  targets = [-100]*Q + ids (pads -100)

Trainable: ``query_tokens``, the Q-Former, ``ln_vision`` and the projection;
the ViT and the language model are frozen (LAVIS sets ``requires_grad=False``;
minblip calls the core contract's ``freeze()``, so no ``params()`` lists them).
They are frozen for different reasons of the backward:

* the ViT is frozen *and never differentiated*: its input is pixels, so no
  gradient is wanted below ``ln_vision`` and its backward is never called;
* the LM is frozen *but differentiated through*: the loss is computed after
  it, and its gradient must reach the soft prompt. Its backward is the one it
  trains with; frozen, it adds into no Param and computes no weight gradient.

As in LAVIS, the Q-Former's text-only parts are removed for stage 2 (its word
and position embeddings and the text feed-forward networks): only the query
path (embedding LayerNorm, self-attention, cross-attention, query FFN) is
used, and trained. The frozen parts run in evaluation mode (no dropout), and
because the ViT is frozen, stage-2 training computes its features once per
training image instead of every step (LAVIS recomputes them: its images are
augmented, ours are not).

minblip's language model (``minblip.lm``) uses ``[CLS]`` as BOS and ``[SEP]``
as EOS where OPT uses ``</s>`` and "\\n".

The encoder-decoder one mirrors ``blip2_t5.py`` ``Blip2T5.forward``
(:func:`stage2_prefix_step`), with the T5-style model of :mod:`minblip.t5`
trained by the *prefix* language-modelling loss:

    encoder input = [prompt | shared(prefix ids)]     (B, Q+S, Dlm)   bidirectional
    loss          = CE(decoder(suffix shifted right, memory), suffix), padding -100

The soft prompt is built the same way for both; only the language model and
the loss differ. (LAVIS's released code takes the prefix and suffix as given,
``text_input`` and ``text_output``; the split point is the caller's, see
``minblip.questions.prefix_split``.)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from .core import Module, check_finite, check_float
from .layers import LayerNorm, Linear
from .lm import LanguageModel
from .objectives import NextTokenLoss, causal_lm_targets, check_prompt_length
from .qformer import QFormer, QFormerConfig
from .t5 import EncoderDecoderLM, seq2seq_step
from .vit import VisionTransformer

LANGUAGE_MODELS = (LanguageModel, EncoderDecoderLM)


def strip_text_parts(qformer: QFormer) -> QFormer:
    """Remove what only the Q-Former's text uses, in place, as LAVIS ``Blip2OPT``
    does (``word_embeddings = position_embeddings = None``, every layer's
    ``intermediate = output = None``): the word and position tables and each
    layer's text FFN and its LayerNorm. Mode "queries" never touches them."""
    qformer.embeddings.word_embeddings = None
    qformer.embeddings.position_embeddings = None
    for layer in qformer.layers:
        layer.ffn = None
        layer.ffn_ln = None
    return qformer


class Blip2Stage2(Module):
    """Frozen ViT -> trainable ``ln_vision`` -> trainable Q-Former (queries) ->
    trainable ``language_projection`` -> frozen language model: a decoder-only
    ``LanguageModel`` (OPT) or an ``EncoderDecoderLM`` (FlanT5).

    ``params()`` (and so any optimiser built from the model) lists exactly the
    trainable Params; ``parameter_counts()`` compares them with the whole.

    The arguments are used as they are (not copied): the ViT and the LM are
    frozen in place, the Q-Former loses its text parts. Use :meth:`from_stage1`
    to start from a stage-1 model without changing it.
    """

    def __init__(self, visual_encoder, ln_vision: LayerNorm, qformer: QFormer,
                 language_model, rng: np.random.Generator):
        for name, value, cls in (("visual_encoder", visual_encoder, VisionTransformer),
                                 ("ln_vision", ln_vision, LayerNorm), ("qformer", qformer, QFormer),
                                 ("language_model", language_model, LANGUAGE_MODELS)):
            if not isinstance(value, cls):
                expected = " or ".join(c.__name__ for c in np.atleast_1d(cls))
                raise TypeError(f"Blip2Stage2: {name} must be a {expected}, "
                                f"got {type(value).__name__}")
        vit_width = visual_encoder.config.width
        if ln_vision.dim != vit_width or qformer.cfg.encoder_width != vit_width:
            raise ValueError(f"Blip2Stage2: the ViT width ({vit_width}) must equal ln_vision's "
                             f"({ln_vision.dim}) and the Q-Former's encoder_width "
                             f"({qformer.cfg.encoder_width})")
        self.visual_encoder = visual_encoder.freeze()
        self.ln_vision = ln_vision
        self.qformer = strip_text_parts(qformer)
        d_in, d_out = qformer.cfg.width, language_model.cfg.token_width
        # opt_proj / t5_proj = nn.Linear(768, d_llm) with PyTorch's default init,
        # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        self.language_projection = Linear(d_in, d_out, rng)
        bound = 1.0 / math.sqrt(d_in)
        self.language_projection.W.data[...] = rng.uniform(-bound, bound, (d_in, d_out))
        self.language_projection.b.data[...] = rng.uniform(-bound, bound, d_out)
        self.language_model = language_model.freeze()

    @classmethod
    def from_stage1(cls, stage1, language_model, rng: np.random.Generator) -> "Blip2Stage2":
        """Start from a trained stage-1 model (``pretrain_stage2.yaml: pretrained:
        blip2_pretrained.pth``): its ViT (frozen, so it can be shared) and copies
        of its ``ln_vision`` and Q-Former (so stage 2 does not change stage 1)."""
        for name in ("visual_encoder", "ln_vision", "qformer"):
            if not hasattr(stage1, name):
                raise TypeError(f"from_stage1: expected a stage-1 model with visual_encoder, "
                                f"ln_vision and qformer, got {type(stage1).__name__} "
                                f"without {name!r}")
        return cls(stage1.visual_encoder, copy.deepcopy(stage1.ln_vision),
                   copy.deepcopy(stage1.qformer), language_model, rng)

    @property
    def image_size(self) -> int:
        return self.visual_encoder.config.image_size

    @property
    def num_queries(self) -> int:
        return self.qformer.cfg.num_queries

    @property
    def encoder_decoder(self) -> bool:
        """True for the FlanT5 design (an ``EncoderDecoderLM``), False for OPT's."""
        return isinstance(self.language_model, EncoderDecoderLM)

    # ---- inference helpers (no caches kept, evaluation mode) --------------------------
    def image_features(self, images, batch_size: int = 128):
        """The frozen ViT's output (B, S, Dv) for images (B, 3, H, W), in batches,
        in evaluation mode."""
        check_float(images, "images")
        out = [self.visual_encoder.forward(images[s:s + batch_size].astype(self.dtype, copy=False),
                                           keep_cache=False)[0]
               for s in range(0, len(images), batch_size)]
        return np.concatenate(out, axis=0)

    def soft_prompt(self, images=None, image_embeds=None):
        """The projected queries (B, Q, D_lm) the LM reads; from images or from
        precomputed ViT features."""
        if (images is None) == (image_embeds is None):
            raise ValueError("soft_prompt: give images or image_embeds (one of them)")
        if image_embeds is None:
            image_embeds = self.image_features(images)
        return soft_prompt_forward(self, image_embeds=image_embeds)[0]  # evaluation: no rng


def build_stage2(language_model, rng: np.random.Generator, *, stage1=None,
                 visual_encoder=None, qformer_cfg: QFormerConfig | None = None) -> Blip2Stage2:
    """The stage-2 model around ``language_model`` (a ``LanguageModel`` or an
    ``EncoderDecoderLM``), initialised the way the material at hand allows:

    * ``stage1`` given: BLIP-2's recipe, :meth:`Blip2Stage2.from_stage1` (its
      frozen ViT, copies of its ``ln_vision`` and Q-Former);
    * otherwise: ``visual_encoder`` (a ``VisionTransformer``, frozen in place)
      with a fresh ``ln_vision`` (eps 1e-5) and a fresh Q-Former built
      from ``qformer_cfg`` (its ``encoder_width`` must be the ViT's width).
      The queries then learn to read the image from the captions alone.
    """
    if stage1 is not None:
        if visual_encoder is not None or qformer_cfg is not None:
            raise ValueError("build_stage2: with stage1, pass neither visual_encoder nor "
                             "qformer_cfg (both come from the stage-1 model)")
        return Blip2Stage2.from_stage1(stage1, language_model, rng)
    if visual_encoder is None or qformer_cfg is None:
        raise ValueError("build_stage2: without stage1, both visual_encoder and qformer_cfg "
                         "are needed")
    vit = visual_encoder
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"build_stage2: visual_encoder must be a VisionTransformer, got "
                        f"{type(vit).__name__}")
    return Blip2Stage2(vit, LayerNorm(vit.config.width, eps=1e-5), QFormer(qformer_cfg, rng),
                       language_model, rng)


# ---------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------

@dataclass
class Stage2Result:
    loss: float
    soft_prompt: np.ndarray   # (B, Q, D_lm)
    d_soft_prompt: np.ndarray | None = None   # gradient of the loss w.r.t. the soft prompt
    logits: np.ndarray | None = None    # (B, Q+T, V) of the decoder-only LM
    targets: np.ndarray | None = None   # (B, Q+T), -100 where nothing is predicted


def _check_inputs(images, image_embeds, pairs, what: str) -> int:
    """Exactly one of images (B, 3, H, W) / image_embeds (B, S, Dv), float, and
    integer (ids, mask)-like arrays of shape (B, T) each. Returns B."""
    if (images is None) == (image_embeds is None):
        raise ValueError(f"{what}: give images or image_embeds (one of them)")
    given, name = (images, "images") if image_embeds is None else (image_embeds, "image_embeds")
    check_finite(check_float(given, name), name)
    n_images = (images if image_embeds is None else image_embeds).shape[0]
    for (name_a, a), (name_b, b) in pairs:
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what}: expected integer token ids ({name_a}), got dtype {a.dtype}")
        if a.ndim != 2 or b.shape != a.shape:
            raise ValueError(f"{what}: expected {name_a} and {name_b} of the same shape (B, T), "
                             f"got {name_a} {a.shape} and {name_b} {b.shape}")
        if a.shape[0] != n_images:
            raise ValueError(f"{what}: {a.shape[0]} texts for {n_images} images")
    return n_images


def soft_prompt_forward(model: Blip2Stage2, images=None, image_embeds=None, rng=None):
    """The soft prompt (B, Q, D_lm) both designs feed their language model, and the
    cache of its trainable path: frozen ViT (never differentiated) -> ``ln_vision``
    -> Q-Former queries -> ``language_projection``. ``rng`` drives dropout."""
    if image_embeds is None:  # frozen, and its input is pixels: no cache, no backward
        image_embeds = model.visual_encoder.forward(images.astype(model.dtype, copy=False))[0]
    x, c_ln = model.ln_vision.forward(image_embeds)                        # (B, S, Dv)
    q, c_q = model.qformer.forward(image_embeds=x, mode="queries", rng=rng)  # (B, Q, Dq)
    prompt, c_proj = model.language_projection.forward(q)                  # -> (B, Q, Dlm)
    return prompt, (c_ln, c_q, c_proj)


def soft_prompt_backward(model: Blip2Stage2, d_prompt, cache) -> None:
    """Undoes :func:`soft_prompt_forward` from d prompt (B, Q, D_lm), adding into the
    projection, the Q-Former and ``ln_vision``; the ViT below is frozen and its
    input is pixels, so the gradient stops at ``ln_vision``."""
    c_ln, c_q, c_proj = cache
    dq = model.language_projection.backward(d_prompt, c_proj)  # undoes prompt = q W + b
    dx = model.qformer.backward(dq, c_q)  # into the queries, query_tokens summed over B
    model.ln_vision.backward(dx, c_ln)


def stage2_step(model: Blip2Stage2, images, ids, mask, *, image_embeds=None,
                prompt_length: int = 0, rng: np.random.Generator | None = None,
                backward: bool = True) -> Stage2Result:
    """Blip2OPT.forward (``blip2_opt.py``): forward, then (if ``backward``) the
    mirrored backward, adding into the trainable Params only.

    images (B, 3, H, W) float, or ``images=None`` with ``image_embeds`` (B, S, Dv),
    the frozen ViT's output computed beforehand; ids (B, T) "[CLS] words [SEP]
    [PAD].." from the LM's tokenizer; mask (B, T) of 0/1. ``prompt_length``
    leading text tokens (BOS included, as LAVIS counts them) are not predicted.
    ``rng`` drives the Q-Former's dropout. The caller zeroes the gradients first.
    """
    if model.encoder_decoder:
        raise TypeError("stage2_step is the decoder-only (OPT) loss; this model's language "
                        "model is an EncoderDecoderLM: use stage2_prefix_step")
    ids, mask = np.asarray(ids), np.asarray(mask)
    _check_inputs(images, image_embeds, [(("ids", ids), ("mask", mask))], "stage2_step")
    check_prompt_length(prompt_length, ids.shape[1], "stage2_step")
    lm = model.language_model

    # ---------------- forward ----------------
    prompt, c_prompt = soft_prompt_forward(model, images, image_embeds, rng)  # (B, Q, Dlm)
    logits, c_lm = lm.forward(ids, mask, prefix_embeds=prompt)             # (B, Q+T, V), frozen
    targets = causal_lm_targets(ids, mask, model.num_queries, prompt_length)  # -100 on the prompt
    next_token = NextTokenLoss()  # OPT's loss: plain cross-entropy, no label smoothing
    loss, c_loss = next_token.forward(logits, targets)
    result = Stage2Result(loss, prompt, logits=logits, targets=targets)
    if not backward:
        return result

    # ---------------- backward (the forward read bottom-up) ----------------
    dlogits = next_token.backward(1.0, c_loss)  # (B, Q+T, V); the last position predicts nothing
    _, d_prompt = lm.backward(dlogits, c_lm)  # through the frozen LM: d prompt, no weight grad
    soft_prompt_backward(model, d_prompt, c_prompt)  # projection, Q-Former, ln_vision
    result.d_soft_prompt = d_prompt
    return result


def stage2_prefix_step(model: Blip2Stage2, images, prefix_ids, prefix_mask, labels, *,
                       image_embeds=None, rng: np.random.Generator | None = None,
                       backward: bool = True) -> Stage2Result:
    """Blip2T5.forward (``blip2_t5.py``): the prefix language-modelling loss of the
    encoder-decoder design; forward, then (if ``backward``) the mirrored backward
    into the trainable Params only.

    images (B, 3, H, W) float, or ``image_embeds`` (B, S, Dv) computed beforehand;
    prefix_ids (B, S) "words [SEP] [PAD].." the text's first part, which joins
    the soft prompt in the encoder (T5 appends ``</s>`` to it); prefix_mask
    (B, S) 0/1; labels (B, T) "words [SEP]" the rest, -100 at padding: the
    decoder's targets. ``rng`` drives the Q-Former's dropout.
    """
    if not model.encoder_decoder:
        raise TypeError("stage2_prefix_step is the encoder-decoder (FlanT5) loss; this model's "
                        "language model is decoder-only: use stage2_step")
    prefix_ids, prefix_mask, labels = (np.asarray(a) for a in (prefix_ids, prefix_mask, labels))
    _check_inputs(images, image_embeds, [(("prefix_ids", prefix_ids), ("prefix_mask",
                                                                       prefix_mask))],
                  "stage2_prefix_step")
    if labels.ndim != 2 or labels.shape[0] != prefix_ids.shape[0]:
        raise ValueError(f"stage2_prefix_step: expected labels (B={prefix_ids.shape[0]}, T), "
                         f"got shape {labels.shape}")

    # ---------------- forward, then the mirrored backward ----------------
    prompt, c_prompt = soft_prompt_forward(model, images, image_embeds, rng)  # (B, Q, Dlm)
    # encoder [prompt | prefix], decoder the suffix shifted right; through the frozen LM
    # seq2seq_step returns d prompt (its backward ran if asked, adding into no frozen Param)
    loss, d_prompt = seq2seq_step(model.language_model, prefix_ids, prefix_mask, labels,
                                  prefix_embeds=prompt, backward=backward)
    result = Stage2Result(loss, prompt)
    if backward:
        soft_prompt_backward(model, d_prompt, c_prompt)  # projection, Q-Former, ln_vision
        result.d_soft_prompt = d_prompt
    return result
