"""Training: the one loop every minblip model trains with, and BLIP pretraining.

:class:`Trainer` is the loop. Each step it draws a batch, zeroes the
gradients of the optimiser's Params, runs the task's step (a forward and its
mirrored backward, which add into the gradients), clips the gradient norm,
takes an AdamW step at the learning rate of a linear-warmup-then-cosine
schedule (LAVIS ``linear_warmup_cosine_lr``; BLIP itself decays per epoch) and
records the step's scalars in one :class:`History`. It shows a progress bar,
writes checkpoints, and resumes a run exactly.

It guards every task the same way: a step whose loss or gradient norm is NaN
or inf stops before the optimiser touches a weight (:class:`TrainingDiverged`
names the step, the value and the last good checkpoint), a checkpoint is never
written from NaN or inf weights (``minblip.checkpoint.save_checkpoint``
refuses), and the temporary files of a save that was killed are removed when
the next run starts.

What is trained, and how, is a *task*: an object with

* ``name`` (the progress bar's label) and ``config``, whose fields ``steps``,
  ``lr``, ``min_lr``, ``warmup_steps``, ``weight_decay``, ``grad_clip`` (and
  optionally ``checkpoint_every``) set the loop, and ``to_dict()`` the stored
  configuration;
* ``model``: the Module whose trainable ``params()`` the optimiser updates;
* ``generators()``: the random generators of the batches and of the steps
  (dropout, ITM negatives), which may be one and the same;
* ``sample_batch(data_rng)`` and ``step(batch, step_rng) -> {name: float}``;
* optionally ``checkpoint_extra()`` (JSON state of the task to save) and
  ``check_checkpoint(extra, path)`` (refuse a checkpoint of another task).

The tasks: :class:`BlipPretraining` below (salesforce/BLIP ``pretrain.py``:
ITC + ITM + LM each step), and in :mod:`minblip.train_blip2` BLIP-2's stage
1, stage 2 and the pretraining of its language model.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace

import numpy as np

from . import world
from .blip import BLIP, BLIPConfig, pretrain_step
from .checkpoint import load_checkpoint, read_header, rng_from_state, rng_state, save_checkpoint
from .files import remove_stale_temps
from .image import preprocess
from .optim import AdamW, clip_grad_norm, warmup_cosine_lr
from .text import TextConfig
from .tokenizer import Tokenizer
from .vit import ViTConfig


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

class History:
    """Per-step curves by name: ``history["step"]``, ``["lr"]``, ``["grad_norm"]`` and
    every scalar a task's step returns (``["itc"]``, ``["loss"]``, ...), each a
    list with one float per step."""

    def __init__(self, curves: dict | None = None):
        self.curves = {name: list(values) for name, values in (curves or {}).items()}

    def append(self, **values) -> None:
        for name, value in values.items():
            self.curves.setdefault(name, []).append(float(value))

    def __getitem__(self, name: str) -> list:
        if name not in self.curves:
            raise KeyError(f"history has no curve {name!r}; it has {sorted(self.curves)}")
        return self.curves[name]

    def __contains__(self, name: str) -> bool:
        return name in self.curves

    def __len__(self) -> int:
        return len(self.curves.get("step", []))

    def names(self) -> list[str]:
        return list(self.curves)

    def to_dict(self) -> dict:
        return {name: list(values) for name, values in self.curves.items()}


class TrainingDiverged(RuntimeError):
    """A training step gave a NaN or inf loss or gradient norm. The step was
    stopped before the optimiser, so the weights are those of the step before.

    ``step``: the step that failed; ``values``: {name: value} of the non-finite
    scalars ("grad_norm" for the gradient norm); ``checkpoint``: (path, step) of
    the last checkpoint the run wrote or resumed from, or None."""

    def __init__(self, step: int, steps: int, values: dict, checkpoint):
        self.step, self.values, self.checkpoint = step, values, checkpoint
        what = ", ".join(("the gradient norm" if name == "grad_norm" else f"the loss {name!r}")
                         + f" is {value}" for name, value in values.items())
        last = (f"the last good checkpoint is {os.fspath(checkpoint[0])} (step {checkpoint[1]}), "
                f"left as it was" if checkpoint is not None else "no checkpoint was written")
        super().__init__(f"training diverged at step {step} of {steps}: {what}; the step was "
                         f"stopped before the optimiser changed any weight and {last}. A "
                         f"lower learning rate usually helps.")
        self._arguments = (step, steps, values, checkpoint)

    def __reduce__(self):  # rebuilt from its arguments when a worker process raises it
        return type(self), self._arguments


class Trainer:
    """The training loop around one task (see the module docstring).

    Owns the optimiser (AdamW over the task model's trainable Params), the
    task's two random generators, the step count and the history, so a run
    can be saved and resumed exactly. ``last_checkpoint`` is (path, step) of
    the checkpoint last saved or restored, or None."""

    def __init__(self, task):
        self.task = task
        self.model = task.model
        cfg = task.config
        self.optimizer = AdamW(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.data_rng, self.step_rng = task.generators()
        self.step = 0
        self.history = History()
        self.train_seconds = 0.0
        self.last_checkpoint = None

    @property
    def cfg(self):
        """The task's configuration."""
        return self.task.config

    def lr_at(self, step: int) -> float:
        cfg = self.task.config
        return warmup_cosine_lr(step, cfg.steps, cfg.lr, min(cfg.warmup_steps, cfg.steps - 1),
                                min_lr=min(cfg.min_lr, cfg.lr))

    def train_step(self) -> dict:
        """One step; returns the task's scalars (losses) of this step. Raises
        :class:`TrainingDiverged`, with every weight unchanged, when a scalar or
        the gradient norm is NaN or inf."""
        batch = self.task.sample_batch(self.data_rng)
        self.optimizer.zero_grad()  # the optimiser's list of Params: no tree walk per step
        # NumPy's overflow warnings from inside a diverging step would only repeat, line
        # by line, what the check below reports once, by name
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scalars = self.task.step(batch, self.step_rng)  # forward, then the mirrored backward
            grad_norm = clip_grad_norm(self.optimizer.params, self.task.config.grad_clip)
        # AdamW would spread one NaN gradient into every weight it updates, and its
        # moments would keep it: stop here, before the update
        bad = {name: value for name, value in {**scalars, "grad_norm": grad_norm}.items()
               if not math.isfinite(value)}
        if bad:
            raise TrainingDiverged(self.step, self.task.config.steps, bad, self.last_checkpoint)
        lr = self.lr_at(self.step)
        self.optimizer.step(lr=lr)
        self.history.append(step=self.step, **scalars, lr=lr, grad_norm=grad_norm)
        self.step += 1
        return scalars

    def run(self, until: int | None = None, progress: bool = True, checkpoint_path=None,
            log=None):
        """Train until step ``until`` (default: the configured number of steps),
        saving a checkpoint to ``checkpoint_path`` (if given) every
        ``checkpoint_every`` steps of the config and at the end. Returns the history.

        Before the first step, the temporary files a killed save of
        ``checkpoint_path`` left are removed (``log``, a callable taking a line
        of text such as ``print``, is told which). A diverged step raises
        :class:`TrainingDiverged` and saves nothing."""
        cfg = self.task.config
        until = cfg.steps if until is None else min(until, cfg.steps)
        every = getattr(cfg, "checkpoint_every", 0)
        if checkpoint_path is not None:
            for stale in remove_stale_temps(checkpoint_path):
                if log is not None:
                    log(f"removed {stale}, left by a save that was interrupted")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=until, initial=self.step, desc=self.task.name, unit="step",
                       dynamic_ncols=True)
        start = time.perf_counter()
        try:
            while self.step < until:
                scalars = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in scalars.items()})
                if (checkpoint_path is not None and every and self.step % every == 0
                        and self.step < until):
                    self.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save(checkpoint_path)
        finally:  # a diverged step or an interrupt ends the bar's line before the message
            self.train_seconds += time.perf_counter() - start
            if bar is not None:
                bar.close()
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        return self.history

    def _generator_state(self) -> dict:
        state = {"data_rng": rng_state(self.data_rng)}
        if self.step_rng is not self.data_rng:
            state["step_rng"] = rng_state(self.step_rng)
        return state

    def save(self, path) -> None:
        """The model's trainable Params, the optimiser, the generators, the history
        and the task's own state, atomically to the ``.npz`` file ``path``."""
        extra = {**self._generator_state(), "history": self.history.to_dict(),
                 "train_seconds": self.train_seconds}
        if hasattr(self.task, "checkpoint_extra"):
            extra.update(self.task.checkpoint_extra())
        save_checkpoint(path, self.model, self.task.config.to_dict(), self.step,
                        optimizer=self.optimizer, extra=extra)
        self.last_checkpoint = (path, self.step)

    def restore(self, path) -> "Trainer":
        """Continue from the checkpoint at ``path``, written by :meth:`save` for a task
        built the same way (same configuration, checked): training on gives the
        same parameters as a run that was never interrupted. Returns self."""
        info = load_checkpoint(path, self.model,
                               config=config_as_saved(self.task.config, read_header(path)),
                               optimizer=self.optimizer)
        extra = info["extra"]
        if hasattr(self.task, "check_checkpoint"):
            self.task.check_checkpoint(extra, path)
        self.step = info["step"]
        self.data_rng = rng_from_state(extra["data_rng"])
        self.step_rng = (rng_from_state(extra["step_rng"]) if "step_rng" in extra
                         else self.data_rng)
        self.history = History(extra["history"])
        self.train_seconds = float(extra["train_seconds"])
        self.last_checkpoint = (path, self.step)
        return self


# ---------------------------------------------------------------------------------------
# BLIP pretraining
# ---------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that defines a BLIP pretraining run: data, model size and
    optimisation. The defaults are the demo: a model of about 0.3M parameters
    trained for a few minutes on two CPU cores.
    """

    seed: int = 0
    # data (minblip.world)
    image_size: int = 32
    max_objects: int = 2
    n_train: int = 5000
    n_val: int = 200
    n_test: int = 200
    max_text_len: int = 20
    # model
    patch_size: int = 8
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    embed_dim: int = 32
    init_std: float = 0.05  # 0.02 (BERT's) leaves ITC flat for hundreds of steps here
    pos_embed_std: float | None = None  # the ViT's position table; None: init_std
    pos_embed_at_output: bool = False  # the table added again after the ViT (ViTConfig)
    dropout: float = 0.0
    sharing: str = "all_but_self_attention"
    label_smoothing: float = 0.1
    # optimisation
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    loss_weights: tuple = (1.0, 1.0, 1.0)
    checkpoint_every: int = 500

    def __post_init__(self):
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        check_run_fields(self, ("steps", "batch_size", "n_train", "width", "depth", "heads",
                                "image_size", "patch_size", "mlp_ratio", "embed_dim",
                                "max_text_len"), "TrainConfig")
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds n_train {self.n_train}")
        if len(self.loss_weights) != 3:
            raise ValueError(f"loss_weights needs three numbers (ITC, ITM, LM), "
                             f"got {self.loss_weights}")
        if self.pos_embed_std is not None and not (_is_kind(self.pos_embed_std, 0.0)
                                                   and self.pos_embed_std >= 0):
            raise ValueError(f"TrainConfig.pos_embed_std: expected None (init_std) or a "
                             f"finite number >= 0, got {self.pos_embed_std!r}")
        if not isinstance(self.pos_embed_at_output, bool):
            raise ValueError(f"TrainConfig.pos_embed_at_output: expected true or false, "
                             f"got {self.pos_embed_at_output!r}")
        if not _is_kind(self.checkpoint_every, 0) or self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every: expected an int >= 0 (0: save "
                             f"at the end only), got {self.checkpoint_every!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "training")

    def model_config(self, vocab_size: int) -> BLIPConfig:
        vision = ViTConfig(image_size=self.image_size, patch_size=self.patch_size,
                           width=self.width, depth=self.depth, heads=self.heads,
                           mlp_dim=self.mlp_ratio * self.width, dropout=self.dropout,
                           init_std=self.init_std, pos_embed_std=self.pos_embed_std,
                           pos_embed_at_output=self.pos_embed_at_output)
        text = TextConfig(vocab_size=vocab_size, width=self.width, depth=self.depth,
                          heads=self.heads, mlp_dim=self.mlp_ratio * self.width,
                          max_positions=self.max_text_len, dropout=self.dropout,
                          encoder_width=self.width, init_std=self.init_std)
        return BLIPConfig(vision=vision, text=text, embed_dim=self.embed_dim,
                          sharing=self.sharing, label_smoothing=self.label_smoothing,
                          proj_init_std=self.init_std)


def config_as_saved(cfg, header: dict) -> dict:
    """``cfg.to_dict()`` as a checkpoint whose header (:func:`read_header`) is
    ``header`` holds it: a field added to the config after the file was written
    is left out while ``cfg`` keeps that field's default, which is what the
    saved run did. Any other difference still makes ``load_checkpoint`` refuse."""
    saved = header["config"]
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    return {name: value for name, value in cfg.to_dict().items()
            if name in saved or name not in defaults or value != defaults[name]}


def check_run_fields(cfg, positive_ints, what: str) -> None:
    """The checks every run's config shares: the named fields are positive ints,
    ``warmup_steps`` lies in [0, steps), ``lr`` and ``grad_clip`` are finite and
    positive, ``min_lr`` and ``weight_decay`` finite and >= 0 (a NaN learning
    rate would make every weight NaN after one step). A ValueError names the
    field and the value."""
    for name in positive_ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what}.{name}: expected a positive int, got {v!r}")
    if not 0 <= cfg.warmup_steps < cfg.steps:
        raise ValueError(f"{what}.warmup_steps must be in [0, steps={cfg.steps}), "
                         f"got {cfg.warmup_steps}")
    for name, low in (("lr", "> 0"), ("grad_clip", "> 0"), ("min_lr", ">= 0"),
                      ("weight_decay", ">= 0")):
        v = getattr(cfg, name)
        if (not _is_kind(v, 0.0) or v < 0 or (low == "> 0" and v == 0)):
            raise ValueError(f"{what}.{name}: expected a finite number {low}, got {v!r}")


def _is_kind(value, default) -> bool:
    """Whether ``value`` may stand where a config field's ``default`` stands: an int
    for an int, a finite int or float for a float, text for text, a list or
    tuple of such for a tuple, true/false for a bool."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(default, float):
        return (isinstance(value, (int, float, np.integer, np.floating))
                and not isinstance(value, bool) and math.isfinite(value))
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and (
            not default or all(_is_kind(v, default[0]) for v in value))
    return True


_KIND_NAMES = ((bool, "true or false"), (int, "an integer"), (float, "a finite number"),
               (str, "text"), (tuple, "a list"))


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass read from a dict (a checkpoint, a JSON
    file). A key it does not know, or a value of another kind than the field's
    default (:func:`_is_kind`: ``"lr": "tiny"``, ``"width": 16.5``), is refused
    with a ValueError naming the key and the value, before anything is built."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} options: expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} options {unknown}")
    for f in fields(cls):
        if f.name in d and f.default is not MISSING and not _is_kind(d[f.name], f.default):
            kind = next(name for t, name in _KIND_NAMES if isinstance(f.default, t))
            raise ValueError(f"{what} option {f.name!r}: expected {kind}, got {d[f.name]!r}")
    return cls(**d)


def build_tokenizer() -> Tokenizer:
    """The word-level tokenizer for every word the world's captions can use."""
    return Tokenizer(world.vocabulary())


def build_dataset(cfg: TrainConfig) -> world.WorldDataset:
    return world.make_dataset(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed,
                              image_size=cfg.image_size, max_objects=cfg.max_objects)


class BlipPretraining:
    """BLIP pretraining on the built-in world: each step draws B distinct training
    images with one caption each and runs ITC + ITM + LM (``pretrain_step``)."""

    name = "pretraining"

    def __init__(self, cfg: TrainConfig, dataset: world.WorldDataset | None = None,
                 train_images=None, train_captions=None, model: BLIP | None = None):
        """By default the training data is the world's train split, with a fresh
        caption drawn for every image at every step. To train on fixed data
        instead (a noisy web set, CapFilt's bootstrapped set), pass
        ``train_images`` uint8 (N, H, W, 3) and ``train_captions``: N lists of
        captions (an image whose list is empty is never drawn). ``model``
        starts from given weights (fine-tuning) instead of a fresh init.
        """
        self.config = cfg
        self.tokenizer = build_tokenizer()
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        if (train_images is None) != (train_captions is None):
            raise ValueError("pass train_images and train_captions together")
        if train_images is None:
            train_images = self.dataset.train.images
            self.train_captions = None
            self.drawable = np.arange(len(train_images))
        else:
            if len(train_captions) != len(train_images):
                raise ValueError(f"train_captions: expected one list per image "
                                 f"({len(train_images)}), got {len(train_captions)}")
            self.train_captions = [list(c) for c in train_captions]
            self.drawable = np.flatnonzero([len(c) > 0 for c in self.train_captions])
        if len(self.drawable) < cfg.batch_size:
            raise ValueError(f"only {len(self.drawable)} training images have a caption, "
                             f"fewer than batch_size {cfg.batch_size}")
        self.train_pixels = preprocess(train_images, cfg.image_size)
        self.model = model if model is not None else BLIP(
            cfg.model_config(self.tokenizer.vocab_size), np.random.default_rng([cfg.seed, 1]))

    def generators(self):
        """(batches and captions, negatives and dropout)."""
        return np.random.default_rng([self.config.seed, 2]), np.random.default_rng(
            [self.config.seed, 3])

    def sample_batch(self, rng: np.random.Generator):
        """B distinct training images, each with one caption: freshly drawn from
        its scene, or picked from its given captions. Distinct images keep
        ITC from treating another caption of the same image as a negative."""
        idx = rng.choice(self.drawable, self.config.batch_size, replace=False)
        if self.train_captions is None:
            scenes = self.dataset.train.scenes
            captions = [world.describe(scenes[i], rng) for i in idx]
        else:
            captions = [c[rng.integers(len(c))] for c in (self.train_captions[i] for i in idx)]
        ids, mask = self.tokenizer.encode(captions, max_length=self.config.max_text_len)
        return self.train_pixels[idx], ids, mask

    def step(self, batch, rng: np.random.Generator) -> dict:
        images, ids, mask = batch
        tok = self.tokenizer
        self.model.clamp_temperature()  # blip_pretrain.py clamps before every forward
        result = pretrain_step(self.model, images, ids, mask, cls_id=tok.cls_id,
                               enc_id=tok.enc_id, dec_id=tok.dec_id, rng=rng,
                               weights=self.config.loss_weights)
        return result.losses

    def checkpoint_extra(self) -> dict:
        return {"tokenizer_words": self.tokenizer.words}

    def check_checkpoint(self, extra: dict, path) -> None:
        if extra.get("tokenizer_words") != self.tokenizer.words:
            raise ValueError(f"checkpoint {path}: its vocabulary differs from this version's "
                             f"world vocabulary")


def blip_trainer(cfg: TrainConfig | None = None, **task_options) -> Trainer:
    """The loop around :class:`BlipPretraining` (``task_options`` are its keyword
    arguments: dataset, train_images, train_captions, model)."""
    return Trainer(BlipPretraining(cfg or TrainConfig(), **task_options))


# What a resumed run may change: where it stops and how often it saves. Anything
# else (the learning rate, the batch, the model, the data) would make it another run.
RESUMABLE_CHANGES = ("steps", "checkpoint_every")


def resumed_config(saved, step: int, changes: dict):
    """The configuration of a run saved with config ``saved`` at ``step`` and
    resumed with ``changes`` ({field: value}; a value equal to the saved one is
    no change). Only :data:`RESUMABLE_CHANGES` may differ, and ``steps`` must
    stay beyond ``step``; otherwise a ValueError lists every difference. A
    longer run keeps its warmup and stretches the cosine decay to the new end
    from ``step`` on. Returns the new config (``saved`` when nothing changes)."""
    absent = object()
    differ = {k: v for k, v in changes.items() if getattr(saved, k, absent) != v}
    refused = [k for k in differ if k not in RESUMABLE_CHANGES]
    if refused:
        raise ValueError(
            "options that differ from the saved run: "
            + "; ".join(f"{k}: saved {getattr(saved, k, '<absent>')!r}, asked {differ[k]!r}"
                        for k in refused)
            + f". A resumed run may change only {' and '.join(RESUMABLE_CHANGES)}; resume "
              f"without the others, or start a new run")
    if "steps" in differ and differ["steps"] <= step:
        raise ValueError(f"steps: the saved run is already at step {step}; ask for more "
                         f"steps than that, got {differ['steps']}")
    return replace(saved, **differ) if differ else saved


def resume_blip(path, cfg: TrainConfig | None = None, changes: dict | None = None) -> Trainer:
    """Rebuild a BLIP pretraining run on the default world data from its
    checkpoint; training on gives the same parameters as a run that was never
    interrupted. ``cfg`` defaults to the stored one (:func:`stored_train_config`);
    ``changes`` ({field: value}, e.g. ``{"steps": 6000}``) go through
    :func:`resumed_config`, checked before anything is built."""
    header = read_header(path)
    cfg = cfg or stored_train_config(path)
    try:
        new_cfg = resumed_config(cfg, header["step"], changes or {})
    except ValueError as err:
        raise ValueError(f"cannot resume {os.fspath(path)}: {err}") from None
    trainer = blip_trainer(cfg).restore(path)
    trainer.task.config = new_cfg  # saved from here on; the loop reads it every step
    return trainer


# A configuration read from a file is held to the stored arrays' shapes for the
# model's sizes (_shapes_set_by). The generated world's size has no array to
# match, so it has a cap instead: far above any run minblip does on a CPU (the
# default world is 17 MB), far below what a forged file could ask for.
MAX_STORED_WORLD_BYTES = 1 << 28


def _shapes_set_by(cfg: TrainConfig, vocab_size: int) -> dict:
    """Arrays of the BLIP that ``cfg`` builds whose shapes, between them, fix every
    size field: patch_size, image_size, width, depth, mlp_ratio, max_text_len,
    embed_dim. If the stored arrays have these shapes, the model built from the
    config is no larger than the file."""
    w, p, last = cfg.width, cfg.patch_size, cfg.depth - 1
    return {"visual_encoder.patch_embed.proj.W": (3 * p * p, w),
            "visual_encoder.pos_embed": (1, 1 + (cfg.image_size // p) ** 2, w),
            f"visual_encoder.blocks.{last}.mlp.fc1.W": (w, cfg.mlp_ratio * w),
            f"text_encoder.layers.{last}.ffn.fc1.W": (w, cfg.mlp_ratio * w),
            "text_encoder.embeddings.word_embeddings.weight": (vocab_size, w),
            "text_encoder.embeddings.position_embeddings.weight": (cfg.max_text_len, w),
            "vision_proj.W": (w, cfg.embed_dim)}


def stored_train_config(path) -> TrainConfig:
    """The TrainConfig stored in the BLIP checkpoint at ``path``, checked before
    anything is built from it, from the archive's headers alone (milliseconds,
    whatever the file says): every option known and of the right kind, the
    world it would generate under :data:`MAX_STORED_WORLD_BYTES`, and the
    model's sizes equal to the stored arrays' shapes. A ValueError names the
    file and the key."""
    path = os.fspath(path)
    header = read_header(path)
    try:
        cfg = TrainConfig.from_dict(header["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its stored configuration is unusable: {err}") from None
    world_bytes = (cfg.n_train + cfg.n_val + cfg.n_test) * 3 * cfg.image_size ** 2
    if world_bytes > MAX_STORED_WORLD_BYTES:
        raise ValueError(f"{path}: its stored configuration asks for a world of "
                         f"{cfg.n_train + cfg.n_val + cfg.n_test:,} images of "
                         f"{cfg.image_size}x{cfg.image_size} ({world_bytes:,} bytes), more "
                         f"than the {MAX_STORED_WORLD_BYTES:,} a stored run may ask for")
    stored = {key[len("param/"):]: shape for key, (shape, _) in header["arrays"].items()
              if key.startswith("param/")}
    wrong = [f"{name} should be {shape}, the file holds {stored.get(name, 'nothing')}"
             for name, shape in _shapes_set_by(cfg, build_tokenizer().vocab_size).items()
             if stored.get(name) != shape]
    if wrong:
        raise ValueError(f"{path}: its stored configuration (width {cfg.width}, "
                         f"depth {cfg.depth}, ...) does not fit its weights: "
                         + "; ".join(wrong))
    return cfg


def load_model(path):
    """A trained BLIP and its tokenizer from a checkpoint (for evaluation,
    captioning and retrieval): returns (model, tokenizer, TrainConfig). The
    stored configuration is checked before the model is built
    (:func:`stored_train_config`), and NaN or inf weights are refused by name."""
    cfg = stored_train_config(path)
    tokenizer = build_tokenizer()
    model = BLIP(cfg.model_config(tokenizer.vocab_size), np.random.default_rng(0))
    load_checkpoint(path, model, config=config_as_saved(cfg, read_header(path)))
    return model, tokenizer, cfg
