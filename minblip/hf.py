"""Hugging Face BLIP checkpoints in and out of minblip.

A Hugging Face checkpoint folder holds ``config.json`` (the sizes) and
``model.safetensors`` (the tensors, by state-dict name). This module reads and
writes both, with no PyTorch:

* :func:`read_safetensors` / :func:`write_safetensors`: the safetensors file
  format in a few lines of NumPy (described below); nothing is unpickled;
* :func:`blip_config_from_hf` / :func:`hf_config_from_blip`: ``config.json``
  <-> :class:`minblip.blip.BLIPConfig`;
* :func:`hf_state_dict` / :func:`load_hf_state_dict`: minblip Params <-> tensors
  with the names and layouts of ``BlipForImageTextRetrieval`` and
  ``BlipForConditionalGeneration``;
* :func:`load_blip_retrieval`, :func:`load_blip_captioning`, :func:`load_blip`
  and :func:`save_blip`: whole folders;
* :func:`load_qformer`: BLIP-2's ``Blip2QFormerModel`` into a
  :class:`minblip.qformer.QFormer`.

The safetensors format
----------------------
::

    8 bytes        N, the header length, unsigned little-endian
    N bytes        a JSON object, UTF-8, padded with spaces:
                     {"__metadata__": {str: str}   (optional)
                      "<name>": {"dtype": "F32", "shape": [2, 16],
                                 "data_offsets": [begin, end]}, ...}
    the rest       the raw tensor bytes, little-endian, C order; tensor <name>
                   is bytes [begin, end) of this part, and the tensors tile it
                   exactly (no gaps, no overlaps)

Layout differences (Hugging Face -> minblip)
--------------------------------------------
* ``nn.Linear.weight`` is (d_out, d_in); a minblip ``Linear.W`` is its
  transpose (d_in, d_out).
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
``text_proj``, ``itm_head`` and ``temp`` are None. Either model's
``param_count()`` therefore equals the PyTorch model's (plus ``temp`` for
retrieval).

Where Hugging Face and salesforce/BLIP differ
---------------------------------------------
minblip follows the config it loads; each difference can be switched:

=================================  ==============  ===============  ==========================
what                               HF hub configs  salesforce/BLIP  how to choose in minblip
=================================  ==============  ===============  ==========================
ViT LayerNorm eps                  1e-5            1e-6             ``vision_eps=`` when loading
LM label smoothing                 0.0             0.1              ``label_smoothing=``
first token for ITM                [CLS]           [ENC]            ``itm_logits(..., enc_id=)``
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
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .blip import BLIP, BLIPConfig
from .files import write_atomic, write_json_atomic, write_text_atomic
from .text import TextConfig
from .vit import ViTConfig

# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------

# dtype name -> (little-endian NumPy dtype as stored, dtype handed out). float16 and
# bfloat16 are widened to float32 when read (NumPy has no bfloat16).
_READ_DTYPES = {
    "F64": (np.dtype("<f8"), np.float64),
    "F32": (np.dtype("<f4"), np.float32),
    "F16": (np.dtype("<f2"), np.float32),
    "BF16": (np.dtype("<u2"), np.float32),
    "I64": (np.dtype("<i8"), np.int64),
}
_WRITE_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
                 np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}
# The reference writer orders tensors by dtype (its enum order, larger first), then by
# name; following it makes our files byte-identical to safetensors.numpy.save_file.
_DTYPE_RANK = {"I64": 3, "F64": 2, "F32": 1, "F16": 0}
_HEADER_ALIGN = 8


def read_safetensors_header(path) -> dict:
    """The parsed JSON header of a safetensors file (tensor entries and
    ``__metadata__``), checked for a valid layout."""
    return _read_header(path)[0]


def _read_header(path):
    """-> (header dict, byte offset where the data section starts)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"safetensors file {path!r}: {size} bytes, too short for the "
                             f"8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise ValueError(f"safetensors file {path!r}: header length {n} exceeds the "
                             f"file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"safetensors file {path!r}: the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {path!r}: the header must be a JSON object")
    _check_layout(header, size - 8 - n, path)
    return header, 8 + n


def _check_layout(header: dict, n_data: int, path: str) -> None:
    """Every entry names a known dtype, a shape that fits its byte range, and the
    byte ranges tile the data section exactly."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError(f"safetensors file {path!r}: __metadata__ must map str to str")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"safetensors file {path!r}: tensor {name!r} needs exactly "
                             f"dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in _READ_DTYPES:
            raise ValueError(f"safetensors file {path!r}: tensor {name!r} has dtype "
                             f"{info['dtype']}; minblip reads {sorted(_READ_DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"safetensors file {path!r}: tensor {name!r} has a malformed "
                             f"shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        want = int(np.prod(shape, dtype=np.int64)) * _READ_DTYPES[info["dtype"]][0].itemsize
        if end - begin != want:
            raise ValueError(f"safetensors file {path!r}: tensor {name!r} of shape {shape} "
                             f"and dtype {info['dtype']} needs {want} bytes, its data_offsets "
                             f"{offsets} span {end - begin}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"safetensors file {path!r}: tensor {name!r} starts at byte "
                             f"{begin}, expected {position} (gap or overlap)")
        position = end
    if position != n_data:
        raise ValueError(f"safetensors file {path!r}: the tensors cover {position} bytes of "
                         f"data, the file holds {n_data}")


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, by name.

    F64 -> float64, F32/F16/BF16 -> float32, I64 -> int64; each array is a
    fresh, writable copy in native byte order.
    """
    header, start = _read_header(path)
    with open(os.fspath(path), "rb") as f:
        f.seek(start)
        data = f.read()
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        stored, wanted = _READ_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        a = np.frombuffer(data, dtype=stored, count=(end - begin) // stored.itemsize,
                          offset=begin).reshape(info["shape"])
        if info["dtype"] == "BF16":
            # bfloat16 is the top half of a float32: shift its 16 bits into place
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.astype(wanted)  # astype copies: native order, writable
    return out


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` (float64, float32, float16 or int64) as a safetensors
    file, atomically (a temporary file in the same folder renamed over ``path``).

    ``metadata`` is an optional ``{str: str}`` stored as ``__metadata__``
    (PyTorch checkpoints carry ``{"format": "pt"}``).
    """
    path = os.fspath(path)
    entries = []
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"write_safetensors: invalid tensor name {name!r}")
        a = np.asarray(a)
        if a.dtype not in _WRITE_DTYPES:
            raise TypeError(f"write_safetensors: tensor {name!r} has dtype {a.dtype}; expected "
                            f"one of {[str(d) for d in _WRITE_DTYPES]}")
        entries.append((name, a, _WRITE_DTYPES[a.dtype]))
    entries.sort(key=lambda e: (-_DTYPE_RANK[e[2]], e[0]))
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("write_safetensors: metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, a, code in entries:
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _HEADER_ALIGN)  # pad so the data starts 8-byte aligned

    def write(file):
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        for _, a, _ in entries:
            file.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())

    write_atomic(path, write)


# ---------------------------------------------------------------------------------------
# config.json <-> BLIPConfig
# ---------------------------------------------------------------------------------------

KINDS = ("retrieval", "captioning", "pretraining")
ARCHITECTURES = {"BlipForImageTextRetrieval": "retrieval",
                 "BlipForConditionalGeneration": "captioning"}

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


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config.json: minblip supports square {what}, got {value}")
        value = value[0]
    return int(value)


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
    vision = ViTConfig(image_size=_square(v["image_size"], "images"),
                       patch_size=_square(v["patch_size"], "patches"), channels=3,
                       width=v["hidden_size"], depth=v["num_hidden_layers"],
                       heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                       eps=float(v["layer_norm_eps"] if vision_eps is None else vision_eps),
                       init_std=float(v["initializer_range"]))
    text = TextConfig(vocab_size=t["vocab_size"], width=t["hidden_size"],
                      depth=t["num_hidden_layers"], heads=t["num_attention_heads"],
                      mlp_dim=t["intermediate_size"], max_positions=t["max_position_embeddings"],
                      eps=float(t["layer_norm_eps"]), dropout=float(t["hidden_dropout_prob"]),
                      encoder_width=t.get("encoder_hidden_size", v["hidden_size"]),
                      init_std=float(t["initializer_range"]), pad_id=t["pad_token_id"])
    smoothing = t["label_smoothing"] if label_smoothing is None else label_smoothing
    return BLIPConfig(vision=vision, text=text,
                      embed_dim=hf_config.get("image_text_hidden_size", 256),
                      label_smoothing=float(smoothing))


def hf_config_from_blip(cfg: BLIPConfig, kind: str, *, bos_token_id: int, sep_token_id: int,
                        eos_token_id: int | None = None) -> dict:
    """:class:`BLIPConfig` -> a Hugging Face ``config.json`` dict for ``kind``
    ("retrieval" or "captioning"). ``bos_token_id`` is [DEC], ``sep_token_id`` the
    [SEP] that ends a caption; ``eos_token_id`` defaults to it."""
    arch = {k: a for a, k in ARCHITECTURES.items()}
    if kind not in arch:
        raise ValueError(f"kind must be one of {sorted(arch)}, got {kind!r}")
    v, t = cfg.vision, cfg.text
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
    Params. ``tied_to`` names the tensor this one is a tied copy of (its Params
    are already listed there), else None.
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


def _copy(name, p, pname):
    return HFTensor(name, (p,), (pname,), lambda a: a[0], lambda t: [t])


def _transposed(name, p, pname):
    return HFTensor(name, (p,), (pname,), lambda a: a[0].T, lambda t: [t.T])


def _linear(prefix, lin, mname):
    """nn.Linear (d_out, d_in) weight and bias <- minblip W (d_in, d_out) and b."""
    return [_transposed(prefix + ".weight", lin.W, mname + ".W"),
            _copy(prefix + ".bias", lin.b, mname + ".b")]


def _layer_norm(prefix, ln, mname):
    return [_copy(prefix + ".weight", ln.gamma, mname + ".gamma"),
            _copy(prefix + ".bias", ln.beta, mname + ".beta")]


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


def _vit_tensors(vit, prefix="vision_model", mprefix="visual_encoder") -> list[HFTensor]:
    """``BlipVisionModel`` <-> :class:`minblip.vit.VisionTransformer`."""
    D = vit.config.width
    pe = vit.patch_embed
    shape = (D, pe.channels, pe.patch_size, pe.patch_size)
    out = [
        _copy(f"{prefix}.embeddings.class_embedding", vit.cls_token, f"{mprefix}.cls_token"),
        _copy(f"{prefix}.embeddings.position_embedding", vit.pos_embed, f"{mprefix}.pos_embed"),
        # Conv2d (D, C, p, p) <-> proj.W (C*p*p, D), as PatchEmbed.load_conv_weights maps it
        HFTensor(f"{prefix}.embeddings.patch_embedding.weight", (pe.proj.W,),
                 (f"{mprefix}.patch_embed.proj.W",),
                 lambda a: a[0].T.reshape(shape), lambda t: [t.reshape(D, -1).T]),
        _copy(f"{prefix}.embeddings.patch_embedding.bias", pe.proj.b,
              f"{mprefix}.patch_embed.proj.b"),
    ]
    for i, blk in enumerate(vit.blocks):
        hp, mp = f"{prefix}.encoder.layers.{i}", f"{mprefix}.blocks.{i}"
        att = blk.attn
        qkv = (att.query, att.key, att.value)
        mnames = tuple(f"{mp}.attn.{n}" for n in ("query", "key", "value"))
        out += [
            HFTensor(f"{hp}.self_attn.qkv.weight", tuple(lin.W for lin in qkv),
                     tuple(n + ".W" for n in mnames),
                     fused_qkv_to_hf, fused_qkv_from_hf),
            HFTensor(f"{hp}.self_attn.qkv.bias", tuple(lin.b for lin in qkv),
                     tuple(n + ".b" for n in mnames),
                     lambda a: np.concatenate(a), lambda t: np.split(t, 3)),
            *_linear(f"{hp}.self_attn.projection", att.out, f"{mp}.attn.out"),
            *_layer_norm(f"{hp}.layer_norm1", blk.ln1, f"{mp}.ln1"),
            *_linear(f"{hp}.mlp.fc1", blk.mlp.fc1, f"{mp}.mlp.fc1"),
            *_linear(f"{hp}.mlp.fc2", blk.mlp.fc2, f"{mp}.mlp.fc2"),
            *_layer_norm(f"{hp}.layer_norm2", blk.ln2, f"{mp}.ln2"),
        ]
    return out + _layer_norm(f"{prefix}.post_layernorm", vit.norm, f"{mprefix}.norm")


def _attention(prefix, mha, mname):
    """``BlipTextAttention`` (self or cross) <-> MultiHeadAttention, minus the LayerNorm."""
    return [*_linear(f"{prefix}.self.query", mha.query, f"{mname}.query"),
            *_linear(f"{prefix}.self.key", mha.key, f"{mname}.key"),
            *_linear(f"{prefix}.self.value", mha.value, f"{mname}.value"),
            *_linear(f"{prefix}.output.dense", mha.out, f"{mname}.out")]


def _bert_tensors(bert, prefix, mprefix) -> list[HFTensor]:
    """``BlipTextModel`` (no pooler) <-> :class:`minblip.text.TextTransformer`."""
    emb = bert.embeddings
    out = [_copy(f"{prefix}.embeddings.word_embeddings.weight", emb.word_embeddings.weight,
                 f"{mprefix}.embeddings.word_embeddings.weight"),
           _copy(f"{prefix}.embeddings.position_embeddings.weight",
                 emb.position_embeddings.weight,
                 f"{mprefix}.embeddings.position_embeddings.weight"),
           *_layer_norm(f"{prefix}.embeddings.LayerNorm", emb.layer_norm,
                        f"{mprefix}.embeddings.layer_norm")]
    for i, layer in enumerate(bert.layers):
        hp, mp = f"{prefix}.encoder.layer.{i}", f"{mprefix}.layers.{i}"
        out += [*_attention(f"{hp}.attention", layer.self_attn, f"{mp}.self_attn"),
                *_layer_norm(f"{hp}.attention.output.LayerNorm", layer.self_attn_ln,
                             f"{mp}.self_attn_ln"),
                *_attention(f"{hp}.crossattention", layer.cross_attn, f"{mp}.cross_attn"),
                *_layer_norm(f"{hp}.crossattention.output.LayerNorm", layer.cross_attn_ln,
                             f"{mp}.cross_attn_ln"),
                *_linear(f"{hp}.intermediate.dense", layer.ffn.fc1, f"{mp}.ffn.fc1"),
                *_linear(f"{hp}.output.dense", layer.ffn.fc2, f"{mp}.ffn.fc2"),
                *_layer_norm(f"{hp}.output.LayerNorm", layer.ffn_ln, f"{mp}.ffn_ln")]
    return out


def _decoder_tensors(decoder, prefix="text_decoder", mprefix="text_decoder") -> list[HFTensor]:
    """``BlipTextLMHeadModel`` <-> :class:`minblip.text.TextDecoder`."""
    head = decoder.head
    p = f"{prefix}.cls.predictions"
    return [*_bert_tensors(decoder.bert, f"{prefix}.bert", f"{mprefix}.bert"),
            _copy(f"{p}.bias", head.bias, f"{mprefix}.head.bias"),
            *_linear(f"{p}.transform.dense", head.dense, f"{mprefix}.head.dense"),
            *_layer_norm(f"{p}.transform.LayerNorm", head.layer_norm,
                         f"{mprefix}.head.layer_norm"),
            # the tied output layer: written by older save_pretrained, optional here
            _copy(f"{p}.decoder.weight", head.weight, f"{mprefix}.head.weight"),
            _copy(f"{p}.decoder.bias", head.bias, f"{mprefix}.head.bias")]


def model_kind(model: BLIP) -> str:
    """"retrieval" (no decoder), "captioning" (no text encoder) or "pretraining" (both)."""
    if not isinstance(model, BLIP):
        raise TypeError(f"expected a minblip BLIP, got {type(model).__name__}")
    has_enc, has_dec = model.text_encoder is not None, model.text_decoder is not None
    if has_enc and has_dec:
        return "pretraining"
    if has_enc:
        return "retrieval"
    if has_dec:
        return "captioning"
    raise ValueError("this BLIP has neither a text encoder nor a text decoder")


def hf_tensors(model: BLIP, kind: str | None = None) -> list[HFTensor]:
    """The Hugging Face tensors of ``model`` for ``kind``, in state-dict order.

    ``"retrieval"`` and ``"captioning"`` are the two Hugging Face models;
    ``"pretraining"`` is minblip's whole pretraining model under the same naming
    scheme (``text_encoder.*``, ``text_decoder.*``, the projections, ``itm_head``
    and ``temp``, as salesforce/BLIP's ``BLIP_Pretrain`` names them). A tensor
    whose Params all appear in an earlier tensor (the LM head's tied output layer,
    or what the decoder shares with the encoder) is marked ``tied_to`` it.
    """
    have = model_kind(model)
    kind = have if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != have and have != "pretraining":
        raise ValueError(f"a {have} model cannot be written as {kind!r}")
    out = _vit_tensors(model.visual_encoder)
    if kind in ("retrieval", "pretraining"):
        out += _bert_tensors(model.text_encoder, "text_encoder", "text_encoder")
    if kind in ("captioning", "pretraining"):
        out += _decoder_tensors(model.text_decoder)
    if kind in ("retrieval", "pretraining"):
        for name in ("vision_proj", "text_proj", "itm_head"):
            out += _linear(name, getattr(model, name), name)
    if kind == "pretraining":
        out.append(_copy("temp", model.temp, "temp"))
    first: dict[int, str] = {}
    for t in out:
        owners = {first.get(id(p)) for p in t.params}
        if None not in owners and len(owners) == 1:
            t.tied_to = owners.pop()
        else:
            for p in t.params:
                first.setdefault(id(p), t.name)
    return out


def hf_state_dict(model: BLIP, kind: str | None = None, *, grad: bool = False,
                  include_tied: bool = False) -> dict[str, np.ndarray]:
    """``{hf_name: array}`` in Hugging Face layouts, from the Params' data (or
    their ``grad``). Tied copies are left out unless ``include_tied``, as
    ``save_pretrained`` leaves them out."""
    # np.array(order="C"), not np.ascontiguousarray: that one turns a 0-d tensor (temp) into 1-d
    return {t.name: np.array(t.to_hf([p.grad if grad else p.data for p in t.params]), order="C")
            for t in hf_tensors(model, kind) if include_tied or t.tied_to is None}


# A few buffers older checkpoints saved beside the weights: accepted when they hold
# what the model would compute anyway, never loaded.
_POSITION_IDS = ".embeddings.position_ids"


def _fit(entries: list[HFTensor], tensors: dict, what: str, source: str,
         hints=()) -> None:
    """Check ``tensors`` against ``entries`` completely, then copy them into the
    Params: every untied entry present with its shape and a float dtype, tied
    copies (if present) equal to what they are tied to, nothing left over
    (except ``position_ids`` buffers holding 0, 1, 2, ...). Otherwise one
    ValueError lists every missing, unexpected, misshapen and untied tensor."""
    known = {t.name for t in entries}
    missing, misshapen, mismatched, unexpected = [], [], [], []
    for t in entries:
        if t.name not in tensors:
            if t.tied_to is None:
                missing.append(f"{t.name} {t.shape}")
            continue
        a = np.asarray(tensors[t.name])
        if a.shape != t.shape or not np.issubdtype(a.dtype, np.floating):
            misshapen.append(f"{t.name}: expected float {t.shape}, got {a.dtype} {a.shape}")
    for name, a in tensors.items():
        if name in known:
            continue
        a = np.asarray(a)
        if name.endswith(_POSITION_IDS) and np.array_equal(a.reshape(-1), np.arange(a.size)):
            continue
        unexpected.append(f"{name} {a.shape}")
    if not (missing or misshapen or unexpected):
        for t in entries:
            if t.tied_to is not None and t.name in tensors:
                if not np.array_equal(tensors[t.name], tensors[t.tied_to]):
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
                  if any(n.startswith(prefix) for n in tensors)]
        raise ValueError("\n".join(lines))
    for t in entries:
        if t.tied_to is None:
            for p, a in zip(t.params, t.from_hf(np.asarray(tensors[t.name]))):
                p.data[...] = a


def load_hf_state_dict(model: BLIP, tensors: dict, kind: str | None = None,
                       source: str = "the checkpoint") -> None:
    """Copy Hugging Face tensors into ``model``'s Params, in place.

    Everything is checked before anything is written: every tensor the model
    needs must be present with the right shape, tied copies (if present) must
    equal what they are tied to, and no tensor may be left over. Otherwise a
    ValueError lists every missing, unexpected and misshapen tensor by name.
    """
    kind = model_kind(model) if kind is None else kind
    hints = [(prefix, f"it has {prefix}* tensors: is it a {other} checkpoint?")
             for prefix, other in (("text_encoder.", "retrieval"), ("text_decoder.", "captioning"))
             if kind not in (other, "pretraining")]
    _fit(hf_tensors(model, kind), tensors, f"a minblip {kind} BLIP of this config", source, hints)


# ---------------------------------------------------------------------------------------
# BLIP-2's Q-Former (Hugging Face Blip2QFormerModel)
# ---------------------------------------------------------------------------------------

def qformer_tensors(qformer, prefix: str = "", text_ffn: bool = False) -> list[HFTensor]:
    """HF ``Blip2QFormerModel`` <-> :class:`minblip.qformer.QFormer`.

    HF keeps less of the Q-Former in this module than minblip does: its
    ``layernorm`` is minblip's ``embeddings.layer_norm`` (LAVIS
    ``Qformer.bert.embeddings.LayerNorm``, applied to the queries too); the
    learned queries (``query_tokens``) and the word and position embeddings live
    on the outer BLIP-2 model; the text FFN (``intermediate``/``output``) exists
    only with ``use_qformer_text_input`` (``text_ffn``). LAVIS's
    ``attention.self`` is HF's ``attention.attention``.
    """
    p = f"{prefix}." if prefix else ""
    out = _layer_norm(f"{p}layernorm", qformer.embeddings.layer_norm, "embeddings.layer_norm")

    def attention(hp, mha, mp):
        return [*_linear(f"{hp}.attention.query", mha.query, f"{mp}.query"),
                *_linear(f"{hp}.attention.key", mha.key, f"{mp}.key"),
                *_linear(f"{hp}.attention.value", mha.value, f"{mp}.value"),
                *_linear(f"{hp}.output.dense", mha.out, f"{mp}.out")]

    for i, layer in enumerate(qformer.layers):
        hp, mp = f"{p}encoder.layer.{i}", f"layers.{i}"
        out += [*attention(f"{hp}.attention", layer.self_attn, f"{mp}.self_attn"),
                *_layer_norm(f"{hp}.attention.output.LayerNorm", layer.self_attn_ln,
                             f"{mp}.self_attn_ln")]
        if layer.cross_attn is not None:
            out += [*attention(f"{hp}.crossattention", layer.cross_attn, f"{mp}.cross_attn"),
                    *_layer_norm(f"{hp}.crossattention.output.LayerNorm", layer.cross_attn_ln,
                                 f"{mp}.cross_attn_ln")]
        if text_ffn:
            out += [*_linear(f"{hp}.intermediate.dense", layer.ffn.fc1, f"{mp}.ffn.fc1"),
                    *_linear(f"{hp}.output.dense", layer.ffn.fc2, f"{mp}.ffn.fc2"),
                    *_layer_norm(f"{hp}.output.LayerNorm", layer.ffn_ln, f"{mp}.ffn_ln")]
        out += [*_linear(f"{hp}.intermediate_query.dense", layer.ffn_query.fc1,
                         f"{mp}.ffn_query.fc1"),
                *_linear(f"{hp}.output_query.dense", layer.ffn_query.fc2, f"{mp}.ffn_query.fc2"),
                *_layer_norm(f"{hp}.output_query.LayerNorm", layer.ffn_query_ln,
                             f"{mp}.ffn_query_ln")]
    return out


def qformer_config_from_hf(hf_config: dict, num_queries: int = 32):
    """A Hugging Face ``Blip2QFormerConfig`` dict -> :class:`minblip.qformer.QFormerConfig`.
    The number of queries is not part of it (``Blip2Config.num_query_tokens``)."""
    from .qformer import QFormerConfig
    c = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
         "hidden_dropout_prob": 0.1, "max_position_embeddings": 512, "initializer_range": 0.02,
         "layer_norm_eps": 1e-12, "pad_token_id": 0, "cross_attention_frequency": 2,
         "encoder_hidden_size": 1408, **hf_config}
    if c["hidden_act"] != "gelu":
        raise ValueError(f"Q-Former config: hidden_act must be 'gelu', got {c['hidden_act']!r}")
    return QFormerConfig(vocab_size=c["vocab_size"], width=c["hidden_size"],
                         depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
                         mlp_dim=c["intermediate_size"], num_queries=num_queries,
                         cross_attention_freq=c["cross_attention_frequency"],
                         encoder_width=c["encoder_hidden_size"],
                         max_positions=c["max_position_embeddings"], eps=float(c["layer_norm_eps"]),
                         dropout=float(c["hidden_dropout_prob"]),
                         init_std=float(c["initializer_range"]), pad_id=c["pad_token_id"])


def load_qformer(directory, dtype=np.float32, *, num_queries: int = 32,
                 rng: np.random.Generator | None = None):
    """A Hugging Face ``Blip2QFormerModel`` folder -> :class:`minblip.qformer.QFormer`.

    The file sets the embedding LayerNorm and every layer (the text FFN too if the
    config has ``use_qformer_text_input``). What ``Blip2QFormerModel`` does not
    hold keeps its initial value from ``rng``: the ``num_queries`` learned queries,
    the word and position embeddings and (without text input) the text FFN.
    """
    from .qformer import QFormer
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") not in (None, "blip_2_qformer"):
        raise ValueError(f"{directory}/config.json: expected a Blip2QFormerModel config "
                         f"(model_type 'blip_2_qformer'), got {hf_config.get('model_type')!r}")
    cfg = qformer_config_from_hf(hf_config, num_queries)
    qformer = QFormer(cfg, np.random.default_rng(0) if rng is None else rng).to(dtype)
    entries = qformer_tensors(qformer, text_ffn=bool(hf_config.get("use_qformer_text_input")))
    _fit(entries, read_hf_tensors(directory), "a minblip QFormer of this config",
         f"{directory}/model.safetensors")
    return qformer


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------

def read_hf_tensors(directory) -> dict[str, np.ndarray]:
    """The tensors of a Hugging Face checkpoint folder: ``model.safetensors``, or
    the shards listed in ``model.safetensors.index.json``."""
    d = Path(directory)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(d / shard))
        return tensors
    if (d / "pytorch_model.bin").is_file():
        raise ValueError(f"{d}: only pytorch_model.bin, a pickle; minblip reads safetensors "
                         f"only (convert it with safetensors.torch.save_file)")
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_hf_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class _ZeroInit:
    """Stands in for the random generator while a model is built only to have every
    value overwritten by a checkpoint: drawing 200 million normals for BLIP-base
    takes seconds, zeros take nothing. Anything but ``normal`` and ``uniform`` is
    passed on to a real generator."""

    def __init__(self):
        self._rng = np.random.default_rng(0)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.zeros(size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size)

    def __getattr__(self, name):
        return getattr(self._rng, name)


def _build(cfg: BLIPConfig, kind: str, dtype) -> BLIP:
    """A BLIP holding exactly the modules of the Hugging Face ``kind``. It is built
    with ``sharing="all"`` so only one text transformer is allocated; the half the
    checkpoint does not have is then dropped (set to None)."""
    model = BLIP(replace(cfg, sharing="all"), _ZeroInit())
    if kind == "retrieval":
        model.text_decoder = None
    else:
        model.text_encoder = None  # the decoder keeps its own reference to the transformer
        model.vision_proj = model.text_proj = model.itm_head = model.temp = None
    return model.to(dtype)


def load_blip(directory, dtype=np.float32, *, kind: str | None = None,
              vision_eps: float | None = None, label_smoothing: float | None = None) -> BLIP:
    """Load a Hugging Face BLIP folder (``config.json`` + ``model.safetensors``).

    ``kind`` ("retrieval" or "captioning") defaults to the config's
    ``architectures``. The returned model's ``hf_config`` attribute keeps the
    config dict, so :func:`save_blip` can write it back.
    """
    hf_config = read_hf_config(directory)
    if kind is None:
        archs = [ARCHITECTURES[a] for a in hf_config.get("architectures") or []
                 if a in ARCHITECTURES]
        if len(archs) != 1:
            raise ValueError(f"{directory}/config.json: cannot tell the model kind from "
                             f"architectures={hf_config.get('architectures')!r}; expected one of "
                             f"{sorted(ARCHITECTURES)} (or pass kind=)")
        kind = archs[0]
    if kind not in ("retrieval", "captioning"):
        raise ValueError(f"kind must be 'retrieval' or 'captioning', got {kind!r}")
    cfg = blip_config_from_hf(hf_config, vision_eps=vision_eps, label_smoothing=label_smoothing)
    tensors = read_hf_tensors(directory)
    model = _build(cfg, kind, dtype)
    load_hf_state_dict(model, tensors, kind, source=f"{directory}/model.safetensors")
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


def save_blip(model: BLIP, directory, kind: str | None = None, *, tokenizer=None) -> None:
    """Write ``model`` as a Hugging Face folder: ``config.json``, ``model.safetensors``
    (in the Params' dtype, tied copies left out) and, with a ``tokenizer``,
    ``vocab.txt``.

    ``kind`` defaults to what the model holds; a full pretraining BLIP can be
    written as either "retrieval" or "captioning". The config is the model's
    ``hf_config`` (kept by the loaders) updated with its sizes; the special-token
    ids come from ``tokenizer`` (``dec_id``, ``sep_id``) when given, else from
    ``hf_config``, else Hugging Face's defaults if they fit the vocabulary.
    """
    kind = model_kind(model) if kind is None else kind
    if kind not in ("retrieval", "captioning"):
        raise ValueError(f"save_blip writes 'retrieval' or 'captioning' checkpoints, got "
                         f"{kind!r} (pass kind= for a pretraining model)")
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
    text = {**_HF_TEXT_DEFAULTS, **((getattr(model, "hf_config", None) or {})
                                    .get("text_config") or {})}
    if prompt_ids is None:
        ids = np.array([text["bos_token_id"]])
    else:
        ids = np.array(prompt_ids).reshape(-1)[:-1].copy()
        if ids.size == 0:
            raise ValueError("caption_token_ids: expected '[CLS] prompt [SEP]' ids, got "
                             f"{np.asarray(prompt_ids).tolist()}")
        ids[0] = text["bos_token_id"]
    return ids, int(text["sep_token_id"])

