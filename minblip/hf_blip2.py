"""Hugging Face BLIP-2 checkpoints (``Blip2ForConditionalGeneration`` with OPT) in minblip.

A BLIP-2 folder holds four models under one ``config.json`` (``vision_config``,
``qformer_config``, ``text_config``, ``num_query_tokens``). Each maps onto a
minblip module, and together they make a :class:`minblip.blip2_stage2.Blip2Stage2`,
the same class stage-2 training builds:

==============================================  ============================================
Hugging Face (tensor names)                     minblip
==============================================  ============================================
``vision_model.*`` (``Blip2VisionModel``: EVA   ``visual_encoder``: a ViT with
ViT-g, fused qkv, q and v biases only)          ``key_bias=False, final_norm=False``
``vision_model.post_layernorm``                 ``ln_vision`` (LAVIS's name: HF keeps it
                                                inside the vision model)
``query_tokens``, ``qformer.*``                 ``qformer.query_tokens``, ``qformer`` (query
                                                path only, as stage 2 strips the text parts)
``language_projection``                         ``language_projection`` (LAVIS ``opt_proj``)
``language_model.*`` (``OPTForCausalLM``)       ``language_model``: minblip's LM with
                                                ``position_offset=2``
==============================================  ============================================

Generation follows ``Blip2ForConditionalGeneration.generate``: the image's
projected queries are the first ``num_query_tokens`` input embeddings of the
OPT, then BOS (``</s>``) and the prompt (``Blip2Processor`` puts that many
``<image>`` placeholder ids in front of the tokenized prompt, and the model
replaces their embeddings by the queries; minblip passes the queries
directly). Decoding stops at ``text_config.eos_token_id``. LAVIS stops at
"\\n" instead and prompts questions as "Question: {} Answer:".

Lengths: ``max_length`` and ``min_length`` count BOS, the prompt and the new
tokens. Hugging Face's (transformers >= 4.47, with placeholders) also count the
``num_query_tokens`` placeholder ids, so HF's ``max_length`` is minblip's plus
``num_query_tokens``.

Only decoder-only language models load (OPT; ``model_type`` "opt"); the
encoder-decoder FlanT5 variant is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blip2_stage2 import Blip2Stage2
from .generation import generate
from .core import deferred_params
from .hf import (Checkpoint, HFTensor, ZeroInit, check_against_checkpoint, check_limits,
                 check_vision_limits, finish_loading, fit, hf_copy, hf_layer_norm, hf_linear,
                 mark_tied, number, qformer_config_from_hf, qformer_expected_shapes,
                 qformer_tensors, read_hf_config, setting_name, square, state_dict_of,
                 vit_expected_shapes, vit_tensors)
from .layers import LayerNorm
from .lm import LanguageModel, LMConfig, SoftPromptDecoder
from .qformer import QFormer, QFormerConfig
from .vit import ViTConfig, VisionTransformer

# Hugging Face's defaults (configuration_blip_2.py, configuration_opt.py) for keys a
# config.json leaves out
_VISION_DEFAULTS = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                    "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "initializer_range": 1e-10,
                    "qkv_bias": True}
_OPT_DEFAULTS = {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12,
                 "ffn_dim": 3072, "max_position_embeddings": 2048, "do_layer_norm_before": True,
                 "_remove_final_layer_norm": False, "word_embed_proj_dim": None,
                 "dropout": 0.1, "num_attention_heads": 12, "activation_function": "relu",
                 "init_std": 0.02, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
                 "enable_bias": True, "layer_norm_elementwise_affine": True}
OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
OPT_LAYER_NORM_EPS = 1e-5  # OPT's nn.LayerNorm default; its config has no eps
LM = "language_model"


@dataclass
class Blip2Configs:
    """The minblip configs of a BLIP-2 ``config.json``, and its token ids."""

    vision: ViTConfig
    qformer: QFormerConfig
    lm: LMConfig
    vision_eps: float  # post_layernorm (LAVIS ln_vision) uses the vision config's eps
    bos_id: int
    eos_id: int
    pad_id: int
    image_token_id: int | None  # the <image> placeholder id, when the config has one


def _setting(sub: dict, key: str, where: str, kind: type = bool):
    value = sub[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config.json: {setting_name(where, key)} must be {kind.__name__}, "
                         f"got {value!r}")
    return value


def opt_config_from_hf(text: dict, where: str = "text_config") -> LMConfig:
    """An ``OPTConfig`` dict (BLIP-2's ``text_config``, or with ``where=""`` an OPT's
    own config.json) -> :class:`minblip.lm.LMConfig` with OPT's position offset
    and, when ``word_embed_proj_dim`` differs from ``hidden_size``, project in/out."""
    t = {**_OPT_DEFAULTS, **text}
    if t.get("model_type", "opt") != "opt":
        raise ValueError(f"config.json: minblip loads OPT language models; "
                         f"{setting_name(where, 'model_type')} is {t.get('model_type')!r} (the "
                         f"encoder-decoder FlanT5 variant of BLIP-2 is not supported)")
    if t["word_embed_proj_dim"] is None:
        t["word_embed_proj_dim"] = t["hidden_size"]
    if t["activation_function"] not in ("relu", "gelu"):
        raise ValueError(f"config.json: {setting_name(where, 'activation_function')} must be "
                         f"'relu' or 'gelu', got {t['activation_function']!r}")
    for key in ("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine"):
        if _setting(t, key, where) is not True:
            raise ValueError(f"config.json: {setting_name(where, key)} must be true (minblip "
                             f"has the pre-norm OPTs with biases and LayerNorm gains, as BLIP-2 "
                             f"uses)")
    check_limits(t, where, vocab_size="vocab", hidden_size="width", word_embed_proj_dim="width",
                 ffn_dim="width", num_hidden_layers="depth", num_attention_heads="width",
                 max_position_embeddings="positions")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        _setting(t, key, where, int)
    return LMConfig(vocab_size=t["vocab_size"], width=t["hidden_size"],
                    depth=t["num_hidden_layers"], heads=t["num_attention_heads"],
                    mlp_dim=t["ffn_dim"], max_positions=t["max_position_embeddings"],
                    eps=OPT_LAYER_NORM_EPS, dropout=number(t, "dropout", where),
                    init_std=number(t, "init_std", where), pad_id=t["pad_token_id"],
                    activation=t["activation_function"], position_offset=OPT_POSITION_OFFSET,
                    word_embed_dim=t["word_embed_proj_dim"],
                    final_norm=not _setting(t, "_remove_final_layer_norm", where))


def blip2_configs_from_hf(hf_config: dict) -> Blip2Configs:
    """A Hugging Face BLIP-2 ``config.json`` (as a dict) -> :class:`Blip2Configs`.
    Missing keys take Hugging Face's defaults; sizes are checked against
    :data:`minblip.hf.LIMITS`."""
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "blip-2":
        got = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config)
        raise ValueError(f"config.json: expected a BLIP-2 config (model_type 'blip-2'), "
                         f"got {got!r}")
    text = {**_OPT_DEFAULTS, **(hf_config.get("text_config") or {})}
    lm = opt_config_from_hf(text)
    v = {**_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    if v["hidden_act"] != "gelu":
        raise ValueError(f"config.json: vision_config.hidden_act must be 'gelu' (exact erf "
                         f"GELU), got {v['hidden_act']!r}")
    check_vision_limits(v)
    vision_eps = number(v, "layer_norm_eps", "vision_config")
    vision = ViTConfig(image_size=square(v["image_size"], "images"),
                       patch_size=square(v["patch_size"], "patches"), channels=3,
                       width=v["hidden_size"], depth=v["num_hidden_layers"],
                       heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                       eps=vision_eps, init_std=number(v, "initializer_range", "vision_config"),
                       qkv_bias=_setting(v, "qkv_bias", "vision_config"), key_bias=False,
                       final_norm=False)
    # Blip2Config sets the Q-Former's encoder_hidden_size to the vision width
    q = {**(hf_config.get("qformer_config") or {}), "encoder_hidden_size": v["hidden_size"]}
    qformer = qformer_config_from_hf(q, hf_config.get("num_query_tokens", 32))
    image_token = hf_config.get("image_token_index", hf_config.get("image_token_id"))
    return Blip2Configs(vision, qformer, lm, vision_eps, text["bos_token_id"],
                        text["eos_token_id"], text["pad_token_id"], image_token)


def blip2_expected_shapes(c: Blip2Configs):
    """(shapes, layers) that witness every size of a BLIP-2 config, for
    :func:`minblip.hf.check_against_checkpoint`."""
    shapes, layers = vit_expected_shapes(c.vision, "vision_model")
    s, n = qformer_expected_shapes(c.qformer, "qformer")
    lm, d = c.lm, f"{LM}.model.decoder"
    shapes += s + [("query_tokens", (1, c.qformer.num_queries, c.qformer.width)),
                   ("language_projection.weight", (lm.token_width, c.qformer.width)),
                   (f"{d}.embed_tokens.weight", (lm.vocab_size, lm.token_width)),
                   (f"{d}.embed_positions.weight", (lm.max_positions + lm.position_offset,
                                                    lm.width)),
                   (f"{d}.layers.0.fc1.weight", (lm.mlp_dim, lm.width))]
    if lm.token_width != lm.width:
        shapes.append((f"{d}.project_in.weight", (lm.width, lm.token_width)))
    return shapes, layers + n + [(f"{d}.layers.", lm.depth)]


def opt_tensors(lm: LanguageModel, prefix: str = LM, mprefix: str = LM) -> list[HFTensor]:
    """``OPTForCausalLM`` <-> :class:`minblip.lm.LanguageModel`, the HF names after
    ``prefix`` and the minblip names after ``mprefix`` ("" for a bare OPT).
    ``lm_head.weight`` is the tied copy of ``embed_tokens.weight``."""
    p, m = (f"{prefix}." if prefix else ""), (f"{mprefix}." if mprefix else "")
    d = f"{p}model.decoder"
    out = [hf_copy(f"{d}.embed_tokens.weight", lm.embed_tokens.weight,
                   f"{m}embed_tokens.weight"),
           hf_copy(f"{d}.embed_positions.weight", lm.embed_positions.weight,
                   f"{m}embed_positions.weight")]
    if lm.project_in is not None:
        out += hf_linear(f"{d}.project_in", lm.project_in, f"{m}project_in")
        out += hf_linear(f"{d}.project_out", lm.project_out, f"{m}project_out")
    if lm.final_layer_norm is not None:
        out += hf_layer_norm(f"{d}.final_layer_norm", lm.final_layer_norm,
                             f"{m}final_layer_norm")
    for i, layer in enumerate(lm.layers):
        hp, mp = f"{d}.layers.{i}", f"{m}layers.{i}"
        att = layer.attn
        out += [*hf_linear(f"{hp}.self_attn.k_proj", att.key, f"{mp}.attn.key"),
                *hf_linear(f"{hp}.self_attn.v_proj", att.value, f"{mp}.attn.value"),
                *hf_linear(f"{hp}.self_attn.q_proj", att.query, f"{mp}.attn.query"),
                *hf_linear(f"{hp}.self_attn.out_proj", att.out, f"{mp}.attn.out"),
                *hf_layer_norm(f"{hp}.self_attn_layer_norm", layer.ln1, f"{mp}.ln1"),
                *hf_linear(f"{hp}.fc1", layer.mlp.fc1, f"{mp}.mlp.fc1"),
                *hf_linear(f"{hp}.fc2", layer.mlp.fc2, f"{mp}.mlp.fc2"),
                *hf_layer_norm(f"{hp}.final_layer_norm", layer.ln2, f"{mp}.ln2")]
    # the tied output layer: present in some files, optional here
    return out + [hf_copy(f"{p}lm_head.weight", lm.embed_tokens.weight,
                          f"{m}embed_tokens.weight")]


def blip2_tensors(model: Blip2Stage2) -> list[HFTensor]:
    """Every tensor of ``Blip2ForConditionalGeneration`` (OPT) and the minblip
    Params it is made of, in state-dict order."""
    if model.visual_encoder.config.pos_embed_at_output:
        raise ValueError("blip2_tensors: a ViT with pos_embed_at_output=True (the position table "
                         "added again at its output) has no Hugging Face BLIP-2 equivalent")
    out = vit_tensors(model.visual_encoder, "vision_model", "visual_encoder",
                      post_layernorm=(model.ln_vision, "ln_vision"))
    out.append(hf_copy("query_tokens", model.qformer.query_tokens, "qformer.query_tokens"))
    out += qformer_tensors(model.qformer, "qformer", mprefix="qformer")
    out += hf_linear("language_projection", model.language_projection, "language_projection")
    out += opt_tensors(model.language_model)
    return mark_tied(out)


def blip2_state_dict(model: Blip2Stage2, include_tied: bool = False) -> dict[str, np.ndarray]:
    """``{hf_name: array}`` of a BLIP-2 in Hugging Face's names and layouts."""
    return state_dict_of(blip2_tensors(model), include_tied=include_tied)


def _build(c: Blip2Configs) -> Blip2Stage2:
    """The model of these configs with zeros for values (the loader overwrites them).
    The Q-Former's text embeddings are built with one word and one position:
    BLIP-2's generation model has none (stage 2 strips them). Large Params are
    placeholders (:func:`minblip.core.deferred_params`)."""
    rng = ZeroInit()
    qcfg = QFormerConfig(**{**c.qformer.to_dict(), "vocab_size": 1, "max_positions": 1,
                            "pad_id": 0})
    with deferred_params():  # placeholders until the file fills them
        vit = VisionTransformer(c.vision, rng)
        lm = LanguageModel(c.lm, rng)
        return Blip2Stage2(vit, LayerNorm(c.vision.width, c.vision_eps), QFormer(qcfg, rng), lm,
                           rng)


def load_blip2(directory, dtype=np.float32) -> Blip2Stage2:
    """A Hugging Face ``Blip2ForConditionalGeneration`` folder with an OPT language
    model (``config.json`` + ``model.safetensors`` or its shards, any float
    dtype) -> :class:`~minblip.blip2_stage2.Blip2Stage2` in ``dtype``, its ViT and
    LM frozen. Loaded as :func:`minblip.hf.load_blip` loads: the config checked
    against the headers first, then one memory-mapped tensor at a time
    converted once. The model's ``hf_config`` keeps the config dict and
    ``configs`` the :class:`Blip2Configs`."""
    hf_config = read_hf_config(directory)
    configs = blip2_configs_from_hf(hf_config)
    checkpoint = Checkpoint(directory)
    check_against_checkpoint(checkpoint, *blip2_expected_shapes(configs),
                             f"{directory}/config.json")
    model = _build(configs)
    fit(blip2_tensors(model), checkpoint, "a minblip BLIP-2 (OPT) of this config",
        checkpoint.source, dtype=dtype)
    finish_loading(model, dtype)
    model.hf_config, model.configs = hf_config, configs
    return model


def load_opt(directory, dtype=np.float32) -> LanguageModel:
    """A Hugging Face ``OPTForCausalLM`` folder -> :class:`minblip.lm.LanguageModel`
    (loaded as :func:`load_blip2` loads; the language model of BLIP-2 on its own)."""
    hf_config = read_hf_config(directory)
    cfg = opt_config_from_hf(hf_config, "")
    checkpoint = Checkpoint(directory)
    d = "model.decoder"
    shapes = [(f"{d}.embed_tokens.weight", (cfg.vocab_size, cfg.token_width)),
              (f"{d}.embed_positions.weight", (cfg.max_positions + cfg.position_offset,
                                               cfg.width)),
              (f"{d}.layers.0.fc1.weight", (cfg.mlp_dim, cfg.width))]
    check_against_checkpoint(checkpoint, shapes, [(f"{d}.layers.", cfg.depth)],
                             f"{directory}/config.json")
    with deferred_params():
        lm = LanguageModel(cfg, ZeroInit())
    fit(mark_tied(opt_tensors(lm, prefix="", mprefix="")), checkpoint,
        "a minblip OPT language model of this config", checkpoint.source, dtype=dtype)
    finish_loading(lm, dtype)
    lm.hf_config = hf_config
    return lm


def blip2_generate(model: Blip2Stage2, images, prompt_ids=None, **decoding) -> list[np.ndarray]:
    """``Blip2ForConditionalGeneration.generate`` for an OPT BLIP-2: per image the
    ids HF returns after its image placeholders: BOS, the prompt and the new
    tokens, up to the end token (left out).

    images (B, 3, H, W) preprocessed; ``prompt_ids``: the tokenizer's ids of the
    prompt (``ByteLevelBPETokenizer.encode``: OPT's puts BOS first), or None for
    BOS alone. ``decoding``: the options of :func:`minblip.generation.generate`;
    ``max_length`` / ``min_length`` count BOS, the prompt and the new tokens
    (not the placeholders: see the module docstring).
    """
    c = model.configs
    prompt = np.array([c.bos_id] if prompt_ids is None else prompt_ids, dtype=np.int64).ravel()
    soft = model.soft_prompt(images=images.astype(model.dtype, copy=False))  # (B, Q, E)
    out = generate(SoftPromptDecoder(model.language_model), soft, prompt, sep_id=c.eos_id,
                   **decoding)
    return [np.concatenate([prompt, tokens]) for tokens in out.tokens]
