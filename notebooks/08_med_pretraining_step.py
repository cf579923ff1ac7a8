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
# # 08 · MED parameter sharing and one full pretraining step
#
# **Goal.** Put the pieces together. One BLIP pretraining step runs the ViT once, the
# text encoder three times (ITC, ITM positives, ITM negatives) and the decoder once,
# and the encoder and decoder share most of their weights. In this notebook we
#
# 1. list exactly which parameters the encoder and decoder share, and check that
#    sharing is object identity;
# 2. count parameters under the three sharing settings;
# 3. show why the gradient of a shared weight is a *sum*, and why "tied only at
#    initialisation" would be a different model;
# 4. read `pretrain_step` as a forward block and its mirrored backward block;
# 5. gradient-check the whole step in float64, image pixels included;
# 6. switch objectives off one at a time and see which parts of the model each one
#    trains.
#
# ## 1. The paper's idea
#
# BLIP's text side is a *multimodal mixture of encoder-decoder* (MED, paper section
# 3.1). During pre-training the text encoder and the text decoder share every
# parameter except the self-attention layers (section 3.2). The argument: encoding
# and decoding differ mostly in how tokens look at each other, bidirectionally in the
# encoder and causally in the decoder, and that lives in self-attention. The
# embeddings, the cross-attention to the image and the feed-forward networks do
# similar work in both, so sharing them saves parameters and lets each task's
# gradient improve the other (multi-task learning).
#
# The paper's ablation (Table 3, section 4.4) pre-trains with four settings: share
# everything, everything but cross-attention, everything but self-attention, nothing.
# Sharing all but self-attention gives the best downstream results, with fewer
# parameters than sharing nothing; sharing the self-attention as well hurts, because
# one set of attention weights then has to serve two conflicting tasks.
#
# In code it is one call in `BLIP_Pretrain.__init__` (salesforce/BLIP
# `models/blip_pretrain.py`): `tie_encoder_decoder_weights(self.text_encoder,
# self.text_decoder.bert, '', '/attention')`, which walks both BERTs and makes the
# encoder's weight **the same `nn.Parameter` object** as the decoder's, for every
# module whose path does not contain `/attention`.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import dataclasses
import inspect
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import Param, gradcheck
from minblip.blip import BLIP, BLIPConfig, pretrain_step
from minblip.image import preprocess
from minblip.optim import AdamW
from minblip.text import SHARING_MODES, TextConfig, parameter_count_table, shared_parameter_names
from minblip.tokenizer import Tokenizer
from minblip.train import TrainConfig, build_tokenizer
from minblip.vit import ViTConfig
from minblip import world

np.set_printoptions(precision=4, suppress=True)
notebook_start = time.perf_counter()

# %% [markdown]
# ## 2. Which parameters are shared
#
# Why does `'/attention'` leave the cross-attention shared? BERT's module paths are
# `encoder/layer/3/attention/...` for self-attention and
# `encoder/layer/3/crossattention/...` for cross-attention: the substring
# `/attention` needs a slash right before "attention", which "crossattention" does not
# have. A few of BLIP's paths, tested the same way:

# %%
blip_paths = ["embeddings/word_embeddings", "embeddings/LayerNorm",
              "encoder/layer/0/attention/self/query", "encoder/layer/0/attention/output/dense",
              "encoder/layer/0/attention/output/LayerNorm",
              "encoder/layer/0/crossattention/self/key",
              "encoder/layer/0/crossattention/output/LayerNorm",
              "encoder/layer/0/intermediate/dense", "encoder/layer/0/output/dense",
              "encoder/layer/0/output/LayerNorm"]
for path in blip_paths:
    print(f"/{path:48s} {'separate' if '/attention' in '/' + path else 'shared'}")

# %% [markdown]
# minblip's `build_med` does the same with module objects: the decoder's BERT is given
# the encoder's `embeddings` and, in every layer, its `cross_attn`, `cross_attn_ln`,
# `ffn` and `ffn_ln`; it keeps its own `self_attn` and `self_attn_ln`. A tiny BLIP (the
# same sizes as the gradient check below):

# %%
words = "a picture of red blue green circle square small large left right the".split()
tok = Tokenizer(words)


def tiny_config(sharing="all_but_self_attention"):
    """A BLIP small enough for a float64 gradient check, with a wide init (std 0.4)."""
    vision = ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16,
                       init_std=0.4)
    text = TextConfig(vocab_size=tok.vocab_size, width=8, depth=1, heads=2, mlp_dim=16,
                      max_positions=12, encoder_width=8, init_std=0.4)
    return BLIPConfig(vision=vision, text=text, embed_dim=6, sharing=sharing,
                      proj_init_std=0.4)


model = BLIP(tiny_config(), np.random.default_rng(0)).to(np.float64)
enc, dec = model.text_encoder, model.text_decoder
names = shared_parameter_names(enc, dec)
print(f"{len(names)} Params are shared by the text encoder and the decoder:")
for n in names:
    print("  ", n)

# %% [markdown]
# Sharing is identity, not equality: the decoder *holds the same objects*.

# %%
e0, d0 = enc.layers[0], dec.bert.layers[0]
print("decoder.embeddings    is encoder.embeddings   :", dec.bert.embeddings is enc.embeddings)
print("decoder cross_attn    is encoder cross_attn   :", d0.cross_attn is e0.cross_attn)
print("decoder ffn.fc1.W     is encoder ffn.fc1.W    :", d0.ffn.fc1.W is e0.ffn.fc1.W)
print("decoder self_attn     is encoder self_attn    :", d0.self_attn is e0.self_attn)
print("decoder self_attn_ln  is encoder self_attn_ln :", d0.self_attn_ln is e0.self_attn_ln)
print("LM head output weight is encoder word table  :",
      dec.head.weight is enc.embeddings.word_embeddings.weight)
print("decoder-only Params:", [n for n, p in dec.named_params()
                               if id(p) not in {id(q) for q in enc.params()}])

# %% [markdown]
# The names map one-to-one onto BLIP's `med.py` (per layer $i$):
#
# | minblip | salesforce/BLIP `med.py` | shared? |
# |---|---|---|
# | `embeddings.word_embeddings`, `position_embeddings`, `layer_norm` | `embeddings.word_embeddings`, `position_embeddings`, `LayerNorm` | yes |
# | `layers.i.self_attn.{query,key,value,out}` | `encoder.layer.i.attention.self.{query,key,value}`, `attention.output.dense` | **no** |
# | `layers.i.self_attn_ln` | `encoder.layer.i.attention.output.LayerNorm` | **no** |
# | `layers.i.cross_attn.{query,key,value,out}` | `encoder.layer.i.crossattention.self.{query,key,value}`, `crossattention.output.dense` | yes |
# | `layers.i.cross_attn_ln` | `encoder.layer.i.crossattention.output.LayerNorm` | yes |
# | `layers.i.ffn.fc1`, `ffn.fc2`, `ffn_ln` | `encoder.layer.i.intermediate.dense`, `output.dense`, `output.LayerNorm` | yes |
# | `head.dense`, `head.layer_norm`, `head.bias` | `cls.predictions.transform.*`, `cls.predictions.bias` | decoder only |
# | `head.weight` (= the word table) | `cls.predictions.decoder.weight` (tied by Hugging Face) | yes, via the tie |
#
# So one $V\times D$ matrix is the encoder's input table, the decoder's input table
# and the decoder's output layer.

# %% [markdown]
# ## 3. Three sharing settings, counted
#
# minblip implements three of the paper's four settings (`SHARING_MODES`). Each Param
# is counted once (`Module.params()` deduplicates by identity). First the text side
# alone, then the whole BLIP, at the size `minblip.train` trains by default (width 64,
# 2 layers, the world's vocabulary):

# %%
default = TrainConfig()
vocab = build_tokenizer().vocab_size
toy_cfg = default.model_config(vocab)
print(f"{'sharing':24s} {'encoder':>9s} {'decoder only':>13s} {'shared':>8s} {'text total':>11s}")
for r in parameter_count_table(toy_cfg.text):
    print(f"{r['mode']:24s} {r['encoder_params']:9,d} {r['decoder_only_params']:13,d} "
          f"{r['shared_params']:8,d} {r['total_params']:11,d}")
print()
for mode in SHARING_MODES:
    n = BLIP(dataclasses.replace(toy_cfg, sharing=mode), np.random.default_rng(0)).param_count()
    print(f"whole BLIP, {mode:24s}: {n:9,d} parameters")

# %% [markdown]
# With BLIP's sharing the decoder adds only its self-attention blocks and the LM head's
# transform and bias on top of the encoder. Even the "none" setting keeps the LM head
# tied to its *own* word table.

# %% [markdown]
# ## 4. Shared weights, summed gradients
#
# Let $\theta$ be a shared weight, say the FFN's `layers.0.ffn.fc1.W`. It is used by
# the text encoder in calls 1-3 and by the decoder in call 4 (section 5), so the loss
# depends on it through four paths:
#
# $$L(\theta) = L_{ITC}\big(f_1(\theta)\big) + L_{ITM}\big(f_2(\theta), f_3(\theta)\big)
# + L_{LM}\big(f_4(\theta)\big)
# \quad\Longrightarrow\quad
# \frac{\partial L}{\partial \theta} = \sum_{c=1}^{4}
# \frac{\partial L}{\partial f_c}\,\frac{\partial f_c}{\partial \theta}.$$
#
# The chain rule sums over paths, and the core contract implements the sum: each of
# the four backward calls **adds** (`+=`) its term into the one `Param.grad`. A
# backward that assigned (`=`) would keep only one call's term.
#
# We split the gradient of two shared weights into what each objective contributes,
# then compare the sum, and each part alone, with a finite difference of the full loss
# along a random direction.

# %%
B = 3
captions = ["a red circle", "a large blue square left of a green circle", "the small square"]
ids, mask = tok.encode(captions)
images = np.random.default_rng(1).standard_normal((B, 3, 8, 8))
negatives = (np.array([2, 0, 0]), np.array([1, 2, 0]))  # image 0 is a negative twice
special = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id)


def step_grads(m, weights=(1.0, 1.0, 1.0), imgs=images):
    """Run one step with fixed negatives; return (StepResult, {name: grad copy})."""
    m.zero_grad()
    r = pretrain_step(m, imgs, ids, mask, weights=weights, negatives=negatives, **special)
    return r, {n: p.grad.copy() for n, p in m.named_params()}


objectives = {"ITC": (1, 0, 0), "ITM": (0, 1, 0), "LM": (0, 0, 1)}
full, g_full = step_grads(model)
alone = {obj: step_grads(model, w) for obj, w in objectives.items()}


def directional_check(name, param):
    """Finite difference of the full loss along a random unit direction D of one Param,
    against the summed gradient and against each objective's part alone."""
    D = np.random.default_rng(2).standard_normal(param.shape)
    D /= np.linalg.norm(D)
    h = 1e-5
    original = param.data.copy()
    losses = []
    for sign in (1, -1):
        param.data[...] = original + sign * h * D
        losses.append(pretrain_step(model, images, ids, mask, negatives=negatives,
                                    backward=False, **special).loss)
    param.data[...] = original
    numeric = (losses[0] - losses[1]) / (2 * h)
    print(name)
    candidates = [("sum of all (+=)", g_full[name])]
    candidates += [(f"{obj} part only", alone[obj][1][name]) for obj in objectives]
    for label, g in candidates:
        a = float(np.sum(g * D))
        err = abs(a - numeric) / max(abs(a) + abs(numeric), 1e-300)
        print(f"  {label:16s} |g| = {np.linalg.norm(g):7.4f}   along D: {a: .8f} "
              f"(numeric {numeric: .8f}), rel error {err:.1e}")


directional_check("text_encoder.layers.0.ffn.fc1.W", e0.ffn.fc1.W)
directional_check("text_encoder.layers.0.cross_attn.query.W", e0.cross_attn.query.W)

# %% [markdown]
# Only the sum agrees with the finite difference (to about $10^{-10}$). For the FFN
# weight ITC's part dominates at this initialisation, so "ITC only" is off by about a
# per cent, still a thousand times the tolerance of a gradient check; for the
# cross-attention, which the ITC pass never uses (text mode), ITM and LM contribute
# comparable amounts and either one alone is far off.
#
# **"Is the sharing only at initialisation?"** (BLIP issue #93). No:
# `tie_encoder_decoder_weights` assigns `Parameter` objects, so there is one tensor,
# one gradient (the sum above) and one optimiser state. A model that merely *copied*
# the encoder's weights into the decoder at initialisation would be a different model:
# the two copies get different gradients and drift apart at the first step. We build
# that "copied at init" variant from an unshared BLIP and take one AdamW step on both.

# %%
def copy_encoder_into_decoder(m):
    """Make an unshared BLIP start like a shared one: same values, different objects."""
    e, d = m.text_encoder, m.text_decoder.bert
    pairs = list(zip(e.embeddings.params(), d.embeddings.params()))
    for le, ld in zip(e.layers, d.layers):
        for part in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
            pairs += list(zip(getattr(le, part).params(), getattr(ld, part).params()))
    for pe, pd in pairs:
        pd.data[...] = pe.data
    return m


tied = BLIP(tiny_config(), np.random.default_rng(3)).to(np.float64)
copied = copy_encoder_into_decoder(
    BLIP(tiny_config("none"), np.random.default_rng(3)).to(np.float64))
for label, m in (("tied (BLIP)", tied), ("copied at init", copied)):
    opt = AdamW(m, lr=1e-3)
    step_grads(m)
    opt.step()
    e, d = m.text_encoder.layers[0].ffn.fc1.W, m.text_decoder.bert.layers[0].ffn.fc1.W
    print(f"{label:15s} {m.param_count():5d} params; after one step, "
          f"max |encoder W - decoder W| = {np.abs(e.data - d.data).max():.2e}")

# %% [markdown]
# ## 5. One full pretraining step
#
# `pretrain_step` (mirroring `BLIP_Pretrain.forward`) makes four text calls:
#
# | call | module | position 0 | self-attention mask | image tokens | output used | loss |
# |---|---|---|---|---|---|---|
# | 1 | text encoder | `[CLS]` | padding | none (`mode='text'`) | $h_0$ → `text_proj` → L2 norm | ITC |
# | 2 | text encoder | `[ENC]` | padding | `image_embeds` (B) | $h_0$ → `itm_head` | ITM, positives |
# | 3 | text encoder | `[ENC]` | padding | `image_embeds[neg_img]` ‖ `image_embeds` (2B) | $h_0$ → `itm_head` | ITM, negatives |
# | 4 | text decoder | `[DEC]` | causal ∧ padding | `image_embeds` (B) | logits | LM |
#
# Call 3 pairs each text with a hard-negative image and each image with a hard-negative
# text, sampled from the ITC similarities (notebook 06). The image tokens fan
# out to ITC (the `[CLS]` token through `vision_proj`), both ITM calls (call 3 through a
# gather that may repeat an image) and the decoder. Each call returns its own cache;
# nothing is stored on the modules.
#
# That table is what the code does; here it is *observed*. `minblip.diagrams` records
# every call of the model's ViT, text encoder and text decoder during one real
# `pretrain_step` of the tiny model (the gradients it leaves are zeroed again), and draws
# them in order, with the order of their backwards:

# %%
from minblip import diagrams  # noqa: E402

calls = diagrams.trace_pretraining_step(model, tok, images, ids, mask, np.random.default_rng(3))
model.zero_grad()
fig = diagrams.draw_pretraining_step(calls, batch=B)
plt.show()
text_calls = [c for c in calls if c.module != "visual_encoder"]
assert [(c.module, c.first_token, c.rows // B, c.with_image) for c in text_calls] == [
    ("text_encoder", "[CLS]", 1, False), ("text_encoder", "[ENC]", 1, True),
    ("text_encoder", "[ENC]", 2, True), ("text_decoder", "[DEC]", 1, True)]

# %% [markdown]
# The forward block:
#
# The forward block:

# %%
src = inspect.getsource(pretrain_step).splitlines()
fwd = next(i for i, line in enumerate(src) if "# ---------------- forward" in line)
bwd = next(i for i, line in enumerate(src) if "# ---------------- backward" in line)
print("\n".join(src[fwd:bwd]))

# %% [markdown]
# The backward block reads the forward bottom-up. Two rules fix its order:
#
# * a producer is back-propagated only after **all** its consumers have added their
#   contribution: `d_image_embeds` collects LM, ITM (negatives, then positives) and
#   ITC, and only then does the ViT's backward run, once;
# * among the consumers the order is free, because `+=` commutes: the shared text
#   Params receive four contributions in whatever order they come.
#
# The gather `image_embeds[neg_image_idx]` is undone by `np.add.at`, which adds twice
# when an image was picked twice (plain fancy-index `+=` would keep only one).

# %%
print("\n".join(src[bwd:]))

# %% [markdown]
# ## 6. Gradient check of the whole step
#
# In float64, with the negatives fixed (BLIP samples them without gradient, so they are
# data) and dropout off. Every Param is probed at 4 coordinates (its largest gradient
# among them), plus the image pixels, plus one random direction through all Params
# and pixels at once. The test suite's threshold for the whole step is a relative
# tolerance of $10^{-5}$; the report raises if any check fails.

# %%
def check_step(sharing):
    m = BLIP(tiny_config(sharing), np.random.default_rng(4)).to(np.float64)
    pixels = Param(images, dtype=np.float64)

    def loss_fn(backward):
        if backward:
            m.zero_grad()
        r = pretrain_step(m, pixels.data, ids, mask, negatives=negatives, backward=backward,
                          **special)
        if backward:
            pixels.grad += r.d_images
        return r.loss

    return gradcheck(loss_fn, m.named_params() + [("pixels", pixels)], n_coords=4, rtol=1e-5)


def component(name):
    """The part of BLIP a Param belongs to."""
    for key, label in (("visual_encoder", "ViT"), ("pixels", "image pixels"),
                       ("embeddings", "word/position embeddings"),
                       ("text_decoder.bert.layers", "decoder self-attention"),
                       ("self_attn", "encoder self-attention"),
                       ("cross_attn", "cross-attention"), ("ffn", "FFN"),
                       ("text_decoder.head", "LM head"), ("vision_proj", "vision_proj"),
                       ("text_proj", "text_proj"), ("itm_head", "itm_head"), ("temp", "temp")):
        if key in name:
            return label
    return name


t0 = time.perf_counter()
report = check_step("all_but_self_attention")
seconds = time.perf_counter() - t0
groups = {}
for row in report.rows:
    g = groups.setdefault(component(row.name), [0, 0, 0.0, True])
    g[0] += 1
    g[1] += row.n_checked
    g[2] = max(g[2], row.max_rel_err)
    g[3] &= row.passed
print(f"{'component':26s} {'arrays':>6s} {'coords':>6s} {'max rel err':>12s}")
for label, (n, coords, err, ok) in groups.items():
    print(f"{label:26s} {n:6d} {coords:6d} {err:12.1e}  {'ok' if ok else 'FAIL'}")
print(f"{'random direction (all)':26s} {'':6s} {'':6s} {report.directional.max_rel_err:12.1e}")
print(f"\n{len(report.rows)} arrays, max relative error {report.max_rel_err:.1e}, "
      f"passed: {report.passed} ({seconds:.1f} s)")

# %% [markdown]
# The same check for the other two sharing settings (with "all", the decoder *is* the
# encoder, self-attention included; with "none", nothing but each LM head's tie):

# %%
for sharing in ("all", "none"):
    r = check_step(sharing)
    worst = max(r.rows, key=lambda row: row.max_rel_err)
    print(f"{sharing:5s}: {len(r.rows):3d} arrays, max relative error {r.max_rel_err:.1e}, "
          f"random direction {r.directional.max_rel_err:.1e}, passed: {r.passed}")
    a, n = worst.worst_values
    print(f"       worst: {worst.name}, analytic {a:.6e} vs numeric {n:.6e} "
          f"(absolute error {abs(a - n):.1e})")

# %% [markdown]
# The largest relative errors come from gradient entries that are themselves tiny: a
# central difference in float64 carries an absolute rounding error of roughly
# $10^{-11}$ here, which is a visible fraction of an entry of size $10^{-5}$ or
# $10^{-6}$. That is why the checker combines an absolute and a relative tolerance and
# why the test suite allows $10^{-5}$ for the whole step, while the errors of entries
# of ordinary size are around $10^{-8}$ and below.

# %% [markdown]
# ## 7. One objective off, exactly its gradient gone
#
# The step's loss is $w_{ITC} L_{ITC} + w_{ITM} L_{ITM} + w_{LM} L_{LM}$ and its
# gradient is linear in the weights. So the gradient with one objective switched off
# must differ from the full one by exactly that objective's gradient alone, for every
# Param, shared or not:

# %%
off = {"ITC": (0, 1, 1), "ITM": (1, 0, 1), "LM": (1, 1, 0)}
scale = max(np.abs(g).max() for g in g_full.values())
for obj, w in off.items():
    r, g_off = step_grads(model, w)
    err = max(np.abs(g_full[n] - g_off[n] - alone[obj][1][n]).max() for n in g_full)
    print(f"without {obj:3s}: max |g_full - g_without - g_{obj} alone| = {err:.1e} "
          f"(largest gradient entry {scale:.1f}); "
          f"loss difference {full.loss - r.loss:.6f} = {obj} loss {alone[obj][0].loss:.6f}")

# %% [markdown]
# ## 8. Which loss trains which part
#
# Now a real model at its real initialisation: the default toy size, a batch of 16
# world images with their captions. For each group of Params we take the norm of the
# gradient each objective contributes, and draw each objective's share of the three
# norms. Expected from the call table of section 5:
#
# * `text_proj`, `vision_proj` and `temp`: **ITC only**; `itm_head`: **ITM only**;
# * the LM head's transform and bias and the decoder's self-attention: **LM only**
#   (the head's output weight is the word table, counted with the embeddings);
# * cross-attention: **ITM and LM** (the ITC pass runs in text mode, without it);
# * the encoder's self-attention: **ITC and ITM**;
# * embeddings, FFN and the ViT: all three.

# %%
data = world.make_dataset(16, 0, 0, seed=1)
pix = preprocess(data.train.images, default.image_size)
wtok = build_tokenizer()
w_ids, w_mask = wtok.encode(data.train.captions)
real = BLIP(toy_cfg, np.random.default_rng(0))  # BLIP's sharing, float32, init std 0.02
first = pretrain_step(real, pix, w_ids, w_mask, cls_id=wtok.cls_id, enc_id=wtok.enc_id,
                      dec_id=wtok.dec_id, rng=np.random.default_rng(0), backward=False)
fixed = (first.neg_image_idx, first.neg_text_idx)

group_order = ["ViT", "vision_proj", "temp", "text_proj", "word/position embeddings",
               "encoder self-attention", "cross-attention", "FFN", "decoder self-attention",
               "LM head", "itm_head"]
norms = {}
for obj, w in (("ITC", (1, 0, 0)), ("ITM", (0, 1, 0)), ("LM", (0, 0, 1))):
    real.zero_grad()
    pretrain_step(real, pix, w_ids, w_mask, cls_id=wtok.cls_id, enc_id=wtok.enc_id,
                  dec_id=wtok.dec_id, weights=w, negatives=fixed)
    sq = dict.fromkeys(group_order, 0.0)
    for n, p in real.named_params():
        sq[component(n)] += float(np.sum(p.grad.astype(np.float64) ** 2))
    norms[obj] = np.sqrt([sq[g] for g in group_order])

total = sum(norms.values())
fig, ax = plt.subplots(figsize=(9, 4.8))
left = np.zeros(len(group_order))
colours = {"ITC": "C0", "ITM": "C1", "LM": "C2"}
for obj in ("ITC", "ITM", "LM"):
    share = norms[obj] / total
    ax.barh(group_order, share, left=left, color=colours[obj], label=obj)
    left += share
for i, g in enumerate(group_order):
    who = "+".join(o for o in ("ITC", "ITM", "LM") if norms[o][i] > 0)
    ax.text(1.01, i, who, va="center", fontsize=8)
ax.invert_yaxis()
ax.set_xlim(0, 1.16)
ax.set_xlabel("share of the per-objective gradient norms, ‖g_obj‖ / Σ ‖g_obj‖")
ax.legend(loc="upper center", bbox_to_anchor=(0.45, -0.13), ncol=3, fontsize=9)
ax.set_title("Which objective sends gradient where (BLIP sharing, at initialisation)",
             loc="left", fontsize=10)
plt.tight_layout()
plt.show()
print("exactly zero contributions:",
      [(g, o) for o in ("ITC", "ITM", "LM") for g, v in zip(group_order, norms[o]) if v == 0])
# the expectations listed above the picture, as (group, objective that sends nothing)
expected_zero = {("cross-attention", "ITC"), ("decoder self-attention", "ITC"), ("LM head", "ITC"),
                 ("itm_head", "ITC"), ("vision_proj", "ITM"), ("temp", "ITM"),
                 ("text_proj", "ITM"), ("decoder self-attention", "ITM"), ("LM head", "ITM"),
                 ("vision_proj", "LM"), ("temp", "LM"), ("text_proj", "LM"),
                 ("encoder self-attention", "LM"), ("itm_head", "LM")}
assert {(g, o) for o in ("ITC", "ITM", "LM") for g, v in zip(group_order, norms[o])
        if v == 0} == expected_zero

# %% [markdown]
# The picture matches the call table: the zero contributions are exact (those Params
# are not on that objective's path), and only the shared parts and the ViT get
# gradient from all three objectives. That is the multi-task learning the paper
# wants: the FFN and cross-attention the decoder uses are also trained by ITM, and the
# embeddings by all three.

# %%
print(f"whole notebook: {time.perf_counter() - notebook_start:.1f} s")

# %% [markdown]
# ## Summary
#
# * BLIP ties the encoder and decoder with `tie_encoder_decoder_weights(...,
#   '/attention')`: everything but the self-attention sub-blocks (and their LayerNorms)
#   is one object. In minblip the decoder holds the encoder's modules; the LM head's
#   output weight is the shared word table.
# * Sharing is permanent identity, not a copy at initialisation: one tensor, one
#   gradient, one optimiser state. A copy would drift apart after one step.
# * The gradient of a shared weight is the sum over every call that used it; `+=` in
#   every backward is what computes that sum.
# * `pretrain_step` = forward block (ViT, 3 encoder calls, 1 decoder call, 3 losses)
#   + mirrored backward (LM, ITM negatives, ITM positives, ITC, then the ViT once).
#   It passes a float64 gradient check on every Param and the pixels.
# * Each objective's gradient is exactly separable; ITC alone trains the
#   projections and temperature, ITM alone the ITM head, LM alone the LM head and the
#   decoder's self-attention.
#
# ## Exercises
#
# 1. **The fourth setting.** The paper's Table 3 also shares everything *except
#    cross-attention*. Build it from a `sharing="none"` BLIP by assigning the encoder's
#    `embeddings`, `self_attn`, `self_attn_ln`, `ffn` and `ffn_ln` to the decoder's
#    layers. Count its parameters, run `check_step`-style gradient checks, and redraw the
#    picture of section 8 for it. Which group now gets gradient from all three losses?
# 2. **An assigning backward.** Copy `FeedForward.backward` into a subclass that
#    assigns (`=`) instead of adding into `fc1.W.grad`, swap it into the tiny model's
#    shared FFN, and rerun the gradient check. Which rows fail, and by how much?
#    Why does `check_layer` on the FFN alone *not* catch the bug?
# 3. **Order of the backward.** Move the ViT backward in a copy of `pretrain_step` to
#    just after the LM block. Which gradients are now wrong, and which are still
#    right? Then swap the ITM and ITC blocks instead and show nothing changes.
# 4. **Momentum encoders are never tied.** `MomentumDistillation` holds deep copies of
#    the ViT, text encoder and projections. Check with `is` that none of its Params is a
#    model Param, and explain what would happen to the momentum update
#    $p_m \leftarrow m\,p_m + (1-m)\,p$ if they were the same objects.

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 8.1,8.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `08_med_pretraining_step.ipynb`**,
# not its jupytext twin `08_med_pretraining_step.py`: if you edit the `.py`, run
# `jupytext --sync 08_med_pretraining_step.py` before you check or hand in, or the
# checks still see the stub.
#
# ### Exercise 8.1 · Tying the MED encoder and decoder
#
# **Goal.** Write the `"all_but_self_attention"` branch of `build_med` in
# `minblip/text.py`: the decoder's BERT must use the encoder's embeddings and, layer by
# layer, its cross-attention, FFN and their two LayerNorms, but keep its own self-attention
# and self-attention LayerNorm.
#
# **Hints.** Section 2: sharing is handing over the *same module objects*
# (`setattr(decoder_layer, name, getattr(encoder_layer, name))`), never copying arrays;
# the sub-module names of a `PostNormBlock` are `self_attn`, `self_attn_ln`,
# `cross_attn`, `cross_attn_ln`, `ffn`, `ffn_ln`. The LM head is tied to the decoder's
# word embeddings when `TextDecoder` is built, after your code runs.

# %% nbgrader={"grade": true, "grade_id": "ex8_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.text import build_med  # noqa: E402

enc, dec = build_med(TextConfig(vocab_size=12, width=4, depth=2, heads=2, mlp_dim=8,
                                max_positions=6, encoder_width=3), np.random.default_rng(80))
shared = shared_parameter_names(enc, dec)
print(f"{len(shared)} shared Params; self-attention shared: "
      f"{any('self_attn' in n for n in shared)}")
assert dec.bert.embeddings is enc.embeddings
for e, d in zip(enc.layers, dec.bert.layers):
    assert all(getattr(d, n) is getattr(e, n) for n in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"))
    assert d.self_attn is not e.self_attn and d.self_attn_ln is not e.self_attn_ln
assert dec.head.weight is enc.embeddings.word_embeddings.weight

# %% [markdown]
# ### Exercise 8.2 · One weight, two models: the shared gradient
#
# **Goal.** Write `shared_ffn_step(ffn, x_enc, x_dec, R_enc, R_dec)`: one FFN module is held
# by the encoder and the decoder, and the loss is
# $\sum \mathrm{ffn}(x_{enc})\odot R_{enc} + \sum \mathrm{ffn}(x_{dec})\odot R_{dec}$. Return
# `(loss, dx_enc, dx_dec)`, leaving the gradient of the whole loss in the FFN's Params.
#
# **Hints.** Two forwards, each with its own cache, then two backwards (any order), each
# with its own cache. The Params get the sum because `backward` adds (`+=`); nothing may
# be zeroed in between (section 4).

# %% nbgrader={"grade": false, "grade_id": "ex8_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def shared_ffn_step(ffn, x_enc, x_dec, R_enc, R_dec):
    """Loss of one FFN used twice -> (loss, dx_enc, dx_dec); adds into ffn's Params."""
    ### BEGIN SOLUTION
    y_enc, c_enc = ffn.forward(x_enc)  # the encoder's use
    y_dec, c_dec = ffn.forward(x_dec)  # the decoder's use of the same weights
    loss = float(np.sum(y_enc * R_enc) + np.sum(y_dec * R_dec))
    dx_dec = ffn.backward(R_dec, c_dec)  # each backward adds its part into the shared grads
    dx_enc = ffn.backward(R_enc, c_enc)
    return loss, dx_enc, dx_dec
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex8_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.transformer import FeedForward  # noqa: E402

rng = np.random.default_rng(81)
ffn = FeedForward(4, 8, rng, init_std=0.5).to(np.float64)
x_enc = Param(rng.standard_normal((2, 3, 4)), dtype=np.float64)
x_dec = Param(rng.standard_normal((2, 5, 4)), dtype=np.float64)
R_enc, R_dec = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))


def two_uses(backward):
    if not backward:
        y_enc, _ = ffn.forward(x_enc.data)
        y_dec, _ = ffn.forward(x_dec.data)
        return float(np.sum(y_enc * R_enc) + np.sum(y_dec * R_dec))
    loss, dx_enc, dx_dec = shared_ffn_step(ffn, x_enc.data, x_dec.data, R_enc, R_dec)
    x_enc.grad += dx_enc
    x_dec.grad += dx_dec
    return loss


print(gradcheck(two_uses, ffn.named_params() + [("x_enc", x_enc), ("x_dec", x_dec)]))
