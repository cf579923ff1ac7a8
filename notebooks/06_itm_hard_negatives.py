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
# # 06 · Image-text matching (ITM) and hard negatives
#
# **Goal.** ITC (notebook 05) compares an image and a text through two separate
# vectors. BLIP's second objective lets the text *read* the image and decide: do these
# two belong together? In this notebook we
#
# 1. build the ITM head on the image-grounded encoder's `[ENC]` output;
# 2. see where its negatives come from — sampled from the ITC similarities — and
#    compare BLIP's sampling weights with BLIP-2's;
# 3. lay out the $3B$ rows of one ITM batch and their labels;
# 4. find the one line of the backward that a repeated negative can break, and let the
#    gradient check catch it;
# 5. check the ITM gradient of the whole pretraining step;
# 6. look at which negatives a trained model actually picks, and at the false-negative
#    problem;
# 7. separate what an ITC score and an ITM score mean.
#
# ## 1. The paper's idea
#
# The image-grounded text encoder (notebook 04: `[ENC]` first, bidirectional
# self-attention, cross-attention to every image token in every layer) reads a pair
# $(I, T)$. Its output at position 0, $h_{\mathrm{enc}} \in \mathbb R^{D}$, goes through a
# linear **ITM head** to two logits, and
#
# $$p_{\mathrm{itm}}(I, T) = \mathrm{softmax}(h_{\mathrm{enc}} W + b) \in [0, 1]^2$$
#
# is trained as a binary classifier, match or no match (BLIP section 3.2). Random
# negatives are too easy — "a red circle" against an image of three green crosses — so
# BLIP adopts ALBEF's **hard negative mining**: for each text, a negative image is
# sampled from the batch with probability growing with its ITC similarity to the text,
# and for each image a negative text likewise. The loss is the mean cross-entropy over
# $B$ positives and $2B$ negatives. In salesforce/BLIP this is `loss_itm` in
# `models/blip_pretrain.py` `BLIP_Pretrain.forward`; in minblip it is the ITM block of
# `pretrain_step` and `sample_hard_negatives` in `minblip/blip.py`, with the sampling
# weights `hard_negative_weights` in `minblip/objectives.py`.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import inspect
import math
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import Param, gradcheck, world
from minblip.blip import BLIP, BLIPConfig, pretrain_step, sample_hard_negatives
from minblip.image import preprocess
from minblip.objectives import draw_rows, hard_negative_weights
from minblip.softmax import softmax
from minblip.text import TextConfig
from minblip.tokenizer import Tokenizer
from minblip.train import TrainConfig, blip_trainer
from minblip.vit import ViTConfig

np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## 2. The ITM head on `[ENC]`
#
# We use the small model and data of notebook 05 (one layer of width 32 per side; section
# 8 trains it). A batch of four world pairs:

# %%
cfg = TrainConfig(n_train=1000, n_val=64, n_test=0, width=32, depth=1, heads=2,
                  init_std=0.1, steps=300, batch_size=32, lr=3e-3, warmup_steps=20,
                  loss_weights=(1.0, 0.0, 0.0))  # section 8 trains ITC only, see there
trainer = blip_trainer(cfg)
model, tok = trainer.model, trainer.task.tokenizer
val = trainer.task.dataset.val
few = np.arange(4)
images = preprocess(val.images[few], cfg.image_size)
captions = [val.captions[i] for i in few]
ids, mask = tok.encode(captions, max_length=cfg.max_text_len)

image_embeds, _ = model.visual_encoder.forward(images)  # (B, 1+N, D): every image token
enc_ids = ids.copy()
enc_ids[:, 0] = tok.enc_id  # blip_pretrain.py: encoder_input_ids[:, 0] = enc_token_id
h, _ = model.text_encoder.forward(enc_ids, mask, image_embeds)  # cross-attention on
logits, _ = model.itm_head.forward(h[:, 0])  # (B, D) @ (D, 2) -> (B, 2)
print("first tokens:", [tok.id_to_token(i) for i in enc_ids[:, 0]])
print("image tokens", image_embeds.shape, "+ text", enc_ids.shape, "-> h", h.shape,
      "-> h[:, 0]", h[:, 0].shape, "-> logits", logits.shape)
print("p(match) of the four true pairs, untrained:", softmax(logits)[:, 1])

# %% [markdown]
# Unlike ITC, the image enters through cross-attention to **all** $1 + N$ image tokens,
# not only `[CLS]`, and every layer can compare words with image regions. The price: a
# full encoder pass per pair, where ITC needs one pass per image and one per text.
#
# Column 1 is "match" (`itm_labels` are 1 for positives). `model.itm_logits` does the
# same in one call. Note the first token: BLIP trains ITM with `[ENC]`, but
# `BLIP_ITM.forward` in `models/blip_itm.py` and Hugging Face's
# `BlipForImageTextRetrieval` leave the processor's `[CLS]` in place — a known source of
# lower scores with released checkpoints (Hugging Face issues #25629 and #22732).
#
# ## 3. Where the negatives come from
#
# From the **batch**, not from the ITC queue. With the ITC logits $Z = VT^\top/\tau$ of
# the batch (image $i$ × text $j$), BLIP computes, without gradient,
#
# ```
# weights_t2i = softmax(sim_t2i[:, :bs], dim=1) + 1e-4;  weights_t2i.fill_diagonal_(0)
# weights_i2t = softmax(sim_i2t[:, :bs], dim=1) + 1e-4;  weights_i2t.fill_diagonal_(0)
# ```
#
# Row $b$ of `weights_t2i` weighs the images for text $b$; its diagonal, the true image,
# is zeroed **after** the softmax; $10^{-4}$ keeps every other image possible. BLIP-2
# (`blip2_qformer.py`) instead writes $-10000$ on the diagonal **before** the softmax,
# which renormalises the probability over the negatives alone. minblip implements
# BLIP's version as `hard_negative_weights` (BLIP-2's, `blip2_negative_weights`, sits
# next to it in `minblip/objectives.py`); here BLIP-2's is one line:

# %%
print(inspect.getsource(hard_negative_weights))


def blip2_weights(sim):
    """BLIP-2: the positive gets -10000 before the softmax."""
    s = np.array(sim, dtype=np.float64)
    np.fill_diagonal(s, -10000.0)
    return softmax(s)


# %% [markdown]
# The two agree when the model is unsure, and part ways when the positive is clear. Here
# is a hand-made $6\times6$ matrix of ITC logits in which the diagonal gets stronger row by
# row, with the sampling probability of each scheme (each row divided by its sum, as
# multinomial sampling does):

# %%
grid = np.random.default_rng(0).standard_normal((6, 6))
Z = 2.0 * grid + np.diag([0.0, 2.0, 4.0, 8.0, 12.0, 16.0])
w1 = hard_negative_weights(Z)
w2 = blip2_weights(Z)
p1, p2 = w1 / w1.sum(1, keepdims=True), w2 / w2.sum(1, keepdims=True)
fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
for ax, mat, title, kw in ((axes[0], Z, "ITC logits Z (text b, image j)", {"cmap": "RdBu_r",
                                                                         "vmin": -16, "vmax": 16}),
                           (axes[1], p1, "BLIP: softmax + 1e-4, diagonal zeroed after",
                            {"cmap": "Greens", "vmin": 0, "vmax": 1}),
                           (axes[2], p2, "BLIP-2: diagonal -10000 before softmax",
                            {"cmap": "Greens", "vmin": 0, "vmax": 1})):
    ax.imshow(mat, **kw)
    for i, j in np.ndindex(mat.shape):
        ax.text(j, i, f"{mat[i, j]:.2f}" if ax is not axes[0] else f"{mat[i, j]:.1f}",
                ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("image j")
    ax.set_ylabel("text b")
plt.tight_layout()
plt.show()

# %% [markdown]
# In the first rows both schemes follow the logits. In the last rows the positive takes
# almost all of BLIP's softmax: every negative's share falls below $10^{-4}$, the
# constant dominates, and BLIP's sampling becomes nearly **uniform** over the negatives —
# exactly when the model is most confident. BLIP-2's softmax over the negatives alone
# keeps preferring the hardest one whatever the diagonal does. Which rows a real model
# lands in, we measure in section 8.
#
# ## 4. Sampling, with an explicit generator
#
# `torch.multinomial(weights[b], 1)` draws one index per row, in proportion to the
# (unnormalised) weights. minblip draws by inverting the cumulative sum with a
# `np.random.Generator` that the caller passes in. `sample_hard_negatives` builds BLIP's
# two weight matrices and hands them to the sampler BLIP-2 shares, which draws a row at
# a time with `draw_rows`:

# %%
print(inspect.getsource(sample_hard_negatives))
print(inspect.getsource(draw_rows))

# %% [markdown]
# The same generator state gives the same negatives, and the frequencies follow the
# weights (row 2 of the matrix above):

# %%
first = sample_hard_negatives(Z.T, Z, np.random.default_rng(7))
again = sample_hard_negatives(Z.T, Z, np.random.default_rng(7))
print("neg_image_idx per text:", first[0], " same with the same seed:",
      np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]))
draws = np.array([sample_hard_negatives(Z.T, Z, np.random.default_rng(s))[0][2]
                  for s in range(4000)])
print("row 2, weights / sum    :", p1[2])
print("row 2, frequency of 4000:", np.bincount(draws, minlength=6) / len(draws))

# %% [markdown]
# The draw is not differentiable and BLIP does not try: the indices are made under
# `torch.no_grad()` and then used as constants. The loss is a function of the parameters
# *given* the indices. That is why `pretrain_step` returns them in its `StepResult` and
# accepts them back through `negatives=`: the same step can be run again with exactly
# the same rows. A gradient check depends on this — a central difference runs the
# forward twice with slightly different weights, and if the negatives were drawn again,
# one flipped index would make the difference quotient meaningless.

# %%
kw = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id, weights=(1.0, 1.0, 0.0))
r1 = pretrain_step(model, images, ids, mask, rng=np.random.default_rng(0), backward=False, **kw)
r2 = pretrain_step(model, images, ids, mask, negatives=(r1.neg_image_idx, r1.neg_text_idx),
                   backward=False, **kw)
print("sampled: neg_image_idx", r1.neg_image_idx, " neg_text_idx", r1.neg_text_idx)
print(f"ITM loss sampled {r1.losses['itm']:.10f}, replayed {r2.losses['itm']:.10f}")

# %% [markdown]
# ## 5. The $3B$ rows
#
# BLIP runs the image-grounded encoder twice: once on the $B$ true pairs, once on $2B$
# negative pairs — texts `[pos_texts; neg_texts]` against images
# `[neg_images; pos_images]` — and stacks the `[ENC]` outputs:
#
# | rows | text | image | label |
# |---|---|---|---|
# | $0 \ldots B-1$ | text $b$ | image $b$ | 1 |
# | $B \ldots 2B-1$ | text $b$ | image `neg_image_idx[b]` | 0 |
# | $2B \ldots 3B-1$ | text `neg_text_idx[b]` | image $b$ | 0 |
#
# Every text and every image appears once as a positive and once in a negative of each
# kind, so the head cannot win by judging one side alone. One in three rows is a match,
# so a head that ignores its input settles at $p = 1/3$, a loss of
# $-\tfrac13\log\tfrac13 - \tfrac23\log\tfrac23 = 0.6365$. (BLIP-2 builds the same rows in
# one call, in the order `[pos, pos, neg]` texts against `[pos, neg, pos]` images.) Here
# are the rows of the step we just ran:

# %%
B = len(few)
rows = ([(b, b, 1) for b in range(B)] + [(b, r1.neg_image_idx[b], 0) for b in range(B)]
        + [(r1.neg_text_idx[b], b, 0) for b in range(B)])
p_match = softmax(r1.itm_logits)[:, 1]
fig, ax = plt.subplots(figsize=(13, 7.6))
for r, (text_i, image_i, label) in enumerate(rows):
    y = 3 * B - 1 - r
    ax.add_patch(plt.Rectangle((-0.1, y - 0.45), 16.2, 0.9,
                               color="#d8f0d8" if label else "#f6dada", zorder=0))
    ax.imshow(val.images[few[image_i]], extent=(0, 0.8, y - 0.4, y + 0.4), zorder=1)
    ax.text(1.0, y, f"image {image_i}", va="center", fontsize=9)
    ax.text(2.6, y, f"text {text_i}: {captions[text_i]}", va="center", fontsize=9)
    ax.text(13.2, y, f"label {label}   p = {p_match[r]:.2f}", va="center", fontsize=9)
for k, name in enumerate(("positives\n(encoder call 2)", "text b, negative image\n(call 3)",
                          "negative text, image b\n(call 3)")):
    ax.text(-0.3, 3 * B - 1 - k * B - (B - 1) / 2, name, rotation=90, ha="right",
            va="center", fontsize=9)
ax.set_xlim(-1.6, 16.2)
ax.set_ylim(-0.6, 3 * B - 0.4)
ax.set_aspect("equal")
ax.set_axis_off()
ax.set_title("one ITM batch: 3B rows, labels [1]*B + [0]*2B (p: the untrained head's "
             "match probability)", fontsize=11)
plt.show()

# %% [markdown]
# Even in a batch of four, image 0 was drawn as the negative of three texts: before
# training the ITC logits are almost equal, but not quite, and the sampling follows them.
# Repeats are common, which is what the next section is about.

# %% [markdown]
# ## 6. A gather, and the bug a repeat exposes
#
# The negative images are a gather, `image_embeds[neg_image_idx]`, and two texts may well
# draw the same negative image. In the backward each row of the gathered gradient must be
# *added* to the image it came from. NumPy's fancy-index assignment does not do that: in
# `d[idx] += g` the right side is evaluated as `d[idx] + g` and then written row by row,
# so a repeated index keeps only its last write. `np.add.at` accumulates.

# %%
idx = np.array([2, 0, 0])  # texts 1 and 2 both drew image 0
g = np.array([[1.0, 1.0], [10.0, 10.0], [100.0, 100.0]])  # gradient of the gathered rows
d_wrong = np.zeros((3, 2))
d_wrong[idx] += g
d_right = np.zeros((3, 2))
np.add.at(d_right, idx, g)
print("d[idx] += g      :", d_wrong.tolist())
print("np.add.at(d, idx):", d_right.tolist())

# %% [markdown]
# Image 0 should receive $10 + 100$; the assignment lost the 10. Such a bug is silent
# whenever the batch happens to draw no repeat. A gradient check with a repeat built in
# catches it — here on the gather alone, loss $\sum_{r} X_{\mathrm{idx}_r}\cdot R_r$:

# %%
R = np.random.default_rng(1).standard_normal((3, 2))
for name, scatter in (("d[idx] += g", lambda d, i, v: d.__setitem__(i, d[i] + v)),
                      ("np.add.at", np.add.at)):
    X = Param(np.random.default_rng(2).standard_normal((3, 2)), dtype=np.float64)

    def gather_loss(backward):
        if backward:
            scatter(X.grad, idx, R)
        return float(np.sum(X.data[idx] * R))

    rep = gradcheck(gather_loss, {"image_embeds": X}, raise_on_fail=False)
    print(f"{name:12s} max rel error {rep.max_rel_err:.1e}  ->",
          "passed" if rep.passed else "FAILED")

# %% [markdown]
# `pretrain_step` scatters with `np.add.at(d_image_embeds, neg_image_idx, ...)`; the
# texts need no scatter of their own, because token ids carry no gradient and the text
# encoder's Params collect every row's contribution with `+=`.
#
# ## 7. Gradient check of the ITM step
#
# Now all of ITM at once: `pretrain_step(..., weights=(0, 1, 0))` with fixed negatives in
# which image 0 is drawn twice. A zero weight skips ITC and LM entirely, so the gradient is
# that of the ITM loss alone, through the head, both encoder calls (self-attention,
# cross-attention, FFN), the image tokens and the ViT down to the pixels. A tiny model in
# float64, its weights re-drawn larger than the 0.02 initialisation so no gradient is
# tiny; 4 coordinates per Param plus one random direction through all of them.

# %%
WORDS = "a red blue green circle square small large left right of the".split()
tiny_tok = Tokenizer(WORDS)
tiny_cfg = BLIPConfig(
    vision=ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16),
    text=TextConfig(vocab_size=tiny_tok.vocab_size, width=8, depth=1, heads=2, mlp_dim=16,
                    max_positions=12, encoder_width=8),
    embed_dim=6)
rng = np.random.default_rng(3)
tiny = BLIP(tiny_cfg, rng).to(np.float64)
for name, p in tiny.named_params():
    if name != "temp":
        p.data[...] = (1.0 if name.endswith("gamma") else 0.0) + 0.3 * rng.standard_normal(p.shape)
t_ids, t_mask = tiny_tok.encode(["a red circle", "a large blue square left of a green circle",
                                 "a small square"], max_length=10)
pixels = Param(rng.standard_normal((3, 3, 8, 8)), dtype=np.float64)
fixed = (np.array([2, 0, 0]), np.array([1, 2, 0]))  # image 0 is the negative of texts 1 and 2


def itm_loss(backward):
    if backward:
        tiny.zero_grad()
    r = pretrain_step(tiny, pixels.data, t_ids, t_mask, cls_id=tiny_tok.cls_id,
                      enc_id=tiny_tok.enc_id, dec_id=tiny_tok.dec_id, negatives=fixed,
                      weights=(0.0, 1.0, 0.0), backward=backward)
    if backward:
        pixels.grad += r.d_images
    return r.loss


t0 = time.perf_counter()
report = gradcheck(itm_loss, tiny.named_params() + [("pixels", pixels)], n_coords=4,
                   rtol=1e-5)
print(f"{len(report.rows)} arrays checked in {time.perf_counter() - t0:.1f} s, all passed: "
      f"{report.passed}; max rel error {report.max_rel_err:.1e}")
print(f"{'param':44s} {'max rel err':>11s}")
for row in report.rows:
    if any(k in row.name for k in ("itm_head", "cross_attn.q", "layers.0.ffn.fc1", "patch",
                                   "pixels", "vision_proj")):
        print(f"{row.name:44s} {row.max_rel_err:11.1e}")
print(f"{'(random direction, all)':44s} {report.directional.max_rel_err:11.1e}")
worst = max(report.rows, key=lambda r: r.max_rel_err)
print(f"largest relative error: {worst.name}, on a gradient of {worst.worst_values[0]:.1e} "
      f"with absolute error {worst.max_abs_err:.0e}")

# %% [markdown]
# The largest relative error belongs to a gradient so small that the finite difference's
# rounding, about $10^{-11}$, is a visible fraction of it. `vision_proj` (and `text_proj`,
# the temperature, the decoder's own self-attention) show 0: ITM does not use them, the analytic gradient is exactly zero and so is the
# finite difference. The full table is `print(report)`.
#
# ## 8. Which negatives get picked
#
# Hard negatives are only as hard as the ITC space they come from. We train the model
# with ITC alone for 300 steps — as in notebook 05 — because the sampling weights depend
# on ITC only, and ITM needs far longer than this notebook's time budget to move away
# from the $p = 1/3$ prior of section 5.

# %%
t0 = time.perf_counter()
trainer.run(progress=False)
print(f"{cfg.steps} ITC steps in {time.perf_counter() - t0:.1f} s, final loss "
      f"{np.mean(trainer.history['itc'][-20:]):.3f} (log 32 = {math.log(32):.3f}), "
      f"temperature {float(model.temp.data):.4f}")

# %% [markdown]
# A batch of 32 held-out pairs, the weights BLIP would sample negative images from, and
# for four texts the six images with the highest weight (shown with their probability):

# %%
batch = np.arange(32)
px = preprocess(val.images[batch], cfg.image_size)
b_ids, b_mask = tok.encode([val.captions[i] for i in batch], max_length=cfg.max_text_len)
_, v = model.encode_image(px)
t = model.encode_text(b_ids, b_mask)
tau = float(model.temp.data)
sim_t2i = t @ v.T / tau  # (B, E) @ (E, B): text b against every image
w_t2i = hard_negative_weights(sim_t2i)
prob = w_t2i / w_t2i.sum(1, keepdims=True)

texts = [0, 5, 9, 13]
top_k = 6
fig, axes = plt.subplots(len(texts), top_k + 2, figsize=(15, 8.3),
                         gridspec_kw={"width_ratios": [2.2, 1] + [1] * top_k})
for row, b in zip(axes, texts):
    row[0].text(0, 0.5, f"text {b}:\n" + textwrap.fill(val.captions[b], 30), va="center",
                fontsize=9)
    row[0].set_axis_off()
    row[1].imshow(val.images[b])
    row[1].set_title("positive", fontsize=9, color="green")
    for ax, j in zip(row[2:], np.argsort(-prob[b])[:top_k]):
        ax.imshow(val.images[j])
        ax.set_title(f"p = {prob[b, j]:.2f}", fontsize=9)
    for ax in row[1:]:
        ax.set_xticks([])
        ax.set_yticks([])
fig.suptitle("text b (left), its image, and the six images BLIP most likely samples as "
             "its hard negative", fontsize=11)
plt.tight_layout()
plt.show()

# %% [markdown]
# Over the whole batch: how often does the most likely negative image share an
# attribute with the true image, compared with a negative drawn uniformly?

# %%
scenes = [val.scenes[i] for i in batch]
attributes = {
    "a colour": lambda s: {o.colour for o in s.objects},
    "a shape": lambda s: {o.shape for o in s.objects},
    "a size": lambda s: {o.size for o in s.objects},
    "a grid cell": lambda s: {(o.row, o.col) for o in s.objects},
    "the number of objects": lambda s: {len(s.objects)},
}
off = ~np.eye(len(batch), dtype=bool)
hardest = prob.argmax(1)
print(f"{'shares ...':24s} {'hardest negative':>17s} {'BLIP sampling':>14s} {'uniform':>8s}")
shared_by = {}  # attribute -> (hardest negative, BLIP sampling, uniform)
for name, key in attributes.items():
    share = np.array([[bool(key(a) & key(c)) for c in scenes] for a in scenes], dtype=float)
    shared_by[name] = (share[np.arange(len(batch)), hardest].mean(),
                       np.sum(prob * share, 1).mean(), share[off].mean())
    print(f"{name:24s} {shared_by[name][0]:17.2f} {shared_by[name][1]:14.2f} "
          f"{shared_by[name][2]:8.2f}")
# what the next paragraph says about this table
for name in ("a colour", "the number of objects"):
    assert shared_by[name][0] > shared_by[name][2] + 0.2, name  # far more often than chance
assert abs(shared_by["a shape"][0] - shared_by["a shape"][2]) < 0.15  # about as often
assert shared_by["a grid cell"][0] < shared_by["a grid cell"][2]  # less often than chance

# %% [markdown]
# The negatives the model finds hard share colours and the number of objects with the
# positive far more often than chance: ITC after 300 steps has learnt colours and counts
# first, so those are the near-misses ITM is trained on (the orange square above a purple
# *cross* for "an orange square above a purple box"). Shapes are not yet part of the ITC
# space: the hard negatives share one about as often as a uniformly drawn image does.
# Grid cells they share even *less* often than chance, so position does not make a
# negative hard at this stage either.
#
# And the comparison of section 3 on real logits: the average probability of the single
# hardest negative, and how many rows are so confident that BLIP's $10^{-4}$ floor
# outweighs the softmax mass on all negatives together:

# %%
p_blip2 = blip2_weights(sim_t2i)
p_soft = softmax(sim_t2i)
neg_mass = np.sum(np.where(off, p_soft, 0.0), axis=1)
print(f"P(hardest negative), mean over rows: BLIP {prob.max(1).mean():.2f}, "
      f"BLIP-2 {p_blip2.max(1).mean():.2f}, uniform {1 / (len(batch) - 1):.2f}")
print(f"softmax of the true pair: median {np.median(np.diag(p_soft)):.3f}, "
      f"max {np.diag(p_soft).max():.4f}")
print(f"rows where the 1e-4 floor ({(len(batch) - 1) * 1e-4:.4f} in all) outweighs the "
      f"softmax mass on negatives: {int(np.sum(neg_mass < (len(batch) - 1) * 1e-4))} of "
      f"{len(batch)}")
assert np.sum(neg_mass < (len(batch) - 1) * 1e-4) == 0  # what the next paragraph says

# %% [markdown]
# After 300 steps the two schemes agree: no row is confident enough. BLIP's floor takes
# over only when the true pair's softmax exceeds $1 - (B-1)\cdot 10^{-4}$ ($0.9969$ for
# $B = 32$), which a well-trained model reaches on easy batches — then its ITM sees
# mostly random negatives, while BLIP-2's keeps seeing the hardest ones.
#
# ## 9. False negatives
#
# Sampling the most similar in-batch image as a "negative" assumes it really is one. With
# web data it often is not: "a man riding a horse" fits many images of a batch, and the
# hardest negative is then most likely a *true* pair, which ITM is told to reject. BLIP
# offers two partial remedies: ITC's soft targets (notebook 05) stop punishing close
# pairs as hard, and retrieval fine-tuning zeroes the weights of every pair that shares
# an image id (`blip_retrieval.py`) — which removes other captions of the same image, not
# a different image the caption also fits.
#
# minblip's world avoids the problem by construction: `make_dataset` never repeats a
# scene's contents (objects, sizes, colours, cells; the background is not part of it), and
# a caption names every object. So in any batch each caption is true of exactly one image:

# %%
truth = np.array([[world.caption_is_true(s, val.captions[j]) for j in batch] for s in scenes])
print("caption j true of image i only when i == j:", np.array_equal(truth, np.eye(len(batch))))

# %% [markdown]
# To see what a false negative does, make one: redraw image 0's scene on the other
# background and put it in the batch in place of image 1. Caption 0 is true of both.

# %%
s0 = scenes[0]
twin = world.Scene(s0.objects, "white" if s0.background == "grey" else "grey")
print("caption 0:", val.captions[0])
print("true of the twin:", world.caption_is_true(twin, val.captions[0]))
v_fn = v.copy()
v_fn[1] = model.encode_image(preprocess(world.render(twin, cfg.image_size), cfg.image_size))[1][0]
w_fn = hard_negative_weights(t @ v_fn.T / tau)
p_fn = w_fn[0] / w_fn[0].sum()
print(f"text 0's most likely negative image: {p_fn.argmax()} (the twin is 1), "
      f"sampled with probability {p_fn[1]:.2f}")

# %% [markdown]
# The twin, a perfect match, is now text 0's most likely "hard negative": ITM would be
# trained to call a true caption wrong, and ITC (which put it there) to push the two
# apart.
#
# ## 10. ITC scores and ITM scores are different things
#
# * The **ITC score** is a cosine in $[-1, 1]$. It is not a probability; the softmax over
#   $Z = \cos/\tau$ is one, but only **relative to the other candidates**: the same pair
#   gets a different number in a different batch.
# * The **ITM score** is a per-pair probability, $\mathrm{softmax}$ of the two head
#   logits, and does not depend on any other candidate.

# %%
b = 0
others = np.delete(batch, b)
easy = others[np.argsort(sim_t2i[b, others])[:3]]  # the three images least like text 0
hard = others[np.argsort(-sim_t2i[b, others])[:3]]  # the three most like it
for name, negatives in (("all 32", others), ("0 + 3 easy", easy), ("0 + 3 hard", hard)):
    cand = np.concatenate([[b], negatives])
    print(f"batch {name:11s}: cosine(text 0, image 0) = {v[b] @ t[b]:.3f}, "
          f"softmax over the batch = {softmax(sim_t2i[b, cand])[0]:.3f}")

# %% [markdown]
# One pair, one cosine, three "probabilities": near 1 against easy negatives, lower
# against hard ones (which hold almost all of the rest of the batch's mass).

# %% [markdown]
# BLIP's retrieval (`evaluation` in `train_retrieval.py`) uses both: it ranks all
# candidates by the ITC cosine, keeps the top $k$ (`k_test` = 256), runs the ITM encoder
# on those pairs only, and orders them by
#
# $$\text{score} = \underbrace{\mathrm{logit}_{\mathrm{itm}}[1]}_{\text{raw logit, no softmax}} +
# \underbrace{\cos(v, t)}_{\text{no } 1/\tau}.$$
#
# CapFilt's filter (section 3.3 of the paper) keeps a web caption when ITM calls the pair
# a match; the author gives the threshold as 0.5 on the ITM match probability (BLIP
# issue #46). Computed here for text 0 against its image and its three hardest
# negatives — with the caveat that our ITM head was never trained (section 8), so its
# columns say nothing yet:

# %%
image_embeds_b, _ = model.visual_encoder.forward(px[np.concatenate([[b], hard])])
pair_ids = np.repeat(b_ids[b:b + 1], 4, axis=0)
pair_mask = np.repeat(b_mask[b:b + 1], 4, axis=0)
itm = model.itm_logits(image_embeds_b, pair_ids, pair_mask, tok.enc_id)  # (4, 2)
print(f"{'image':>6s} {'ITC cosine':>11s} {'ITM logit[1]':>13s} {'ITM p(match)':>13s} "
      f"{'retrieval score':>16s}")
for k, j in enumerate(np.concatenate([[b], hard])):
    cos = float(v[j] @ t[b])
    print(f"{j:6d} {cos:11.3f} {itm[k, 1]:13.3f} {softmax(itm[k])[1]:13.3f} "
          f"{itm[k, 1] + cos:16.3f}")
cosines = np.array([float(v[j] @ t[b]) for j in np.concatenate([[b], hard])])
p_match = softmax(itm)[:, 1]
# what the next paragraph says: the true image first, the hardest negative close behind,
# and an untrained head that gives every pair about the same p(match), below 0.5
assert cosines.argmax() == 0 and cosines[0] - cosines[1] < 0.1
assert p_match.max() < 0.5 and p_match.max() - p_match.min() < 0.05

# %% [markdown]
# ITC puts the true image first, with the hardest negative (the second row) close behind. The untrained head gives
# all four pairs about the same match probability, below 0.5, so a filter built on it
# would drop even the true caption: the threshold means something only for a trained
# head. And a trained head starts from the base rate of its training rows, $p = 1/3$
# (section 5), so "above 0.5" asks the pair's evidence to overcome 2:1 odds against it.

# %% [markdown]
# ## Summary
#
# * ITM is a 2-way classifier on the `[ENC]` output of the image-grounded encoder, which
#   reads every image token through cross-attention.
# * Its negatives come from the batch: one image per text and one text per image, sampled
#   from the ITC logits. BLIP: softmax + $10^{-4}$, diagonal zeroed after the softmax —
#   nearly uniform once the true pair's softmax passes $1 - (B-1)\cdot10^{-4}$. BLIP-2:
#   $-10000$ on the diagonal before the softmax — a distribution over negatives alone.
# * The draws are constants for the backward; keeping the indices makes a step
#   repeatable and gradient-checkable.
# * One step has $3B$ rows: positives, (text, negative image), (negative text, image),
#   labels $[1]\cdot B + [0]\cdot 2B$; a blind head sits at $p = 1/3$.
# * A gathered negative is scattered back with `np.add.at`; `d[idx] += g` drops repeats,
#   and a gradient check with a repeated index catches it.
# * Hard negatives share what ITC has learnt — here colours and object counts. Where a
#   caption fits several images they are false negatives; the world's unique scenes rule
#   them out.
# * ITC cosines are batch-relative after the softmax; ITM probabilities are per pair.
#   BLIP's retrieval adds the raw ITM logit to the cosine; CapFilt thresholds the ITM
#   probability at 0.5.
#
# ## Exercises
#
# 1. **Swap the weights.** Replace `hard_negative_weights` with `blip2_weights` (pass your
#    own `negatives=` to `pretrain_step`) and train ITC + ITM for a few hundred steps with
#    each. Plot the ITM loss. Which one leaves the $0.6365$ plateau first? Count, at the
#    end, how often each sampled the single hardest negative.
# 2. **Several captions per image.** Build the world with `captions_per_image=2` and put
#    both captions of some images into one batch. Write the retrieval fine-tune version of
#    the weights, which zeroes *every* pair that shares an image id, and show with
#    `world.caption_is_true` that no true pair can be sampled any more.
# 3. **How often does a repeat happen?** For uniform sampling over $B - 1$ negatives,
#    compute the probability that two of the $B$ texts draw the same negative image, for
#    $B$ = 4, 32, 75. Then estimate it for BLIP's weights on the trained batch of
#    section 8. How long would the `d[idx] += g` bug go unnoticed in training?
# 4. **`[CLS]` instead of `[ENC]`.** After training ITC + ITM long enough for ITM to
#    learn (a few thousand steps), score the test pairs with `itm_logits` once with
#    `enc_id` and once with `tok.cls_id`. How much does the match accuracy drop?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 6.1,6.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `06_itm_hard_negatives.ipynb`**, not
# its jupytext twin `06_itm_hard_negatives.py`: if you edit the `.py`, run `jupytext
# --sync 06_itm_hard_negatives.py` before you check or hand in, or the checks still see
# the stub.
#
# ### Exercise 6.1 · Hard-negative mining and the `np.add.at` gather
#
# **Goal.** Write the body of `hard_negative_weights` (in `minblip/objectives.py`) and the
# one line of `pretrain_step` (in `minblip/blip.py`) that sends the negatives' image
# gradient back to `d_image_embeds`.
#
# **Hints.** The weights of section 3: a softmax over each row of the in-batch
# similarities (the first $B$ columns, in float64), plus $10^{-4}$, and *then* the diagonal
# set to zero — zeroing before the softmax gives different numbers. For the gather:
# `neg_images[:B] = image_embeds[neg_image_idx]` read some images twice (section 6).

# %% nbgrader={"grade": true, "grade_id": "ex6_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(60)
sim = 3.0 * rng.standard_normal((3, 5))
expect = softmax(sim[:, :3]) + 1e-4
np.fill_diagonal(expect, 0.0)
print("weights as BLIP's:", np.allclose(hard_negative_weights(sim), expect, rtol=1e-12))
assert np.allclose(hard_negative_weights(sim), expect, rtol=1e-12)

words = "a red blue circle square small large of".split()
tiny = BLIPConfig(vision=ViTConfig(image_size=4, patch_size=2, width=4, depth=1, heads=1, mlp_dim=8),
                  text=TextConfig(vocab_size=len(words) + 6, width=4, depth=1, heads=1, mlp_dim=8,
                                  max_positions=8, encoder_width=4), embed_dim=4)
tiny_model = BLIP(tiny, rng).to(np.float64)
for name, p in tiny_model.named_params():
    if name != "temp":
        p.data[...] = (1.0 if name.endswith("gamma") else 0.0) + 0.4 * rng.standard_normal(p.shape)
tiny_tok = Tokenizer(words)
tiny_ids, tiny_mask = tiny_tok.encode(["a red circle", "a large blue square", "small square"],
                                      max_length=6)
pixels = Param(rng.standard_normal((3, 3, 4, 4)), dtype=np.float64)


def itm_only(backward):  # image 0 is the negative of two texts
    r = pretrain_step(tiny_model, pixels.data, tiny_ids, tiny_mask, cls_id=tiny_tok.cls_id,
                      enc_id=tiny_tok.enc_id, dec_id=tiny_tok.dec_id,
                      negatives=(np.array([2, 0, 0]), np.array([1, 2, 0])),
                      weights=(0.0, 1.0, 0.0), backward=backward)
    if backward:
        pixels.grad += r.d_images
    return r.loss


print(gradcheck(itm_only, [("pixels", pixels)] + tiny_model.visual_encoder.named_params(),
                n_coords=3, rtol=1e-5))

# %% [markdown]
# ### Exercise 6.2 · The backward of a gather with repeated rows
#
# **Goal.** Write `gather_rows_backward(index, dgathered, n_rows)`: the forward was
# `gathered = x[index]` with `x` `(n_rows, D)` and `index` `(M,)`; return $\bar x$.
#
# **Hints.** Start from zeros; every row of `dgathered` adds into row `index[m]`. Section 6
# shows the one function that does this correctly when an index repeats.

# %% nbgrader={"grade": false, "grade_id": "ex6_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def gather_rows_backward(index, dgathered, n_rows):
    """gathered = x[index]: index (M,), dgathered (M, D) -> dx (n_rows, D)."""
    ### BEGIN SOLUTION
    dx = np.zeros((n_rows,) + dgathered.shape[1:])
    np.add.at(dx, index, dgathered)  # a repeated index collects every row sent to it
    return dx
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex6_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(61)
table = Param(rng.standard_normal((5, 3)), dtype=np.float64)
index = np.array([2, 0, 2, 2, 4])  # row 2 three times, rows 1 and 3 never
R = rng.standard_normal((5, 3))


def gather_loss(backward):
    if backward:
        table.grad += gather_rows_backward(index, R, 5)
    return float(np.sum(table.data[index] * R))


print(gradcheck(gather_loss, {"x": table}))
