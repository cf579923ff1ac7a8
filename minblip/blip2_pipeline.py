"""BLIP-2 end to end on the built-in world: ``python -m minblip blip2``.

The whole of BLIP-2 at toy scale, in the order of the paper (Li et al. 2023,
sections 3.2-3.3), on the pieces of notebooks 10 and 11:

1. **A frozen image encoder.** BLIP-2 freezes the ViT-g of EVA-CLIP. Here it is
   the ViT of a BLIP checkpoint from ``python -m minblip demo`` (``vision_checkpoint``)
   or, without one, of a short BLIP run trained with ITC alone on the same
   training images (notebook 10's recipe): a contrastive image encoder, as
   EVA-CLIP is. With a checkpoint, the images come from the checkpoint's own
   world (its seed and image size), so its test images stay unseen.
2. **Stage 1** (:mod:`minblip.blip2_stage1`): the Q-Former learns ITC + ITM + ITG
   against the frozen ViT. Retrieval is measured on the test split with the
   ITC similarity (the maximum over the queries, LAVIS ``compute_sim_matrix``)
   and, as BLIP-2 reports it, after re-ranking each query's ``k_test`` best
   candidates by ITM match logit + ITC similarity. At this scale ITM is
   still weak after a short run and the re-ranking lowers recall, so the
   headline keys ``stage1_{i2t,t2i}_recall@k`` are the ITC scores and the
   re-ranked ones are ``stage1_reranked_...``.
3. **A frozen language model** (:mod:`minblip.lm`): an OPT-style decoder
   pretrained on text about the world (two captions of one scene, and a
   caption followed by questions and answers), then frozen.
4. **Stage 2** (:mod:`minblip.blip2_stage2`): the projected query outputs are
   soft prompts for the frozen LM; the queries, Q-Former, ``ln_vision`` and the
   projection train on captions. Measured on the test split: the attributes
   the generated captions get right, and zero-shot answers to questions (which
   stage 2 never saw) next to the LM's answers without the image ("blind")
   and chance.

Stage 2 starts from the stage-1 Q-Former by default, as BLIP-2 does
(``pretrain_stage2.yaml`` loads the stage-1 weights); ``stage2_init="fresh"``
starts from a new Q-Former instead. The README reports what each start reaches.

:func:`run_blip2` writes to its report folder ``metrics.json``,
``captions.jsonl`` (the stage-2 caption of every test image next to its
scene), ``answers.jsonl`` (every zero-shot question with the answers given),
``loss_curves.png`` and ``captions.png``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from . import report, world
from .blip2_stage2 import build_stage2
from .evaluate_blip2 import evaluate_stage2_captions, stage1_retrieval_metrics, zero_shot_qa
from .files import write_json_atomic, write_jsonl_atomic
from .image import preprocess
from .lm import LanguageModel, LMConfig
from .qformer import QFormerConfig
from .questions import QUESTION_KINDS, build_lm_tokenizer
from .train import Trainer, build_dataset, config_from_dict
from .train_blip2 import (LMPretrainConfig, LMPretraining, Stage1Config, Stage1Training,
                          Stage2Config, Stage2Training, pretrained_vision)

STAGE2_INITS = ("stage1", "fresh")
CAPTION_ATTRIBUTES = ("colour", "shape", "size", "position", "object_count")


@dataclass
class Blip2RunConfig:
    """One BLIP-2 run on the built-in world. The sizes and learning rates are
    those of notebooks 10 and 11; the runs are longer."""

    seed: int = 0
    n_train: int = 2000           # training images of stage 1 and stage 2
    n_test: int = 200             # held-out images for every measurement
    batch_size: int = 32          # image-text pairs per step, every training here
    # the frozen image encoder when no checkpoint is given: an ITC-only BLIP (notebook 10)
    vision_steps: int = 1500
    vision_width: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    vision_lr: float = 3e-3
    vision_init_std: float = 0.1  # features start spread out, so ITC leaves its plateau early
    # the Q-Former (stage 1, and stage 2 when it starts fresh)
    qformer_width: int = 64
    qformer_depth: int = 2
    qformer_heads: int = 4
    num_queries: int = 8
    stage1_steps: int = 600
    stage1_lr: float = 2e-3
    stage1_init_std: float = 0.1  # BLIP-2 starts from BERT; from scratch, 0.02 stalls ITC
    # the frozen language model
    lm_width: int = 48
    lm_depth: int = 2
    lm_heads: int = 4
    lm_steps: int = 1500
    lm_lr: float = 5e-3
    lm_corpus_size: int = 4096    # documents written once, drawn from at every step
    # stage 2
    stage2_steps: int = 2000
    stage2_lr: float = 5e-3
    stage2_init: str = "stage1"   # or "fresh": a new Q-Former learns from the captions alone
    # evaluation
    k_test: int = 16              # ITM re-ranks each query's k_test best ITC candidates
    num_beams: int = 5            # Blip2OPT.generate's default

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                low = 0 if f.name == "seed" else 1
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                        or value < low:
                    raise ValueError(f"Blip2RunConfig.{f.name}: expected an int >= {low}, "
                                     f"got {value!r}")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not value > 0:
                    raise ValueError(f"Blip2RunConfig.{f.name}: expected a positive number, "
                                     f"got {value!r}")
        if self.stage2_init not in STAGE2_INITS:
            raise ValueError(f"Blip2RunConfig.stage2_init: expected one of {STAGE2_INITS}, "
                             f"got {self.stage2_init!r}")
        for name in ("n_train", "lm_corpus_size"):
            if self.batch_size > getattr(self, name):
                raise ValueError(f"Blip2RunConfig: batch_size {self.batch_size} exceeds {name} "
                                 f"{getattr(self, name)} (each batch draws distinct items)")
        for part in ("vision", "qformer", "lm"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ValueError(f"Blip2RunConfig: {part}_heads ({heads}) must divide "
                                 f"{part}_width ({width})")
        if self.k_test < 10:
            raise ValueError(f"Blip2RunConfig.k_test: expected at least 10 candidates (for "
                             f"recall@10), got {self.k_test}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Blip2RunConfig":
        return config_from_dict(cls, d, "BLIP-2 run")

    def vision_overrides(self) -> dict:
        """``TrainConfig`` fields of the ITC-only BLIP that trains the frozen ViT."""
        return dict(steps=self.vision_steps, warmup_steps=_warmup(self.vision_steps, 20),
                    batch_size=self.batch_size, width=self.vision_width,
                    depth=self.vision_depth, heads=self.vision_heads, lr=self.vision_lr,
                    init_std=self.vision_init_std, loss_weights=(1.0, 0.0, 0.0))

    def stage1_config(self) -> Stage1Config:
        return Stage1Config(seed=self.seed, width=self.qformer_width, depth=self.qformer_depth,
                            heads=self.qformer_heads, mlp_dim=4 * self.qformer_width,
                            num_queries=self.num_queries, embed_dim=32,
                            init_std=self.stage1_init_std, steps=self.stage1_steps,
                            batch_size=self.batch_size, lr=self.stage1_lr,
                            warmup_steps=_warmup(self.stage1_steps, 30))

    def lm_config(self, vocab_size: int) -> LMConfig:
        return LMConfig(vocab_size=vocab_size, width=self.lm_width, depth=self.lm_depth,
                        heads=self.lm_heads, mlp_dim=4 * self.lm_width, max_positions=48)

    def fresh_qformer_config(self, vocab_size: int, encoder_width: int) -> QFormerConfig:
        """The Q-Former of a fresh stage 2 (notebook 11): stage 1's sizes, BERT's init."""
        return QFormerConfig(vocab_size=vocab_size, width=self.qformer_width,
                             depth=self.qformer_depth, heads=self.qformer_heads,
                             mlp_dim=4 * self.qformer_width, num_queries=self.num_queries,
                             encoder_width=encoder_width)

    def lm_pretrain_config(self) -> LMPretrainConfig:
        return LMPretrainConfig(steps=self.lm_steps, batch_size=self.batch_size, lr=self.lm_lr,
                                warmup_steps=_warmup(self.lm_steps, 20),
                                corpus_size=self.lm_corpus_size, seed=self.seed)

    def stage2_config(self) -> Stage2Config:
        return Stage2Config(steps=self.stage2_steps, batch_size=self.batch_size,
                            lr=self.stage2_lr, warmup_steps=_warmup(self.stage2_steps, 20),
                            seed=self.seed)


def _warmup(steps: int, usual: int) -> int:
    """The usual warmup, or a tenth of a short run."""
    return min(usual, steps // 10)


# ---------------------------------------------------------------------------------------
# Data and the frozen image encoder
# ---------------------------------------------------------------------------------------

def _first(split: world.Split, n: int) -> world.Split:
    return world.Split(name=split.name, images=split.images[:n], captions=split.captions[:n],
                       scenes=split.scenes[:n], image_ids=split.image_ids[:n],
                       all_captions=split.all_captions[:n])


def checkpoint_world(train_config, n_train: int, n_test: int) -> world.WorldDataset:
    """The world a checkpoint's BLIP was trained on (its seed, sizes and image
    size), cut to its first ``n_train`` training and ``n_test`` test images. The
    ViT trained on that training split only, so these test images are unseen."""
    full = build_dataset(train_config)
    for name, n, split in (("n_train", n_train, full.train), ("n_test", n_test, full.test)):
        if n > len(split):
            raise ValueError(f"{name}={n}, but the vision checkpoint's world has only "
                             f"{len(split)} {split.name} images: ask for {len(split)} or fewer")
    return dataclasses.replace(full, train=_first(full.train, n_train),
                               test=_first(full.test, n_test))


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def run_blip2(out, cfg: Blip2RunConfig | None = None, *, vision_checkpoint=None,
              progress: bool = False, log=None) -> dict:
    """Run BLIP-2 on the built-in world and write the report folder ``out``.

    ``cfg``: a :class:`Blip2RunConfig` (default: the defaults).
    ``vision_checkpoint``: a BLIP checkpoint (``python -m minblip demo`` writes
    ``runs/demo/checkpoint.npz``) whose ViT becomes the frozen image encoder;
    None trains a short ITC-only BLIP first. ``progress``: tqdm bars.
    ``log``: called with one line of text per finished part (e.g. ``print``).

    Returns the metrics written to ``out/metrics.json`` (see the module
    docstring). Raises FileNotFoundError for a missing checkpoint and
    ValueError for a bad configuration, before any training.
    """
    cfg = Blip2RunConfig() if cfg is None else cfg
    if not isinstance(cfg, Blip2RunConfig):
        raise TypeError(f"run_blip2: expected a Blip2RunConfig, got {type(cfg).__name__}")
    if vision_checkpoint is not None and not Path(vision_checkpoint).is_file():
        raise FileNotFoundError(f"vision checkpoint: no file at '{vision_checkpoint}' "
                                f"('python -m minblip demo' writes runs/demo/checkpoint.npz)")
    say = log if log is not None else (lambda line: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    seconds = {}

    # ---- 1. the world and the frozen image encoder ----
    start = time.perf_counter()
    if vision_checkpoint is not None:
        vision = pretrained_vision(vision_checkpoint)
        data = checkpoint_world(vision.train_config, cfg.n_train, cfg.n_test)
        say(f"frozen image encoder: the ViT of {vision.source} (its world: seed "
            f"{data.seed}, {data.image_size}x{data.image_size} images)")
    else:
        data = world.make_dataset(cfg.n_train, 0, cfg.n_test, seed=cfg.seed)
        say(f"frozen image encoder: no vision checkpoint given, so a short BLIP trains "
            f"first: {cfg.vision_steps} steps of ITC alone (notebook 10's recipe)")
        vision = pretrained_vision(dataset=data, progress=progress, **cfg.vision_overrides())
    vit = vision.encoder
    seconds["vision"] = time.perf_counter() - start
    say(f"  ViT width {vit.config.width}, depth {vit.config.depth}, "
        f"{vit.param_count():,} parameters ({seconds['vision']:.0f} s)")

    # ---- 2. stage 1: the Q-Former learns to read the frozen ViT ----
    start = time.perf_counter()
    trainer = Trainer(Stage1Training(cfg.stage1_config(), vit, data))
    trainer.run(progress=progress)
    seconds["stage1"] = time.perf_counter() - start
    stage1 = trainer.model
    start = time.perf_counter()
    test_pixels = preprocess(data.test.images, vit.config.image_size)
    recall = stage1_retrieval_metrics(stage1, trainer.task.tokenizer, data.test.captions,
                                      images=test_pixels, k_test=cfg.k_test)
    eval_seconds = time.perf_counter() - start
    say(f"stage 1: {cfg.stage1_steps} steps ({seconds['stage1']:.0f} s); ITC recall@1 "
        f"image->text {recall['itc_i2t_recall@1']:.3f}, text->image "
        f"{recall['itc_t2i_recall@1']:.3f} on {len(data.test)} test pairs")

    # ---- 3. the language model: pretrained on text, then frozen ----
    start = time.perf_counter()
    tok = build_lm_tokenizer()
    lm = LanguageModel(cfg.lm_config(tok.vocab_size), np.random.default_rng([cfg.seed, 21]))
    lm_losses = Trainer(LMPretraining(lm, tok, cfg.lm_pretrain_config())).run(
        progress=progress)["loss"]
    seconds["lm"] = time.perf_counter() - start
    say(f"language model: {cfg.lm_steps} steps on caption and question-answer text "
        f"({seconds['lm']:.0f} s), loss {np.mean(lm_losses[-50:]):.3f}; now frozen")

    # ---- 4. stage 2: soft prompts for the frozen LM ----
    start = time.perf_counter()
    model_rng = np.random.default_rng([cfg.seed, 22])
    if cfg.stage2_init == "stage1":
        model = build_stage2(lm, model_rng, stage1=stage1)
    else:
        model = build_stage2(lm, model_rng, visual_encoder=vit,
                             qformer_cfg=cfg.fresh_qformer_config(tok.vocab_size,
                                                                  vit.config.width))
    stage2_losses = Trainer(Stage2Training(model, tok, data.train, cfg.stage2_config())).run(
        progress=progress)["loss"]
    seconds["stage2"] = time.perf_counter() - start
    say(f"stage 2 (Q-Former from {cfg.stage2_init}): {cfg.stage2_steps} steps "
        f"({seconds['stage2']:.0f} s), loss {np.mean(stage2_losses[:10]):.3f} -> "
        f"{np.mean(stage2_losses[-50:]):.3f}")

    start = time.perf_counter()
    captions_metrics, captions = evaluate_stage2_captions(model, tok, data.test, method="beam",
                                                          num_beams=cfg.num_beams)
    qa = zero_shot_qa(model, tok, data.test, seed=cfg.seed)
    seconds["eval"] = eval_seconds + time.perf_counter() - start

    # ---- the report ----
    metrics = {"stage2_init": cfg.stage2_init, "vision_encoder": vision.source,
               "n_train": len(data.train), "n_test": len(data.test),
               "world_seed": data.seed, "config": cfg.to_dict()}
    for key, value in recall.items():  # itc_i2t_recall@1 -> stage1_i2t_recall@1
        name = key[len("itc_"):] if key.startswith("itc_") else f"reranked_{key}"
        metrics[f"stage1_{name}"] = value
    metrics.update({f"stage2_{k}": v for k, v in captions_metrics.items()})
    metrics.update(_qa_metrics(qa))
    counts = model.parameter_counts()
    stage1_counts = stage1.parameter_counts()
    metrics.update(trainable_parameters=counts["trainable"], frozen_parameters=counts["frozen"],
                   total_parameters=counts["total"],
                   parameters_by_part={name: {"trainable": t, "total": n}
                                       for name, (t, n) in counts["parts"].items()},
                   stage1_trainable_parameters=stage1_counts["trainable"],
                   stage1_total_parameters=stage1_counts["total"])
    metrics.update(lm_final_loss=float(np.mean(lm_losses[-50:])),
                   stage2_final_loss=float(np.mean(stage2_losses[-50:])))
    metrics.update({f"{part}_seconds": s for part, s in seconds.items()})

    records = [{"generated": caption, "truth": truth, "scene": scene.to_dict()}
               for scene, truth, caption in zip(data.test.scenes, data.test.captions, captions)]
    write_jsonl_atomic(out / "captions.jsonl", records)
    write_jsonl_atomic(out / "answers.jsonl", qa["items"])
    plot_blip2_losses(vision.history, trainer.history, lm_losses, stage2_losses,
                      out / "loss_curves.png")
    report.plot_captions(data.test.images, captions, data.test.captions, out / "captions.png")
    metrics["total_seconds"] = time.perf_counter() - wall0
    metrics["cpu_seconds"] = time.process_time() - cpu0
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _qa_metrics(qa: dict) -> dict:
    """Flat keys from ``zero_shot_qa``: overall and per question kind, with the
    blind (no image) and chance baselines."""
    out = {"zero_shot_questions": qa["overall"]["n"],
           "zero_shot_answer_accuracy": qa["overall"]["accuracy"],
           "zero_shot_blind_accuracy": qa["overall"]["blind"],
           "zero_shot_chance_accuracy": qa["overall"]["chance"]}
    for kind in QUESTION_KINDS:
        if kind in qa:
            out[f"zero_shot_{kind}_answer_accuracy"] = qa[kind]["accuracy"]
            out[f"zero_shot_{kind}_blind_accuracy"] = qa[kind]["blind"]
            out[f"zero_shot_{kind}_chance_accuracy"] = qa[kind]["chance"]
    return out


# ---------------------------------------------------------------------------------------
# Plots and the table
# ---------------------------------------------------------------------------------------

def _curve(ax, values, label: str) -> None:
    """A moving average over 25 steps, each point drawn at the last step it covers."""
    smoothed = report.smooth(values)
    ax.plot(np.arange(len(smoothed)) + len(values) - len(smoothed), smoothed, label=label)


def plot_blip2_losses(vision_history, stage1_history, lm_losses, stage2_losses, path) -> None:
    """Three panels: the pretraining of the parts that will be frozen (the ITC-only
    BLIP, if one was trained here, and the LM), stage 1's three losses, stage 2's loss."""
    fig, axes = report.new_figure(1, 3, figsize=(15, 4))
    if vision_history is not None:
        _curve(axes[0], vision_history["itc"], "BLIP ITC (its ViT: frozen after)")
    _curve(axes[0], lm_losses, "LM next-word CE (frozen after)")
    axes[0].set_title("pretraining the frozen parts")
    for name in ("itc", "itm", "itg"):
        _curve(axes[1], stage1_history[name], name.upper())
    axes[1].set_title("stage 1: the Q-Former reads the frozen ViT")
    _curve(axes[2], stage2_losses, "LM CE of the caption after the soft prompt")
    axes[2].set_title("stage 2: soft prompts for the frozen LM")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (moving average over 25 steps)")
    fig.tight_layout()
    report.save_figure(fig, path)


def format_blip2_table(metrics: dict) -> str:
    """The results as a text table: each measure next to its references."""
    rows = [("stage 1 retrieval, ITC (max over queries)", None, None)]
    for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
        chance = 1.0 / metrics["n_test"]
        rows.append((f"  {label} recall@1", metrics[f"stage1_{d}_recall@1"],
                     f"chance {chance:.3f}"))
        rows.append((f"  {label} recall@1, ITM re-ranked", metrics[f"stage1_reranked_{d}_recall@1"],
                     None))
    rows.append(("stage 2 captions (beam search)", None, None))
    rows.append(("  attribute accuracy", metrics["stage2_caption_attribute_accuracy"], None))
    for attribute in CAPTION_ATTRIBUTES:
        rows.append((f"    {attribute.replace('_', ' ')}",
                     metrics[f"stage2_caption_{attribute}_accuracy"], None))
    rows.append(("  exact match", metrics["stage2_caption_exact_match"], None))
    rows.append(("zero-shot answers", None, None))
    for kind in ("", *QUESTION_KINDS):
        prefix = f"zero_shot_{kind}_" if kind else "zero_shot_"
        if f"{prefix}answer_accuracy" in metrics:
            rows.append((f"  {kind or 'all questions'}", metrics[f"{prefix}answer_accuracy"],
                         f"blind {metrics[f'{prefix}blind_accuracy']:.3f}, "
                         f"chance {metrics[f'{prefix}chance_accuracy']:.3f}"))
    lines = [f"{'measure (test split)':<44} {'value':>7}  reference"]
    for label, value, ref in rows:
        lines.append(f"{label:<44} {'' if value is None else f'{value:7.3f}':>7}  {ref or ''}"
                     .rstrip())
    t, n = metrics["trainable_parameters"], metrics["total_parameters"]
    lines.append(f"\nparameters: {t:,} trainable of {n:,} ({100 * t / n:.0f}%; the frozen "
                 f"ViT and LM included); stage 2 started from {metrics['stage2_init']}")
    lines.append("time: " + ", ".join(f"{part} {metrics[f'{part}_seconds']:.0f} s" for part in
                                      ("vision", "stage1", "lm", "stage2", "eval"))
                 + f"; total {metrics['total_seconds']:.0f} s wall, "
                   f"{metrics['cpu_seconds']:.0f} s CPU")
    return "\n".join(lines)
