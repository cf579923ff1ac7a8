"""Checkpoints: exact round trips, exact resume, atomic writes and clear refusals."""
import json
import os

import numpy as np
import pytest

from minblip import checkpoint
from minblip.checkpoint import load_checkpoint, rng_from_state, rng_state, save_checkpoint
from minblip.core import Module, Param
from minblip.layers import GELU, Dropout, Embedding, LayerNorm, Linear
from minblip.optim import AdamW, clip_grad_norm, warmup_cosine_lr

CONFIG = {"d": 8, "vision": {"depth": 2, "patch": 4}, "lr": 1e-3, "names": ["a", "b"]}


class Net(Module):
    """Embedding + LayerNorm + Linear, with a cls token and a temperature."""

    def __init__(self, rng, d=8, head_name="fc"):
        self.emb = Embedding(5, d, rng)
        self.ln = LayerNorm(d)
        setattr(self, head_name, Linear(d, 16, rng))
        self.cls = Param(rng.normal(size=(1, 1, d)))
        self.temp = Param(0.07)


class Head(Module):
    def __init__(self, weight):
        self.weight = weight


class TiedLM(Module):
    def __init__(self, rng):
        self.emb = Embedding(6, 4, rng)
        self.proj = Linear(4, 4, rng)
        self.head = Head(self.emb.weight)


def snapshot(model):
    return {n: p.data.copy() for n, p in model.named_params()}


def assert_unchanged(model, before):
    for n, p in model.named_params():
        np.testing.assert_array_equal(p.data, before[n], err_msg=n)


def saved(tmp_path, model, name="ckpt.npz", **kw):
    path = tmp_path / name
    save_checkpoint(path, model, kw.pop("config", CONFIG), kw.pop("step", 3), **kw)
    return path


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_exact_and_in_place(tmp_path, dtype):
    source = Net(np.random.default_rng(0)).to(dtype)
    path = saved(tmp_path, source, step=42, extra={"note": "hi", "n": np.int64(3)})
    target = Net(np.random.default_rng(1)).to(dtype)
    arrays = {n: p.data for n, p in target.named_params()}
    info = load_checkpoint(path, target, config=CONFIG)
    assert info == {"step": 42, "config": CONFIG, "extra": {"note": "hi", "n": 3}}
    for (n, p), (_, q) in zip(source.named_params(), target.named_params()):
        assert q.data is arrays[n]  # written into the existing array
        assert q.dtype == dtype
        np.testing.assert_array_equal(q.data, p.data, err_msg=n)


def test_archive_layout_has_no_pickles(tmp_path):
    model = Net(np.random.default_rng(0))
    path = saved(tmp_path, model, optimizer=AdamW(model, lr=0.1))
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        assert str(z["__format__"]) == "minblip-checkpoint"
        assert int(z["__version__"]) == 1
        assert json.loads(str(z["config"])) == CONFIG
        assert all(z[k].dtype != object for k in keys)
    names = {n for n, _ in model.named_params()}
    assert {k for k in keys if k.startswith("param/")} == {"param/" + n for n in names}
    assert "optim/step" in keys and "optim/m/fc.W" in keys and "optim/v/temp" in keys


def test_tied_param_is_stored_once_and_still_tied(tmp_path):
    source = TiedLM(np.random.default_rng(0))
    path = saved(tmp_path, source)
    with np.load(path) as z:
        assert "param/emb.weight" in z.files
        assert not any(k.startswith("param/head") for k in z.files)
    target = TiedLM(np.random.default_rng(1))
    load_checkpoint(path, target)
    assert target.head.weight is target.emb.weight
    np.testing.assert_array_equal(target.head.weight.data, source.emb.weight.data)


def test_optimizer_state_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    model = Net(np.random.default_rng(0))
    opt = AdamW(model, lr=0.1)
    for _ in range(3):
        for p in model.params():
            p.grad[...] = rng.normal(size=p.shape)
        opt.step()
    path = saved(tmp_path, model, optimizer=opt)
    model2 = Net(np.random.default_rng(0))
    opt2 = AdamW(model2, lr=0.1)
    load_checkpoint(path, model2, optimizer=opt2)
    assert opt2.step_count == 3
    for a, b in zip(opt.m + opt.v, opt2.m + opt2.v):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == np.float32


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937])
def test_rng_state_json_round_trip(bit_generator):
    rng = np.random.Generator(bit_generator(5))
    rng.random(7)
    state = json.loads(json.dumps(rng_state(rng)))
    clone = rng_from_state(state)
    np.testing.assert_array_equal(clone.random(10), rng.random(10))
    with pytest.raises(ValueError, match="bit_generator"):
        rng_from_state({"bit_generator": "Nope"})


# ---------------------------------------------------------------------------
# resuming training reproduces the uninterrupted run bit for bit
# ---------------------------------------------------------------------------

class Regressor(Module):
    def __init__(self, rng):
        self.fc1 = Linear(3, 16, rng, init_std=0.5)
        self.act = GELU()
        self.drop = Dropout(0.1)
        self.fc2 = Linear(16, 1, rng, init_std=0.5)

    def forward(self, x, rng):
        h, c1 = self.fc1.forward(x)
        a, c2 = self.act.forward(h)
        d, c3 = self.drop.forward(a, rng)
        y, c4 = self.fc2.forward(d)
        return y, (c1, c2, c3, c4)

    def backward(self, dy, cache):
        c1, c2, c3, c4 = cache
        dd = self.fc2.backward(dy, c4)  # undoes y = fc2(d)
        da = self.drop.backward(dd, c3)  # undoes d = drop(a)
        dh = self.act.backward(da, c2)  # undoes a = gelu(h)
        return self.fc1.backward(dh, c1)  # undoes h = fc1(x)


TOTAL = 12
DATA_RNG = np.random.default_rng(123)
X = DATA_RNG.normal(size=(64, 3)).astype(np.float32)
Y = np.sin(X.sum(axis=1, keepdims=True)).astype(np.float32)


def train(model, opt, rng, steps):
    for step in steps:
        idx = rng.choice(len(X), size=8, replace=False)  # the minibatch depends on the rng
        opt.zero_grad()
        y, cache = model.forward(X[idx], rng)
        model.backward(2.0 * (y - Y[idx]) / len(idx), cache)  # d mean((y - t)^2) / dy
        clip_grad_norm(model, 1.0)
        opt.step(lr=warmup_cosine_lr(step, TOTAL, 1e-2, 3, 1e-4, 1e-3))


def test_resume_equals_straight_run(tmp_path):
    straight = Regressor(np.random.default_rng(0))
    train(straight, AdamW(straight, lr=0.0), np.random.default_rng(7), range(TOTAL))

    model = Regressor(np.random.default_rng(0))
    opt, rng = AdamW(model, lr=0.0), np.random.default_rng(7)
    train(model, opt, rng, range(TOTAL // 2))
    path = tmp_path / "run.npz"
    save_checkpoint(path, model, {"task": "sin"}, TOTAL // 2, opt, extra={"rng": rng_state(rng)})
    del model, opt, rng

    fresh = Regressor(np.random.default_rng(99))
    fresh_opt = AdamW(fresh, lr=0.0)
    info = load_checkpoint(path, fresh, {"task": "sin"}, fresh_opt)
    train(fresh, fresh_opt, rng_from_state(info["extra"]["rng"]), range(info["step"], TOTAL))

    for (n, p), (_, q) in zip(straight.named_params(), fresh.named_params()):
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    moved = Regressor(np.random.default_rng(0))  # the test would pass vacuously if nothing trained
    assert not np.array_equal(moved.fc1.W.data, fresh.fc1.W.data)


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------

def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = Net(np.random.default_rng(0))
    path = saved(tmp_path, model, step=1)
    good = path.read_bytes()

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Net(np.random.default_rng(1)), CONFIG, 2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    target = Net(np.random.default_rng(1))
    assert load_checkpoint(path, target)["step"] == 1
    assert_unchanged(target, snapshot(model))


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = saved(tmp_path, Net(np.random.default_rng(0)), step=1)
    good = path.read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(path, Net(np.random.default_rng(1)), CONFIG, 2)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path / "new.npz", Net(np.random.default_rng(1)), CONFIG, 2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_unserialisable_config_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="config must be JSON-serialisable"):
        save_checkpoint(tmp_path / "x.npz", Net(np.random.default_rng(0)), {"f": print}, 0)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# refusals: each names the problem and leaves the model untouched
# ---------------------------------------------------------------------------

@pytest.fixture
def target():
    model = Net(np.random.default_rng(1))
    return model, snapshot(model)


def test_missing_file_is_named(tmp_path, target):
    model, before = target
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_checkpoint(tmp_path / "nothing.npz", model)


def test_truncated_file(tmp_path, target):
    model, before = target
    path = saved(tmp_path, Net(np.random.default_rng(0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="ckpt.npz: cannot read the checkpoint"):
        load_checkpoint(path, model)
    assert_unchanged(model, before)


def test_corrupt_byte_fails_the_crc(tmp_path, target):
    model, before = target
    path = saved(tmp_path, Net(np.random.default_rng(0)))
    data = bytearray(path.read_bytes())
    with np.load(path) as z:  # flip one byte inside the stored fc.W values
        offset = data.index(z["param/fc.W"].tobytes()) + 100
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="ckpt.npz: cannot read.*CRC"):
        load_checkpoint(path, model)
    assert_unchanged(model, before)


def test_foreign_files(tmp_path, target):
    model, before = target
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(ValueError, match="other.npz: not a minblip checkpoint"):
        load_checkpoint(tmp_path / "other.npz", model)
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(ValueError, match="one.npy: not a minblip checkpoint"):
        load_checkpoint(tmp_path / "one.npy", model)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: cannot read"):
        load_checkpoint(tmp_path / "notes.txt", model)
    assert_unchanged(model, before)


def test_other_format_version(tmp_path, target):
    model, before = target
    path = saved(tmp_path, Net(np.random.default_rng(0)))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["__version__"] = np.array(99)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(path, model)
    assert_unchanged(model, before)


def test_other_configuration(tmp_path, target):
    model, before = target
    path = saved(tmp_path, Net(np.random.default_rng(0)))
    other = {**CONFIG, "vision": {"depth": 3, "patch": 4}, "extra_key": 1}
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, model, config=other)
    message = str(err.value)
    assert "another configuration" in message
    assert "vision.depth: expected 3, found 2" in message
    assert "extra_key: expected 1, found '<absent>'" in message
    assert "vision.patch" not in message and "lr:" not in message
    assert_unchanged(model, before)
    # tuples and lists are the same after the JSON round trip
    load_checkpoint(path, model, config={**CONFIG, "names": ("a", "b")})


def test_missing_renamed_and_reshaped_params(tmp_path):
    path = saved(tmp_path, Net(np.random.default_rng(0)))
    renamed = Net(np.random.default_rng(1), head_name="proj")
    before = snapshot(renamed)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, renamed)
    message = str(err.value)
    assert "missing ['proj.W', 'proj.b']" in message
    assert "unexpected ['fc.W', 'fc.b']" in message
    assert_unchanged(renamed, before)

    wider = Net(np.random.default_rng(1), d=6)
    before = snapshot(wider)
    with pytest.raises(ValueError, match=r"emb.weight: model \(5, 6\), checkpoint \(5, 8\)"):
        load_checkpoint(path, wider)
    assert_unchanged(wider, before)


def test_optimizer_state_mismatch_changes_nothing(tmp_path, target):
    model, before = target
    path = saved(tmp_path, Net(np.random.default_rng(0)))  # saved without an optimiser
    opt = AdamW(model, lr=0.1)
    with pytest.raises(ValueError, match="holds no optimiser state"):
        load_checkpoint(path, model, optimizer=opt)
    assert_unchanged(model, before)

    source = Net(np.random.default_rng(0))
    path = saved(tmp_path, source, optimizer=AdamW(source.named_params()[:2], lr=0.1))
    with pytest.raises(ValueError, match=r"AdamW state does not match.*missing \['m/cls', 'm/fc.W'"):
        load_checkpoint(path, model, optimizer=opt)
    assert_unchanged(model, before)
    assert opt.step_count == 0


def test_save_argument_errors(tmp_path):
    model = Net(np.random.default_rng(0))
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        save_checkpoint(tmp_path / "x.npz", model, CONFIG, -1)
    with pytest.raises(TypeError, match="config must be a dict"):
        save_checkpoint(tmp_path / "x.npz", model, [1, 2], 0)
    with pytest.raises(TypeError, match="model must be a Module"):
        save_checkpoint(tmp_path / "x.npz", {"w": np.ones(2)}, CONFIG, 0)
    assert os.listdir(tmp_path) == []
