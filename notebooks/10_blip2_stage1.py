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
# # 10 · BLIP-2 stage 1: a Q-Former learns to read a frozen image encoder
#
# **Goal.** Train the Q-Former of notebook 09 the way BLIP-2's first stage does: the
# image encoder is **frozen**, and three objectives — ITC, ITM and ITG — teach the
# learned queries to pull out of the image features what the text needs. We will
#
# 1. get a frozen image encoder (the ViT of a short BLIP run on our synthetic world) and
#    count what trains and what does not;
# 2. write BLIP-2's contrastive loss, whose image side is $Q$ vectors and whose
#    similarity is a **maximum over the queries**, and derive its backward;
# 3. see how ITM negatives and the ITG loss differ from BLIP's;
# 4. check the gradient of the whole step, then train, and measure retrieval on held-out
#    images — honestly, at toy scale;
# 5. look at which query wins the maximum;
# 6. read what limits stage 1 on this world, and the paper's ablations, measured over
#    seeds by `python -m minblip blip2 --ablation`.
#
# ## 1. The paper's idea
#
# Li et al. (2023), *BLIP-2*, section 3.2: "In the representation learning stage, we
# connect the Q-Former to a frozen image encoder and perform pre-training using
# image-text pairs. We aim to train the Q-Former such that the queries can learn to
# extract visual representation that is most informative of the text." The three losses
# share one Q-Former and differ in their masks (notebook 09):
#
# $$\mathcal L = \mathcal L_{\text{ITC}} + \mathcal L_{\text{ITM}} + \mathcal L_{\text{ITG}} .$$
#
# Why freeze the image encoder? It is big (EVA ViT-g has about 1B parameters, the
# Q-Former 188M), it is already good, and freezing makes stage 1 cheap: no gradient
# flows into it, so its activations need not be kept — and since it never changes, its
# output for an image is always the same. BLIP-2 still recomputes it every step; our
# trainer computes the features of the whole training set **once** and reuses them.
#
# The code we mirror is salesforce/LAVIS `blip2_qformer.py` (`Blip2Qformer.forward`).

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import inspect
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import Param, gradcheck
from minblip import world
from minblip.blip2_stage1 import Blip2Config, Blip2Stage1, stage1_step
from minblip.evaluate import image_features, recall_at_k, text_features
from minblip.evaluate_blip2 import stage1_captions, stage1_retrieval_metrics
from minblip.image import preprocess
from minblip.objectives import (blip2_negative_weights, hard_negative_weights,
                                itc_max_backward, itc_max_forward)
from minblip.qformer import QFormerConfig
from minblip.tokenizer import Tokenizer
from minblip.train import Trainer
from minblip.train_blip2 import Stage1Config, Stage1Training, pretrained_vision
from minblip.vit import ViTConfig

np.set_printoptions(precision=3, suppress=True)
notebook_start = time.perf_counter()

# %% [markdown]
# ## 2. The frozen image encoder
#
# BLIP-2 freezes the ViT-g of EVA-CLIP, a CLIP model: an image encoder trained with a
# contrastive loss on hundreds of millions of image-text pairs. We have no such model,
# so `pretrained_vision` trains one on our synthetic world: a small BLIP (notebook 05's
# recipe: one layer of width 32 on each side) trained with **ITC alone** — which makes it
# a CLIP — for 400 steps. We pass it the dataset we will use for stage 1, so the ViT never
# sees the test images. (Given a checkpoint path instead, `pretrained_vision` takes the
# ViT of `minblip.train.load_model(path)`.) The images are the demo's: 30 pixels in
# 10-pixel patches, one patch per cell of the world's 3x3 grid (notebook 14, section 7).
# This ViT is small so that the notebook runs in seconds; `python -m minblip blip2`
# freezes the demo's, and section 12 reads what that changes.

# %%
data = world.make_dataset(2000, 0, 200, seed=0, image_size=30)
vision = pretrained_vision(dataset=data, steps=400, warmup_steps=20, width=32, depth=1,
                           heads=2, patch_size=10, init_std=0.1, lr=3e-3, loss_weights=(1.0, 0.0, 0.0))
vit = vision.encoder
print(f"{vision.source}: {vision.seconds:.1f} s; ITC loss at the end "
      f"{np.mean(vision.history['itc'][-20:]):.3f} (log 32 = {np.log(32):.3f})")
print("frozen ViT:", vit.config)

# %% [markdown]
# ## 3. The stage-1 model: what trains, what does not
#
# `Blip2Stage1` keeps the ViT itself as `model.visual_encoder` and freezes it in place:
# `freeze()` marks each of its Params frozen (LAVIS sets `requires_grad=False`). A frozen
# Param is left out of `params()` of every module that holds it — the ViT's own and its
# parents' — and with `params()` go `zero_grad`, the optimiser and the gradient clipper:
# the ViT's Params are never listed, never receive a gradient, never move. Only
# `params(include_frozen=True)` still lists them, for casting, saving and counting.
# Everything else trains: `ln_vision` (a LayerNorm, eps 1e-5, that LAVIS puts after the
# frozen encoder and does *not* freeze), the Q-Former with its queries, the two ITC
# projections, the ITM head, the ITG head (tied to the Q-Former's word embeddings) and
# the temperature.
#
# The stage-1 task (`Stage1Training`) builds the model, the tokenizer and the frozen
# features of the training images; `Trainer` is the training loop every minblip model
# uses (notebook 14).

# %%
cfg = Stage1Config(init_std=0.1, steps=200, warmup_steps=20, lr=2e-3, batch_size=32)
trainer = Trainer(Stage1Training(cfg, vit, data))
model, tok = trainer.model, trainer.task.tokenizer
vit_params = vit.params(include_frozen=True)
print(f"model.visual_encoder is the ViT: {model.visual_encoder is vit}; all "
      f"{len(vit_params)} of its Params frozen: {vit.frozen}; listed by vit.params(): "
      f"{len(vit.params())}")
counts = model.parameter_counts()
print(f"trainable {counts['trainable']:>9,d}\nfrozen    {counts['frozen']:>9,d}\n"
      f"total     {counts['total']:>9,d}   ({100 * counts['trainable'] / counts['total']:.0f}% "
      f"trains)")
by_part = {}
for name, p in model.named_params():
    by_part[name.split(".")[0]] = by_part.get(name.split(".")[0], 0) + p.size
print({k: f"{v:,}" for k, v in by_part.items()})
print("a ViT Param among the trainable ones:",
      any(p is q for p in vit_params for q in model.params()))

# %% [markdown]
# The Q-Former of this model, drawn from the object itself by `minblip.diagrams`
# (notebook 09 builds it piece by piece): the queries and the text share each layer's
# self-attention, only the queries cross-attend to the frozen image features, and each
# lane has its own feed-forward.

# %%
from minblip import diagrams

fig = diagrams.draw_qformer(model.qformer)
plt.show()

# %% [markdown]
# Here the Q-Former (width 64, two layers) is bigger than the small ViT it reads; in
# BLIP-2 the proportions are reversed — about 188M trainable against a ~1B frozen ViT-g —
# but the bookkeeping is the same. The `init_std=0.1` is a toy choice: BLIP-2's
# Q-Former starts from pre-trained BERT, ours from scratch, and at BERT's 0.02 all of its
# outputs start nearly identical, which stalls contrastive learning for a long time.
#
# ## 4. ITC with a maximum over the queries
#
# The image side of ITC is the **query pass** (queries + cross-attention, no text) and
# the text side the **text pass** (the `[CLS]` output, no queries). Each query output is
# projected and normalised, so an image is $Q$ unit vectors $v_{b1}, \dots, v_{bQ}$, a
# text one unit vector $t_c$. BLIP-2 scores a pair by its best query:
#
# $$S_{bc} = \max_q\ v_{bq}\cdot t_c,\qquad
# \mathcal L_{\text{ITC}} = \tfrac12\Big[\mathrm{CE}_{ls}\big(S/\tau\big) + \mathrm{CE}_{ls}\big(S^\top/\tau\big)\Big],$$
#
# with the positives on the diagonal, label smoothing 0.1 (targets $0.9\cdot$one-hot
# $+\,0.1/B$), and a learnable temperature $\tau$ that BLIP-2 — unlike BLIP — never
# clamps. LAVIS computes `sim_i2t` and `sim_t2i` separately; they are the same matrix,
# transposed. There is no momentum encoder and no queue: the frozen image encoder made
# them unnecessary (the paper trains with large in-batch negatives instead).
#
# **Deriving the backward.** With $G = \partial\mathcal L/\partial(S/\tau)$ summed over
# both directions ($G = G_{i2t} + G_{t2i}^\top$):
#
# * $\bar\tau = -\sum_{bc} G_{bc} S_{bc} / \tau^2$ and $\bar S = G/\tau$;
# * the maximum routes each $\bar S_{bc}$ to **its winning query only**,
#   $q^* = \arg\max_q v_{bq}\cdot t_c$: $\ \bar v_{b q^*} \mathrel{+}= \bar S_{bc}\, t_c$
#   and $\bar t_c \mathrel{+}= \bar S_{bc}\, v_{bq^*}$. One query can win for several
#   texts, so the first is a scatter-add; the losing queries get nothing from this pair.

# %%
print(inspect.getsource(itc_max_backward).split('"""')[2])

# %%
g = np.random.default_rng(0)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


v = Param(unit(g.standard_normal((4, 3, 5))), dtype=np.float64)  # 4 images, 3 queries
t = Param(unit(g.standard_normal((4, 5))), dtype=np.float64)
temp = Param(0.2, dtype=np.float64)


def itc_loss(backward):
    loss, cache = itc_max_forward(v.data, t.data, temp)
    if backward:
        dv, dt = itc_max_backward(1.0, cache, temp)
        v.grad += dv
        t.grad += dt
    return loss


r = gradcheck(itc_loss, {"image_feats": v, "text_feat": t, "temp": temp}, verbose=True)
_, cache = itc_max_forward(v.data, t.data, temp)
print("\nwinning query of each (image, text) pair:\n", cache["best_query"])

# %% [markdown]
# ## 5. ITM negatives: the diagonal goes *before* the softmax
#
# ITM runs the bidirectional mask over $3B$ pairs in one Q-Former pass: texts
# `[pos, pos, neg]` with images `[pos, neg, pos]` (BLIP's order is different, notebook
# 06), labels `[1]*B + [0]*2B`, and `itm_head` scores **every query output**; the $Q$
# two-way logits are averaged. Each image's negative text (and each text's negative
# image) is drawn from the ITC similarities. BLIP-2 sets the positive's similarity to
# $-10000$ *before* the softmax; BLIP takes the softmax, adds $10^{-4}$ and zeroes the
# diagonal *after*. The two differ — BLIP's rows do not sum to one and keep a floor of
# $10^{-4}$ on every negative:

# %%
sim = g.standard_normal((4, 4)) * 3
print("BLIP-2 (blip2_negative_weights):\n", blip2_negative_weights(sim))
print("BLIP (hard_negative_weights):\n", hard_negative_weights(sim))

# %% [markdown]
# ## 6. ITG: `[DEC]`, the UniLM mask and the tied head
#
# ITG replaces `[CLS]` by `[DEC]`, runs the multimodal causal mask of notebook 09, sends
# the **text rows** through a BERT LM head whose output matrix is the Q-Former's word
# embedding table, and takes the shifted cross-entropy with label smoothing 0.1 over the
# real tokens. The text never cross-attends: everything it knows about the image passed
# through the $Q$ queries.
#
# ## 7. The whole step, and its gradient
#
# `stage1_step` runs the forward of all three objectives, then one mirrored backward:
# ITG first, then ITM (the negative images scatter back with `np.add.at`, since an image
# can be drawn twice), then ITC; every contribution to the image features adds up in
# one array, which goes back through `ln_vision` — and stops there.

# %%
src = inspect.getsource(stage1_step)
print(src[src.index("    # ---------------- backward"):])

# %% [markdown]
# A gradient check of the whole step on a tiny model in float64: every trainable Param,
# with fixed negatives in which image 0 is drawn twice. The frozen ViT is not in the
# list (`gradcheck` checks `params()`) — there is nothing to check: its input is pixels,
# so `stage1_step` never calls its backward and it gets no gradient.

# %%
words = "a red blue green circle square small large left right of the".split()
tiny_tok = Tokenizer(words)
tiny = Blip2Config(qformer=QFormerConfig(vocab_size=tiny_tok.vocab_size, width=8, depth=2,
                                         heads=2, mlp_dim=12, num_queries=3, encoder_width=6,
                                         max_positions=12, init_std=0.4),
                   vision=ViTConfig(image_size=8, patch_size=4, width=6, depth=1, heads=2,
                                    mlp_dim=12), embed_dim=5, proj_init_std=0.4)
tiny_model = Blip2Stage1(tiny, np.random.default_rng(1)).to(np.float64)
tiny_model.temp.data[...] = 0.5
t_ids, t_mask = tiny_tok.encode(["a red circle", "a large blue square left of a green circle",
                                 "a small square"], max_length=10)
t_images = np.random.default_rng(2).standard_normal((3, 3, 8, 8))
negatives = (np.array([2, 0, 0]), np.array([1, 1, 0]))  # image 0 is a negative twice


def step_loss(backward):
    if backward:
        tiny_model.zero_grad()
    return stage1_step(tiny_model, t_images, t_ids, t_mask, dec_id=tiny_tok.dec_id,
                       negatives=negatives, backward=backward).loss


r = gradcheck(step_loss, tiny_model, n_coords=3, rtol=1e-5)
print(f"{len(r.rows)} trainable arrays checked, max rel error {r.max_rel_err:.1e}, "
      f"random direction {r.directional.max_rel_err:.1e}")
tiny_vit = tiny_model.visual_encoder.params(include_frozen=True)
print("ViT gradients all zero:", all(not p.grad.any() for p in tiny_vit))

# %% [markdown]
# ## 8. Training
#
# 200 steps of 32 pairs: AdamW (weight decay 0.05 on the Linear weights), linear warmup
# then cosine decay (LAVIS `linear_warmup_cosine_lr`), gradient clipping at norm 1. Each
# step draws 32 distinct training images with a freshly sampled caption each. We keep a
# fingerprint of the frozen ViT to confirm afterwards that it never moved.

# %%
vit_before = np.concatenate([p.data.ravel() for p in vit_params]).copy()
history = trainer.run(progress=False)
print(f"{cfg.steps} steps in {trainer.train_seconds:.1f} s "
      f"({1e3 * trainer.train_seconds / cfg.steps:.0f} ms per step)")
vit_after = np.concatenate([p.data.ravel() for p in vit_params])
print("frozen ViT unchanged:", np.array_equal(vit_before, vit_after))
print(f"temperature {model.cfg.temp} -> {history['temp'][-1]:.4f}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
steps = np.array(history["step"])
for ax, (name, ref, ref_label) in zip(axes, [
        ("itc", np.log(cfg.batch_size), f"log {cfg.batch_size}: no better than chance"),
        ("itm", -(np.log(1 / 3) / 3 + 2 * np.log(2 / 3) / 3), "always p(match) = 1/3"),
        ("itg", None, None)]):
    y = np.array(history[name])
    ax.plot(steps, y, color="0.75", lw=0.7)
    ax.plot(steps[9:], np.convolve(y, np.ones(10) / 10, mode="valid"), color="C0")
    if ref is not None:
        ax.axhline(ref, color="C3", ls="--", lw=1, label=ref_label)
        ax.legend(fontsize=8)
    ax.set_title(f"{name.upper()} loss")
    ax.set_xlabel("step")
axes[3].plot(steps, history["temp"])
axes[3].set_title("temperature (not clamped)")
axes[3].set_xlabel("step")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 9. Retrieval on held-out images
#
# The 200 test images of the world, each with its caption; none was seen by the ViT or
# the Q-Former. Image → text: rank the 200 captions for each image; text → image: the
# other way. The score is the ITC similarity $\max_q v_{bq}\cdot t_c$ (LAVIS
# `compute_sim_matrix`: cosines, no temperature); optionally each query's 10 best
# candidates are re-ranked by ITM match logit + ITC similarity. Chance recall@1 is
# 1/200 = 0.005. For reference, the last rows score the same pairs with the BLIP that
# trained the ViT (its own ITC: the ViT's `[CLS]` against its own text encoder) — the
# ViT was trained for exactly this task, and its text encoder is not frozen.

# %%
test_pixels = preprocess(data.test.images, vit.config.image_size)
metrics = stage1_retrieval_metrics(model, tok, data.test.captions, images=test_pixels,
                                   k_test=10)
_, blip_image = image_features(vision.blip, test_pixels)
blip_ids, blip_mask = tok.encode(data.test.captions, max_length=vision.train_config.max_text_len)
blip_sim = blip_image @ text_features(vision.blip, blip_ids, blip_mask).T
for name, scores in (("blip_i2t", blip_sim), ("blip_t2i", blip_sim.T)):
    metrics.update({f"{name}_recall@{k}": v for k, v in recall_at_k(scores).items()})
print(f"{'':34s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
for name, label in (("itc_i2t", "Q-Former, image->text, ITC"),
                    ("itc_t2i", "Q-Former, text->image, ITC"),
                    ("i2t", "Q-Former, image->text, ITC+ITM"),
                    ("t2i", "Q-Former, text->image, ITC+ITM"),
                    ("blip_i2t", "the ViT's own BLIP, image->text"),
                    ("blip_t2i", "the ViT's own BLIP, text->image")):
    print(f"{label:34s} " + " ".join(f"{metrics[f'{name}_recall@{k}']:6.3f}" for k in (1, 5, 10)))

# %%
itc_r1 = np.array([metrics["itc_i2t_recall@1"], metrics["itc_t2i_recall@1"]])
blip_r1 = np.array([metrics["blip_i2t_recall@1"], metrics["blip_t2i_recall@1"]])
itm_prior = -(np.log(1 / 3) / 3 + 2 * np.log(2 / 3) / 3)
itm_end = np.mean(history["itm"][-20:])
print(f"stage-1 ITC recall@1 {itc_r1.round(3)} = {(itc_r1 * 200).mean():.0f}x chance; the "
      f"ViT's own BLIP {blip_r1.round(3)}; largest gap {np.abs(itc_r1 - blip_r1).max():.3f}")
print(f"ITM loss over the last 20 steps {itm_end:.3f}, the prior's {itm_prior:.3f}")
assert itc_r1.min() > 10 / 200  # far above chance
assert (itc_r1 < blip_r1).all()  # behind the BLIP whose ViT it reads, after 200 steps
assert abs(itm_end - itm_prior) < 0.05  # ITM has not left its prior

# %% [markdown]
# Read these numbers for what they are. Q-Former retrieval is far above chance, so the
# queries do carry what the captions talk about; it is also far from solved after 200
# steps of a from-scratch toy on 30×30 scenes that differ by one colour or one relation.
# In this run it stays behind the BLIP whose ViT it reads (the gap printed above): its
# text side and its queries start from scratch, on a frozen ViT, and have had 200
# steps; section 12 shows that at full length stage 1 comes level. The ITM loss
# hardly leaves the line of "always answer p(match) = 1/3", the prior of its 1:2 label
# mix: in a run this short ITM has not learned to match, and re-ranking by it does not
# help. Section 12 measures what it takes to get further.
#
# ## 10. Which query wins?
#
# Each (image, text) similarity is decided by one of the $Q$ queries. For 8 test images
# and their captions: the similarity matrix, with the winning query printed in each cell,
# and how often each query wins over all 200 × 200 pairs and over the 200 matched pairs.

# %%
image_feats = model.encode_image(images=test_pixels)  # (200, Q, E)
ids, mask = tok.encode(data.test.captions, max_length=cfg.max_text_len)
text_feat = model.encode_text(ids, mask)  # (200, E)
per_query = np.einsum("iqe,te->itq", image_feats, text_feat)  # (200, 200, Q)
winner = per_query.argmax(-1)
best = per_query.max(-1)
Q = cfg.num_queries
n = 8
fig, axes = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
im = axes[0].imshow(best[:n, :n], cmap="RdBu_r", vmin=-1, vmax=1)
for i, j in np.ndindex(n, n):
    axes[0].text(j, i, f"q{winner[i, j]}\n{best[i, j]:.2f}", ha="center", va="center",
                 fontsize=7, fontweight="bold" if i == j else "normal")
axes[0].set_xlabel("caption j")
axes[0].set_ylabel("image i")
axes[0].set_title("max over queries of cosine(query output, caption); winner in each cell")
plt.colorbar(im, ax=axes[0], shrink=0.8)
all_wins = np.bincount(winner.ravel(), minlength=Q) / winner.size
pos_wins = np.bincount(np.diag(winner), minlength=Q) / len(winner)
x = np.arange(Q)
axes[1].bar(x - 0.2, all_wins, width=0.4, label="all 200 × 200 pairs")
axes[1].bar(x + 0.2, pos_wins, width=0.4, label="the 200 matched pairs")
axes[1].axhline(1 / Q, color="C3", ls="--", lw=1, label=f"uniform (1/{Q})")
axes[1].set_xticks(x, [f"q{i}" for i in x])
axes[1].set_ylabel("fraction of pairs won")
axes[1].set_title("how often each query decides the similarity")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
for i in range(n):
    print(f"caption {i}: {data.test.captions[i]}")

# %% [markdown]
# The winners are far from uniform. Let us count:

# %%
top = np.bincount(np.diag(winner), minlength=Q).argmax()
print(f"q{top} wins {pos_wins[top]:.0%} of the matched pairs and {all_wins[top]:.0%} of all "
      f"pairs; queries that win under 1% of all pairs: "
      f"{[f'q{i}' for i in range(Q) if all_wins[i] < 0.01]}")

# %%
rarely = [i for i in range(Q) if all_wins[i] < 0.01]
assert pos_wins[top] > 0.5 and len(rarely) > 0
print(f"most matched pairs go to one query (q{top}: {pos_wins[top]:.0%}); "
      f"{len(rarely)} of the {Q} queries win under 1% of all pairs")

# %% [markdown]
# In this run one query has become *the* matching query: it wins most matched pairs
# (the share printed above), while a few others win the mismatched pairs and some
# queries almost never win (the count printed above). The max gives a losing query no
# ITC gradient for that pair, so a query that starts out losing can stay a loser for
# ITC — it still learns from ITM and ITG, which read every query. LAVIS issues #479 and
# #495 ask why the 32 queries do not collapse into one; for ITC alone, in a toy this
# small, they partly do.
#
# ## 11. Captions from the ITG head
#
# The ITG head can caption: start from `[DEC]`, let the text attend to the queries'
# cached keys and values (LAVIS `Blip2Qformer.generate`), and decode greedily. After 200
# steps expect fluent sentences of the world's grammar with only partly right content:

# %%
for cap, truth in zip(stage1_captions(model, tok, images=test_pixels[:4]),
                      data.test.captions[:4]):
    print(f"generated: {cap:55s} | true: {truth}")

# %% [markdown]
# ## 12. What limits stage 1, and the paper's ablations, measured
#
# Everything above is one seed of a 200-step toy. `python -m minblip blip2 --ablation
# --vision-checkpoint runs/demo/checkpoint.npz` runs the full-length stage 1 of
# `python -m minblip blip2` (a Q-Former of this one's sizes, 2000 steps, on the demo's
# frozen ViT) over three seeds, with variants that answer three questions;
# docs/blip2_results.md reports the run read here (`docs/blip2_results.json`).
#
# * **What limits stage 1?** Next to the recall of the BLIP whose ViT it reads (that
#   BLIP's own ITC), and its curve against stage-1 steps.
# * **ITG** (BLIP-2's Table 6): the paper finds that adding the generation loss to ITC
#   and ITM improves retrieval, because generating the text forces the queries to take
#   in what the text needs.
# * **The number of queries**: BLIP-2 uses 32 (and does not report a sweep); here 1, 4, 8
#   and 32, against recall and the CPU time of one stage-1 step.

# %%
import json
from pathlib import Path

from IPython.display import Markdown, display

from minblip.blip2_experiment import format_ablation_tables, plot_stage1_ablations

results = json.loads(Path("../docs/blip2_results.json").read_text())
display(plot_stage1_ablations(results))
tables = format_ablation_tables(results)
display(Markdown(tables[tables.index("### 2."):]))

# %%
variants = results["stage1_variants"]
r1 = {name: np.array([v["i2t_recall@1"]["mean"], v["t2i_recall@1"]["mean"]])
      for name, v in variants.items()}
vit = results["vision"]
print("frozen ViT: its BLIP's ITC recall@1 -> stage 1's, mean of i2t and t2i over seeds")
for which, e in vit.items():
    print(f"  {which:8s} {np.mean([e['blip_i2t_recall@1']['mean'], e['blip_t2i_recall@1']['mean']]):.3f}"
          f" -> {np.mean([e['stage1_i2t_recall@1']['mean'], e['stage1_t2i_recall@1']['mean']]):.3f}")
curve = variants["base"]["curve"]
print("default stage 1, recall@1 (i2t) against steps:",
      {int(s): round(m, 3) for s, m in zip(curve["step"]["mean"], curve["i2t_recall@1"]["mean"])})
itg_gain = results["itg"]["difference"]
print("ITG's gain in recall@1 (with - without), per seed: i2t",
      itg_gain["i2t_recall@1"]["values"], "t2i", itg_gain["t2i_recall@1"]["values"])
q = {int(k): name for k, name in results["queries"].items()}
print("queries -> recall@1 (i2t, t2i) and CPU ms per step:",
      {k: (*r1[name].round(3).tolist(), round(variants[name]["ms_per_step"]["mean"]))
       for k, name in sorted(q.items())})
base, vit_blip = variants["base"], vit["default"]
ceiling = np.array([vit_blip["blip_i2t_recall@1"]["mean"], vit_blip["blip_t2i_recall@1"]["mean"]])
assert np.abs(r1["base"] - ceiling).max() < 0.03  # stage 1 ends level with the ViT's BLIP
assert max(abs(itg_gain[k]["mean"]) for k in ("i2t_recall@1", "t2i_recall@1")) < 0.02
by_q = [r1[name] for _, name in sorted(q.items())]
assert np.ptp(by_q, axis=0).max() < 0.02  # the same recall with 1 query or 32
cost = [variants[name]["ms_per_step"]["mean"] for _, name in sorted(q.items())]
assert cost == sorted(cost)
print(f"\nwhole notebook: {time.perf_counter() - notebook_start:.0f} s")

# %% [markdown]
# What the three seeds say (the cell checks each statement):
#
# * **The frozen encoder is the ceiling.** Stage 1 climbs fast and stops where the ITC of
#   the BLIP that trained the ViT stands: the queries find what the ViT offers, and no
#   more. That is BLIP-2's premise seen from below: a frozen encoder is only as good as
#   its pretraining, which is why the paper freezes EVA-CLIP's ViT-g.
# * **ITG changes nothing measurable here**, unlike the paper's Table 6: retrieval already
#   sits at the ViT's ceiling without it, so there is nothing left for ITG to add. ITG
#   costs CPU time per step (the table's last column).
# * **One query is as good as 32.** A scene of our world holds at most two objects and a
#   relation; one query can carry that to ITC. BLIP-2's 32 queries serve photographs
#   with far more in them. The cost of a stage-1 step grows with the queries.

# %% [markdown]
# ## Summary
#
# * Stage 1 trains the Q-Former (queries, shared self-attention, query-only
#   cross-attention, two FFNs) plus `ln_vision`, projections, heads and temperature;
#   the image encoder is frozen, so no `params()` lists it: it gets no gradient and never
#   moves (ours is small next to the part that trains; in BLIP-2 it is the other way
#   round).
# * ITC compares $Q$ query vectors with one text vector and keeps the **maximum**; the
#   gradient goes to the winning query only. Label smoothing 0.1, an unclamped
#   temperature, in-batch negatives, no momentum encoder.
# * ITM: one pass over `[pos, pos, neg]` × `[pos, neg, pos]`, the bidirectional mask,
#   logits averaged over queries, negatives from softmax with a $-10000$ diagonal.
#   ITG: `[DEC]`, the UniLM mask, a tied LM head.
# * Measured here: after 200 steps ITC retrieval is well above chance but behind the
#   contrastive BLIP that trained the frozen ViT; ITM still near its prior; one query
#   decides most matched pairs. At full length (section 12, three seeds) stage 1 comes
#   level with that BLIP and no further: the frozen encoder bounds what the queries can
#   find, ITG adds nothing measurable, and one query does as well as 32.
#
# ## Exercises
#
# 1. **Other frozen encoders.** Rerun sections 3-9 with
#    `VisionTransformer(vit.config, np.random.default_rng(0))` as the frozen ViT, then with
#    the ViT of a BLIP trained 100 or 1000 steps instead of 400. Plot test recall@1
#    against the BLIP's own ITC loss. Is a better contrastive ViT always a better frozen
#    encoder for the Q-Former?
# 2. **Mean instead of max.** Replace the maximum over queries by the mean in
#    `itc_max_forward` and write its backward (every query now gets $\bar S/Q$). Check it
#    with `gradcheck`, train, and compare recall and the query-win histogram.
# 3. **BLIP's negatives.** Use `minblip.objectives.hard_negative_weights` instead of
#    `blip2_negative_weights` in a copy of `sample_blip2_negatives` and `stage1_step`.
#    Measure, for one trained model, how often each rule samples a caption that is
#    *true* of the image (`minblip.world.caption_is_true`) — a false negative.
# 4. **Where does ITG's gradient go?** Train with `loss_weights=(0, 0, 1)` for 100 steps
#    and record the norm of `query_tokens.grad` and of the cross-attention gradients per
#    step. Explain why they are not zero although the text never cross-attends.

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 10.1,10.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `10_blip2_stage1.ipynb`**, not its
# jupytext twin `10_blip2_stage1.py`: if you edit the `.py`, run `jupytext --sync
# 10_blip2_stage1.py` before you check or hand in, or the checks still see the stub.
#
# ### Exercise 10.1 · ITC with a maximum over the queries: the backward
#
# **Goal.** Write the body of `itc_max_backward(dloss, cache, temp)` in
# `minblip/objectives.py`: from the cache of `itc_max_forward`, return the gradients of the
# image features $(B, Q, E)$ and the text features $(B, E)$, and add the temperature's
# gradient into `temp.grad`.
#
# **Hints.** Section 4 derives it. The cross-entropy's own backward gives the gradient of
# each direction's logits; the text-to-image direction read $S^\top$, so transpose its
# gradient before adding the two. Then undo the division by $\tau$ (for both $S$ and
# $\tau$), and route $\bar S_{bc}$ to query `best[b, c]` of image $b$ only. A query may win
# for several texts: the check below has two queries and four texts, so in every image
# some query wins at least twice. Which NumPy function adds correctly when an index
# repeats?

# %% nbgrader={"grade": true, "grade_id": "ex10_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(100)
v_check = Param(rng.standard_normal((4, 2, 3)), dtype=np.float64)  # 4 images, 2 queries
t_check = Param(rng.standard_normal((4, 3)), dtype=np.float64)
temp_check = Param(0.3, dtype=np.float64)


def itc_check_loss(backward):
    loss, cache = itc_max_forward(v_check.data, t_check.data, temp_check)
    if backward:
        dv, dt = itc_max_backward(1.0, cache, temp_check)
        v_check.grad += dv
        t_check.grad += dt
    return loss


print(gradcheck(itc_check_loss, {"image_feats": v_check, "text_feat": t_check,
                                 "temp": temp_check}, n_coords=24))

# %% [markdown]
# ### Exercise 10.2 · ITG inputs and targets
#
# **Goal.** Write `itg_inputs(ids, mask, dec_id)`: from the tokenizer's ids
# `[CLS] w1 .. wn [SEP] [PAD]..` $(B, T)$ and their 0/1 mask, return the decoder's input
# `dec_ids` (the same ids with `[DEC]` in place of `[CLS]`) and `targets` $(B, T)$, where
# `targets[:, t]` is the token that position $t$ is trained to predict, $-100$ where there
# is none. The check compares your targets with the ITG loss of `stage1_step`.
#
# **Hints.** `stage1_step` still needs the original `ids` for ITC and ITM: do not change
# them (`.copy()`). Position $t$ predicts token $t+1$; padding is never a target, and the
# last position has no next token. `stage1_step`'s next-token loss (`NextTokenLoss`) does
# the shift by pairing `logits[:, :-1]` with `labels[:, 1:]`; here you put it into the
# targets instead.

# %% nbgrader={"grade": false, "grade_id": "ex10_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def itg_inputs(ids, mask, dec_id):
    """ids (B, T) "[CLS] w1 .. wn [SEP] [PAD]..", mask (B, T) of 0/1, the [DEC] id ->
    (dec_ids (B, T), targets (B, T)); targets[:, t] is the token after position t, or -100."""
    ### BEGIN SOLUTION
    dec_ids = ids.copy()
    dec_ids[:, 0] = dec_id  # on a copy: ITC and ITM still read [CLS]
    labels = np.where(mask.astype(bool), dec_ids, -100)  # padding is never a target
    targets = np.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t + 1; the last predicts nothing
    return dec_ids, targets
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex10_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.softmax import CrossEntropyLoss

ids_check = np.array([[2, 7, 8, 9, 3, 0], [2, 7, 3, 0, 0, 0]])  # [CLS]=2 [SEP]=3 [PAD]=0
mask_check = (ids_check != 0).astype(int)
dec_check, targets_check = itg_inputs(ids_check, mask_check, dec_id=4)
print("dec_ids:\n", dec_check, "\ntargets:\n", targets_check)
assert ids_check[0, 0] == 2, "itg_inputs changed the ids it was given"
assert dec_check.tolist() == [[4, 7, 8, 9, 3, 0], [4, 7, 3, 0, 0, 0]]
assert targets_check.tolist() == [[7, 8, 9, 3, -100, -100], [7, 3, -100, -100, -100, -100]]

# the ITG loss of stage1_step equals the cross-entropy of the logits against your targets
check_cfg = Blip2Config(qformer=QFormerConfig(vocab_size=12, width=8, depth=1, heads=2, mlp_dim=12,
                                              num_queries=2, encoder_width=6, max_positions=8,
                                              init_std=0.4),
                        vision=ViTConfig(image_size=8, patch_size=4, width=6, depth=1, heads=2,
                                         mlp_dim=12), embed_dim=5)
check_model = Blip2Stage1(check_cfg, np.random.default_rng(102)).to(np.float64)
check_images = np.random.default_rng(103).standard_normal((2, 3, 8, 8))
step_itg = stage1_step(check_model, check_images, ids_check, mask_check, dec_id=4,
                       weights=(0.0, 0.0, 1.0), backward=False).losses["itg"]
h_check, _ = check_model.qformer.forward(check_model.image_embeds(check_images), dec_check,
                                         mask_check, mode="itg")
logits_check, _ = check_model.lm_head.forward(h_check[:, 2:])  # the text rows
mine, _ = CrossEntropyLoss(label_smoothing=0.1).forward(logits_check, targets_check)
print(f"ITG loss of stage1_step {step_itg:.12f}, from your targets {mine:.12f}")
assert abs(step_itg - mine) < 1e-12
