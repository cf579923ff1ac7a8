"""Pretraining a tiny BLIP on the built-in world: configuration, the training
loop, checkpoints and exact resumption.

The loop follows salesforce/BLIP ``pretrain.py``: each step samples a batch,
runs ITC + ITM + LM (``minblip.blip.pretrain_step``), clips the gradient norm
and takes an AdamW step. The schedule is a linear warmup then cosine decay
(LAVIS ``linear_warmup_cosine_lr``; BLIP itself decays per epoch).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from . import world
from .blip import BLIP, BLIPConfig, pretrain_step
from .checkpoint import load_checkpoint, rng_from_state, rng_state, save_checkpoint
from .image import preprocess
from .optim import AdamW, clip_grad_norm, warmup_cosine_lr
from .text import TextConfig
from .tokenizer import Tokenizer
from .vit import ViTConfig


@dataclass
class TrainConfig:
    """Everything that defines a run: data, model size and optimisation.

    The defaults are the demo: a model of about 0.3M parameters trained for a
    few minutes on two CPU cores.
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
        for name in ("steps", "batch_size", "n_train", "width", "depth", "heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds n_train {self.n_train}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), "
                             f"got {self.warmup_steps}")
        if len(self.loss_weights) != 3:
            raise ValueError(f"loss_weights needs three numbers (ITC, ITM, LM), "
                             f"got {self.loss_weights}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}")
        return cls(**d)

    def model_config(self, vocab_size: int) -> BLIPConfig:
        vision = ViTConfig(image_size=self.image_size, patch_size=self.patch_size,
                           width=self.width, depth=self.depth, heads=self.heads,
                           mlp_dim=self.mlp_ratio * self.width, dropout=self.dropout,
                           init_std=self.init_std)
        text = TextConfig(vocab_size=vocab_size, width=self.width, depth=self.depth,
                          heads=self.heads, mlp_dim=self.mlp_ratio * self.width,
                          max_positions=self.max_text_len, dropout=self.dropout,
                          encoder_width=self.width, init_std=self.init_std)
        return BLIPConfig(vision=vision, text=text, embed_dim=self.embed_dim,
                          sharing=self.sharing, label_smoothing=self.label_smoothing,
                          proj_init_std=self.init_std)


def build_tokenizer() -> Tokenizer:
    """The word-level tokenizer for every word the world's captions can use."""
    return Tokenizer(world.vocabulary())


def build_dataset(cfg: TrainConfig) -> world.WorldDataset:
    return world.make_dataset(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed,
                              image_size=cfg.image_size, max_objects=cfg.max_objects)


@dataclass
class History:
    """Per-step training curves."""

    step: list = field(default_factory=list)
    itc: list = field(default_factory=list)
    itm: list = field(default_factory=list)
    lm: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)

    def append(self, step, losses, lr, grad_norm):
        self.step.append(int(step))
        self.itc.append(float(losses["itc"]))
        self.itm.append(float(losses["itm"]))
        self.lm.append(float(losses["lm"]))
        self.lr.append(float(lr))
        self.grad_norm.append(float(grad_norm))

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Owns the model, the optimiser, the data and the two random generators
    (one for batches and captions, one for the model's negatives and dropout),
    so a run can be saved and resumed exactly."""

    def __init__(self, cfg: TrainConfig, dataset: world.WorldDataset | None = None,
                 train_images=None, train_captions=None, model: BLIP | None = None):
        """By default the training data is the world's train split, with a fresh
        caption drawn for every image at every step. To train on fixed data
        instead (a noisy web set, CapFilt's bootstrapped set), pass
        ``train_images`` uint8 (N, H, W, 3) and ``train_captions``: N lists of
        captions (an image whose list is empty is never drawn). ``model``
        starts from given weights (fine-tuning) instead of a fresh init.
        """
        self.cfg = cfg
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
        model_rng = np.random.default_rng([cfg.seed, 1])
        self.model = model if model is not None else BLIP(
            cfg.model_config(self.tokenizer.vocab_size), model_rng)
        self.optimizer = AdamW(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.data_rng = np.random.default_rng([cfg.seed, 2])
        self.step_rng = np.random.default_rng([cfg.seed, 3])
        self.step = 0
        self.history = History()
        self.train_seconds = 0.0

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(step, self.cfg.steps, self.cfg.lr, self.cfg.warmup_steps,
                                min_lr=self.cfg.min_lr)

    def sample_batch(self):
        """B distinct training images, each with one caption: freshly drawn from
        its scene, or picked from its given captions. Distinct images keep
        ITC from treating another caption of the same image as a negative."""
        idx = self.data_rng.choice(self.drawable, self.cfg.batch_size, replace=False)
        if self.train_captions is None:
            scenes = self.dataset.train.scenes
            captions = [world.describe(scenes[i], self.data_rng) for i in idx]
        else:
            captions = [c[self.data_rng.integers(len(c))]
                        for c in (self.train_captions[i] for i in idx)]
        ids, mask = self.tokenizer.encode(captions, max_length=self.cfg.max_text_len)
        return self.train_pixels[idx], ids, mask

    def train_step(self) -> dict:
        images, ids, mask = self.sample_batch()
        tok = self.tokenizer
        self.optimizer.zero_grad()  # the optimiser's list of Params: no tree walk per step
        self.model.clamp_temperature()
        result = pretrain_step(self.model, images, ids, mask, cls_id=tok.cls_id,
                               enc_id=tok.enc_id, dec_id=tok.dec_id, rng=self.step_rng,
                               weights=self.cfg.loss_weights)
        grad_norm = clip_grad_norm(self.optimizer.params, self.cfg.grad_clip)
        lr = self.lr_at(self.step)
        self.optimizer.step(lr=lr)
        self.history.append(self.step, result.losses, lr, grad_norm)
        self.step += 1
        return result.losses

    def run(self, until: int | None = None, progress: bool = True,
            checkpoint_path=None) -> History:
        """Train until step ``until`` (default: the configured number of steps),
        saving a checkpoint every ``checkpoint_every`` steps and at the end."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=until, initial=self.step, desc="pretraining", unit="step",
                       dynamic_ncols=True)
        start = time.perf_counter()
        while self.step < until:
            losses = self.train_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(itc=f"{losses['itc']:.3f}", itm=f"{losses['itm']:.3f}",
                                lm=f"{losses['lm']:.3f}")
            if (checkpoint_path is not None and self.cfg.checkpoint_every
                    and self.step % self.cfg.checkpoint_every == 0 and self.step < until):
                self.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save(checkpoint_path)
        self.train_seconds += time.perf_counter() - start
        if bar is not None:
            bar.close()
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        return self.history

    def save(self, path) -> None:
        extra = {"data_rng": rng_state(self.data_rng), "step_rng": rng_state(self.step_rng),
                 "history": self.history.to_dict(), "train_seconds": self.train_seconds,
                 "tokenizer_words": self.tokenizer.words}
        save_checkpoint(path, self.model, self.cfg.to_dict(), self.step,
                        optimizer=self.optimizer, extra=extra)

    @classmethod
    def resume(cls, path, cfg: TrainConfig | None = None) -> "Trainer":
        """Rebuild a run on the default world data from its checkpoint; training
        on gives the same parameters as a run that was never interrupted."""
        stored = peek_config(path)
        cfg = cfg or TrainConfig.from_dict(stored)
        trainer = cls(cfg)
        info = load_checkpoint(path, trainer.model, config=cfg.to_dict(),
                               optimizer=trainer.optimizer)
        extra = info["extra"]
        if extra.get("tokenizer_words") != trainer.tokenizer.words:
            raise ValueError(f"checkpoint {path}: its vocabulary differs from this version's "
                             f"world vocabulary")
        trainer.step = info["step"]
        trainer.data_rng = rng_from_state(extra["data_rng"])
        trainer.step_rng = rng_from_state(extra["step_rng"])
        trainer.history = History(**extra["history"])
        trainer.train_seconds = float(extra["train_seconds"])
        return trainer


def peek_config(path) -> dict:
    """The training configuration stored in a checkpoint, without loading weights."""
    import json
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"'{path}' is not a readable checkpoint ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' is a single array, not a minblip checkpoint")
    with archive:
        if "config" not in archive.files:
            raise ValueError(f"'{path}' is not a minblip checkpoint (no config)")
        return json.loads(str(archive["config"]))


def load_model(path):
    """A trained model and its tokenizer from a checkpoint (for evaluation,
    captioning and retrieval): returns (model, tokenizer, TrainConfig)."""
    cfg = TrainConfig.from_dict(peek_config(path))
    tokenizer = build_tokenizer()
    model = BLIP(cfg.model_config(tokenizer.vocab_size), np.random.default_rng(0))
    load_checkpoint(path, model, config=cfg.to_dict())
    return model, tokenizer, cfg
