"""Hugging Face checkpoints without PyTorch: the safetensors reader and writer, the
key and config mapping, and the errors for checkpoints that do not fit.

(The comparison with the PyTorch models themselves is tests/test_torch_parity.py.)
"""
import dataclasses
import json
import struct

import numpy as np
import pytest

from minblip import hf
from minblip.blip import BLIP, BLIPConfig
from minblip.softmax import softmax
from minblip.text import TextConfig
from minblip.tokenizer import Tokenizer
from minblip.vit import ViTConfig
from minblip.wordpiece import WordPieceTokenizer

WORDS = "a red blue circle square small large picture of".split()


def tiny_model(seed=0, dtype=np.float32):
    tok = Tokenizer(WORDS)
    cfg = BLIPConfig(vision=ViTConfig(image_size=8, patch_size=4, width=8, depth=2, heads=2,
                                      mlp_dim=16),
                     text=TextConfig(vocab_size=tok.vocab_size, width=8, depth=2, heads=2,
                                     mlp_dim=16, max_positions=12, encoder_width=8),
                     embed_dim=6)
    rng = np.random.default_rng(seed)
    model = BLIP(cfg, rng).to(dtype)
    for p in model.params():  # every tensor distinct and far from its init
        p.data[...] = rng.normal(0, 0.3, p.shape)
    return model, tok


def raw_safetensors(entries, metadata=None):
    """Bytes of a safetensors file built by hand from the format description:
    entries = [(name, dtype code, shape, raw bytes)], in file order."""
    header, offset, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, code, shape, raw in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------

def test_reads_a_hand_built_file_with_every_dtype(tmp_path):
    f32 = np.array([[1.5, -2.0], [0.25, 3.0]], "<f4")
    f64 = np.array([np.pi], "<f8")
    f16 = np.array([0.5, -1.0, 65504.0], "<f2")
    i64 = np.arange(3, dtype="<i8")
    exact = np.array([1.0, -0.375, 1.5 * 2.0**100], np.float32)  # exact in bfloat16
    bf16 = (exact.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors([
        ("a", "F32", [2, 2], f32.tobytes()), ("b", "F64", [1], f64.tobytes()),
        ("c", "F16", [3], f16.tobytes()), ("d", "I64", [3], i64.tobytes()),
        ("e", "BF16", [3], bf16.tobytes()), ("scalar", "F32", [], np.float32(7).tobytes()),
        ("empty", "F32", [0, 4], b"")], metadata={"format": "pt"}))
    t = hf.read_safetensors(path)
    assert t["a"].dtype == np.float32 and np.array_equal(t["a"], f32)
    assert t["b"].dtype == np.float64 and t["b"][0] == np.pi
    assert t["c"].dtype == np.float32 and np.array_equal(t["c"], [0.5, -1.0, 65504.0])
    assert t["d"].dtype == np.int64 and np.array_equal(t["d"], [0, 1, 2])
    assert t["e"].dtype == np.float32 and np.array_equal(t["e"], exact)
    assert t["scalar"].shape == () and t["scalar"] == 7
    assert t["empty"].shape == (0, 4)
    assert hf.read_safetensors_header(path)["__metadata__"] == {"format": "pt"}
    t["a"][0, 0] = 9  # arrays are writable copies


def test_write_then_read_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32), "z.b": rng.standard_normal(4),
               "h": np.array([1.5, 2.5], np.float16), "ids": np.arange(6).reshape(2, 3),
               "s": np.float32(2.0), "t": rng.standard_normal((2, 3, 4)).astype(np.float32).T}
    path = tmp_path / "x.safetensors"
    hf.write_safetensors(path, tensors, metadata={"format": "pt"})
    back = hf.read_safetensors(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert np.array_equal(back[k], v), k
        assert back[k].shape == np.shape(v)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0  # the data section starts 8-byte aligned
    header = json.loads(raw[8:8 + n])
    order = [k for k in header if k != "__metadata__"]
    assert order == ["ids", "z.b", "s", "t", "w", "h"]  # dtype (I64, F64, F32, F16), then name


def test_writer_refuses_unsupported_dtypes_and_names(tmp_path):
    with pytest.raises(TypeError, match="'m'.*int32"):
        hf.write_safetensors(tmp_path / "a", {"m": np.zeros(2, np.int32)})
    with pytest.raises(ValueError, match="__metadata__"):
        hf.write_safetensors(tmp_path / "a", {"__metadata__": np.zeros(2)})
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["w"].update(dtype="I8"), "'w' has dtype I8"),
    (lambda h: h["w"].update(shape=[3]), "'w' of shape \\[3\\]"),
    (lambda h: h["w"].update(data_offsets=[4, 12]), "'w' starts at byte 4"),
    (lambda h: h["v"].update(data_offsets=[4, 12]), "'v' starts at byte 4"),
    (lambda h: h["w"].pop("shape"), "'w' needs exactly"),
])
def test_corrupt_headers_name_the_tensor(tmp_path, mutate, message):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    mutate(header)
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    with pytest.raises(ValueError, match=message):
        hf.read_safetensors(path)


def test_truncated_files_are_rejected(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="too short"):
        hf.read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="exceeds the file size"):
        hf.read_safetensors(path)
    good = raw_safetensors([("w", "F32", [4], bytes(16))])
    path.write_bytes(good[:-4])
    with pytest.raises(ValueError, match="cover 16 bytes of data, the file holds 12"):
        hf.read_safetensors(path)


# ---------------------------------------------------------------------------------------
# The tensor map
# ---------------------------------------------------------------------------------------

def test_tensor_names_follow_the_hf_models():
    model, _ = tiny_model()
    ret = hf.hf_state_dict(model, "retrieval")
    cap = hf.hf_state_dict(model, "captioning")
    assert len(ret) == 92 and len(cap) == 91  # what save_pretrained writes for these sizes
    assert ret["vision_model.encoder.layers.1.self_attn.qkv.weight"].shape == (24, 8)
    assert ret["vision_model.embeddings.patch_embedding.weight"].shape == (8, 3, 4, 4)
    assert ret["vision_model.embeddings.class_embedding"].shape == (1, 1, 8)
    assert ret["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape == (16, 8)
    assert "text_decoder.cls.predictions.decoder.weight" not in cap  # tied: written once
    assert "text_decoder.cls.predictions.bias" in cap and "itm_head.weight" not in cap
    # minblip's pretraining model under one scheme: what the decoder shares appears once
    pre = hf.hf_tensors(model, "pretraining")
    tied = {t.name: t.tied_to for t in pre if t.tied_to}
    assert tied["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"] == \
        "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    assert tied["text_decoder.cls.predictions.decoder.weight"] == \
        "text_encoder.embeddings.word_embeddings.weight"
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" not in tied
    covered = {id(p) for t in pre if t.tied_to is None for p in t.params}
    assert covered == {id(p) for p in model.params()}  # every Param exactly once


def test_pretraining_state_dict_round_trip_keeps_the_scalar_temperature():
    model, _ = tiny_model()
    sd = hf.hf_state_dict(model, "pretraining")
    assert sd["temp"].shape == ()  # a 0-d tensor stays 0-d (it once came back as (1,))
    other, _ = tiny_model(seed=5)
    hf.load_hf_state_dict(other, sd, "pretraining")
    for (name, a), (_, b) in zip(model.named_params(), other.named_params()):
        assert np.array_equal(a.data, b.data), name


def test_fused_qkv_computes_the_three_projections():
    model, _ = tiny_model()
    sd = hf.hf_state_dict(model, "retrieval")
    att = model.visual_encoder.blocks[0].attn
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    fused = x @ sd["vision_model.encoder.layers.0.self_attn.qkv.weight"].T \
        + sd["vision_model.encoder.layers.0.self_attn.qkv.bias"]  # nn.Linear: x W^T + b
    for part, lin in zip(np.split(fused, 3, axis=-1), (att.query, att.key, att.value)):
        np.testing.assert_allclose(part, lin.forward(x)[0], rtol=1e-5, atol=1e-6)


def test_conv_weight_maps_like_load_conv_weights():
    model, _ = tiny_model()
    conv_w = np.random.default_rng(2).standard_normal((8, 3, 4, 4)).astype(np.float32)
    conv_b = np.arange(8, dtype=np.float32)
    sd = hf.hf_state_dict(model, "retrieval")
    sd["vision_model.embeddings.patch_embedding.weight"] = conv_w
    sd["vision_model.embeddings.patch_embedding.bias"] = conv_b
    hf.load_hf_state_dict(model, sd, "retrieval")
    other, _ = tiny_model(1)
    other.visual_encoder.patch_embed.load_conv_weights(conv_w, conv_b)
    assert np.array_equal(model.visual_encoder.patch_embed.proj.W.data,
                          other.visual_encoder.patch_embed.proj.W.data)


# ---------------------------------------------------------------------------------------
# Folders: save, load, round trip
# ---------------------------------------------------------------------------------------

def test_retrieval_folder_round_trip_is_bit_identical(tmp_path):
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path / "a", "retrieval", tokenizer=tok)
    loaded = hf.load_blip_retrieval(tmp_path / "a")
    assert loaded.text_decoder is None and loaded.text_encoder is not None
    sizes = sum(a.size for a in hf.read_safetensors(tmp_path / "a" / "model.safetensors").values())
    assert loaded.param_count() == sizes + 1  # + temp, which HF's retrieval model lacks
    hf.save_blip(loaded, tmp_path / "b")
    a, b = (hf.read_safetensors(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == \
        json.loads((tmp_path / "b" / "config.json").read_text())
    # the loaded model computes what the original computes (to rounding: a loaded Linear
    # weight is a transposed view of the file's layout, which BLAS may sum in another order)
    images = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ids, mask = tok.encode(["a red circle", "a small blue square"])
    e1, f1 = model.encode_image(images)
    e2, f2 = loaded.encode_image(images)
    close = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e2, e1, **close)
    np.testing.assert_allclose(f2, f1, **close)
    np.testing.assert_allclose(loaded.encode_text(ids, mask), model.encode_text(ids, mask),
                               **close)
    np.testing.assert_allclose(loaded.itm_logits(e2, ids, mask, tok.enc_id),
                               model.itm_logits(e1, ids, mask, tok.enc_id), **close)


def test_captioning_folder_round_trip_and_vocab(tmp_path):
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path / "c", "captioning", tokenizer=tok)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["architectures"] == ["BlipForConditionalGeneration"]
    assert cfg["text_config"]["bos_token_id"] == tok.dec_id
    assert cfg["text_config"]["sep_token_id"] == tok.sep_id
    loaded = hf.load_blip(tmp_path / "c", np.float64)  # kind from "architectures"
    assert loaded.text_encoder is None and loaded.itm_head is None and loaded.temp is None
    assert loaded.dtype == np.float64
    wp = WordPieceTokenizer.from_file(tmp_path / "c" / "vocab.txt")
    assert wp.tokens == tok.tokens and wp.dec_id == tok.dec_id and wp.enc_id == tok.enc_id
    images = np.random.default_rng(4).standard_normal((2, 3, 8, 8))
    ids, mask = wp.encode(["a red circle", "a picture of a square"])
    model.to(np.float64)
    e1, _ = model.visual_encoder.forward(images)
    e2, _ = loaded.visual_encoder.forward(images)
    l1, _ = model.text_decoder.forward(ids, mask, e1)
    l2, _ = loaded.text_decoder.forward(ids, mask, e2)
    np.testing.assert_allclose(l2, l1, rtol=1e-13, atol=1e-14)  # float64, to rounding
    prompt, sep = hf.caption_token_ids(loaded, wp.encode("a picture of")[0][0])
    assert prompt.tolist() == [tok.dec_id] + [tok.token_to_id(w) for w in "a picture of".split()]
    assert sep == tok.sep_id and hf.caption_token_ids(loaded)[0].tolist() == [tok.dec_id]


def test_float64_model_saves_f64_and_float32_model_f32(tmp_path):
    model, tok = tiny_model(dtype=np.float64)
    hf.save_blip(model, tmp_path, "captioning", tokenizer=tok)
    header = hf.read_safetensors_header(tmp_path / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if not k.startswith("__")} == {"F64"}
    # loaded in float64, every float64 bit survives; in float32, each value is rounded once
    saved = hf.hf_state_dict(model, "captioning")
    for dtype in (np.float64, np.float32):
        loaded = hf.hf_state_dict(hf.load_blip_captioning(tmp_path, dtype))
        for name, a in saved.items():
            assert loaded[name].dtype == dtype, name
            assert np.array_equal(loaded[name], a.astype(dtype)), name


def _saved(tmp_path, kind="captioning"):
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path, kind, tokenizer=tok)
    return hf.read_safetensors(tmp_path / "model.safetensors")


def _resave(tmp_path, tensors):
    hf.write_safetensors(tmp_path / "model.safetensors", tensors)


def test_missing_unexpected_and_misshapen_tensors_are_all_named(tmp_path):
    t = _saved(tmp_path)
    del t["text_decoder.bert.encoder.layer.1.output.dense.bias"]
    del t["vision_model.post_layernorm.weight"]
    t["text_decoder.bert.pooler.dense.weight"] = np.zeros((8, 8), np.float32)
    t["vision_model.encoder.layers.0.self_attn.qkv.weight"] = np.zeros((8, 24), np.float32)
    _resave(tmp_path, t)
    with pytest.raises(ValueError) as err:
        hf.load_blip_captioning(tmp_path)
    msg = str(err.value)
    assert "2 missing" in msg and "text_decoder.bert.encoder.layer.1.output.dense.bias (8,)" in msg
    assert "vision_model.post_layernorm.weight" in msg
    assert "1 unexpected: text_decoder.bert.pooler.dense.weight (8, 8)" in msg
    assert ("vision_model.encoder.layers.0.self_attn.qkv.weight: expected float (24, 8), "
            "got float32 (8, 24)") in msg


def test_a_retrieval_file_is_not_a_captioning_model(tmp_path):
    _saved(tmp_path, "retrieval")
    with pytest.raises(ValueError, match="text_decoder.bert.embeddings.word_embeddings.weight "
                                         "is missing") as err:
        hf.load_blip_captioning(tmp_path)  # refused by the headers, before building a model
    assert "is it a retrieval checkpoint?" in str(err.value)
    with pytest.raises(ValueError, match="61 missing: text_decoder.bert.embeddings") as err:
        model, _ = tiny_model()
        model.text_encoder = None
        hf.load_hf_state_dict(model, hf.read_hf_tensors(tmp_path), "captioning")
    assert "is it a retrieval checkpoint?" in str(err.value)


def test_integer_tensor_where_a_weight_belongs(tmp_path):
    t = _saved(tmp_path)
    t["text_decoder.cls.predictions.bias"] = np.zeros(t["text_decoder.cls.predictions.bias"].shape,
                                                       np.int64)
    _resave(tmp_path, t)
    with pytest.raises(ValueError, match="predictions.bias: expected float .* got int64"):
        hf.load_blip_captioning(tmp_path)


def test_tied_copies_load_when_equal_and_fail_when_not(tmp_path):
    t = _saved(tmp_path)
    word = t["text_decoder.bert.embeddings.word_embeddings.weight"]
    t["text_decoder.cls.predictions.decoder.weight"] = word.copy()  # older save_pretrained
    t["text_decoder.cls.predictions.decoder.bias"] = t["text_decoder.cls.predictions.bias"].copy()
    t["text_decoder.bert.embeddings.position_ids"] = np.arange(12)[None]  # an old buffer
    _resave(tmp_path, t)
    model = hf.load_blip_captioning(tmp_path)
    assert np.array_equal(model.text_decoder.head.weight.data, word)
    t["text_decoder.cls.predictions.decoder.weight"] = word + 1
    _resave(tmp_path, t)
    with pytest.raises(ValueError, match="untied: text_decoder.cls.predictions.decoder.weight "
                                         "differs from text_decoder.bert.embeddings"):
        hf.load_blip_captioning(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_blip_captioning(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        hf.load_blip_captioning(tmp_path)


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------

def test_config_round_trip_and_hf_defaults():
    model, tok = tiny_model()
    d = hf.hf_config_from_blip(model.cfg, "retrieval", bos_token_id=tok.dec_id,
                               sep_token_id=tok.sep_id)
    back = hf.blip_config_from_hf(d)
    assert back.vision == model.cfg.vision and back.text == model.cfg.text
    assert back.embed_dim == model.cfg.embed_dim
    base = hf.blip_config_from_hf({"model_type": "blip"})  # every key from HF's defaults
    assert (base.vision.width, base.vision.image_size, base.vision.eps) == (768, 384, 1e-5)
    assert (base.text.vocab_size, base.text.heads, base.label_smoothing) == (30524, 8, 0.0)
    assert base.embed_dim == 256


def test_config_with_position_at_output_is_refused():
    model, tok = tiny_model()
    cfg = dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision,
                                                                    pos_embed_at_output=True))
    with pytest.raises(ValueError, match="pos_embed_at_output"):
        hf.hf_config_from_blip(cfg, "retrieval", bos_token_id=tok.dec_id, sep_token_id=tok.sep_id)


def test_original_blip_options_override_the_config():
    cfg = hf.blip_config_from_hf({"model_type": "blip"}, **hf.ORIGINAL_BLIP)
    assert cfg.vision.eps == 1e-6 and cfg.label_smoothing == 0.1


@pytest.mark.parametrize("config, message", [
    ({"model_type": "blip-2"}, "model_type 'blip'"),
    ({"model_type": "blip", "text_config": {"hidden_act": "relu"}}, "text_config.hidden_act"),
    ({"model_type": "blip", "vision_config": {"image_size": [384, 256]}}, "square"),
])
def test_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        hf.blip_config_from_hf(config)


def test_save_needs_token_ids_that_fit(tmp_path):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        hf.save_blip(model, tmp_path, "captioning")  # HF's default ids 30522/102 do not fit
    with pytest.raises(ValueError, match="'retrieval', 'captioning' or 'vqa'"):
        hf.save_blip(model, tmp_path)


def test_itm_with_cls_or_enc_differs():
    """Hugging Face runs ITM on [CLS] ids as given, salesforce/BLIP on [ENC]; both are
    one argument of itm_logits."""
    model, tok = tiny_model()
    images = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ids, mask = tok.encode(["a red circle", "a blue square"])
    embeds, _ = model.encode_image(images)
    p_cls = softmax(model.itm_logits(embeds, ids, mask, enc_id=tok.cls_id))
    p_enc = softmax(model.itm_logits(embeds, ids, mask, enc_id=tok.enc_id))
    assert not np.allclose(p_cls, p_enc)


def test_cli_captions_a_photo_from_a_hf_folder(tmp_path, capsys):
    from pathlib import Path

    from minblip.__main__ import main
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path, "captioning", tokenizer=tok)
    photo = str(Path(__file__).parent.parent / "data_samples" / "photos" / "grace_hopper.jpg")
    assert main(["caption", photo, "--from-pretrained", str(tmp_path), "--method", "greedy",
                 "--prompt", "a picture of"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(photo + ": ")
    assert set(line[len(photo) + 2:].split()) <= set(WORDS)  # words of the vocabulary only
    (tmp_path / "vocab.txt").unlink()
    assert main(["caption", photo, "--from-pretrained", str(tmp_path)]) == 2
    assert "vocab.txt" in capsys.readouterr().err


def test_qformer_folder_loads_every_layer_and_names_what_is_missing(tmp_path):
    from minblip.qformer import QFormer, QFormerConfig
    cfg = QFormerConfig(vocab_size=20, width=8, depth=3, heads=2, mlp_dim=16, num_queries=4,
                        cross_attention_freq=2, encoder_width=6, max_positions=10)
    source = QFormer(cfg, np.random.default_rng(0))
    for p in source.params():
        p.data[...] = np.random.default_rng(p.size).normal(0, 0.3, p.shape)
    entries = hf.qformer_tensors(source)
    assert len(entries) == 2 + 3 * 16 + 2 * 10  # layernorm, 3 layers, cross-attention in 0 and 2
    tensors = {t.name: t.to_hf([p.data for p in t.params]) for t in entries}
    hf.write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "blip_2_qformer", "vocab_size": 20, "hidden_size": 8,
        "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 16,
        "encoder_hidden_size": 6, "cross_attention_frequency": 2,
        "max_position_embeddings": 10}))
    loaded = hf.load_qformer(tmp_path, num_queries=4)
    mine = dict(loaded.named_params())
    for name, p in source.named_params():
        if name.startswith(("layers.", "embeddings.layer_norm")) and ".ffn." not in name \
                and ".ffn_ln." not in name:
            assert np.array_equal(mine[name].data, p.data), name
    del tensors["encoder.layer.2.crossattention.attention.value.bias"]
    hf.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="1 missing: encoder.layer.2.crossattention.attention"
                                         ".value.bias \\(8,\\)"):
        hf.load_qformer(tmp_path, num_queries=4)
