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
# # 00 · The whole picture
#
# **Goal.** Half an hour with BLIP and BLIP-2 before the fourteen notebooks that build
# them piece by piece. You will see what the models are made of, drawn from the real
# model objects of this project, what one training step does, a small trained BLIP
# captioning and retrieving images it has never seen, how CapFilt cleans a dataset, what
# BLIP-2 freezes and what it trains, and where each of these is taught.
#
# Nothing here needs to be understood in detail yet; every cell points to the notebook
# that explains it. The pictures are not hand-drawn: `minblip.diagrams` reads them off
# the objects (which modules exist, which Params are the same object, which are frozen,
# which calls a real training step makes), so they change when the code changes.
#
# **The two papers.** Li, Li, Xiong and Hoi (2022), *BLIP: Bootstrapping Language-Image
# Pre-training for Unified Vision-Language Understanding and Generation* (ICML), and Li,
# Li, Savarese and Hoi (2023), *BLIP-2: Bootstrapping Language-Image Pre-training with
# Frozen Image Encoders and Large Language Models* (ICML). The reference code is
# salesforce/BLIP and salesforce/LAVIS; minblip rebuilds both in NumPy, every backward
# by hand.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import json

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from minblip import diagrams
from minblip.evaluate import caption_images, image_features, retrieval_metrics, text_features
from minblip.image import preprocess
from minblip.tour import load_tour_model
from minblip.train import build_dataset

np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## 1. BLIP in one paragraph
#
# An image encoder (a ViT: the image cut into patches, each patch a token) and a text
# transformer are pretrained together on image-caption pairs with three objectives at
# once:
#
# * **ITC**, image-text contrastive: the image's summary vector and the caption's must be
#   more similar to each other than to any other caption or image of the batch. Learns to
#   *retrieve*.
# * **ITM**, image-text matching: a yes/no head reads the caption *while looking at the
#   image* (cross-attention) and says whether they match, trained on the hardest
#   negatives ITC can find. Learns to *verify*.
# * **LM**, language modelling: a decoder writes the caption word by word while looking at
#   the image. Learns to *describe*.
#
# The three uses of text are one transformer, run in three ways, with most weights
# shared: the *multimodal mixture of encoder-decoder*, **MED**. We load a small BLIP that
# `python -m minblip.tour` pretrained on minblip's built-in world of coloured shapes
# (`minblip/tour.py` says how, and the command rebuilds it):

# %%
model, tokenizer, cfg = load_tour_model()
data = build_dataset(cfg)  # the same images the model trained on, and its held-out test split
counts = model.parameter_counts()
print(f"{counts['trainable']:,} parameters, width {cfg.width}, depth {cfg.depth}, "
      f"{cfg.steps} steps of {cfg.batch_size} image-caption pairs")
for name, (trainable, total) in counts["parts"].items():
    print(f"  {name:16s} {total:>8,}")
shared = sum(total for _, total in counts["parts"].values()) - counts["total"]
print(f"the parts add up to {counts['total'] + shared:,}: {shared:,} parameters are counted "
      f"in both the text encoder and the text decoder")
assert shared > 0

# %% [markdown]
# The text decoder is as big as the encoder, yet the model's total is far less than the
# sum of its parts: most of the decoder's weights *are* the encoder's, the same Param
# objects, and the total counts each Param once. The next picture shows which.
#
# ## 2. MED: one text transformer, three functions
#
# Left to right: the unimodal text encoder (ITC), the image-grounded text encoder (ITM,
# the same object with its cross-attention switched on), and the image-grounded decoder
# (LM). Green boxes are modules whose Params the encoder and the decoder *both hold*:
# the picture finds them by object identity, `p is q`, exactly as the gradient finds
# them. Only the self-attention differs: encoding looks both ways, decoding only back.
# Notebook 04 builds this transformer; notebook 08 shows that the shared gradients add
# up.

# %%
fig = diagrams.draw_med(model.text_encoder, model.text_decoder)
plt.show()

# %% [markdown]
# ## 3. One pretraining step, traced
#
# A training step runs the ViT once and the text side four times. Here is a real step of
# the loaded model on four training images, recorded call by call by
# `diagrams.trace_pretraining_step` (the parameters are not updated; only gradients are
# computed):

# %%
pixels = preprocess(data.train.images[:4], cfg.image_size)
ids, mask = tokenizer.encode(data.train.captions[:4], max_length=cfg.max_text_len)
calls = diagrams.trace_pretraining_step(model, tokenizer, pixels, ids, mask,
                                        np.random.default_rng(0))
for c in calls:
    print(f"forward {c.order}: {c.module:14s} {c.rows} rows, first token {c.first_token}, "
          f"image: {c.with_image}, -> {c.objective}; its backward ran "
          f"{'never' if c.backward_order is None else f'#{c.backward_order + 1}'}")
model.zero_grad()
fig = diagrams.draw_pretraining_step(calls, batch=4)
plt.show()

# %% [markdown]
# The third call has twice the rows: each caption with a hard-negative image, and each
# image with a hard-negative caption, picked from the ITC similarities (notebook 06). The
# backwards run in the reverse order, and the ViT's comes last, after every call that
# read its image tokens has added its gradient (notebook 08 checks the whole step's
# gradient against finite differences).
#
# ## 4. The trained model at work
#
# The held-out test images were never seen in training. First, captions: the decoder
# writes them with beam search, one token at a time, with cached keys and values
# (notebook 07).

# %%
test_pixels = preprocess(data.test.images, cfg.image_size)
shown = 8
written = caption_images(model, tokenizer, test_pixels[:shown], method="beam")
fig, axes = plt.subplots(2, 4, figsize=(13, 6.2))
for ax, image, caption, truth in zip(axes.flat, data.test.images, written,
                                     data.test.captions):
    ax.imshow(image)
    ax.set_title(f"model: {caption}\ntrue: {truth}", fontsize=7.5, loc="left")
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Then retrieval: ITC turns each image and each caption into a unit vector, so a text
# query is answered by a dot product with every image vector (notebook 05).

# %%
pool = 100
image_embeds, image_feat = image_features(model, test_pixels[:pool])
query = "a red circle"
q_ids, q_mask = tokenizer.encode([query], max_length=cfg.max_text_len)
scores = (text_features(model, q_ids, q_mask) @ image_feat.T)[0]  # cosine to each image
best = np.argsort(-scores)[:5]
fig, axes = plt.subplots(1, 5, figsize=(12, 2.8))
for ax, i in zip(axes, best):
    ax.imshow(data.test.images[i])
    ax.set_title(f"{scores[i]:.2f}\n{data.test.captions[i]}", fontsize=7)
    ax.axis("off")
fig.suptitle(f"the 5 test images nearest to '{query}' (ITC cosine)", fontsize=10, y=1.04)
plt.tight_layout()
plt.show()
red = [any(o.colour == "red" for o in data.test.scenes[i].objects) for i in best]
circle = [any(o.colour == "red" and o.shape == "circle" for o in data.test.scenes[i].objects)
          for i in best]
print(f"of these 5: {sum(red)} show something red, {sum(circle)} a red circle")
assert sum(red) >= 4 and sum(circle) < sum(red)

# %% [markdown]
# The colour is read well, the shape much less: red things come first whatever their
# shape (the count above); notebook 14 measures each attribute of the demo model. Measured
# over a pool of test images, each with its one true caption (BLIP's two-stage
# retrieval: ITC shortlists, ITM re-ranks the shortlist; notebook 14 and the README
# evaluate the demo model the same way):

# %%
metrics = retrieval_metrics(model, tokenizer, test_pixels[:pool], data.test.captions[:pool])
print(f"over {pool} test images: image-to-text recall@1 {metrics['i2t_recall@1']:.2f}, "
      f"text-to-image recall@1 {metrics['t2i_recall@1']:.2f} (chance: {1 / pool:.2f}); "
      f"recall@5 {metrics['i2t_recall@5']:.2f} / {metrics['t2i_recall@5']:.2f}")

# %% [markdown]
# ## 5. CapFilt: cleaning the captions of web images
#
# BLIP's second idea is about data. Web alt-texts are plentiful and often wrong. CapFilt
# pretrains on human-annotated plus web pairs, then makes two copies of that model and
# fine-tunes each on the human-annotated pairs only: a **captioner** (the decoder, LM)
# and a **filter** (the image-grounded encoder, ITC + ITM). The captioner writes a new
# caption for every web image; the filter judges every text, the web's and the
# captioner's, and keeps those whose ITM match probability is above 0.5. A new model is
# pretrained on what is left. The picture is read from `CapFiltConfig` and the objective
# weights `minblip/capfilt.py` fine-tunes with:

# %%
from minblip.capfilt import CapFiltConfig  # noqa: E402
from minblip.capfilt_experiment import format_capfilt_table  # noqa: E402

fig = diagrams.draw_capfilt(CapFiltConfig())
plt.show()

# %% [markdown]
# **Three common misreadings**, each checked against section 3.3 of the paper:
#
# * *"The captioner and filter are trained on web data."* Both start from the model
#   pretrained on web **plus** human-annotated data, and both are then fine-tuned on
#   the **human-annotated** set alone (COCO in the paper), separately, sharing no
#   parameter.
# * *"The filter picks the better of the web caption and the synthetic one."* It judges
#   **each text on its own**: a web image keeps 0, 1 or 2 texts.
# * *"CapFilt changes the model."* It changes only the **data**; the new model is an
#   ordinary BLIP pretrained on the bootstrapped set.
#
# What it buys on this world, measured by `python -m minblip capfilt` (three seeds) and
# read from `docs/capfilt_results.json`, which that command writes:

# %%
capfilt_summary = json.loads(Path("../docs/capfilt_results.json").read_text())
display(Markdown(format_capfilt_table(capfilt_summary)))

# %% [markdown]
# Notebook 13 runs a small CapFilt end to end and reads this table in detail.
#
# ## 6. BLIP-2: freeze the expensive parts, train a small bridge
#
# BLIP-2 keeps a pretrained image encoder and a pretrained language model **frozen** and
# trains only a small **Q-Former** between them: a BERT-sized transformer whose input is
# a fixed set of *learned query vectors*. The queries read the frozen image features by
# cross-attention and hand a few vectors to the language model as a *soft prompt*.
#
# Training has two stages. Stage 1 teaches the Q-Former to extract what the text needs
# (ITC, ITM and image-grounded generation ITG, three masks on one transformer); stage 2
# feeds its outputs, projected, to the frozen language model, which learns nothing: only
# the Q-Former and the projection do. Here are a toy stage 1 and stage 2 built with
# minblip (random weights: only the structure matters), the frozen parts in grey, read
# from `Param.frozen`:

# %%
from minblip.blip2_stage1 import Blip2Config, Blip2Stage1  # noqa: E402
from minblip.blip2_stage2 import Blip2Stage2  # noqa: E402
from minblip.lm import LanguageModel, LMConfig  # noqa: E402
from minblip.qformer import QFormerConfig  # noqa: E402
from minblip.vit import ViTConfig  # noqa: E402

q_cfg = QFormerConfig(vocab_size=tokenizer.vocab_size, width=32, depth=4, heads=2, mlp_dim=64,
                      num_queries=8, encoder_width=32)
vit_cfg = ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
stage1 = Blip2Stage1(Blip2Config(qformer=q_cfg, vision=vit_cfg), np.random.default_rng(0))
fig = diagrams.draw_qformer(stage1.qformer)
plt.show()

# %% [markdown]
# The Q-Former's self-attention is one module for queries and text, so the mask decides
# who sees whom: for ITC the queries and the text never meet, for ITM they all see each
# other, for ITG the text sees the queries and its own past (notebook 09). Only the
# queries cross-attend to the image, and only in every other layer; queries and text have
# separate feed-forward networks.

# %%
language_model = LanguageModel(LMConfig(vocab_size=60, width=48, depth=2, heads=2,
                                        mlp_dim=96), np.random.default_rng(1)).freeze()
stage2 = Blip2Stage2.from_stage1(stage1, language_model, np.random.default_rng(2))
fig = diagrams.draw_blip2_stages(stage1, stage2)
plt.show()
parts1, parts2 = diagrams.blip2_stage_parts(stage1, stage2)
trains = sum(p.trainable for p in parts2)
total2 = sum(p.total for p in parts2)
print(f"stage 2 trains {trains:,} of {total2:,} parameters ({trains / total2:.0%}) in this toy")
assert trains < total2 / 2

# %% [markdown]
# **A common misreading.** The BLIP-2 abstract reports beating Flamingo-80B by 8.7% on
# zero-shot VQAv2 "with 54x fewer trainable parameters". The comparison is in
# **trainable parameters** (BLIP-2's Q-Former and projection against Flamingo's trained
# layers), not in training data and not in total size: the frozen image encoder and
# language model are large, and they count in the total but not in what is trained.
# This toy shows the same split in miniature: most of its parameters are frozen.
# Notebooks 10 and 11 train both stages on the built-in world.
#
# ## 7. Where each concept is taught
#
# One notebook per concept; each derives the backward of what it builds, checks it
# against finite differences, and ends with exercises. The graded ones (with their ids)
# are listed by `python -m minblip.exercises list` and in `docs/instructors.md`; this
# table reads them from the same registry.

# %%
from minblip.exercises import EXERCISES  # noqa: E402

CONCEPTS = {
    "01_backprop_and_gradcheck": "backprop, gradient checking in float64, LayerNorm, GELU, dropout",
    "02_attention": "scaled dot-product and multi-head attention, masks",
    "03_vit_patch_embedding": "the ViT: patches as a matrix product",
    "04_text_transformer": "the BERT-style text transformer, post-norm blocks, MED's three masks",
    "05_itc": "ITC: the contrastive loss, its temperature, momentum distillation",
    "06_itm_hard_negatives": "ITM and hard-negative mining",
    "07_lm_and_decoding": "the LM loss; greedy, beam and nucleus decoding; cached keys and values",
    "08_med_pretraining_step": "MED's shared weights and one full pretraining step",
    "09_qformer_masks": "BLIP-2's Q-Former and its three masks",
    "10_blip2_stage1": "BLIP-2 stage 1: ITC with a maximum over queries, ITM, ITG",
    "11_blip2_stage2": "BLIP-2 stage 2: soft prompts into a frozen language model",
    "12_fidelity": "fidelity: Hugging Face checkpoints and a PyTorch twin",
    "13_capfilt": "CapFilt: captioner, filter, bootstrapped data",
    "14_training": "pretraining a small BLIP: schedule, AdamW, evaluation",
}
rows = ["| notebook | concept | graded exercises |", "|---|---|---|"]
for stem, concept in CONCEPTS.items():
    assert Path(f"{stem}.ipynb").exists(), stem
    ids = ", ".join(e.id for e in EXERCISES if e.notebook == stem)
    rows.append(f"| [{stem[:2]}]({stem}.ipynb) | {concept} | {ids} |")
notebooks_here = {p.stem for p in Path(".").glob("[0-9][0-9]_*.ipynb")} - {"00_the_whole_picture"}
assert notebooks_here == set(CONCEPTS), notebooks_here ^ set(CONCEPTS)
assert {e.notebook for e in EXERCISES} <= set(CONCEPTS)
display(Markdown("\n".join(rows)))

# %% [markdown]
# **How to go on.** Read 01 and 02 first: every later backward is built from theirs. Then
# BLIP in order (03-08), BLIP-2 (09-11), and 12-14 in any order. `python -m minblip demo`
# trains the demo model of the README, and `python -m minblip.exercises student OUTDIR`
# writes the version of the project with the exercises to do.
