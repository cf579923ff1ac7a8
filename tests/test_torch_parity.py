"""minblip against the reference implementation: Hugging Face BLIP in PyTorch.

Needs torch and transformers, which minblip itself never uses; without them the
whole file is skipped. Nothing is downloaded: tiny models are built from configs
with random weights, saved with ``save_pretrained`` and loaded by minblip.hf.

* BlipForImageTextRetrieval: ITM probabilities and ITC similarities;
* BlipForConditionalGeneration: logits, the LM loss, greedy and beam-search tokens;
* the other direction: minblip models saved by minblip.hf load in transformers;
* the safetensors reader/writer against the safetensors package;
* WordPiece against BertTokenizer;
* reference/torch_twin.py: one pretraining step, loss and every gradient;
* reference/torch_twin_blip2.py: one BLIP-2 stage-1 step (losses and every
  gradient) and four trainer steps (clipping, AdamW, schedule).

Tolerances: 1e-8 absolute in float64, 1e-4 in float32.
"""
import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (BlipConfig, BlipForConditionalGeneration,  # noqa: E402
                          BlipForImageTextRetrieval)

from minblip import hf  # noqa: E402
from minblip.generation import generate  # noqa: E402
from minblip.softmax import CrossEntropyLoss, softmax  # noqa: E402
from minblip.wordpiece import WordPieceTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
NP = {torch.float64: np.float64, torch.float32: np.float32}
PAD, CLS, SEP, BOS = 0, 2, 3, 40  # BOS plays [DEC]

# (vision: image, patch, width, depth, heads, mlp, eps) + (text: width, depth, heads, mlp)
CONFIGS = {
    "2x2-layers": dict(vision=(16, 8, 16, 2, 2, 32, 1e-5), text=(16, 2, 2, 32)),
    "widths-differ": dict(vision=(24, 8, 12, 1, 3, 20, 1e-6), text=(24, 3, 4, 40)),
    "one-head": dict(vision=(16, 4, 8, 2, 1, 16, 1e-5), text=(8, 1, 1, 24)),
}


def hf_config(name, label_smoothing=0.0):
    (image, patch, vw, vd, vh, vm, eps), (tw, td, th, tm) = (CONFIGS[name]["vision"],
                                                           CONFIGS[name]["text"])
    return BlipConfig(
        vision_config=dict(hidden_size=vw, num_hidden_layers=vd, num_attention_heads=vh,
                           intermediate_size=vm, image_size=image, patch_size=patch,
                           layer_norm_eps=eps, initializer_range=0.02),
        text_config=dict(vocab_size=42, hidden_size=tw, num_hidden_layers=td,
                         num_attention_heads=th, intermediate_size=tm, max_position_embeddings=24,
                         pad_token_id=PAD, bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP,
                         label_smoothing=label_smoothing),
        image_text_hidden_size=8)


def randomize(model, seed):
    """Weights far from HF's init (std 0.02, and 1e-10 for the ViT embeddings), so
    every output depends visibly on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            is_norm = name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name
                                                   or "post_layernorm" in name)
            p.copy_(1.0 + 0.2 * noise if is_norm else 0.3 * noise)


def build(cls, name, dtype, tmp_path, seed=0, label_smoothing=0.0, sep_bias=0.0):
    model = cls(hf_config(name, label_smoothing)).to(dtype).eval()
    randomize(model, seed)
    if sep_bias and hasattr(model, "text_decoder"):
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[SEP] += sep_bias
    path = tmp_path / f"{cls.__name__}-{name}-{seed}"
    model.save_pretrained(path)
    return model, path


def batch(name, dtype, seed=0, B=3):
    rng = np.random.default_rng(seed)
    size = CONFIGS[name]["vision"][0]
    pixels = rng.standard_normal((B, 3, size, size)).astype(NP[dtype])
    ids = np.array([[CLS, 5, 6, 7, SEP, PAD], [CLS, 8, SEP, PAD, PAD, PAD],
                    [CLS, 9, 10, 11, 12, SEP]])[:B]
    return pixels, ids, (ids != PAD).astype(np.int64)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------
# BlipForImageTextRetrieval
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_retrieval_itm_and_itc(name, dtype, tmp_path):
    ref, path = build(BlipForImageTextRetrieval, name, dtype, tmp_path)
    model = hf.load_blip_retrieval(path, NP[dtype])
    assert model.param_count() == sum(p.numel() for p in ref.parameters()) + 1  # + temp
    pixels, ids, mask = batch(name, dtype)
    with torch.no_grad():
        itm = torch.softmax(ref(input_ids=t(ids), pixel_values=t(pixels),
                                attention_mask=t(mask)).itm_score, -1).numpy()
        sim = ref(input_ids=t(ids), pixel_values=t(pixels), attention_mask=t(mask),
                  use_itm_head=False).itm_score.numpy()
    embeds, image_feat = model.encode_image(pixels)
    # HF keeps [CLS] first for ITM (salesforce/BLIP writes [ENC] there): enc_id = CLS
    mine_itm = softmax(model.itm_logits(embeds, ids, mask, enc_id=CLS))
    mine_sim = image_feat @ model.encode_text(ids, mask).T  # HF: no temperature
    assert np.abs(mine_itm - itm).max() <= TOL[dtype]
    assert np.abs(mine_sim - sim).max() <= TOL[dtype]
    assert np.ptp(itm[:, 1]) > 1e-3 and np.ptp(sim) > 1e-3  # the outputs are not constant


# ---------------------------------------------------------------------------------------
# BlipForConditionalGeneration
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_captioning_logits_and_loss(name, dtype, tmp_path):
    ref, path = build(BlipForConditionalGeneration, name, dtype, tmp_path, label_smoothing=0.1)
    model = hf.load_blip_captioning(path, NP[dtype])
    assert model.param_count() == sum(p.numel() for p in ref.parameters())
    assert model.cfg.label_smoothing == 0.1  # read from the config
    pixels, ids, mask = batch(name, dtype)
    labels = np.where(mask == 1, ids, -100)  # HF leaves pad -> -100 to the caller
    with torch.no_grad():
        out = ref(pixel_values=t(pixels), input_ids=t(ids), attention_mask=t(mask),
                  labels=t(labels))
    embeds, _ = model.visual_encoder.forward(pixels)
    logits, _ = model.text_decoder.forward(ids, mask, embeds)  # [CLS] first, as HF's forward
    loss, _ = CrossEntropyLoss(label_smoothing=model.cfg.label_smoothing).forward(
        logits[:, :-1], labels[:, 1:])
    assert np.abs(logits - out.logits.numpy()).max() <= TOL[dtype]
    assert abs(loss - out.loss.item()) <= TOL[dtype]


def hf_tokens(sequences):
    """HF generate output (B, L) with the [DEC] prompt -> per row the tokens before [SEP]."""
    rows = []
    for row in sequences.numpy()[:, 1:]:
        end = np.flatnonzero(row == SEP)
        rows.append((row[:end[0]] if end.size else row).tolist())
    return rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens(name, seed, tmp_path):
    # a [SEP] bias makes captions end at different lengths
    ref, path = build(BlipForConditionalGeneration, name, torch.float64, tmp_path, seed,
                      sep_bias=1.5)
    model = hf.load_blip_captioning(path, np.float64)
    pixels, _, _ = batch(name, torch.float64, seed, B=4)
    with torch.no_grad():
        out = ref.generate(pixel_values=t(pixels), num_beams=1, do_sample=False, max_length=12,
                           min_length=3)
    embeds, _ = model.visual_encoder.forward(pixels)
    prompt, sep = hf.caption_token_ids(model)
    mine = generate(model.text_decoder, embeds, prompt, sep_id=sep, method="greedy",
                    max_length=12, min_length=3)
    assert [m.tolist() for m in mine.tokens] == hf_tokens(out)


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_search_tokens_without_early_end(name, num_beams, tmp_path):
    """With [SEP] out of reach every hypothesis runs to max_length, which tests the
    candidate ranking and the cache reordering of beam search."""
    ref, path = build(BlipForConditionalGeneration, name, torch.float64, tmp_path,
                      sep_bias=-1e4)
    model = hf.load_blip_captioning(path, np.float64)
    pixels, _, _ = batch(name, torch.float64, B=3)
    with torch.no_grad():
        out = ref.generate(pixel_values=t(pixels), num_beams=num_beams, do_sample=False,
                           max_length=10, min_length=3)
    embeds, _ = model.visual_encoder.forward(pixels)
    prompt, sep = hf.caption_token_ids(model)
    mine = generate(model.text_decoder, embeds, prompt, sep_id=sep, method="beam",
                    num_beams=num_beams, max_length=10, min_length=3)
    assert [m.tolist() for m in mine.tokens] == hf_tokens(out)


def test_beam_search_tokens_with_early_ends(tmp_path):
    mismatches = 0
    for seed in range(6):
        ref, path = build(BlipForConditionalGeneration, "2x2-layers", torch.float64, tmp_path,
                          seed, sep_bias=1.5)
        model = hf.load_blip_captioning(path, np.float64)
        pixels, _, _ = batch("2x2-layers", torch.float64, seed, B=4)
        with torch.no_grad():
            out = ref.generate(pixel_values=t(pixels), num_beams=3, do_sample=False,
                               max_length=12, min_length=3)
        embeds, _ = model.visual_encoder.forward(pixels)
        prompt, sep = hf.caption_token_ids(model)
        mine = generate(model.text_decoder, embeds, prompt, sep_id=sep, method="beam",
                        num_beams=3, max_length=12, min_length=3)
        mismatches += [m.tolist() for m in mine.tokens] != hf_tokens(out)
    assert mismatches == 0


# ---------------------------------------------------------------------------------------
# minblip -> Hugging Face
# ---------------------------------------------------------------------------------------

def load_twin_module(name="torch_twin"):
    if str(ROOT / "reference") not in sys.path:  # torch_twin_blip2 imports torch_twin
        sys.path.insert(0, str(ROOT / "reference"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "reference" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_minblip_checkpoints_load_in_transformers(tmp_path):
    twin = load_twin_module()
    model, tok = twin.tiny_minblip(3, np.float64)
    hf.save_blip(model, tmp_path / "itr", "retrieval", tokenizer=tok)
    hf.save_blip(model, tmp_path / "cap", "captioning", tokenizer=tok)
    ret = BlipForImageTextRetrieval.from_pretrained(tmp_path / "itr").double().eval()
    cap = BlipForConditionalGeneration.from_pretrained(tmp_path / "cap").double().eval()
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 16, 16))
    ids, mask = tok.encode(["a red circle", "a small blue square left of a triangle"])
    with torch.no_grad():
        itm = ret(input_ids=t(ids), pixel_values=t(pixels), attention_mask=t(mask)).itm_score
        logits = cap(pixel_values=t(pixels), input_ids=t(ids), attention_mask=t(mask)).logits
    embeds, _ = model.encode_image(pixels)
    assert np.abs(model.itm_logits(embeds, ids, mask, tok.cls_id) - itm.numpy()).max() < 1e-8
    mine, _ = model.text_decoder.forward(ids, mask, embeds)
    assert np.abs(mine - logits.numpy()).max() < 1e-8


def test_old_style_checkpoint_with_tied_copies_and_buffers(tmp_path):
    """Hub checkpoints converted from pytorch_model.bin keep the tied LM output weight
    and the position_ids buffer; both load."""
    from safetensors.torch import save_file
    ref, path = build(BlipForConditionalGeneration, "2x2-layers", torch.float64, tmp_path)
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(24)[None]
    assert "text_decoder.cls.predictions.decoder.weight" in state
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    model = hf.load_blip_captioning(path, np.float64)
    assert np.array_equal(model.text_decoder.head.weight.data,
                          ref.text_decoder.bert.embeddings.word_embeddings.weight.detach().numpy())


# ---------------------------------------------------------------------------------------
# safetensors and WordPiece against their reference packages
# ---------------------------------------------------------------------------------------

def test_safetensors_bytes_match_the_reference_writer(tmp_path):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    tensors = {"b.w": rng.standard_normal((3, 4)).astype(np.float32), "a": rng.standard_normal(5),
               "h": rng.standard_normal(2).astype(np.float16), "n": np.arange(7),
               "s": np.array(1.0, np.float32)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    hf.write_safetensors(tmp_path / "mine.safetensors", tensors, metadata={"format": "pt"})
    assert ((tmp_path / "ref.safetensors").read_bytes()
            == (tmp_path / "mine.safetensors").read_bytes())


def test_safetensors_reader_widens_half_precision_like_torch(tmp_path):
    from safetensors.torch import save_file
    x = torch.randn(4, 5, dtype=torch.float64)
    save_file({"bf": x.bfloat16(), "f16": x.half(), "f64": x}, tmp_path / "h.safetensors")
    back = hf.read_safetensors(tmp_path / "h.safetensors")
    assert np.array_equal(back["bf"], x.bfloat16().float().numpy())
    assert np.array_equal(back["f16"], x.half().float().numpy())
    assert np.array_equal(back["f64"], x.numpy())


def test_wordpiece_matches_bert_tokenizer(tmp_path):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    words = ("a the cat dog un ##aff ##able hello world , . ! ? ' s t don ##s ##ing run play "
             "##ed cafe naive resume 你 好 x ##x ##y y z @ # $ - ( ) uber").split()
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(dict.fromkeys(words + letters + ["##" + c for c in letters]))
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    fast, legacy = BertTokenizer(str(path)), BertTokenizerLegacy(str(path))
    mine = WordPieceTokenizer.from_file(path, add_blip_tokens=False)
    mine_legacy = WordPieceTokenizer.from_file(path, add_blip_tokens=False,
                                               legacy_lowercase=True)
    texts = ["Hello, world!", "The cat's playing.", "Unaffable DOGS", "Café naïve résumé",
             "你好世界", "a" * 120, "über Über", "don't stop", "x\x00y\u200bz\tq\nr", "  ", "",
             "hello [SEP] world [CLS]", "hello[SEP]world", "[sep] lower", "$5 @home #tag ~^",
             "e\u0301", "ﬁ ligature", "İstanbul", "straße", "😀 emoji", "\u00a0nbsp\u3000x",
             "ΟΔΟΣ ΣΑΣ Σ", "ΣΑΣ."]  # a word-final capital sigma: where the two tokenizers differ
    rnd = random.Random(0)
    alphabet = "abcdeXYZ .,!?'-éü你\t\n😀$"
    texts += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30))) for _ in range(500)]
    for text in texts:
        assert mine.tokenize(text) == fast.tokenize(text), repr(text)
        assert mine_legacy.tokenize(text) == legacy.tokenize(text), repr(text)
        ids = fast(text)["input_ids"]
        assert mine.encode(text, max_length=512)[0][0].tolist() == ids, repr(text)
        # decoding follows the Python BertTokenizer salesforce/BLIP ran with; the Rust
        # decoder of transformers 5 skips the " ' " clean-up
        assert mine.decode(np.array(ids)) == legacy.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------
# The pretraining step: reference/torch_twin.py
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, sharing, pos_embed_at_output", [
    ("float64", "all_but_self_attention", False), ("float64", "all", False),
    ("float64", "none", False), ("float32", "all_but_self_attention", False),
    ("float64", "all_but_self_attention", True)])
def test_twin_step_matches(dtype, sharing, pos_embed_at_output):
    twin = load_twin_module()
    model, tok = twin.tiny_minblip(0, np.dtype(dtype), sharing,
                                   pos_embed_at_output=pos_embed_at_output)
    rows, info = twin.compare_step(model, tok)
    failed = [(r["name"], r["max_abs"], r["max_ref"]) for r in rows if not twin.passes(r, dtype)]
    assert not failed
    assert info["n_params"] == len({id(p) for p in model.params()}) - sum(
        len(t.params) - 1 for t in hf.hf_tensors(model, "pretraining") if t.tied_to is None)
    names = {r["name"] for r in rows}
    assert {"loss_itc", "loss_itm", "loss_lm", "pixels", "temp"} <= names


def test_twin_comparison_can_fail():
    twin = load_twin_module()
    model, tok = twin.tiny_minblip(0, np.float64)
    other = twin.BLIPConfig(**{**model.cfg.__dict__, "label_smoothing": 0.0})
    rows, _ = twin.compare_step(model, tok, twin_cfg=other)
    failed = {r["name"] for r in rows if not twin.passes(r, "float64")}
    assert "loss_lm" in failed and "text_decoder.cls.predictions.bias" in failed
    assert "loss_itc" not in failed
    shared_all = twin.BLIPConfig(**{**model.cfg.__dict__, "sharing": "all"})
    with pytest.raises(AssertionError, match="shared or absent"):
        twin.compare_step(model, tok, twin_cfg=shared_all)


# ---------------------------------------------------------------------------------------
# BLIP-2: the Q-Former (Blip2QFormerModel)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth, freq, text_input", [(2, 2, False), (3, 1, True)])
def test_qformer_queries(depth, freq, text_input, dtype, tmp_path):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    config = Blip2QFormerConfig(vocab_size=30, hidden_size=16, num_hidden_layers=depth,
                                num_attention_heads=2, intermediate_size=32,
                                encoder_hidden_size=12, cross_attention_frequency=freq,
                                use_qformer_text_input=text_input, max_position_embeddings=16)
    ref = Blip2QFormerModel(config).to(dtype).eval()
    randomize(ref, 1)
    ref.save_pretrained(tmp_path)
    qformer = hf.load_qformer(tmp_path, NP[dtype], num_queries=4)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((1, 4, 16)).astype(NP[dtype])
    image = rng.standard_normal((3, 5, 12)).astype(NP[dtype])
    qformer.query_tokens.data[...] = queries  # HF keeps the queries on the outer model
    with torch.no_grad():
        out = ref(query_embeds=t(np.repeat(queries, 3, axis=0)),
                  encoder_hidden_states=t(image)).last_hidden_state.numpy()
    mine, _ = qformer.forward(image, mode="queries")
    assert np.abs(mine - out).max() <= TOL[dtype]


# ---------------------------------------------------------------------------------------
# BLIP-2 with OPT (Blip2ForConditionalGeneration): shapes the committed fixtures do not
# have (tests/test_hf_blip2.py checks those without torch)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_blip2_opt_without_qkv_bias_and_other_shapes(dtype, tmp_path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from minblip import hf_blip2
    Q, image_token = 3, 45
    config = Blip2Config(
        vision_config=dict(hidden_size=10, intermediate_size=14, num_hidden_layers=2,
                           num_attention_heads=5, image_size=12, patch_size=4, qkv_bias=False,
                           layer_norm_eps=1e-6, initializer_range=0.02),
        qformer_config=dict(vocab_size=20, hidden_size=9, num_hidden_layers=4,
                            num_attention_heads=1, intermediate_size=11,
                            cross_attention_frequency=3, max_position_embeddings=8),
        text_config=dict(model_type="opt", vocab_size=48, hidden_size=12, num_hidden_layers=3,
                         ffn_dim=16, num_attention_heads=4, max_position_embeddings=24,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1,
                         activation_function="gelu"),
        num_query_tokens=Q, image_token_index=image_token)
    ref = Blip2ForConditionalGeneration(config).to(dtype).eval()
    randomize(ref, 4)
    ref.save_pretrained(tmp_path)
    model = hf_blip2.load_blip2(tmp_path, NP[dtype])
    assert model.visual_encoder.blocks[0].attn.query.b is None  # no q, k, v bias
    assert model.param_count(include_frozen=True) == sum(p.numel() for p in ref.parameters())
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 12, 12)).astype(NP[dtype])
    prompt = [2, 7, 30, 11]
    ids = np.array([[image_token] * Q + prompt] * 2)
    with torch.no_grad():
        logits = ref(pixel_values=t(pixels), input_ids=t(ids)).logits.numpy()
    soft = model.soft_prompt(images=pixels)
    mine, _ = model.language_model.forward(np.array([prompt] * 2), prefix_embeds=soft)
    assert np.abs(mine - logits).max() <= TOL[dtype]
    if dtype == torch.float64:
        for beams in (1, 3):
            with torch.no_grad():
                out = ref.generate(pixel_values=t(pixels), input_ids=t(ids), num_beams=beams,
                                   do_sample=False, max_length=Q + len(prompt) + 6)
            got = hf_blip2.blip2_generate(model, pixels, prompt, method="beam" if beams > 1
                                          else "greedy", num_beams=beams,
                                          max_length=len(prompt) + 6, min_length=0)
            for row, mine_ids in zip(out.numpy()[:, Q:].tolist(), got):
                tail = row[len(prompt):]
                want = prompt + (tail[:tail.index(2)] if 2 in tail else tail)
                assert mine_ids.tolist() == want


# ---------------------------------------------------------------------------------------
# BLIP-2 stage 1: reference/torch_twin_blip2.py
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, itg, depth, freq", [
    ("float64", "unilm", 2, 2), ("float64", "cached", 2, 2), ("float64", "cached", 3, 1),
    ("float32", "unilm", 2, 2)])
def test_blip2_twin_step_matches(dtype, itg, depth, freq):
    """Losses and every gradient of minblip's stage-1 step against the twin, whose
    ITG is minblip's one UniLM pass or LAVIS's pass over the cached query keys."""
    twin = load_twin_module("torch_twin_blip2")
    model, tok = twin.tiny_minblip(0, np.dtype(dtype), depth, freq)
    rows, info = twin.compare_step(model, tok, itg=itg)
    failed = [(r["name"], r["max_abs"], r["max_ref"]) for r in rows if not twin.passes(r, dtype)]
    assert not failed
    assert info["n_params"] == len(model.params())
    names = {r["name"] for r in rows}
    assert {"loss_itc", "loss_itm", "loss_itg", "temp", "query_tokens",
            "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"} <= names
    if dtype == "float64":  # the check is tight: far below its 1e-8 tolerance
        rtol, atol = twin.TOLERANCES["float64"]
        assert max(r["rel"] for r in rows if r["max_ref"] > atol) < 1e-12


def test_blip2_twin_training_matches():
    """Four trainer steps: clipping (active: the gradient norms are far above the
    limit of 1), AdamW with weight decay, the warmup and the cosine move every
    parameter alike (all but the three attention key biases, see compare_training)."""
    twin = load_twin_module("torch_twin_blip2")
    model, tok = twin.tiny_minblip(1, np.float64)
    rows = twin.compare_training(model, tok, steps=4, seed=1)
    failed = [(r["name"], r["max_abs"], r["max_ref"]) for r in rows
              if not twin.passes(r, "float64")]
    assert not failed
    assert sum(r["name"].startswith("change ") for r in rows) == len(model.params()) - 3


def test_blip2_twin_decay_rule_matches_minblip():
    twin = load_twin_module("torch_twin_blip2")
    model, _ = twin.tiny_minblip(0, np.float64)
    from minblip.optim import decay_mask
    decays = {id(p): decay_mask(model)[n] for n, p in model.named_params()}
    minblip_decay = {name for name, p, _ in twin.lavis_params(model) if decays[id(p)]}
    t = twin.twin_of(model)
    ids = {id(p) for p in twin.decay_groups(t, 0.05)[0]["params"]}
    assert {name for name, p in t.named_parameters() if id(p) in ids} == minblip_decay


def test_blip2_twin_comparison_can_fail():
    twin = load_twin_module("torch_twin_blip2")
    model, tok = twin.tiny_minblip(0, np.float64)
    other = twin.Blip2Config(**{**model.cfg.__dict__, "label_smoothing": 0.0})
    rows, _ = twin.compare_step(model, tok, twin_cfg=other)
    failed = {r["name"] for r in rows if not twin.passes(r, "float64")}
    assert {"loss_itc", "loss_itg", "temp", "Qformer.cls.predictions.bias"} <= failed
    assert "loss_itm" not in failed


# ---------------------------------------------------------------------------------------
# BLIP-2's encoder-decoder language model: minblip.t5 against T5ForConditionalGeneration
# ---------------------------------------------------------------------------------------

def _rms_norm_in_own_dtype(norm):
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                              + norm.variance_epsilon))
    return forward


def t5_pair(dtype, depth=2, heads=2, seed=0):
    """A tiny FlanT5-layout HF model (gated GELU, untied head, as LAVIS configures it)
    and minblip's EncoderDecoderLM holding the same weights."""
    from transformers import T5Config as HFT5Config
    from transformers import T5ForConditionalGeneration

    from minblip.t5 import EncoderDecoderLM, T5Config
    config = HFT5Config(vocab_size=17, d_model=12, d_kv=12 // heads, d_ff=20, num_layers=depth,
                        num_decoder_layers=depth, num_heads=heads,
                        relative_attention_num_buckets=8, relative_attention_max_distance=10,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        dropout_rate=0.0, pad_token_id=0, eos_token_id=3,
                        decoder_start_token_id=0)
    config.dense_act_fn = "gelu"  # blip2_t5.py overrides FlanT5's gelu_new
    torch.manual_seed(seed)
    ref = T5ForConditionalGeneration(config).to(dtype).eval()
    for module in ref.modules():  # HF's T5LayerNorm takes the variance in float32 even in a
        if type(module).__name__ == "T5LayerNorm":  # float64 model: take it in the model's
            module.forward = _rms_norm_in_own_dtype(module)  # dtype, as minblip does
    randomize(ref, seed)
    mine = EncoderDecoderLM(T5Config(vocab_size=17, width=12, depth=depth, heads=heads,
                                     mlp_dim=20, num_buckets=8, max_distance=10),
                            np.random.default_rng(0)).to(NP[dtype])
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    mine.shared.weight.data[...] = sd["shared.weight"]
    mine.lm_head.W.data[...] = sd["lm_head.weight"].T
    for stack in ("encoder", "decoder"):
        ours = getattr(mine, stack)
        ours.relative_attention_bias.table.weight.data[...] = \
            sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        ours.final_norm.weight.data[...] = sd[f"{stack}.final_layer_norm.weight"]
        for i, block in enumerate(ours.blocks):
            pre = f"{stack}.block.{i}.layer."
            sub = [("self_attn", "0.SelfAttention", "0.layer_norm")]
            if stack == "decoder":
                sub.append(("cross_attn", "1.EncDecAttention", "1.layer_norm"))
            ff = "2" if stack == "decoder" else "1"
            for name, attn, norm in sub:
                getattr(block, f"{name}_norm").weight.data[...] = sd[pre + norm + ".weight"]
                for w in "qkvo":
                    getattr(getattr(block, name), w).W.data[...] = sd[f"{pre}{attn}.{w}.weight"].T
            block.ffn_norm.weight.data[...] = sd[f"{pre}{ff}.layer_norm.weight"]
            for w in ("wi_0", "wi_1", "wo"):
                getattr(block.ffn, w).W.data[...] = sd[f"{pre}{ff}.DenseReluDense.{w}.weight"].T
    return ref, mine


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth, heads", [(2, 2), (1, 3)])
def test_t5_logits_loss_and_soft_prompt_gradient(dtype, depth, heads):
    """Blip2T5.forward's call: inputs_embeds = [soft prompt | shared(ids)], padded
    encoder text, labels with -100; the logits, the loss and the gradient of the
    soft prompt through the whole (frozen) model."""
    from minblip.t5 import seq2seq_step
    ref, mine = t5_pair(dtype, depth, heads)
    rng = np.random.default_rng(1)
    prefix = rng.standard_normal((2, 3, 12)).astype(NP[dtype])
    ids = np.array([[5, 6, 7, 3, 0, 0], [8, 9, 10, 11, 12, 3]])  # encoder text, padded
    mask = (ids != 0).astype(np.int64)
    labels = np.array([[13, 14, 3, -100], [15, 3, -100, -100]])
    inputs = t(prefix).requires_grad_(True)
    embeds = torch.cat([inputs, ref.shared(t(ids))], dim=1)
    att = torch.cat([torch.ones(2, 3, dtype=torch.long), t(mask)], dim=1)
    out = ref(inputs_embeds=embeds, attention_mask=att, labels=t(labels))
    out.loss.backward()
    mine.freeze()
    loss, d_prefix = seq2seq_step(mine, ids, mask, labels, prefix)
    assert abs(loss - out.loss.item()) <= TOL[dtype]
    assert np.abs(d_prefix - inputs.grad.numpy()).max() <= TOL[dtype]
    from minblip.t5 import shift_right
    logits, _ = mine.forward(ids, mask, shift_right(labels), None, prefix)
    assert np.abs(logits - out.logits.detach().numpy()).max() <= TOL[dtype]


def test_t5_greedy_tokens_match_generate():
    from minblip.t5 import EncoderDecoderCaptioner
    ref, mine = t5_pair(torch.float64, seed=2)
    rng = np.random.default_rng(3)
    prefix = rng.standard_normal((3, 4, 12))
    with torch.no_grad():
        hf_ids = ref.generate(inputs_embeds=t(prefix), attention_mask=torch.ones(3, 4,
                                                                                 dtype=torch.long),
                              max_new_tokens=7, num_beams=1, do_sample=False, min_length=1)
    memory, _, _ = mine.encode(prefix_embeds=prefix)
    out = generate(EncoderDecoderCaptioner(mine), memory, np.array([0]), sep_id=3,
                   method="greedy", max_length=8, min_length=1)
    assert hf_tokens(hf_ids) == [x.tolist() for x in out.tokens]
