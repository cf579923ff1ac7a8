"""BLIP-2 stage 2: the Q-Former talks to a frozen language model through soft prompts.

Mirrors salesforce/LAVIS ``lavis/models/blip2_models/blip2_opt.py`` ``Blip2OPT``
(the decoder-only variant; section 3.3 of the BLIP-2 paper):

    image_embeds = ln_vision(ViT(image))                       (B, S, Dv)   ViT frozen
    queries      = QFormer(query_tokens, image_embeds)         (B, Q, Dq)   query path only
    prompt       = language_projection(queries)                (B, Q, Dlm)  "opt_proj"
    logits       = LM([prompt | embed_tokens(ids)])            (B, Q+T, V)  LM frozen
    loss         = CE(logits[:, :-1], targets[:, 1:]),  targets = [-100]*Q + ids (pads -100)

Trainable: ``query_tokens``, the Q-Former, ``ln_vision`` and the projection;
the ViT and the language model are frozen (LAVIS sets ``requires_grad=False``),
in two different ways:

* the ViT is frozen *and never differentiated*: its input is pixels, so no
  gradient is wanted below ``ln_vision``. It sits in stage 1's
  ``minblip.blip2.Frozen`` holder, which ``params()`` does not walk into and
  which runs it without keeping a cache;
* the LM is frozen *but differentiated through*: the loss is computed after
  it, and its gradient must reach the soft prompt. ``LanguageModel.freeze()``
  takes its Params out of ``params()`` and makes its backward compute input
  gradients only, never a weight gradient.

As in LAVIS, the Q-Former's text-only parts are removed for stage 2 (its word
and position embeddings and the text feed-forward networks): only the query
path (embedding LayerNorm, self-attention, cross-attention, query FFN) is
used, and trained. The frozen parts run in evaluation mode (no dropout), and
because the ViT is frozen, :func:`train_stage2` computes its features once
per training image instead of every step (LAVIS recomputes them: its images
are augmented, ours are not).

minblip's language model (``minblip.lm``) uses ``[CLS]`` as BOS and ``[SEP]``
as EOS where OPT uses ``</s>`` and "\\n".
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import world
from .blip2 import Frozen
from .core import Module, check_float
from .evaluate import caption_metrics
from .image import preprocess
from .layers import LayerNorm, Linear
from .lm import (QUESTION_KINDS, LanguageModel, all_named_params, answer_choices, cast_all,
                 causal_lm_targets, generate_text, next_token_logits, qa_text,
                 scene_questions, trainable_named_params)
from .optim import AdamW, clip_grad_norm, warmup_cosine_lr
from .qformer import QFormer, QFormerConfig
from .softmax import CrossEntropyLoss
from .tokenizer import Tokenizer
from .vit import VisionTransformer


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
    trainable ``language_projection`` -> frozen ``LanguageModel``.

    ``params()`` (and so any optimiser built from the model) lists exactly the
    trainable Params; :func:`parameter_counts` compares them with the whole.

    The arguments are used as they are (not copied): the ViT and the LM are
    marked frozen, the Q-Former loses its text parts. Use :meth:`from_stage1`
    to start from a stage-1 model without changing it.
    """

    def __init__(self, visual_encoder, ln_vision: LayerNorm, qformer: QFormer,
                 language_model: LanguageModel, rng: np.random.Generator):
        if isinstance(visual_encoder, Frozen):
            visual_encoder = visual_encoder.module
        for name, value, cls in (("visual_encoder", visual_encoder, VisionTransformer),
                                 ("ln_vision", ln_vision, LayerNorm), ("qformer", qformer, QFormer),
                                 ("language_model", language_model, LanguageModel)):
            if not isinstance(value, cls):
                raise TypeError(f"Blip2Stage2: {name} must be a {cls.__name__}, "
                                f"got {type(value).__name__}")
        vit_width = visual_encoder.config.width
        if ln_vision.dim != vit_width or qformer.cfg.encoder_width != vit_width:
            raise ValueError(f"Blip2Stage2: the ViT width ({vit_width}) must equal ln_vision's "
                             f"({ln_vision.dim}) and the Q-Former's encoder_width "
                             f"({qformer.cfg.encoder_width})")
        self.visual_encoder = Frozen(visual_encoder)
        self.ln_vision = ln_vision
        self.qformer = strip_text_parts(qformer)
        d_in, d_out = qformer.cfg.width, language_model.cfg.width
        # blip2_opt.py: opt_proj = nn.Linear(768, d_llm) with PyTorch's default init,
        # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        self.language_projection = Linear(d_in, d_out, rng)
        bound = 1.0 / math.sqrt(d_in)
        self.language_projection.W.data[...] = rng.uniform(-bound, bound, (d_in, d_out))
        self.language_projection.b.data[...] = rng.uniform(-bound, bound, d_out)
        self.language_model = language_model.freeze()

    @classmethod
    def from_stage1(cls, stage1, language_model: LanguageModel,
                    rng: np.random.Generator) -> "Blip2Stage2":
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

    def named_params(self, prefix: str = "") -> list:
        """The trainable Params only (frozen ViT and LM left out)."""
        return trainable_named_params(self, prefix)

    def to(self, dtype) -> "Blip2Stage2":
        """Every Param, frozen ones included, to ``dtype``."""
        cast_all(self, dtype)
        cast_all(self.visual_encoder.module, dtype)
        return self

    @property
    def image_size(self) -> int:
        return self.visual_encoder.module.config.image_size

    @property
    def num_queries(self) -> int:
        return self.qformer.cfg.num_queries

    # ---- inference helpers (no caches kept, evaluation mode) --------------------------
    def image_features(self, images, batch_size: int = 128):
        """The frozen ViT's output (B, S, Dv) for images (B, 3, H, W), in batches."""
        check_float(images, "images")
        out = [self.visual_encoder.forward(images[s:s + batch_size].astype(self.dtype,
                                                                           copy=False))
               for s in range(0, len(images), batch_size)]
        return np.concatenate(out, axis=0)

    def soft_prompt(self, images=None, image_embeds=None):
        """The projected queries (B, Q, D_lm) the LM reads; from images or from
        precomputed ViT features."""
        if (images is None) == (image_embeds is None):
            raise ValueError("soft_prompt: give images or image_embeds (one of them)")
        if image_embeds is None:
            image_embeds = self.image_features(images)
        x, _ = self.ln_vision.forward(image_embeds)
        q, _ = self.qformer.forward(image_embeds=x, mode="queries")
        return self.language_projection.forward(q)[0]


def build_stage2(language_model: LanguageModel, rng: np.random.Generator, *, stage1=None,
                 visual_encoder=None, qformer_cfg: QFormerConfig | None = None) -> Blip2Stage2:
    """The stage-2 model, initialised the way the material at hand allows:

    * ``stage1`` given: BLIP-2's recipe, :meth:`Blip2Stage2.from_stage1` (its
      frozen ViT, copies of its ``ln_vision`` and Q-Former);
    * otherwise: ``visual_encoder`` (a ``VisionTransformer`` or a ``Frozen``
      one) with a fresh ``ln_vision`` (eps 1e-5) and a fresh Q-Former built
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
    vit = visual_encoder.module if isinstance(visual_encoder, Frozen) else visual_encoder
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
    logits: np.ndarray        # (B, Q+T, V)
    targets: np.ndarray       # (B, Q+T), -100 where nothing is predicted
    soft_prompt: np.ndarray   # (B, Q, D_lm)
    d_soft_prompt: np.ndarray | None = None   # gradient of the loss w.r.t. the soft prompt


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
    if (images is None) == (image_embeds is None):
        raise ValueError("stage2_step: give images or image_embeds (one of them)")
    check_float(images if image_embeds is None else image_embeds,
                "images" if image_embeds is None else "image_embeds")
    ids, mask = np.asarray(ids), np.asarray(mask)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"stage2_step: expected integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"stage2_step: expected ids and mask of the same shape (B, T), got "
                         f"ids {ids.shape} and mask {mask.shape}")
    n_images = (images if image_embeds is None else image_embeds).shape[0]
    if ids.shape[0] != n_images:
        raise ValueError(f"stage2_step: {ids.shape[0]} texts for {n_images} images")
    if not 0 <= prompt_length <= ids.shape[1]:
        raise ValueError(f"stage2_step: prompt_length must be in [0, {ids.shape[1]}], "
                         f"got {prompt_length}")
    lm = model.language_model
    Q = model.num_queries

    # ---------------- forward ----------------
    if image_embeds is None:
        image_embeds = model.visual_encoder.forward(images.astype(model.dtype, copy=False))
    x, c_ln = model.ln_vision.forward(image_embeds)                        # (B, S, Dv)
    q, c_q = model.qformer.forward(image_embeds=x, mode="queries", rng=rng)  # (B, Q, Dq)
    prompt, c_proj = model.language_projection.forward(q)                  # -> (B, Q, Dlm)
    logits, c_lm = lm.forward(ids, mask, prefix_embeds=prompt)             # (B, Q+T, V), frozen
    targets = causal_lm_targets(ids, mask, Q, prompt_length)               # -100 on the prompt
    ce = CrossEntropyLoss()  # OPT's loss: plain CE over the non-ignored positions
    loss, c_ce = ce.forward(logits[:, :-1], targets[:, 1:])
    result = Stage2Result(loss, logits, targets, prompt)
    if not backward:
        return result

    # ---------------- backward (the forward read bottom-up) ----------------
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = ce.backward(1.0, c_ce)  # undoes the shift: the last position predicts nothing
    d_prompt = lm.backward(dlogits, c_lm)  # through the frozen LM: only d prompt, no weight grad
    dq = model.language_projection.backward(d_prompt, c_proj)  # undoes prompt = q W + b
    dx = model.qformer.backward(dq, c_q)  # into the queries, query_tokens summed over B
    model.ln_vision.backward(dx, c_ln)  # the ViT below is frozen and its input is pixels: stop
    result.d_soft_prompt = d_prompt
    return result


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

@dataclass
class Stage2Config:
    """Optimisation of stage 2. LAVIS ``pretrain_stage2.yaml``: AdamW lr 1e-4,
    min lr 5e-5, warmup 2000 steps from 1e-6, weight decay 0.05, batch 64 per GPU."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    max_text_len: int = 20
    prompt: str = ""  # LAVIS pre-trains with "" and fine-tunes COCO with "a photo of"
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_text_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Stage2Config.{name}: expected a positive int, got {v!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"Stage2Config.warmup_steps must be in [0, steps={self.steps}), "
                             f"got {self.warmup_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Stage2History:
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    seconds: float = 0.0


def _pixels(split: world.Split, model: Blip2Stage2) -> np.ndarray:
    return preprocess(split.images, model.image_size).astype(model.dtype)


def train_stage2(model: Blip2Stage2, tokenizer: Tokenizer, split: world.Split,
                 cfg: Stage2Config | None = None, log_every: int = 0) -> Stage2History:
    """Train the soft prompt on ``split``: each step draws ``batch_size`` distinct
    images and a fresh caption for each (``world.describe``), runs
    :func:`stage2_step` and takes an AdamW step on ``model.params()`` (the
    trainable part only) with warmup-cosine learning rates and gradient clipping.
    The frozen ViT's features are computed once, before the first step."""
    cfg = cfg or Stage2Config()
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"train_stage2: expected a Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.language_model.cfg.vocab_size:
        raise ValueError(f"train_stage2: the tokenizer has {tokenizer.vocab_size} tokens, the "
                         f"language model {model.language_model.cfg.vocab_size}")
    if cfg.batch_size > len(split):
        raise ValueError(f"train_stage2: batch_size {cfg.batch_size} exceeds the "
                         f"{len(split)} images of the split")
    start = time.perf_counter()
    features = model.image_features(_pixels(split, model))
    prompt_length = len(tokenizer.tokenize(cfg.prompt)) + 1 if cfg.prompt else 0
    optimizer = AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_rng = np.random.default_rng([cfg.seed, 2])
    step_rng = np.random.default_rng([cfg.seed, 3])
    history = Stage2History()
    for step in range(cfg.steps):
        idx = data_rng.choice(len(split), cfg.batch_size, replace=False)
        texts = [" ".join(t for t in (cfg.prompt, world.describe(split.scenes[i], data_rng)) if t)
                 for i in idx]
        ids, mask = tokenizer.encode(texts, max_length=cfg.max_text_len)
        optimizer.zero_grad()  # the optimiser's Param list: no walk of the module tree
        result = stage2_step(model, None, ids, mask, image_embeds=features[idx],
                             prompt_length=prompt_length, rng=step_rng)
        grad_norm = clip_grad_norm(optimizer.params, cfg.grad_clip)
        lr = warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps,
                              min_lr=min(cfg.min_lr, cfg.lr))
        optimizer.step(lr=lr)
        history.step.append(step)
        history.loss.append(result.loss)
        history.lr.append(lr)
        history.grad_norm.append(grad_norm)
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"stage 2 step {step:4d}  loss {result.loss:.3f}")
    history.seconds = time.perf_counter() - start
    return history


# ---------------------------------------------------------------------------
# Captions, evaluation, zero-shot questions
# ---------------------------------------------------------------------------

def caption_images(model: Blip2Stage2, tokenizer: Tokenizer, images=None, *, image_embeds=None,
                   prompt: str = "", method: str = "beam", num_beams: int = 5,
                   max_length: int = 20, min_length: int = 1, top_p: float = 0.9,
                   suppress_words=(), rng: np.random.Generator | None = None,
                   batch_size: int = 64) -> list[str]:
    """One caption per image, written by the frozen LM after the image's soft prompt
    (``Blip2OPT.generate``: beam search with 5 beams, min_length 1 by default).
    ``max_length`` counts BOS and the prompt; the prompt is not returned."""
    if (images is None) == (image_embeds is None):
        raise ValueError("caption_images: give images or image_embeds (one of them)")
    if image_embeds is None:
        image_embeds = model.image_features(images)
    texts = []
    for s in range(0, len(image_embeds), batch_size):
        prefix = model.soft_prompt(image_embeds=image_embeds[s:s + batch_size])
        texts += generate_text(model.language_model, tokenizer, prefix, prompt=prompt,
                               method=method, max_length=max_length, min_length=min_length,
                               num_beams=num_beams, top_p=top_p,
                               suppress_words=suppress_words, rng=rng)
    return texts


def evaluate_captions(model: Blip2Stage2, tokenizer: Tokenizer, split: world.Split,
                      method: str = "beam", **generate_kwargs) -> tuple[dict, list[str]]:
    """Caption every image of ``split`` and score the captions against the scenes with
    ``world.score_caption`` (``minblip.evaluate.caption_metrics``: per attribute,
    object count, their mean and exact match). Returns (metrics, captions)."""
    captions = caption_images(model, tokenizer, _pixels(split, model), method=method,
                              **generate_kwargs)
    return caption_metrics(split.scenes, captions), captions


def qa_items(split: world.Split, seed: int = 0, kinds=QUESTION_KINDS) -> list[dict]:
    """For every image and every question kind it can answer, one question drawn
    at random: dicts with image index, kind, question, answer."""
    rng = np.random.default_rng(seed)
    items = []
    for i, scene in enumerate(split.scenes):
        by_kind: dict[str, list] = {}
        for kind, question, answer in scene_questions(scene):
            by_kind.setdefault(kind, []).append((question, answer))
        for kind in kinds:
            if kind in by_kind:
                question, answer = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
                items.append({"image": i, "kind": kind, "question": question, "answer": answer})
    return items


def zero_shot_qa(model: Blip2Stage2, tokenizer: Tokenizer, split: world.Split, seed: int = 0,
                 kinds=QUESTION_KINDS) -> dict:
    """Instructed zero-shot answers: the soft prompt of the image, then
    "[CLS] question <question> answer", and the LM's most likely next word
    (over the whole vocabulary) is compared with the truth. Stage 2 never saw a
    question: only the LM did, as text, during its pretraining.

    Also measured: the same prompts with no image at all ("blind": what the LM
    guesses from the question alone) and chance (one over the number of
    possible answers). Returns {kind: {"n", "accuracy", "blind", "chance"}},
    an "overall" entry, and "items" (each with its prediction).
    """
    items = qa_items(split, seed, kinds)
    if not items:
        raise ValueError("zero_shot_qa: the split has no answerable question")
    lm = model.language_model
    features = model.image_features(_pixels(split, model))
    images = np.array([it["image"] for it in items])
    prompts = [qa_text(it["question"]) for it in items]
    prefix = model.soft_prompt(image_embeds=features[images])
    seen = next_token_logits(lm, tokenizer, prompts, prefix).argmax(axis=1)
    blind = next_token_logits(lm, tokenizer, prompts).argmax(axis=1)
    for it, s, b in zip(items, seen, blind):
        it["prediction"] = tokenizer.id_to_token(int(s))
        it["blind_prediction"] = tokenizer.id_to_token(int(b))
    max_objects = max(len(scene.objects) for scene in split.scenes)
    out = {}
    for kind in kinds:
        chosen = [it for it in items if it["kind"] == kind]
        if chosen:
            out[kind] = {"n": len(chosen),
                         "accuracy": float(np.mean([it["prediction"] == it["answer"]
                                                    for it in chosen])),
                         "blind": float(np.mean([it["blind_prediction"] == it["answer"]
                                                 for it in chosen])),
                         "chance": 1.0 / len(answer_choices(kind, max_objects))}
    out["overall"] = {"n": len(items),
                      "accuracy": float(np.mean([it["prediction"] == it["answer"]
                                                 for it in items])),
                      "blind": float(np.mean([it["blind_prediction"] == it["answer"]
                                              for it in items])),
                      "chance": float(np.mean([out[it["kind"]]["chance"] for it in items]))}
    out["items"] = items
    return out


def parameter_counts(model: Module) -> dict:
    """Trainable vs total parameters of a model, and per top-level part:
    {"trainable", "frozen", "total", "parts": {name: (trainable, total)}}.
    Frozen parts count in "total" (a ``Frozen`` holder's module too); a tied
    Param is counted once."""
    if not isinstance(model, Module):
        raise TypeError(f"parameter_counts: expected a Module, got {type(model).__name__}")
    parts = {}
    for name, value in vars(model).items():
        if isinstance(value, Frozen):
            parts[name] = (0, sum(p.size for _, p in all_named_params(value.module)))
        elif isinstance(value, Module):
            parts[name] = (sum(p.size for _, p in trainable_named_params(value)),
                           sum(p.size for _, p in all_named_params(value)))
    trainable = sum(p.size for _, p in trainable_named_params(model))
    total = sum(p.size for _, p in all_named_params(model)) + sum(
        sum(p.size for _, p in all_named_params(v.module))
        for v in vars(model).values() if isinstance(v, Frozen))
    return {"trainable": trainable, "frozen": total - trainable, "total": total, "parts": parts}
