"""Hugging Face BLIP checkpoints in and out of minblip.

A Hugging Face checkpoint folder holds ``config.json`` (the sizes) and
``model.safetensors`` (the tensors, by state-dict name; large models split
them over shards listed in ``model.safetensors.index.json``). This module maps
both onto minblip, with no PyTorch:

* :func:`blip_config_from_hf` / :func:`hf_config_from_blip`: ``config.json``
  <-> :class:`minblip.blip.BLIPConfig`;
* :func:`hf_state_dict` / :func:`load_hf_state_dict`: minblip Params <-> tensors
  with the names and layouts of ``BlipForImageTextRetrieval``,
  ``BlipForConditionalGeneration`` and ``BlipForQuestionAnswering``;
* :func:`load_blip_retrieval`, :func:`load_blip_captioning`,
  :func:`load_blip_vqa`, :func:`load_blip` and :func:`save_blip`: whole folders;
* :func:`caption_generate` and :func:`vqa_generate`: what the two generating
  models' ``generate`` return;
* :func:`load_qformer`: BLIP-2's ``Blip2QFormerModel`` into a
  :class:`minblip.qformer.QFormer` (the whole BLIP-2 is in :mod:`minblip.hf_blip2`).

The file format is :mod:`minblip.safetensors` (re-exported here:
:func:`read_safetensors`, :func:`write_safetensors`,
:func:`read_safetensors_header`).

How a folder is loaded
----------------------
1. ``config.json`` is read and every size in it checked against sane limits;
2. only the headers of the safetensors files are read, and the config is
   checked against them: the tensors that reveal each size (the word
   embeddings for the vocabulary and width, the first feed-forward layer for
   its width, the layer indices for the depth, ...) must have the shapes the
   config implies. A config that disagrees is refused here, before anything is
   allocated, so ``vocab_size: 10**9`` costs milliseconds, not 89 GiB;
3. the model is built (its values are about to be overwritten, so it is built
   from zeros, which costs nothing to draw), and every tensor it needs is
   checked by name, shape and dtype; tied copies must equal what they are tied to;
4. each tensor is converted once from the memory-mapped file into the working
   dtype: straight into its Param when the layouts agree, or into a fresh
   array that the Params then view (a transposed Linear weight, the three
   parts of a fused qkv).

Layout differences (Hugging Face -> minblip)
--------------------------------------------
* ``nn.Linear.weight`` is (d_out, d_in); a minblip ``Linear.W`` is its
  transpose (d_in, d_out). A loaded ``W`` is the transposed view of the
  checkpoint's layout (Fortran order), which matrix products read at the same
  speed and which a plain copy fills at memory speed; transposing the data
  instead is several times slower.
* The ViT attention stores q, k and v as one fused Linear ``qkv`` (3D, D)
  (rows [0, D) are q, [D, 2D) k, [2D, 3D) v); minblip has three Linears.
* The patch embedding is a Conv2d weight (D, 3, p, p); minblip's
  ``PatchEmbed.proj.W`` is ``conv_w.reshape(D, -1).T`` (see
  :meth:`minblip.vit.PatchEmbed.load_conv_weights`).
* ``class_embedding`` and ``position_embedding`` are bare Parameters, so their
  keys have no ``.weight``.
* The LM head's output weight ``cls.predictions.decoder.weight`` is tied to the
  word embeddings and ``decoder.bias`` to ``cls.predictions.bias``; files
  written by recent ``save_pretrained`` leave the tied copies out, older ones
  keep them. Both load; when present they must equal what they are tied to.

What a loaded model holds
-------------------------
``BlipForImageTextRetrieval`` has a ViT, a text encoder, the ITC projections
and the ITM head, and no decoder: the returned :class:`~minblip.blip.BLIP` has
``text_decoder = None``. Hugging Face has no ITC temperature either (its
``use_itm_head=False`` output is the plain cosine similarity), so ``temp`` keeps
its initial value and is not saved. ``BlipForConditionalGeneration`` has a ViT
and a decoder with its LM head only: ``text_encoder``, ``vision_proj``,
``text_proj``, ``itm_head`` and ``temp`` are None. ``BlipForQuestionAnswering``
has a ViT, a text encoder (the question reads the image) and a decoder (the
answer reads the question), which share nothing; the heads and ``temp`` are
None. Each model's ``param_count()`` therefore equals the PyTorch model's (plus
``temp`` for retrieval).

Where Hugging Face and salesforce/BLIP differ
---------------------------------------------
minblip follows the config it loads; each difference can be switched:

=================================  ==============  ===============  ==========================
what                               HF hub configs  salesforce/BLIP  how to choose in minblip
=================================  ==============  ===============  ==========================
ViT LayerNorm eps                  1e-5            1e-6             ``vision_eps=`` when loading
LM label smoothing                 0.0             0.1              ``label_smoothing=``
first token for ITM                [CLS]           [ENC]            ``itm_logits(..., enc_id=)``
first token of a VQA question      [CLS]           [ENC]            ``vqa_generate(..., enc_id=)``
decoder input in ``forward``       [CLS] as given  [DEC]            the ids you pass
=================================  ==============  ===============  ==========================

:data:`ORIGINAL_BLIP` holds the salesforce/BLIP load options
(``load_blip_captioning(d, **ORIGINAL_BLIP)``). HF ``generate`` does put
[DEC] (``bos_token_id``) first, as BLIP does, and so does
:func:`caption_token_ids`. Text dropout (0.0 in HF configs, 0.1 in BLIP) is
read from the config; the ViT's ``attention_dropout`` has no minblip
counterpart and is ignored (it is 0 in every BLIP config).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .blip import BLIP, BLIPConfig
from .core import deferred_params
from .files import write_json_atomic, write_text_atomic
from .generation import generate
from .qformer import QFormer, QFormerConfig
from .safetensors import (Checkpoint, read_safetensors, read_safetensors_header,  # noqa: F401
                          write_safetensors)
from .text import TextConfig
from .vit import ViTConfig

# ---------------------------------------------------------------------------------------
# Checking a config before anything is built
# ---------------------------------------------------------------------------------------

# Upper limits for the sizes a config.json may ask for, far above every published
# BLIP, BLIP-2 and OPT (OPT-175B: width 12288, 96 layers, 2048 positions; vocabularies
# of 30 to 250 thousand). They stop an absurd config early; the headers check below
# is what ties every size to the tensors actually on disk.
LIMITS = {"width": 1 << 16, "depth": 1 << 10, "vocab": 1 << 22, "positions": 1 << 20,
          "image": 1 << 14, "queries": 1 << 12}


def setting_name(where: str, key: str) -> str:
    """``where.key``, the name of a setting in a config.json section ("" is the top)."""
    return f"{where}.{key}" if where else key


def check_limits(section: dict, where: str, **kinds) -> None:
    """Each ``section[key]`` named in ``kinds`` (``key="width"``, a name in
    :data:`LIMITS`) must be an int in [1, its limit]; else a ValueError naming
    ``config.json: where.key``. ``where`` is the config's section ("" for the top)."""
    for key, kind in kinds.items():
        value, top = section[key], LIMITS[kind]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"config.json: {setting_name(where, key)} must be an int in "
                             f"[1, {top}], got {value!r}")


def check_vision_limits(v: dict) -> None:
    """The sizes of a BLIP or BLIP-2 ``vision_config`` (defaults filled in)."""
    square_sizes = {**v, "image_size": square(v["image_size"], "images"),
                    "patch_size": square(v["patch_size"], "patches")}
    check_limits(square_sizes, "vision_config", hidden_size="width", intermediate_size="width",
                 num_hidden_layers="depth", num_attention_heads="width", image_size="image",
                 patch_size="image")


def layer_indices(names, prefix: str) -> set[int]:
    """The layer numbers i of the tensor names ``prefix + "i." + ...``."""
    found = set()
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def check_against_checkpoint(source, shapes, layers, where: str, hints=()) -> None:
    """Refuse a config whose sizes the checkpoint's headers contradict, before any
    model is built from it.

    ``shapes``: ``[(tensor name, the shape the config implies)]``, one tensor
    per size (a vocabulary, a width, a feed-forward width, a table length);
    ``layers``: ``[(name prefix, the depth the config says)]``, checked against
    the layer numbers under the prefix (0 .. depth-1). ``source`` is a
    :class:`~minblip.safetensors.Checkpoint` or a ``{name: array}`` dict.
    ``hints``: ``[(name prefix, text)]``, each text added when a tensor name
    starts with its prefix (what the checkpoint probably is instead).
    """
    source = _as_source(source)
    problems = []
    for name, want in shapes:
        if name not in source:
            problems.append(f"{name} is missing (expected {tuple(want)})")
        elif tuple(source.info(name).shape) != tuple(want):
            problems.append(f"{name} has shape {tuple(source.info(name).shape)}, the config "
                            f"implies {tuple(want)}")
    names = source.names
    for prefix, depth in layers:
        found = layer_indices(names, prefix)
        if found != set(range(depth)):
            problems.append(f"the config says {depth} layers, the checkpoint has "
                            f"{len(found)} under {prefix}*")
    if problems:
        problems += [f"({hint})" for prefix, hint in hints
                     if any(n.startswith(prefix) for n in names)]
        raise ValueError(f"{where} does not match the checkpoint's tensors (nothing was "
                         f"built):\n  " + "\n  ".join(problems))


def vit_expected_shapes(v: ViTConfig, prefix: str):
    """(shapes, layers) for :func:`check_against_checkpoint`: a ``BlipVisionModel`` /
    ``Blip2VisionModel`` of these sizes."""
    D = v.width
    return ([(f"{prefix}.embeddings.patch_embedding.weight",
              (D, v.channels, v.patch_size, v.patch_size)),
             (f"{prefix}.embeddings.position_embedding", (1, 1 + v.num_patches, D)),
             (f"{prefix}.encoder.layers.0.mlp.fc1.weight", (v.mlp_dim, D))],
            [(f"{prefix}.encoder.layers.", v.depth)])


def _text_expected_shapes(t: TextConfig, prefix: str):
    """(shapes, layers): a ``BlipTextModel`` of these sizes under ``prefix``."""
    D = t.width
    return ([(f"{prefix}.embeddings.word_embeddings.weight", (t.vocab_size, D)),
             (f"{prefix}.embeddings.position_embeddings.weight", (t.max_positions, D)),
             (f"{prefix}.encoder.layer.0.intermediate.dense.weight", (t.mlp_dim, D)),
             (f"{prefix}.encoder.layer.0.crossattention.self.key.weight",
              (D, t.encoder_width))],
            [(f"{prefix}.encoder.layer.", t.depth)])


def blip_expected_shapes(cfg: BLIPConfig, kind: str):
    """(shapes, layers) that witness every size of a BLIP config of ``kind``."""
    shapes, layers = vit_expected_shapes(cfg.vision, "vision_model")
    texts = {"retrieval": ["text_encoder"], "captioning": ["text_decoder.bert"],
             "vqa": ["text_encoder", "text_decoder.bert"]}[kind]
    for prefix in texts:
        s, n = _text_expected_shapes(cfg.text, prefix)
        shapes, layers = shapes + s, layers + n
    if kind == "retrieval":
        shapes += [("vision_proj.weight", (cfg.embed_dim, cfg.vision.width)),
                   ("text_proj.weight", (cfg.embed_dim, cfg.text.width))]
    return shapes, layers


# ---------------------------------------------------------------------------------------
# config.json <-> BLIPConfig
# ---------------------------------------------------------------------------------------

KINDS = ("retrieval", "captioning", "vqa", "pretraining")
ARCHITECTURES = {"BlipForImageTextRetrieval": "retrieval",
                 "BlipForConditionalGeneration": "captioning",
                 "BlipForQuestionAnswering": "vqa"}

# salesforce/BLIP's values where Hugging Face configs differ (see the module docstring)
ORIGINAL_BLIP = {"vision_eps": 1e-6, "label_smoothing": 0.1}

# Hugging Face's defaults (configuration_blip.py), used for keys a config.json leaves out
_HF_TEXT_DEFAULTS = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072,
                     "num_hidden_layers": 12, "num_attention_heads": 8,
                     "max_position_embeddings": 512, "hidden_act": "gelu",
                     "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0,
                     "initializer_range": 0.02, "bos_token_id": 30522, "eos_token_id": 2,
                     "pad_token_id": 0, "sep_token_id": 102, "label_smoothing": 0.0}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 384, "patch_size": 16,
                       "hidden_act": "gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02}


def square(value, what: str) -> int:
    """An image or patch size, given as an int or a square [h, w]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config.json: minblip supports square {what}, got {value}")
        value = value[0]
    return value


def number(sub: dict, key: str, where: str) -> float:
    """A float setting of a config section, or an error naming the key."""
    value = sub[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json: {setting_name(where, key)} must be a number, got "
                         f"{value!r}")
    return float(value)


def blip_config_from_hf(hf_config: dict, *, vision_eps: float | None = None,
                        label_smoothing: float | None = None) -> BLIPConfig:
    """A Hugging Face BLIP ``config.json`` (as a dict) -> :class:`BLIPConfig`.

    Missing keys take Hugging Face's defaults. ``vision_eps`` and
    ``label_smoothing`` override the config (see :data:`ORIGINAL_BLIP`).
    """
    if not isinstance(hf_config, dict) or hf_config.get("model_type", "blip") != "blip":
        got = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config)
        raise ValueError(f"config.json: expected a BLIP config (model_type 'blip'), got {got!r}")
    t = {**_HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    v = {**_HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    for where, sub in (("text_config", t), ("vision_config", v)):
        if sub["hidden_act"] != "gelu":
            raise ValueError(f"config.json: {where}.hidden_act must be 'gelu' (exact erf GELU), "
                             f"got {sub['hidden_act']!r}")
    t.setdefault("encoder_hidden_size", v["hidden_size"])
    embed_dim = hf_config.get("image_text_hidden_size", 256)
    check_vision_limits(v)
    check_limits(t, "text_config", vocab_size="vocab", hidden_size="width",
                 intermediate_size="width", num_hidden_layers="depth",
                 num_attention_heads="width", max_position_embeddings="positions",
                 encoder_hidden_size="width")
    check_limits({"image_text_hidden_size": embed_dim}, "", image_text_hidden_size="width")
    vision = ViTConfig(image_size=square(v["image_size"], "images"),
                       patch_size=square(v["patch_size"], "patches"), channels=3,
                       width=v["hidden_size"], depth=v["num_hidden_layers"],
                       heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                       eps=(number(v, "layer_norm_eps", "vision_config") if vision_eps is None
                            else float(vision_eps)),
                       init_std=number(v, "initializer_range", "vision_config"))
    text = TextConfig(vocab_size=t["vocab_size"], width=t["hidden_size"],
                      depth=t["num_hidden_layers"], heads=t["num_attention_heads"],
                      mlp_dim=t["intermediate_size"], max_positions=t["max_position_embeddings"],
                      eps=number(t, "layer_norm_eps", "text_config"),
                      dropout=number(t, "hidden_dropout_prob", "text_config"),
                      encoder_width=t["encoder_hidden_size"],
                      init_std=number(t, "initializer_range", "text_config"),
                      pad_id=t["pad_token_id"])
    smoothing = (number(t, "label_smoothing", "text_config") if label_smoothing is None
                 else float(label_smoothing))
    return BLIPConfig(vision=vision, text=text, embed_dim=embed_dim, label_smoothing=smoothing)


def hf_config_from_blip(cfg: BLIPConfig, kind: str, *, bos_token_id: int, sep_token_id: int,
                        eos_token_id: int | None = None) -> dict:
    """:class:`BLIPConfig` -> a Hugging Face ``config.json`` dict for ``kind``
    ("retrieval", "captioning" or "vqa"). ``bos_token_id`` is [DEC], ``sep_token_id``
    the [SEP] that ends a caption; ``eos_token_id`` defaults to it."""
    arch = {k: a for a, k in ARCHITECTURES.items()}
    if kind not in arch:
        raise ValueError(f"kind must be one of {sorted(arch)}, got {kind!r}")
    v, t = cfg.vision, cfg.text
    if v.pos_embed_at_output:
        raise ValueError("hf_config_from_blip: a ViT with pos_embed_at_output=True (the position "
                         "table added again at its output) has no Hugging Face BLIP equivalent")
    return {
        "architectures": [arch[kind]],
        "model_type": "blip",
        "image_text_hidden_size": cfg.embed_dim,
        "initializer_range": t.init_std,
        "label_smoothing": cfg.label_smoothing,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "blip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "encoder_hidden_size": t.encoder_width,
            "intermediate_size": t.mlp_dim, "num_hidden_layers": t.depth,
            "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions,
            "hidden_act": "gelu", "layer_norm_eps": t.eps,
            "hidden_dropout_prob": t.dropout, "attention_probs_dropout_prob": t.dropout,
            "initializer_range": t.init_std, "pad_token_id": t.pad_id,
            "bos_token_id": int(bos_token_id), "sep_token_id": int(sep_token_id),
            "eos_token_id": int(sep_token_id if eos_token_id is None else eos_token_id),
            "label_smoothing": cfg.label_smoothing, "is_decoder": True,
            "tie_word_embeddings": True},
        "vision_config": {
            "model_type": "blip_vision_model", "hidden_size": v.width,
            "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": "gelu", "layer_norm_eps": v.eps,
            "attention_dropout": 0.0, "initializer_range": v.init_std},
    }


# ---------------------------------------------------------------------------------------
# The tensor map: one entry per Hugging Face tensor
# ---------------------------------------------------------------------------------------

@dataclass
class HFTensor:
    """One Hugging Face tensor and the minblip Params it is made of.

    ``to_hf(arrays)`` builds the HF tensor from the Params' arrays (data or
    grad); ``from_hf(tensor)`` splits an HF tensor into arrays shaped like the
    Params, as views where it can. ``tied_to`` names the tensor this one is a
    tied copy of (its Params are already listed there), else None.
    """

    name: str
    params: tuple
    minblip_names: tuple
    to_hf: Callable
    from_hf: Callable
    tied_to: str | None = None

    @property
    def shape(self) -> tuple:
        return self.to_hf([np.empty(p.shape, np.int8) for p in self.params]).shape


def hf_copy(name, p, pname) -> HFTensor:
    """A tensor stored as the Param holds it."""
    return HFTensor(name, (p,), (pname,), lambda a: a[0], lambda t: [t])


def hf_transposed(name, p, pname) -> HFTensor:
    """A tensor stored transposed (a Linear weight)."""
    return HFTensor(name, (p,), (pname,), lambda a: a[0].T, lambda t: [t.T])


def hf_linear(prefix, lin, mname) -> list[HFTensor]:
    """nn.Linear (d_out, d_in) weight and bias (if it has one) <- minblip W (d_in,
    d_out) and b."""
    out = [hf_transposed(prefix + ".weight", lin.W, mname + ".W")]
    if lin.b is not None:
        out.append(hf_copy(prefix + ".bias", lin.b, mname + ".b"))
    return out


def hf_layer_norm(prefix, ln, mname) -> list[HFTensor]:
    return [hf_copy(prefix + ".weight", ln.gamma, mname + ".gamma"),
            hf_copy(prefix + ".bias", ln.beta, mname + ".beta")]


def fused_qkv_to_hf(weights):
    """minblip's ViT attention weights [Wq, Wk, Wv], each (D, D) in the (d_in, d_out)
    layout of ``Linear.W`` -> Hugging Face's fused ``qkv.weight`` (3D, D), an
    ``nn.Linear`` weight (d_out, d_in) whose rows [0, D) make q, [D, 2D) k and
    [2D, 3D) v (``BlipAttention``: ``qkv(x).reshape(B, T, 3, H, dh)``)."""
    ### BEGIN SOLUTION
    return np.concatenate([w.T for w in weights], axis=0)
    ### END SOLUTION


def fused_qkv_from_hf(weight):
    """Hugging Face's fused ``qkv.weight`` (3D, D) -> [Wq, Wk, Wv], each (D, D) in
    minblip's (d_in, d_out) layout; the inverse of :func:`fused_qkv_to_hf`."""
    ### BEGIN SOLUTION
    return [w.T for w in np.split(weight, 3, axis=0)]
    ### END SOLUTION


def _qkv_bias(name, attn, mnames) -> HFTensor | None:
    """The fused ``qkv.bias`` (3D,) <- the biases of q, k, v; None when the ViT has
    none (``qkv_bias=False``). Without a key bias (BLIP-2's EVA ViT: LAVIS's
    ``q_bias`` and ``v_bias``) Hugging Face stores zeros in the key's third
    (``Blip2Attention``: ``cat(q_bias, zeros_like(v_bias), v_bias)``); minblip
    writes zeros there and ignores the third on reading, since a key bias
    cannot change the attention (see MultiHeadAttention)."""
    if attn.query.b is None:
        return None
    if attn.key.b is not None:
        lins = (attn.query, attn.key, attn.value)
        return HFTensor(name, tuple(lin.b for lin in lins), tuple(n + ".b" for n in mnames),
                        lambda a: np.concatenate(a), lambda t: np.split(t, 3))
    D = attn.d_model
    return HFTensor(name, (attn.query.b, attn.value.b), (mnames[0] + ".b", mnames[2] + ".b"),
                    lambda a: np.concatenate([a[0], np.zeros_like(a[0]), a[1]]),
                    lambda t: [t[:D], t[2 * D:]])


def vit_tensors(vit, prefix="vision_model", mprefix="visual_encoder",
                post_layernorm=None) -> list[HFTensor]:
    """``BlipVisionModel`` / ``Blip2VisionModel`` <-> :class:`minblip.vit.VisionTransformer`.

    ``post_layernorm``: ``(LayerNorm, minblip name)`` that HF's ``post_layernorm``
    maps to, for a ViT without a final norm (BLIP-2, where it is LAVIS's
    ``ln_vision``); by default the ViT's own ``norm``."""
    D = vit.config.width
    pe = vit.patch_embed
    shape = (D, pe.channels, pe.patch_size, pe.patch_size)
    out = [
        hf_copy(f"{prefix}.embeddings.class_embedding", vit.cls_token,
                f"{mprefix}.cls_token"),
        hf_copy(f"{prefix}.embeddings.position_embedding", vit.pos_embed,
                f"{mprefix}.pos_embed"),
        # Conv2d (D, C, p, p) <-> proj.W (C*p*p, D), as PatchEmbed.load_conv_weights maps it
        HFTensor(f"{prefix}.embeddings.patch_embedding.weight", (pe.proj.W,),
                 (f"{mprefix}.patch_embed.proj.W",),
                 lambda a: a[0].T.reshape(shape), lambda t: [t.reshape(D, -1).T]),
        hf_copy(f"{prefix}.embeddings.patch_embedding.bias", pe.proj.b,
                f"{mprefix}.patch_embed.proj.b"),
    ]
    for i, blk in enumerate(vit.blocks):
        hp, mp = f"{prefix}.encoder.layers.{i}", f"{mprefix}.blocks.{i}"
        att = blk.attn
        qkv = (att.query, att.key, att.value)
        mnames = tuple(f"{mp}.attn.{n}" for n in ("query", "key", "value"))
        bias = _qkv_bias(f"{hp}.self_attn.qkv.bias", att, mnames)
        out += [
            HFTensor(f"{hp}.self_attn.qkv.weight", tuple(lin.W for lin in qkv),
                     tuple(n + ".W" for n in mnames),
                     fused_qkv_to_hf, fused_qkv_from_hf),
            *([bias] if bias is not None else []),
            *hf_linear(f"{hp}.self_attn.projection", att.out, f"{mp}.attn.out"),
            *hf_layer_norm(f"{hp}.layer_norm1", blk.ln1, f"{mp}.ln1"),
            *hf_linear(f"{hp}.mlp.fc1", blk.mlp.fc1, f"{mp}.mlp.fc1"),
            *hf_linear(f"{hp}.mlp.fc2", blk.mlp.fc2, f"{mp}.mlp.fc2"),
            *hf_layer_norm(f"{hp}.layer_norm2", blk.ln2, f"{mp}.ln2"),
        ]
    ln, ln_name = (vit.norm, f"{mprefix}.norm") if post_layernorm is None else post_layernorm
    if ln is None:
        raise ValueError("vit_tensors: this ViT has no final norm; pass the LayerNorm that "
                         "post_layernorm maps to")
    return out + hf_layer_norm(f"{prefix}.post_layernorm", ln, ln_name)


def _attention(prefix, mha, mname):
    """``BlipTextAttention`` (self or cross) <-> MultiHeadAttention, minus the LayerNorm."""
    return [*hf_linear(f"{prefix}.self.query", mha.query, f"{mname}.query"),
            *hf_linear(f"{prefix}.self.key", mha.key, f"{mname}.key"),
            *hf_linear(f"{prefix}.self.value", mha.value, f"{mname}.value"),
            *hf_linear(f"{prefix}.output.dense", mha.out, f"{mname}.out")]


def _bert_tensors(bert, prefix, mprefix) -> list[HFTensor]:
    """``BlipTextModel`` (no pooler) <-> :class:`minblip.text.TextTransformer`."""
    emb = bert.embeddings
    out = [hf_copy(f"{prefix}.embeddings.word_embeddings.weight", emb.word_embeddings.weight,
                   f"{mprefix}.embeddings.word_embeddings.weight"),
           hf_copy(f"{prefix}.embeddings.position_embeddings.weight",
                   emb.position_embeddings.weight,
                   f"{mprefix}.embeddings.position_embeddings.weight"),
           *hf_layer_norm(f"{prefix}.embeddings.LayerNorm", emb.layer_norm,
                          f"{mprefix}.embeddings.layer_norm")]
    for i, layer in enumerate(bert.layers):
        hp, mp = f"{prefix}.encoder.layer.{i}", f"{mprefix}.layers.{i}"
        out += [*_attention(f"{hp}.attention", layer.self_attn, f"{mp}.self_attn"),
                *hf_layer_norm(f"{hp}.attention.output.LayerNorm", layer.self_attn_ln,
                               f"{mp}.self_attn_ln"),
                *_attention(f"{hp}.crossattention", layer.cross_attn, f"{mp}.cross_attn"),
                *hf_layer_norm(f"{hp}.crossattention.output.LayerNorm", layer.cross_attn_ln,
                               f"{mp}.cross_attn_ln"),
                *hf_linear(f"{hp}.intermediate.dense", layer.ffn.fc1, f"{mp}.ffn.fc1"),
                *hf_linear(f"{hp}.output.dense", layer.ffn.fc2, f"{mp}.ffn.fc2"),
                *hf_layer_norm(f"{hp}.output.LayerNorm", layer.ffn_ln, f"{mp}.ffn_ln")]
    return out


def _decoder_tensors(decoder, prefix="text_decoder", mprefix="text_decoder") -> list[HFTensor]:
    """``BlipTextLMHeadModel`` <-> :class:`minblip.text.TextDecoder`."""
    head = decoder.head
    p = f"{prefix}.cls.predictions"
    return [*_bert_tensors(decoder.bert, f"{prefix}.bert", f"{mprefix}.bert"),
            hf_copy(f"{p}.bias", head.bias, f"{mprefix}.head.bias"),
            *hf_linear(f"{p}.transform.dense", head.dense, f"{mprefix}.head.dense"),
            *hf_layer_norm(f"{p}.transform.LayerNorm", head.layer_norm,
                           f"{mprefix}.head.layer_norm"),
            # the tied output layer: written by older save_pretrained, optional here
            hf_copy(f"{p}.decoder.weight", head.weight, f"{mprefix}.head.weight"),
            hf_copy(f"{p}.decoder.bias", head.bias, f"{mprefix}.head.bias")]


def model_kind(model: BLIP) -> str:
    """"retrieval" (no decoder), "captioning" (no text encoder), "vqa" (both, no
    ITC/ITM heads) or "pretraining" (both, and the heads)."""
    if not isinstance(model, BLIP):
        raise TypeError(f"expected a minblip BLIP, got {type(model).__name__}")
    has_enc, has_dec = model.text_encoder is not None, model.text_decoder is not None
    if has_enc and has_dec:
        return "pretraining" if model.itm_head is not None else "vqa"
    if has_enc:
        return "retrieval"
    if has_dec:
        return "captioning"
    raise ValueError("this BLIP has neither a text encoder nor a text decoder")


def mark_tied(entries: list[HFTensor]) -> list[HFTensor]:
    """Mark each entry whose Params all appear in one earlier entry as ``tied_to``
    it (in place; returns the list)."""
    first: dict[int, str] = {}
    for t in entries:
        owners = {first.get(id(p)) for p in t.params}
        if None not in owners and len(owners) == 1:
            t.tied_to = owners.pop()
        else:
            for p in t.params:
                first.setdefault(id(p), t.name)
    return entries


def hf_tensors(model: BLIP, kind: str | None = None) -> list[HFTensor]:
    """The Hugging Face tensors of ``model`` for ``kind``, in state-dict order.

    ``"retrieval"``, ``"captioning"`` and ``"vqa"`` are the three Hugging Face
    models; ``"pretraining"`` is minblip's whole pretraining model under the same
    naming scheme (``text_encoder.*``, ``text_decoder.*``, the projections,
    ``itm_head`` and ``temp``, as salesforce/BLIP's ``BLIP_Pretrain`` names them).
    A tensor whose Params all appear in an earlier tensor (the LM head's tied
    output layer, or what the decoder shares with the encoder) is marked
    ``tied_to`` it.
    """
    have = model_kind(model)
    kind = have if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != have and have != "pretraining":
        raise ValueError(f"a {have} model cannot be written as {kind!r}")
    if kind == "vqa" and have == "pretraining":
        raise ValueError("a pretraining BLIP cannot be written as 'vqa' (its encoder and "
                         "decoder share weights; BlipForQuestionAnswering's share none)")
    out = vit_tensors(model.visual_encoder)
    if kind in ("retrieval", "vqa", "pretraining"):
        out += _bert_tensors(model.text_encoder, "text_encoder", "text_encoder")
    if kind in ("captioning", "vqa", "pretraining"):
        out += _decoder_tensors(model.text_decoder)
    if kind in ("retrieval", "pretraining"):
        for name in ("vision_proj", "text_proj", "itm_head"):
            out += hf_linear(name, getattr(model, name), name)
    if kind == "pretraining":
        out.append(hf_copy("temp", model.temp, "temp"))
    return mark_tied(out)


def state_dict_of(entries: list[HFTensor], *, grad: bool = False,
                  include_tied: bool = False) -> dict[str, np.ndarray]:
    """``{hf_name: array}`` of a tensor map, from the Params' data (or ``grad``),
    each a fresh C-ordered array; tied copies left out unless ``include_tied``."""
    # np.array(order="C"), not np.ascontiguousarray: that one turns a 0-d tensor (temp) into 1-d
    return {t.name: np.array(t.to_hf([p.grad if grad else p.data for p in t.params]), order="C")
            for t in entries if include_tied or t.tied_to is None}


def hf_state_dict(model: BLIP, kind: str | None = None, *, grad: bool = False,
                  include_tied: bool = False) -> dict[str, np.ndarray]:
    """``{hf_name: array}`` in Hugging Face layouts, from the Params' data (or
    their ``grad``). Tied copies are left out unless ``include_tied``, as
    ``save_pretrained`` leaves them out."""
    return state_dict_of(hf_tensors(model, kind), grad=grad, include_tied=include_tied)


# ---------------------------------------------------------------------------------------
# Fitting a checkpoint's tensors into a model
# ---------------------------------------------------------------------------------------

# A few buffers older checkpoints saved beside the weights: accepted when they hold
# what the model would compute anyway, never loaded.
_POSITION_IDS = (".embeddings.position_ids", ".position_ids")


@dataclass(frozen=True)
class _ArrayInfo:
    shape: tuple
    is_float: bool
    dtype_name: str


class _ArraySource:
    """A ``{name: array}`` dict offering what :class:`~minblip.safetensors.Checkpoint`
    offers: ``names``, ``info``, ``read`` and ``tensor`` (both a converted copy)."""

    def __init__(self, tensors: dict):
        self._tensors = tensors

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def info(self, name: str) -> _ArrayInfo:
        a = np.asarray(self._tensors[name])
        return _ArrayInfo(a.shape, a.dtype.kind == "f", str(a.dtype))

    def read(self, name: str, dtype=None) -> np.ndarray:
        a = np.asarray(self._tensors[name])
        return np.array(a, dtype=dtype if dtype is not None and a.dtype.kind == "f" else None)

    tensor = read  # always a copy: the model must not share the caller's arrays


def _as_source(tensors):
    return tensors if isinstance(tensors, Checkpoint) else _ArraySource(tensors)


def _adopt(p, array: np.ndarray) -> None:
    """Make ``array`` (shaped like ``p``, in the working dtype) the Param's data. The
    gradient keeps its values when only the layout changes."""
    if array.shape != p.shape:
        raise AssertionError(f"internal: {array.shape} does not fit a Param {p.shape}")
    placeholder = p.placeholder
    p.data = array
    if placeholder or p.grad.dtype != array.dtype:
        p.grad = np.zeros(array.shape, array.dtype)  # untouched zeros cost no memory


def fit(entries: list[HFTensor], tensors, what: str, source: str, hints=(),
        dtype=None) -> None:
    """Check a checkpoint's tensors against a tensor map completely, then load them.

    ``tensors``: a :class:`~minblip.safetensors.Checkpoint` (memory-mapped files)
    or a ``{name: array}`` dict. Checked first, before any Param changes: every
    untied entry present with its shape and a float dtype, tied copies (if
    present) equal to what they are tied to, nothing left over (except
    ``position_ids`` buffers holding 0, 1, 2, ...). Otherwise one ValueError
    lists every missing, unexpected, misshapen and untied tensor.

    Then the Params take views of each tensor in ``dtype`` (default: each
    Param's own): the file's memory map itself when it holds that dtype, else
    its one conversion; in the stored layout either way (a Linear weight is
    the transposed view, the three parts of a fused qkv are views of one array).
    A dict's arrays are copied first. A Param of a model built inside
    :func:`minblip.core.deferred_params` gets its first real array here.
    """
    src = _as_source(tensors)
    known = {t.name for t in entries}
    missing, misshapen, mismatched, unexpected = [], [], [], []
    for t in entries:
        if t.name not in src:
            if t.tied_to is None:
                missing.append(f"{t.name} {t.shape}")
            continue
        info = src.info(t.name)
        if tuple(info.shape) != t.shape or not info.is_float:
            misshapen.append(f"{t.name}: expected float {t.shape}, got {info.dtype_name} "
                             f"{tuple(info.shape)}")
    for name in src.names:
        if name in known:
            continue
        if name.endswith(_POSITION_IDS) and not src.info(name).is_float:
            a = src.read(name)
            if np.array_equal(a.reshape(-1), np.arange(a.size)):
                continue
        unexpected.append(f"{name} {tuple(src.info(name).shape)}")
    if not (missing or misshapen or unexpected):
        for t in entries:
            if t.tied_to is not None and t.name in src:
                if not np.array_equal(src.read(t.name), src.read(t.tied_to)):
                    mismatched.append(f"{t.name} differs from {t.tied_to}, which minblip ties "
                                      f"it to")
    problems = [(missing, "missing"), (unexpected, "unexpected"), (misshapen, "misshapen"),
                (mismatched, "untied")]
    if any(items for items, _ in problems):
        lines = [f"{source} does not fit {what}:"]
        for items, label in problems:
            if items:
                more = [f"... and {len(items) - 20} more"] if len(items) > 20 else []
                lines.append(f"  {len(items)} {label}: " + "; ".join(items[:20] + more))
        lines += [f"  ({hint})" for prefix, hint in hints
                  if any(n.startswith(prefix) for n in src.names)]
        raise ValueError("\n".join(lines))
    for t in entries:
        if t.tied_to is not None:
            continue
        stored = src.tensor(t.name, t.params[0].dtype if dtype is None else dtype)
        for p, part in zip(t.params, t.from_hf(stored)):
            _adopt(p, part)  # views: a transposed weight, a third of a fused qkv


def load_hf_state_dict(model: BLIP, tensors, kind: str | None = None,
                       source: str = "the checkpoint", dtype=None) -> None:
    """Load Hugging Face tensors (a ``{name: array}`` dict or a
    :class:`~minblip.safetensors.Checkpoint`) into ``model``'s Params, converted
    to ``dtype`` (default: each Param's own).

    Everything is checked before anything is written: every tensor the model
    needs must be present with the right shape, tied copies (if present) must
    equal what they are tied to, and no tensor may be left over. Otherwise a
    ValueError lists every missing, unexpected and misshapen tensor by name.
    """
    kind = model_kind(model) if kind is None else kind
    fit(hf_tensors(model, kind), tensors, f"a minblip {kind} BLIP of this config", source,
        _kind_hints(kind), dtype)


def _kind_hints(kind: str):
    """Hints for a checkpoint of another kind than the one asked for."""
    return [(prefix, f"it has {prefix}* tensors: is it a {other} checkpoint?")
            for prefix, other in (("text_encoder.", "retrieval"), ("text_decoder.", "captioning"))
            if kind not in (other, "pretraining", "vqa")]


# ---------------------------------------------------------------------------------------
# BLIP-2's Q-Former (Hugging Face Blip2QFormerModel)
# ---------------------------------------------------------------------------------------

def qformer_tensors(qformer, prefix: str = "", text_ffn: bool = False,
                    mprefix: str = "") -> list[HFTensor]:
    """HF ``Blip2QFormerModel`` <-> :class:`minblip.qformer.QFormer`; ``prefix`` and
    ``mprefix`` go in front of the HF and the minblip names.

    HF keeps less of the Q-Former in this module than minblip does: its
    ``layernorm`` is minblip's ``embeddings.layer_norm`` (LAVIS
    ``Qformer.bert.embeddings.LayerNorm``, applied to the queries too); the
    learned queries (``query_tokens``) and the word and position embeddings live
    on the outer BLIP-2 model; the text FFN (``intermediate``/``output``) exists
    only with ``use_qformer_text_input`` (``text_ffn``). LAVIS's
    ``attention.self`` is HF's ``attention.attention``.
    """
    p = f"{prefix}." if prefix else ""
    m = f"{mprefix}." if mprefix else ""
    out = hf_layer_norm(f"{p}layernorm", qformer.embeddings.layer_norm,
                        f"{m}embeddings.layer_norm")

    def attention(hp, mha, mp):
        return [*hf_linear(f"{hp}.attention.query", mha.query, f"{mp}.query"),
                *hf_linear(f"{hp}.attention.key", mha.key, f"{mp}.key"),
                *hf_linear(f"{hp}.attention.value", mha.value, f"{mp}.value"),
                *hf_linear(f"{hp}.output.dense", mha.out, f"{mp}.out")]

    for i, layer in enumerate(qformer.layers):
        hp, mp = f"{p}encoder.layer.{i}", f"{m}layers.{i}"
        out += [*attention(f"{hp}.attention", layer.self_attn, f"{mp}.self_attn"),
                *hf_layer_norm(f"{hp}.attention.output.LayerNorm", layer.self_attn_ln,
                               f"{mp}.self_attn_ln")]
        if layer.cross_attn is not None:
            out += [*attention(f"{hp}.crossattention", layer.cross_attn, f"{mp}.cross_attn"),
                    *hf_layer_norm(f"{hp}.crossattention.output.LayerNorm",
                                   layer.cross_attn_ln, f"{mp}.cross_attn_ln")]
        if text_ffn:
            out += [*hf_linear(f"{hp}.intermediate.dense", layer.ffn.fc1, f"{mp}.ffn.fc1"),
                    *hf_linear(f"{hp}.output.dense", layer.ffn.fc2, f"{mp}.ffn.fc2"),
                    *hf_layer_norm(f"{hp}.output.LayerNorm", layer.ffn_ln, f"{mp}.ffn_ln")]
        out += [*hf_linear(f"{hp}.intermediate_query.dense", layer.ffn_query.fc1,
                           f"{mp}.ffn_query.fc1"),
                *hf_linear(f"{hp}.output_query.dense", layer.ffn_query.fc2,
                           f"{mp}.ffn_query.fc2"),
                *hf_layer_norm(f"{hp}.output_query.LayerNorm", layer.ffn_query_ln,
                               f"{mp}.ffn_query_ln")]
    return out


def qformer_config_from_hf(hf_config: dict, num_queries: int = 32) -> QFormerConfig:
    """A Hugging Face ``Blip2QFormerConfig`` dict -> :class:`minblip.qformer.QFormerConfig`.
    The number of queries is not part of it (``Blip2Config.num_query_tokens``)."""
    c = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
         "hidden_dropout_prob": 0.1, "max_position_embeddings": 512, "initializer_range": 0.02,
         "layer_norm_eps": 1e-12, "pad_token_id": 0, "cross_attention_frequency": 2,
         "encoder_hidden_size": 1408, **hf_config}
    if c["hidden_act"] != "gelu":
        raise ValueError(f"Q-Former config: hidden_act must be 'gelu', got {c['hidden_act']!r}")
    check_limits(c, "qformer_config", vocab_size="vocab", hidden_size="width",
                 num_hidden_layers="depth", num_attention_heads="width",
                 intermediate_size="width", cross_attention_frequency="depth",
                 encoder_hidden_size="width", max_position_embeddings="positions")
    check_limits({"num_query_tokens": num_queries}, "", num_query_tokens="queries")
    return QFormerConfig(vocab_size=c["vocab_size"], width=c["hidden_size"],
                         depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
                         mlp_dim=c["intermediate_size"], num_queries=num_queries,
                         cross_attention_freq=c["cross_attention_frequency"],
                         encoder_width=c["encoder_hidden_size"],
                         max_positions=c["max_position_embeddings"],
                         eps=number(c, "layer_norm_eps", "qformer_config"),
                         dropout=number(c, "hidden_dropout_prob", "qformer_config"),
                         init_std=number(c, "initializer_range", "qformer_config"),
                         pad_id=c["pad_token_id"])


def qformer_expected_shapes(cfg: QFormerConfig, prefix: str = ""):
    """(shapes, layers) for :func:`check_against_checkpoint`: a ``Blip2QFormerModel``
    of these sizes (layer 0 always has cross-attention)."""
    p = f"{prefix}." if prefix else ""
    D = cfg.width
    return ([(f"{p}layernorm.weight", (D,)),
             (f"{p}encoder.layer.0.intermediate_query.dense.weight", (cfg.mlp_dim, D)),
             (f"{p}encoder.layer.0.crossattention.attention.key.weight",
              (D, cfg.encoder_width))],
            [(f"{p}encoder.layer.", cfg.depth)])


def load_qformer(directory, dtype=np.float32, *, num_queries: int = 32,
                 rng: np.random.Generator | None = None) -> QFormer:
    """A Hugging Face ``Blip2QFormerModel`` folder -> :class:`minblip.qformer.QFormer`.

    The file sets the embedding LayerNorm and every layer (the text FFN too if the
    config has ``use_qformer_text_input``). What ``Blip2QFormerModel`` does not
    hold keeps its initial value from ``rng``: the ``num_queries`` learned queries,
    the word and position embeddings and (without text input) the text FFN.
    """
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") not in (None, "blip_2_qformer"):
        raise ValueError(f"{directory}/config.json: expected a Blip2QFormerModel config "
                         f"(model_type 'blip_2_qformer'), got {hf_config.get('model_type')!r}")
    cfg = qformer_config_from_hf(hf_config, num_queries)
    checkpoint = Checkpoint(directory)
    check_against_checkpoint(checkpoint, *qformer_expected_shapes(cfg),
                             f"{directory}/config.json")
    qformer = QFormer(cfg, np.random.default_rng(0) if rng is None else rng)
    entries = qformer_tensors(qformer, text_ffn=bool(hf_config.get("use_qformer_text_input")))
    fit(entries, checkpoint, "a minblip QFormer of this config", checkpoint.source, dtype=dtype)
    return qformer.to(dtype)


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------

def read_hf_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face checkpoint folder (``model.safetensors``, or
    the shards listed in ``model.safetensors.index.json``), each a fresh copy
    (float16 and bfloat16 widened to float32). The loaders do not use this: they
    read one tensor at a time through :class:`~minblip.safetensors.Checkpoint`."""
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names}


def read_hf_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class ZeroInit:
    """Stands in for the random generator while a model is built only to have every
    value overwritten by a checkpoint: drawing 200 million normals for BLIP-base
    takes seconds, zeros take nothing. The zeros are one broadcast scalar (no
    memory of their own), so building allocates nothing but the Params, and their
    gradients stay untouched pages until a backward uses them. Anything but
    ``normal`` and ``uniform`` is passed on to a real generator."""

    def __init__(self):
        self._rng = np.random.default_rng(0)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.broadcast_to(np.float32(0.0), () if size is None else size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.broadcast_to(np.float32(0.0), () if size is None else size)

    def __getattr__(self, name):
        return getattr(self._rng, name)


def _build(cfg: BLIPConfig, kind: str) -> BLIP:
    """A BLIP holding exactly the modules of the Hugging Face ``kind``, its large
    Params placeholders (:func:`minblip.core.deferred_params`) until the file
    fills them. Retrieval and captioning are built with ``sharing="all"`` so
    only one text transformer exists, and the half the checkpoint does not
    have is dropped (set to None); VQA's encoder and decoder share nothing."""
    sharing = "none" if kind == "vqa" else "all"
    with deferred_params():
        model = BLIP(replace(cfg, sharing=sharing), ZeroInit())
    if kind == "retrieval":
        model.text_decoder = None
    elif kind == "captioning":
        model.text_encoder = None  # the decoder keeps its own reference to the transformer
    if kind != "retrieval":
        model.vision_proj = model.text_proj = model.itm_head = model.temp = None
    return model


def finish_loading(model, dtype) -> None:
    """After :func:`fit`: every placeholder of a deferred build must have its data,
    and what the file did not hold (small Params such as retrieval's ``temp``)
    goes to ``dtype``; the loaded Params are in it already."""
    left = [name for name, p in model.named_params(include_frozen=True) if p.placeholder]
    if left:
        raise AssertionError(f"internal: the checkpoint filled no data for {left[:5]}")
    model.to(dtype)


def blip_kind(hf_config: dict, directory) -> str:
    """The BLIP kind of a config.json by its ``architectures``."""
    archs = [ARCHITECTURES[a] for a in hf_config.get("architectures") or []
             if a in ARCHITECTURES]
    if len(archs) != 1:
        raise ValueError(f"{directory}/config.json: cannot tell the model kind from "
                         f"architectures={hf_config.get('architectures')!r}; expected one of "
                         f"{sorted(ARCHITECTURES)} (or pass kind=)")
    return archs[0]


def load_blip(directory, dtype=np.float32, *, kind: str | None = None,
              vision_eps: float | None = None, label_smoothing: float | None = None) -> BLIP:
    """Load a Hugging Face BLIP folder (``config.json`` + ``model.safetensors`` or
    its shards), memory-mapped, one tensor at a time (see the module docstring).

    ``kind`` ("retrieval", "captioning" or "vqa") defaults to the config's
    ``architectures``. The returned model's ``hf_config`` attribute keeps the
    config dict, so :func:`save_blip` can write it back.
    """
    hf_config = read_hf_config(directory)
    kind = blip_kind(hf_config, directory) if kind is None else kind
    if kind not in ("retrieval", "captioning", "vqa"):
        raise ValueError(f"kind must be 'retrieval', 'captioning' or 'vqa', got {kind!r}")
    cfg = blip_config_from_hf(hf_config, vision_eps=vision_eps, label_smoothing=label_smoothing)
    if kind == "vqa" and cfg.text.encoder_width != cfg.text.width:
        raise ValueError(f"{directory}/config.json: BlipForQuestionAnswering's decoder reads the "
                         f"question encoder's output through text_config.encoder_hidden_size "
                         f"({cfg.text.encoder_width}), so it must equal text_config.hidden_size "
                         f"({cfg.text.width}) and vision_config.hidden_size")
    checkpoint = Checkpoint(directory)
    check_against_checkpoint(checkpoint, *blip_expected_shapes(cfg, kind),
                             f"{directory}/config.json", _kind_hints(kind))
    model = _build(cfg, kind)
    load_hf_state_dict(model, checkpoint, kind, source=checkpoint.source, dtype=dtype)
    finish_loading(model, dtype)
    model.hf_config = hf_config
    return model


def load_blip_retrieval(directory, dtype=np.float32, **options) -> BLIP:
    """A ``BlipForImageTextRetrieval`` folder -> BLIP with ViT, text encoder, ITC
    projections and ITM head (``text_decoder`` is None). Options as :func:`load_blip`."""
    return load_blip(directory, dtype, kind="retrieval", **options)


def load_blip_captioning(directory, dtype=np.float32, **options) -> BLIP:
    """A ``BlipForConditionalGeneration`` folder -> BLIP with ViT and decoder + LM
    head (``text_encoder`` and the ITC/ITM heads are None). Options as :func:`load_blip`."""
    return load_blip(directory, dtype, kind="captioning", **options)


def load_blip_vqa(directory, dtype=np.float32, **options) -> BLIP:
    """A ``BlipForQuestionAnswering`` folder -> BLIP with ViT, question encoder and
    answer decoder (sharing nothing; the ITC/ITM heads are None). Options as
    :func:`load_blip`."""
    return load_blip(directory, dtype, kind="vqa", **options)


def save_blip(model: BLIP, directory, kind: str | None = None, *, tokenizer=None) -> None:
    """Write ``model`` as a Hugging Face folder: ``config.json``, ``model.safetensors``
    (in the Params' dtype, tied copies left out) and, with a ``tokenizer``,
    ``vocab.txt``.

    ``kind`` defaults to what the model holds; a full pretraining BLIP can be
    written as either "retrieval" or "captioning" (a VQA model as "vqa"). The
    config is the model's
    ``hf_config`` (kept by the loaders) updated with its sizes; the special-token
    ids come from ``tokenizer`` (``dec_id``, ``sep_id``) when given, else from
    ``hf_config``, else Hugging Face's defaults if they fit the vocabulary.
    """
    kind = model_kind(model) if kind is None else kind
    if kind not in ("retrieval", "captioning", "vqa"):
        raise ValueError(f"save_blip writes 'retrieval', 'captioning' or 'vqa' checkpoints, "
                         f"got {kind!r} (pass kind= for a pretraining model)")
    stored = getattr(model, "hf_config", None) or {}
    stored_text = {**_HF_TEXT_DEFAULTS, **(stored.get("text_config") or {})}
    if tokenizer is not None:
        bos, sep, eos = tokenizer.dec_id, tokenizer.sep_id, None
    else:
        bos, sep, eos = (stored_text[k] for k in ("bos_token_id", "sep_token_id",
                                                   "eos_token_id"))
    V = model.cfg.text.vocab_size
    if not (0 <= bos < V and 0 <= sep < V):
        raise ValueError(f"save_blip: the [DEC] id {bos} and [SEP] id {sep} must lie in the "
                         f"vocabulary [0, {V}); pass the model's tokenizer")
    fresh = hf_config_from_blip(model.cfg, kind, bos_token_id=bos, sep_token_id=sep,
                                eos_token_id=eos if eos is not None and 0 <= eos < V else None)
    config = {**stored, **fresh}
    for sub in ("text_config", "vision_config"):
        config[sub] = {**(stored.get(sub) or {}), **fresh[sub]}
    for key in [k for k in ("dtype", "torch_dtype") if k in stored] or ["dtype"]:
        config[key] = str(model.dtype)  # transformers 5 reads "dtype", 4.x "torch_dtype"
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / "model.safetensors", hf_state_dict(model, kind),
                      metadata={"format": "pt"})
    write_json_atomic(d / "config.json", config)
    if tokenizer is not None:
        tokens = tokenizer.tokens
        if len(tokens) != V:
            raise ValueError(f"save_blip: the tokenizer has {len(tokens)} tokens, the model's "
                             f"vocabulary {V}")
        write_text_atomic(d / "vocab.txt", "".join(t + "\n" for t in tokens))


def caption_token_ids(model: BLIP, prompt_ids=None):
    """The ids generation starts from and stops at, as HF ``generate`` sets them:
    ``(prompt_ids, sep_id)`` with ``prompt_ids[0]`` = [DEC] (``bos_token_id``).
    ``prompt_ids`` is "[CLS] prompt [SEP]" from a tokenizer (its [SEP] is
    dropped) or None for [DEC] alone."""
    text = _text_ids(model)
    if prompt_ids is None:
        ids = np.array([text["bos_token_id"]])
    else:
        ids = np.array(prompt_ids).reshape(-1)[:-1].copy()
        if ids.size == 0:
            raise ValueError("caption_token_ids: expected '[CLS] prompt [SEP]' ids, got "
                             f"{np.asarray(prompt_ids).tolist()}")
        ids[0] = text["bos_token_id"]
    return ids, int(text["sep_token_id"])



def _text_ids(model: BLIP) -> dict:
    return {**_HF_TEXT_DEFAULTS, **((getattr(model, "hf_config", None) or {})
                                    .get("text_config") or {})}


def caption_generate(model: BLIP, images, prompt_ids=None, **decoding) -> list[np.ndarray]:
    """``BlipForConditionalGeneration.generate``: per image the ids HF returns,
    [DEC], the prompt and the caption, up to the [SEP] that ends it (left out).

    images (B, 3, H, W) preprocessed; ``prompt_ids``: "[CLS] prompt [SEP]" from
    the tokenizer, or None (see :func:`caption_token_ids`). ``decoding``: the
    options of :func:`minblip.generation.generate` (``method``, ``max_length``
    and ``min_length`` counting [DEC] and the prompt, as HF's do,
    ``num_beams``, ``top_p``, ``repetition_penalty``, ``rng``).
    """
    prompt, sep = caption_token_ids(model, prompt_ids)
    embeds, _ = model.visual_encoder.forward(images, keep_cache=False)
    out = generate(model.text_decoder, embeds, prompt, sep_id=sep, **decoding)
    return [np.concatenate([prompt, tokens]) for tokens in out.tokens]


def vqa_generate(model: BLIP, images, question_ids, question_mask=None, *,
                 enc_id: int | None = None, **decoding) -> list[np.ndarray]:
    """``BlipForQuestionAnswering.generate``: per image the ids HF returns, [DEC]
    and the answer, up to the [SEP] that ends it (left out).

    images (B, 3, H, W); question_ids (B, T) "[CLS] question [SEP]" and its mask
    (B, T) of 0/1 (None: no padding). The question is encoded with
    cross-attention to the image; the decoder starts from [DEC]
    (``bos_token_id``) and reads every question token (HF passes a mask of
    ones), stopping at [SEP]. Hugging Face feeds the question's [CLS] as it
    is; salesforce/BLIP (``BLIP_VQA.forward``) puts [ENC] first:
    ``enc_id=tokenizer.enc_id`` does that. ``decoding`` as :func:`caption_generate`
    (``max_length`` counts [DEC]).
    """
    ids = np.array(question_ids, copy=True)
    if ids.ndim != 2 or ids.shape[0] != len(images):
        raise ValueError(f"vqa_generate: expected question ids (B, T) for {len(images)} "
                         f"images, got shape {ids.shape}")
    if enc_id is not None:
        ids[:, 0] = enc_id
    text = _text_ids(model)
    embeds, _ = model.visual_encoder.forward(images, keep_cache=False)
    question, _ = model.text_encoder.forward(ids, question_mask, embeds)  # (B, T, D)
    start = np.array([text["bos_token_id"]])
    out = generate(model.text_decoder, question, start, sep_id=int(text["sep_token_id"]),
                   **decoding)
    return [np.concatenate([start, tokens]) for tokens in out.tokens]
