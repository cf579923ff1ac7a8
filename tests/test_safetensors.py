"""The safetensors reader: memory-mapped reads converted once, half precision,
bfloat16, sharded folders, and hostile headers and configs refused before
anything large is allocated.

(The byte layout, the writer and the corrupt-header messages are in
tests/test_hf_interop.py; the comparison with the safetensors package in
tests/test_torch_parity.py.)
"""
import json
import struct
import time
import tracemalloc

import numpy as np
import pytest

from minblip import hf
from minblip.safetensors import (MAX_HEADER_BYTES, Checkpoint, SafetensorsFile,
                                 read_safetensors, write_safetensors)


def raw_file(path, entries, data=b""):
    """A safetensors file from a hand-written header dict and data bytes."""
    text = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def bf16_bits(x):
    """float32 values exact in bfloat16 -> their 16-bit patterns."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype("<u2")


def test_tensors_are_memory_mapped_and_converted_once(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    write_safetensors(tmp_path / "a.safetensors", {"w": w, "h": w.astype(np.float16)})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    mapped = f.mapped("w")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, w)
    for name in ("w", "h"):  # into float64 and into an existing float32 array
        np.testing.assert_array_equal(f.read(name, np.float64), w)
        out = np.full((3, 4), np.nan, np.float32)
        f.read_into(name, out)
        np.testing.assert_array_equal(out, w)
    assert f.read("h").dtype == np.float32  # half precision widens by default
    with pytest.raises(ValueError, match="tensor 'w' has shape \\(3, 4\\), the destination "
                                         "\\(4, 3\\)"):
        f.read_into("w", np.empty((4, 3), np.float32))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        f.read("nope")


def test_bfloat16_widens_exactly_to_float32_and_float64(tmp_path):
    exact = np.array([[1.0, -0.375], [3.140625, -2.0**-100]], np.float32)
    path = raw_file(tmp_path / "b.safetensors",
                    {"b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}},
                    bf16_bits(exact).tobytes())
    f = SafetensorsFile(path)
    assert f.info("b").dtype_name == "bfloat16"
    np.testing.assert_array_equal(f.read("b"), exact)
    np.testing.assert_array_equal(f.read("b", np.float64), exact.astype(np.float64))
    assert read_safetensors(path)["b"].dtype == np.float32


def test_a_shape_whose_size_overflows_64_bits_is_refused(tmp_path):
    # 2**32 * 2**32 * 4 bytes wraps to 0 in int64 arithmetic; Python ints do not wrap
    path = raw_file(tmp_path / "o.safetensors",
                    {"x": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    with pytest.raises(ValueError, match="tensor 'x' of shape \\[4294967296, 4294967296\\] and "
                                         "dtype F32 needs 73786976294838206464 bytes"):
        SafetensorsFile(path)


def test_header_limits_and_duplicates(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(ValueError, match="exceeds the limit of 100000000 bytes"):
        SafetensorsFile(path)
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
           b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    with pytest.raises(ValueError, match="names 'w' twice"):
        SafetensorsFile(path)
    raw_file(path, {"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(ValueError, match="malformed shape"):
        SafetensorsFile(path)


def test_empty_and_scalar_tensors(tmp_path):
    write_safetensors(tmp_path / "e.safetensors", {"e": np.zeros((0, 3), np.float32),
                                                   "s": np.float64(2.5)})
    t = read_safetensors(tmp_path / "e.safetensors")
    assert t["e"].shape == (0, 3) and t["s"].shape == () and t["s"] == 2.5


# ---------------------------------------------------------------------------------------
# Sharded folders
# ---------------------------------------------------------------------------------------

def sharded(tmp_path, split=(("a", "b"), ("c",))):
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal((2, 3)).astype(np.float32) for part in split for n in part}
    weight_map = {}
    for i, part in enumerate(split):
        shard = f"model-{i + 1:05d}-of-{len(split):05d}.safetensors"
        write_safetensors(tmp_path / shard, {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 72}, "weight_map": weight_map}))
    return tensors, weight_map


def test_a_sharded_folder_reads_as_one(tmp_path):
    tensors, _ = sharded(tmp_path)
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.names) == ["a", "b", "c"] and ckpt.nbytes == 72
    for name, a in tensors.items():
        np.testing.assert_array_equal(ckpt.read(name), a)
    assert ckpt.source.endswith("model.safetensors.index.json")
    assert set(hf.read_hf_tensors(tmp_path)) == {"a", "b", "c"}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(d="model-00001-of-00002.safetensors"),
     "disagree: listed but absent: \\['d'\\]"),
    (lambda m: m.pop("b"), "disagree: present but not listed: \\['b'\\]"),
    (lambda m: m.update(a="model-00009-of-00009.safetensors"), "which is not in"),
    (lambda m: m.update(a="../elsewhere.safetensors"), "is not a file name in"),
])
def test_index_and_shards_must_agree(tmp_path, edit, message):
    _, weight_map = sharded(tmp_path)
    edit(weight_map)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Checkpoint(tmp_path)


def test_a_folder_without_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors or "
                                                "model.safetensors.index.json"):
        Checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="a pickle; minblip reads safetensors only"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object with a weight_map"):
        Checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------
# Configs are checked against the headers before anything is built
# ---------------------------------------------------------------------------------------

def tiny_blip_folder(tmp_path):
    from test_hf_interop import tiny_model
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path, "captioning", tokenizer=tok)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("section, key, value", [
    ("text_config", "vocab_size", 10**9),
    ("text_config", "hidden_size", 10**9),
    ("vision_config", "hidden_size", 10**9),
    ("text_config", "vocab_size", 5 * 10**6),
    ("text_config", "num_hidden_layers", 1000),
    ("vision_config", "intermediate_size", 40000),
])
def test_absurd_configs_are_refused_fast_and_small(tmp_path, section, key, value):
    config = tiny_blip_folder(tmp_path)
    config[section][key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError) as err:
            hf.load_blip_captioning(tmp_path)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 1.0 and peak < 100 * 2**20, (seconds, peak)
    assert "config.json" in str(err.value)
    assert ("does not match the checkpoint's tensors (nothing was built)" in str(err.value)
            or f"{key} must be an int in" in str(err.value))


def test_the_config_message_names_each_disagreement(tmp_path):
    config = tiny_blip_folder(tmp_path)
    config["text_config"]["vocab_size"] = 3 * 10**6
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        hf.load_blip_captioning(tmp_path)
    msg = str(err.value)
    assert ("text_decoder.bert.embeddings.word_embeddings.weight has shape (15, 8), the "
            "config implies (3000000, 8)") in msg
    assert "the config says 3 layers, the checkpoint has 2 under vision_model.encoder.layers.*" \
        in msg


@pytest.mark.parametrize("key, value, message", [
    ("layer_norm_eps", "tiny", "text_config.layer_norm_eps must be a number, got 'tiny'"),
    ("vocab_size", 2**40, "text_config.vocab_size must be an int in \\[1, 4194304\\]"),
    ("hidden_size", True, "text_config.hidden_size must be an int"),
])
def test_config_values_are_named_when_wrong(key, value, message):
    with pytest.raises(ValueError, match=message):
        hf.blip_config_from_hf({"model_type": "blip", "text_config": {key: value}})


# ---------------------------------------------------------------------------------------
# Building without values, loading without copies
# ---------------------------------------------------------------------------------------

def test_a_deferred_build_allocates_no_large_param():
    from minblip.core import DEFERRED_MIN_SIZE, Param, deferred_params
    from minblip.layers import Linear
    tracemalloc.start()
    try:
        with deferred_params():
            big = Linear(2000, 3000, hf.ZeroInit())  # 24 MB as float32; zeros drawn free
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20 and big.W.placeholder and big.W.shape == (2000, 3000)
    assert not big.b.placeholder and big.b.size < DEFERRED_MIN_SIZE  # small: made as usual
    big.W.data[0, 0] = 5.0  # an initialiser's write lands on the one placeholder element
    big.W.astype(np.float64)
    assert big.W.placeholder and big.W.dtype == np.float64
    assert not Param(np.zeros((100, 100))).placeholder  # outside the block: as always


def test_a_float32_file_is_used_in_place_and_a_float16_file_converted_once(tmp_path):
    from test_hf_interop import tiny_model
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path / "f32", "captioning", tokenizer=tok)
    loaded = hf.load_blip_captioning(tmp_path / "f32")
    W = loaded.text_decoder.bert.layers[0].ffn.fc1.W.data  # (d_in, d_out) of a (d_out, d_in)
    root = W
    while root.base is not None and not isinstance(root, np.memmap):
        root = root.base
    assert isinstance(root, np.memmap) and W.flags.f_contiguous and W.flags.writeable
    before = float(W[0, 0])
    W[0, 0] += 1.0  # copy-on-write: the model changes, the file does not
    again = hf.load_blip_captioning(tmp_path / "f32")
    assert again.text_decoder.bert.layers[0].ffn.fc1.W.data[0, 0] == before != W[0, 0]
    tensors = hf.read_hf_tensors(tmp_path / "f32")
    write_safetensors(tmp_path / "f32" / "model.safetensors",
                      {k: v.astype(np.float16) for k, v in tensors.items()})
    half = hf.load_blip_captioning(tmp_path / "f32")
    W16 = half.text_decoder.bert.layers[0].ffn.fc1.W.data
    assert W16.dtype == np.float32 and not isinstance(W16.base, np.memmap)
    np.testing.assert_array_equal(W16, tensors["text_decoder.bert.encoder.layer.0.intermediate"
                                               ".dense.weight"].astype(np.float16).T)
