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
# # 05 · Image-text contrastive learning (ITC)
#
# **Goal.** BLIP's first objective puts images and captions into one vector space in
# which a matching pair points the same way. In this notebook we
#
# 1. write down the contrastive loss BLIP inherits from ALBEF and CLIP;
# 2. run its forward on a batch of world images: projections, L2 normalisation and a
#    learnable temperature;
# 3. derive its backward — through the softmax, the temperature and the normalisation —
#    and check it numerically;
# 4. look at two facts that every implementation should satisfy, and at the stationary
#    point they reveal;
# 5. add BLIP's momentum distillation: a momentum encoder, feature queues and soft
#    targets;
# 6. watch the similarity matrix of a batch go from noise to a diagonal in a short
#    training run.
#
# ## 1. The paper's idea
#
# Take a batch of $n$ image-text pairs. Encode every image into a unit vector $v_i$ and
# every text into a unit vector $t_j$ of the same width $E$, and score every image
# against every text by cosine similarity divided by a temperature $\tau$:
#
# $$Z_{ij} = \frac{v_i \cdot t_j}{\tau}, \qquad Z \in \mathbb R^{n \times n}.$$
#
# The diagonal holds the $n$ true pairs, everything else is a negative. Read each row of
# $Z$ as the logits of an $n$-way classification "which text belongs to image $i$?",
# and each column as "which image belongs to text $j$?":
#
# $$L_{\mathrm{itc}} = \tfrac12\Big[\underbrace{\tfrac1n\textstyle\sum_i -\log
# \mathrm{softmax}(Z_{i,:})_i}_{\text{image}\to\text{text: CE}(Z)} \;+\;
# \underbrace{\tfrac1n\textstyle\sum_j -\log
# \mathrm{softmax}(Z_{:,j})_j}_{\text{text}\to\text{image: CE}(Z^\top)}\Big].$$
#
# This is the InfoNCE loss (van den Oord et al. 2018) in the symmetric form of CLIP
# (Radford et al. 2021); ALBEF (Li et al. 2021) uses it to align the unimodal encoders
# *before* fusing them, and BLIP (Li et al. 2022, section 3.2) keeps ALBEF's recipe,
# momentum distillation included (section 6 below). In salesforce/BLIP the loss is
# `loss_ita` in `models/blip_pretrain.py` `BLIP_Pretrain.forward`; in minblip it is
# `itc_forward` / `itc_backward` in `minblip/objectives.py`, next to the other training
# objectives.

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
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import Param, gradcheck
from minblip.blip import BLIP, MomentumDistillation
from minblip.image import preprocess
from minblip.objectives import itc_backward, itc_forward
from minblip.softmax import L2Normalize, softmax
from minblip.train import TrainConfig, blip_trainer

np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## 2. The forward, step by step
#
# We build a small model on the built-in world (`blip_trainer` builds the dataset, the
# tokenizer and the model from one `TrainConfig`, and the training loop around them). It is smaller than the default demo
# model — one layer of width 32 on each side — so that section 7 can train it in
# seconds; section 5 explains the larger `init_std`.

# %%
cfg = TrainConfig(n_train=1000, n_val=64, n_test=0, width=32, depth=1, heads=2,
                  init_std=0.1, steps=300, batch_size=32, lr=3e-3, warmup_steps=20,
                  loss_weights=(1.0, 0.0, 0.0))  # ITC only
trainer = blip_trainer(cfg)
model, tok = trainer.model, trainer.task.tokenizer
val = trainer.task.dataset.val
show = np.arange(8)  # eight images the model never trains on, with their captions
images = preprocess(val.images[show], cfg.image_size)
ids, mask = tok.encode([val.captions[i] for i in show], max_length=cfg.max_text_len)
print("images", images.shape, " ids", ids.shape)
for i in show[:3]:
    print(f"  {i}: {val.captions[i]}")

# %% [markdown]
# **Image side.** The ViT turns each image into $1 + N$ tokens; ITC uses only the first,
# `[CLS]`. A linear map `vision_proj` takes it from the ViT width to the shared width
# $E$ (`embed_dim`; 256 in BLIP, 32 here), and `F.normalize` puts it on the unit sphere.
#
# **Text side.** The *unimodal* text encoder (notebook 04: `[CLS]` first, no
# cross-attention) reads the caption; its `[CLS]` output goes through `text_proj` and
# is normalised the same way.

# %%
norm = L2Normalize()
image_embeds, _ = model.visual_encoder.forward(images)  # (B, 1+N, Dv)
v_raw, _ = model.vision_proj.forward(image_embeds[:, 0])  # (B, Dv) @ (Dv, E) -> (B, E)
v, _ = norm.forward(v_raw)
text_h, _ = model.text_encoder.forward(ids, mask)  # (B, T, Dt), text mode
t_raw, _ = model.text_proj.forward(text_h[:, 0])  # (B, Dt) @ (Dt, E) -> (B, E)
t, _ = norm.forward(t_raw)
print("image tokens", image_embeds.shape, "-> [CLS]", image_embeds[:, 0].shape,
      "-> projected", v_raw.shape)
print("text tokens ", text_h.shape, "-> [CLS]", text_h[:, 0].shape, "-> projected", t_raw.shape)
print("norms after normalisation:", np.linalg.norm(v, axis=1)[:4], np.linalg.norm(t, axis=1)[:4])

# %% [markdown]
# The loss by hand, from the equation of section 1, and from `itc_forward`:

# %%
tau = float(model.temp.data)
Z = v @ t.T / tau  # (B, E) @ (E, B) -> (B, B)
B = len(show)
log_p_rows = Z - np.log(np.exp(Z).sum(1, keepdims=True))  # log softmax over texts
log_p_cols = Z - np.log(np.exp(Z).sum(0, keepdims=True))  # log softmax over images
by_hand = 0.5 * (-np.mean(np.diag(log_p_rows)) - np.mean(np.diag(log_p_cols)))
loss, cache = itc_forward(v, t, model.temp)
print(f"temperature {tau}")
print(f"by hand {by_hand:.6f}   itc_forward {loss:.6f}   log n = {math.log(B):.6f}")

# %% [markdown]
# At initialisation the loss is close to $\log n$: every text is about equally likely
# for every image.
#
# ### Why a temperature, and why a clamp
#
# Cosines live in $[-1, 1]$. Without a temperature the logits could differ by at most 2,
# and a softmax over $n$ such logits can never be confident. The best any features can
# do is a regular simplex, where every true pair has cosine 1 and every false pair
# $-1/(n-1)$ (possible when $E \ge n-1$); the loss is then
# $\log\big(1 + (n-1)\,e^{-(1 + 1/(n-1))/\tau}\big)$. For BLIP's per-GPU batch of 75
# (and the $n = 32$ we train with below):

# %%
print(f"{'tau':>6s} {'best loss n=32':>15s} {'best loss n=75':>15s}   (log 32 = {math.log(32):.2f}, "
      f"log 75 = {math.log(75):.2f})")
for tau_ in (1.0, 0.5, 0.2, 0.07, 0.01):
    best = [math.log(1 + (n - 1) * math.exp(-(1 + 1 / (n - 1)) / tau_)) for n in (32, 75)]
    print(f"{tau_:6.2f} {best[0]:15.4f} {best[1]:15.4f}")

# %% [markdown]
# With $\tau = 1$ even perfect features leave the loss near $\log n$; dividing by
# $\tau = 0.07$ stretches the logits to about $\pm 14$ and lets the loss reach zero.
# BLIP makes $\tau$ a parameter initialised at 0.07, so the model picks its own
# sharpness, and before every forward clamps it in place, `self.temp.clamp_(0.001, 0.5)`
# under `torch.no_grad()`. The clamp is not part of the
# graph — the gradient never sees it — it only stops the optimiser from walking
# $\tau$ out of range: toward 0 the logits (and, as section 3 shows, the gradients,
# $\propto 1/\tau$) blow up; above 0.5 the loss cannot get far below $\log n$ (the
# table). CLIP does the same with a cap of 100 on $1/\tau$; BLIP-2 has no clamp at all
# (`blip2_qformer.py` only initialises and uses its `temp`). In minblip a training step
# calls `model.clamp_temperature()` before its forward:

# %%
saved = model.temp.data.copy()
for wild in (0.9, 0.0001, 0.2):
    model.temp.data[...] = wild
    model.clamp_temperature()
    print(f"temp set to {wild:<7} -> after clamp {float(model.temp.data)}")
model.temp.data[...] = saved

# %% [markdown]
# ### A common misreading: CLIP's `exp(t)` and BLIP's `/ temp`
#
# Many write-ups (and CLIP's own code) give the contrastive logits as
# `logits = exp(t) * I @ T.T`, with a learned **log-scale** $t$ initialised at
# $\log(1/0.07)$ and clipped so that $e^t \le 100$ (Radford et al. 2021, section 2.5;
# `CLIPModel.forward` in Hugging Face transformers multiplies by `logit_scale.exp()`).
# BLIP (`blip_pretrain.py`) writes `sim = I @ T.T / self.temp`, a learned **temperature**
# $\tau$ initialised at 0.07 and clamped to $[0.001, 0.5]$. They are the same function
# under $e^t = 1/\tau$, i.e. $t = -\log\tau$: both start at $1/0.07 \approx 14.3$, and the
# clamps translate to $\tau \ge 0.01$ for CLIP and $1/\tau \in [2, 1000]$ for BLIP. What
# differs is the parameter the optimiser moves, so the gradient differs by the chain
# rule: $\partial L/\partial t = \partial L/\partial \tau \cdot d\tau/dt = -\tau\,
# \partial L/\partial\tau$. A step on $t$ changes $\tau$ by a *factor* ($\tau e^{-\eta
# g}$, never negative), a step on $\tau$ by an *amount*. Both checked on the batch above,
# with central differences of the loss written out by hand:

# %%
def itc_by_hand(logit_scale):
    """The loss of the cell above, for logits = logit_scale * cosines (in float64)."""
    z = logit_scale * (v.astype(np.float64) @ t.astype(np.float64).T)
    rows = z - np.log(np.exp(z).sum(1, keepdims=True))
    cols = z - np.log(np.exp(z).sum(0, keepdims=True))
    return 0.5 * (-np.mean(np.diag(rows)) - np.mean(np.diag(cols)))


tau_now = float(model.temp.data)
log_scale = -math.log(tau_now)  # CLIP's t with exp(t) = 1 / tau
h_t = 1e-6
blip_form = itc_by_hand(1 / tau_now)
clip_form = itc_by_hand(math.exp(log_scale))
d_tau = (itc_by_hand(1 / (tau_now + h_t)) - itc_by_hand(1 / (tau_now - h_t))) / (2 * h_t)
d_t = (itc_by_hand(math.exp(log_scale + h_t)) - itc_by_hand(math.exp(log_scale - h_t))) / (2 * h_t)
print(f"loss with / tau: {blip_form:.10f}   with * exp(t): {clip_form:.10f}")
print(f"dL/dt = {d_t:.6f}   -tau * dL/dtau = {-tau_now * d_tau:.6f}")
assert abs(blip_form - clip_form) < 1e-9 and abs(d_t + tau_now * d_tau) < 1e-6 * max(1, abs(d_t))

# %% [markdown]
# ## 3. Deriving the backward
#
# Write $V, T \in \mathbb R^{n\times E}$ for the stacked unit features,
# $S = V T^\top$ for the cosines and $Z = S/\tau$. Let $P = \mathrm{softmax}_{\text{rows}}(Z)$,
# $Q = \mathrm{softmax}_{\text{rows}}(Z^\top)$ and $Y = I$ (the targets).
#
# **Cross-entropy.** For one row $z$ with target distribution $y$,
# $\partial(-\sum_k y_k \log \mathrm{softmax}(z)_k)/\partial z = \mathrm{softmax}(z) - y$
# (notebook 01). Averaging over $n$ rows and halving:
#
# $$\frac{\partial L}{\partial Z} \;=\; G \;=\; \frac{1}{2n}\Big[(P - Y) + (Q - Y)^\top\Big].$$
#
# The second term comes back transposed because the text→image direction read the
# columns of $Z$. The targets may be any distribution per row (soft targets, section 6);
# the formula holds as long as each row of $Y$ sums to 1.
#
# **Temperature.** $Z = S/\tau$, so $\bar S = G/\tau$ and
#
# $$\bar\tau = \sum_{ij} G_{ij}\,\frac{\partial Z_{ij}}{\partial\tau}
# = -\frac{1}{\tau^2}\sum_{ij} G_{ij} S_{ij} = -\frac1\tau \sum_{ij} G_{ij} Z_{ij}.$$
#
# Its sign is readable: $\sum_j (P_{ij} - Y_{ij}) Z_{ij}$ is the softmax-weighted average
# logit minus the true pair's logit. When the true pairs already win it is negative,
# $\bar\tau > 0$, and gradient descent *lowers* $\tau$ — a right model gets sharper; a
# wrong one gets softer.
#
# **Similarities.** $S = V T^\top$ uses $V$ and $T$ once each:
# $\bar V = \bar S\, T$ and $\bar T = \bar S^\top V$. In minblip's code the two directions
# are kept as two matrices, `sim_i2t` $= VT^\top$ and `sim_t2i` $= TV^\top$, so each
# feature matrix receives two terms that are added.
#
# **L2 normalisation.** $v = x/\lVert x\rVert$. Its Jacobian is
# $(I - v v^\top)/\lVert x\rVert$, so
#
# $$\bar x = \frac{\bar v - v\,(v\cdot\bar v)}{\lVert x\rVert}:$$
#
# the component of $\bar v$ along $v$ is removed (scaling $x$ does not move $v$) and the
# rest is divided by the length. Small raw features therefore get large gradients.
# From $\bar x$ the chain continues into `vision_proj` / `text_proj` and into the
# `[CLS]` position of each encoder.

# %% [markdown]
# ## 4. The backward code
#
# `itc_backward` is the forward read bottom-up; the banks of section 6 change only which
# matrix the second factor of each product is. (The `if temp.trainable` guard is minblip's
# freezing rule: a frozen Param receives no gradient. Notebooks 10 and 11 freeze whole
# models.)

# %%
print(inspect.getsource(itc_backward))

# %%
print(inspect.getsource(L2Normalize.backward))

# %% [markdown]
# Before the numerical check, the closed form of section 3 against the code on our batch:

# %%
model.temp.grad[...] = 0.0
d_v, d_t = itc_backward(1.0, cache, model.temp)
S = v @ t.T
P, Q, Y = softmax(S / tau), softmax(S.T / tau), np.eye(B)
G = ((P - Y) + (Q - Y).T) / (2 * B)
print("max |dV - (G/tau) T|   :", np.abs(d_v - (G / tau) @ t).max())
print("max |dT - (G/tau)^T V| :", np.abs(d_t - (G / tau).T @ v).max())
print("dtau: code", float(model.temp.grad), " formula", -np.sum(G * S) / tau**2)

# %% [markdown]
# ## 5. Gradient check, and two facts
#
# Central differences in float64 (notebook 01), on Params that hold the **raw**
# projected features — so the check covers the normalisation too — and the temperature.
# Features of size about 1 and $\tau = 0.07$ give logits of several units, so no
# gradient is tiny.

# %%
rng = np.random.default_rng(0)
n, E = 6, 5
x_img = Param(rng.standard_normal((n, E)), dtype=np.float64)
x_txt = Param(rng.standard_normal((n, E)), dtype=np.float64)
temp = Param(0.07, dtype=np.float64)


def itc_loss(backward):
    vi, c_i = norm.forward(x_img.data)
    ti, c_t = norm.forward(x_txt.data)
    loss, cache = itc_forward(vi, ti, temp)
    if backward:
        dvi, dti = itc_backward(1.0, cache, temp)
        x_img.grad += norm.backward(dvi, c_i)
        x_txt.grad += norm.backward(dti, c_t)
    return loss


report = gradcheck(itc_loss, {"image (before L2 norm)": x_img, "text (before L2 norm)": x_txt,
                              "temperature": temp}, verbose=True)

# %% [markdown]
# **Fact 1: symmetry.** Swapping the roles of images and texts swaps the two halves of
# the loss, so the value must not change (and the gradients swap):

# %%
vi, ti = norm.forward(x_img.data)[0], norm.forward(x_txt.data)[0]
l_it, c_it = itc_forward(vi, ti, temp)
l_ti, c_ti = itc_forward(ti, vi, temp)
g_it, g_ti = itc_backward(1.0, c_it, temp), itc_backward(1.0, c_ti, temp)
print(f"L(images, texts) = {l_it:.15f}\nL(texts, images) = {l_ti:.15f}")
print("gradients swap:", np.allclose(g_it[0], g_ti[1]) and np.allclose(g_it[1], g_ti[0]))

# %% [markdown]
# **Fact 2: $\log n$ at equal similarities — and a stationary point.** If every cosine
# is the same, every softmax is uniform, $P = Q = \tfrac1n\mathbf 1$ and the loss is
# exactly $\log n$. More: each row of $P - Y$ sums to zero, so with all texts equal to
# one vector $\bar t$, $\bar V = \bar S\,T = \bar S\,\mathbf 1\,\bar t^\top = 0$, and
# likewise for $\bar T$ and $\bar\tau$. **Fully collapsed features are a stationary
# point of ITC**, and near it the gradient is proportional to how far the features are
# from collapse:

# %%
base = np.tile(rng.standard_normal((1, E)), (n, 1))  # every feature the same vector
for eps in (0.0, 1e-4, 1e-2):
    jitter = np.random.default_rng(1)
    vi = norm.forward(base + eps * jitter.standard_normal((n, E)))[0]
    ti = norm.forward(base + eps * jitter.standard_normal((n, E)))[0]
    temp.grad[...] = 0.0
    loss, c = itc_forward(vi, ti, temp)
    dv, dt = itc_backward(1.0, c, temp)
    print(f"spread {eps:6.0e}: loss - log n = {loss - math.log(n):+.2e}, "
          f"|dV| = {np.linalg.norm(dv):.2e}, dtau = {float(temp.grad):+.2e}")

# %% [markdown]
# This matters in practice. A freshly initialised network with small weights maps all
# inputs to nearly the same `[CLS]` vector, so ITC starts next to this point. How close
# depends on the initialisation; here is the average distance of the normalised features
# from their mean, on the same eight images and captions, for the demo-size model
# (width 64, two layers) with BERT's usual `init_std` 0.02, with the 0.05 that
# `TrainConfig` uses by default, and for ours:

# %%
def spread(f):
    return float(np.mean(np.linalg.norm(f - f.mean(0), axis=1)))


spreads = {}  # text-feature spread per model
demo_02 = TrainConfig(init_std=0.02)
demo_05 = TrainConfig(init_std=0.05)
for name, c in (("demo size, init 0.02", demo_02), ("demo size, init 0.05", demo_05),
                ("this notebook", cfg)):
    m = BLIP(c.model_config(tok.vocab_size), np.random.default_rng(0))
    _, fi = m.encode_image(images)
    ft = m.encode_text(ids, mask)
    print(f"{name:22s} image features {spread(fi):.4f}   text features {spread(ft):.4f}")
    spreads[name] = spread(ft)
assert spreads["demo size, init 0.02"] < spreads["demo size, init 0.05"] / 3  # next paragraph

# %% [markdown]
# With `init_std` 0.02 the text features start far closer to collapse, and a model that
# starts there keeps its ITC loss on the $\log n$ plateau (notebook 14 measures it: 200
# steps with 0.02 never leave it), which is why `TrainConfig` starts from 0.05, while this
# notebook's model starts improving at once. BLIP's own
# pre-training does not meet this as badly: it trains ITM and LM at the same time (they
# spread the features too) and starts from pre-trained ViT and BERT weights.
#
# ## 6. Momentum distillation
#
# BLIP (following ALBEF) adds three things to ITC; `MomentumDistillation` in minblip
# holds them and `pretrain_step(..., momentum=md, alpha=0.4)` uses them.
#
# * **Momentum encoders**: separate copies of the ViT, the text encoder and both
#   projections, never trained by gradient; after every step they move a little towards
#   the online model, $\theta_m \leftarrow 0.995\,\theta_m + 0.005\,\theta$
#   (`_momentum_update`). They are a slowly moving average of the model.
# * **Queues**: the momentum features of the last $Q$ images and texts (57600 in BLIP),
#   so each online feature is contrasted with $Q$ more negatives than the batch holds.
#   They start as random unit vectors and fill up batch by batch (`_dequeue_and_enqueue`).
# * **Soft targets**: web captions are noisy and a negative may fit an image well. The
#   target of row $i$ becomes
#   $y_i = \alpha\,\mathrm{softmax}(v^m_i \cdot [t^m; \text{queue}]/\tau) + (1-\alpha)\,\text{one-hot}_i$
#   with $\alpha = 0.4$ (`configs/pretrain.yaml`), ramped up linearly from 0 over the
#   first two epochs (`pretrain.py`).
#
# A detail that surprises many readers (BLIP issues #38 and #193 ask what the queues
# do): BLIP never compares online with online. The logits are **online features against momentum
# features + queue**, $Z = V\,[T^m; T^{\text{queue}}]^\top/\tau$, of shape $(n, n+Q)$.
# The banks are constants, so the gradient reaches the online features through one
# factor of each product only. The positive of row $i$ is still column $i$: the batch's
# own momentum features come first.

# %%
md = MomentumDistillation(model, queue_size=2 * B, rng=np.random.default_rng(3))
banks = md.targets(model, images, ids, mask, alpha=0.4)
for key, val_ in banks.items():
    print(f"{key:10s} {val_.shape}")
print("soft target rows sum to", banks["soft_i2t"].sum(1)[:3], "; row 0, batch part:",
      banks["soft_i2t"][0, :B])
print("row 0, queue part:", banks["soft_i2t"][0, B:])
loss_md, c_md = itc_forward(v, t, model.temp, **banks)
print(f"ITC with momentum banks and soft targets: {loss_md:.4f}")

# %% [markdown]
# Row 0 puts its one-hot weight $1 - \alpha = 0.6$ on column 0, but the momentum
# softmax spends nearly all of its $\alpha = 0.4$ on the queue — on random unit vectors.
# At initialisation the batch's momentum features are near collapse (section 5) and no
# closer to one another than to noise, so early soft targets carry no information. This
# is why BLIP ramps $\alpha$ up from 0 while the queue fills with real features.
#
# Right after construction the momentum copy equals the model, so with no queue and
# $\alpha = 0$ the banks are the model's own features and the loss *value* is exactly the
# in-batch loss. The *gradient* is not: the banks are constants, so only half of the
# terms of section 3 survive.

# %%
md0 = MomentumDistillation(model, queue_size=0)
banks0 = md0.targets(model, images, ids, mask, alpha=0.0)
l_plain, c_plain = itc_forward(v, t, model.temp)
l_bank, c_bank = itc_forward(v, t, model.temp, **banks0)
dv_plain, _ = itc_backward(1.0, c_plain, model.temp)
dv_bank, _ = itc_backward(1.0, c_bank, model.temp)
print(f"loss in-batch {l_plain:.6f}   loss against momentum banks {l_bank:.6f}")
print(f"|dV| in-batch {np.linalg.norm(dv_plain):.4f}   against banks {np.linalg.norm(dv_bank):.4f}")

# %% [markdown]
# `targets` updates the momentum encoders and writes into the queues, so a step with
# momentum cannot be repeated exactly. To check the gradient we hold the banks and the
# soft targets fixed (random here) and check the loss on the online features:

# %%
K = n + 3 * n  # the batch's momentum features, then a queue of 3n
bank_rng = np.random.default_rng(4)
image_bank = norm.forward(bank_rng.standard_normal((K, E)))[0]
text_bank = norm.forward(bank_rng.standard_normal((K, E)))[0]
one_hot = np.eye(n, K)
soft_i2t = 0.4 * softmax(bank_rng.standard_normal((n, K))) + 0.6 * one_hot
soft_t2i = 0.4 * softmax(bank_rng.standard_normal((n, K))) + 0.6 * one_hot


def itc_bank_loss(backward):
    vi, c_i = norm.forward(x_img.data)
    ti, c_t = norm.forward(x_txt.data)
    loss, cache = itc_forward(vi, ti, temp, image_bank, text_bank, soft_i2t, soft_t2i)
    if backward:
        dvi, dti = itc_backward(1.0, cache, temp)
        x_img.grad += norm.backward(dvi, c_i)
        x_txt.grad += norm.backward(dti, c_t)
    return loss


report_md = gradcheck(itc_bank_loss, {"image (before L2 norm)": x_img,
                                      "text (before L2 norm)": x_txt, "temperature": temp},
                      verbose=True)

# %% [markdown]
# ## 7. The picture: a short training run
#
# Now train the model with ITC alone for 300 steps of 32 pairs and look at the cosine
# matrix of eight held-out images (rows) against their captions (columns) before and
# after, on the same colour scale.

# %%
before = v @ t.T
t0 = time.perf_counter()
history = trainer.run(progress=False)
seconds = time.perf_counter() - t0
_, v_after = model.encode_image(images)
t_after = model.encode_text(ids, mask)
after = v_after @ t_after.T
print(f"{cfg.steps} steps in {seconds:.1f} s; temperature {model.cfg.temp} -> "
      f"{float(model.temp.data):.4f}")
print("held-out image -> caption, top-1:", np.mean(after.argmax(1) == np.arange(B)),
      "  caption -> image, top-1:", np.mean(after.argmax(0) == np.arange(B)))
off_diagonal = ~np.eye(B, dtype=bool)
print(f"cosines before: spread {before.max() - before.min():.3f}; after: diagonal mean "
      f"{np.diag(after).mean():.2f}, off-diagonal mean {after[off_diagonal].mean():.2f}")
# what the text below the picture says: flat before, the diagonal standing out after
assert before.max() - before.min() < 0.1
assert np.diag(after).mean() > after[off_diagonal].mean() + 0.3

# %%
fig = plt.figure(figsize=(15, 6.4))
top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 4])
for i, ax in zip(show, top.subplots(1, B)):
    ax.imshow(val.images[i])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"image {i}", fontsize=9)
top.suptitle("eight held-out images; row i of each matrix is image i, column j is caption j "
             "(printed below)", fontsize=10)
axes = bottom.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
for ax, (name, mat) in zip(axes, (("before training", before), ("after 300 ITC steps", after))):
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1)
    for i, j in np.ndindex(mat.shape):
        ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"cosine(image i, caption j), {name}", fontsize=10)
    ax.set_xlabel("caption j")
    ax.set_ylabel("image i")
    ax.set_xticks(range(B))
    ax.set_yticks(range(B))
bottom.colorbar(im, ax=axes[:2], shrink=0.85, label="cosine similarity (same scale in both)")
steps = np.array(history["step"])
itc = np.array(history["itc"])
axes[2].plot(steps, itc, lw=0.6, color="0.7", label="ITC loss per step")
axes[2].plot(steps[19:], np.convolve(itc, np.ones(20) / 20, mode="valid"), color="C0",
             label="mean of 20 steps")
axes[2].axhline(math.log(cfg.batch_size), color="C3", ls="--", label=f"log {cfg.batch_size}")
axes[2].set_xlabel("step")
axes[2].set_title("training loss (batches of 32 pairs)", fontsize=10)
axes[2].legend(fontsize=8)
plt.show()
for i in show:
    print(f"caption {i}: {val.captions[i]}")

# %% [markdown]
# Before training every cosine is about the same number — the features are close to
# collapse and the loss sits at $\log n$. After 300 steps the diagonal stands out on
# images the model never trained on. The off-diagonal cells that stay warm are
# informative: they pair scenes that a caption could almost describe — the same number
# of objects, a shared colour or shape (image 3 and caption 5 both have a blue object
# above or below a diamond). Those are exactly the negatives the next notebook samples
# for ITM.
#
# ## Summary
#
# * ITC scores every image of a batch against every text by $Z = VT^\top/\tau$ with
#   L2-normalised projected `[CLS]` features, and averages the cross-entropy over rows
#   (image→text) and columns (text→image).
# * The temperature turns cosines in $[-1, 1]$ into logits that can express confidence;
#   BLIP learns it from 0.07 and clamps it to $[0.001, 0.5]$ outside the graph before
#   every step (BLIP-2 does not clamp).
# * Backward: $G = \frac{1}{2n}[(P - Y) + (Q - Y)^\top]$; $\bar S = G/\tau$,
#   $\bar\tau = -\sum G\odot S/\tau^2$; $\bar V = \bar S T$, $\bar T = \bar S^\top V$;
#   the normalisation removes the radial part and divides by the norm.
# * Equal similarities give $\log n$, and fully collapsed features are a stationary
#   point — small initial weights start next to it.
# * Momentum distillation contrasts online features with momentum features and a queue
#   (constants), against soft targets $\alpha\,\mathrm{softmax} + (1-\alpha)\,$one-hot.
#
# ## Exercises
#
# 1. **A fixed temperature.** Retrain section 7 three times with the temperature pinned
#    at 0.5, 0.07 and 0.01 (set `model.temp.data`, and `model.cfg.temp_min` and
#    `temp_max` to the same value: the clamp then resets it before every step). Plot the three loss curves. Which one learns fastest at first, and which one
#    reaches the lowest loss? Relate both to the table of section 2 and to the $1/\tau$
#    in the gradient.
# 2. **BLIP-2's targets.** BLIP-2 replaces the one-hot targets by label smoothing 0.1:
#    $y = 0.9\,\text{one-hot} + 0.1/n$. Build these as soft targets, pass them to
#    `itc_forward` and gradient-check. What is the smallest loss the smoothed targets
#    allow, and does the temperature gradient still push $\tau$ down forever when every
#    pair is right?
# 3. **Several positives.** In retrieval fine-tuning BLIP treats every caption of the
#    same image as a positive: the target row is `pos / pos.sum()`. Make a batch in which
#    two captions belong to one image (`world.make_dataset(..., captions_per_image=2)`),
#    write the targets, and show that the gradient is still $(P - Y)/n$ per direction.
# 4. **Rotation invariance.** Multiply all image *and* text features by one random
#    orthogonal matrix. Show that the loss does not change and that the feature gradients
#    rotate with the features. Which part of the model could learn such a rotation
#    without changing the loss?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 5.1,5.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `05_itc.ipynb`**, not its jupytext
# twin `05_itc.py`: if you edit the `.py`, run `jupytext --sync 05_itc.py` before you
# check or hand in, or the checks still see the stub.
#
# ### Exercise 5.1 · The ITC loss and its backward
#
# **Goal.** Write the bodies of `itc_forward` and `itc_backward` in
# `minblip/objectives.py`.
#
# **Hints.** Forward: the logits are `image_feat @ text_all.T / t` and
# `text_feat @ image_all.T / t` (with no banks, `text_all` is `text_feat` itself); the
# loss is the mean of two `CrossEntropyLoss` calls, with `np.arange(B)` as targets or the
# soft targets when given. Return the two logit matrices as `cache["sim_i2t"]` and
# `cache["sim_t2i"]` (`pretrain_step` samples negatives from them) and whatever your
# backward needs. Backward: section 3 has every formula. Each feature matrix is used
# twice when there are no banks, so it receives two terms; the temperature is a `Param`,
# so its gradient goes into `temp.grad` with `+=`.

# %% nbgrader={"grade": true, "grade_id": "ex5_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(50)
img_p = Param(rng.standard_normal((4, 3)), dtype=np.float64)
txt_p = Param(rng.standard_normal((4, 3)), dtype=np.float64)
temp_p = Param(0.3, dtype=np.float64)


def itc_loss(backward):
    loss, cache = itc_forward(img_p.data, txt_p.data, temp_p)
    if backward:
        di, dt = itc_backward(1.0, cache, temp_p)
        img_p.grad += di
        txt_p.grad += dt
    return loss


print(gradcheck(itc_loss, {"image_feat": img_p, "text_feat": txt_p, "temp": temp_p}, n_coords=8))
same = np.tile([[0.6, 0.8]], (5, 1))  # every similarity equal: the loss is log n
print("equal similarities give log n:",
      math.isclose(itc_forward(same, same.copy(), temp_p)[0], math.log(5), rel_tol=1e-12))

# %% [markdown]
# ### Exercise 5.2 · L2 normalisation backward
#
# **Goal.** Write `l2_normalize_backward(x, dy)` for $y = x/\lVert x\rVert$ over the last
# axis: return $\bar x$.
#
# **Hints.** Section 3 ends with the formula. Recompute the norm and $y$ from `x`; the
# dot product $y\cdot\bar y$ is one number per row, so keep its axis (`keepdims=True`)
# to broadcast it back.

# %% nbgrader={"grade": false, "grade_id": "ex5_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def l2_normalize_backward(x, dy):
    """y = x / ||x|| over the last axis: x, dy (..., E) -> dx (..., E)."""
    ### BEGIN SOLUTION
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    y = x / norm
    return (dy - y * np.sum(y * dy, axis=-1, keepdims=True)) / norm  # drop the part along y
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex5_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(51)
feat = Param(0.3 * rng.standard_normal((3, 4)), dtype=np.float64)  # small norms, large gradients
R = rng.standard_normal((3, 4))


def normalize_loss(backward):
    x = feat.data
    if backward:
        feat.grad += l2_normalize_backward(x, R)
    return float(np.sum(x / np.linalg.norm(x, axis=-1, keepdims=True) * R))


print(gradcheck(normalize_loss, {"features": feat}))
