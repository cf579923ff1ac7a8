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
# # 14 · Pretraining a small BLIP on a CPU, in one short run
#
# **Goal.** Notebooks 05-08 built BLIP's three objectives and one pretraining step and
# checked every gradient. Here we use them the way the paper does: many steps of
# AdamW on batches of image-caption pairs, and then an honest look at what came out.
# In this notebook we
#
# 1. look at the training data: the built-in world, its splits, and a compositional
#    split of colour-shape pairs the model never sees;
# 2. go through the recipe (loss, optimiser, schedule, clipping, initialisation) and
#    *measure* why each choice is there, with short runs;
# 3. train a model of about 0.16M parameters for 700 steps (section 4 prints the time);
# 4. evaluate it on held-out pairs: retrieval with ITC alone and with ITM re-ranking,
#    image-text matching, and generated captions scored attribute by attribute, on the
#    test split and on the compositional split.
#
# ## 1. The paper's recipe in a sentence
#
# BLIP pre-trains by minimising the *sum* of its three losses on every batch,
#
# $$L = L_{\mathrm{itc}} + L_{\mathrm{itm}} + L_{\mathrm{lm}},$$
#
# with AdamW (weight decay 0.05) and a learning rate that warms up linearly and then
# decays (paper section 4.1; salesforce/BLIP `pretrain.py` `train`, `loss = loss_ita +
# loss_itm + loss_lm`). BLIP's ViT-B run warms up over 3000 steps from $10^{-6}$ to
# $3\cdot10^{-4}$ and then multiplies the rate by 0.9 each epoch
# (`configs/pretrain.yaml`; the paper says 0.85), for 20 epochs of 14M images in
# batches of 2880. Ours sees $700 \times 32 = 22\,400$ pairs.
#
# minblip's `Trainer` (`minblip/train.py`) runs exactly this loop: sample a batch,
# `pretrain_step` (ITC + ITM + LM and one backward, notebook 08), clip the gradient
# norm, take an AdamW step. It is the one loop every model here trains with: what is
# trained, and how, is a *task* (here `BlipPretraining`: the data, the model, the
# batch and the step; BLIP-2's stages of notebooks 10 and 11 are others), and
# `blip_trainer(cfg)` builds the loop around it. Two simplifications: the learning rate follows LAVIS's
# per-step warmup + cosine (`linear_warmup_cosine_lr`) instead of BLIP's per-epoch
# decay, and ITC is plain in-batch InfoNCE, without the momentum encoders and queues
# of notebook 05, section 6.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices: a second thread only waits

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import dataclasses
import math
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import world
from minblip.blip import pretrain_step
from minblip.evaluate import (caption_images, caption_metrics, evaluate_split, itm_metrics,
                              recall_at_k, retrieval_scores)
from minblip.image import preprocess
from minblip.optim import clip_grad_norm, decay_mask
from minblip.report import smooth
from minblip.train import TrainConfig, blip_trainer, build_dataset

np.set_printoptions(precision=3, suppress=True)
notebook_start = time.perf_counter()


def show(ax, image, title, width=32):
    """One world image, framed (white backgrounds would vanish), titled with wrapped text."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if "\n" in title else textwrap.fill(title, width), fontsize=7.5)

# %% [markdown]
# ## 2. The data: the built-in world
#
# One `TrainConfig` defines the whole run. The model is one layer of width 64 on each
# side (ViT and text transformer), with 4 heads and 32-dimensional ITC features. The
# optimisation settings are explained in section 3.

# %%
cfg = TrainConfig(seed=0, n_train=2000, n_val=200, n_test=200,
                  width=64, depth=1, heads=4, embed_dim=32, init_std=0.05,
                  steps=700, batch_size=32, lr=3e-3, min_lr=1e-5, warmup_steps=50,
                  weight_decay=0.05, grad_clip=1.0)
data = build_dataset(cfg)
for split in (data.train, data.val, data.test, data.compositional):
    counts = np.bincount([len(s.objects) for s in split.scenes], minlength=cfg.max_objects + 1)
    print(f"{split.name:14s} {len(split):5d} images   objects per image 1: {counts[1]:4d}   "
          f"2: {counts[2]:4d}")
print(f"\ndistinct scenes with 1-2 objects and no held-out pair: "
      f"{world.count_scenes(cfg.max_objects):,}")
print(f"vocabulary: {len(world.vocabulary())} words")

# %% [markdown]
# Each image is a 32-pixel square with one or two flat shapes on a 3 x 3 grid; its
# captions are generated from the scene and always true. The training loop draws a
# *fresh* caption for every image at every step, from a few templates with synonyms,
# so the model sees many phrasings of one scene. Twelve training images, each with two
# captions drawn for it:

# %%
caption_rng = np.random.default_rng(0)
fig, axes = plt.subplots(2, 6, figsize=(15, 7))
for i, ax in enumerate(axes.ravel()):
    two = [world.describe(data.train.scenes[i], caption_rng) for _ in range(2)]
    show(ax, data.train.images[i], "\n".join(textwrap.fill(c, 32) for c in two))
fig.suptitle("training images and two of their captions")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Splits.** Every scene *content* (objects, sizes and positions; the background is
# free) occurs once in the whole dataset, so a test caption describes exactly one test
# image and retrieval has one right answer. The test images are new scenes made of
# familiar parts.
#
# **The compositional split** asks more. Two colour-shape pairs never occur in train,
# val or test — not in the images, not in the captions. Each of the 200 compositional
# scenes contains at least one of them. The model has seen purple things and
# triangles, but never a purple triangle.

# %%
print("held-out (colour, shape) pairs:", data.held_out)
for split in (data.train, data.val, data.test, data.compositional):
    has = sum(any((o.colour, o.shape) in data.held_out for o in s.objects) for s in split.scenes)
    print(f"{split.name:14s} scenes containing a held-out pair: {has:4d} of {len(split)}")

fig, axes = plt.subplots(1, 6, figsize=(15, 3.6))
for i, ax in enumerate(axes):
    show(ax, data.compositional.images[i], data.compositional.captions[i])
fig.suptitle("compositional split: every scene has a purple triangle or a green square")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The recipe, and why
#
# ### 3.1 Learning rate: warmup, then cosine
#
# AdamW divides each step by a running estimate of the gradient's scale. In the first
# steps that estimate rests on a handful of gradients, so the first updates are as
# large as the learning rate allows in every coordinate at once. A warmup keeps them
# small while the estimates settle; a cosine decay then lowers the rate smoothly so
# the end of the run averages out the batch noise. `Trainer.lr_at` is
# `minblip.optim.warmup_cosine_lr`:
#
# $$\eta(s) = \begin{cases} \eta_{\max}\, s / W & s < W \\
# \eta_{\min} + \tfrac12(\eta_{\max}-\eta_{\min})\big(1+\cos\pi\frac{s-W}{S-W}\big) & s \ge W
# \end{cases}$$
#
# This short run uses a higher peak ($3\cdot10^{-3}$) and a shorter warmup (50 steps)
# than the demo, because it has fewer steps to spend.

# %%
trainer = blip_trainer(cfg, dataset=data)
model, tok = trainer.model, trainer.task.tokenizer
print(f"model: {model.param_count():,} parameters")
assert round(model.param_count() / 1e6, 2) == 0.16  # "about 0.16M" in the goal above

lrs = [trainer.lr_at(s) for s in range(cfg.steps + 1)]
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.plot(lrs)
ax.axvline(cfg.warmup_steps, color="grey", ls=":", lw=1)
ax.text(cfg.warmup_steps + 8, 0.5 * cfg.lr, f"end of warmup (step {cfg.warmup_steps})", fontsize=8)
ax.set_xlabel("step")
ax.set_ylabel("learning rate")
ax.set_title("linear warmup, then cosine decay", loc="left", fontsize=10)
plt.tight_layout()
plt.show()
print("lr at steps 0, 25, 50, 375, 700:",
      ", ".join(f"{trainer.lr_at(s):.2e}" for s in (0, 25, 50, 375, 700)))

# %% [markdown]
# ### 3.2 AdamW: decoupled weight decay, on Linear weights only
#
# AdamW shrinks each decaying weight by a factor $(1 - \eta\lambda)$ *outside* the
# Adam update, so the decay is not rescaled by Adam's $1/\sqrt{v}$ (that is the
# "decoupled" of Loshchilov & Hutter). Which Params decay is a choice:
# salesforce/BLIP decays every Param, LAVIS skips biases and LayerNorms. minblip's
# `decay_mask` decays only the weight matrices of `Linear` layers (minGPT's rule):
# pulling a LayerNorm gain, a position embedding or the temperature towards zero has
# no regularising meaning. The word table, which is also the LM head's output weight,
# is an embedding and does not decay.

# %%
mask = decay_mask(model)
named = dict(model.named_params())
groups = {}
kinds = {"W": "Linear weight", "gamma": "LayerNorm gain", "beta": "LayerNorm bias",
         "b": "Linear bias", "bias": "LM head bias", "temp": "temperature"}
for name, decays in mask.items():
    kind = kinds.get(name.split(".")[-1], "embedding, [CLS], position")
    n, size = groups.get((decays, kind), (0, 0))
    groups[(decays, kind)] = (n + 1, size + named[name].size)
print(f"{'decays':7s} {'kind':30s} {'Params':>6s} {'numbers':>8s}")
for (decays, kind), (n, size) in sorted(groups.items(), key=lambda kv: -kv[0][0]):
    print(f"{str(decays):7s} {kind:30s} {n:6d} {size:8,d}")
print("the optimiser's own flags agree with decay_mask:",
      trainer.optimizer.decay == [mask[n] for n in trainer.optimizer.names])

# %% [markdown]
# ### 3.3 Initialisation: why not BERT's 0.02
#
# BERT and BLIP initialise every weight from $\mathcal N(0, 0.02^2)$. In a network this
# small, that makes every `[CLS]` output nearly the same vector whatever the input:
# the input's signal is a small perturbation on top of the biases, LayerNorms and
# position embeddings. Now look at ITC's gradient. For image $i$, the image-to-text
# half of the loss gives
#
# $$\frac{\partial L}{\partial v_i} = \frac{1}{2n\tau}\Big(\sum_j p_{ij}\,t_j - t_i\Big),
# \qquad p_{ij} = \mathrm{softmax}_j(v_i\cdot t_j/\tau).$$
#
# If every text feature is $t_j = \bar t + \epsilon_j$, the common part cancels and
# this is $\frac{1}{2n\tau}(\sum_j p_{ij}\epsilon_j - \epsilon_i)$: proportional to the
# spread of the features. If the features all coincide, the loss is exactly $\log n$
# and its gradient is exactly zero.
#
# We measure the spread (mean distance of the unit features from their mean) on 64
# test pairs, for the model above and for a twin with `init_std` 0.02 (same data, same
# seed, same schedule):

# %%
flat_cfg = dataclasses.replace(cfg, init_std=0.02)
flat = blip_trainer(flat_cfg, dataset=data)
probe_pixels = preprocess(data.test.images[:64], cfg.image_size)
probe_ids, probe_mask = tok.encode(data.test.captions[:64], max_length=cfg.max_text_len)


def spread(t):
    """Mean distance of the unit ITC features of the 64 probe pairs from their mean:
    (image, text). 0 means every input gets the same feature."""
    _, v = t.model.encode_image(probe_pixels)
    w = t.model.encode_text(probe_ids, probe_mask)
    return (float(np.mean(np.linalg.norm(v - v.mean(0), axis=1))),
            float(np.mean(np.linalg.norm(w - w.mean(0), axis=1))))


print(f"{'init_std':>8s} {'image spread':>13s} {'text spread':>12s} {'ITC loss - log 64':>18s}")
for t in (flat, trainer):
    r = pretrain_step(t.model, probe_pixels, probe_ids, probe_mask, cls_id=tok.cls_id,
                      enc_id=tok.enc_id, dec_id=tok.dec_id, weights=(1.0, 0.0, 0.0),
                      backward=False)  # ITC alone, on the 64 probe pairs
    print(f"{t.cfg.init_std:8.2f} {spread(t)[0]:13.4f} {spread(t)[1]:12.4f} "
          f"{r.losses['itc'] - math.log(len(probe_ids)):+18.1e}")

# %% [markdown]
# Both start a little *above* $\log n$: their features differ, but not in a way that
# says which caption fits which image, and uninformative differences only cost. Now we
# train both for 200 steps with the full recipe (all three losses), recording the
# spread and the temperature every 10 steps. (The 0.05 run is the real one: section 4
# continues it.)

# %%
def run_recording(t, until, log, every=10):
    """Train t up to step ``until``; every ``every`` steps append
    (step, temperature, image spread, text spread) to ``log``."""
    while t.step < until:
        t.run(until=min(t.step + every, until), progress=False)
        log.append((t.step, float(t.model.temp.data), *spread(t)))


compare_steps = 200
log_flat = [(0, float(flat.model.temp.data), *spread(flat))]
log = [(0, float(model.temp.data), *spread(trainer))]
run_recording(flat, compare_steps, log_flat)
run_recording(trainer, compare_steps, log)
for t, lg in ((flat, log_flat), (trainer, log)):
    h = t.history
    print(f"init_std {t.cfg.init_std}: steps 150-199 mean ITC {np.mean(h['itc'][150:]):.3f}  "
          f"ITM {np.mean(h['itm'][150:]):.3f}  LM {np.mean(h['lm'][150:]):.3f};  image spread at "
          f"steps 0/60/200: {lg[0][2]:.4f} / {lg[6][2]:.4f} / {lg[-1][2]:.4f}   "
          f"({t.train_seconds:.1f} s)")
print(f"log 32 = {math.log(32):.3f};  entropy of the ITM labels (1 match : 2 not) = "
      f"{math.log(3) - 2 / 3 * math.log(2):.4f}")
# what the text below the plots says about the two runs
itm_floor = math.log(3) - 2 / 3 * math.log(2)
assert 1e-4 <= log_flat[6][2] < 1e-3 and log_flat[-1][2] < 1e-3  # a few 1e-4 by step 60, stays
assert abs(np.mean(flat.history["itc"][150:]) - math.log(32)) < 0.01  # 0.02: on the plateau
assert np.mean(trainer.history["itc"][150:]) < math.log(32) - 0.5  # 0.05: left it
assert np.mean(trainer.history["itc"][80:100]) < math.log(32) - 0.1  # within a few dozen steps
assert all(abs(np.mean(t.history["itm"][150:]) - itm_floor) < 0.01 for t in (flat, trainer))

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
for t, lg, colour in ((flat, log_flat, "tab:red"), (trainer, log, "tab:blue")):
    label = f"init_std {t.cfg.init_std}"
    axes[0].plot(t.history["itc"], color=colour, lw=1, label=label)
    axes[1].plot(t.history["itm"], color=colour, lw=1, label=label)
    s, tau, img, txt = zip(*lg)
    axes[2].plot(s, img, color=colour, marker=".", label=f"{label}, image")
    axes[2].plot(s, txt, color=colour, ls="--", label=f"{label}, text")
    axes[3].plot(s, tau, color=colour, marker=".", label=label)
axes[0].axhline(math.log(32), color="k", ls=":", lw=1)
axes[0].text(5, math.log(32) + 0.05, "log 32", fontsize=8)
axes[1].axhline(math.log(3) - 2 / 3 * math.log(2), color="k", ls=":", lw=1)
axes[1].set_ylim(0.55, 0.8)
axes[1].text(120, 0.645, "H(1/3) = 0.637", fontsize=8)
axes[2].set_yscale("log")
axes[3].axhline(0.07, color="k", ls=":", lw=1)
axes[3].text(150, 0.072, "initial 0.07", fontsize=8)
for ax, title in zip(axes, ("ITC loss", "ITM loss", "feature spread (64 test pairs)",
                            "ITC temperature τ")):
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# **ITC.** Both runs first do the cheapest thing: they shrink the spread, because
# making all features equal takes the loss from just above $\log 32$ down to exactly
# $\log 32$. With `init_std` 0.02 the image features collapse to a spread of a few
# $10^{-4}$ within 60 steps and stay there (the text features were nearly collapsed
# from the start), and by the formula above ITC's gradient collapses with them: the
# loss sits on $\log 32$ for all 200 steps. With 0.05 the spread also falls at first,
# but the part of the features that tells captions apart grows before the collapse is
# complete; after the warmup the spread shoots up and the loss leaves the plateau. Nothing else differs, and this is why minblip's training
# configurations use 0.05. BLIP itself never meets the plateau this badly: it starts
# from a pre-trained ViT and BERT whose features are already spread out.
#
# **ITM** sits at 0.637 in *both* runs. Every ITM batch holds one matching pair for
# two non-matching ones, so the best answer that ignores the input is
# $p(\text{match}) = 1/3$ for everything, and its cross-entropy is the entropy of the
# labels, $H(1/3) = \log 3 - \tfrac23 \log 2 = 0.637$. ITM has to learn to compare the
# caption with the image through cross-attention, on the hard negatives ITC picks;
# that takes much longer than ITC. (LM, meanwhile, learns the caption language at once
# in both runs; using the image for it comes later.)
#
# **The temperature** is a learnable Param, starting at 0.07 as in `blip_pretrain.py`
# and clamped to $[0.001, 0.5]$ before every step (`model.clamp_temperature()`). It
# does not simply fall. From the logits $z_{ij} = s_{ij}/\tau$,
#
# $$\frac{\partial L}{\partial \tau} = \frac{1}{\tau^2}\cdot\frac{1}{2n}\sum_i\Big(s_{ii} -
# \sum_j p_{ij}\,s_{ij}\Big) \quad(\text{plus the text-to-image half}),$$
#
# so $\tau$ falls only when the true pair's similarity beats the softmax-weighted
# average similarity. When the similarities say nothing about the pairing, that
# weighted average leans towards the largest similarities and beats a random
# positive, so $\tau$ *rises*: on the plateau in both runs, and most steeply in the
# 0.05 run just after the spread shoots up, while large similarities still point at
# the wrong captions. Once the positives lead, $\tau$ turns down; section 4 follows it
# through the whole run.
#
# ### 3.4 Gradient clipping
#
# Before each AdamW step, `clip_grad_norm(params, 1.0)` rescales *all* gradients
# together when their joint L2 norm exceeds 1 (as `torch.nn.utils.clip_grad_norm_`),
# so one bad batch cannot throw the model far. `history["grad_norm"]` records the norm
# before clipping; section 4 plots it. A two-line demonstration on the current model
# (64 probe pairs, so not a training step):

# %%
model.zero_grad()
pretrain_step(model, probe_pixels, probe_ids, probe_mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
              dec_id=tok.dec_id, rng=np.random.default_rng(1))
before = clip_grad_norm(trainer.optimizer.params, cfg.grad_clip)
after = clip_grad_norm(trainer.optimizer.params, cfg.grad_clip)
model.zero_grad()
print(f"gradient norm before clipping {before:.3f}, after {after:.3f}")

# %% [markdown]
# ## 4. The training run
#
# The 0.05 model has done 200 of its 700 steps; `run` continues it (the next step
# zeroes the gradients left by the demonstration above). `train_seconds` counts only
# time spent in training steps.

# %%
run_recording(trainer, cfg.steps, log)
log_steps, log_tau, log_img, log_txt = (np.array(c) for c in zip(*log))
history = trainer.history
print(f"{trainer.step} steps of {cfg.batch_size} pairs: {trainer.train_seconds:.1f} s of "
      f"training ({1000 * trainer.train_seconds / trainer.step:.0f} ms per step)")
for name in ("itc", "itm", "lm"):
    v = history[name]
    print(f"{name.upper():3s} first 25 steps {np.mean(v[:25]):.3f}   last 50 steps "
          f"{np.mean(v[-50:]):.3f}")
print(f"temperature: start 0.07, highest {log_tau.max():.3f} (step {log_steps[log_tau.argmax()]}), "
      f"end {log_tau[-1]:.4f}")
print(f"steps whose gradient was clipped: "
      f"{np.mean(np.array(history['grad_norm']) > cfg.grad_clip):.0%}")
# what the reading of the curves below says
itm, lm = np.array(history["itm"]), np.array(history["lm"])
assert np.mean(lm[100:125]) < 0.7 * np.mean(lm[:25])  # LM drops in the first hundred steps
assert np.mean(itm[200:280]) > itm_floor - 0.02 > np.mean(itm[-50:]) > 0.3  # ITM: late, not far
assert np.mean(np.array(history["grad_norm"][50:]) > cfg.grad_clip) > 0.9
assert log_tau.max() > 0.07 > log_tau[-1]  # the temperature first rises, then falls

# %%
fig, axes = plt.subplots(2, 3, figsize=(15, 6.4))
steps = np.array(history["step"])
for ax, name, floor in zip(axes[0], ("itc", "itm", "lm"),
                           (math.log(32), math.log(3) - 2 / 3 * math.log(2), None)):
    v = history[name]
    ax.plot(steps, v, color="tab:blue", alpha=0.25, lw=0.8)
    s = smooth(v, 25)
    ax.plot(steps[24:], s, color="tab:blue", lw=1.8, label="mean of 25 steps")
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=1)
    ax.set_title(f"{name.upper()} loss", loc="left", fontsize=10)
    ax.legend(fontsize=8)
axes[0, 1].set_ylim(0.3, 0.8)
axes[1, 0].plot(log_steps, log_tau, color="tab:purple")
axes[1, 0].set_title("temperature τ", loc="left", fontsize=10)
axes[1, 1].plot(steps, history["grad_norm"], color="tab:orange", lw=0.8)
axes[1, 1].axhline(cfg.grad_clip, color="k", ls=":", lw=1)
axes[1, 1].set_yscale("log")
axes[1, 1].set_title("gradient norm before clipping (dotted: the clip)", loc="left", fontsize=10)
axes[1, 2].plot(steps, history["lr"], color="tab:green")
axes[1, 2].set_title("learning rate", loc="left", fontsize=10)
for ax in axes.ravel():
    ax.set_xlabel("step")
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the curves: ITC falls steadily once off its plateau, and $\tau$ falls with
# it. LM drops in the first hundred steps — that is the caption *language* — and then
# creeps down as the decoder starts to use the image (section 5 shows how far it
# got). ITM is the slowest: it leaves $H(1/3)$ only around step 300 and is still far
# from zero at the end, on negatives that get harder as ITC improves (they are the
# wrong pairs ITC finds most similar).
#
# The gradient norm is above the clip on nearly every step once training is under way,
# so every update is computed from a gradient of norm exactly 1. With Adam that costs
# little: Adam divides by a running estimate of the gradient's scale, so scaling every
# step's gradient by a similar factor hardly changes the update. What clipping does
# change is the spikes (the log-scale panel): a batch whose gradient is several times
# the usual weighs no more in Adam's running averages than any other.
#
# ## 5. Evaluation on held-out pairs
#
# Everything below uses the 200 test pairs (never trained on) and then the 200
# compositional pairs. Evaluation mirrors salesforce/BLIP `train_retrieval.py`
# `evaluation`: ITC cosine similarities rank every pair; the best `k_test` = 16
# candidates of each query are re-scored by ITM match logit + ITC similarity.
#
# ### 5.1 The ITC similarity matrix

# %%
test = data.test
pixels = preprocess(test.images, cfg.image_size)
sim, i2t, t2i = retrieval_scores(model, tok, pixels, test.captions, k_test=16)

n_show = 16
fig, ax = plt.subplots(figsize=(6.2, 5.2))
im = ax.imshow(sim[:n_show, :n_show], cmap="viridis")
ax.set_xlabel("caption j")
ax.set_ylabel("image i")
ax.set_title(f"ITC cosine similarity, first {n_show} test pairs", fontsize=10)
fig.colorbar(im, ax=ax)
plt.tight_layout()
plt.show()
diag = np.diag(sim)
off = sim[~np.eye(len(sim), dtype=bool)]
print(f"all 200 x 200: matching pairs cosine {diag.mean():.3f} ± {diag.std():.3f}, "
      f"other pairs {off.mean():.3f} ± {off.std():.3f}")

# %% [markdown]
# ### 5.2 Retrieval: ITC alone and with ITM re-ranking
#
# Recall@k is the fraction of queries whose right answer is among the top $k$ of 200.

# %%
rows = {"image -> text, ITC": recall_at_k(sim), "image -> text, ITC + ITM": recall_at_k(i2t),
        "text -> image, ITC": recall_at_k(sim.T), "text -> image, ITC + ITM": recall_at_k(t2i)}
print(f"{'':26s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
for label, r in rows.items():
    print(f"{label:26s} {r[1]:6.3f} {r[5]:6.3f} {r[10]:6.3f}")
print(f"(chance: R@1 = {1 / len(test):.3f}, R@5 = {5 / len(test):.3f})")


best_image = sim.argmax(axis=0)  # caption q -> the image ITC ranks first
wrong = np.flatnonzero(best_image != np.arange(len(test)))
print(f"\ncaptions whose first ITC image is wrong: {len(wrong)}; that image has the right ...")
for what, key in (("colours", lambda o: o.colour), ("shapes", lambda o: o.shape),
                  ("sizes", lambda o: o.size), ("coloured shapes", lambda o: (o.colour, o.shape))):
    same = sum(sorted(map(key, test.scenes[best_image[q]].objects))
               == sorted(map(key, test.scenes[q].objects)) for q in wrong)
    print(f"  {what:16s} {same:4d} of {len(wrong)}")

# %% [markdown]
# ### 5.3 Image-text matching
#
# `itm_metrics` asks the ITM head about each test image with its own caption, with a
# random other caption, and with its *hard* negative: the wrong caption ITC finds most
# similar. The balanced accuracy averages positives and random negatives.

# %%
itm = itm_metrics(model, tok, pixels, test.captions, np.random.default_rng(0))
for key, value in itm.items():
    print(f"{key:32s} {value:.3f}")

# %% [markdown]
# ### 5.4 Text-to-image retrieval, by example
#
# Four caption queries and the top four test images by the re-ranked score. A green
# frame marks the right image.

# %%
queries = [0, 1, 2, 3]
fig, axes = plt.subplots(len(queries), 4, figsize=(9, 9.5))
for row, q in zip(axes, queries):
    for rank, (ax, i) in enumerate(zip(row, np.argsort(-t2i[q])[:4])):
        show(ax, test.images[i], f"rank {rank + 1}: score {t2i[q, i]:.2f}")
        for spine in ax.spines.values():
            spine.set_edgecolor("tab:green" if i == q else "tab:red")
            spine.set_linewidth(3)
    row[0].set_ylabel(textwrap.fill(test.captions[q], 22), fontsize=8,
                      rotation=0, ha="right", va="center", labelpad=10)
fig.suptitle("text -> image retrieval on the test split (green: the right image)", y=0.99)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 5.5 Captions
#
# `caption_images` decodes with beam search (3 beams, 5 to 20 tokens, BLIP's COCO
# setting) from `[DEC]`. `world.score_caption` then checks each attribute the caption
# states against the scene: ✓ right, ✗ wrong, – not stated (counted as wrong in the
# accuracies).

# %%
captions = caption_images(model, tok, pixels, method="beam")
mark = {True: "✓", False: "✗", None: "–"}
fig, axes = plt.subplots(2, 5, figsize=(15, 8.2))
for i, ax in enumerate(axes.ravel()):
    sc = world.score_caption(test.scenes[i], captions[i])
    show(ax, test.images[i], textwrap.fill(captions[i], 32) + "\n" + "  ".join(
        f"{a} {mark[sc[a]]}" for a in ("colour", "shape", "size", "position")))
fig.suptitle("generated captions on test images, attribute by attribute")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 5.6 Test split and compositional split side by side
#
# For the test split we already have every piece; `evaluate_split` computes the same
# measures (under the same names) for the compositional split in one call.

# %%
metrics = {f"{name}_recall@{k}": v
           for name, scores in (("i2t", i2t), ("t2i", t2i), ("itc_i2t", sim), ("itc_t2i", sim.T))
           for k, v in recall_at_k(scores).items()}
metrics.update(itm)
metrics.update(caption_metrics(test.scenes, captions))
comp, comp_captions = evaluate_split(model, tok, data.compositional, cfg.image_size, seed=0)
table = [("image -> text R@1, ITC", "itc_i2t_recall@1"),
         ("image -> text R@1, ITC + ITM", "i2t_recall@1"),
         ("text -> image R@1, ITC", "itc_t2i_recall@1"),
         ("text -> image R@1, ITC + ITM", "t2i_recall@1"),
         ("image -> text R@5, ITC + ITM", "i2t_recall@5"),
         ("text -> image R@5, ITC + ITM", "t2i_recall@5"),
         ("ITM accuracy (balanced)", "itm_accuracy"),
         ("ITM accuracy, positives", "itm_positive_accuracy"),
         ("ITM accuracy, hard negatives", "itm_hard_negative_accuracy"),
         ("caption colour accuracy", "caption_colour_accuracy"),
         ("caption shape accuracy", "caption_shape_accuracy"),
         ("caption size accuracy", "caption_size_accuracy"),
         ("caption position accuracy", "caption_position_accuracy"),
         ("caption exact match", "caption_exact_match")]
print(f"{'measure':32s} {'test':>7s} {'compositional':>14s}")
for label, key in table:
    print(f"{label:32s} {metrics[key]:7.3f} {comp[key]:14.3f}")

named_held_out = sum(any((p["colour"], p["shape"]) in data.held_out
                         for p in world.parse_caption(c)) for c in comp_captions)
print(f"\ncompositional captions that name a held-out pair: {named_held_out} of "
      f"{len(comp_captions)}")
# what the reading below says about this table
assert min(metrics["i2t_recall@5"], metrics["t2i_recall@5"]) > 0.5
assert metrics["i2t_recall@1"] < metrics["itc_i2t_recall@1"]  # re-ranking lowers recall here
assert metrics["itm_positive_accuracy"] < 0.5 < metrics["itm_hard_negative_accuracy"]
assert abs(metrics["itm_accuracy"] - 0.5) < 0.1
assert min(metrics["caption_colour_accuracy"], metrics["caption_size_accuracy"]) > 0.6
assert 0.2 < metrics["caption_position_accuracy"] < 0.5 and metrics["caption_shape_accuracy"] < 0.2
assert all(comp[k] < metrics[k] for k in ("itc_i2t_recall@1", "itc_t2i_recall@1"))
assert all(abs(comp[k] - metrics[k]) < 0.12 for k in (
    "itm_accuracy", "caption_colour_accuracy", "caption_shape_accuracy",
    "caption_size_accuracy", "caption_position_accuracy"))
assert named_held_out == 0

# %% [markdown]
# Read these numbers as what one short run buys (its time is printed in section 4),
# not as what the model can do.
#
# * **ITC** learned real structure: the right image is usually among the top 5 of 200.
#   When its first choice is wrong, that image mostly has the right colours and often
#   the right sizes, but rarely the right shapes (section 5.2): the same weakness the
#   captions show below.
# * **ITM** has only just left $p = 1/3$: it says "no match" to most true pairs,
#   which is why its balanced accuracy is near one half while its accuracy on hard
#   negatives is high. Re-ranking adds its match logit to the ITC similarity, and a
#   head this young is a poor judge of which candidate is right: in this run
#   re-ranking *lowers* recall (in other short runs we have seen it go either way).
#   BLIP's re-ranking gains come from a trained ITM.
# * **Captions** get colour and size mostly right, position sometimes, and shape
#   hardly ever: after this short run the model has not learned to tell shapes apart (a
#   small shape is a 5-pixel blob inside 8-pixel patches), and the captioner falls
#   back on one shape word.
# * **Compositional**: retrieval drops most. Part of that is the novelty we wanted
#   to test; part is that this gallery is harder anyway, since every one of its images
#   contains one of just two colour-shape pairs, so the distractors look alike. ITM
#   and the caption scores, by contrast, change little between the splits: at this
#   stage they hardly depend on which colour goes with which shape. The captioner never
#   once writes a held-out pair: it has never seen those two words together, and after
#   so short a run it does not compose them.
#
# ## 6. How this compares with the demo
#
# `python -m minblip demo` runs the same loop with the demo's recipe
# (`minblip.demo.demo_config()`: `TrainConfig`'s defaults with the changes of section 7):
# a deeper model, more data and many more steps, a few minutes on two cores. It writes
# the same measures for both splits to `runs/demo/metrics.json` (plus plots and a
# checkpoint). The settings that differ from this notebook's:

# %%
from minblip.demo import DEMO_RECIPE, demo_config

demo = demo_config()
for f in dataclasses.fields(TrainConfig):
    ours, theirs = getattr(cfg, f.name), getattr(demo, f.name)
    if ours != theirs:
        print(f"{f.name:14s} this notebook {str(ours):8s} demo {theirs}")

# %% [markdown]
# With more steps ITM has time to leave its prior and the captioner to learn shapes, so
# expect the demo's numbers to be clearly better than the ones above; compare them with
# your own `runs/demo/metrics.json`.

# %% [markdown]
# ## 7. The demo's recipe, measured
#
# The demo departs from `TrainConfig`'s defaults in the settings of `DEMO_RECIPE`.
# `benchmarks/demo_recipe.py` trains the demo with one ingredient changed at a time
# (and with two more seeds) and evaluates the test split every 300 steps, as the demo
# does, against the CPU time spent training. Two groups of changes matter. The world
# draws its objects in a 3x3 grid of cells; the defaults cut 32-pixel images into
# 8-pixel patches, a 4x4 grid whose borders run through the cells, so most objects are
# split between patches, while 30-pixel images in 10-pixel patches give every cell a
# patch of its own. The second group is about *where*: the
# ViT's position table is drawn larger and added a second time at the ViT's output, and
# the captioner's loss weighs twice; the rest of this section shows why. The variant
# `as_blip` is the demo with the second group undone, the recipe trained as BLIP
# trains. The curves of the run committed in `benchmarks/demo_recipe.json`:

# %%
import json

recipe = json.loads(Path("../benchmarks/demo_recipe.json").read_text())
runs = recipe["variants"]
print("the demo's recipe on top of TrainConfig:", DEMO_RECIPE)
panels = (("i2t_recall@1", "image-to-text recall@1"), ("t2i_recall@1", "text-to-image recall@1"),
          ("itm_hard_negative_accuracy", "ITM accuracy, hard negatives"),
          ("caption_attribute_accuracy", "caption attribute accuracy"),
          ("caption_shape_accuracy", "caption shape accuracy"),
          ("caption_position_accuracy", "caption position accuracy"))
fig, axes = plt.subplots(2, 3, figsize=(15, 7))
for ax, (key, label) in zip(axes.ravel(), panels):
    for name, run in runs.items():
        ax.plot([p["train_cpu_s"] for p in run["curve"]], [p[key] for p in run["curve"]],
                marker=".", lw=2.2 if name == "demo" else 1.0, label=name,
                ls="--" if name.startswith("demo_seed") else "-")
    ax.set_title(label)
    ax.set_xlabel("CPU seconds of training")
    ax.grid(alpha=0.3)
axes[0, 0].legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"{'variant':11s} " + " ".join(f"{h:>9s}" for h in ("R@1 i2t", "R@1 t2i", "ITM hard",
                                                           "captions", "shape", "position")))
for name, run in runs.items():
    last = run["curve"][-1]
    print(f"{name:11s} " + " ".join(f"{last[k]:9.3f}" for k, _ in panels) + f"   {run['what']}")

# %% [markdown]
# One patch per cell is what the first group buys: from `before` (the defaults) to
# `as_blip` shape accuracy and ITM on hard negatives rise, and position does not move
# (the first line below). Where does the model keep an object's place? On
# single-object training scenes the script fits two linear probes that predict the
# object's cell (one of 9): one from the ViT's output token at that cell (possible only
# when one patch is one cell), one from the text decoder's state just before it names
# the position ("a small red circle at the ..."), and it reads the decoder's
# probability of "top" when the object is at the top and when it is at the bottom:

# %%
for name, run in runs.items():
    probe = run["position_probe"]
    vit_probe = ("-" if probe["cell_from_vit_token"] is None
                 else f"{probe['cell_from_vit_token']:.2f}")
    print(f"{name:11s} cell from the ViT token {vit_probe:>5s}, from the decoder state "
          f"{probe['cell_from_decoder_state']:.2f} (chance {probe['chance']:.2f}); "
          f"p(top | top) {probe['p_top_when_top']:.2f}, p(top | bottom) "
          f"{probe['p_top_when_bottom']:.2f}")
before, as_blip = runs["before"]["curve"][-1], runs["as_blip"]["curve"][-1]
print(f"one patch per cell: shape {before['caption_shape_accuracy']:.2f} -> "
      f"{as_blip['caption_shape_accuracy']:.2f}, ITM on hard negatives "
      f"{before['itm_hard_negative_accuracy']:.2f} -> {as_blip['itm_hard_negative_accuracy']:.2f}, "
      f"position {before['caption_position_accuracy']:.2f} -> "
      f"{as_blip['caption_position_accuracy']:.2f}")
assert as_blip["caption_shape_accuracy"] > before["caption_shape_accuracy"]
assert as_blip["itm_hard_negative_accuracy"] > before["itm_hard_negative_accuracy"]

# %% [markdown]
# Trained as BLIP trains (`as_blip`), the ViT knows where each object is: a linear
# probe reads the cell from the object's token almost every time. The decoder, at the
# very token where it must name the place, does not: a probe on its state does no
# better than chance, and its probability of "top" is the same whether the object sits
# at the top or at the bottom (the cell checks both). So the information is in the
# image tokens and is lost in the decoder's cross-attention, which learned to fetch
# *what* an object is but not *where* it is; the captioner then falls back on the most
# common position words. Exercise 5 below asks you to look inside.

# %%
probe = runs["as_blip"]["position_probe"]
assert probe["cell_from_vit_token"] > 0.9
assert probe["cell_from_decoder_state"] < 2 * probe["chance"]
assert abs(probe["p_top_when_top"] - probe["p_top_when_bottom"]) < 0.05

# %% [markdown]
# Can the decoder learn to read the place at all? `benchmarks/position_study.py` trains
# short runs (1500 steps, the same few fixed captions for every training image) of the
# recipe as BLIP trains it, each changing one thing: which objectives train (all three,
# or the LM alone), on which scenes (the world's mix, or its single-object scenes
# alone), the position table's size at initialisation, and whether the text encoder
# and decoder share weights; the last two rows add the demo's second group of changes.
# Each is scored on scenes it never saw: the position phrase of its beam-search
# captions of the 41 single-object val and test scenes; a ranking of the same scenes
# that needs no generation (the decoder's likelihood of the caption with the object put
# in each of the 9 cells: is the true cell the most likely?); and, for the two-object
# test scenes, which of "left of", "right of", "above", "below" it finds most likely
# between the two objects.

# %%
study = json.loads(Path("../benchmarks/position_study.json").read_text())["variants"]
print(f"{'variant':19s} {'single-object':>13s} {'cell ranking':>12s} {'relation':>9s}")
for name, run in study.items():
    print(f"{name:19s} {run['single_position']:13.2f} {run['single_cell_ranking']:12.2f} "
          f"{run['pair_relation_ranking']:9.2f}   {run['what']}")
cell_chance = study["lm_single"]["single_cell_chance"]
relation_chance = study["lm_single"]["pair_relation_chance"]
print(f"chance: cell ranking {cell_chance:.2f} (always the most frequent cell), "
      f"relation {relation_chance:.2f} (the share of relations that hold)")
lm_single, all_single = study["lm_single"], study["all_single"]
print(f"single-object scenes only, LM alone: {lm_single['single_position']:.2f} of the captions "
      f"place the object right; with ITC and ITM beside it: {all_single['single_position']:.2f}")
as_blip_runs = {name: run for name, run in study.items() if not name.startswith("output_")}
assert lm_single["single_cell_ranking"] > cell_chance + 0.1
assert lm_single["single_position"] > all_single["single_position"] + 0.15
assert all(run["single_cell_ranking"] <= cell_chance + 0.05
           for name, run in as_blip_runs.items() if name != "lm_single")
assert all(abs(run["pair_relation_ranking"] - relation_chance) < 0.05
           for run in study.values())
# the figures the text states
assert {run["steps"] for run in study.values()} == {1500} and lm_single["singles"] == 41
assert study["big_position_table"]["changes"]["pos_embed_std"] / demo_config().init_std == 20
assert round(1 - lm_single["training_images"] / study["lm_world"]["training_images"], 1) == 0.9

# %% [markdown]
# Trained as BLIP trains, only one run ranks the true place above chance: the LM alone,
# on single-object scenes, where every caption names a place and there is one object
# to look at. Put ITC and ITM beside it, on the same scenes and steps, and its captions
# lose the place (the line under the table); train the LM alone on the world's mix,
# where nine captions in ten relate two objects, and the ranking falls to chance too.
# The relation between two objects is at chance in every such run. Neither a position
# table 20 times larger at initialisation nor unshared text weights change that.
#
# Our reading: ITC and ITM use position to *look things up* (the word "left" in the
# text encoder asks which image token is on the left, so position helps in the
# cross-attention's keys), while the captioner must *carry* it: the query "a small red
# circle" finds the circle by what it is, and the place has to come back in the
# values. The ViT's blocks add to each token far more about what it shows than the
# position table holds, and everything but the captioner's position words trains the
# values to carry *what*.
#
# The reading makes a prediction: put the place back into the values and the captioner
# should name it. That is the demo's second group. The ViT adds its position table once
# more to its output tokens, after the final LayerNorm (`ViTConfig.pos_embed_at_output`;
# a departure from BLIP, whose `VisionTransformer.forward` adds `pos_embed` once, before
# the blocks), so every key and value of the text's cross-attention holds the place at
# a size the blocks cannot shrink; the table is drawn at std 1.0, the size of a token
# after the LayerNorm, instead of 0.05; and the LM loss weighs twice, since the place
# words are few among the caption's tokens. The last two rows of the table test it on
# the study's short runs:

# %%
output_single, output_world = study["output_single"], study["output_world"]
print(f"single-object scenes, ITC + ITM + LM: captions place the object right "
      f"{all_single['single_position']:.2f} as BLIP trains, {output_single['single_position']:.2f} "
      f"with the demo's changes")
print(f"the world's mix, after {output_world['steps']} steps: cell ranking "
      f"{study['all_world']['single_cell_ranking']:.2f} -> "
      f"{output_world['single_cell_ranking']:.2f}, "
      f"relation ranking {study['all_world']['pair_relation_ranking']:.2f} -> "
      f"{output_world['pair_relation_ranking']:.2f}")
assert output_single["single_position"] > all_single["single_position"] + 0.5
assert output_world["single_cell_ranking"] > cell_chance + 0.4

# %% [markdown]
# The prediction holds for one object: beside ITC and ITM, on the single-object scenes,
# the captions now place the object right where before they almost never did, and on
# the world's mix the true cell now ranks first for most single-object scenes. The
# relation between two objects is still at chance after these 1500 steps (the table's
# last column, checked above for every run): it comes later. At full length the demo's
# position accuracy (the position panel at the top of this section) stays where it
# started for about 1500 steps and then climbs, and its probe (the `demo` line of the
# probe table) reads the cell from the decoder's state. The variants of the first
# table take the three changes apart:

# %%
demo_curve = [p["caption_position_accuracy"] for p in runs["demo"]["curve"]]
for name in ("as_blip", "input_only", "small_table", "lm_weight_1", "demo",
             "demo_seed_1", "demo_seed_2"):
    last = runs[name]["curve"][-1]
    print(f"{name:11s} position {last['caption_position_accuracy']:.3f}, captions "
          f"{last['caption_attribute_accuracy']:.3f}, recall@1 {last['i2t_recall@1']:.3f} / "
          f"{last['t2i_recall@1']:.3f}   {runs[name]['what']}")
print("the demo's position accuracy every 300 steps:", " ".join(f"{p:.2f}" for p in demo_curve))
seeds = [runs[name]["curve"][-1]["caption_position_accuracy"]
         for name in ("demo", "demo_seed_1", "demo_seed_2")]
print(f"three seeds: position {min(seeds):.3f} to {max(seeds):.3f}, mean {np.mean(seeds):.3f}")
probe = runs["demo"]["position_probe"]
assert probe["cell_from_decoder_state"] > 0.9
assert probe["p_top_when_top"] > 5 * probe["p_top_when_bottom"]
# what the next paragraph says
final = {name: run["curve"][-1] for name, run in runs.items()}
as_blip_position = final["as_blip"]["caption_position_accuracy"]
for name in ("as_blip", "input_only", "small_table"):
    p = runs[name]["position_probe"]
    assert abs(p["p_top_when_top"] - p["p_top_when_bottom"]) < 0.05, name
    assert final[name]["caption_position_accuracy"] < as_blip_position + 0.1, name
assert runs["lm_weight_1"]["position_probe"]["cell_from_decoder_state"] > 0.9
assert final["lm_weight_1"]["caption_position_accuracy"] < 0.6
assert max(demo_curve[:5]) < 0.5 and demo_curve[-1] > 0.95
for name in ("demo_seed_1", "demo_seed_2"):  # later and not as far: at step 1800 and at the end
    seed_curve = [p["caption_position_accuracy"] for p in runs[name]["curve"]]
    assert runs[name]["curve"][5]["step"] == runs["demo"]["curve"][5]["step"] == 1800
    assert seed_curve[5] < demo_curve[5] - 0.1 and seed_curve[-1] < demo_curve[-1], name
assert min(seeds) > as_blip_position + 0.2
best_recall = max(final, key=lambda n: final[n]["i2t_recall@1"] + final[n]["t2i_recall@1"])
print(f"best recall@1: {best_recall}, {final[best_recall]['i2t_recall@1']:.3f} / "
      f"{final[best_recall]['t2i_recall@1']:.3f}")
assert best_recall == "small_table"
assert all(final["demo"][k] > final["as_blip"][k] for k in ("i2t_recall@1", "t2i_recall@1"))

# %% [markdown]
# Each of the three changes is needed, on this seed. Without the second addition
# (`input_only`), or with it but the table at its old size (`small_table`), the
# captioner never finds the place, not even for one object: like `as_blip`, its
# probability of "top" is the same at the top and at the bottom. With the three losses
# weighed the same (`lm_weight_1`) it does name the place of a single object (the probe
# reads the cell from its state) but not, within the run, how two objects stand. The
# demo's own position accuracy stays where it started for the first 1500 steps and then
# climbs to all but perfect; with seeds 1 and 2 it starts to climb later and ends
# lower, at the figures printed above. That is the weak point of this recipe: the relations are
# learned late and by a different step for every seed, so a shorter run, or an unlucky
# seed, ends halfway.
#
# For retrieval the changes help less: the demo's recall@1 is above `as_blip`'s both
# ways, but `small_table`, whose table is added at the output and drawn at the old
# size, has the best recall@1 of all the variants (printed above) while its captions
# never place anything. What serves the captioner and what serves retrieval pull the
# position table's size in opposite directions here, and the demo chose captions.
#
# The full-size models share this weak spot. Kamath, Hessel and Chang ("What's 'up'
# with vision-language models?", EMNLP 2023) tested 18 vision-language models on
# photographs that differ only in where one object is relative to another (left of,
# right of, on, under): all did poorly, BLIP fine-tuned on VQAv2 scoring 56% where
# people score 99%, and neither up-weighting captions with prepositions nor
# fine-tuning on such pictures fixed it.

# %% [markdown]
# ### 7.1 And retrieval?
#
# The captioner now names every place, while recall@1 stays near 0.9. What does
# retrieval still get wrong, and does some other change lift it?
# `benchmarks/recall_study.py` sorts the demo's image-to-text misses (test images whose
# best caption, after the ITM re-ranking, belongs to another image) by what that
# caption says about the image: it may be true of it as well (no model could tell the
# two apart), name the same objects in another layout, or name other objects. It also
# trains ten runs of the recipe, each with one change aimed at retrieval: ITC's
# embedding 64 wide instead of 32 (on three seeds), ITC weighted twice like the LM,
# 10,000 or 20,000 training images instead of 5,000, a third layer, and BLIP's
# momentum distillation (momentum encoders whose similarities soften ITC's targets,
# `MomentumDistillation`), without and with a queue of past features.

# %%
recall_runs = json.loads(Path("../benchmarks/recall_study.json").read_text())["variants"]
print(f"{'variant':16s} {'R@1 i2t':>8s} {'R@1 t2i':>8s} {'ITM hard':>8s} {'captions':>8s} "
      f"{'position':>8s}   i2t misses: also true / same objects / other objects")
for name, run in recall_runs.items():
    misses = run["i2t_misses"]
    print(f"{name:16s} " + " ".join(f"{run[k]:8.3f}" for k in (
        "i2t_recall@1", "t2i_recall@1", "itm_hard_negative_accuracy",
        "caption_attribute_accuracy", "caption_position_accuracy"))
        + f"   {misses['also_true']:3d} / {misses['same_objects_other_layout']:3d} / "
          f"{misses['other_objects']:3d}")

# every finished run of both studies: mean recall@1 against caption position accuracy
fig, ax = plt.subplots(figsize=(8, 5.5))
points = [(name, run["caption_position_accuracy"],
           (run["i2t_recall@1"] + run["t2i_recall@1"]) / 2, "o") for name, run in recall_runs.items()]
points += [(name, final[name]["caption_position_accuracy"],
            (final[name]["i2t_recall@1"] + final[name]["t2i_recall@1"]) / 2, "s")
           for name in final if name != "demo"]
for name, x, y, marker in points:
    ax.scatter(x, y, marker=marker, color="C3" if name == "demo" else "C0")
    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
ax.axhline(0.93, ls="--", color="gray")
ax.axvline(0.70, ls="--", color="gray")
ax.text(0.71, 0.94, "both targets met", fontsize=8, color="gray")
ax.set_xlabel("caption position accuracy")
ax.set_ylabel("recall@1, mean of both ways")
ax.set_title("3600 steps of the demo's recipe and its variants (circles: recall study; "
             "squares: recipe study)", fontsize=9)
ax.grid(alpha=0.3)
plt.show()

demo_misses = recall_runs["demo"]["i2t_misses"]
print(f"the demo misses {sum(demo_misses.values())} of {recall_runs['demo']['config']['n_test']} "
      f"images: {demo_misses['also_true']} "
      f"pick a caption that is also true, {demo_misses['same_objects_other_layout']} the same "
      f"objects in another layout, {demo_misses['other_objects']} other objects")
wide = [recall_runs[n] for n in ("embed_64", "embed_64_seed_1", "embed_64_seed_2")]
recipe_seeds = [final[n] for n in ("demo", "demo_seed_1", "demo_seed_2")]
mean_recall = lambda rs: np.mean([(r["i2t_recall@1"] + r["t2i_recall@1"]) / 2 for r in rs])
print(f"three seeds, mean recall@1: {mean_recall(recipe_seeds):.3f} with the demo's embedding, "
      f"{mean_recall(wide):.3f} with the wider one; position at most "
      f"{max(r['caption_position_accuracy'] for r in wide):.3f} with the wider one")
# what the text says
assert recall_runs["demo"]["i2t_recall@1"] == final["demo"]["i2t_recall@1"]  # the same run
assert demo_misses["same_objects_other_layout"] > demo_misses["also_true"]
assert demo_misses["other_objects"] > demo_misses["also_true"]
assert mean_recall(wide) > mean_recall(recipe_seeds)
assert sum(mean_recall([w]) > mean_recall([r]) for w, r in zip(wide, recipe_seeds)) == 2
assert recall_runs["depth_3"]["train_cpu_s"] > recall_runs["demo"]["train_cpu_s"]
assert recall_runs["depth_3"]["caption_position_accuracy"] >= 0.70  # "place things well"
assert max(r["caption_position_accuracy"] for r in wide) < min(
    r["caption_position_accuracy"] for r in recipe_seeds)
for name in ("itc_weight_2", "train_10000", "train_20000", "depth_3", "distill"):
    assert mean_recall([recall_runs[name]]) < mean_recall([recall_runs["demo"]]), name
assert mean_recall([recall_runs["distill_queue"]]) < 0.8
assert not any(x >= 0.70 and y >= 0.93 for _, x, y, _ in points)

# %% [markdown]
# The demo's misses are not mostly unavoidable ones: a few pick a caption that is also
# true of the image, and the rest split between the right objects in the wrong layout
# and the wrong objects, so retrieval misses some of what the captioner reads off the
# same image without fault. The wider ITC embedding lifts recall@1 on average over
# three seeds (on two of them) and costs the captioner its places on every seed: the
# same tension as `small_table`'s. The other changes do not lift recall at this budget:
# weighing ITC twice, more images (each seen fewer times), a third layer (its captions
# place things well, its steps are slower), or BLIP's soft targets from momentum
# encoders. With BLIP's queue as well, ITC falls far behind. We have not taken that
# apart; BLIP's queue holds 57,600 features and is filled at a tenth of this learning
# rate, while this one holds 8 batches and starts, as BLIP's does, from random unit
# vectors. No run lands in the picture's upper right corner, where both of the demo's
# targets hold; the demo's recipe keeps its captions and leaves recall@1 near 0.9.

# %%
print(f"whole notebook: {time.perf_counter() - notebook_start:.1f} s")

# %% [markdown]
# ## Summary
#
# * BLIP pre-trains on $L_{\mathrm{itc}} + L_{\mathrm{itm}} + L_{\mathrm{lm}}$ with
#   AdamW (weight decay 0.05, here on Linear weights only), a warmup then a decaying
#   learning rate, and gradient clipping. `Trainer` runs that loop around a task; BLIP's
#   pretraining task steps with `pretrain_step`.
# * At this scale BERT's init std 0.02 leaves ITC on its $\log n$ plateau: the first
#   steps collapse the barely-different features onto one point, where the
#   contrastive gradient is zero. With 0.05 the useful differences grow first and the
#   loss leaves the plateau after a few dozen steps.
# * ITM starts at the entropy of its 1 : 2 label split, 0.637, by predicting "no
#   match" everywhere, and is the last objective to learn.
# * The temperature falls only when the true pair beats the softmax-weighted average
#   similarity. So it first rises, while the similarities say nothing about the
#   pairing, and falls once the positives lead.
# * After one short run, ITC retrieval works, ITM is just starting (and re-ranking
#   with it does not help yet), and the captioner names colours and sizes but not
#   shapes. On the compositional split retrieval and captions are worse, and no
#   caption names a held-out pair.
# * Trained as BLIP trains, the demo's captioner names what each object is but not
#   where: the ViT's tokens hold the place, the cross-attention's values do not pass it
#   on. The demo adds the position table again at the ViT's output (a departure from
#   BLIP), draws it larger and weighs the LM twice; its captioner then names the place
#   of single objects and, late in the run and at a step that differs by seed, the
#   relations between two.
# * Retrieval did not follow: recall@1 stays near 0.9. Of the changes tried for it, a
#   wider ITC embedding lifts it on average and takes the places out of the captions
#   again; more images, more depth, ITC weighted twice and BLIP's momentum distillation
#   do not lift it within the same steps.
#
# ## Exercises
#
# 1. **Sharing.** Retrain with `sharing="none"` and with `sharing="all"` (same
#    steps). Compare parameter counts, the LM and ITM curves and the caption accuracy.
#    Does sharing the self-attention hurt at this scale, as the paper's Table 3 found?
# 2. **One objective off.** Retrain with `loss_weights=(1, 1, 0)`, `(1, 0, 1)` and
#    `(0, 1, 1)`. Without ITC, where do ITM's hard negatives come from (read
#    `pretrain_step`), and what happens to ITM? Does LM help retrieval or hurt it?
# 3. **Noisy captions.** Make web-like data with
#    `noisy = world.make_noisy(data.train, 0.4, seed=1)` and train on it with
#    `blip_trainer(cfg, dataset=data, train_images=noisy.images,
#    train_captions=[[c] for c in noisy.captions])`. Compare the test measures with a
#    run on `[[c] for c in data.train.captions]` (also one fixed caption per image,
#    so only the noise differs). Then score every noisy pair with
#    `evaluate.match_probability` from the clean model: how well does it find the
#    wrong captions? That is CapFilt's filter.
# 4. **The plateau.** Find the smallest `init_std` that leaves the ITC plateau within
#    200 steps. Then keep 0.02 and raise the learning rate instead: can a larger step
#    size replace a larger initialisation, and why (or why not), given the gradient
#    formula of section 3.3?
# 5. **Where does position get lost?** Train the demo's recipe as BLIP trains it
#    (`demo_config(pos_embed_std=None, pos_embed_at_output=False, loss_weights=(1, 1, 1))`,
#    fewer steps will do) and take single-object test scenes. Run the decoder on
#    "[DEC] a small red circle at the" with `model.text_decoder.bert.forward(...,
#    causal=True)` and find the cross-attention weights of the last token in the cache
#    it returns (a `MultiHeadAttention` cache holds its softmax as `cache["att"][3]`,
#    shape (B, H, T, S)): does the token
#    that must name the place attend to the object's patch? Then look at what the
#    object's patch token passes on: is the cell still readable from the *values* of the
#    cross-attention (the patch tokens times the value weights), or only from the
#    tokens themselves? Do the same with `demo_config()`, whose ViT adds its position
#    table again at the output: what changed in the values?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 14.1,14.2` runs the same checks from a
# terminal and says what is wrong and where. You write a notebook exercise in the cell
# below its description. **The graded file is this notebook, `14_training.ipynb`**, not
# its jupytext twin `14_training.py`: if you edit the `.py`, run `jupytext --sync
# 14_training.py` before you check or hand in, or the checks still see the stub.
#
# ### Exercise 14.1 · Linear warmup, then cosine decay
#
# **Goal.** Write `warmup_cosine_schedule(step, total_steps, base_lr, warmup_steps, min_lr,
# warmup_start_lr)`: the learning rate at `step`, counted from 0, of section 3.1's schedule.
# The check compares it with `minblip.optim.warmup_cosine_lr`, the schedule every training
# run in these notebooks uses.
#
# **Hints.** During the warmup the rate rises linearly from `warmup_start_lr` at step 0 and
# would reach `base_lr` at step `warmup_steps`, which is where the cosine takes over, so the
# curve has no jump. The cosine runs over the `total_steps - warmup_steps` steps that remain
# and ends at `min_lr`, not at zero.

# %% nbgrader={"grade": false, "grade_id": "ex14_1_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def warmup_cosine_schedule(step, total_steps, base_lr, warmup_steps, min_lr=0.0,
                           warmup_start_lr=0.0):
    """The learning rate at ``step`` (0, 1, ..., total_steps): linear warmup, then cosine."""
    ### BEGIN SOLUTION
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex14_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.optim import warmup_cosine_lr

for step, expect in ((0, 0.1), (5, 0.55), (10, 1.0), (60, 0.6), (110, 0.2)):
    got = warmup_cosine_schedule(step, 110, 1.0, 10, min_lr=0.2, warmup_start_lr=0.1)
    print(f"step {step:3d}: lr {got:.4f} (expected {expect})")
    assert math.isclose(got, expect, rel_tol=1e-12)
assert warmup_cosine_schedule(0, 100, 0.3, 0) == 0.3  # no warmup: the cosine starts at once
for s in range(301):  # the whole curve of another setting, next to minblip's
    args = (s, 300, 2e-3, 40)
    kw = dict(min_lr=1e-5, warmup_start_lr=1e-6)
    assert math.isclose(warmup_cosine_schedule(*args, **kw), warmup_cosine_lr(*args, **kw),
                        rel_tol=1e-12), s
print("the whole 300-step curve matches minblip.optim.warmup_cosine_lr")

# %% [markdown]
# ### Exercise 14.2 · AdamW's decoupled weight decay
#
# **Goal.** Write `adamw_update(p, g, m, v, t, lr, betas, eps, weight_decay)`: one AdamW
# step on one array, in place. `p` is the weight, `g` its gradient, `m` and `v` the two
# moment estimates (updated in place too), `t` the step number counted from 1. The check
# runs five steps of your function next to `minblip.optim.AdamW` on the same numbers.
#
# **Hints.** Section 3.2 and the docstring of `AdamW`. Decoupled means the decay shrinks
# the weight, $p \leftarrow p(1 - \eta\lambda)$, and never enters $m$ and $v$ (adding
# $\lambda p$ to the gradient instead is Adam with L2 regularisation, a different
# optimiser). Then $m \leftarrow \beta_1 m + (1-\beta_1) g$,
# $v \leftarrow \beta_2 v + (1-\beta_2) g^2$ and
# $p \leftarrow p - \eta\,\hat m / (\sqrt{\hat v} + \epsilon)$ with the bias-corrected
# $\hat m = m / (1-\beta_1^t)$, $\hat v = v / (1-\beta_2^t)$. In place: write into the
# arrays (`m[...] = ...`, `p -= ...`), do not rebind the names.

# %% nbgrader={"grade": false, "grade_id": "ex14_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def adamw_update(p, g, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05):
    """One AdamW step on the arrays p, m, v, in place; g the gradient of p, t = 1, 2, ..."""
    ### BEGIN SOLUTION
    beta1, beta2 = betas
    p *= 1.0 - lr * weight_decay  # decoupled: the decay never passes through m and v
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1 ** t)  # m and v start at zero: undo their pull towards it
    v_hat = v / (1.0 - beta2 ** t)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex14_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.core import Param
from minblip.optim import AdamW

rng = np.random.default_rng(142)
w_ref = Param(rng.standard_normal((3, 4)), dtype=np.float64)
opt = AdamW([("w", w_ref)], lr=0.1, weight_decay=0.2)
w_mine = w_ref.data.copy()
m_mine, v_mine = np.zeros_like(w_mine), np.zeros_like(w_mine)
for t in range(1, 6):
    g = rng.standard_normal((3, 4)) * t  # growing gradients: the moments and the decay matter
    lr = 0.1 / t
    w_ref.grad[...] = g
    opt.step(lr=lr)
    adamw_update(w_mine, g, m_mine, v_mine, t, lr, weight_decay=0.2)
    err = np.abs(w_mine - w_ref.data).max()
    print(f"step {t}: max |yours - AdamW| = {err:.1e}")
    assert np.allclose(w_mine, w_ref.data, rtol=1e-12, atol=1e-14)
