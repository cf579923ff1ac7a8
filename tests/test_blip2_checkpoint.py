"""BLIP-2 checkpoints (the whole model, frozen parts included) and the command line
that uses them: round trips bit for bit, refusals before anything is built, the
gradient of a loaded model, ``caption`` and ``ask``."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minblip import blip2_checkpoint, gradcheck
from minblip.__main__ import main
from minblip.blip2_checkpoint import is_blip2_checkpoint, load_blip2, save_blip2
from minblip.blip2_stage2 import Blip2Stage2, stage2_prefix_step, stage2_step
from minblip.checkpoint import read_header, save_checkpoint
from minblip.evaluate_blip2 import answer_questions, stage2_captions
from minblip.layers import LayerNorm
from minblip.lm import LanguageModel, LMConfig
from minblip.qformer import QFormer, QFormerConfig
from minblip.questions import build_lm_tokenizer
from minblip.t5 import EncoderDecoderLM, T5Config
from minblip.vit import ViTConfig, VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [str(ROOT / "data_samples" / "world_sample" / f"00000{i}.png") for i in range(2)]


def tiny_blip2(kind: str, seed: int = 0) -> Blip2Stage2:
    """A tiny random BLIP-2 with the LM tokenizer's vocabulary, weights far from init."""
    rng = np.random.default_rng(seed)
    V = build_lm_tokenizer().vocab_size
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, width=12, depth=1, heads=2,
                                      mlp_dim=16), rng)
    qformer = QFormer(QFormerConfig(vocab_size=V, width=16, depth=2, heads=2, mlp_dim=24,
                                    num_queries=3, encoder_width=12), rng)
    if kind == "opt":
        lm = LanguageModel(LMConfig(vocab_size=V, width=10, depth=1, heads=2, mlp_dim=12,
                                    max_positions=40), rng)
    else:
        lm = EncoderDecoderLM(T5Config(vocab_size=V, width=10, depth=1, heads=2, mlp_dim=12,
                                       num_buckets=8, max_distance=10, max_positions=40), rng)
    model = Blip2Stage2(vit, LayerNorm(12), qformer, lm, rng)
    for name, p in model.named_params(include_frozen=True):
        p.data[...] = rng.normal(0.0, 0.3, p.shape) + (1.0 if p.data.ndim == 1 and
                                                       not name.endswith(".b") else 0.0)
    return model


@pytest.fixture(params=["opt", "t5"])
def saved(request, tmp_path):
    model = tiny_blip2(request.param)
    path = tmp_path / f"blip2_{request.param}.npz"
    save_blip2(path, model, build_lm_tokenizer(), extra={"note": "tiny"})
    return request.param, model, path


def test_round_trip_is_bit_identical(saved):
    kind, model, path = saved
    loaded, tok, info = load_blip2(path)
    before = model.named_params(include_frozen=True)
    after = loaded.named_params(include_frozen=True)
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, p), (_, q) in zip(before, after):
        assert p.data.dtype == q.data.dtype and np.array_equal(p.data, q.data), name
    # the same parts are frozen and trainable as in the model that was saved
    assert [n for n, _ in loaded.named_params()] == [n for n, _ in model.named_params()]
    assert loaded.visual_encoder.frozen and loaded.language_model.frozen
    assert tok.words == build_lm_tokenizer().words
    assert info["extra"] == {"note": "tiny"} and info["config"]["language_model"]["type"] == kind
    assert is_blip2_checkpoint(path)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    assert stage2_captions(loaded, tok, pixels, num_beams=2, max_length=6) == \
        stage2_captions(model, tok, pixels, num_beams=2, max_length=6)
    np.testing.assert_array_equal(
        np.array([p for r in answer_questions(loaded, tok, pixels, ["how many objects"] * 2)
                  for _, p in r]),
        np.array([p for r in answer_questions(model, tok, pixels, ["how many objects"] * 2)
                  for _, p in r]))


def test_a_loaded_model_trains_with_the_same_checked_gradients(saved):
    """The stage-2 loss of the loaded model in float64: finite differences agree
    with its backward, and every gradient equals the saved model's bit for bit."""
    kind, model, path = saved
    loaded, tok, _ = load_blip2(path)
    model.to(np.float64)
    loaded.to(np.float64)
    rng = np.random.default_rng(2)
    pixels = rng.normal(size=(2, 3, 16, 16))
    if kind == "opt":
        ids, mask = tok.encode(["a red circle", "a big blue square on the left"])

        def step(m, backward=True):
            return stage2_step(m, pixels, ids, mask, backward=backward).loss
    else:
        from minblip.questions import encode_seq2seq
        enc_ids, enc_mask, labels = encode_seq2seq(tok, ["a red", "a big blue"],
                                                   ["circle", "square on the left"])

        def step(m, backward=True):
            return stage2_prefix_step(m, pixels, enc_ids, enc_mask, labels,
                                      backward=backward).loss
    report = gradcheck(lambda backward: step(loaded, backward), loaded, n_coords=3)
    assert report.passed
    model.zero_grad()
    loaded.zero_grad()
    step(model)
    step(loaded)
    for (name, p), (_, q) in zip(model.named_params(), loaded.named_params()):
        assert np.array_equal(p.grad, q.grad), name
    assert not any(p.grad.any() for p in loaded.params(include_frozen=True) if p.frozen)


# ---------------------------------------------------------------------------------------
# Refusals, each before anything large is built
# ---------------------------------------------------------------------------------------

@pytest.fixture
def no_building(monkeypatch):
    """Fails the test if a model is built: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the file was checked")
    monkeypatch.setattr(blip2_checkpoint, "VisionTransformer", refuse)
    monkeypatch.setattr(blip2_checkpoint, "Blip2Stage2", refuse)


def test_truncated_file_is_refused_by_name(saved, tmp_path, no_building):
    _, _, path = saved
    cut = tmp_path / "cut.npz"
    data = path.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz.*(truncated|corrupt)"):
        load_blip2(cut)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_blip2(tmp_path / "missing.npz")


def _rewrite(path, out, change_config=None, replace=None):
    """A copy of the archive at ``path`` with its configuration changed and/or some
    members' bytes replaced (name -> bytes), written as np.savez writes."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.npy" and change_config is not None:
                from io import BytesIO
                cfg = json.loads(str(np.load(BytesIO(data))))
                change_config(cfg)
                buf = BytesIO()
                np.save(buf, np.array(json.dumps(cfg, sort_keys=True)))
                data = buf.getvalue()
            if replace and info.filename in replace:
                data = replace[info.filename]
            dst.writestr(info.filename, data)


def test_config_that_does_not_fit_the_arrays_is_refused(saved, tmp_path, no_building):
    kind, _, path = saved

    def more_queries(cfg):
        cfg["qformer"]["num_queries"] = 5

    bad = tmp_path / "queries.npz"
    _rewrite(path, bad, more_queries)
    with pytest.raises(ValueError, match=r"do not fit.*query_tokens.*\(1, 5, 16\).*\(1, 3, 16\)"):
        load_blip2(bad)

    def deeper(cfg):
        cfg["language_model"]["config"]["depth"] = 2

    bad = tmp_path / "depth.npz"
    _rewrite(path, bad, deeper)
    with pytest.raises(ValueError, match="do not fit.*language_model"):
        load_blip2(bad)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["vision"].update(width=10 ** 7), "exceed the limit"),
    (lambda c: c["language_model"].update(type="gpt"), "language_model.type"),
    (lambda c: c.update(format="minblip-blip3"), "not a BLIP-2 checkpoint"),
    (lambda c: c["qformer"].update(heads=3), "invalid.*heads"),
    (lambda c: c.update(tokenizer_words=["red"]), "tokenizer words"),
])
def test_invalid_or_oversized_configuration_is_refused(saved, tmp_path, no_building, change,
                                                       message):
    _, _, path = saved
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, change)
    with pytest.raises(ValueError, match=message):
        load_blip2(bad)


def test_forged_array_header_is_refused(saved, tmp_path, no_building):
    """An array whose header announces more values than the file holds."""
    _, _, path = saved
    from io import BytesIO
    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (100000, 100000)})
    forged = buf.getvalue() + b"\0" * 64
    bad = tmp_path / "forged.npz"
    _rewrite(path, bad, replace={"param/ln_vision.gamma.npy": forged})
    with pytest.raises(ValueError, match="ln_vision.gamma.*header says shape"):
        read_header(bad)
    with pytest.raises(ValueError, match="header says shape"):
        load_blip2(bad)


def test_a_blip_checkpoint_is_not_a_blip2(tmp_path):
    from minblip.train import TrainConfig, blip_trainer
    trainer = blip_trainer(TrainConfig(n_train=8, n_val=0, n_test=2, width=8, depth=1, heads=2,
                                       embed_dim=4, batch_size=4, steps=1, warmup_steps=0))
    trainer.save(tmp_path / "blip.npz")
    assert not is_blip2_checkpoint(tmp_path / "blip.npz")
    with pytest.raises(ValueError, match="not a BLIP-2 checkpoint"):
        load_blip2(tmp_path / "blip.npz")
    save_checkpoint(tmp_path / "other.npz", tiny_blip2("opt"), {"format": "x"}, 0)
    with pytest.raises(ValueError, match="not a BLIP-2"):
        load_blip2(tmp_path / "other.npz")


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

def test_caption_and_ask_from_the_command_line(saved, capsys):
    kind, model, path = saved
    assert main(["caption", *IMAGES, "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == IMAGES
    assert main(["ask", *IMAGES, "what colour is the circle?", "--checkpoint", str(path)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert "BLIP-2 with a" in lines[0] and ("decoder-only" if kind == "opt" else
                                           "encoder-decoder") in lines[0]
    tok = build_lm_tokenizer()
    for image, line in zip(IMAGES, lines[1:]):
        assert line.startswith(f"{image}: ")
        assert line.split()[1] in tok.tokens and "p 0." in line
    assert main(["ask", IMAGES[0], "what hue is the gizmo", "--checkpoint", str(path)]) == 0
    assert "gizmo, hue not in the model's vocabulary" in capsys.readouterr().err


def test_ask_refuses_what_it_cannot_use(tmp_path, capsys):
    from minblip.train import TrainConfig, blip_trainer
    trainer = blip_trainer(TrainConfig(n_train=8, n_val=0, n_test=2, width=8, depth=1, heads=2,
                                       embed_dim=4, batch_size=4, steps=1, warmup_steps=0))
    trainer.save(tmp_path / "blip.npz")
    assert main(["ask", IMAGES[0], "how many objects", "--checkpoint",
                 str(tmp_path / "blip.npz")]) == 2
    err = capsys.readouterr().err
    assert "needs a BLIP-2 checkpoint" in err and "Traceback" not in err
    assert main(["ask", IMAGES[0], "how many", "--checkpoint", str(tmp_path / "none.npz")]) == 2
    assert "none.npz" in capsys.readouterr().err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really")
    assert main(["caption", IMAGES[0], "--checkpoint", str(junk)]) == 2
    assert "junk.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ask", IMAGES[0], "how many"])  # --checkpoint is required
