"""BLIP-2 end to end on the built-in world: ``python -m minblip blip2``.

The whole of BLIP-2 at toy scale, in the order of the paper (Li et al. 2023,
sections 3.2-3.3), on the pieces of notebooks 10 and 11:

1. **A frozen image encoder.** BLIP-2 freezes the ViT-g of EVA-CLIP, a strong
   contrastive image encoder. Here it is the ViT of a BLIP checkpoint from
   ``python -m minblip demo`` (``vision_checkpoint``) or, without one, of a BLIP
   trained with ITC alone on the same training images (a CLIP, as EVA-CLIP is),
   long enough that its own ITC retrieval is good: stage 1 can only find in the
   image what the frozen encoder put there (notebook 10 measures it). With a
   checkpoint, the images come from the checkpoint's own world (its seed and
   image size), so its test images stay unseen.
2. **Stage 1** (:mod:`minblip.blip2_stage1`): the Q-Former learns ITC + ITM + ITG
   against the frozen ViT. Retrieval is measured on the test split with the
   ITC similarity (the maximum over the queries, LAVIS ``compute_sim_matrix``)
   and, as BLIP-2 reports it, after re-ranking each query's ``k_test`` best
   candidates by ITM match logit + ITC similarity. The headline keys
   ``stage1_{i2t,t2i}_recall@k`` are the ITC scores and the re-ranked ones are
   ``stage1_reranked_...``.
3. **Frozen language models**, one per design of the paper: a decoder-only
   OPT-style LM (:mod:`minblip.lm`) and an encoder-decoder T5-style LM
   (:mod:`minblip.t5`), each pretrained on text about the world (two captions
   of one scene, a caption followed by questions and answers), then frozen.
4. **Stage 2** (:mod:`minblip.blip2_stage2`), once per language model: the
   projected query outputs are soft prompts for the frozen LM; the queries,
   Q-Former, ``ln_vision`` and the projection train on captions, with the
   language-modelling loss (OPT) or the prefix language-modelling loss (T5).
   Measured on the test split: the attributes the generated captions get
   right, and zero-shot answers to questions (which stage 2 never saw) next to
   the LM's answers without the image ("blind") and chance.

Stage 2 starts from the stage-1 Q-Former by default, as BLIP-2 does
(``pretrain_stage2.yaml`` loads the stage-1 weights); ``stage2_init="fresh"``
starts from a new Q-Former and ``"unfrozen"`` from stage 1 with the language
model trained too (``minblip.blip2_experiment`` compares the three).

The parts run in two processes when ``jobs=2`` (the default of the command):
the language models pretrain in a worker while this process trains the ViT and
stage 1; then the two stage-2 runs go side by side. Every part has its own
seeded generators, so the numbers do not depend on ``jobs``.

:func:`run_blip2` writes to its report folder ``metrics.json``, one checkpoint
per language model (``blip2_opt.npz``, ``blip2_t5.npz``: the whole model, for
``python -m minblip caption`` and ``ask``), ``captions_<lm>.jsonl`` (the
stage-2 caption of every test image next to its scene), ``answers_<lm>.jsonl``
(every zero-shot question with the answers given), ``loss_curves.png`` and
``captions.png``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from . import report, world
from .blip2_checkpoint import save_blip2
from .blip2_stage2 import build_stage2
from .evaluate import image_features, recall_at_k, text_features
from .evaluate_blip2 import evaluate_stage2_captions, stage1_retrieval_metrics, zero_shot_qa
from .files import write_json_atomic, write_jsonl_atomic
from .image import preprocess
from .lm import LanguageModel, LMConfig
from .qformer import QFormerConfig
from .questions import QUESTION_KINDS, build_lm_tokenizer
from .t5 import EncoderDecoderLM, T5Config
from .train import Trainer, build_dataset, build_tokenizer, config_from_dict
from .train_blip2 import (LMPretrainConfig, LMPretraining, Seq2SeqPretraining, Stage1Config,
                          Stage1Training, Stage2Config, Stage2Training, pretrained_vision)

STAGE2_INITS = ("stage1", "fresh", "unfrozen")
LANGUAGE_MODELS = ("opt", "t5")
LM_NAMES = {"opt": "decoder-only (OPT-style), language-modelling loss",
            "t5": "encoder-decoder (T5-style), prefix language-modelling loss"}
CAPTION_ATTRIBUTES = ("colour", "shape", "size", "position", "object_count")


@dataclass
class Blip2RunConfig:
    """One BLIP-2 run on the built-in world. The sizes are those of notebooks 10
    and 11; the runs are longer."""

    seed: int = 0
    n_train: int = 5000           # training images of the ViT, stage 1 and stage 2
    n_test: int = 200             # held-out images for every measurement
    batch_size: int = 32          # image-text pairs per step, every training here
    # the frozen image encoder when no checkpoint is given: an ITC-only BLIP of the demo's
    # sizes and geometry (minblip.demo.DEMO_RECIPE: one 10-pixel patch per cell of the
    # world's 3x3 grid); with a checkpoint, its world and ViT are used instead
    image_size: int = 30
    patch_size: int = 10
    vision_steps: int = 4000
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_lr: float = 2e-3
    vision_warmup: int = 200
    vision_init_std: float = 0.05
    # the Q-Former (stage 1, and stage 2 when it starts fresh)
    qformer_width: int = 64
    qformer_depth: int = 2
    qformer_heads: int = 4
    num_queries: int = 8
    stage1_steps: int = 2000
    stage1_lr: float = 2e-3
    stage1_init_std: float = 0.1  # BLIP-2 starts from BERT; from scratch, 0.02 stalls ITC
    stage1_weights: tuple = (1.0, 1.0, 1.0)  # ITC, ITM, ITG
    # the frozen language models
    language_models: tuple = LANGUAGE_MODELS
    lm_width: int = 48
    lm_depth: int = 2             # the decoder-only LM's layers; the T5's encoder and decoder
    lm_heads: int = 4
    t5_mlp_dim: int = 128         # T5's gated feed-forward has three matrices to OPT's two
    lm_steps: int = 3000          # 1500 left the decoder-only LM unable to carry sizes over
    lm_lr: float = 5e-3
    lm_corpus_size: int = 16384   # documents written once, drawn from at every step
    # stage 2
    stage2_steps: int = 4000
    stage2_lr: float = 5e-3
    stage2_init: str = "stage1"   # or "fresh" (no stage 1) or "unfrozen" (the LM trains too)
    stage2_min_prefix: int = 0    # T5's prefix-LM split: the shortest prefix (Stage2Config)
    # evaluation
    k_test: int = 16              # ITM re-ranks each query's k_test best ITC candidates
    num_beams: int = 5            # Blip2OPT.generate's and Blip2T5.generate's default

    def __post_init__(self):
        self.language_models = tuple(self.language_models)
        self.stage1_weights = tuple(float(w) for w in self.stage1_weights)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                low = 0 if f.name in ("seed", "stage2_min_prefix", "vision_warmup") else 1
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
        unknown = [m for m in self.language_models if m not in LANGUAGE_MODELS]
        if unknown or not self.language_models or \
                len(set(self.language_models)) != len(self.language_models):
            raise ValueError(f"Blip2RunConfig.language_models: expected distinct names from "
                             f"{LANGUAGE_MODELS}, got {self.language_models}")
        if len(self.stage1_weights) != 3 or min(self.stage1_weights) < 0 \
                or not self.stage1_weights[0] > 0:
            raise ValueError(f"Blip2RunConfig.stage1_weights: expected three weights >= 0 "
                             f"(ITC, ITM, ITG) with ITC > 0, got {self.stage1_weights}")
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
        d = asdict(self)
        d["language_models"], d["stage1_weights"] = (list(self.language_models),
                                                     list(self.stage1_weights))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Blip2RunConfig":
        return config_from_dict(cls, d, "BLIP-2 run")

    def vision_overrides(self) -> dict:
        """``TrainConfig`` fields of the ITC-only BLIP that trains the frozen ViT."""
        return dict(steps=self.vision_steps, patch_size=self.patch_size,
                    warmup_steps=_warmup(self.vision_steps, self.vision_warmup),
                    batch_size=self.batch_size, width=self.vision_width,
                    depth=self.vision_depth, heads=self.vision_heads, lr=self.vision_lr,
                    init_std=self.vision_init_std, loss_weights=(1.0, 0.0, 0.0))

    def stage1_config(self) -> Stage1Config:
        return Stage1Config(seed=self.seed, width=self.qformer_width, depth=self.qformer_depth,
                            heads=self.qformer_heads, mlp_dim=4 * self.qformer_width,
                            num_queries=self.num_queries, embed_dim=32,
                            init_std=self.stage1_init_std, steps=self.stage1_steps,
                            batch_size=self.batch_size, lr=self.stage1_lr,
                            warmup_steps=_warmup(self.stage1_steps, 30),
                            loss_weights=self.stage1_weights)

    def language_model(self, kind: str, vocab_size: int):
        """A fresh language model of design ``kind`` ("opt" or "t5"), seeded by the run."""
        rng = np.random.default_rng([self.seed, 21 if kind == "opt" else 23])
        if kind == "opt":
            return LanguageModel(LMConfig(vocab_size=vocab_size, width=self.lm_width,
                                          depth=self.lm_depth, heads=self.lm_heads,
                                          mlp_dim=4 * self.lm_width, max_positions=48), rng)
        return EncoderDecoderLM(T5Config(vocab_size=vocab_size, width=self.lm_width,
                                         depth=self.lm_depth, heads=self.lm_heads,
                                         mlp_dim=self.t5_mlp_dim, max_positions=48), rng)

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
                            min_prefix=self.stage2_min_prefix, seed=self.seed)


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


def blip_itc_recall(vision, data: world.WorldDataset) -> dict:
    """Recall@1 of the BLIP the frozen ViT comes from, by its own ITC (the ViT's
    [CLS] against its own text encoder) on the test split: what the frozen
    encoder offers, the reference for stage 1."""
    pixels = preprocess(data.test.images, vision.encoder.config.image_size)
    tok = build_tokenizer()
    _, image_feat = image_features(vision.blip, pixels)
    ids, mask = tok.encode(data.test.captions, max_length=vision.train_config.max_text_len)
    sim = image_feat @ text_features(vision.blip, ids, mask).T
    return {"i2t_recall@1": recall_at_k(sim)[1], "t2i_recall@1": recall_at_k(sim.T)[1]}


# ---------------------------------------------------------------------------------------
# The parts. Each is a plain function of picklable arguments, so it can run in a
# worker process; each measures its own CPU time.
# ---------------------------------------------------------------------------------------

def vision_and_stage1(cfg: Blip2RunConfig, data: world.WorldDataset, vision=None,
                      progress: bool = False, eval_every: int = 0) -> dict:
    """Train the frozen ViT's BLIP (unless ``vision`` is given) and stage 1; measure
    retrieval. ``eval_every`` > 0 also records the ITC recall@1 curve every that
    many stage-1 steps. Returns vision, stage1 (the Trainer), recall, curve,
    seconds, cpu and stage1_cpu_per_step (CPU seconds of one training step)."""
    cpu0, seconds = time.process_time(), {}
    start = time.perf_counter()
    if vision is None:
        vision = pretrained_vision(dataset=data, progress=progress, **cfg.vision_overrides())
    seconds["vision"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer = Trainer(Stage1Training(cfg.stage1_config(), vision.encoder, data))
    test_pixels = preprocess(data.test.images, vision.encoder.config.image_size)
    curve, train_cpu = [], 0.0
    while trainer.step < cfg.stage1_steps:
        clock = time.process_time()
        trainer.run(until=trainer.step + (eval_every or cfg.stage1_steps), progress=progress)
        train_cpu += time.process_time() - clock
        if eval_every:
            m = stage1_retrieval_metrics(trainer.model, trainer.task.tokenizer,
                                         data.test.captions, images=test_pixels)
            curve.append({"step": trainer.step, "i2t_recall@1": m["itc_i2t_recall@1"],
                          "t2i_recall@1": m["itc_t2i_recall@1"],
                          "train_cpu_seconds": train_cpu})
    seconds["stage1"] = time.perf_counter() - start
    start = time.perf_counter()
    recall = stage1_retrieval_metrics(trainer.model, trainer.task.tokenizer, data.test.captions,
                                      images=test_pixels, k_test=cfg.k_test)
    seconds["stage1_eval"] = time.perf_counter() - start
    return {"vision": vision, "stage1": trainer, "recall": recall, "curve": curve,
            "seconds": seconds, "cpu": time.process_time() - cpu0,
            "stage1_cpu_per_step": train_cpu / cfg.stage1_steps}


def pretrain_language_models(cfg: Blip2RunConfig, progress: bool = False) -> dict:
    """Pretrain and freeze one language model per ``cfg.language_models``.
    Returns {kind: {"lm", "losses", "seconds"}} and "cpu"."""
    cpu0 = time.process_time()
    tok = build_lm_tokenizer()
    out = {}
    for kind in cfg.language_models:
        start = time.perf_counter()
        lm = cfg.language_model(kind, tok.vocab_size)
        task = (LMPretraining if kind == "opt" else Seq2SeqPretraining)(
            lm, tok, cfg.lm_pretrain_config())
        losses = Trainer(task).run(progress=progress)["loss"]
        out[kind] = {"lm": lm.freeze(), "losses": losses, "seconds": time.perf_counter() - start}
    out["cpu"] = time.process_time() - cpu0
    return out


def build_stage2_model(cfg: Blip2RunConfig, lm, stage1_model, vit, init: str | None = None):
    """The stage-2 model around ``lm`` for ``init`` (default ``cfg.stage2_init``):
    "stage1" copies the stage-1 ``ln_vision`` and Q-Former (BLIP-2's recipe),
    "fresh" builds new ones on the frozen ViT, "unfrozen" is "stage1" with the
    language model trained too (its Params unfrozen; the ViT stays frozen, its
    features fixed inputs). ``lm`` is used as it is: pass a copy to keep it."""
    init = cfg.stage2_init if init is None else init
    model_rng = np.random.default_rng([cfg.seed, 22])
    if init == "fresh":
        model = build_stage2(lm, model_rng, visual_encoder=vit,
                             qformer_cfg=cfg.fresh_qformer_config(lm.cfg.vocab_size,
                                                                  vit.config.width))
    else:
        model = build_stage2(lm, model_rng, stage1=stage1_model)
    if init == "unfrozen":
        model.language_model.unfreeze()
    return model


def train_and_evaluate_stage2(cfg: Blip2RunConfig, kind: str, lm, stage1_model, vit,
                              data: world.WorldDataset, *, init: str | None = None,
                              checkpoint=None, progress: bool = False, eval_every: int = 0,
                              eval_method: str = "beam") -> dict:
    """Stage 2 with the language model ``lm`` of design ``kind``, then its captions
    and zero-shot answers on the test split (``eval_method`` "beam" with
    ``cfg.num_beams``, or "greedy"). ``eval_every`` > 0 also records both every
    that many steps (the curves of ``minblip.blip2_experiment``). ``checkpoint``:
    a path to save the whole trained model to. Returns the metrics, captions,
    answers, losses, curve, parameter counts, seconds and cpu."""
    cpu0, start = time.process_time(), time.perf_counter()
    tok = build_lm_tokenizer()
    model = build_stage2_model(cfg, lm, stage1_model, vit, init)
    trainer = Trainer(Stage2Training(model, tok, data.train, cfg.stage2_config()))

    def evaluate():
        caption_metrics, captions = evaluate_stage2_captions(
            model, tok, data.test, method=eval_method, num_beams=cfg.num_beams)
        return caption_metrics, captions, zero_shot_qa(model, tok, data.test, seed=cfg.seed)

    curve = []
    while trainer.step < cfg.stage2_steps:
        trainer.run(until=trainer.step + (eval_every or cfg.stage2_steps), progress=progress)
        if eval_every:
            caption_metrics, _, qa = evaluate()
            curve.append({"step": trainer.step,
                          "caption_attribute_accuracy":
                              caption_metrics["caption_attribute_accuracy"],
                          "zero_shot_answer_accuracy": qa["overall"]["accuracy"]})
    train_seconds = time.perf_counter() - start
    caption_metrics, captions, qa = evaluate()
    counts = model.parameter_counts()
    if checkpoint is not None:
        save_blip2(checkpoint, model, tok,
                   extra={"caption_attribute_accuracy":
                          caption_metrics["caption_attribute_accuracy"],
                          "zero_shot_answer_accuracy": qa["overall"]["accuracy"]})
    metrics = {"language_model": LM_NAMES[kind], "stage2_init": init or cfg.stage2_init,
               **{f"stage2_{k}": v for k, v in caption_metrics.items()}, **_qa_metrics(qa),
               "trainable_parameters": counts["trainable"], "frozen_parameters": counts["frozen"],
               "total_parameters": counts["total"],
               "parameters_by_part": {name: {"trainable": t, "total": n}
                                      for name, (t, n) in counts["parts"].items()},
               "stage2_final_loss": float(np.mean(trainer.history["loss"][-50:])),
               "stage2_seconds": train_seconds,
               "stage2_eval_seconds": time.perf_counter() - start - train_seconds}
    return {"metrics": metrics, "captions": captions, "answers": qa["items"],
            "losses": trainer.history["loss"], "curve": curve,
            "cpu": time.process_time() - cpu0}


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
# Running parts here or in a worker process
# ---------------------------------------------------------------------------------------

class _Done:
    """The result of a part run in this process, with a future's ``result()``."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class PartRunner:
    """Runs the parts of a pipeline: with ``jobs=1`` each part at once in this
    process; with ``jobs=2`` a part submitted with :meth:`submit` goes to one
    worker process (spawned, one BLAS thread) while this process works on. A
    context manager; the worker is shut down on exit."""

    def __init__(self, jobs: int = 1):
        world.check_int("jobs", jobs, 1)
        if jobs > 2:
            raise ValueError(f"jobs: one BLIP-2 run has at most two parts to run at a time, "
                             f"so jobs must be 1 or 2, got {jobs}")
        self.pool = None
        if jobs == 2:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            # the worker reads this at import: one BLAS thread per process on two cores
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
            self.pool = ProcessPoolExecutor(max_workers=1,
                                            mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn, *args, **kwargs):
        if self.pool is None:
            return _Done(fn(*args, **kwargs))
        return self.pool.submit(fn, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if self.pool is not None:
            # on an error or Ctrl-C, drop what is queued instead of waiting for it
            self.pool.shutdown(wait=kind is None, cancel_futures=kind is not None)
        return False


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def run_blip2(out, cfg: Blip2RunConfig | None = None, *, vision_checkpoint=None,
              jobs: int = 1, progress: bool = False, log=None) -> dict:
    """Run BLIP-2 on the built-in world and write the report folder ``out``.

    ``cfg``: a :class:`Blip2RunConfig` (default: the defaults).
    ``vision_checkpoint``: a BLIP checkpoint (``python -m minblip demo`` writes
    ``runs/demo/checkpoint.npz``) whose ViT becomes the frozen image encoder;
    None trains an ITC-only BLIP first. ``jobs``: 1, or 2 to run the language
    models' pretraining and one stage 2 in a worker process (same numbers).
    ``progress``: tqdm bars for the parts run in this process. ``log``: called
    with one line of text per finished part (e.g. ``print``).

    Returns the metrics written to ``out/metrics.json``: the stage-1 keys, the
    frozen ViT's own BLIP retrieval, one entry per language model with its
    captions, zero-shot answers and parameter counts, and the wall and CPU time
    (this process and the worker's parts). Raises FileNotFoundError for a
    missing checkpoint and ValueError for a bad configuration, before any training.
    """
    cfg = Blip2RunConfig() if cfg is None else cfg
    if not isinstance(cfg, Blip2RunConfig):
        raise TypeError(f"run_blip2: expected a Blip2RunConfig, got {type(cfg).__name__}")
    if vision_checkpoint is not None and not Path(vision_checkpoint).is_file():
        raise FileNotFoundError(f"vision checkpoint: no file at '{vision_checkpoint}' "
                                f"('python -m minblip demo' writes runs/demo/checkpoint.npz)")
    runner = PartRunner(jobs)  # checks jobs; its worker starts with the first part sent to it
    say = log if log is not None else (lambda line: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    worker_cpu = 0.0

    with runner:
        # ---- the language models pretrain (in the worker when there is one) ----
        lms_future = runner.submit(pretrain_language_models, cfg)
        # ---- the world, the frozen image encoder and stage 1, here ----
        vision = None
        if vision_checkpoint is not None:
            vision = pretrained_vision(vision_checkpoint)
            data = checkpoint_world(vision.train_config, cfg.n_train, cfg.n_test)
            say(f"frozen image encoder: the ViT of {vision.source} (its world: seed "
                f"{data.seed}, {data.image_size}x{data.image_size} images)")
        else:
            data = world.make_dataset(cfg.n_train, 0, cfg.n_test, seed=cfg.seed,
                                      image_size=cfg.image_size)
            say(f"frozen image encoder: no vision checkpoint given, so a BLIP trains first: "
                f"{cfg.vision_steps} steps of ITC alone on {cfg.n_train} images")
        part1 = vision_and_stage1(cfg, data, vision, progress=progress)
        vision, stage1 = part1["vision"], part1["stage1"]
        vit = vision.encoder
        blip_recall = blip_itc_recall(vision, data)
        say(f"  ViT width {vit.config.width}, depth {vit.config.depth}, "
            f"{vit.param_count(include_frozen=True):,} parameters; its BLIP's own ITC "
            f"recall@1 {blip_recall['i2t_recall@1']:.3f} / {blip_recall['t2i_recall@1']:.3f} "
            f"({part1['seconds']['vision']:.0f} s)")
        recall = part1["recall"]
        say(f"stage 1: {cfg.stage1_steps} steps ({part1['seconds']['stage1']:.0f} s); ITC "
            f"recall@1 image->text {recall['itc_i2t_recall@1']:.3f}, text->image "
            f"{recall['itc_t2i_recall@1']:.3f} on {len(data.test)} test pairs")
        lms = lms_future.result()
        worker_cpu += lms["cpu"] if runner.pool is not None else 0.0
        for kind in cfg.language_models:
            say(f"{kind} language model ({LM_NAMES[kind].split(',')[0]}): {cfg.lm_steps} steps "
                f"on caption and question-answer text ({lms[kind]['seconds']:.0f} s), loss "
                f"{np.mean(lms[kind]['losses'][-50:]):.3f}; now frozen")

        # ---- stage 2, once per language model: the first here, the second in the worker ----
        kinds = cfg.language_models
        futures, elsewhere = {}, kinds[1:]  # every LM but the first: to the worker
        for kind in (*elsewhere, kinds[0]):  # submitted first, so both run at once
            args = (cfg, kind, lms[kind]["lm"], stage1.model, vit, data)
            checkpoint = out / f"blip2_{kind}.npz"
            futures[kind] = (runner.submit(train_and_evaluate_stage2, *args,
                                           checkpoint=checkpoint) if kind in elsewhere else
                             _Done(train_and_evaluate_stage2(*args, checkpoint=checkpoint,
                                                             progress=progress)))
        stage2 = {}
        for kind in kinds:
            stage2[kind] = futures[kind].result()
            if kind in elsewhere and runner.pool is not None:
                worker_cpu += stage2[kind]["cpu"]
            m = stage2[kind]["metrics"]
            say(f"stage 2 with the {kind} LM (Q-Former from {cfg.stage2_init}): "
                f"{cfg.stage2_steps} steps ({m['stage2_seconds']:.0f} s), caption attribute "
                f"accuracy {m['stage2_caption_attribute_accuracy']:.3f}, zero-shot answers "
                f"{m['zero_shot_answer_accuracy']:.3f} (blind {m['zero_shot_blind_accuracy']:.3f})")

    # ---- the report ----
    metrics = {"stage2_init": cfg.stage2_init, "vision_encoder": vision.source,
               "n_train": len(data.train), "n_test": len(data.test), "world_seed": data.seed,
               "config": cfg.to_dict(), "language_models": list(cfg.language_models)}
    for key, value in recall.items():  # itc_i2t_recall@1 -> stage1_i2t_recall@1
        name = key[len("itc_"):] if key.startswith("itc_") else f"reranked_{key}"
        metrics[f"stage1_{name}"] = value
    metrics.update({f"vision_blip_itc_{k}": v for k, v in blip_recall.items()})
    stage1_counts = stage1.model.parameter_counts()
    metrics.update(stage1_trainable_parameters=stage1_counts["trainable"],
                   stage1_total_parameters=stage1_counts["total"],
                   blip_parameters=vision.blip.param_count(include_frozen=True))
    for kind in cfg.language_models:
        metrics[kind] = {**stage2[kind]["metrics"],
                         "lm_final_loss": float(np.mean(lms[kind]["losses"][-50:])),
                         "lm_seconds": lms[kind]["seconds"],
                         "checkpoint": str(out / f"blip2_{kind}.npz")}
        records = [{"generated": caption, "truth": truth, "scene": scene.to_dict()}
                   for scene, truth, caption in zip(data.test.scenes, data.test.captions,
                                                    stage2[kind]["captions"])]
        write_jsonl_atomic(out / f"captions_{kind}.jsonl", records)
        write_jsonl_atomic(out / f"answers_{kind}.jsonl", stage2[kind]["answers"])
    metrics.update({f"{part}_seconds": s for part, s in part1["seconds"].items()})
    plot_blip2_losses(vision.history, stage1.history,
                      {kind: lms[kind]["losses"] for kind in cfg.language_models},
                      {kind: stage2[kind]["losses"] for kind in cfg.language_models},
                      out / "loss_curves.png")
    first = cfg.language_models[0]
    report.plot_captions(data.test.images, stage2[first]["captions"], data.test.captions,
                         out / "captions.png")
    metrics["jobs"] = jobs
    metrics["total_seconds"] = time.perf_counter() - wall0
    metrics["cpu_seconds"] = time.process_time() - cpu0 + worker_cpu
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------------
# Plots and the table
# ---------------------------------------------------------------------------------------

def _curve(ax, values, label: str) -> None:
    """A moving average over 25 steps, each point drawn at the last step it covers."""
    smoothed = report.smooth(values)
    ax.plot(np.arange(len(smoothed)) + len(values) - len(smoothed), smoothed, label=label)


def plot_blip2_losses(vision_history, stage1_history, lm_losses: dict, stage2_losses: dict,
                      path) -> None:
    """Three panels: the pretraining of the parts that will be frozen (the ITC-only
    BLIP, if one was trained here, and each LM), stage 1's three losses, and each
    stage 2's loss."""
    fig, axes = report.new_figure(1, 3, figsize=(15, 4))
    if vision_history is not None:
        _curve(axes[0], vision_history["itc"], "BLIP ITC (its ViT: frozen after)")
    for kind, losses in lm_losses.items():
        _curve(axes[0], losses, f"{kind} LM cross-entropy (frozen after)")
    axes[0].set_title("pretraining the frozen parts")
    for name in ("itc", "itm", "itg"):
        if any(stage1_history[name]):
            _curve(axes[1], stage1_history[name], name.upper())
    axes[1].set_title("stage 1: the Q-Former reads the frozen ViT")
    for kind, losses in stage2_losses.items():
        _curve(axes[2], losses, f"{kind}: {'prefix ' if kind == 't5' else ''}LM loss")
    axes[2].set_title("stage 2: soft prompts for the frozen LMs")
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
                     f"the ViT's BLIP {metrics[f'vision_blip_itc_{d}_recall@1']:.3f}, "
                     f"chance {chance:.3f}"))
        rows.append((f"  {label} recall@1, ITM re-ranked", metrics[f"stage1_reranked_{d}_recall@1"],
                     None))
    for kind in metrics["language_models"]:
        m = metrics[kind]
        rows.append((f"stage 2, {kind} LM: captions (beam search)", None, None))
        rows.append(("  attribute accuracy", m["stage2_caption_attribute_accuracy"], None))
        for attribute in CAPTION_ATTRIBUTES:
            rows.append((f"    {attribute.replace('_', ' ')}",
                         m[f"stage2_caption_{attribute}_accuracy"], None))
        rows.append(("  exact match", m["stage2_caption_exact_match"], None))
        rows.append((f"stage 2, {kind} LM: zero-shot answers", None, None))
        for q in ("", *QUESTION_KINDS):
            prefix = f"zero_shot_{q}_" if q else "zero_shot_"
            if f"{prefix}answer_accuracy" in m:
                rows.append((f"  {q or 'all questions'}", m[f"{prefix}answer_accuracy"],
                             f"blind {m[f'{prefix}blind_accuracy']:.3f}, "
                             f"chance {m[f'{prefix}chance_accuracy']:.3f}"))
    lines = [f"{'measure (test split)':<44} {'value':>7}  reference"]
    for label, value, ref in rows:
        lines.append(f"{label:<44} {'' if value is None else f'{value:7.3f}':>7}  {ref or ''}"
                     .rstrip())
    lines.append("")
    for kind in metrics["language_models"]:
        t, n = metrics[kind]["trainable_parameters"], metrics[kind]["total_parameters"]
        lines.append(f"parameters with the {kind} LM: {t:,} trainable of {n:,} "
                     f"({100 * t / n:.0f}%; the frozen ViT and LM included)")
    lines.append(f"the BLIP the ViT comes from: {metrics['blip_parameters']:,} parameters, all "
                 f"trained; stage 2 started from {metrics['stage2_init']}")
    parts = ", ".join(f"{part} {metrics[f'{part}_seconds']:.0f} s"
                      for part in ("vision", "stage1"))
    lines.append(f"time: {parts}; total {metrics['total_seconds']:.0f} s wall with "
                 f"{metrics['jobs']} process(es), {metrics['cpu_seconds']:.0f} s CPU")
    return "\n".join(lines)
