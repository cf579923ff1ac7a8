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
# # 07 · The LM objective and caption decoding
#
# **Goal.** BLIP's third objective turns the image-grounded decoder into a captioner.
# In this notebook we
#
# 1. line up decoder inputs and targets for one caption (teacher forcing, `[DEC]`,
#    the shift by one, padding and the prompt "a picture of");
# 2. compute the label-smoothed LM loss by hand and check it against
#    `minblip.blip.pretrain_step`;
# 3. derive its backward, through the softmax and the LM head whose output matrix is
#    the word-embedding table, and gradient-check the LM part of the step;
# 4. train a small captioner for half a minute and decode with greedy search, beam
#    search and nucleus sampling, as BLIP's `BLIP_Decoder.generate` does;
# 5. look inside nucleus (top-p) filtering;
# 6. show that cached keys and values change the speed of decoding and nothing else.
#
# ## 1. The paper's idea
#
# Li et al. (2022), *BLIP*, section 3.2: the language-modelling loss trains the
# image-grounded decoder to write a description of the image, maximising the
# likelihood of the caption word by word (autoregressively) with a cross-entropy loss,
# smoothed with label smoothing 0.1. For a caption $w_1 \dots w_n$ of image $I$:
#
# $$\mathcal L_{LM} = -\frac1N \sum_{t} \log p_\theta(w_{t+1} \mid w_{\le t},\ I),$$
#
# with the one-hot target softened to $q = 0.9\,\mathbb 1_{y} + 0.1/V$, so each
# supervised token costs
#
# $$\ell_t = 0.9\,\big(-\log p_{y}\big) + 0.1\,\frac1V\sum_{k=1}^{V}\big(-\log p_k\big).$$
#
# *Teacher forcing*: during training the decoder reads the **true** previous words, not
# its own guesses, so every position of a caption is trained in one causal forward
# pass. The code is `BLIP_Pretrain.forward` (salesforce/BLIP `models/blip_pretrain.py`)
# and, for the captioning fine-tune with a prompt, `BLIP_Decoder.forward`
# (`models/blip.py`).

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

import os

# The matrices here are tiny: splitting each product over BLAS threads costs more than
# it saves (several times more on a busy two-core machine). Must be set before NumPy
# is imported, so it only takes effect in a fresh kernel.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import inspect
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import Param, gradcheck
from minblip.blip import BLIP, BLIPConfig, pretrain_step
from minblip.generation import apply_repetition_penalty, generate, top_p_filter
from minblip.image import preprocess
from minblip.objectives import NextTokenLoss
from minblip.softmax import CrossEntropyLoss, log_softmax, softmax
from minblip.text import TextConfig
from minblip.tokenizer import Tokenizer
from minblip.train import TrainConfig, blip_trainer, build_tokenizer
from minblip.vit import ViTConfig
from minblip import world

np.set_printoptions(precision=4, suppress=True)
notebook_start = time.perf_counter()

# %% [markdown]
# ## 2. Inputs and targets, position by position
#
# The tokenizer writes `[CLS] w1 .. wn [SEP] [PAD] ..`. For the LM loss BLIP makes two
# copies of these ids:
#
# * **decoder input**: position 0 is overwritten with `[DEC]` (the "beginning of
#   sequence" token; `decoder_input_ids[:, 0] = bos_token_id`);
# * **labels**: the same ids with padding replaced by $-100$, PyTorch's
#   `ignore_index` (`targets = ids.masked_fill(ids == pad_token_id, -100)`).
#
# The decoder's output at position $t$ scores the token at position $t+1$, so the
# loss compares `logits[:, :-1]` with `labels[:, 1:]` (`BertLMHeadModel.forward` in
# `med.py`). The first label, `[CLS]`, is never predicted, `[SEP]` *is* predicted (that
# is how the model learns to stop), and the last position predicts nothing.
#
# The captioner fine-tuned from BLIP (`BLIP_Decoder`) also prepends the prompt
# "a picture of " to every caption and excludes it from the loss:
# `prompt_length = len(tokenizer(prompt).input_ids) - 1` counts `[CLS] a picture of`
# = **4** tokens, and `targets[:, :4] = -100`. After the shift the first supervised
# prediction is the first caption word, made at the position of "of".

# %%
wtok = build_tokenizer()  # every word the synthetic world's captions use
prompt = "a picture of "
prompt_length = wtok.encode(prompt)[0].shape[1] - 1  # [CLS] a picture of ([SEP] not counted)
texts = [prompt + "a small red circle on the left", prompt + "a big blue box"]
ids, mask = wtok.encode(texts)
dec_ids = ids.copy()
dec_ids[:, 0] = wtok.dec_id  # what the decoder reads
labels = np.where(mask == 1, ids, -100)  # padding is ignored
labels[:, :prompt_length] = -100  # the prompt is given, not predicted
print("prompt_length =", prompt_length)

b = 1  # the shorter, padded caption
T = ids.shape[1]
print(f"\n{'t':>2}  {'decoder reads':<14} {'target (token t+1)':<19} counted?")
for t in range(T):
    reads = wtok.id_to_token(dec_ids[b, t])
    if t == T - 1:
        target, why = "-", "no next token"
    else:
        y = labels[b, t + 1]
        target = wtok.id_to_token(ids[b, t + 1])
        if y != -100:
            why = "yes"
        elif mask[b, t + 1] == 0:
            why = "no: padding (-100)"
        else:
            why = "no: prompt (-100)"
    print(f"{t:>2}  {reads:<14} {target:<19} {why}")
print("\nlabels[:, 1:] =\n", labels[:, 1:])

# %% [markdown]
# Because of the causal mask, the output at position $t$ has seen `[DEC]` and the words
# up to $t$ (and the whole image through cross-attention), never word $t+1$. So one
# forward pass yields all $T-1$ next-word predictions at once, each conditioned on the
# true prefix. Without the prompt (`prompt_length = 0`, BLIP pre-training) the
# first supervised prediction is the first word, made at `[DEC]`.

# %% [markdown]
# ## 3. The loss, forward, by hand
#
# A tiny BLIP in float64 with a wide initialisation (so nothing is near zero), three
# captions with the prompt, and the loss written out from the decoder's logits. It must
# equal `pretrain_step(..., weights=(0, 0, 1))`, which runs only the LM objective.

# %%
small_words = "a picture of red blue green circle square small large left right the".split()
tok = Tokenizer(small_words)
model_cfg = BLIPConfig(
    vision=ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16,
                     init_std=0.4),
    text=TextConfig(vocab_size=tok.vocab_size, width=8, depth=1, heads=2, mlp_dim=16,
                    max_positions=16, encoder_width=8, init_std=0.4),
    embed_dim=6, proj_init_std=0.4)
rng = np.random.default_rng(0)
model = BLIP(model_cfg, rng).to(np.float64)
captions = [prompt + "a red circle", prompt + "a large blue square left of a green circle",
            prompt + "the small square"]
s_ids, s_mask = tok.encode(captions)
images = rng.standard_normal((3, 3, 8, 8))
special = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id)
V = tok.vocab_size

# the forward of the LM part, step by step
s_dec = s_ids.copy()
s_dec[:, 0] = tok.dec_id
s_labels = np.where(s_mask == 1, s_ids, -100)
s_labels[:, :prompt_length] = -100
image_embeds, _ = model.visual_encoder.forward(images)  # (B, 1+N, D)
logits, _ = model.text_decoder.forward(s_dec, s_mask, image_embeds)  # (B, T, V)
z, y = logits[:, :-1], s_labels[:, 1:]  # position t predicts token t+1
logp = log_softmax(z)  # (B, T-1, V)
valid = y != -100
nll = -np.take_along_axis(logp, np.where(valid, y, 0)[..., None], axis=-1)[..., 0]  # -log p_y
uniform = -logp.mean(axis=-1)  # mean_k(-log p_k)
per_token = 0.9 * nll + 0.1 * uniform
loss_by_hand = per_token[valid].mean()

step = pretrain_step(model, images, s_ids, s_mask, weights=(0, 0, 1),
                     prompt_length=prompt_length, backward=False, **special)
print("supervised tokens N      :", int(valid.sum()), "of", valid.size, "positions")
print("LM loss by hand          :", loss_by_hand)
print("pretrain_step losses['lm']:", step.losses["lm"])
print("difference               :", abs(loss_by_hand - step.losses["lm"]))

# %% [markdown]
# The mean is over the $N$ supervised tokens of the whole batch (PyTorch's
# `reduction='mean'` with `ignore_index`), not over captions: a long caption weighs
# more than a short one. Per caption:

# %%
for c, v, l in zip(captions, valid, per_token):
    print(f"{v.sum():2d} tokens, mean loss {l[v].mean():.3f}  | {c}")

# %% [markdown]
# ## 4. The backward, derived
#
# **Through the smoothed cross-entropy.** For one supervised position with logits
# $z\in\mathbb R^V$, $p = \mathrm{softmax}(z)$ and target distribution $q$
# ($\sum_k q_k = 1$):
#
# $$\ell = -\sum_k q_k \log p_k = -\sum_k q_k z_k + \log\sum_j e^{z_j}
# \quad\Longrightarrow\quad
# \frac{\partial \ell}{\partial z_j} = -q_j + p_j\underbrace{\textstyle\sum_k q_k}_{=1}
# = p_j - q_j .$$
#
# With $q = 0.9\,\mathbb 1_y + 0.1/V$ that is $p_j - 0.1/V - 0.9\,[j = y]$. The batch
# loss is the mean over the $N$ supervised positions, so
#
# $$\bar z_{bt} = \frac{p_{bt} - q_{bt}}{N}\ \text{ if } y_{bt} \ne -100,
# \qquad \bar z_{bt} = 0 \text{ otherwise (padding, prompt)},$$
#
# and the decoder's last position, which predicts nothing, gets $\bar z = 0$ (the shift
# read backwards: `dlogits[:, :-1] = ...`). Two consequences:
#
# * every row of $\bar z$ sums to zero, $\sum_j (p_j - q_j) = 1 - 1 = 0$;
# * the loss is minimised at $p = q$, where the logit gap between the target and any
#   other word is $\log\frac{0.9 + 0.1/V}{0.1/V} = \log(1 + 9V)$. Without smoothing
#   the optimum is at infinite logits; label smoothing keeps them finite, and sets a
#   floor on the loss: the entropy $H(q)$.
#
# **Through the tied LM head** (notebook 04): $z = t\,E^\top + c$ with the
# word-embedding table $E\ (V\times D)$, so
#
# $$\bar c = \sum_{b,t} \bar z_{bt},\qquad
# \bar E \mathrel{+}= \bar z^{\top} t\ \ \big((V, N)\,@\,(N, D)\big),\qquad
# \bar t = \bar z\, E\ \ \big((B, T, V)\,@\,(V, D)\big).$$
#
# Since each row of $\bar z$ sums to zero, $\bar c$ sums to zero too. Every row of
# $E$ gets a head gradient, also words that are not in the batch: their
# probability is pushed towards $0.1/V$. Then $\bar t$ flows back through the head's
# LayerNorm, GELU and dense layer, the decoder layers (causal self-attention,
# cross-attention into $\overline{\text{image\_embeds}}$, FFN), and finally the
# embedding lookup adds its scatter-add into **the same** $\bar E$.

# %%
q = np.full(z.shape, 0.1 / V)
np.put_along_axis(q, np.where(valid, y, 0)[..., None], 0.9 + 0.1 / V, axis=-1)
N = valid.sum()
dz_by_hand = np.where(valid[..., None], (softmax(z) - q) / N, 0.0)  # (B, T-1, V)

ce = CrossEntropyLoss(label_smoothing=0.1)
_, c_ce = ce.forward(z, y)
dz = ce.backward(1.0, c_ce)
print("max |dz by hand - CrossEntropyLoss.backward| :", np.abs(dz_by_hand - dz).max())
print("largest |row sum| of dz                      :", np.abs(dz.sum(-1)).max())
print(f"optimal logit gap log(1 + 9V) for V={V}      : {np.log(1 + 9 * V):.3f}")
q_row = np.full(V, 0.1 / V)
q_row[0] += 0.9
print(f"loss floor H(q) for V={V}                   : {-(q_row * np.log(q_row)).sum():.3f}")

# %% [markdown]
# In `pretrain_step` the LM part of the backward is two lines: the backward of the
# next-token loss, then the decoder's backward, which returns the gradient of the image
# tokens. It runs *first* in the mirrored backward, because the decoder was the last
# consumer of the image tokens in the forward:

# %%
src = inspect.getsource(pretrain_step).splitlines()
start = next(i for i, line in enumerate(src) if "backward (the forward read" in line)
print("\n".join(src[start:start + 5]))

# %% [markdown]
# The next-token loss (`NextTokenLoss` in `minblip/objectives.py`, shared with BLIP-2)
# holds the shift: its forward compares `logits[:, :-1]` with `labels[:, 1:]`, and its
# backward places the cross-entropy's gradient into all but the last position:

# %%
print(inspect.getsource(NextTokenLoss.backward))

# %% [markdown]
# ## 5. Gradient check of the LM part of the step
#
# `pretrain_step` with `weights=(0, 0, 1)` runs the ViT, the decoder and the LM loss,
# and back. We check every Param (4 sampled coordinates each, the largest gradient
# among them), the image pixels, and one random direction through all of them at once,
# in float64 with central differences. Params that only ITC or ITM use (`text_proj`,
# `itm_head`, the encoder's self-attention, ...) must come out with a gradient of
# exactly zero, and the finite difference agrees.

# %%
pixels = Param(images, dtype=np.float64)


def lm_loss(backward):
    if backward:
        model.zero_grad()
    r = pretrain_step(model, pixels.data, s_ids, s_mask, weights=(0, 0, 1),
                      prompt_length=prompt_length, backward=backward, **special)
    if backward:
        pixels.grad += r.d_images
    return r.loss


report = gradcheck(lm_loss, model.named_params() + [("pixels", pixels)], n_coords=4,
                   rtol=1e-5)


def component(name):
    """Group a Param name into the part of BLIP it belongs to."""
    for key, label in (("visual_encoder", "ViT"), ("pixels", "pixels"),
                       ("embeddings", "word/position embeddings"),
                       ("text_decoder.bert.layers", "decoder self-attention"),
                       ("self_attn", "encoder self-attention"),
                       ("cross_attn", "cross-attention (shared)"),
                       ("ffn", "FFN (shared)"), ("text_decoder.head", "LM head"),
                       ("vision_proj", "vision_proj"), ("text_proj", "text_proj"),
                       ("itm_head", "itm_head"), ("temp", "temp")):
        if key in name:
            return label
    return name


grads = {name: p.grad for name, p in model.named_params()}
grads["pixels"] = pixels.grad
groups = {}
for row in report.rows:
    g = groups.setdefault(component(row.name), [0, 0, 0.0, True])
    g[0] += 1
    g[1] += int(np.any(grads[row.name] != 0))
    g[2] = max(g[2], row.max_rel_err)
    g[3] &= row.passed
print(f"{'component':28s} {'arrays':>6s} {'nonzero grad':>12s} {'max rel err':>12s}")
for label, (n, nonzero, err, ok) in groups.items():
    print(f"{label:28s} {n:6d} {nonzero:12d} {err:12.1e}  {'ok' if ok else 'FAIL'}")
print(f"{'random direction (all)':28s} {'':6s} {'':12s} {report.directional.max_rel_err:12.1e}")
print("max relative error over every check:", f"{report.max_rel_err:.1e}",
      "| passed:", report.passed)

# %% [markdown]
# The encoder's self-attention gets nothing from the LM loss: with BLIP's sharing the
# decoder has its own self-attention, and everything else of the text side is shared
# (notebook 08 takes this apart).

# %% [markdown]
# ## 6. A captioner in half a minute
#
# To decode something meaningful we train a small BLIP on the built-in world with
# `minblip.train.blip_trainer`, only the LM objective (`loss_weights=(0, 0, 1)`), on
# scenes of one object. The images are 30 pixels, cut into 10-pixel patches, so each patch is
# exactly one cell of the world's 3×3 grid. We measure the time.

# %%
train_cfg = TrainConfig(seed=0, image_size=30, patch_size=10, max_objects=1, n_train=450,
                        n_val=24, n_test=30, max_text_len=32, width=32, depth=2, heads=2,
                        embed_dim=16, steps=1000, batch_size=32, lr=1e-2, warmup_steps=20,
                        loss_weights=(0, 0, 1))
t0 = time.perf_counter()
trainer = blip_trainer(train_cfg)
history = trainer.run(progress=False)
train_seconds = time.perf_counter() - t0
captioner, ctok = trainer.model, trainer.task.tokenizer
print(f"{train_cfg.steps} steps of batch {train_cfg.batch_size} in {train_seconds:.1f} s "
      f"({1e3 * train_seconds / train_cfg.steps:.0f} ms per step), "
      f"{captioner.param_count():,} parameters")
lm_loss = history["lm"]
print(f"LM loss: first 20 steps {np.mean(lm_loss[:20]):.3f}, "
      f"last 50 steps {np.mean(lm_loss[-50:]):.3f}")

# %% [markdown]
# The loss cannot reach zero, even for a perfect captioner: label smoothing puts a
# floor at $H(q)$, and the world's captions are random phrasings of a scene
# ("a big red disc on the left", "on the left there is a large red circle", ...), so
# the next word is often genuinely uncertain.

# %%
Vw = ctok.vocab_size
q_row = np.full(Vw, 0.1 / Vw)
q_row[0] += 0.9
floor = -(q_row * np.log(q_row)).sum()
smooth = np.convolve(lm_loss, np.ones(20) / 20, mode="valid")
plt.figure(figsize=(7, 3.2))
plt.plot(lm_loss, color="0.75", lw=0.8, label="LM loss per step")
plt.plot(np.arange(19, len(lm_loss)), smooth, color="C0", label="20-step mean")
plt.axhline(floor, color="C3", ls="--", label=f"floor $H(q)$ = {floor:.2f} (V = {Vw})")
plt.xlabel("step")
plt.ylabel("label-smoothed LM loss")
plt.ylim(0, 4.5)
plt.legend()
plt.title("Training the captioner (LM objective only)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7. Three ways to decode
#
# Generation starts from the prompt and appends one token at a time until `[SEP]`.
# `BLIP_Decoder.generate` (salesforce/BLIP `models/blip.py`) offers, through Hugging
# Face `generate`:
#
# * **beam search** (the default): keep the `num_beams = 3` best partial captions by
#   total log-probability; a caption that ends is scored by its log-probability
#   divided by its length (length penalty 1). `min_length` and `max_length` **count
#   the prompt** (BLIP's COCO setting: 5 and 20; the prompt "[DEC] a picture of" takes
#   4 of them). Below `min_length`, `[SEP]` is forbidden.
# * **nucleus sampling** (`sample=True`): sample the next token from the smallest set
#   of most likely tokens whose probability reaches `top_p = 0.9`, with a
#   **repetition penalty of 1.1 hard-coded** (the function's own argument is ignored):
#   a logit of a token already in the sequence is divided by 1.1 if positive and
#   multiplied by 1.1 if negative.
# * **greedy search**: the argmax every step; `generate` does this with one beam and
#   no sampling.
#
# Our captioner was trained without a prompt, so its prompt is `[DEC]` alone (1 token):
# `max_length = 20` allows 19 words, `min_length = 5` forbids `[SEP]` before the 4th.

# %%
val = trainer.task.dataset.val
val_pixels = preprocess(val.images, train_cfg.image_size)
val_embeds, _ = captioner.encode_image(val_pixels)
dec_prompt = np.array([ctok.dec_id])
lengths = dict(max_length=20, min_length=5)
outputs = {
    "greedy": generate(captioner.text_decoder, val_embeds, dec_prompt, sep_id=ctok.sep_id,
                       method="greedy", **lengths),
    "beam (3)": generate(captioner.text_decoder, val_embeds, dec_prompt, sep_id=ctok.sep_id,
                         method="beam", num_beams=3, **lengths),
    "nucleus (0.9)": generate(captioner.text_decoder, val_embeds, dec_prompt,
                              sep_id=ctok.sep_id, method="nucleus", top_p=0.9,
                              rng=np.random.default_rng(0), **lengths),
}
texts_by_method = {m: [ctok.decode(t) for t in out.tokens] for m, out in outputs.items()}

fig, axes = plt.subplots(2, 3, figsize=(14, 9.6), gridspec_kw={"hspace": 0.45, "wspace": 0.6})
for ax, i in zip(axes.ravel(), range(6)):
    ax.imshow(val.images[i], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    lines = [f"true: {val.captions[i]}"]
    for m, caps in texts_by_method.items():
        mark = "✓" if world.caption_is_true(val.scenes[i], caps[i]) else "✗"
        lines.append(f"{mark} {m}: {caps[i]}")
    ax.set_title("\n".join(lines), fontsize=8.5, loc="left")
fig.suptitle("Validation images and their captions (✓ = every stated fact is true)")
plt.show()

# %% [markdown]
# Per attribute, over all validation images (an attribute counts as right when the
# caption states it correctly, `minblip.world.score_caption`):

# %%
print(f"{'method':14s} {'colour':>7s} {'shape':>7s} {'size':>7s} {'position':>9s} "
      f"{'all true':>9s}")
for m, caps in texts_by_method.items():
    scores = [world.score_caption(s, c) for s, c in zip(val.scenes, caps)]
    acc = {a: np.mean([sc[a] is True for sc in scores])
           for a in ("colour", "shape", "size", "position")}
    exact = np.mean([world.caption_is_true(s, c) for s, c in zip(val.scenes, caps)])
    print(f"{m:14s} {acc['colour']:7.2f} {acc['shape']:7.2f} {acc['size']:7.2f} "
          f"{acc['position']:9.2f} {exact:9.2f}")
    if m.startswith(("greedy", "beam")):  # what the next paragraph says
        assert min(acc["colour"], acc["shape"], acc["size"]) >= 0.9 and acc["position"] <= 0.2

# %% [markdown]
# After this short training run the captioner names colour, shape and size from the
# image but not the **position**. That is not a decoding problem, and the reason is
# worth seeing. Every patch here is exactly one grid cell, so moving the object only
# permutes the patch tokens, and attention over a set of tokens does not see their
# order. The only thing that tells the decoder *where* the object is, is the ViT's
# position embedding, a table that starts at std 0.02 and must be learned before the
# decoder can read it. Rendering one object in all nine cells makes this visible:

# %%
cells = [world.Scene((world.Object("red", "circle", "large", r, c),)) for r in range(3)
         for c in range(3)]
cell_pixels = preprocess(np.stack([world.render(sc, train_cfg.image_size) for sc in cells]),
                         train_cfg.image_size)
cell_embeds, _ = captioner.encode_image(cell_pixels)
cell_caps = generate(captioner.text_decoder, cell_embeds, dec_prompt, sep_id=ctok.sep_id,
                     method="greedy", **lengths)
for sc, t in zip(cells, cell_caps.tokens):
    o = sc.objects[0]
    print(f"object in cell (row {o.row}, col {o.col}): {ctok.decode(t)}")
assert len({ctok.decode(t) for t in cell_caps.tokens}) <= 3  # the caption does not follow the cell
# greedy and beam captions of the images shown above state the same facts (next paragraph)
assert all(world.score_caption(val.scenes[i], texts_by_method["greedy"][i])
           == world.score_caption(val.scenes[i], texts_by_method["beam (3)"][i]) for i in range(6))

# %% [markdown]
# Greedy and beam search are deterministic; here they state the same facts and differ
# in phrasing at most: greedy commits to the locally best word at every step, beam
# search compares whole captions by their length-normalised log-probability, and wins
# when a locally second-best word leads to a more likely caption overall. Nucleus sampling gives more varied phrasings (and sometimes
# a wrong word), which is what BLIP's CapFilt wants from its captioner: the paper
# (section 4.3) finds sampled synthetic captions more useful than beam-search ones
# because they are more diverse.

# ## 8. Inside nucleus filtering
#
# Hugging Face's `TopPLogitsWarper`, which `top_p_filter` follows: sort the
# probabilities in ascending order, take the cumulative sum, remove every token whose
# cumulative mass (counted from the least likely) is at most $1 - p$; the most likely
# token always survives. Equivalently, keep the most likely tokens until their mass
# reaches $p$. Below, the first word of the first validation caption (where the
# model chooses a template) and the word where its greedy caption was least
# certain, after the 1.1 repetition penalty, which nucleus sampling applies first.

# %%
def next_token_logits(seq, image):
    """Logits (V,) for the token after the 1-d ``seq``, given one image's tokens."""
    lg, _ = captioner.text_decoder.forward_incremental(seq[None], None,
                                                       image_embeds=image[None])
    return lg[0, -1].astype(np.float64)


greedy0 = np.concatenate([dec_prompt, outputs["greedy"].tokens[0]])
entropies = []
for t in range(1, greedy0.size):
    p = softmax(next_token_logits(greedy0[:t], val_embeds[0]))
    entropies.append(-(p * np.log(p)).sum())
uncertain = 1 + int(np.argmax(entropies[1:])) + 1  # a later step than the first word

fig, axes = plt.subplots(1, 2, figsize=(14, 3.8))
for ax, t in zip(axes, (1, uncertain)):
    prefix = greedy0[:t]
    lg = apply_repetition_penalty(next_token_logits(prefix, val_embeds[0])[None],
                                  prefix[None], 1.1)
    p = softmax(lg)[0]
    kept = np.isfinite(top_p_filter(lg, 0.9))[0]
    order = np.argsort(-p)[:15]
    cum = np.cumsum(p[order])
    ax.bar(range(15), p[order], color=["C0" if kept[k] else "0.75" for k in order])
    ax.plot(range(15), cum, "o-", color="C3", ms=3, label="cumulative probability")
    ax.axhline(0.9, color="C3", ls=":", lw=1)
    n_kept = int(kept.sum())
    ax.axvline(n_kept - 0.5, color="k", ls="--", lw=1, label=f"nucleus: {n_kept} tokens kept")
    ax.set_xticks(range(15), [ctok.id_to_token(k) for k in order], rotation=60, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("probability")
    context = ctok.decode(prefix) or "(nothing yet)"
    ax.set_title(f"next word after: “{context}”", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    print(f"after “{context}”: the words beyond the 15 shown hold {1 - cum[-1]:.1%} of the "
          f"mass; the nucleus keeps {n_kept} tokens")
    assert 0.01 <= 1 - cum[-1] <= 0.09  # "a few per cent" (next paragraph)
plt.suptitle("Top-p = 0.9: blue tokens can be sampled, grey ones are set to −∞", y=1.0)
plt.tight_layout()
plt.show()

# %% [markdown]
# After filtering, the kept probabilities are renormalised (the removed logits are
# $-\infty$) and one token is drawn. Notice the long flat tail: training with label
# smoothing asks for $0.1/V$ on every word, so together the unlikely words hold a few
# per cent of the mass (printed above), and a top-p of 0.9 cuts roughly that tail away. Because the nucleus adapts its size to the
# distribution, a confident step keeps one or two tokens while an uncertain one keeps
# many; top-$k$ with a fixed $k$ cannot do both.

# %% [markdown]
# ## 9. The key/value cache: same tokens, less work
#
# `generate(..., use_cache=True)` feeds only the newest token at each step and reuses
# the self-attention keys and values of earlier positions (notebook 04, section 8).
# `use_cache=False` recomputes the whole prefix every step. Both must produce the
# same tokens and, up to rounding, the same scores. We force 30-token captions
# (`min_length = max_length = 31` with the 1-token prompt) for 8 images and time both,
# for greedy search (one batch of 8 sequences) and for beam search (3 beams per image,
# one batch of 24 sequences). Each timing is the best of 3 runs, to damp the noise of a
# shared machine.

# %%
embeds8 = val_embeds[:8]
forced = dict(max_length=31, min_length=31)
timings = {}
for method in ("greedy", "beam"):
    runs = {}
    for use_cache in (False, True):
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            out = generate(captioner.text_decoder, embeds8, dec_prompt, sep_id=ctok.sep_id,
                           method=method, num_beams=3, use_cache=use_cache, **forced)
            best = min(best, time.perf_counter() - t0)
        runs[use_cache] = (out, best)
    (a, t_plain), (b, t_cache) = runs[False], runs[True]
    same = all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
    timings[method] = (t_plain, t_cache)
    print(f"{method:6s}: tokens identical: {same}, "
          f"{sum(len(x) for x in b.tokens) // len(b.tokens)} tokens per caption, "
          f"max |score difference| = {np.abs(a.scores - b.scores).max():.1e}")
    print(f"        {1e3 * t_plain:6.0f} ms without cache, {1e3 * t_cache:6.0f} ms with cache: "
          f"speed-up {t_plain / t_cache:.1f}x")

# %% [markdown]
# What the cache saves, per step $t$ (after $t$ tokens): without it every layer
# re-embeds all $t$ tokens, recomputes their self-attention queries, keys and values,
# their cross-attention to the image, their FFN, and even the LM head over the whole
# vocabulary for all $t$ positions, of which only the last row is used. With it, all
# of that runs for one token. Over 31 positions that is $\sum_{t=1}^{31} t = 496$
# token passes against 31.
#
# What it does not save: the new token still attends to all $t$ cached keys (work
# that grows with $t$ in both versions); the image's cross-attention keys and values
# are projected once per caption **in both versions** (minblip's uncached path reuses
# them too, so the comparison isolates the text prefix); beam search copies the cache
# to follow its re-ordered beams every step; and a fixed cost per step (Python, many
# small arrays) that at this toy width is a large share of the time. The measured
# speed-ups (printed above) are therefore far below the 16× ratio of token passes. It is usually larger
# for beam search, although it copies its cache every step: its 24 rows share each
# step's fixed cost, so the arithmetic the cache removes is a larger part of its time.
# That arithmetic grows with the width, so at BLIP's width 768 the gain is much
# larger. The cache costs memory instead:
# $2 \times \text{layers} \times \text{beams} \times t \times D$ numbers per image.

# %% [markdown]
# The tokens are identical, the scores are not bit-identical: the model runs in
# float32, and the cached and uncached paths add up the same numbers in a different
# grouping (matrix products of different shapes), so they differ at float32 rounding,
# about $10^{-7}$ per log-probability. In float64 the difference drops to rounding
# of *that* precision:

# %%
captioner.to(np.float64)
embeds8_64, _ = captioner.encode_image(val_pixels[:8].astype(np.float64))
for method in ("greedy", "beam"):
    a, b = (generate(captioner.text_decoder, embeds8_64, dec_prompt, sep_id=ctok.sep_id,
                     method=method, num_beams=3, use_cache=c, **forced) for c in (False, True))
    same = all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
    print(f"float64 {method:6s}: tokens identical: {same}, "
          f"max |score difference| = {np.abs(a.scores - b.scores).max():.1e}")

# %% [markdown]
# This is no accident: with a causal mask the hidden state of position $s$ depends
# only on tokens $\le s$, so appending a token changes nothing that was computed
# before, and the cache only avoids recomputing it.

# %%
print(f"whole notebook so far: {time.perf_counter() - notebook_start:.1f} s "
      f"(training {train_seconds:.1f} s)")

# %% [markdown]
# ## Summary
#
# * The LM objective is teacher-forced next-word prediction: the decoder reads
#   `[DEC] w1 .. wn`, position $t$ is scored against token $t+1$, padding (and the
#   prompt, `prompt_length = 4` for `[CLS] a picture of`) is $-100$ and ignored, and
#   `[SEP]` is a target.
# * The loss per token is $0.9(-\log p_y) + 0.1\,\mathrm{mean}_k(-\log p_k)$, averaged
#   over the supervised tokens of the batch; its gradient with respect to the logits
#   is $(p - q)/N$, zero-sum per row, zero on ignored and last positions.
# * Through the tied head the word table gets $\bar z^\top t$ on every row, plus the
#   lookup's scatter-add into the same Param.
# * Decoding: greedy (argmax), beam search (3 beams, length-normalised scores, lengths
#   counted with the prompt), nucleus sampling (top-p 0.9, repetition penalty 1.1
#   hard-coded). Sampling gives diverse captions; beam search the most likely ones.
# * The key/value cache gives identical tokens and the same scores up to rounding; its
#   speed-up here is modest because a toy model's time is dominated by per-step
#   overhead.
#
# ## Exercises
#
# 1. **No smoothing.** Train the same captioner with `label_smoothing=0.0` (a
#    `TrainConfig` field). Plot the largest logit gap $z_y - \max_{k\ne y} z_k$ on
#    validation captions over training for both runs. Which one keeps growing, and why
#    does the derivation in section 4 predict it?
# 2. **The prompt.** Fine-tune the captioner for 200 steps on captions with "a picture
#    of " prepended, calling `pretrain_step(..., prompt_length=4)` in your own loop.
#    Generate with the prompt `[DEC] a picture of`: how do `min_length = 5` and
#    `max_length = 20` now limit the number of caption words? What goes wrong if you
#    forget `prompt_length` during training?
# 3. **Where is the object?** Check the claim of section 7 directly: for the nine
#    images of one object in each cell, show that the ViT's patch tokens *before* the
#    position embedding is added are permutations of each other, and that the decoder's
#    logits for the nine images become identical when `pos_embed` is set to zero. Then
#    train longer (or with all three objectives, as `minblip.train` does by default)
#    and record the position accuracy every 250 steps: when does it start to rise?
# 4. **Beam search across versions.** `minblip.generation._beam_search` follows Hugging
#    Face transformers 5, which divides a finished hypothesis' log-probability by the
#    number of generated tokens including `[SEP]`. transformers 4.15, the version
#    salesforce/BLIP pinned, divided by the whole length with the prompt and without
#    `[SEP]`. Change a copy to the 4.15 rule and count on the validation set how often
#    the chosen caption changes. Which rule favours longer captions, and why?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 7.1,7.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `07_lm_and_decoding.ipynb`**, not its
# jupytext twin `07_lm_and_decoding.py`: if you edit the `.py`, run `jupytext --sync
# 07_lm_and_decoding.py` before you check or hand in, or the checks still see the stub.
#
# ### Exercise 7.1 · Nucleus (top-p) filtering
#
# **Goal.** Write the body of `top_p_filter` in `minblip/generation.py`: for logits
# `(N, V)`, keep in each row the smallest set of most likely tokens whose probability
# reaches `top_p`, always at least one, and set every other logit to $-\infty$.
#
# **Hints.** Section 8 walks through it. Sort each row ascending (`np.argsort`,
# `np.take_along_axis`), take the cumulative sum of the sorted probabilities: the tail to
# drop is where it stays at or below $1 - p$. Keep the last (most likely) token whatever
# happens, and put the decision back in vocabulary order (`np.put_along_axis`) before
# masking. The check uses a row whose probabilities are not sorted.

# %% nbgrader={"grade": true, "grade_id": "ex7_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
probs = np.array([[0.15, 0.5, 0.05, 0.3]])
for top_p, keep in ((0.7, [False, True, False, True]), (0.9, [True, True, False, True]),
                    (0.1, [False, True, False, False])):
    kept = np.isfinite(top_p_filter(np.log(probs), top_p))[0]
    print(f"top_p = {top_p}: keeps {kept.astype(int)}, expected {np.array(keep, int)}")
    assert kept.tolist() == keep

# %% [markdown]
# ### Exercise 7.2 · The tied output layer's backward
#
# **Goal.** Write `tied_output_backward(t, E, dlogits)` for the last line of the LM head,
# `logits = t @ E.T + bias`, with `t` `(B, T, D)` and the word-embedding table `E`
# `(V, D)` that the decoder also reads its input from: return `(dt, dE, dbias)`.
#
# **Hints.** Fold the leading axes into one of length $N = BT$ as in notebook 01's Linear:
# $\bar E$ is `(V, D)` and must sum over all $N$ positions, so it is
# $\bar Z^\top T$ with $\bar Z$ `(N, V)` and $T$ `(N, D)`; $\bar b$ sums $\bar Z$ over the
# positions. $\bar t = \bar Z E$ keeps the leading axes.

# %% nbgrader={"grade": false, "grade_id": "ex7_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def tied_output_backward(t, E, dlogits):
    """logits = t @ E.T + bias: t (B, T, D), E (V, D), dlogits (B, T, V) -> (dt, dE, dbias)."""
    ### BEGIN SOLUTION
    V, D = E.shape
    dz = dlogits.reshape(-1, V)  # (N, V), N = B*T
    dE = dz.T @ t.reshape(-1, D)  # (V, N) @ (N, D) -> (V, D): every position adds in
    dbias = dz.sum(axis=0)  # the bias was broadcast over all N positions
    dt = dlogits @ E  # (B, T, V) @ (V, D) -> (B, T, D)
    return dt, dE, dbias
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex7_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(70)
t_p = Param(rng.standard_normal((2, 3, 4)), dtype=np.float64)
E_p = Param(rng.standard_normal((6, 4)), dtype=np.float64)
b_p = Param(rng.standard_normal(6), dtype=np.float64)
R = rng.standard_normal((2, 3, 6))


def head_loss(backward):
    logits = t_p.data @ E_p.data.T + b_p.data
    if backward:
        dt, dE, db = tied_output_backward(t_p.data, E_p.data, R)
        t_p.grad += dt
        E_p.grad += dE
        b_p.grad += db
    return float(np.sum(logits * R))


print(gradcheck(head_loss, {"t": t_p, "E": E_p, "bias": b_p}))
