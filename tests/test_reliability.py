"""Where users and files meet the program: a diverged run never reaches a weight or a
checkpoint, loaders check a stored configuration before building anything, images are
decoded with the right scaling or refused in one line, and the command line turns every
file-system error into one line and a non-zero exit.

Each row of the tables below is one bad input or fault, with the words its message must
contain; every command-line row also checks that nothing printed is a traceback.
"""
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minblip.__main__ import main
from minblip.blip import pretrain_step
from minblip.blip2_stage1 import Blip2Config, Blip2Stage1, stage1_step
from minblip.blip2_stage2 import Blip2Stage2, stage2_step
from minblip.checkpoint import load_checkpoint, read_header, save_checkpoint
from minblip.demo import demo_config
from minblip.evaluate import caption_images
from minblip.evaluate_blip2 import generate_text
from minblip.generation import generate
from minblip.image import denormalize, preprocess
from minblip.layers import LayerNorm
from minblip.lm import LanguageModel, LMConfig, lm_step
from minblip.objectives import causal_lm_targets
from minblip.qformer import QFormer, QFormerConfig
from minblip.questions import build_lm_tokenizer
from minblip.train import (Trainer, TrainConfig, TrainingDiverged, blip_trainer, load_model,
                           resume_blip, stored_train_config)
from minblip.vit import ViTConfig, VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--batch-size", "4", "--n-train", "8", "--n-test", "4", "--width", "16", "--depth", "1",
        "--quiet"]
TINY_CONFIG = dict(batch_size=4, n_train=8, n_val=2, n_test=4, width=16, depth=1, heads=2,
                   steps=3, warmup_steps=0)


def cli(capsys, *argv):
    """Run the command line; returns (exit code, stdout, stderr). Whatever fails, it
    fails in one line that starts with "error:" (or argparse's usage), never a traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse: usage and one error line
        code = stop.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code not in (0, None):
        lines = [line for line in err.splitlines() if line.startswith(("error:", "python -m"))]
        assert len(lines) == 1, err
    return code, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-step run: its folder holds checkpoint.npz."""
    folder = tmp_path_factory.mktemp("run")
    trainer = blip_trainer(TrainConfig(**TINY_CONFIG))
    trainer.run(progress=False, checkpoint_path=folder / "checkpoint.npz")
    return folder


def arrays_of(path) -> dict:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def edited_checkpoint(source, target, options=None, **arrays):
    """A copy of the checkpoint ``source`` at ``target`` with some config options and
    arrays replaced, as a damaged or forged file would be."""
    data = arrays_of(source)
    if options:
        data["config"] = np.array(json.dumps({**json.loads(str(data["config"])), **options}))
    data.update(arrays)
    np.savez(target, **data)
    return target


def png(path, array) -> Path:
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------------------
# 1. A diverged run is stopped before the optimiser and never saved
# ---------------------------------------------------------------------------------------

def test_lr_1e30_exits_non_zero_and_leaves_no_nan_checkpoint(tmp_path, capsys):
    out = tmp_path / "R"
    code, _, err = cli(capsys, "train", "--out", out, "--steps", 5, "--lr", "1e30", *TINY)
    assert code == 3
    assert "training diverged at step 1 of 5" in err and "no checkpoint was written" in err
    assert os.listdir(out) == []
    # saving every step, the last good checkpoint is named, and it is finite
    code, _, err = cli(capsys, "train", "--out", out, "--steps", 5, "--lr", "1e30",
                       "--save-every", 1, *TINY)
    assert code == 3
    assert f"the last good checkpoint is {out / 'checkpoint.npz'} (step 1)" in err
    assert os.listdir(out) == ["checkpoint.npz"]
    model, _, _ = load_model(out / "checkpoint.npz")  # refuses NaN: these weights are finite
    assert all(np.isfinite(p.data).all() for p in model.params())


class NaNAt:
    """A task whose step ``bad`` gives a NaN loss (or an inf gradient)."""

    name = "nan"

    def __init__(self, bad: int, where: str):
        self.config = TrainConfig(**TINY_CONFIG, lr=0.1)
        self.model = LayerNorm(4)
        self.bad, self.where, self.calls = bad, where, 0

    def generators(self):
        return np.random.default_rng(0), np.random.default_rng(1)

    def sample_batch(self, rng):
        return rng.standard_normal((2, 4)).astype(np.float32)

    def step(self, batch, rng):
        self.calls += 1
        y, cache = self.model.forward(batch)
        loss = float((y ** 2).sum())
        dy = 2 * y
        if self.calls - 1 == self.bad:
            if self.where == "loss":
                loss = float("nan")
            else:
                dy[0, 0] = np.inf
        self.model.backward(dy, cache)
        return {"loss": loss}


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_changes_no_weight_and_no_optimiser_state(tmp_path, where):
    trainer = Trainer(NaNAt(bad=2, where=where))
    trainer.run(until=2, progress=False, checkpoint_path=tmp_path / "c.npz")
    weights = [p.data.copy() for p in trainer.model.params()]
    moments = {k: v.copy() for k, v in trainer.optimizer.state_dict().items()}
    with pytest.raises(TrainingDiverged) as info:
        trainer.run(progress=False, checkpoint_path=tmp_path / "c.npz")
    assert info.value.step == 2 and info.value.checkpoint == (tmp_path / "c.npz", 2)
    named = "the loss 'loss' is nan" if where == "loss" else "the gradient norm is inf"
    assert named in str(info.value) and "last good checkpoint" in str(info.value)
    for before, p in zip(weights, trainer.model.params()):
        np.testing.assert_array_equal(before, p.data)
    for key, value in trainer.optimizer.state_dict().items():
        np.testing.assert_array_equal(moments[key], value, err_msg=key)
    assert trainer.step == 2 and len(trainer.history) == 2
    assert read_header(tmp_path / "c.npz")["step"] == 2


def test_the_divergence_error_crosses_process_boundaries():
    # CapFilt trains in worker processes, which send an error back pickled
    error = TrainingDiverged(4, 10, {"lm": float("inf")}, (Path("r/checkpoint.npz"), 3))
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.checkpoint == error.checkpoint


def test_a_checkpoint_is_never_written_from_nan_weights(tmp_path, run):
    model, _, cfg = load_model(run / "checkpoint.npz")
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"the last good checkpoint")
    model.vision_proj.W.data[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"not writing the checkpoint .*step 7.*NaN or inf in "
                                         r"vision_proj.W \(1 of 512 values\).*unchanged"):
        save_checkpoint(target, model, cfg.to_dict(), 7)
    assert target.read_bytes() == b"the last good checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


@pytest.mark.parametrize("command", ["eval", "caption", "resume"])
def test_nan_weights_are_refused_by_name(tmp_path, run, capsys, command):
    W = arrays_of(run / "checkpoint.npz")["param/text_proj.W"].copy()
    W[1, :3] = [np.nan, np.inf, -np.inf]
    bad = edited_checkpoint(run / "checkpoint.npz", tmp_path / "checkpoint.npz",
                            **{"param/text_proj.W": W})
    argv = {"eval": ["eval", "--checkpoint", bad],
            "caption": ["caption", ROOT / "data_samples/photos/grace_hopper.jpg",
                        "--checkpoint", bad],
            "resume": ["train", "--out", tmp_path, "--resume", "--quiet"]}[command]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert f"{bad}: NaN or inf in text_proj.W (3 of 512 values)" in err


# ---------------------------------------------------------------------------------------
# NaN or inf inputs are refused at the public entry points
# ---------------------------------------------------------------------------------------

def _blip_batch():
    trainer = blip_trainer(TrainConfig(**TINY_CONFIG))
    images, ids, mask = trainer.task.sample_batch(np.random.default_rng(0))
    return trainer, images, ids, mask


def _poisoned(x, value):
    x = x.copy()
    x.flat[5] = value
    return x


def _stage1():
    vision = ViTConfig(image_size=8, patch_size=4, width=6, depth=1, heads=2, mlp_dim=12)
    q = QFormerConfig(vocab_size=20, width=8, depth=1, heads=2, mlp_dim=12, num_queries=2,
                      encoder_width=6, max_positions=8)
    return Blip2Stage1(Blip2Config(qformer=q, vision=vision, embed_dim=4),
                       np.random.default_rng(0))


def _stage2():
    rng = np.random.default_rng(0)
    vit = VisionTransformer(ViTConfig(image_size=8, patch_size=4, width=6, depth=1, heads=2,
                                      mlp_dim=8), rng)
    lm = LanguageModel(LMConfig(vocab_size=11, width=10, depth=1, heads=2, mlp_dim=12,
                                max_positions=12), rng)
    q = QFormerConfig(vocab_size=10, width=8, depth=1, heads=2, mlp_dim=12, num_queries=2,
                      encoder_width=6)
    return Blip2Stage2(vit, LayerNorm(6), QFormer(q, rng), lm, rng)


def _pretrain(value):
    trainer, images, ids, mask = _blip_batch()
    tok = trainer.task.tokenizer
    pretrain_step(trainer.model, _poisoned(images, value), ids, mask, cls_id=tok.cls_id,
                  enc_id=tok.enc_id, dec_id=tok.dec_id, rng=np.random.default_rng(0))


def _stage1_images(value):
    ids, mask = np.ones((2, 5), int), np.ones((2, 5), int)
    images = _poisoned(np.zeros((2, 3, 8, 8), np.float32), value)
    stage1_step(_stage1(), images, ids, mask, dec_id=1, rng=np.random.default_rng(0))


def _stage1_features(value):
    ids, mask = np.ones((2, 5), int), np.ones((2, 5), int)
    feats = _poisoned(np.zeros((2, 5, 6), np.float32), value)
    stage1_step(_stage1(), None, ids, mask, image_features=feats, dec_id=1,
                rng=np.random.default_rng(0))


def _stage2_images(value):
    ids, mask = np.ones((2, 4), int), np.ones((2, 4), int)
    stage2_step(_stage2(), _poisoned(np.zeros((2, 3, 8, 8)), value), ids, mask)


def _stage2_features(value):
    ids, mask = np.ones((2, 4), int), np.ones((2, 4), int)
    stage2_step(_stage2(), None, ids, mask, image_embeds=_poisoned(np.zeros((2, 5, 6)), value))


def _caption(value):
    trainer, images, _, _ = _blip_batch()
    caption_images(trainer.model, trainer.task.tokenizer, _poisoned(images, value))


def _generate(value):
    trainer, images, _, _ = _blip_batch()
    embeds, _ = trainer.model.encode_image(images)
    generate(trainer.model.text_decoder, _poisoned(embeds, value), np.array([1]), sep_id=2)


NAN_INPUTS = {"pretrain_step images": (_pretrain, "images"),
              "stage1_step images": (_stage1_images, "images"),
              "stage1_step image_features": (_stage1_features, "image_features"),
              "stage2_step images": (_stage2_images, "images"),
              "stage2_step image_embeds": (_stage2_features, "image_embeds"),
              "caption_images pixels": (_caption, "caption_images: pixels"),
              "generate image_embeds": (_generate, r"generate: image_embeds \(NaN or inf pixels or "
                                                         r"weights upstream\)")}


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("entry", NAN_INPUTS, ids=NAN_INPUTS.keys())
def test_nan_and_inf_inputs_are_refused_at_the_entry_points(entry, value):
    call, name = NAN_INPUTS[entry]
    with pytest.raises(ValueError, match=rf"{name}: expected finite values, got 1 NaN or inf "
                                         rf"of \d+ \(the first at index \(0, .*\): {value}\)"):
        call(value)


# ---------------------------------------------------------------------------------------
# 2. A stored configuration is checked before anything is built from it
# ---------------------------------------------------------------------------------------

def _fails_fast(call, match):
    """``call`` raises a ValueError matching ``match`` within a second, having
    allocated less than 100 MB at its peak."""
    tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(ValueError, match=match):
            call()
        seconds = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1.0 and peak < 100e6, (seconds, peak)


@pytest.mark.parametrize("load", [load_model, resume_blip], ids=["load_model", "resume_blip"])
def test_a_config_of_width_1e6_fails_in_milliseconds_and_megabytes(tmp_path, run, load):
    forged = edited_checkpoint(run / "checkpoint.npz", tmp_path / "c.npz",
                               options={"width": 10 ** 6})
    _fails_fast(lambda: load(forged),
                r"c.npz: its stored configuration \(width 1000000, depth 1, ...\) does not fit "
                r"its weights: visual_encoder.patch_embed.proj.W should be \(192, 1000000\), "
                r"the file holds \(192, 16\)")


def _forged_header_archive(source, target, key, shape):
    """``source``'s arrays, with ``key`` replaced by a bare .npy header that claims
    ``shape`` (float32) and stores no data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(target, "w") as out, zipfile.ZipFile(source) as src:
        for info in src.infolist():
            data = header.getvalue() if info.filename == key + ".npy" else src.read(info)
            out.writestr(info.filename, data)
    return target


@pytest.mark.parametrize("reader", ["load_model", "read_header", "load_checkpoint"])
def test_an_array_header_bigger_than_its_bytes_is_refused_before_reading(tmp_path, run, reader):
    forged = _forged_header_archive(run / "checkpoint.npz", tmp_path / "c.npz",
                                    "param/vision_proj.W", (2 ** 32, 2 ** 32))
    model = load_model(run / "checkpoint.npz")[0]
    read = {"load_model": load_model, "read_header": read_header,
            "load_checkpoint": lambda path: load_checkpoint(path, model)}[reader]
    _fails_fast(lambda: read(forged),
                r"c.npz: array 'param/vision_proj.W': its header says shape \(4294967296, "
                r"4294967296\) float32 \(73,786,976,294,838,206,464 bytes\), the archive "
                r"stores 0 bytes")


@pytest.mark.parametrize("config, message", [
    ({"lr": "tiny"}, r"training option 'lr': expected a finite number, got 'tiny'"),
    ({"width": 16.5}, r"training option 'width': expected an integer, got 16.5"),
    ({"loss_weights": ["a", 1, 1]}, r"option 'loss_weights': expected a list, got \['a', 1, 1\]"),
    ({"sharing": 3}, r"training option 'sharing': expected text, got 3"),
    ({"depth": -1}, r"TrainConfig.depth: expected a positive int, got -1"),
    ({"colour": "red"}, r"unknown training options \['colour'\]"),
    ({"n_train": 10 ** 9}, r"asks for a world of 1,000,000,006 images of 32x32 .* more than"),
], ids=["lr text", "width float", "weights text", "sharing int", "depth negative",
        "unknown key", "world of 1e9 images"])
def test_a_broken_stored_config_names_the_file_and_the_key(tmp_path, run, config, message):
    broken = edited_checkpoint(run / "checkpoint.npz", tmp_path / "broken.npz", options=config)
    _fails_fast(lambda: stored_train_config(broken), rf"broken.npz: .*{message}")


@pytest.mark.parametrize("stored, message", [
    (np.array("not json {"), r"its stored config is not valid JSON"),
    (np.array("[1, 2]"), r"its stored config must be a JSON object of options, got list"),
    (np.array("x" * (1 << 19)), r"its stored config is 2,097,152 bytes, more than any"),
], ids=["not JSON", "a list", "2 MB"])
def test_a_stored_config_that_is_no_config(tmp_path, run, capsys, stored, message):
    broken = edited_checkpoint(run / "checkpoint.npz", tmp_path / "broken.npz",
                               **{"config": stored})
    with pytest.raises(ValueError, match=rf"broken.npz: {message}"):
        read_header(broken)
    code, _, err = cli(capsys, "eval", "--checkpoint", broken)
    assert code == 2 and "broken.npz" in err


# ---------------------------------------------------------------------------------------
# 3. Images: the right scaling, or one line
# ---------------------------------------------------------------------------------------

GREY = round(30000 * 255 / 65535)  # 117: the 8-bit grey of 30000 in 16 bits


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_grey_round_trip(tmp_path, suffix):
    path = png(tmp_path / f"grey.{suffix}", np.full((8, 8), 30000, np.uint16))
    assert Image.open(path).mode.startswith("I;16")
    assert np.asarray(Image.open(path).convert("RGB")).max() == 255  # pillow's own: white
    x = preprocess(path, 8)
    assert (denormalize(x) == GREY).all()
    np.testing.assert_array_equal(x, preprocess(np.full((8, 8, 3), GREY, np.uint8), 8))


def _png_rgb16(path, rgb16):
    """A 48-bit RGB PNG written by hand (pillow cannot write one)."""
    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                           0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("image, grey", [
    (lambda tmp: Image.new("I;16B", (4, 4), 30000), GREY),
    (lambda tmp: Image.fromarray(np.full((4, 4), 30000, np.int32)), GREY),  # mode I, 16-bit
    (lambda tmp: Image.fromarray(np.full((4, 4), 0.5, np.float32)), 128),   # mode F in [0, 1]
    (lambda tmp: _png_rgb16(tmp / "rgb48.png", np.full((4, 4, 3), 30000, np.uint16)),
     30000 >> 8),
    (lambda tmp: Image.new("La", (4, 4), (200, 255)), 200),
], ids=["I;16B", "I", "F", "48-bit RGB PNG", "La"])
def test_other_high_depth_modes_are_scaled(tmp_path, image, grey):
    # pillow reads a 48-bit PNG by the high byte of each value (30000 >> 8 = 117)
    got = denormalize(preprocess([image(tmp_path)], 4))
    assert (got == grey).all(), np.unique(got)


@pytest.mark.parametrize("image, message", [
    (Image.fromarray(np.full((2, 2), 2.0, np.float32)), r"mode-F image with values in \[2, 2\]"),
    (Image.fromarray(np.full((2, 2), -3, np.int32)), r"mode-I image with values in \[-3, -3\]"),
    (Image.new("RGB", (0, 0)), r"has no pixels \(0x0\)"),
    (np.zeros((0, 4, 3), np.uint8), r"has no pixels \(4x0\)"),
], ids=["F beyond 1", "I negative", "0x0 image", "0-row array"])
def test_images_with_no_known_scale_or_no_pixels_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        preprocess([image], 8)


@pytest.mark.parametrize("pixels", [300, 150], ids=["over twice the limit", "over the limit"])
def test_decompression_bombs_are_one_line(tmp_path, capsys, monkeypatch, run, pixels):
    path = png(tmp_path / "bomb.png", np.zeros((pixels, 1), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # pillow warns above it, fails at 2x
    with pytest.raises(ValueError, match=r"bomb.png' is too large to decode safely"):
        preprocess(path, 8)
    code, _, err = cli(capsys, "caption", path, "--checkpoint", run / "checkpoint.npz")
    assert code == 2 and "bomb.png' is too large to decode safely" in err


def _truncated_png(tmp_path):
    data = png(tmp_path / "t.png", np.zeros((64, 64, 3), np.uint8) + 7).read_bytes()
    (tmp_path / "t.png").write_bytes(data[:len(data) // 2])
    return tmp_path / "t.png"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: (tmp / "notes.png").write_text("hello") and tmp / "notes.png",
     r"cannot read '.*notes.png' as an image"),
    (_truncated_png, r"cannot read '.*t.png' as an image"),
    (lambda tmp: tmp, r"a folder, not an image file; give the path of a file"),
    (lambda tmp: tmp / "missing.png", r"no image file at '.*missing.png'"),
], ids=["not an image", "truncated", "a folder", "missing"])
def test_unreadable_image_files_are_one_line(tmp_path, capsys, run, make, message):
    code, _, err = cli(capsys, "caption", make(tmp_path), "--checkpoint", run / "checkpoint.npz")
    assert code == 2 and re.search(message, err), err


# ---------------------------------------------------------------------------------------
# 4. Every file-system error is one line, and the output is checked before step 1
# ---------------------------------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a training step runs."""
    def refuse(self):
        raise AssertionError("a training step ran before the output folder was checked")
    monkeypatch.setattr(Trainer, "train_step", refuse)


def test_read_only_folder_is_refused_before_step_1(tmp_path, capsys, no_training):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only folder stays writable (the test "
                        "below proves the early check with a path through a file)")
        code, _, err = cli(capsys, "train", "--out", folder, "--steps", 3, *TINY)
    finally:
        folder.chmod(0o755)
    assert code == 2 and f"{folder / 'checkpoint.npz'}: Permission denied" in err
    assert os.listdir(folder) == []


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_path_through_a_file_is_refused_before_step_1(tmp_path, capsys, no_training,
                                                         command):
    (tmp_path / "file").write_text("I am a file")
    code, _, err = cli(capsys, command, "--out", tmp_path / "file" / "run", "--steps", 3, *TINY)
    assert code == 2
    assert f"{tmp_path / 'file' / 'run'}: Not a directory; it, or a folder on the way" in err


def test_a_full_disk_is_found_before_step_1(tmp_path, capsys, monkeypatch, no_training):
    def full(handle):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code, _, err = cli(capsys, "train", "--out", tmp_path, "--steps", 3, *TINY)
    assert code == 2
    assert (f"{tmp_path / 'checkpoint.npz'}: No space left on device; free some space or "
            f"choose another disk") in err
    assert os.listdir(tmp_path) == []


def test_a_disk_that_fills_up_during_training_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                        monkeypatch):
    code, _, _ = cli(capsys, "train", "--out", tmp_path, "--steps", 2, *TINY)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    real_savez = np.savez

    def fill_up(file, **arrays):
        real_savez(io.BytesIO(), **arrays)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", fill_up)
    code, _, err = cli(capsys, "train", "--out", tmp_path, "--resume", "--steps", 4, "--quiet")
    assert code == 2 and f"{tmp_path / 'checkpoint.npz'}: No space left on device" in err
    assert (tmp_path / "checkpoint.npz").read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


@pytest.mark.parametrize("make, argv, message", [
    (lambda tmp: (tmp / "f").write_text("x"), ["train", "--out", "{tmp}/f", "--steps", "3"],
     "{tmp}/f: not a folder"),
    (lambda tmp: None, ["eval", "--checkpoint", "{run}/checkpoint.npz", "--out", "{tmp}"],
     "{tmp}: a folder; give the path of a file"),
    (lambda tmp: None, ["eval", "--checkpoint", "{tmp}"],
     "{tmp}: a folder, not a checkpoint file; give the path of a file"),
    (lambda tmp: None, ["eval", "--checkpoint", "{tmp}/none.npz"], "no checkpoint at"),
    (lambda tmp: None, ["train", "--out", "{tmp}/new", "--resume"],
     "{tmp}/new/checkpoint.npz: no checkpoint to resume"),
], ids=["train --out FILE", "eval --out DIR", "eval a folder", "eval missing",
        "resume nothing"])
def test_file_system_errors_are_one_line(tmp_path, capsys, run, no_training, make, argv,
                                         message):
    make(tmp_path)
    fill = {"tmp": tmp_path, "run": run}
    code, _, err = cli(capsys, *[a.format(**fill) for a in argv],
                       *(TINY if argv[0] == "train" else []))
    assert code == 2 and message.format(**fill) in err


def test_an_interrupt_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                monkeypatch):
    real_step = Trainer.train_step

    def interrupted_at_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(Trainer, "train_step", interrupted_at_3)
    code, _, err = cli(capsys, "train", "--out", tmp_path, "--steps", 6, "--save-every", 2,
                       *TINY)
    assert code == 130 and "interrupted" in err
    assert read_header(tmp_path / "checkpoint.npz")["step"] == 2  # --save-every 2


# ---------------------------------------------------------------------------------------
# 5. Resume: the saved run, or a clear refusal
# ---------------------------------------------------------------------------------------

def test_resume_with_other_options_is_refused_with_every_difference(tmp_path, capsys):
    assert cli(capsys, "train", "--out", tmp_path, "--steps", 3, *TINY)[0] == 0
    before = (tmp_path / "checkpoint.npz").read_bytes()
    code, _, err = cli(capsys, "train", "--out", tmp_path, "--resume", "--steps", 6, "--lr",
                       "0.5", "--batch-size", 2, "--quiet")
    assert code == 2
    saved_lr = demo_config().lr  # train's default learning rate is the demo's
    assert f"batch_size: saved 4, asked 2; lr: saved {saved_lr:g}, asked 0.5" in err
    assert "may change only steps and checkpoint_every" in err
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_resume_with_more_steps_applies_and_prints_them(tmp_path, capsys):
    assert cli(capsys, "train", "--out", tmp_path, "--steps", 3, *TINY)[0] == 0
    code, out, _ = cli(capsys, "train", "--out", tmp_path, "--resume", "--steps", 5,
                       "--save-every", 0, "--width", 16, "--quiet")  # same width: no change
    assert code == 0
    assert ("resuming " + str(tmp_path / "checkpoint.npz") + " at step 3 of 5; changed: "
            "steps 3 -> 5, checkpoint_every 500 -> 0") in out
    header = read_header(tmp_path / "checkpoint.npz")
    assert header["step"] == 5 and header["config"]["steps"] == 5
    code, _, err = cli(capsys, "train", "--out", tmp_path, "--resume", "--steps", 4, "--quiet")
    assert code == 2 and "the saved run is already at step 5" in err


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_new_run_replaces_another_runs_checkpoint_only_with_overwrite(tmp_path, capsys,
                                                                        command):
    assert cli(capsys, "train", "--out", tmp_path, "--steps", 2, *TINY)[0] == 0
    before = (tmp_path / "checkpoint.npz").read_bytes()
    code, _, err = cli(capsys, command, "--out", tmp_path, "--steps", 3, *TINY)
    assert code == 2 and "holds the checkpoint of another run (step 2 of 2)" in err
    assert "--overwrite" in err and (tmp_path / "checkpoint.npz").read_bytes() == before
    if command == "train":
        assert cli(capsys, "train", "--out", tmp_path, "--steps", 3, "--overwrite", *TINY)[0] == 0
        assert read_header(tmp_path / "checkpoint.npz")["step"] == 3


def test_no_tmp_left_after_an_interrupted_save(tmp_path, capsys):
    # a process killed in the middle of writing its checkpoint leaves a full-size temp file
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, sys\n"
         "import numpy as np\n"
         "from minblip.__main__ import main\n"
         "real = np.savez\n"
         "def killed(file, **arrays):\n"
         "    real(file, **arrays)\n"
         "    file.flush()\n"
         "    os._exit(9)\n"
         "np.savez = killed\n"
         "main(sys.argv[1:])\n",
         "train", "--out", str(tmp_path), "--steps", "2", *TINY],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
    assert killed.returncode == 9
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".checkpoint.npz.") and left.endswith(".tmp")
    assert (tmp_path / left).stat().st_size > 100_000
    code, out, _ = cli(capsys, "train", "--out", tmp_path, "--steps", 2, *TINY)
    assert code == 0 and f"removed {tmp_path / left}, left by a save that was interrupted" in out
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


# ---------------------------------------------------------------------------------------
# 7. The smaller items
# ---------------------------------------------------------------------------------------

def test_prompt_length_must_lie_in_the_text(tmp_path):
    trainer, images, ids, mask = _blip_batch()
    tok = trainer.task.tokenizer
    for bad in (-1, ids.shape[1] + 1, 1.5):
        with pytest.raises(ValueError, match=rf"pretrain_step: prompt_length must be an int in "
                                             rf"\[0, {ids.shape[1]}\].*got {bad}"):
            pretrain_step(trainer.model, images, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                          dec_id=tok.dec_id, rng=np.random.default_rng(0), prompt_length=bad)
    with pytest.raises(ValueError, match=r"stage2_step: prompt_length must be an int in \[0, 4\]"):
        stage2_step(_stage2(), None, np.ones((2, 4), int), np.ones((2, 4), int),
                    image_embeds=np.zeros((2, 5, 6)), prompt_length=-1)
    lm = _stage2().language_model
    with pytest.raises(ValueError, match=r"causal_lm_targets: prompt_length .* got -2"):
        lm_step(lm, np.ones((2, 4), int), np.ones((2, 4), int), prompt_length=-2)
    assert causal_lm_targets(np.ones((1, 3), int), np.ones((1, 3), int), 0, 3).max() == -100


def test_out_of_range_fixed_negatives_are_named():
    trainer, images, ids, mask = _blip_batch()
    tok = trainer.task.tokenizer
    with pytest.raises(ValueError, match=r"neg_text_idx: expected 4 integer indices in \[0, 4\)"):
        pretrain_step(trainer.model, images, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                      dec_id=tok.dec_id, negatives=(np.array([1, 0, 3, 2]), np.array([1, 0, 9, 2])))


@pytest.mark.parametrize("argv, message", [
    (["retrieve", "x.png", "--text", "a red circle", "--checkpoint", "c.npz", "--top", "-1"],
     "argument --top: expected an integer >= 1, got '-1'"),
    (["caption", "x.png", "--checkpoint", "c.npz", "--seed", "-1"],
     "argument --seed: expected an integer >= 0, got '-1'"),
    (["train", "--out", "x", "--save-every", "-5"],
     "argument --save-every: expected an integer >= 0, got '-5'"),
    (["train", "--out", "x", "--lr", "nan"], "TrainConfig.lr: expected a finite number > 0"),
    (["train", "--out", "x", "--resume", "--overwrite"], "give one of them"),
], ids=["--top -1", "--seed -1", "--save-every -5", "--lr nan", "--resume --overwrite"])
def test_bad_options_are_one_line(capsys, no_training, argv, message):
    code, _, err = cli(capsys, *argv)
    assert code == 2 and message in err


def test_a_prompt_longer_than_the_text_is_refused_not_cut():
    trainer, images, _, _ = _blip_batch()
    tok = trainer.task.tokenizer
    long_prompt = " ".join(["a red circle"] * 7)  # 21 words: [DEC] and 21 tokens
    with pytest.raises(ValueError, match=r"the prompt is 22 tokens with its start token, and "
                                         r"max_length \(20\) counts them"):
        caption_images(trainer.model, tok, images, prompt=long_prompt, max_length=20)
    lm_tok = build_lm_tokenizer()
    lm = LanguageModel(LMConfig(vocab_size=lm_tok.vocab_size, width=8, depth=1, heads=2,
                                mlp_dim=16, max_positions=32), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"the prompt is 22 tokens"):
        generate_text(lm, lm_tok, prompt=long_prompt, max_length=20)
    assert len(caption_images(trainer.model, tok, images[:1], prompt="a red", max_length=5)) == 1


def test_a_bad_learning_rate_or_interval_in_a_config():
    for field, value in (("lr", float("nan")), ("lr", 0.0), ("grad_clip", -1.0),
                         ("weight_decay", float("inf")), ("checkpoint_every", -1)):
        with pytest.raises(ValueError, match=rf"TrainConfig.{field}: expected"):
            TrainConfig(**{**TINY_CONFIG, field: value})
