"""BLIP-2 (OPT), a bare OPT and BLIP VQA from Hugging Face folders, against the outputs
transformers computed for the committed tiny checkpoints (tests/fixtures/hf, made by
reference/make_hf_fixtures.py): float64 within 1e-8, float32 within 1e-4, greedy and
beam-search ids identical. No torch needed."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minblip import hf, hf_blip2
from minblip.image import preprocess
from minblip.safetensors import Checkpoint, read_safetensors_header, write_safetensors
from minblip.wordpiece import WordPieceTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
PHOTO = Path(__file__).parent.parent / "data_samples" / "photos" / "grace_hopper.jpg"
BLIP2 = ["blip2_opt_q1", "blip2_opt_q8", "blip2_opt_q32"]
TOL = {np.float64: 1e-8, np.float32: 1e-4}


def reference(name):
    data = np.load(FIXTURES / "reference" / f"{name}.npz")
    meta = json.loads((FIXTURES / "reference" / f"{name}.json").read_text(encoding="utf-8"))
    return data, meta


_MODELS = {}


def blip2(name, dtype):
    if (name, dtype) not in _MODELS:  # each fixture loads once per dtype
        _MODELS[name, dtype] = hf_blip2.load_blip2(FIXTURES / name, dtype)
    return _MODELS[name, dtype]


# ---------------------------------------------------------------------------------------
# BLIP-2 with OPT
# ---------------------------------------------------------------------------------------

def test_the_fixtures_cover_queries_heads_shards_and_bfloat16():
    queries = [hf_blip2.blip2_configs_from_hf(hf.read_hf_config(FIXTURES / n))
               .qformer.num_queries for n in BLIP2]
    assert queries == [1, 8, 32]
    c = blip2("blip2_opt_q8", np.float64).configs
    assert (c.vision.heads, c.qformer.heads, c.lm.heads) == (3, 5, 7)
    assert len(Checkpoint(FIXTURES / "blip2_opt_q8").files) == 2  # sharded
    header = read_safetensors_header(FIXTURES / "blip2_opt_q32" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", BLIP2)
def test_queries_and_logits_match_transformers(name, dtype):
    ref, _ = reference(name)
    model = blip2(name, dtype)
    assert model.dtype == dtype
    pixels = ref["pixel_values"].astype(dtype)
    soft = model.soft_prompt(images=pixels)  # (1, Q, E): the projected queries
    np.testing.assert_allclose(soft, ref["image_features"], rtol=0, atol=TOL[dtype])
    logits, _ = model.language_model.forward(ref["question_ids"][None], prefix_embeds=soft)
    L = ref["logits"].shape[1]  # the last positions of the question
    np.testing.assert_allclose(logits[:, -L:], ref["logits"], rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("name", BLIP2)
def test_greedy_and_beam_ids_match_transformers(name):
    ref, meta = reference(name)
    model = blip2(name, np.float64)
    assert model.configs.eos_id == meta["eos_token_id"]
    ends = 0
    for g in meta["generations"]:
        out = hf_blip2.blip2_generate(model, ref["pixel_values"], g["prompt"],
                                      method=g["method"], num_beams=g["num_beams"],
                                      max_length=g["max_length"], min_length=g["min_length"])
        assert out[0].tolist() == g["ids"], g
        ends += len(g["ids"]) < g["max_length"]
    if meta["eos_token_id"] != 2:  # these fixtures have a reachable end token: some end early
        assert ends >= 2


def test_minblip_preprocessing_gives_the_processors_pixels():
    ref, _ = reference("blip2_opt_q8")
    np.testing.assert_allclose(preprocess(str(PHOTO), 16), ref["pixel_values"], atol=1e-6)


def test_the_tensor_map_covers_every_param_once_and_round_trips():
    model = blip2("blip2_opt_q1", np.float32)
    entries = hf_blip2.blip2_tensors(model)
    covered = [id(p) for t in entries if t.tied_to is None for p in t.params]
    assert sorted(covered) == sorted(id(p) for p in model.params(include_frozen=True))
    assert [t.name for t in entries if t.tied_to] == ["language_model.lm_head.weight"]
    sd = hf_blip2.blip2_state_dict(model)
    on_disk = Checkpoint(FIXTURES / "blip2_opt_q1")
    assert set(sd) == set(on_disk.names)
    for name, a in sd.items():
        b = on_disk.read(name)
        if name.endswith("self_attn.qkv.bias"):  # EVA has no key bias: its third is zero
            D = a.shape[0] // 3
            b = b.copy()
            b[D:2 * D] = 0
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_vit_with_position_at_output_has_no_hf_names():
    model = hf_blip2.load_blip2(FIXTURES / "blip2_opt_q1", np.float32)
    vit = model.visual_encoder
    vit.config = type(vit.config)(**{**vit.config.__dict__, "pos_embed_at_output": True})
    with pytest.raises(ValueError, match="pos_embed_at_output"):
        hf_blip2.blip2_state_dict(model)


def test_loaded_weights_are_views_of_one_conversion():
    """A Linear weight is the transposed view of the file's layout; a fused qkv's
    three parts are views of one array; nothing is copied twice."""
    model = blip2("blip2_opt_q8", np.float32)
    att = model.visual_encoder.blocks[0].attn
    assert att.query.W.data.base is att.value.W.data.base is not None
    assert att.query.W.data.flags.f_contiguous
    fc1 = model.language_model.layers[0].mlp.fc1.W.data
    assert fc1.flags.f_contiguous and fc1.base is not None
    assert model.language_model.embed_tokens.weight.data.flags.c_contiguous


def test_a_config_that_contradicts_the_headers_is_refused_before_building(tmp_path):
    shutil.copytree(FIXTURES / "blip2_opt_q1", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["text_config"]["vocab_size"] = 10**6
    config["num_query_tokens"] = 4
    config["qformer_config"]["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        hf_blip2.load_blip2(tmp_path / "m")
    msg = str(err.value)
    assert "nothing was built" in msg
    assert "language_model.model.decoder.embed_tokens.weight has shape (404, 14), the config " \
           "implies (1000000, 14)" in msg
    assert "query_tokens has shape (1, 1, 10), the config implies (1, 4, 10)" in msg
    assert "the config says 3 layers, the checkpoint has 2 under qformer.encoder.layer.*" in msg


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    shutil.copytree(FIXTURES / "blip2_opt_q1", tmp_path / "m")
    tensors = hf.read_hf_tensors(tmp_path / "m")
    del tensors["qformer.encoder.layer.1.output_query.LayerNorm.bias"]
    tensors["language_projection.bias"] = np.zeros(3, np.float32)
    write_safetensors(tmp_path / "m" / "model.safetensors", tensors)
    with pytest.raises(ValueError) as err:
        hf_blip2.load_blip2(tmp_path / "m")
    msg = str(err.value)
    assert "1 missing: qformer.encoder.layer.1.output_query.LayerNorm.bias (10,)" in msg
    assert "language_projection.bias: expected float (14,), got float32 (3,)" in msg


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(model_type="t5"), "FlanT5 variant of BLIP-2 is not"),
    (lambda c: c["text_config"].update(do_layer_norm_before=False),
     "text_config.do_layer_norm_before must be true"),
    (lambda c: c.update(model_type="blip"), "expected a BLIP-2 config"),
    (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act"),
    (lambda c: c["text_config"].update(dropout="lots"), "text_config.dropout must be a number"),
])
def test_unsupported_configs_are_named(edit, message):
    config = hf.read_hf_config(FIXTURES / "blip2_opt_q1")
    edit(config)
    with pytest.raises(ValueError, match=message):
        hf_blip2.blip2_configs_from_hf(config)


# ---------------------------------------------------------------------------------------
# A bare OPT: project in and out, no final LayerNorm
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_opt_with_projections_matches_transformers(dtype):
    ref = np.load(FIXTURES / "reference" / "opt_project.npz")
    lm = hf_blip2.load_opt(FIXTURES / "opt_project", dtype)
    assert lm.project_in is not None and lm.final_layer_norm is None
    assert lm.cfg.position_offset == 2 and lm.cfg.token_width == 6
    logits, _ = lm.forward(ref["ids"])
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=TOL[dtype])


# ---------------------------------------------------------------------------------------
# BLIP VQA
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vqa_answer_logits_match_transformers(dtype):
    ref, meta = reference("blip_vqa")
    model = hf.load_blip_vqa(FIXTURES / "blip_vqa", dtype)
    assert hf.model_kind(model) == "vqa" and model.itm_head is None
    enc = {id(p) for p in model.text_encoder.params()}
    assert not enc & {id(p) for p in model.text_decoder.params()}  # nothing shared
    tok = WordPieceTokenizer.from_file(FIXTURES / "blip_vqa" / "vocab.txt")
    ids, _ = tok.encode(meta["question"])
    np.testing.assert_array_equal(ids, ref["question_ids"])
    image, _ = model.visual_encoder.forward(ref["pixel_values"].astype(dtype))
    question, _ = model.text_encoder.forward(ids, None, image)
    logits, _ = model.text_decoder.forward(ref["answer_prefix"], None, question)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=TOL[dtype])


def test_vqa_answers_match_transformers():
    ref, meta = reference("blip_vqa")
    model = hf.load_blip_vqa(FIXTURES / "blip_vqa", np.float64)
    tok = WordPieceTokenizer.from_file(FIXTURES / "blip_vqa" / "vocab.txt")
    for a in meta["answers"]:
        out = hf.vqa_generate(model, ref["pixel_values"], ref["question_ids"],
                              method=a["method"], num_beams=a["num_beams"],
                              max_length=a["max_length"], min_length=a["min_length"])
        assert out[0].tolist() == a["ids"], a
        assert tok.decode(out[0]) == a["text"]


def test_vqa_folder_round_trip(tmp_path):
    model = hf.load_blip_vqa(FIXTURES / "blip_vqa")
    tok = WordPieceTokenizer.from_file(FIXTURES / "blip_vqa" / "vocab.txt")
    hf.save_blip(model, tmp_path, tokenizer=tok)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == \
        ["BlipForQuestionAnswering"]
    a, b = (hf.read_hf_tensors(d) for d in (FIXTURES / "blip_vqa", tmp_path))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
