"""CapFilt: bootstrap a cleaner dataset from noisy web captions (BLIP section 3.3).

BLIP's second contribution. No code for it was released; this follows the
paper (Li et al. 2022, arXiv 2201.12086, section 3.3, Table 1) and the
authors' answers in salesforce/BLIP issues 11 and 46:

1. Pretrain a model on human-annotated pairs (here: a small *clean* set) plus
   web pairs (here: a larger *web* set whose captions are partly wrong, from
   :func:`minblip.world.make_noisy`, with the ground truth kept).
2. Fine-tune two copies of that model separately on the clean set, sharing no
   parameter: the **captioner** with the LM objective only and the **filter**
   with ITC + ITM.
3. The captioner writes one synthetic caption per web image with nucleus
   sampling (top-p 0.9, repetition penalty 1.1, BLIP's ``generate(sample=True)``).
4. The filter removes every text, web or synthetic, whose ITM match
   probability ``softmax(itm_logits)[1]`` is not above a threshold (0.5).
5. A fresh model is pretrained on clean + kept web + kept synthetic pairs; an
   image keeps 0, 1 or 2 texts.

The four rows of BLIP's Table 1 are four training sets for step 5: no CapFilt
(clean + raw web), filter only (clean + kept web), captioner only (clean + web
+ synthetic, unfiltered) and both. "No CapFilt" is the same data, seed and
number of steps as step 1, so the step-1 model *is* that row and is not
trained twice.

Every model here is evaluated right after pretraining, on the clean test
split, without a downstream fine-tune (BLIP's Table 1 fine-tunes on COCO
first): the rows then compare their pretraining data directly, where a
fine-tune on the same clean set would pull them all towards it.

This file is the method for one seed (:func:`run_capfilt`);
:mod:`minblip.capfilt_experiment` runs several seeds and writes the tables,
plots and report of ``python -m minblip capfilt``.
"""
from __future__ import annotations

import copy
import numbers
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import world
from .blip import BLIP
from .evaluate import caption_images, caption_metrics, match_probability, retrieval_metrics
from .image import preprocess
from .train import Trainer, TrainConfig, blip_trainer, build_tokenizer, config_from_dict

SETTINGS: tuple[str, ...] = ("no_capfilt", "filter_only", "captioner_only", "capfilt")
SETTING_LABELS: dict[str, str] = {
    "no_capfilt": "no CapFilt (clean + raw web)",
    "filter_only": "filter only (clean + kept web)",
    "captioner_only": "captioner only (clean + web + synthetic)",
    "capfilt": "captioner + filter (clean + kept web + kept synthetic)",
}
# which parts of step 4-5 each setting uses: (captioner, filter)
SETTING_PARTS: dict[str, tuple[bool, bool]] = {
    "no_capfilt": (False, False),
    "filter_only": (False, True),
    "captioner_only": (True, False),
    "capfilt": (True, True),
}
TABLE_METRICS: tuple[str, ...] = ("i2t_recall@1", "t2i_recall@1", "caption_attribute_accuracy")

CAPTIONER_WEIGHTS = (0.0, 0.0, 1.0)  # LM only: BLIP's captioner is the image-grounded decoder
FILTER_WEIGHTS = (1.0, 1.0, 0.0)     # ITC + ITM: BLIP's filter is the image-grounded encoder


@dataclass
class CapFiltConfig:
    """One CapFilt experiment: data, model and optimisation, for one seed.

    Each seed trains five times (pretrain, two fine-tunes, three more
    pretrainings), so the defaults are smaller than the demo's: a model of
    width 32 and two layers on 30-pixel images cut into 10-pixel patches
    (one per grid cell), initialised with std 0.1 so that its features start
    spread out (notebook 05), 1000 pretraining and 300 fine-tuning steps
    (docs/capfilt_results.md gives the time they take). The fine-tunes use the pretraining
    learning rate: BLIP fine-tunes its large pretrained model far more gently,
    but 300 steps of this small one at a lower rate left the filter and the
    captioner visibly worse.
    """

    seed: int = 0
    noise: float = 0.5                     # fraction of web captions corrupted
    noise_kinds: tuple = world.NOISE_KINDS
    threshold: float = 0.5                 # keep a text when p(match) > threshold
    # data
    n_clean: int = 300                     # the "human-annotated" set (COCO's role)
    clean_captions_per_image: int = 5      # COCO has five captions per image
    n_web: int = 1500                      # the "web" set, one caption per image
    n_test: int = 200                      # clean test split for evaluation
    image_size: int = 30                   # 10-pixel patches: one patch per grid cell
    max_objects: int = 2
    # model (shared by every training here)
    patch_size: int = 10
    width: int = 32
    depth: int = 2
    heads: int = 2
    embed_dim: int = 32
    init_std: float = 0.1                  # features start spread out (notebook 05)
    # optimisation
    batch_size: int = 32
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    finetune_steps: int = 300
    finetune_lr: float = 3e-3

    def __post_init__(self):
        self.noise_kinds = tuple(self.noise_kinds)
        world.check_int("seed", self.seed, 0)
        for name in ("n_clean", "clean_captions_per_image", "n_web", "n_test", "patch_size",
                     "width", "depth", "heads", "embed_dim", "batch_size", "pretrain_steps",
                     "finetune_steps"):
            world.check_int(name, getattr(self, name), 1)
        _check_real("noise", self.noise)
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be a fraction in [0, 1], got {self.noise}")
        _check_threshold(self.threshold)
        if not self.noise_kinds or not set(self.noise_kinds) <= set(world.NOISE_KINDS):
            raise ValueError(f"noise_kinds must be a non-empty subset of "
                             f"{list(world.NOISE_KINDS)}, got {list(self.noise_kinds)}")
        if self.batch_size > self.n_clean:
            raise ValueError(f"batch_size {self.batch_size} exceeds n_clean {self.n_clean}: the "
                             f"fine-tunes draw distinct clean images per batch")
        for name in ("pretrain_lr", "finetune_lr"):
            _check_real(name, getattr(self, name))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise_kinds"] = list(self.noise_kinds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CapFiltConfig":
        return config_from_dict(cls, d, "CapFilt")

    def train_config(self, steps: int, lr: float, loss_weights, n_images: int) -> TrainConfig:
        """The TrainConfig of one training of this experiment (pretrain or fine-tune)."""
        return TrainConfig(seed=self.seed, image_size=self.image_size,
                           max_objects=self.max_objects, n_train=n_images, n_val=0,
                           n_test=self.n_test, patch_size=self.patch_size, width=self.width,
                           depth=self.depth, heads=self.heads, embed_dim=self.embed_dim,
                           init_std=self.init_std, steps=steps,
                           batch_size=self.batch_size, lr=lr, min_lr=lr / 100,
                           warmup_steps=min(100, steps // 10), loss_weights=loss_weights)


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")


def _check_threshold(threshold):
    _check_real("threshold", threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability strictly between 0 and 1, "
                         f"got {threshold}")


# ---------------------------------------------------------------------------------------
# Data: a clean "human-annotated" set and a noisy "web" set on disjoint images
# ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class CapFiltData:
    """The three image sets of one experiment (disjoint scenes).

    * ``clean``: Split, ``clean_captions_per_image`` true captions per image
    * ``web``: NoisySplit, one caption per image, ``noise`` of them wrong
      (``is_noisy``, ``noise_kind`` and ``clean_captions`` are the ground truth)
    * ``test``: Split, one true caption per image, for evaluation
    * ``dataset``: the WorldDataset the sets were cut from
    """

    clean: world.Split
    web: world.NoisySplit
    test: world.Split
    dataset: world.WorldDataset


def _subset(split: world.Split, idx, name: str) -> world.Split:
    return world.Split(name=name, images=split.images[idx],
                       captions=[split.captions[i] for i in idx],
                       scenes=[split.scenes[i] for i in idx], image_ids=split.image_ids[idx],
                       all_captions=[split.all_captions[i] for i in idx])


def make_data(cfg: CapFiltConfig) -> CapFiltData:
    """One world of n_clean + n_web training scenes and n_test test scenes; the
    first n_clean train scenes are the clean set, the rest get noisy captions."""
    data = world.make_dataset(cfg.n_clean + cfg.n_web, 0, cfg.n_test, seed=cfg.seed,
                              image_size=cfg.image_size, max_objects=cfg.max_objects,
                              captions_per_image=cfg.clean_captions_per_image)
    n = cfg.n_clean + cfg.n_web
    clean = _subset(data.train, np.arange(cfg.n_clean), "clean")
    web_clean = _subset(data.train, np.arange(cfg.n_clean, n), "web")
    web = world.make_noisy(web_clean, cfg.noise, seed=cfg.seed, kinds=cfg.noise_kinds)
    return CapFiltData(clean=clean, web=web, test=data.test, dataset=data)


# ---------------------------------------------------------------------------------------
# Training: pretrain, fine-tune the captioner and the filter
# ---------------------------------------------------------------------------------------

def _train(trainer: Trainer, bar=None, stage: str = "") -> BLIP:
    if bar is not None:
        bar.set_postfix_str(stage)
    while trainer.step < trainer.cfg.steps:
        trainer.train_step()
        if bar is not None:
            bar.update(1)
    return trainer.model


def pretrain(cfg: CapFiltConfig, data: CapFiltData, captions, bar=None,
             stage: str = "pretrain") -> BLIP:
    """A fresh model pretrained (ITC + ITM + LM) on the clean images with their
    captions followed by the web images with ``captions`` (one list per web
    image, possibly empty)."""
    if len(captions) != len(data.web):
        raise ValueError(f"captions: expected one list per web image ({len(data.web)}), "
                         f"got {len(captions)}")
    images = np.concatenate([data.clean.images, data.web.images])
    texts = [list(c) for c in data.clean.all_captions] + [list(c) for c in captions]
    tcfg = cfg.train_config(cfg.pretrain_steps, cfg.pretrain_lr, (1.0, 1.0, 1.0), len(images))
    trainer = blip_trainer(tcfg, dataset=data.dataset, train_images=images, train_captions=texts)
    return _train(trainer, bar, stage)


def finetune(cfg: CapFiltConfig, data: CapFiltData, pretrained: BLIP, loss_weights,
             bar=None, stage: str = "fine-tune") -> BLIP:
    """A deep copy of ``pretrained`` fine-tuned on the clean set with
    ``loss_weights`` (ITC, ITM, LM); ``pretrained`` itself is untouched, so the
    captioner and the filter share no parameter (BLIP section 4.4)."""
    model = copy.deepcopy(pretrained)
    tcfg = cfg.train_config(cfg.finetune_steps, cfg.finetune_lr, loss_weights, len(data.clean))
    trainer = blip_trainer(tcfg, dataset=data.dataset, train_images=data.clean.images,
                           train_captions=[list(c) for c in data.clean.all_captions], model=model)
    return _train(trainer, bar, stage)


# ---------------------------------------------------------------------------------------
# Captioner and filter
# ---------------------------------------------------------------------------------------

def write_synthetic(captioner: BLIP, tokenizer, images, rng: np.random.Generator) -> list[str]:
    """One synthetic caption per image (uint8 (N, H, W, 3)) by nucleus sampling
    (top-p 0.9, repetition penalty 1.1), as BLIP's captioner during CapFilt."""
    pixels = preprocess(images, captioner.cfg.vision.image_size)
    return caption_images(captioner, tokenizer, pixels, method="nucleus", rng=rng)


def match_scores(filter_model: BLIP, tokenizer, images, texts) -> np.ndarray:
    """p(match) (N,) of each (image i, text i): the filter's ITM softmax."""
    pixels = preprocess(images, filter_model.cfg.vision.image_size)
    # a sampled caption can run to the generation limit: truncate to what the encoder holds
    return match_probability(filter_model, tokenizer, pixels, list(texts),
                             max_length=filter_model.cfg.text.max_positions)


def keep_mask(p_match, threshold: float = 0.5) -> np.ndarray:
    """bool (N,): keep a text when its match probability is above the threshold
    (BLIP removes a text "if the ITM head predicts it as unmatched")."""
    _check_threshold(threshold)
    p = np.asarray(p_match, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ValueError(f"p_match must be probabilities in [0, 1] of shape (N,), "
                         f"got shape {p.shape}")
    ### BEGIN SOLUTION
    return p > threshold
    ### END SOLUTION


def bootstrap_captions(web_texts, synthetic_texts, p_web, p_synthetic, threshold: float = 0.5,
                       use_captioner: bool = True, use_filter: bool = True) -> list[list[str]]:
    """The texts each web image keeps: its web text and (with the captioner)
    its synthetic text, each dropped by the filter when p(match) <= threshold.

    The same threshold is applied to web and synthetic texts alike. Returns
    one list per web image holding 0, 1 or 2 texts.
    """
    n = len(web_texts)
    if len(synthetic_texts) != n or len(p_web) != n or len(p_synthetic) != n:
        raise ValueError(f"web_texts, synthetic_texts, p_web and p_synthetic need one entry per "
                         f"web image; got lengths {n}, {len(synthetic_texts)}, {len(p_web)}, "
                         f"{len(p_synthetic)}")
    ### BEGIN SOLUTION
    keep_web = keep_mask(p_web, threshold) if use_filter else np.ones(n, bool)
    keep_syn = keep_mask(p_synthetic, threshold) if use_filter else np.ones(n, bool)
    out = []
    for i in range(n):
        texts = [web_texts[i]] if keep_web[i] else []
        if use_captioner and keep_syn[i]:
            texts.append(synthetic_texts[i])
        out.append(texts)
    return out
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# How good is the filter? Against the known corruption labels
# ---------------------------------------------------------------------------------------

def filter_quality(removed, is_noisy, noise_kind=None) -> dict:
    """Precision and recall of "removed" as a detector of corrupted texts.

    removed, is_noisy: bool (N,); noise_kind: optional list of N (None or a
    kind name). Returns ``precision`` (removed texts that were corrupted),
    ``recall`` (corrupted texts removed), ``clean_removed`` (clean texts
    removed: the good data thrown away), the counts, and per kind in
    ``by_kind[k]``: ``recall`` (texts of kind k removed) and ``precision``
    among the clean texts plus those of kind k (the filter's precision had k
    been the only corruption, at its present count). An undefined ratio (0/0)
    is NaN.
    """
    removed = np.asarray(removed)
    is_noisy = np.asarray(is_noisy)
    if removed.dtype != bool or is_noisy.dtype != bool or removed.ndim != 1 \
            or removed.shape != is_noisy.shape:
        raise ValueError(f"removed and is_noisy must be bool arrays of the same shape (N,), got "
                         f"{removed.dtype} {removed.shape} and {is_noisy.dtype} {is_noisy.shape}")

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    tp = int(np.sum(removed & is_noisy))
    fp = int(np.sum(removed & ~is_noisy))
    fn = int(np.sum(~removed & is_noisy))
    n_clean = int(np.sum(~is_noisy))
    out = {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
           "clean_removed": ratio(fp, n_clean), "removed": int(removed.sum()),
           "n": int(len(removed)), "n_noisy": int(is_noisy.sum())}
    if noise_kind is not None:
        if len(noise_kind) != len(removed):
            raise ValueError(f"noise_kind needs one entry per text ({len(removed)}), "
                             f"got {len(noise_kind)}")
        kinds = np.array([k if k is not None else "" for k in noise_kind])
        if np.any((kinds != "") != is_noisy):
            raise ValueError("noise_kind must name a kind exactly where is_noisy is True")
        out["by_kind"] = {}
        for kind in sorted(set(kinds[is_noisy].tolist())):
            of_kind = kinds == kind
            tp_k = int(np.sum(removed & of_kind))
            out["by_kind"][kind] = {"precision": ratio(tp_k, tp_k + fp),
                                    "recall": ratio(tp_k, int(of_kind.sum())),
                                    "n": int(of_kind.sum())}
    return out


def threshold_curve(p_match, is_noisy, thresholds=None) -> dict:
    """Precision and recall of "removed" (p(match) <= t) for a range of
    thresholds t, and the ROC curve with its area.

    Returns arrays ``thresholds``, ``precision``, ``recall``,
    ``false_positive_rate`` (clean texts removed) and the float ``roc_auc``
    (the probability that a random corrupted text scores below a random clean one).
    """
    p = np.asarray(p_match, dtype=np.float64)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    if p.shape != is_noisy.shape or p.ndim != 1:
        raise ValueError(f"p_match and is_noisy must have the same shape (N,), "
                         f"got {p.shape} and {is_noisy.shape}")
    if thresholds is None:
        thresholds = np.linspace(0.0, 1.0, 101)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    removed = p[None, :] <= thresholds[:, None]                      # (T, N)
    tp = (removed & is_noisy).sum(1)
    fp = (removed & ~is_noisy).sum(1)
    n_noisy, n_clean = is_noisy.sum(), (~is_noisy).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
        recall = tp / n_noisy if n_noisy else np.full(len(thresholds), np.nan)
        fpr = fp / n_clean if n_clean else np.full(len(thresholds), np.nan)
    auc = float("nan")
    if n_noisy and n_clean:
        # Mann-Whitney: corrupted below clean counts 1, ties count one half
        noisy_p, clean_p = p[is_noisy], p[~is_noisy]
        below = (noisy_p[:, None] < clean_p[None, :]).sum()
        ties = (noisy_p[:, None] == clean_p[None, :]).sum()
        auc = float((below + 0.5 * ties) / (n_noisy * n_clean))
    return {"thresholds": thresholds, "precision": precision, "recall": recall,
            "false_positive_rate": fpr, "roc_auc": auc}


# ---------------------------------------------------------------------------------------
# The pipeline for one seed
# ---------------------------------------------------------------------------------------

def evaluate_model(model: BLIP, tokenizer, test: world.Split, image_size: int) -> dict:
    """Retrieval recall@k (ITM re-ranked, as BLIP) and beam-search caption
    accuracy of a pretrained model on a clean split."""
    pixels = preprocess(test.images, image_size)
    metrics = retrieval_metrics(model, tokenizer, pixels, test.captions)
    captions = caption_images(model, tokenizer, pixels, method="beam")
    metrics.update(caption_metrics(test.scenes, captions))
    return metrics


@dataclass(eq=False)
class CapFiltRun:
    """Everything one seed of the pipeline produced.

    * ``synthetic``: N_web str, the captioner's texts; ``synthetic_true``: bool
      (N_web,), whether each is fully true of its scene (``world.caption_is_true``)
    * ``p_web``, ``p_synthetic``: float (N_web,), the filter's p(match)
    * ``keep_web``, ``keep_synthetic``: bool (N_web,), above the threshold
    * ``filter_web``, ``filter_synthetic``: :func:`filter_quality` dicts
      (for synthetic texts "corrupted" means not fully true of the scene)
    * ``text_accuracy``: caption metrics (``minblip.evaluate.caption_metrics``)
      against their scenes of the texts "web", "synthetic", "kept_web" and
      "kept_synthetic" (NaN for an empty set)
    * ``settings``: setting name -> evaluation metrics on the test split
    * ``train_pairs``: setting name -> number of (image, text) pairs trained on
    * ``models``: "pretrained", "captioner", "filter" and each setting's model
      (left empty when the run was computed in worker processes)
    * ``seconds``: stage -> wall-clock seconds
    """

    cfg: CapFiltConfig
    data: CapFiltData
    synthetic: list
    synthetic_true: np.ndarray
    p_web: np.ndarray
    p_synthetic: np.ndarray
    keep_web: np.ndarray
    keep_synthetic: np.ndarray
    filter_web: dict
    filter_synthetic: dict
    text_accuracy: dict
    settings: dict = field(default_factory=dict)
    train_pairs: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def setting_captions(self, name: str) -> list[list[str]]:
        """The texts each web image is trained with in setting ``name``."""
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; expected one of {list(SETTINGS)}")
        use_cap, use_filt = SETTING_PARTS[name]
        return bootstrap_captions(self.data.web.captions, self.synthetic, self.p_web,
                                  self.p_synthetic, self.cfg.threshold,
                                  use_captioner=use_cap, use_filter=use_filt)


def text_accuracy(scenes, web_texts, synthetic, keep_web, keep_synthetic) -> dict:
    """How true each group of web-side texts is of its image: caption metrics
    (per attribute, exact match) of the raw web texts, the synthetic texts,
    and the ones the filter kept of each."""
    groups = {"web": (web_texts, None), "synthetic": (synthetic, None),
              "kept_web": (web_texts, keep_web), "kept_synthetic": (synthetic, keep_synthetic)}
    out = {}
    for name, (texts, keep) in groups.items():
        idx = range(len(texts)) if keep is None else np.flatnonzero(keep)
        if len(idx) == 0:
            out[name] = dict.fromkeys(caption_metrics(scenes[:1], texts[:1]), float("nan"))
        else:
            out[name] = caption_metrics([scenes[i] for i in idx], [texts[i] for i in idx])
    return out


def check_settings(settings) -> tuple:
    """``settings`` as a tuple, each checked to be one of :data:`SETTINGS`."""
    settings = tuple(settings)
    for s in settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown setting {s!r}; expected some of {list(SETTINGS)}")
    return settings


def total_steps(cfg: CapFiltConfig, settings=SETTINGS) -> int:
    """Optimiser steps of one seed: the first pretraining (which is also the
    no-CapFilt row), two fine-tunes, one pretraining per other setting."""
    others = sum(1 for s in check_settings(settings) if s != "no_capfilt")
    return (1 + others) * cfg.pretrain_steps + 2 * cfg.finetune_steps


def bootstrap(cfg: CapFiltConfig, bar=None) -> CapFiltRun:
    """Steps 1-4 for one seed: make the data, pretrain on clean + raw web,
    fine-tune captioner and filter, caption and filter the web set. The
    pretrained model is evaluated as the no-CapFilt row."""
    tok = build_tokenizer()
    seconds = {}
    clock = time.perf_counter()
    data = make_data(cfg)
    web_texts = list(data.web.captions)
    pretrained = pretrain(cfg, data, [[t] for t in web_texts], bar, f"seed {cfg.seed}: pretrain")
    seconds["pretrain"] = time.perf_counter() - clock
    clock = time.perf_counter()
    captioner = finetune(cfg, data, pretrained, CAPTIONER_WEIGHTS, bar,
                         f"seed {cfg.seed}: fine-tune captioner")
    filt = finetune(cfg, data, pretrained, FILTER_WEIGHTS, bar,
                    f"seed {cfg.seed}: fine-tune filter")
    seconds["finetune"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if bar is not None:
        bar.set_postfix_str(f"seed {cfg.seed}: caption and filter the web set")
    synthetic = write_synthetic(captioner, tok, data.web.images,
                                np.random.default_rng([cfg.seed, 4]))
    synthetic_true = np.array([world.caption_is_true(s, c)
                               for s, c in zip(data.web.scenes, synthetic)])
    p_web = match_scores(filt, tok, data.web.images, web_texts)
    p_syn = match_scores(filt, tok, data.web.images, synthetic)
    keep_web, keep_syn = keep_mask(p_web, cfg.threshold), keep_mask(p_syn, cfg.threshold)
    seconds["caption_and_filter"] = time.perf_counter() - clock
    run = CapFiltRun(
        cfg=cfg, data=data, synthetic=synthetic, synthetic_true=synthetic_true, p_web=p_web,
        p_synthetic=p_syn, keep_web=keep_web, keep_synthetic=keep_syn,
        filter_web=filter_quality(~keep_web, data.web.is_noisy, data.web.noise_kind),
        filter_synthetic=filter_quality(~keep_syn, ~synthetic_true),
        text_accuracy=text_accuracy(data.web.scenes, web_texts, synthetic, keep_web, keep_syn),
        models={"pretrained": pretrained, "captioner": captioner, "filter": filt},
        seconds=seconds)
    clock = time.perf_counter()
    if bar is not None:
        bar.set_postfix_str(f"seed {cfg.seed}: evaluate no_capfilt")
    run.settings["no_capfilt"] = evaluate_model(pretrained, tok, data.test, cfg.image_size)
    run.train_pairs["no_capfilt"] = pair_count(data, run.setting_captions("no_capfilt"))
    run.models["no_capfilt"] = pretrained
    seconds["no_capfilt"] = time.perf_counter() - clock
    return run


def pair_count(data: CapFiltData, captions) -> int:
    """(image, text) pairs trained on: every clean caption plus ``captions``
    (one list of texts per web image)."""
    return sum(len(c) for c in data.clean.all_captions) + sum(len(c) for c in captions)


def train_setting(cfg: CapFiltConfig, data: CapFiltData, name: str, captions, bar=None):
    """Step 5 for one setting: a fresh model pretrained on clean + the given
    web captions, evaluated on the test split. Returns (model, metrics)."""
    if name == "no_capfilt":
        raise ValueError("no_capfilt is the model bootstrap() pretrains; it is not trained twice")
    model = pretrain(cfg, data, captions, bar, f"seed {cfg.seed}: pretrain on {name}")
    if bar is not None:
        bar.set_postfix_str(f"seed {cfg.seed}: evaluate {name}")
    return model, evaluate_model(model, build_tokenizer(), data.test, cfg.image_size)


def run_capfilt(cfg: CapFiltConfig, settings=SETTINGS, bar=None) -> CapFiltRun:
    """The whole pipeline for one seed, in this process: :func:`bootstrap`,
    then :func:`train_setting` for every setting but no_capfilt. ``bar`` is an
    optional tqdm bar advanced once per optimiser step."""
    settings = check_settings(settings)
    run = bootstrap(cfg, bar)
    for name in settings:
        if name == "no_capfilt":
            continue
        clock = time.perf_counter()
        captions = run.setting_captions(name)
        run.models[name], run.settings[name] = train_setting(cfg, run.data, name, captions, bar)
        run.train_pairs[name] = pair_count(run.data, captions)
        run.seconds[name] = time.perf_counter() - clock
    if "no_capfilt" not in settings:
        del run.settings["no_capfilt"], run.train_pairs["no_capfilt"], run.models["no_capfilt"]
    return run
