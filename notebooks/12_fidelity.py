# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 12 · Fidelity: Hugging Face checkpoints in NumPy, and a PyTorch twin
#
# **Goal.** Everything so far was checked against itself: finite differences tell us
# that each backward is the derivative of its forward, but not that the forward is
# BLIP. This notebook connects minblip to the reference implementation, Hugging
# Face `transformers` in PyTorch:
#
# 1. read and write the checkpoint format, **safetensors**, with nothing but NumPy;
# 2. map every tensor name and layout of `BlipForImageTextRetrieval` and
#    `BlipForConditionalGeneration` onto minblip's Params (and back, bit for bit);
# 3. tokenize text with BERT's **WordPiece**, as BLIP does;
# 4. look at what the PyTorch comparisons measured: in float64, every gradient of a whole
#    pretraining step agrees to rounding (section 5 reads the largest difference);
# 5. load a whole **BLIP-2** (EVA ViT, Q-Former, OPT) from a checkpoint folder,
#    memory-mapped, and see why reading without a copy matters at 15 GB.
#
# PyTorch is not needed to run this notebook: section 5 reads the numbers that
# `reference/torch_twin.py` wrote in a separate environment, and section 6 the
# outputs transformers computed for a committed tiny BLIP-2.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import json
import os
import struct
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from minblip import hf, hf_blip2
from minblip.blip import BLIP, BLIPConfig
from minblip.bpe import ByteLevelBPETokenizer
from minblip.core import Param
from minblip.gradcheck import rel_error
from minblip.image import preprocess
from minblip.safetensors import Checkpoint
from minblip.text import TextConfig
from minblip.tokenizer import Tokenizer
from minblip.vit import ViTConfig, conv2d_patchify_reference
from minblip.wordpiece import WordPieceTokenizer, basic_tokenize

ROOT = Path.cwd().parent  # the repository
os.chdir(tempfile.mkdtemp(prefix="minblip-fidelity-"))  # scratch files, outside the repository

# %% [markdown]
# ## 1. The idea
#
# A trained model is a configuration plus a dictionary from names to arrays. Loading
# someone else's checkpoint is three small problems:
#
# * **the container**: how the arrays are stored on disk;
# * **the names**: `text_encoder.encoder.layer.3.crossattention.self.key.weight` is
#   minblip's `text_encoder.layers.3.cross_attn.key.W`;
# * **the layouts**: the same numbers arranged differently. PyTorch's `nn.Linear`
#   computes $y = x W^\top + b$ with $W$ of shape $(d_\text{out}, d_\text{in})$;
#   minblip computes $y = x W + b$ with $W$ of shape $(d_\text{in}, d_\text{out})$.
#
# Then one must check that the loaded model computes what the original computes,
# which needs the original, PyTorch, at least once.

# %% [markdown]
# ## 2. safetensors, byte by byte
#
# The format is simple enough to write by hand: 8 bytes giving the length $N$ of a
# JSON header, the header (each tensor's dtype, shape and byte range), then the raw
# little-endian bytes. No code is executed when reading it, unlike a pickled
# `pytorch_model.bin`. Here is a file with two tensors, built without minblip:

# %%
w = np.arange(6, dtype="<f4").reshape(2, 3) / 4
ids = np.array([7, 8], dtype="<i8")
header = {"__metadata__": {"format": "pt"},
          "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
          "ids": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
text = json.dumps(header).encode()
raw = struct.pack("<Q", len(text)) + text + w.tobytes() + ids.tobytes()
Path("hand.safetensors").write_bytes(raw)
print(f"{len(raw)} bytes: 8 + {len(text)} header + 40 data")
print(raw[:8], raw[8:60], b"...")
print(hf.read_safetensors("hand.safetensors"))

# %% [markdown]
# `minblip.hf.write_safetensors` writes the same format (sorted as the reference
# writer sorts: by dtype, then by name; header padded to 8 bytes), and the PyTorch
# comparison checks that its bytes equal those of `safetensors.numpy.save_file`.
# Half-precision files are converted to the working dtype on reading; bfloat16 is the
# upper half of a float32, so widening it is a 16-bit shift:

# %%
x = np.array([1.0, -0.375, 3.140625], np.float32)  # 8 significant bits: exact in bfloat16
bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
print("bfloat16 bits:", [f"{b:016b}" for b in bf16])
print("widened back :", (bf16.astype(np.uint32) << 16).view(np.float32))

# %% [markdown]
# ## 3. Names and layouts
#
# `hf.hf_tensors(model, kind)` lists, for every Hugging Face tensor, the minblip
# Params it is made of and two functions: `to_hf` builds the tensor from the Params'
# arrays, `from_hf` splits it back. Most entries are a copy or a transpose. Two are
# more interesting.
#
# **The fused qkv.** The ViT in BLIP computes queries, keys and values with one
# Linear of width $3D$: rows $[0, D)$ of its weight are $W_q^\top$, $[D, 2D)$ are
# $W_k^\top$, $[2D, 3D)$ are $W_v^\top$. minblip keeps three Linears; the fused
# layer computes exactly their outputs side by side:

# %%
WORDS = "a red blue green circle square small large left right of the picture".split()
tok = Tokenizer(WORDS)
cfg = BLIPConfig(vision=ViTConfig(image_size=16, patch_size=8, width=16, depth=2, heads=2,
                                  mlp_dim=32),
                 text=TextConfig(vocab_size=tok.vocab_size, width=16, depth=2, heads=2,
                                 mlp_dim=32, max_positions=16, encoder_width=16),
                 embed_dim=8)
rng = np.random.default_rng(0)
model = BLIP(cfg, rng)
for p in model.params():
    p.data[...] = rng.normal(0, 0.3, p.shape)

sd = hf.hf_state_dict(model, "retrieval")
qkv_w = sd["vision_model.encoder.layers.0.self_attn.qkv.weight"]  # (3D, D)
qkv_b = sd["vision_model.encoder.layers.0.self_attn.qkv.bias"]
att = model.visual_encoder.blocks[0].attn
x = rng.standard_normal((5, 16)).astype(np.float32)
fused = x @ qkv_w.T + qkv_b  # PyTorch's nn.Linear
separate = np.concatenate([lin.forward(x)[0] for lin in (att.query, att.key, att.value)], -1)
print("qkv weight", qkv_w.shape, "-> max |fused - separate| =", np.abs(fused - separate).max())

# %% [markdown]
# **The patch embedding** is a Conv2d weight $(D, 3, p, p)$; notebook 03 showed
# that a convolution with stride = kernel is a matmul with
# `W = conv_w.reshape(D, -1).T`. Checked once more against a loop convolution:

# %%
conv_w = sd["vision_model.embeddings.patch_embedding.weight"]
conv_b = sd["vision_model.embeddings.patch_embedding.bias"]
images = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
conv = conv2d_patchify_reference(images, conv_w, conv_b)  # (B, D, 2, 2)
mine, _ = model.visual_encoder.patch_embed.forward(images)  # (B, 4, D)
print("max |conv - patch_embed| =",
      np.abs(conv.reshape(2, 16, -1).transpose(0, 2, 1) - mine).max())

# %% [markdown]
# ### The gradient follows the same map
#
# The map from minblip's Params to a Hugging Face tensor is linear (copies,
# transposes, concatenations), so a gradient is converted exactly as the weight is:
# $\partial L / \partial W_\text{qkv} = [\partial L/\partial W_q^\top;\ \partial L/\partial W_k^\top;
# \ \partial L/\partial W_v^\top]$. That is how `reference/torch_twin.py` compares
# minblip's gradients with PyTorch's. A finite-difference check on the fused layout
# confirms it: perturb entries of the *fused* matrix, push the result back into
# minblip with `from_hf`, and differentiate $L = \sum \text{out} \cdot R$ through
# the whole ViT.

# %%
model64 = BLIP(cfg, np.random.default_rng(0)).to(np.float64)
for p in model64.params():
    p.data[...] = np.random.default_rng(p.size).normal(0, 0.3, p.shape)
entry = next(t for t in hf.hf_tensors(model64, "retrieval")
             if t.name == "vision_model.encoder.layers.1.self_attn.qkv.weight")
x64 = images.astype(np.float64)
R = np.random.default_rng(1).standard_normal((2, 5, 16))


def loss_of_fused(fused):
    for p, a in zip(entry.params, entry.from_hf(fused)):
        p.data[...] = a
    out, cache = model64.visual_encoder.forward(x64)
    return float(np.sum(out * R)), cache


fused0 = entry.to_hf([p.data for p in entry.params]).copy()
model64.zero_grad()
_, cache = loss_of_fused(fused0)
model64.visual_encoder.backward(R, cache)
analytic = entry.to_hf([p.grad for p in entry.params])  # minblip's gradient, HF layout
numeric = np.zeros_like(fused0)
h = 1e-5
for i, j in [(0, 0), (5, 3), (17, 9), (30, 2), (47, 15)]:  # rows in q, q, k, v, v
    for sign in (1, -1):
        f = fused0.copy()
        f[i, j] += sign * h
        numeric[i, j] += sign * loss_of_fused(f)[0] / (2 * h)
loss_of_fused(fused0)
picked = tuple(zip(*[(0, 0), (5, 3), (17, 9), (30, 2), (47, 15)]))
print("fused-qkv gradient, 5 entries: relative error",
      f"{rel_error(analytic[picked], numeric[picked]):.2e}")

# %% [markdown]
# ### A whole checkpoint, there and back
#
# `hf.save_blip` writes `config.json`, `model.safetensors` and a `vocab.txt`; the
# loaders rebuild a BLIP holding exactly what the Hugging Face model holds (a
# retrieval model has no decoder, a captioning model no text encoder). Saved again,
# the file is byte-identical:

# %%
hf.save_blip(model, "itr", "retrieval", tokenizer=tok)
saved = Path("itr")  # the checkpoint folder just written
loaded = hf.load_blip_retrieval(saved)
hf.save_blip(loaded, "itr2")
same = (saved / "model.safetensors").read_bytes() == Path("itr2/model.safetensors").read_bytes()
print("tensors:", len(sd), "| parameters:", loaded.param_count(), "| byte-identical:", same)
ids, mask = tok.encode(["a red circle left of a blue square"])
e1, _ = model.encode_image(images[:1])
e2, _ = loaded.encode_image(images[:1])
itm_gap = np.abs(model.itm_logits(e1, ids, mask, tok.enc_id)
                 - loaded.itm_logits(e2, ids, mask, tok.enc_id)).max()
print(f"ITM logits, max |original - loaded| = {itm_gap:.1e}")
assert itm_gap < 1e-5

# %% [markdown]
# The weights are bit-identical; the logits agree to float32 rounding, not always to
# the bit, because a loaded Linear weight is a *view* of the file's layout: section 6
# explains why.

# %% [markdown]
# A checkpoint that does not fit is refused before anything is loaded, with every
# problem named:

# %%
broken = hf.read_safetensors(saved / "model.safetensors")
del broken["text_encoder.encoder.layer.1.output.dense.bias"]
broken["vision_proj.weight"] = broken["vision_proj.weight"].T.copy()
hf.write_safetensors(saved / "model.safetensors", broken)
try:
    hf.load_blip_retrieval(saved)
except ValueError as err:
    print(err)

# %% [markdown]
# ### Where Hugging Face and salesforce/BLIP differ
#
# The converted checkpoints run a little differently from the code BLIP was trained
# with. minblip follows the config it loads and makes each difference a choice:
#
# | what | HF | salesforce/BLIP | in minblip |
# |---|---|---|---|
# | ViT LayerNorm eps | 1e-5 | 1e-6 | `vision_eps=` when loading |
# | LM label smoothing | 0.0 | 0.1 | `label_smoothing=` |
# | first token for ITM | [CLS] | [ENC] | `itm_logits(..., enc_id=)` |
# | decoder input in training | [CLS] | [DEC] | the ids you pass |
#
# `hf.ORIGINAL_BLIP` holds the salesforce/BLIP values. How much does the eps alone
# change? Very little, as long as no row of activations has a tiny variance:

# %%
hf.save_blip(model, "cap", "captioning", tokenizer=tok)
as_hf = hf.load_blip_captioning("cap", np.float64, vision_eps=1e-5)  # HF's default
as_blip = hf.load_blip_captioning("cap", np.float64, **hf.ORIGINAL_BLIP)
a, _ = as_hf.visual_encoder.forward(x64)
b, _ = as_blip.visual_encoder.forward(x64)
print(f"eps 1e-5 vs 1e-6: max |image_embeds difference| = {np.abs(a - b).max():.2e}")

# %% [markdown]
# ## 4. WordPiece
#
# BLIP tokenizes with `bert-base-uncased`. The text is cleaned, lower-cased,
# stripped of accents and split at whitespace and punctuation; then each word is cut
# greedily into the **longest** prefix in the vocabulary, then the longest
# continuation spelled `##piece`, and so on. A word with any part the vocabulary
# cannot spell becomes one `[UNK]`. BLIP appends `[DEC]` and `[ENC]` to the 30,522
# BERT tokens.

# %%
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##aff", "##able",
         "cafe", "'", "s", "dog", "##s", "play", "##ing", ",", "!", "a", "picture", "of"]
wp = WordPieceTokenizer(vocab)
text = "The unaffable Café's dogs, playing!"
pieces = wp.tokenize(text)
print(pieces)
ids, _ = wp.encode(text)
print(ids[0].tolist(), "->", repr(wp.decode(ids[0])))
print("unknown word:", wp.tokenize("zebras"), "| [DEC], [ENC] ids:", wp.dec_id, wp.enc_id)

# %% [markdown]
# On every string of the parity tests (accents, Chinese characters, emoji, control
# characters, special tokens, random mixtures) `minblip.wordpiece` produces the same tokens as
# transformers' `BertTokenizer`s (`tests/test_torch_parity.py`). One detail separates
# the two of them: lower-casing. transformers 5 (Rust) lower-cases character by
# character; BERT's Python tokenizer, which salesforce/BLIP ran, calls `str.lower`,
# which knows that a Greek capital sigma at the end of a word is written "ς".
# minblip follows transformers 5 and keeps the old rule one argument away:

# %%
greek = "ΟΔΟΣ ΣΑΣ"
print("transformers 5:", basic_tokenize(greek), "| legacy:",
      basic_tokenize(greek, legacy_lowercase=True))

# %% [markdown]
# ## 5. The comparison with PyTorch
#
# In an environment with torch and transformers, `tests/test_torch_parity.py` builds
# tiny Hugging Face BLIPs with random weights, saves them, loads them with
# `minblip.hf` and compares them in float64: the ITM logits and the caption logits must
# agree to 1e-8 (they differ by rounding), greedy captions token for token.
#
# `reference/torch_twin.py` goes further, in the spirit of llm.c: it writes minblip's
# **pretraining step** a second time in PyTorch, from Hugging Face's modules, with
# the encoder-decoder sharing of salesforce/BLIP's `tie_encoder_decoder_weights`,
# [ENC] for ITM, [DEC] for LM and label smoothing 0.1, and the same hard negatives.
# Both take one step; the gradient of every tensor is compared. Its last run:

# %%
runs = {d: json.loads((ROOT / "reference" / f"twin_{d}.json").read_text())
        for d in ("float64", "float32")}
rows = runs["float64"]["rows"]
print(f"transformers {runs['float64']['transformers']}, torch {runs['float64']['torch']}")
for r in rows[:4] + [r for r in rows if r["name"] in ("temp", "pixels")]:
    print(f"{r['name']:<10} torch {r['max_ref']:10.4e}   |minblip - torch| {r['max_abs']:.1e}")
atol64 = runs["float64"]["tolerance"]["atol"]
worst64 = max(r["rel"] for r in rows if r["max_ref"] > atol64)
print(f"float64: the largest relative difference over {len(rows)} tensors is {worst64:.1e}")
assert 1e-16 < worst64 < 1e-13  # "about 1e-14" in the summary

# %%
fig, ax = plt.subplots(figsize=(11, 4))
zero = [i for i, r in enumerate(runs["float64"]["rows"])
        if r["max_ref"] <= runs["float64"]["tolerance"]["atol"]]
for i in zero:
    ax.axvline(i, color="0.85", lw=3, zorder=0)
for d, colour in (("float64", "tab:blue"), ("float32", "tab:orange")):
    rel = np.array([r["rel"] for r in runs[d]["rows"]])
    keep = np.setdiff1d(np.arange(len(rel)), zero)
    ax.scatter(keep, np.maximum(rel[keep], 1e-17), s=9, color=colour, label=d)
    ax.axhline(runs[d]["tolerance"]["rtol"], color=colour, ls="--", lw=1)
ax.set_yscale("log")
ax.set_ylim(5e-18, 1e-2)
ax.set_xlabel("tensor: the losses, then every parameter (Hugging Face order), then the pixels")
ax.set_ylabel("max |minblip - torch| / max |torch|")
ax.set_title("One BLIP pretraining step, minblip vs PyTorch (dashed: tolerance; grey: gradient "
             "zero in exact arithmetic; 1e-17: identical)")
ax.legend(loc="center left")
plt.tight_layout()
plt.show()

# %% [markdown]
# The grey columns are the attention **key biases**. Their gradient is zero in exact
# arithmetic: adding $b$ to every key adds the same $q \cdot b$ to every score of a
# query's row, and softmax ignores a constant shift. Both implementations return
# rounding noise of about $10^{-17}$ there, so they are compared with an absolute
# tolerance instead.
#
# **Beam search** depends on conventions (what length a finished caption's score is
# divided by, whether [SEP] is masked before or after the log-softmax, which [SEP]
# candidates count) that differ between transformers versions. `minblip.generation`
# follows transformers 5, and its beams match token for token, also when hypotheses
# end early (here and in section 6).

# %% [markdown]
# ## 6. BLIP-2 from a checkpoint folder
#
# A Hugging Face `Blip2ForConditionalGeneration` folder holds four models under one
# `config.json`: the EVA ViT-g (`vision_model.*`: a ViT whose attention has q and v
# biases but no k bias, and whose `post_layernorm` is LAVIS's `ln_vision`), the
# Q-Former with its learned queries (`query_tokens`, `qformer.*`), the
# `language_projection` and an OPT (`language_model.*`, with OPT's position table
# offset by 2). `minblip.hf_blip2.load_blip2` maps them onto the same
# `Blip2Stage2` that notebook 11 trains, with the ViT and the OPT frozen. The
# repository commits tiny random checkpoints built by transformers
# (`reference/make_hf_fixtures.py`), with transformers' outputs beside them. This
# one has 8 queries, odd head counts (3, 5, 7), and is split over two shards:

# %%
folder = ROOT / "tests" / "fixtures" / "hf" / "blip2_opt_q8"
print(sorted(f.name for f in folder.iterdir()))
ckpt = Checkpoint(folder)  # reads the index and the two headers, no tensor yet
print(f"{len(ckpt.names)} tensors in {len(ckpt.files)} files, {ckpt.nbytes:,} bytes of data")
blip2 = hf_blip2.load_blip2(folder, np.float64)
c = blip2.configs
print(f"queries {c.qformer.num_queries}, heads {c.vision.heads}/{c.qformer.heads}/{c.lm.heads}, "
      f"parameters {blip2.param_count(include_frozen=True):,}, trainable in stage 2 "
      f"{blip2.param_count():,}")

# %% [markdown]
# The tokenizer is OPT's byte-level BPE (`minblip.bpe`): the text's UTF-8 bytes,
# each written as a printable character (a space is `Ġ`), merged pair by pair in the
# order of `merges.txt`. OPT puts `</s>` in front. Caption the photograph of notebook
# 03 and ask it a question as LAVIS prompts BLIP-2 ("Question: ... Answer:"), and
# compare with what transformers generated for the same pixels:

# %%
bpe = ByteLevelBPETokenizer.from_folder(folder)
print(bpe.tokenize("Question: what is in the picture? Answer:"))
photo = preprocess(str(ROOT / "data_samples" / "photos" / "grace_hopper.jpg"),
                   c.vision.image_size).astype(np.float64)
ref = np.load(ROOT / "tests" / "fixtures" / "hf" / "reference" / "blip2_opt_q8.npz")
meta = json.loads((ROOT / "tests" / "fixtures" / "hf" / "reference"
                   / "blip2_opt_q8.json").read_text())
question = bpe.encode(meta["question"])
assert question.tolist() == ref["question_ids"].tolist()
soft = blip2.soft_prompt(images=photo)  # (1, Q, E): the projected queries
logits, _ = blip2.language_model.forward(question[None], prefix_embeds=soft)
gap = np.abs(logits[:, -ref["logits"].shape[1]:] - ref["logits"]).max()
print(f"queries {soft.shape}, max |minblip - transformers| on the logits: {gap:.1e}")
assert gap < 1e-8
for g in meta["generations"][:1] + meta["generations"][-3:-2]:
    ids = hf_blip2.blip2_generate(blip2, photo, g["prompt"], method=g["method"],
                                  num_beams=g["num_beams"], max_length=g["max_length"],
                                  min_length=g["min_length"])[0]
    same = ids.tolist() == g["ids"]
    print(f"{g['method']:<6} {g['num_beams']} beam(s): {bpe.decode(ids).strip()!r} | "
          f"transformers': {g['text']!r} | same ids: {same}")
    assert same

# %% [markdown]
# (Random weights: the words mean nothing. What matters is that they are
# transformers' words, token for token. The committed checkpoints also cover 1 and 32
# queries, a bfloat16 file and BLIP's VQA model; `tests/test_hf_blip2.py` checks
# float64 outputs to 1e-8, float32 to 1e-4 and every greedy and beam generation.)
#
# ### The memory-mapped loader
#
# How much memory does loading take? The naive reader reads the file's bytes, makes
# an array of every tensor, converts each to float32, then copies them into the
# model: the file, the converted copy and the model exist at the same time. For
# BLIP-2 OPT-2.7b, whose checkpoint is float16, that is more than a 24 GB machine
# has. The sizes follow from the config alone. First a parameter count written from
# the architecture, checked against the tiny model:

# %%
def blip2_parameters(c) -> int:
    """Parameters of a BLIP-2 (OPT) from its sizes (hf_blip2.Blip2Configs)."""
    v, q, lm = c.vision, c.qformer, c.lm
    D, F = v.width, v.mlp_dim
    qv_bias = 2 * D if v.qkv_bias else 0  # EVA: q and v biases, no k bias
    vit = (D * 3 * v.patch_size ** 2 + D + D + (v.num_patches + 1) * D  # patches, [CLS], pos
           + v.depth * (3 * D * D + qv_bias + D * D + D + 2 * D * F + F + D + 4 * D)
           + 2 * D)  # + ln_vision
    Dq, Fq = q.width, q.mlp_dim

    def attention(d_kv):  # query, key, value, output projection and the LayerNorm after
        return Dq * Dq + Dq + 2 * (d_kv * Dq + Dq) + Dq * Dq + Dq + 2 * Dq

    crossing = len(range(0, q.depth, q.cross_attention_freq))
    qformer = (q.num_queries * Dq + 2 * Dq + q.depth * (attention(Dq) + 2 * Dq * Fq + Fq + 3 * Dq)
               + crossing * attention(v.width))
    E, Dl, Fl = lm.token_width, lm.width, lm.mlp_dim
    projection = Dq * E + E
    opt = (lm.vocab_size * E + (lm.max_positions + lm.position_offset) * Dl
           + (2 * E * Dl if E != Dl else 0) + (2 * Dl if lm.final_norm else 0)
           + lm.depth * (4 * (Dl * Dl + Dl) + 2 * Dl * Fl + Fl + Dl + 4 * Dl))
    return vit + qformer + projection + opt


assert blip2_parameters(c) == blip2.param_count(include_frozen=True)
# Salesforce/blip2-opt-2.7b's published sizes: ViT-g, the BERT-base Q-Former, OPT-2.7b
opt27 = hf_blip2.blip2_configs_from_hf({
    "model_type": "blip-2", "num_query_tokens": 32,
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "qformer_config": {"hidden_size": 768, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "intermediate_size": 3072},
    "text_config": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 2560,
                    "num_hidden_layers": 32, "ffn_dim": 10240, "num_attention_heads": 32,
                    "max_position_embeddings": 2048}})
n = blip2_parameters(opt27)
GB = 1e9
file_gb, model_gb = 2 * n / GB, 4 * n / GB  # float16 on disk, float32 to compute in
largest = opt27.lm.vocab_size * opt27.lm.token_width  # the biggest tensor: OPT's token table
print(f"BLIP-2 OPT-2.7b: {n / 1e9:.2f} billion parameters; {file_gb:.1f} GB as float16, "
      f"{model_gb:.1f} GB as float32")
print(f"read the file, convert, copy in: {file_gb + 2 * model_gb:.1f} GB at the peak")
print(f"memory-mapped, one tensor at a time: {model_gb:.1f} GB + at most "
      f"{2 * largest / GB:.2f} GB of mapped file")

# %% [markdown]
# `np.memmap` asks the operating system to map a range of the file into the
# address space: nothing is read until an element is touched, the pages come
# from the page cache (shared with every other reader of the file, and dropped
# when memory is short), and no copy of the file is made in the process. The
# loader (`minblip.safetensors.Checkpoint`) opens only the headers; the config is
# checked against them before anything is built (the model is built with
# placeholders, `core.deferred_params`); then each tensor is mapped. One stored in
# the working dtype stays mapped and *is* the Param's data (copy-on-write: a
# training step writes private pages, never the file), paged in as the forward pass
# reads it, as transformers does; any other (here float32 into float64, or a
# float16 file) is converted once and unmapped:

# %%
name = "language_model.model.decoder.embed_tokens.weight"
mapped = ckpt.files[0].mapped(name) if name in ckpt.files[0] else ckpt.files[1].mapped(name)
print(type(mapped).__name__, mapped.dtype, mapped.shape, "| owns its memory:",
      mapped.flags.owndata, "| writeable:", mapped.flags.writeable)

# %% [markdown]
# Where the layouts agree (an embedding table, a LayerNorm) the tensor is converted
# straight into the Param's array. A Linear weight is stored $(d_\text{out},
# d_\text{in})$ and minblip's `W` is its transpose: copying it transposed is several
# times slower than a plain copy, so the loader converts it in the stored layout and
# hands the Param the transposed *view*, an array in Fortran order. Matrix products
# read either order. The three parts of a fused qkv are views of one array too:

# %%
eva = blip2.visual_encoder.blocks[0].attn
fc1 = blip2.language_model.layers[0].mlp.fc1.W.data
print("q, v share one buffer:", eva.query.W.data.base is eva.value.W.data.base,
      "| fc1.W Fortran-ordered view:", fc1.flags.f_contiguous and fc1.base is not None)
print("the EVA ViT has no key bias:", eva.key.b is None)

# %% [markdown]
# What that buys at full size is measured by `benchmarks/bench_hf_load.py` (a
# random-initialised model of the real shapes, minblip and transformers one after the
# other in fresh processes) and shown in the README. Its last runs: BLIP base from a
# float32 file (used in place) and from a float16 one (converted once), and BLIP-2
# OPT-2.7b from its four float16 shards:

# %%
results_file = ROOT / "benchmarks" / "hf_load_results.json"
results = json.loads(results_file.read_text()) if results_file.exists() else {}
for key in ("blip-base", "blip-base-float16", "blip2-opt-2.7b"):
    run = results.get(key)
    if run is None or "error" in run["minblip"] or "error" in run["hf"]:
        print(f"{key}: no measurement yet (python benchmarks/bench_hf_load.py --model {key})")
        continue
    m, h = run["minblip"], run["hf"]
    print(f"{key}: {m['weights_float32_mb']:.0f} MB of float32 weights. Load: minblip "
          f"{m['load_cpu_seconds']:.2f} s of CPU, peak {m['load_peak_mb']:.0f} MB "
          f"({run['peak_over_weights']:.2f} x the weights); transformers "
          f"{h['load_cpu_seconds']:.2f} s, {h['load_peak_mb']:.0f} MB. Load and two captions: "
          f"peak {m['peak_mb']:.0f} MB against {h['peak_mb']:.0f} MB")


# %% [markdown]
# ## Summary
#
# * safetensors = 8-byte length + JSON header + raw little-endian bytes; a reader and
#   writer take a few dozen lines of NumPy, and nothing in the file is executed.
# * Loading is a name map plus layout changes: transposed Linears, the ViT's fused
#   $(3D, D)$ qkv split into three, the patch Conv2d reshaped into a matmul, the LM
#   head's tied output weight taken from the word embeddings.
# * The maps are linear, so gradients convert exactly like weights.
# * Hugging Face's BLIP differs from the original in LayerNorm eps, label smoothing,
#   and the first token for ITM and LM training; minblip makes each a choice.
# * Against PyTorch in float64, minblip's outputs agree to rounding and every gradient
#   of a full pretraining step to about $10^{-14}$ of its scale (section 5).
# * BLIP-2 (EVA ViT, Q-Former, OPT with its position offset) loads into the stage-2
#   model of notebook 11; with OPT's byte-level BPE it captions and answers exactly
#   as transformers does.
# * Checkpoints are read memory-mapped, one tensor at a time, converted once into the
#   working dtype: the model plus one mapped tensor at the peak, never the file, its
#   conversion and the model together.
#
# ## Exercises
#
# 1. **A transposition bug.** In a copy of `hf.hf_tensors`' entries, replace the
#    `from_hf` of `text_proj.weight` by the identity (no transpose) for a square
#    projection (`embed_dim` = text width). Does loading still succeed? Which output
#    changes, and which test in `tests/test_torch_parity.py` would catch it?
# 2. **Sharded checkpoints.** Large models come as several files plus
#    `model.safetensors.index.json` (`{"weight_map": {name: file}}`). Split a saved
#    BLIP into two shards by hand, load it with `hf.load_blip`, then make the index
#    lie (a tensor in the wrong shard) and read the error.
# 3. **Vocabulary coverage.** With the 30,522-token BERT vocabulary every lower-case
#    ASCII word can be spelled (every letter exists as a piece and as a `##` piece).
#    Show with the small vocabulary above which words become `[UNK]`, and explain why
#    "dogs" does not.
# 4. **bfloat16 by hand.** Write float32 -> bfloat16 with round-to-nearest-even on
#    the upper 16 bits (what `torch.Tensor.to(torch.bfloat16)` does), write a file
#    with dtype "BF16" and check that the reader gives back exactly the rounded
#    values. What happens to NaN, to infinity, and to the largest float32?
# 5. **Counting placeholders.** transformers 5 puts 32 `<image>` ids before the
#    prompt and counts them in `generate(max_length=)`; minblip counts BOS, the
#    prompt and the new tokens. Which `max_length` reproduces, in each, LAVIS's
#    "30 new tokens after the prompt"?

# %% [markdown]
# ## Graded exercise
#
# It comes with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) the solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after it passes once your code is right, and
# `python -m minblip.exercises check 12.1` runs the same checks from a terminal and says
# what is wrong and where. You write a package exercise in the function of `minblip/` it
# names. The graded files are those of `minblip/`.
#
# ### Exercise 12.1 · The fused qkv weight of a Hugging Face ViT
#
# **Goal.** Write the bodies of `fused_qkv_to_hf(weights)` and
# `fused_qkv_from_hf(weight)` in `minblip/hf.py`: the map between minblip's three
# attention weights $[W_q, W_k, W_v]$, each $(D, D)$ stored $(d_\text{in}, d_\text{out})$,
# and Hugging Face's fused `qkv.weight` $(3D, D)$, one `nn.Linear` weight stored
# $(d_\text{out}, d_\text{in})$. `hf_tensors` uses the pair for every ViT layer, to
# load checkpoints and to save them.
#
# **Hints.** Section 3: the fused layer's output is `x @ weight.T`, whose first $D$
# columns are q, the next $D$ k, the last $D$ v. Which axis of `weight` holds the
# outputs? Every block is square, so a missing transpose gives the right shapes and the
# wrong numbers: the check compares numbers.

# %% nbgrader={"grade": true, "grade_id": "ex12_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
x_check = np.random.default_rng(121).standard_normal((5, 16)).astype(np.float32)
w_q, w_k, w_v = hf.fused_qkv_from_hf(qkv_w)  # the saved layer 0 of section 3
print("from_hf:", qkv_w.shape, "->", [w.shape for w in (w_q, w_k, w_v)])
for name, w, part in zip("qkv", (w_q, w_k, w_v), np.split(x_check @ qkv_w.T, 3, axis=-1)):
    assert np.allclose(x_check @ w, part, rtol=1e-5, atol=1e-5), f"W{name} does not compute {name}"
back = hf.fused_qkv_to_hf([att.query.W.data, att.key.W.data, att.value.W.data])
print("to_hf:", back.shape, "| equals the saved tensor:", np.array_equal(back, qkv_w))
assert np.array_equal(back, qkv_w)
