"""Training BLIP-2 on the built-in world: its frozen parts and its two stages.

BLIP-2 (Li et al. 2023) freezes an image encoder and a language model that
were trained elsewhere and trains only a Q-Former between them, in two stages.
The tasks here all run in the one loop, ``minblip.train.Trainer``:

* :func:`pretrained_vision`: the image encoder to freeze, the ViT of a BLIP
  trained on the same world (BLIP-2 freezes EVA-CLIP's ViT-g);
* :class:`LMPretraining`: the language model to freeze, pretrained on text
  about the world (BLIP-2 freezes OPT or FlanT5);
* :class:`Stage1Training`: the Q-Former learns ITC + ITM + ITG against the
  frozen image encoder (LAVIS ``pretrain_stage1.yaml``);
* :class:`Stage2Training`: its projected queries become soft prompts for the
  frozen language model (LAVIS ``pretrain_stage2.yaml``).

The frozen image encoder never changes, so stages 1 and 2 compute its output
for every training image once, before the first step (LAVIS recomputes it
every step: its images are augmented, these are not).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from . import world
from .blip2_stage1 import Blip2Config, Blip2Stage1, stage1_step
from .blip2_stage2 import Blip2Stage2, stage2_prefix_step, stage2_step
from .image import preprocess
from .lm import LanguageModel, lm_step
from .qformer import QFormerConfig
from .questions import (TEXT_KINDS, encode_documents, encode_seq2seq, lm_corpus, prefix_split,
                        seq2seq_corpus)
from .t5 import EncoderDecoderLM, seq2seq_step
from .tokenizer import Tokenizer
from .train import (TrainConfig, blip_trainer, build_tokenizer, check_run_fields,
                    config_from_dict, load_model)
from .vit import ViTConfig, VisionTransformer


# ---------------------------------------------------------------------------------------
# The frozen image encoder
# ---------------------------------------------------------------------------------------

@dataclass
class PretrainedVision:
    encoder: VisionTransformer   # blip.visual_encoder, the ViT to freeze
    blip: object                 # the whole minblip.blip.BLIP it came from
    source: str                  # "checkpoint <path>" or "BLIP run of N steps"
    train_config: object         # the minblip.train.TrainConfig of the BLIP run
    history: object | None       # its minblip.train.History (None from a checkpoint)
    seconds: float


def pretrained_vision(checkpoint=None, *, dataset: world.WorldDataset | None = None,
                      progress: bool = False, **overrides) -> PretrainedVision:
    """Where stage 1's frozen image encoder comes from.

    BLIP-2 freezes an image encoder trained elsewhere (EVA-CLIP ViT-g). minblip
    uses the ViT of a BLIP trained on the same synthetic world, either

    * ``checkpoint``: a file written by BLIP pretraining (``python -m minblip
      demo`` or ``train``): the ViT of ``minblip.train.load_model(checkpoint)``; or
    * ``checkpoint=None``: a short BLIP run on ``dataset`` (pass the dataset
      stage 1 will use, so the ViT never trains on its test images), configured
      by ``overrides`` of ``TrainConfig`` fields (e.g. ``steps=150``). EVA-CLIP,
      BLIP-2's frozen encoder, was trained contrastively; ``loss_weights=(1, 0,
      0)`` (ITC alone) is the closest analogue.
    """
    start = time.perf_counter()
    if checkpoint is not None:
        model, _, cfg = load_model(checkpoint)
        return PretrainedVision(model.visual_encoder, model, f"checkpoint {checkpoint}", cfg,
                                None, time.perf_counter() - start)
    if dataset is not None:
        overrides = {"image_size": dataset.image_size, "max_objects": dataset.max_objects,
                     "n_train": len(dataset.train), "seed": dataset.seed, **overrides}
    cfg = TrainConfig(**overrides)
    trainer = blip_trainer(cfg, dataset=dataset)
    trainer.run(progress=progress)
    return PretrainedVision(trainer.model.visual_encoder, trainer.model,
                            f"BLIP run of {cfg.steps} steps", cfg, trainer.history,
                            time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# The frozen language model
# ---------------------------------------------------------------------------------------

@dataclass
class LMPretrainConfig:
    """Pretraining the language model on text about the world, with the recipe of
    the other loops (AdamW, warmup then cosine, clipping); OPT itself was
    pretrained the same way at scale.

    The default mixture is what stage 2 needs from its frozen LM: most
    documents are two captions of one scene ("paraphrase") or a caption and
    questions about it ("caption_qa"), so besides writing captions and answers
    the LM learns to *read* a description placed before its ``[CLS]``. Trained
    on single captions only, a small LM ignores everything before ``[CLS]``,
    and no soft prompt can then tell it what the image shows. A corpus of
    ``corpus_size`` documents is written and tokenised once; each step draws
    ``batch_size`` of them.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    kinds: tuple = ("paraphrase", "caption_qa")
    kind_weights: tuple = (1.0, 0.4)
    corpus_size: int = 4096
    max_objects: int = 2
    max_length: int = 48
    seed: int = 0

    def __post_init__(self):
        self.kinds, self.kind_weights = tuple(self.kinds), tuple(self.kind_weights)
        check_run_fields(self, ("steps", "batch_size", "corpus_size", "max_length"),
                             "LMPretrainConfig")
        if self.batch_size > self.corpus_size:
            raise ValueError(f"LMPretrainConfig: batch_size {self.batch_size} exceeds "
                             f"corpus_size {self.corpus_size} (a batch draws distinct documents)")
        unknown = [k for k in self.kinds if k not in TEXT_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"LMPretrainConfig.kinds: expected some of {TEXT_KINDS}, "
                             f"got {self.kinds}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kinds"], d["kind_weights"] = list(self.kinds), list(self.kind_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMPretrainConfig":
        return config_from_dict(cls, d, "LM pretraining")


class LMPretraining:
    """Next-token prediction on a corpus of world text (``lm_step``). One random
    generator writes the corpus, draws the batches and drives the dropout."""

    name = "LM pretraining"
    model_type = LanguageModel

    def __init__(self, lm, tokenizer: Tokenizer, cfg: LMPretrainConfig | None = None):
        cfg = cfg or LMPretrainConfig()
        if not isinstance(lm, self.model_type):
            raise TypeError(f"{self.name}: expected a {self.model_type.__name__}, got "
                            f"{type(lm).__name__}")
        if lm.frozen:
            raise ValueError("LM pretraining: the language model is frozen; call unfreeze() "
                             "first")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"LM pretraining: expected a Tokenizer, got "
                            f"{type(tokenizer).__name__}")
        if tokenizer.vocab_size != lm.cfg.vocab_size:
            raise ValueError(f"LM pretraining: the tokenizer has {tokenizer.vocab_size} tokens "
                             f"but the LM's vocab_size is {lm.cfg.vocab_size}")
        if cfg.max_length > lm.cfg.max_positions:
            raise ValueError(f"LM pretraining: max_length={cfg.max_length} exceeds the LM's "
                             f"max_positions={lm.cfg.max_positions}")
        self.config, self.model, self.tokenizer = cfg, lm, tokenizer
        self.rng = np.random.default_rng([cfg.seed, 7])
        self.write_corpus()

    def write_corpus(self) -> None:
        """The documents, written and tokenised once."""
        cfg = self.config
        self.corpus = lm_corpus(cfg.corpus_size, self.rng, cfg.kinds, cfg.kind_weights,
                                cfg.max_objects)
        self.ids, self.mask = encode_documents(self.tokenizer, self.corpus, cfg.max_length)

    def generators(self):
        return self.rng, self.rng

    def sample_batch(self, rng: np.random.Generator):
        rows = rng.choice(self.config.corpus_size, size=self.config.batch_size, replace=False)
        width = int(self.mask[rows].sum(axis=1).max())  # pad to the batch's longest text only
        return self.ids[rows, :width], self.mask[rows, :width]

    def step(self, batch, rng: np.random.Generator) -> dict:
        ids, mask = batch
        loss, _ = lm_step(self.model, ids, mask, rng=rng)
        return {"loss": loss}


class Seq2SeqPretraining(LMPretraining):
    """The encoder-decoder LM's pretraining: the same documents, each cut into
    what the encoder reads and what the decoder writes (``questions.seq2seq_pair``:
    a caption continued or rewritten after a description, an answer after a
    question), with the prefix-LM loss ``t5.seq2seq_step``. T5 was pretrained by
    span corruption and FlanT5 then instruction-tuned; a prefix LM (T5's
    "LM-adapted" objective) on text about the world is the small-scale stand-in."""

    name = "encoder-decoder LM pretraining"
    model_type = EncoderDecoderLM

    def write_corpus(self) -> None:
        cfg = self.config
        self.corpus = seq2seq_corpus(cfg.corpus_size, self.rng, cfg.kinds, cfg.kind_weights,
                                     cfg.max_objects)
        self.enc_ids, self.enc_mask, self.labels = encode_seq2seq(
            self.tokenizer, [e for e, _ in self.corpus], [d for _, d in self.corpus],
            cfg.max_length)

    def sample_batch(self, rng: np.random.Generator):
        rows = rng.choice(self.config.corpus_size, size=self.config.batch_size, replace=False)
        enc_width = int(self.enc_mask[rows].sum(axis=1).max())  # the batch's longest texts
        dec_width = int((self.labels[rows] != -100).sum(axis=1).max())
        return (self.enc_ids[rows, :enc_width], self.enc_mask[rows, :enc_width],
                self.labels[rows, :dec_width])

    def step(self, batch, rng: np.random.Generator) -> dict:
        enc_ids, enc_mask, labels = batch
        loss, _ = seq2seq_step(self.model, enc_ids, enc_mask, labels, rng=rng)
        return {"loss": loss}


# ---------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------

@dataclass
class Stage1Config:
    """A stage-1 run: Q-Former sizes and optimisation. LAVIS
    ``pretrain_stage1.yaml`` uses AdamW (wd 0.05), lr 1e-4 -> 1e-5 with a
    linear-warmup cosine schedule, batch 100 per GPU."""

    seed: int = 0
    max_text_len: int = 20
    # Q-Former
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 256
    num_queries: int = 8
    cross_attention_freq: int = 2
    embed_dim: int = 32
    init_std: float = 0.02
    dropout: float = 0.0
    # optimisation
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    loss_weights: tuple = (1.0, 1.0, 1.0)

    def __post_init__(self):
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        if len(self.loss_weights) != 3:
            raise ValueError(f"loss_weights needs three numbers (ITC, ITM, ITG), "
                             f"got {self.loss_weights}")
        check_run_fields(self, ("steps", "batch_size", "max_text_len"), "Stage1Config")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stage1Config":
        return config_from_dict(cls, d, "stage-1")

    def model_config(self, vocab_size: int, vision: ViTConfig) -> Blip2Config:
        q = QFormerConfig(vocab_size=vocab_size, width=self.width, depth=self.depth,
                          heads=self.heads, mlp_dim=self.mlp_dim, num_queries=self.num_queries,
                          cross_attention_freq=self.cross_attention_freq,
                          encoder_width=vision.width, max_positions=self.max_text_len,
                          dropout=self.dropout, init_std=self.init_std)
        return Blip2Config(qformer=q, vision=vision, embed_dim=self.embed_dim,
                           proj_init_std=self.init_std)


class Stage1Training:
    """A :class:`~minblip.blip2_stage1.Blip2Stage1` on the training split of a world
    dataset. Each step draws ``batch_size`` distinct images with fresh captions
    and runs ``stage1_step`` on the frozen encoder's output, computed once."""

    name = "stage 1"

    def __init__(self, cfg: Stage1Config, visual_encoder: VisionTransformer,
                 dataset: world.WorldDataset, tokenizer: Tokenizer | None = None):
        self.config = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
        self.dataset = dataset
        model_cfg = cfg.model_config(self.tokenizer.vocab_size, visual_encoder.config)
        self.model = Blip2Stage1(model_cfg, np.random.default_rng([cfg.seed, 11]),
                                 visual_encoder=visual_encoder)
        pixels = preprocess(dataset.train.images, visual_encoder.config.image_size)
        self.train_features = self.model.frozen_features(pixels)  # (N, 1+P, Dv), once

    def generators(self):
        return (np.random.default_rng([self.config.seed, 12]),
                np.random.default_rng([self.config.seed, 13]))

    def sample_batch(self, rng: np.random.Generator):
        split = self.dataset.train
        idx = rng.choice(len(split), self.config.batch_size, replace=False)
        captions = [world.describe(split.scenes[i], rng) for i in idx]
        ids, mask = self.tokenizer.encode(captions, max_length=self.config.max_text_len)
        return self.train_features[idx], ids, mask

    def step(self, batch, rng: np.random.Generator) -> dict:
        feats, ids, mask = batch
        temp = float(self.model.temp.data)  # the temperature this step uses
        result = stage1_step(self.model, None, ids, mask, image_features=feats,
                             dec_id=self.tokenizer.dec_id, rng=rng,
                             weights=self.config.loss_weights)
        return {**result.losses, "temp": temp}


# ---------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------

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
    # encoder-decoder only: the shortest prefix of the prefix-LM split. The author's split
    # starts at 1 word (LAVIS #139); 0 also trains the empty prefix that zero-shot
    # captioning uses, without which minblip's small T5 starts its captions mid-sentence
    min_prefix: int = 0
    seed: int = 0

    def __post_init__(self):
        check_run_fields(self, ("steps", "batch_size", "max_text_len"), "Stage2Config")
        if isinstance(self.min_prefix, bool) or not isinstance(self.min_prefix, int) \
                or self.min_prefix < 0:
            raise ValueError(f"Stage2Config.min_prefix: expected an int >= 0, "
                             f"got {self.min_prefix!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Config":
        return config_from_dict(cls, d, "stage-2")


class Stage2Training:
    """The soft prompt of a :class:`~minblip.blip2_stage2.Blip2Stage2` on a split:
    each step draws ``batch_size`` distinct images and a fresh caption for each
    (``world.describe``) and runs the loss of the model's design; the optimiser
    sees ``model.params()``, the trainable part only.

    * decoder-only LM (OPT): the caption after ``cfg.prompt``, ``stage2_step``;
    * encoder-decoder LM (FlanT5): the caption cut by ``questions.prefix_split``
      (at least ``cfg.min_prefix`` words of prefix), the prefix to the encoder
      after the soft prompt and the rest as the decoder's target,
      ``stage2_prefix_step``. With ``cfg.prompt`` the prompt is the prefix and the
      whole caption the target (LAVIS's COCO fine-tuning, issue #364).
    """

    name = "stage 2"

    def __init__(self, model: Blip2Stage2, tokenizer: Tokenizer, split: world.Split,
                 cfg: Stage2Config | None = None):
        cfg = cfg or Stage2Config()
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"stage 2: expected a Tokenizer, got {type(tokenizer).__name__}")
        if tokenizer.vocab_size != model.language_model.cfg.vocab_size:
            raise ValueError(f"stage 2: the tokenizer has {tokenizer.vocab_size} tokens, the "
                             f"language model {model.language_model.cfg.vocab_size}")
        if cfg.batch_size > len(split):
            raise ValueError(f"stage 2: batch_size {cfg.batch_size} exceeds the "
                             f"{len(split)} images of the split")
        self.config, self.model, self.tokenizer, self.split = cfg, model, tokenizer, split
        pixels = preprocess(split.images, model.image_size).astype(model.dtype)
        self.features = model.image_features(pixels)  # (N, S, Dv), once
        self.prompt_length = len(tokenizer.tokenize(cfg.prompt)) + 1 if cfg.prompt else 0

    def generators(self):
        return (np.random.default_rng([self.config.seed, 2]),
                np.random.default_rng([self.config.seed, 3]))

    def sample_batch(self, rng: np.random.Generator):
        cfg = self.config
        idx = rng.choice(len(self.split), cfg.batch_size, replace=False)
        captions = [world.describe(self.split.scenes[i], rng) for i in idx]
        if self.model.encoder_decoder:
            pairs = [(cfg.prompt, c) if cfg.prompt else prefix_split(c, rng, cfg.min_prefix)
                     for c in captions]
            return (self.features[idx],) + encode_seq2seq(
                self.tokenizer, [p for p, _ in pairs], [s for _, s in pairs], cfg.max_text_len)
        texts = [" ".join(t for t in (cfg.prompt, c) if t) for c in captions]
        ids, mask = self.tokenizer.encode(texts, max_length=cfg.max_text_len)
        return self.features[idx], ids, mask

    def step(self, batch, rng: np.random.Generator) -> dict:
        if self.model.encoder_decoder:
            features, enc_ids, enc_mask, labels = batch
            result = stage2_prefix_step(self.model, None, enc_ids, enc_mask, labels,
                                        image_embeds=features, rng=rng)
        else:
            features, ids, mask = batch
            result = stage2_step(self.model, None, ids, mask, image_embeds=features,
                                 prompt_length=self.prompt_length, rng=rng)
        return {"loss": result.loss}
