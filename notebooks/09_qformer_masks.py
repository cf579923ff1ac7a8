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
# # 09 · The Q-Former and its three masks
#
# **Goal.** BLIP-2 connects a *frozen* image encoder to text through a small
# transformer, the **Querying Transformer (Q-Former)**. In this notebook we build it
# from the pieces of notebooks 01-04 and look closely at the one idea that makes it
# work: a fixed set of **learned queries** that share a transformer with the text, where
# **the self-attention mask alone decides who sees whom**. We will
#
# 1. see the learned queries as one parameter broadcast over the batch, and where their
#    gradient goes;
# 2. write the Q-Former layer: shared self-attention, cross-attention to the image for
#    the query positions only, two separate feed-forward networks;
# 3. draw the three masks of stage 1 (ITC, ITM, ITG) as 0/1 pictures and check what each
#    one lets through;
# 4. show that the causal ITG mask computed in one pass equals LAVIS's way of computing
#    it, with cached query keys and values;
# 5. check every gradient.
#
# ## 1. The paper's idea
#
# Li et al. (2023), *BLIP-2*, section 3.1: the Q-Former "consists of two transformer
# submodules that share the same self-attention layers": an *image transformer* whose
# input is a set of $Q$ learnable query embeddings (32 in the paper) that interact with
# the frozen image features through cross-attention, and a *text transformer* that reads
# text. In code it is **one** BERT whose input is `cat(queries, text)`:
#
# $$\begin{aligned}
# x &= \mathrm{LN}\big(\mathrm{cat}(Z,\ E_{\text{ids}} + P_{0..T-1})\big) && Z \in \mathbb R^{Q\times D}\text{: the learned queries}\\
# h &= \mathrm{LN}_{sa}\big(x + \mathrm{SelfAttn}(x;\ M)\big) && \text{all } Q+T \text{ rows, one set of weights}\\
# h_q &= \mathrm{LN}_{ca}\big(h_q + \mathrm{CrossAttn}(h_q,\ \text{image})\big) && \text{query rows only, every other layer}\\
# y &= \mathrm{cat}\big(\mathrm{LN}(h_q + \mathrm{FFN}_q(h_q)),\ \mathrm{LN}(h_t + \mathrm{FFN}_t(h_t))\big) && \text{separate FFNs}
# \end{aligned}$$
#
# The only thing that differs between the three stage-1 objectives (besides which rows
# feed which head) is the self-attention mask $M$. That is figure 2 of the paper, and
# the subject of this notebook. The code we mirror is salesforce/LAVIS
# `lavis/models/blip2_models/Qformer.py` (`BertEmbeddings`, `BertLayer`) as called by
# `blip2_qformer.py`.
#
# **A common misreading.** BLIP-2's abstract reports beating Flamingo-80B by 8.7% on
# zero-shot VQAv2 "with 54x fewer trainable parameters" (Li et al. 2023, arXiv
# 2301.12597). The 54x is about **trainable parameters** — the Q-Former (and, in stage 2,
# one projection) against the layers Flamingo trains — not about training data, and not
# about the model's total size: the frozen image encoder and the frozen language model
# are most of BLIP-2's parameters and are not trained at all. That is the point of this
# notebook's module: a small transformer between two large frozen ones.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import inspect

import matplotlib.pyplot as plt
import numpy as np

from minblip import Param, check_layer, gradcheck
from minblip.qformer import (MODES, QFormer, QFormerConfig, QFormerEmbeddings, QFormerLayer,
                             qformer_mask)
from minblip.train import build_tokenizer

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 2. A toy Q-Former
#
# BLIP-2's Q-Former is BERT-base (width 768, 12 layers) with 32 queries and
# cross-attention in layers 0, 2, 4, ... to 1408-wide EVA ViT-g features. Ours keeps
# every structural choice at toy size: 4 queries, width 16, 2 layers (so layer 0
# cross-attends and layer 1 does not), image features of width 12. The tokenizer is the
# one of the synthetic world (BLIP-2 has `[CLS]` and `[DEC]` but no `[ENC]`; ours has
# all of BLIP's special tokens and simply never uses `[ENC]` here).

# %%
tok = build_tokenizer()
cfg = QFormerConfig(vocab_size=tok.vocab_size, width=16, depth=2, heads=2, mlp_dim=32,
                    num_queries=4, cross_attention_freq=2, encoder_width=12, max_positions=12)
qf = QFormer(cfg, np.random.default_rng(0))
Q = cfg.num_queries
for name, p in qf.named_params():
    if name.startswith("layers.1") or not name.endswith(("W", "query_tokens", "weight")):
        continue
    print(f"{name:34s} {p.shape}")
print("layer 0 cross-attends:", qf.layers[0].cross_attn is not None,
      "| layer 1 cross-attends:", qf.layers[1].cross_attn is not None)
print("parameters:", f"{qf.param_count():,}")

# %% [markdown]
# Two details from LAVIS are worth seeing in the list. The query FFN (`ffn_query`, LAVIS
# `intermediate_query`/`output_query`) is separate from the text FFN (`ffn`); BLIP-2
# initialises it by *copying* the text FFN of pre-trained BERT (`blip2_qformer.py`), and
# we copy too, so they start equal and then train apart. And the cross-attention keys and
# values read `encoder_width`-wide image features, not `width`-wide ones.

# %%
layer0 = qf.layers[0]
print("query FFN starts equal to the text FFN:",
      np.array_equal(layer0.ffn_query.fc1.W.data, layer0.ffn.fc1.W.data),
      "| same Param object:", layer0.ffn_query.fc1.W is layer0.ffn.fc1.W)
print("cross-attention key:", layer0.cross_attn.key.W.shape, " (encoder_width, width)")

# %% [markdown]
# The whole toy Q-Former as a picture, drawn by `minblip.diagrams.draw_qformer` from the
# object: one self-attention per layer shared by the queries and the text, the
# cross-attention only in the query lane and only where the layer has one, and the two
# feed-forwards side by side (separate objects, so separate boxes).

# %%
from minblip import diagrams  # noqa: E402

fig = diagrams.draw_qformer(qf)
plt.show()

# %% [markdown]
# ## 3. The learned queries: one parameter, broadcast over the batch
#
# The queries are a single `Param` of shape $(1, Q, D)$, drawn from $N(0, 0.02)$
# (LAVIS `query_tokens.data.normal_(0, initializer_range)`). Every image of a batch
# starts from the *same* $Q$ vectors: LAVIS writes `query_tokens.expand(B, -1, -1)`,
# we write `np.broadcast_to`. Neither copies anything: the batch is a view of one array.
#
# The backward of a broadcast is a sum. If $Z_b = Z$ for every $b$ then
# $\partial L/\partial Z = \sum_b \partial L/\partial Z_b$: each image adds its own
# opinion on how the queries should move.

# %%
def source_from(function, marker):
    """The source lines of ``function`` from the first line that contains ``marker`` on."""
    lines = inspect.getsource(function).splitlines()
    return "\n".join(lines[next(i for i, line in enumerate(lines) if marker in line):])


B = 3
queries = np.broadcast_to(qf.query_tokens.data, (B, Q, cfg.width))
print("query_tokens", qf.query_tokens.shape, "-> batch view", queries.shape,
      "| shares memory:", np.shares_memory(queries, qf.query_tokens.data),
      "| strides of the batch axis:", queries.strides[0])
print(source_from(QFormer.backward, "dq = "))

# %% [markdown]
# Let us check the sum directly: the gradient of a batch of three equals the sum of the
# gradients of the three images run one at a time.

# %%
qf64 = QFormer(cfg, np.random.default_rng(1)).to(np.float64)
rng = np.random.default_rng(2)
images = rng.standard_normal((B, 5, cfg.encoder_width))  # 5 image tokens each
R = rng.standard_normal((B, Q, cfg.width))
qf64.zero_grad()
_, cache = qf64.forward(images, mode="queries")
qf64.backward(R, cache)
batch_grad = qf64.query_tokens.grad.copy()
one_at_a_time = np.zeros_like(batch_grad)
for b in range(B):
    qf64.zero_grad()
    _, cache = qf64.forward(images[b:b + 1], mode="queries")
    qf64.backward(R[b:b + 1], cache)
    one_at_a_time += qf64.query_tokens.grad
print("max |batch - sum of single-image gradients| =", np.abs(batch_grad - one_at_a_time).max())

# %% [markdown]
# ## 4. The embeddings
#
# LAVIS's `BertEmbeddings` gives the text word + position embeddings, with positions
# counted **from 0 for the text** (the queries get no position embedding at all: they
# are a set, not a sequence), then applies **one LayerNorm to `cat(queries, text)`**. A
# LayerNorm normalises each row on its own, so this is the same as normalising the queries
# and the text separately with the same $\gamma, \beta$ — which is why Hugging Face can
# move it onto the Q-Former itself (`qformer.layernorm`) and still match.

# %%
ids, mask = tok.encode(["a small red disc", "a big blue square left of a green disc"],
                      max_length=12)
emb = QFormerEmbeddings(cfg, np.random.default_rng(3))
zq = np.broadcast_to(qf.query_tokens.data, (2, Q, cfg.width))
e, _ = emb.forward(zq, ids)
e_text, _ = emb.forward(None, ids)
e_query, _ = emb.forward(zq, None)
print("cat(queries, text) ->", e.shape)
print("max |LN(cat) - cat(LN(queries), LN(text))| =",
      np.abs(e - np.concatenate([e_query, e_text], axis=1)).max())

# %% [markdown]
# ## 5. The layer, and its backward
#
# The forward splits the rows after the shared self-attention: the first $Q$ rows go
# through the cross-attention (if the layer has one) and the query FFN, the rest through
# the text FFN, and the two results are concatenated again (LAVIS `BertLayer.forward`:
# `attention_output[:, :query_length]`, `feed_forward_chunk_query`, `torch.cat`).

# %%
print(inspect.getsource(QFormerLayer.forward).split('"""')[2])

# %% [markdown]
# **Deriving the backward.** Read the forward from the bottom up.
#
# * $y = \mathrm{cat}(y_q, y_t)$: the gradient splits, $\bar y_q = \bar y_{:Q}$,
#   $\bar y_t = \bar y_{Q:}$.
# * $y_t = \mathrm{LN}(h_t + \mathrm{FFN}(h_t))$: with $\bar s = \mathrm{LN}^\top \bar y_t$,
#   $\bar h_t = \bar s + \mathrm{FFN}^\top \bar s$ ($h_t$ feeds both terms). The same for
#   the queries with their own FFN and LayerNorm.
# * $h_q \leftarrow \mathrm{LN}(h_q + \mathrm{CA}(h_q, I))$: again residual plus branch;
#   the branch also returns $\bar I$, the image gradient of this layer.
# * $h = \mathrm{LN}(x + \mathrm{SA}(x))$: $\bar h = \mathrm{cat}(\bar h_q, \bar h_t)$ goes
#   back through one LayerNorm and **one** self-attention for all rows, so a weight of
#   the self-attention collects the gradient of queries and text together — they share
#   it. The mask needs no backward of its own: a masked score has weight exactly 0 and so
#   no gradient (notebook 02).

# %%
print(inspect.getsource(QFormerLayer.backward).split('"""')[2])

# %% [markdown]
# ## 6. The three masks
#
# Stage 1 trains three objectives, each with its own mask $M$ over the $Q+T$ positions
# (figure 2 of the paper; `True`/1 = may attend):
#
# * **ITC** (image-text contrastive, *uni-modal* mask): queries see only queries, text
#   sees only text. The image side and the text side must not peek at each other, or the
#   contrastive task would be trivial. LAVIS runs two separate passes (queries with the
#   image, text alone); one pass with the block-diagonal mask is the same thing.
# * **ITM** (image-text matching, *bi-directional* mask): everything sees everything that
#   is not padding, so the query outputs can judge whether the text fits the image.
# * **ITG** (image-grounded text generation, *multi-modal causal* mask): queries see only
#   queries (they must not read the caption they help to generate); text sees all
#   queries and the text before it. The image reaches the text **only through the
#   queries** — the text has no cross-attention — so the queries are forced to extract
#   everything the caption needs. This is UniLM's trick (Dong et al., 2019).
#
# `qformer_mask(mode, Q, text_mask)` builds the dense $(B, Q+T, Q+T)$ matrix; the
# second caption is padded, and padding columns are always 0.

# %%
b = 0  # the first caption: "a small red disc" and three [PAD]s
names = [f"q{i}" for i in range(Q)] + [tok.id_to_token(i) for i in ids[b]]
dec_names = names.copy()
dec_names[Q] = "[DEC]"  # ITG replaces [CLS] with [DEC]
panels = [("ITC  (uni-modal)", "itc", names), ("ITM  (bi-directional)", "itm", names),
          ("ITG  (multi-modal causal)", "itg", dec_names)]
L = Q + ids.shape[1]
fig, axes = plt.subplots(1, 3, figsize=(17, 6.2))
for ax, (title, mode, labels) in zip(axes, panels):
    m = qformer_mask(mode, Q, mask)[b]
    ax.imshow(m, cmap="Blues", vmin=-0.3, vmax=1.2)
    for i in range(L):
        for j in range(L):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] else "grey")
    ax.axhline(Q - 0.5, color="crimson", lw=2)
    ax.axvline(Q - 0.5, color="crimson", lw=2)
    ax.set_xticks(range(L), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(L), labels, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_title(title, fontsize=12, pad=22)
    for centre, block in (((Q - 1) / 2, "queries"), ((Q + L - 1) / 2, "text")):
        ax.text(centre, -0.9, block, ha="center", va="bottom", color="crimson", fontsize=10)
        ax.text(L - 0.2, centre, block, ha="left", va="center", color="crimson", fontsize=10,
                rotation=270)
axes[0].set_ylabel("query (attending)")
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the blocks: the top-left block (queries → queries) is all ones in every mask.
# The top-right block (queries → text) is open only for ITM. The bottom-left block
# (text → queries) is closed only for ITC. The bottom-right block (text → text) is the
# padding mask for ITC and ITM and the causal ∧ padding mask for ITG.
#
# ### What each mask lets through
#
# A mask is a claim about dependencies, and we can test the claim by changing inputs and
# watching outputs. We use wide random weights so that any real dependency shows.

# %%
qx = QFormer(QFormerConfig(**{**cfg.to_dict(), "init_std": 0.3}),
             np.random.default_rng(4)).to(np.float64)
img = np.random.default_rng(5).standard_normal((2, 5, cfg.encoder_width))
img2 = np.random.default_rng(6).standard_normal((2, 5, cfg.encoder_width))
ids2 = ids.copy()
ids2[:, 2] = tok.token_to_id("green")  # change the second word of both captions
dec, dec2 = ids.copy(), ids2.copy()
dec[:, 0] = dec2[:, 0] = tok.dec_id


def delta(a, b):
    return f"{np.abs(a - b).max():.2e}"


def run(mode, image, text):
    return qx.forward(image, text, mask, mode=mode)[0]


h, h_t, h_i = run("itc", img, ids), run("itc", img, ids2), run("itc", img2, ids)
print("ITC  text changed : queries move", delta(h[:, :Q], h_t[:, :Q]),
      "| image changed: text moves", delta(h[:, Q:], h_i[:, Q:]))
h, h_t = run("itm", img, ids), run("itm", img, ids2)
print("ITM  text changed : queries move", delta(h[:, :Q], h_t[:, :Q]))
h, h_t, h_i = run("itg", img, dec), run("itg", img, dec2), run("itg", img2, dec)
print("ITG  word 2 changed: queries move", delta(h[:, :Q], h_t[:, :Q]),
      "| [DEC] and word 1 move", delta(h[:, Q:Q + 2], h_t[:, Q:Q + 2]),
      "| word 2 moves", delta(h[:, Q + 2], h_t[:, Q + 2]))
print("ITG  image changed: text moves", delta(h[:, Q:], h_i[:, Q:]),
      "(through the queries: the text has no cross-attention)")

# %% [markdown]
# Exactly zero where the mask says "cannot see", clearly nonzero where it says "can".
# And the claim that one ITC pass with the block mask equals LAVIS's two separate passes:

# %%
h_itc = run("itc", img, ids)
h_queries, _ = qx.forward(img, mode="queries")
h_text, _ = qx.forward(None, ids, mask, mode="text")
print("ITC one pass vs two passes: queries", delta(h_itc[:, :Q], h_queries),
      "| text", delta(h_itc[:, Q:], h_text))

# %% [markdown]
# ## 7. ITG: the dense UniLM mask equals LAVIS's cached keys and values
#
# A common confusion (LAVIS issues #402, #436): LAVIS's ITG call passes **only the text**
# to the Q-Former, with an attention mask of length $Q+T$ and no visible causal mask:
#
# ```python
# lm_output = self.Qformer(decoder_input_ids, attention_mask=cat(query_atts, text_mask),
#                          past_key_values=query_output.past_key_values, labels=labels)
# ```
#
# The queries enter through `past_key_values`: in every layer, the self-attention keys
# and values the queries computed in the ITC image pass. The text's self-attention
# prepends them to its own keys and values, and `get_extended_attention_mask` builds a
# causal $T\times T$ mask with $Q$ columns of ones in front. So each text row attends to
# $[\,Q \text{ query keys} \mid \text{causal text keys}\,]$ — exactly the text rows of our
# dense ITG mask. And the query rows of the dense mask see only queries, so they compute
# exactly what the ITC image pass computed: the same hidden states, the same keys and
# values in every layer.
#
# minblip trains ITG in one pass with the dense mask (it recomputes the queries, which
# costs a little time but needs no backward through a cache). `QFormer.query_kv` and
# `QFormer.forward_incremental` implement the cached formulation too (forward only; the
# captioning loop uses it). The two give the same text outputs:

# %%
print(source_from(QFormer.forward_incremental, "Q = query_kv"))

# %%
dense, _ = qx.forward(img, dec, mask, mode="itg")
kv = qx.query_kv(img)  # per layer (k, v) of the queries, each (B, H, Q, dh)
cached, _ = qx.forward_incremental(dec, kv)
real = mask.astype(bool)  # pad rows differ: the cached call takes no padding mask
print("query keys per layer:", kv[0][0].shape, "= (B, H, Q, dh)")
print("max |dense UniLM pass - cached K/V pass| over real text tokens:",
      np.abs(dense[:, Q:][real] - cached[real]).max())

# %% [markdown]
# Same function, so the same gradient. We can check that numerically in the strongest
# way: use the **cached** formulation as the loss that finite differences probe, and the
# **dense** pass's backward as the analytic gradient. If the two formulations differed
# anywhere (say, the queries leaking into each other differently), this check would fail.

# %%
qc = QFormer(QFormerConfig(**{**cfg.to_dict(), "init_std": 0.3}),
             np.random.default_rng(7)).to(np.float64)
img_p = Param(img, dtype=np.float64)
dec_short = dec[:, :5]  # unpadded tokens
Rt = np.random.default_rng(8).standard_normal((2, 5, cfg.width))


def cached_loss_dense_gradient(backward):
    if backward:  # the dense UniLM pass and its backward
        h, cache = qc.forward(img_p.data, dec_short, None, mode="itg")
        dh = np.zeros_like(h)
        dh[:, Q:] = Rt
        img_p.grad += qc.backward(dh, cache)
    out, _ = qc.forward_incremental(dec_short, qc.query_kv(img_p.data))  # LAVIS's way
    return float(np.sum(out * Rt))


r = gradcheck(cached_loss_dense_gradient, qc.named_params() + [("image_embeds", img_p)],
              n_coords=3)
print(f"{len(r.rows)} arrays checked, max rel error {r.max_rel_err:.1e}, "
      f"random direction {r.directional.max_rel_err:.1e}")

# %% [markdown]
# (With dropout on, the two would differ slightly: LAVIS's cache carries the dropout
# masks of the ITC pass, a second pass draws new ones. Our toy trains without dropout.)
#
# Note also what Hugging Face's `Blip2QFormerModel` does *not* have: its
# `get_extended_attention_mask` has no causal branch, so it can run ITC and ITM but not
# ITG, and its converter drops the ITG head.

# %% [markdown]
# ## 8. Gradient checks
#
# Every Param at 4 coordinates plus one random direction through all of them, in all five
# modes, with wide weights ($\sigma = 0.4$) so no gradient is tiny. `input0` is the image
# features (absent in text mode, which never sees the image). `query_tokens` is checked
# like any other Param: its analytic gradient is the batch sum of section 3.

# %%
big = QFormerConfig(**{**cfg.to_dict(), "width": 8, "mlp_dim": 12, "encoder_width": 6,
                       "init_std": 0.4})
img_small = np.random.default_rng(9).standard_normal((2, 3, 6))
cases = {"queries": (img_small,), "text": (None, ids[:, :7], mask[:, :7]),
         "itc": (img_small, ids[:, :7], mask[:, :7]), "itm": (img_small, ids[:, :7], mask[:, :7]),
         "itg": (img_small, dec[:, :7], mask[:, :7])}
for mode in MODES:
    r = check_layer(QFormer(big, np.random.default_rng(10)), *cases[mode],
                    forward_kwargs={"mode": mode}, n_coords=4)
    print(f"{mode:8s} {len(r.rows):3d} arrays, max rel error {r.max_rel_err:.1e}, "
          f"random direction {r.directional.max_rel_err:.1e}")

# %% [markdown]
# And the full report for ITG, one row per Param. Rows with a relative error of exactly 0
# have a zero gradient: in "itg" mode that is true of nothing but the self-attention key
# biases (a constant added to all of a row's scores does not change a softmax, notebook
# 02).

# %%
r = check_layer(QFormer(big, np.random.default_rng(11)), *cases["itg"],
                forward_kwargs={"mode": "itg"}, n_coords=4, verbose=True)

# %% [markdown]
# ## Summary
#
# * The Q-Former is one BERT over `cat(queries, text)`: shared self-attention,
#   cross-attention to the frozen image features for the **query rows only** (every
#   other layer), and **separate FFNs** for query rows and text rows. Embeddings: no
#   position for queries, text positions from 0, one LayerNorm over both.
# * The learned queries are one $(1, Q, D)$ Param broadcast over the batch; the backward
#   of the broadcast is the sum over the batch.
# * One network, three objectives, three masks: ITC (queries and text never meet), ITM
#   (everything sees everything), ITG (queries see queries; text sees queries and earlier
#   text). The image reaches the text only through the queries.
# * LAVIS's ITG reuses the query keys and values cached in the ITC pass; a single pass
#   with the dense UniLM mask is the same function, with the same gradient (checked by
#   finite differences of one against the backward of the other).
#
# ## Exercises
#
# 1. **Count BLIP-2's Q-Former.** Write the parameter count of `QFormer` as a formula in
#    $V, D, L, F, Q, T_\max, D_{img}$ and the cross-attention frequency (check it against
#    `param_count()` on two toy configs). Evaluate it for BLIP-2 ($V$=30523, $D$=768,
#    $L$=12, $F$=3072, $Q$=32, $T_\max$=512, $D_{img}$=1408, frequency 2). The paper
#    says 188M with the heads: how close do you get?
# 2. **A leaky ITC.** Build a mask that lets the text see the queries in ITC (open the
#    bottom-left block) and run the "what each mask lets through" experiment with it by
#    calling the layers yourself. Which outputs now change with the image? Why would the
#    contrastive loss become useless?
# 3. **Queries without a position.** The queries get no position embedding. Show that
#    permuting the queries (and the rows of `query_tokens` with them) permutes the query
#    outputs in "queries" mode and leaves the text outputs of "itg" mode unchanged. What
#    breaks this symmetry during training?
# 4. **The cost of the dense ITG pass.** Count the token-layer passes of a stage-1 step
#    with LAVIS's cache (queries once for ITC, text once for ITG) and with the dense pass
#    (queries twice). Then time `QFormer.forward` in both ways for $Q$ = 32 and $T$ = 32
#    at width 64. When is the saving worth a backward through the cache?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 9.1,9.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `09_qformer_masks.ipynb`**, not its
# jupytext twin `09_qformer_masks.py`: if you edit the `.py`, run `jupytext --sync
# 09_qformer_masks.py` before you check or hand in, or the checks still see the stub.
#
# ### Exercise 9.1 · The Q-Former's three masks
#
# **Goal.** Write the body of `qformer_mask(mode, num_queries, text_mask)` in
# `minblip/qformer.py`: the boolean $(B, Q+T, Q+T)$ self-attention mask of one Q-Former
# use, entry $(i, j)$ `True` when position $i$ may attend to position $j$. Positions
# $0..Q-1$ are the queries, $Q..Q+T-1$ the text; `valid` $(B, T)$ says which text
# positions are real tokens. The five modes are in the table of the module docstring:
# "queries", "text" and "itc" keep queries and text apart, "itm" lets everything see
# everything, "itg" is the multimodal causal mask of section 6.
#
# **Hints.** Start from the padding: a padded *key* is never attended to, but a padded
# row still attends to the real keys (a row with nothing to attend to would make the
# softmax divide by zero). Build a column mask `key_ok` $(B, Q+T)$ (queries are never
# padding), repeat it over the rows, then `&=` a block pattern made from
# `is_query = np.arange(Q + T) < Q` by broadcasting a column against a row. For ITG,
# `i[None, :] <= i[:, None]` is "key $j$ at or before row $i$". Draw the three pictures
# of section 6 with your function: they must not change.

# %% nbgrader={"grade": true, "grade_id": "ex9_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
text_mask = np.array([[1, 1, 1, 0]])  # three tokens and one [PAD]
expected = {"itc": ["110000", "110000", "001110", "001110", "001110", "001110"],
            "itm": ["111110"] * 6,
            "itg": ["110000", "110000", "111000", "111100", "111110", "111110"]}
for mode, rows in expected.items():
    m = qformer_mask(mode, 2, text_mask)[0]
    print(f"{mode}:", " ".join("".join(str(int(x)) for x in row) for row in m))
    assert m.tolist() == [[c == "1" for c in row] for row in rows], mode
print("text mode:", qformer_mask("text", 0, text_mask)[0].astype(int).tolist())

# %% [markdown]
# ### Exercise 9.2 · The learned queries' gradient
#
# **Goal.** Write `queries_and_text_backward(dx, num_queries)`. The forward was the
# input of the embeddings' LayerNorm, $x = \mathrm{cat}(\mathrm{broadcast}(Z), \text{text})$
# with the learned queries $Z$ of shape $(1, Q, D)$ broadcast to $(B, Q, D)$ and the text
# embeddings $(B, T, D)$; given $\bar x$ $(B, Q+T, D)$, return $(\bar Z, \overline{\text{text}})$
# with the shapes of $Z$ and of the text.
#
# **Hints.** Section 3: the backward of a broadcast is a sum over the axis that was
# broadcast, and the result must keep $Z$'s shape `(1, Q, D)` (`keepdims`). The backward
# of a concatenation is a split.

# %% nbgrader={"grade": false, "grade_id": "ex9_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def queries_and_text_backward(dx, num_queries):
    """x = cat(broadcast_to(Z, (B, Q, D)), text): dx (B, Q+T, D) -> (dZ (1, Q, D), dtext (B, T, D))."""
    ### BEGIN SOLUTION
    dZ = dx[:, :num_queries].sum(axis=0, keepdims=True)  # every image added its opinion on Z
    dtext = dx[:, num_queries:]  # undoes the concatenation: the text part
    return dZ, dtext
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex9_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(92)
Z = Param(rng.standard_normal((1, 3, 4)), dtype=np.float64)
text_emb = Param(rng.standard_normal((2, 5, 4)), dtype=np.float64)
R = rng.standard_normal((2, 8, 4))


def embedding_input_loss(backward):
    x = np.concatenate([np.broadcast_to(Z.data, (2, 3, 4)), text_emb.data], axis=1)
    if backward:
        dZ, dtext = queries_and_text_backward(R, 3)
        Z.grad += dZ
        text_emb.grad += dtext
    return float(np.sum(x * R))


print(gradcheck(embedding_input_loss, {"query_tokens": Z, "text": text_emb}))
