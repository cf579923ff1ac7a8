"""BLIP-2 checkpoints: the whole stage-2 model in one ``.npz`` file.

A trained BLIP-2 is four parts, two of them frozen: the ViT (frozen), ``ln_vision``
and the Q-Former with its queries, the language projection, and the language
model (frozen; decoder-only or encoder-decoder). The training checkpoints of
:mod:`minblip.checkpoint` keep the trainable Params only; this file keeps every
Param (``include_frozen=True``), the sizes of every part and the tokenizer's
words, so that ``python -m minblip caption`` and ``ask`` can rebuild and use the
model from the file alone.

The layout is :mod:`minblip.checkpoint`'s (one array per Param, the
configuration as JSON text, nothing pickled; written atomically). The stored
configuration is::

    {"format": "minblip-blip2", "version": 1, "vision": ViTConfig,
     "ln_vision_eps": float, "qformer": QFormerConfig,
     "language_model": {"type": "opt" | "t5", "config": LMConfig | T5Config},
     "tokenizer_words": [...]}

:func:`load_blip2` refuses a wrong file before it builds anything large: the
configuration must describe a BLIP-2 of sane sizes, and the arrays the file
declares (read from the ``.npy`` headers, :func:`minblip.checkpoint.read_header`)
must have the shapes the configuration implies and be complete; only then is
the model built and every value read (with its CRC) and checked again by name
and shape.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from .blip2_stage2 import Blip2Stage2
from .checkpoint import load_checkpoint, read_config, read_header, save_checkpoint
from .layers import LayerNorm
from .lm import LanguageModel, LMConfig
from .qformer import QFormer, QFormerConfig
from .t5 import EncoderDecoderLM, T5Config
from .tokenizer import Tokenizer
from .vit import ViTConfig, VisionTransformer

FORMAT = "minblip-blip2"
VERSION = 1
LM_TYPES = {"opt": (LanguageModel, LMConfig), "t5": (EncoderDecoderLM, T5Config)}
MAX_SIZE = 1 << 20             # the largest width, depth, vocabulary, ... accepted
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32: the whole model is held in memory


def lm_type(language_model) -> str:
    """"opt" for a decoder-only ``LanguageModel``, "t5" for an ``EncoderDecoderLM``."""
    for name, (cls, _) in LM_TYPES.items():
        if isinstance(language_model, cls):
            return name
    raise TypeError(f"expected a LanguageModel or an EncoderDecoderLM, got "
                    f"{type(language_model).__name__}")


def blip2_config(model: Blip2Stage2, tokenizer: Tokenizer) -> dict:
    """The stored configuration of ``model`` (see the module docstring)."""
    lm = model.language_model
    return {"format": FORMAT, "version": VERSION,
            "vision": dataclasses.asdict(model.visual_encoder.config),
            "ln_vision_eps": model.ln_vision.eps,
            "qformer": dataclasses.asdict(model.qformer.cfg),
            "language_model": {"type": lm_type(lm), "config": dataclasses.asdict(lm.cfg)},
            "tokenizer_words": list(tokenizer.words)}


def save_blip2(path, model: Blip2Stage2, tokenizer: Tokenizer, extra: dict | None = None) -> None:
    """Write the whole ``model`` (frozen parts included) and the tokenizer's words to
    the ``.npz`` file ``path``, atomically. ``extra``: JSON-serialisable notes kept
    with it (e.g. the run's measurements)."""
    if not isinstance(model, Blip2Stage2):
        raise TypeError(f"save_blip2: expected a Blip2Stage2, got {type(model).__name__}")
    if tokenizer.vocab_size != model.language_model.cfg.vocab_size:
        raise ValueError(f"save_blip2: the tokenizer has {tokenizer.vocab_size} tokens, the "
                         f"language model {model.language_model.cfg.vocab_size}")
    save_checkpoint(path, model, blip2_config(model, tokenizer), step=0, extra=extra,
                    include_frozen=True)


# ---------------------------------------------------------------------------------------
# Loading, with every check before anything large is allocated
# ---------------------------------------------------------------------------------------

def _configs(path: str, stored: dict):
    """The stored configuration -> (ViTConfig, ln eps, QFormerConfig, LM type, LM
    config, words), or a ValueError naming the file and the problem."""
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        found = stored.get("format") if isinstance(stored, dict) else type(stored).__name__
        raise ValueError(f"{path}: not a BLIP-2 checkpoint (its configuration has format "
                         f"{found!r}, expected {FORMAT!r}; 'python -m minblip blip2' writes "
                         f"them)")
    if stored.get("version") != VERSION:
        raise ValueError(f"{path}: BLIP-2 checkpoint version {stored.get('version')!r}, this "
                         f"minblip reads version {VERSION}")
    missing = [k for k in ("vision", "ln_vision_eps", "qformer", "language_model",
                           "tokenizer_words") if k not in stored]
    if missing:
        raise ValueError(f"{path}: the BLIP-2 configuration lacks {missing}")
    lm_part = stored["language_model"]
    if not isinstance(lm_part, dict) or lm_part.get("type") not in LM_TYPES:
        raise ValueError(f"{path}: language_model.type must be one of {sorted(LM_TYPES)}, got "
                         f"{lm_part.get('type') if isinstance(lm_part, dict) else lm_part!r}")
    for part, value in (("vision", stored["vision"]), ("qformer", stored["qformer"]),
                        ("language_model.config", lm_part.get("config"))):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {part} must be a dict of sizes, got {value!r}")
        too_big = {k: v for k, v in value.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_SIZE}
        if too_big:
            raise ValueError(f"{path}: {part} sizes {too_big} exceed the limit {MAX_SIZE}")
    try:
        vision = ViTConfig(**stored["vision"])
        qformer = QFormerConfig(**stored["qformer"])
        lm_config = LM_TYPES[lm_part["type"]][1](**lm_part["config"])
        words = stored["tokenizer_words"]
        tokenizer = Tokenizer(words)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the BLIP-2 configuration is invalid: {e}") from None
    if tokenizer.vocab_size != lm_config.vocab_size:
        raise ValueError(f"{path}: {len(words)} tokenizer words give {tokenizer.vocab_size} "
                         f"tokens, but the language model has vocab_size "
                         f"{lm_config.vocab_size}")
    return vision, float(stored["ln_vision_eps"]), qformer, lm_part["type"], lm_config, tokenizer


def _expected_shapes(vision: ViTConfig, qformer: QFormerConfig, kind: str, lm) -> dict:
    """Arrays whose shapes pin down every size of the configuration (the last layer
    of each stack is present, the one after it absent: shape None)."""
    P = "param/"
    v, q = vision, qformer
    out = {
        P + "visual_encoder.patch_embed.proj.W": (v.channels * v.patch_size ** 2, v.width),
        P + "visual_encoder.pos_embed": (1, 1 + v.num_patches, v.width),
        P + f"visual_encoder.blocks.{v.depth - 1}.mlp.fc1.W": (v.width, v.mlp_dim),
        P + f"visual_encoder.blocks.{v.depth}.mlp.fc1.W": None,
        P + "ln_vision.gamma": (v.width,),
        P + "qformer.query_tokens": (1, q.num_queries, q.width),
        P + "qformer.layers.0.cross_attn.key.W": (q.encoder_width, q.width),
        P + f"qformer.layers.{q.depth - 1}.ffn_query.fc1.W": (q.width, q.mlp_dim),
        P + f"qformer.layers.{q.depth}.ffn_query.fc1.W": None,
        P + "language_projection.W": (q.width, lm.width),
    }
    L = P + "language_model."
    if kind == "opt":
        out.update({L + "embed_tokens.weight": (lm.vocab_size, lm.width),
                    L + "embed_positions.weight": (lm.max_positions, lm.width),
                    L + f"layers.{lm.depth - 1}.mlp.fc1.W": (lm.width, lm.mlp_dim),
                    L + f"layers.{lm.depth}.mlp.fc1.W": None})
    else:
        out.update({L + "shared.weight": (lm.vocab_size, lm.width),
                    L + "lm_head.W": (lm.width, lm.vocab_size)})
        for stack in ("encoder", "decoder"):
            out.update({
                L + f"{stack}.relative_attention_bias.table.weight": (lm.num_buckets, lm.heads),
                L + f"{stack}.blocks.{lm.depth - 1}.ffn.wi_0.W": (lm.width, lm.mlp_dim),
                L + f"{stack}.blocks.{lm.depth}.ffn.wi_0.W": None})
    return out


def load_blip2(path):
    """The BLIP-2 saved by :func:`save_blip2` at ``path`` -> (model, tokenizer, info),
    info = {"config": the stored configuration, "extra": the saved notes}.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and
    what is wrong, for a file that is not a BLIP-2 checkpoint, is truncated or
    corrupt, describes an invalid or oversized model, or holds arrays that do not
    fit its configuration; all before the model is built.
    """
    path = os.fspath(path)
    header = read_header(path)  # the zip directory and .npy headers only: no array is read yet
    stored, shapes = header["config"], header["arrays"]
    vision, ln_eps, qcfg, kind, lm_cfg, tokenizer = _configs(path, stored)
    total = sum(int(np.prod(shape, dtype=np.int64)) for name, (shape, _) in shapes.items()
                if name.startswith("param/"))
    if total > MAX_PARAMETERS:
        raise ValueError(f"{path}: {total:,} parameters, more than this loader holds in memory "
                         f"({MAX_PARAMETERS:,})")
    wrong = []
    for name, expected in _expected_shapes(vision, qcfg, kind, lm_cfg).items():
        found = shapes[name][0] if name in shapes else None
        if found != expected:
            wrong.append(f"{name}: the configuration implies "
                         f"{'no such array' if expected is None else expected}, the file has "
                         f"{'none' if found is None else found}")
    if wrong:
        raise ValueError(f"{path}: the arrays do not fit the stored configuration: "
                         + "; ".join(wrong))

    rng = np.random.default_rng(0)  # placeholder values: every one is overwritten below
    lm_cls = LM_TYPES[kind][0]
    model = Blip2Stage2(VisionTransformer(vision, rng), LayerNorm(vision.width, ln_eps),
                        QFormer(qcfg, rng), lm_cls(lm_cfg, rng), rng)
    info = load_checkpoint(path, model, config=stored, include_frozen=True)
    return model, tokenizer, {"config": stored, "extra": info["extra"]}


def is_blip2_checkpoint(path) -> bool:
    """True when the checkpoint at ``path`` stores a BLIP-2 (its configuration says
    so); False for another minblip checkpoint. Errors of :func:`read_config` pass."""
    stored = read_config(path)
    return isinstance(stored, dict) and stored.get("format") == FORMAT


def describe(stored: dict) -> str:
    """One line about a stored BLIP-2 configuration, for the command line."""
    lm = stored["language_model"]
    name = {"opt": "a decoder-only (OPT-style)", "t5": "an encoder-decoder (T5-style)"}[lm["type"]]
    return (f"BLIP-2 with {name} language model of width {lm['config']['width']}, "
            f"{stored['qformer']['num_queries']} queries, "
            f"{stored['vision']['image_size']}x{stored['vision']['image_size']} images")

