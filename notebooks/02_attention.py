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
# # 02 · Attention
#
# **Goal.** Build scaled dot-product attention and multi-head attention, follow every
# shape, derive the backward pass (softmax first), check it numerically, and get the
# masks exactly right. Every transformer in BLIP — the ViT, the text encoder, the text
# decoder, BLIP-2's Q-Former — is made of this one layer.
#
# ## 1. The idea
#
# Vaswani et al. (2017), "Attention Is All You Need", eq. (1):
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V .$$
#
# Each query row of $Q$ scores every key row of $K$ with a dot product; the softmax
# turns a row of scores into weights that sum to one; the output is the weighted mean
# of the value rows. Dividing by $\sqrt{d_k}$ keeps the scores' variance near 1 when
# queries and keys have unit-variance entries, so the softmax does not saturate.
#
# * **Self-attention**: $Q$, $K$, $V$ are three projections of the *same* sequence.
# * **Cross-attention**: $Q$ comes from one sequence, $K$ and $V$ from another, which
#   may have a different length and width. In BLIP's image-grounded text encoder and
#   decoder, every layer lets the text tokens (queries) attend to the ViT's image patch
#   embeddings (keys and values); BLIP-2's 32 learned queries do the same.

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

from minblip import check_layer, rel_error
from minblip.attention import (MultiHeadAttention, ScaledDotProductAttention, causal_mask,
                               merge_heads, padding_mask, split_heads)
from minblip.softmax import softmax

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 2. The forward, shape by shape
#
# `MultiHeadAttention` holds four `Linear` layers: `query`, `key`, `value` and the
# output projection `out` (BERT's `attention.self.{query,key,value}` and
# `attention.output.dense`). With $H$ heads of width $d_h = D/H$, the $D$ columns of
# each projection are cut into $H$ groups and every head attends on its own. Let us do
# it by hand for a batch of $B=2$ sequences of $T=5$ tokens, $D=8$, $H=2$.

# %%
rng = np.random.default_rng(0)
B, T, D, H = 2, 5, 8, 2
dh = D // H
mha = MultiHeadAttention(D, H, rng, init_std=0.4)
x = rng.standard_normal((B, T, D))

q = x @ mha.query.W.data + mha.query.b.data  # (B, T, D) @ (D, D) -> (B, T, D)
k = x @ mha.key.W.data + mha.key.b.data
v = x @ mha.value.W.data + mha.value.b.data
print("q, k, v        ", q.shape)
q, k, v = (a.reshape(B, T, H, dh).transpose(0, 2, 1, 3) for a in (q, k, v))
print("split heads    ", q.shape, " (B, H, T, dh)")
scores = q @ k.swapaxes(-1, -2) / np.sqrt(dh)  # (B, H, T, dh) @ (B, H, dh, T)
print("scores         ", scores.shape, " (B, H, Tq, Tk)")
P = softmax(scores, axis=-1)
print("weights P      ", P.shape, "  every row sums to 1:", np.allclose(P.sum(-1), 1.0))
ctx = P @ v  # (B, H, T, T) @ (B, H, T, dh)
print("P @ V          ", ctx.shape, " (B, H, T, dh)")
ctx = ctx.transpose(0, 2, 1, 3).reshape(B, T, D)
print("merge heads    ", ctx.shape)
out = ctx @ mha.out.W.data + mha.out.b.data
print("out projection ", out.shape)

# %% [markdown]
# The heads never need a loop: after the split they are one more batch axis, and `@`
# works on the last two axes of stacked matrices. minblip's `split_heads` /
# `merge_heads` are exactly the two reshapes above, and `MultiHeadAttention.forward`
# gives the same output:

# %%
out_pkg, cache = mha.forward(x)
print("package equals the step-by-step version:", np.allclose(out_pkg, out, rtol=0, atol=1e-12))
print("merge_heads undoes split_heads:", np.array_equal(merge_heads(split_heads(x, H)), x))

# %% [markdown]
# **Cross-attention** only changes where keys and values come from. Here 5 text tokens
# of width 8 attend to a "context" of 7 image tokens of width 6: the key and value
# projections are `(6, 8)`, and the weights become `(B, H, 5, 7)` — one row per text
# token, one column per image token.

# %%
cross = MultiHeadAttention(D, H, rng, d_context=6, init_std=0.4)
image_tokens = rng.standard_normal((B, 7, 6))
out_x, cache_x = cross.forward(x, image_tokens)
print("key projection W", cross.key.W.shape)
print("weights P       ", cache_x["att"][3].shape, " (B, H, Tq, Tk)")
print("output          ", out_x.shape)

# %% [markdown]
# ## 3. Masks
#
# A mask says which keys each query may look at. In minblip it is boolean,
# broadcastable to `(B, Tq, Tk)`, and `True` means "may attend"; every head uses the
# same mask.
#
# * **Padding mask**: sequences in a batch have different lengths, so the short ones are
#   padded; no query may attend to a padding key. Shape `(B, 1, Tk)`.
# * **Causal mask**: the text decoder predicts token $i+1$ from tokens $\le i$, so query
#   $i$ may only see keys $j \le i$. Shape `(1, T, T)`, lower triangular.
# * **Combined**: the decoder needs both; `&` broadcasts them to `(B, T, T)`.

# %%
valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second caption has 2 padding tokens
pad = padding_mask(valid)
causal = causal_mask(T)
both = pad & causal
print("padding", pad.shape, "causal", causal.shape, "combined", both.shape)
print("combined mask of the second sequence (rows: queries, columns: keys):")
print(both[1].astype(int))

# %% [markdown]
# A masked score is replaced by $-\infty$ before the softmax, and $e^{-\infty} = 0$, so
# **a masked key gets exactly zero weight** — not a small weight, zero:

# %%
_, cache_m = mha.forward(x, mask=both)
P_masked = cache_m["att"][3]  # the weights, (B, H, T, T)
full = np.broadcast_to(both[:, None], P_masked.shape)
print("largest weight on a masked key:", P_masked[~full].max())
print("rows still sum to one:", np.allclose(P_masked.sum(-1), 1.0))

# %% [markdown]
# ### $-\infty$ versus BERT's $-10000$
#
# BERT (and so BLIP's `med.py`) does not replace masked scores; it *adds*
# $(1 - m)\cdot(-10000)$ to them. In a row with at least one visible key this gives the
# same weights: after subtracting the row maximum, a masked score is below $-9000$, and
# $e^{-9000}$ underflows to exactly 0 in float32 and float64.
#
# The two differ on a **fully masked row**, which a left-padded batch with a causal
# mask produces (the first query sees only the first key, which is padding). Three
# conventions on one such row:

# %%
s = np.array([0.3, -1.2, 2.0, 0.5], dtype=np.float32)  # the raw scores of one row
print("softmax of the raw scores   ", softmax(s))
print("BERT, add -10000 everywhere ", softmax(s - np.float32(10000)))
print("add finfo.min everywhere    ", softmax(s + np.finfo(np.float32).min))
with np.errstate(invalid="ignore"):
    naive = np.exp(s - np.inf - np.max(s - np.inf))  # set to -inf, then a textbook softmax
print("naive -inf softmax          ", naive / naive.sum())

# %% [markdown]
# * With $-10000$ the softmax is shift-invariant, so a fully masked row gets the
#   *unmasked* weights back (up to float32 rounding of $s - 10000$): the mask silently
#   does nothing.
# * With the most negative float (what newer Hugging Face code adds), $s + \text{min}$
#   rounds to the same number for every key, and the weights are uniform.
# * A textbook softmax on $-\infty$ scores computes $-\infty - (-\infty)$ = NaN, and the
#   NaN then spreads through every later layer.
#
# minblip treats the row maximum of a fully masked row as 0 and its sum as 1, so the row
# gets **all-zero weights**: the query reads nothing, its output is the zero vector
# (plus the output bias), and the backward gives zero gradients, never NaN.

# %%
sdpa = ScaledDotProductAttention()
left = np.array([[0, 1, 1, 1, 1]])  # one left-padded sequence
mask_left = padding_mask(left) & causal_mask(T)  # query 0 sees nothing
qh, kh, vh = (rng.standard_normal((1, 1, T, dh)) for _ in range(3))
o, c = sdpa.forward(qh, kh, vh, mask_left)
grads = sdpa.backward(np.ones_like(o), c)
print("weights of the fully masked row:", c[3][0, 0, 0])
print("its output:", o[0, 0, 0])
print("any NaN in the output or the gradients:", any(np.isnan(a).any() for a in (o, *grads)))

# %% [markdown]
# ### Attention maps
#
# The weights of one head for one sequence of 8 tokens: with no mask every query
# spreads its weight over all keys; with a padding mask the last three key columns are
# exactly zero (grey); with a causal mask the map is lower triangular. The remaining
# weights are renormalised, so each row still sums to one.

# %%
rng_map = np.random.default_rng(7)
Tm = 8
qm, km, vm = (1.5 * rng_map.standard_normal((1, 1, Tm, 16)) for _ in range(3))
maps = {
    "no mask": None,
    "padding mask (last 3 keys padded)": padding_mask([[1] * 5 + [0] * 3]),
    "causal mask": causal_mask(Tm),
}
cmap = plt.get_cmap("viridis").copy()
cmap.set_bad("lightgray")  # masked entries: their weight is exactly 0
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, (title, mask) in zip(axes, maps.items()):
    _, c = sdpa.forward(qm, km, vm, mask)
    weights = c[3][0, 0]  # (Tq, Tk) of the only sequence and head
    hidden = np.zeros((Tm, Tm), bool) if mask is None else ~np.broadcast_to(mask[0], (Tm, Tm))
    im = ax.imshow(np.ma.masked_where(hidden, weights), cmap=cmap, vmin=0.0)
    ax.set_title(title)
    ax.set_xticks(range(Tm))
    ax.set_yticks(range(Tm))
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The backward of softmax
#
# For one row, $p_i = e^{s_i} / \sum_m e^{s_m}$. Differentiating,
#
# $$\frac{\partial p_i}{\partial s_j} = p_i(\delta_{ij} - p_j)
# \quad\Longrightarrow\quad J = \mathrm{diag}(p) - p\,p^\top ,$$
#
# a symmetric $T_k \times T_k$ matrix. The chain rule gives
# $\bar s = J^\top \bar p = p \odot \bar p - p\,(p^\top \bar p)$, that is
#
# $$\bar s = p \odot \big(\bar p - \langle \bar p, p\rangle\big),$$
#
# one dot product per row instead of a $T_k\times T_k$ matrix. For a whole matrix of
# rows, $\bar S = P \odot \big(\bar P - \mathrm{rowsum}(\bar P \odot P)\big)$. A quick
# check against the explicit Jacobian:

# %%
s_row = rng.standard_normal(6)
dp = rng.standard_normal(6)
p = softmax(s_row)
J = np.diag(p) - np.outer(p, p)
print("J^T dp              ", J.T @ dp)
print("p * (dp - <dp, p>)  ", p * (dp - dp @ p))
print("relative error", rel_error(J.T @ dp, p * (dp - dp @ p)))

# %% [markdown]
# ## 5. The backward of scaled dot-product attention
#
# Per batch element and head (the leading axes just come along), with $c = 1/\sqrt{d_h}$:
#
# | forward | shape |
# |---|---|
# | $S = c\,Q K^\top$ | $(T_q, d_h)(d_h, T_k) \to (T_q, T_k)$ |
# | $S_{ij} \leftarrow -\infty$ where the mask is False | $(T_q, T_k)$ |
# | $P = \mathrm{softmax}(S)$ by rows | $(T_q, T_k)$ |
# | $O = P V$ | $(T_q, T_k)(T_k, d_h) \to (T_q, d_h)$ |
#
# Read it from the bottom up. $O = PV$ is a matrix product, so as for `Linear`:
#
# $$\bar V = P^\top \bar O \quad (T_k, T_q)(T_q, d_h) \to (T_k, d_h), \qquad
# \bar P = \bar O V^\top \quad (T_q, d_h)(d_h, T_k) \to (T_q, T_k).$$
#
# The softmax, row by row as in section 4:
#
# $$\bar S = P \odot \big(\bar P - \mathrm{rowsum}(\bar P \odot P)\big) \quad (T_q, T_k).$$
#
# The mask needs no code of its own: where it is False, $P = 0$, so $\bar S = 0$ there —
# the scores that were overwritten receive no gradient, as they should. Finally
# $S = c\,QK^\top$ is again a matrix product:
#
# $$\bar Q = c\,\bar S K \quad (T_q, T_k)(T_k, d_h) \to (T_q, d_h), \qquad
# \bar K = c\,\bar S^\top Q \quad (T_k, T_q)(T_q, d_h) \to (T_k, d_h).$$
#
# minblip's backward is those five lines (dropout on the weights, off here, sits between
# $P$ and $PV$ and is undone in between):

# %%
print(inspect.getsource(ScaledDotProductAttention.backward))

# %% [markdown]
# Multi-head attention wraps it in the projections. Its backward undoes the output
# projection, splits $\bar O$ into heads, runs the attention backward, merges $\bar Q$,
# $\bar K$, $\bar V$ back and sends each through its projection's backward. In
# self-attention $x$ fed all three projections (fan-out), so its gradient is the sum of
# the three; in cross-attention the $K$ and $V$ parts go to the context instead.

# %%
print(inspect.getsource(MultiHeadAttention.backward))

# %% [markdown]
# ## 6. Gradient checks
#
# All in float64 with the loss $\sum \text{out}\odot R$, as in notebook 01. First the
# bare attention with the combined causal + padding mask, checking $Q$, $K$ and $V$:

# %%
rng = np.random.default_rng(1)
qc, kc, vc = (rng.standard_normal((B, H, T, dh)) for _ in range(3))
attention_checks = [check_layer(ScaledDotProductAttention(), qc, kc, vc,
                                forward_kwargs={"mask": both})]
print(attention_checks[-1])

# %% [markdown]
# Multi-head **self-attention** with the same mask: every projection's weight and bias,
# and the input (whose gradient sums the query, key and value paths).

# %%
mha = MultiHeadAttention(D, H, rng, init_std=0.4)
x = rng.standard_normal((B, T, D))
attention_checks.append(check_layer(mha, x, forward_kwargs={"mask": both}))
print(attention_checks[-1])

# %% [markdown]
# **Cross-attention** from 5 text tokens of width 8 to 7 image tokens of width 6, with
# no mask (BLIP's image attention mask is all ones). `input0` is the text, `input1` the
# image context.

# %%
cross = MultiHeadAttention(D, H, rng, d_context=6, init_std=0.4)
context = rng.standard_normal((B, 7, 6))
attention_checks.append(check_layer(cross, x, context))
print(attention_checks[-1])
assert max(r.max_rel_err for r in attention_checks) <= 1e-7  # what the next paragraph says

# %% [markdown]
# Relative errors of $10^{-7}$ and below everywhere: the backward is right.
#
# One row deserves a second look: `key.b` shows a relative error of 0 because its
# true gradient is zero (the absolute error is rounding noise, below atol). Adding a
# bias $b$ to every key adds the same $q\cdot b$ to every score in a row, and the
# softmax ignores a constant shift. A key bias is a parameter that can never learn;
# which is why BLIP-2's EVA ViT keeps query and value biases but no key bias.
#
# ## 7. Causal attention cannot see the future
#
# With a causal mask, output position $t$ must depend only on inputs $0..t$. Check it
# two ways. First, change the last two tokens and compare the outputs: the first three
# positions must not move at all (not by rounding error: the changed keys get weight
# exactly 0). Without the mask, every position moves.

# %%
t0 = 3
x_changed = x.copy()
x_changed[:, t0:] = rng.standard_normal((B, T - t0, D))
for name, mask in (("causal", causal), ("no mask", None)):
    before, _ = mha.forward(x, mask=mask)
    after, _ = mha.forward(x_changed, mask=mask)
    moved = np.abs(after[:, :t0] - before[:, :t0]).max()
    print(f"{name:8s}: largest change of outputs 0..{t0 - 1} = {moved:.3g}")

# %% [markdown]
# Second, through the backward: send a gradient into output position 2 only. The
# gradient that reaches the inputs must be zero at every later position.

# %%
out, cache = mha.forward(x, mask=causal)
dout = np.zeros_like(out)
dout[:, 2] = rng.standard_normal((B, D))
dx, _ = mha.backward(dout, cache)
print("|dx| per input position:", np.abs(dx).sum(axis=(0, 2)))

# %% [markdown]
# ## Summary
#
# * Attention is $\mathrm{softmax}(QK^\top/\sqrt{d_h})\,V$; heads are one more batch axis
#   after a reshape `(B, T, D) -> (B, H, T, dh)`; cross-attention takes $K, V$ from a
#   context of its own length and width.
# * Softmax backward: $\bar s = p \odot (\bar p - \langle \bar p, p\rangle)$, the
#   product with $J = \mathrm{diag}(p) - pp^\top$ without building $J$.
# * Attention backward: $\bar V = P^\top\bar O$, $\bar P = \bar O V^\top$,
#   $\bar S = P\odot(\bar P - \mathrm{rowsum}(\bar P\odot P))$, $\bar Q = c\,\bar S K$,
#   $\bar K = c\,\bar S^\top Q$. The mask needs no backward: masked weights are 0.
# * Masks are boolean, `True` = may attend, broadcast to `(B, Tq, Tk)`. Masked keys get
#   exactly zero weight; a fully masked row gives zero weights (BERT's $-10000$ would
#   quietly undo the mask there, a plain $-\infty$ would give NaN).
# * Causal attention makes output $t$ independent of inputs after $t$, exactly.
#
# ## Exercises
#
# 1. **The naive loop.** Write attention as two Python loops over batch and head, with
#    2-D matrices only (`q[b, h] @ k[b, h].T`, ...). Check that it matches
#    `ScaledDotProductAttention` to $10^{-12}$, then time both for `B=8, H=8, T=64`.
# 2. **Scale and mask as a layer.** Write a module whose forward is
#    `where(mask, c * S, fill)` with a finite `fill` (why not $-\infty$ for a gradient
#    check with the loss $\sum \text{out}\odot R$?). Derive its backward, check it with
#    `check_layer`, and explain why the mask itself has no gradient.
# 3. **$-10000$ in float16.** The spacing between float16 numbers near 10000 is 8.
#    Compute BERT's additive mask in float16 for a row with one visible key and for a
#    fully masked row. What happens to the scores $s - 10000$? Now try $-10^{9}$ instead:
#    why does it break in float16, and why do mixed-precision codebases switch to
#    $-10^4$ or to the dtype's most negative number?
# 4. **The Q-Former's shapes.** BLIP-2's 32 query tokens of width 768 cross-attend to
#    257 ViT-g tokens of width 1408 with 12 heads. Write down the shapes of every
#    array in the forward and the backward, and of the key projection's weight.

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 2.1,2.2,2.3` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names and a notebook exercise in the cell below its
# description. **The graded file is this notebook, `02_attention.ipynb`**, not its
# jupytext twin `02_attention.py`: if you edit the `.py`, run `jupytext --sync
# 02_attention.py` before you check or hand in, or the checks still see the stub.
#
# ### Exercise 2.1 · Scaled dot-product attention backward, with a mask
#
# **Goal.** Write `ScaledDotProductAttention.backward` in `minblip/attention.py`.
#
# **Hints.** Read the forward bottom up: `out = P_drop @ V`, then the dropout, then the
# softmax over the keys (the last axis), then the scale, then $S = QK^\top$. The cache
# holds the weights `p` *after* masking, so a masked key already has $P = 0$: ask yourself
# why the softmax backward then gives it exactly zero gradient, and why recomputing `p`
# from `q` and `k` would be a bug. Transpose only the last two axes (`swapaxes(-1, -2)`);
# `.T` would reverse all four. The check uses a padding and a causal mask together.

# %% nbgrader={"grade": true, "grade_id": "ex2_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(20)
q = rng.standard_normal((2, 2, 4, 3))  # (B, H, Tq, dh)
k, v = rng.standard_normal((2, 2, 5, 3)), rng.standard_normal((2, 2, 5, 3))  # Tk = 5
mask = padding_mask(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])) & causal_mask(4, 5)
print(check_layer(ScaledDotProductAttention(), q, k, v, forward_kwargs={"mask": mask}))

# %% [markdown]
# ### Exercise 2.2 · The backward of the attention scores
#
# **Goal.** Write `scores_backward(q, k, dscores, scale)` for
# $S = c\,QK^\top$ with $Q$ `(B, H, Tq, dh)`, $K$ `(B, H, Tk, dh)` and $S$
# `(B, H, Tq, Tk)`: return $(\bar Q, \bar K)$.
#
# **Hints.** For one batch element and head it is the Linear rule of notebook 01:
# $\bar Q = c\,\bar S K$ and $\bar K = c\,\bar S^\top Q$. `@` broadcasts over the two
# leading axes; check each result's shape against its input.

# %% nbgrader={"grade": false, "grade_id": "ex2_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def scores_backward(q, k, dscores, scale):
    """S = scale * q @ k^T over the last two axes: dscores (B, H, Tq, Tk) -> (dq, dk)."""
    ### BEGIN SOLUTION
    dq = scale * dscores @ k  # (B, H, Tq, Tk) @ (B, H, Tk, dh) -> (B, H, Tq, dh)
    dk = scale * dscores.swapaxes(-1, -2) @ q  # (B, H, Tk, Tq) @ (B, H, Tq, dh) -> (B, H, Tk, dh)
    return dq, dk
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip import Param, gradcheck  # noqa: E402

rng = np.random.default_rng(21)
q_p = Param(rng.standard_normal((2, 3, 4, 2)), dtype=np.float64)
k_p = Param(rng.standard_normal((2, 3, 5, 2)), dtype=np.float64)
R = rng.standard_normal((2, 3, 4, 5))
c = 1 / np.sqrt(2)


def scores_loss(backward):
    S = c * q_p.data @ k_p.data.swapaxes(-1, -2)
    if backward:
        dq, dk = scores_backward(q_p.data, k_p.data, R, c)
        q_p.grad += dq
        k_p.grad += dk
    return float(np.sum(S * R))


print(gradcheck(scores_loss, {"q": q_p, "k": k_p}))


# %% [markdown]
# ### Exercise 2.3 · Multi-head attention forward, from scratch
#
# **Goal.** Write `mha_forward(x, context, mask, weights, n_heads)` with NumPy only: the
# forward of `MultiHeadAttention`, self- or cross-attention, with a boolean mask.
#
# * `x` `(B, T, D)`; `context` `(B, S, D_c)` or `None` (self-attention: keys and values
#   come from `x`, so $S = T$ and $D_c = D$);
# * `mask`: booleans broadcastable to `(B, T, S)`, `True` = may attend, or `None`;
# * `weights`: a dict of the four projections, stored `(d_in, d_out)` as minblip does:
#   `"Wq"` `(D, D)`, `"bq"` `(D,)`, `"Wk"` and `"Wv"` `(D_c, D)`, `"bk"` and `"bv"` `(D,)`,
#   `"Wo"` `(D, D)`, `"bo"` `(D,)`;
# * return `(B, T, D)`.
#
# **Hints.** Section 2 walks through the self-attention case without a mask. Add:
# keys and values from `context` when there is one; the mask needs a head axis to
# broadcast against the scores `(B, H, T, S)`; a masked key must get weight exactly 0
# (use $-\infty$ before a softmax that subtracts the row maximum), and a query whose keys
# are *all* masked must get all-zero weights, not NaN (section 3: minblip's departure from
# BERT). Do not call `MultiHeadAttention`, `ScaledDotProductAttention`, `split_heads`,
# `merge_heads` or `softmax`: the check makes them unavailable.

# %% nbgrader={"grade": false, "grade_id": "ex2_3_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def mha_forward(x, context, mask, weights, n_heads):
    """x (B, T, D), context (B, S, Dc) or None, mask broadcastable to (B, T, S) or None
    -> (B, T, D)."""
    ### BEGIN SOLUTION
    source = x if context is None else context
    B, T, D = x.shape
    S, dh = source.shape[1], D // n_heads

    def heads(a, length):  # (B, L, D) -> (B, H, L, dh)
        return a.reshape(B, length, n_heads, dh).transpose(0, 2, 1, 3)

    q = heads(x @ weights["Wq"] + weights["bq"], T)  # (B, T, D) @ (D, D)
    k = heads(source @ weights["Wk"] + weights["bk"], S)  # (B, S, Dc) @ (Dc, D)
    v = heads(source @ weights["Wv"] + weights["bv"], S)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(dh)  # (B, H, T, dh) @ (B, H, dh, S)
    if mask is not None:
        scores = np.where(np.asarray(mask, bool)[:, None], scores, -np.inf)  # (B, 1, T, S)
    row_max = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))  # exp(-inf) = 0
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)  # a fully masked row stays all zero
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, D)  # (B, H, T, dh) -> (B, T, D)
    return ctx @ weights["Wo"] + weights["bo"]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2_3_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from contextlib import contextmanager  # noqa: E402

import minblip.attention as attention_module  # noqa: E402

FORBIDDEN = {"MultiHeadAttention", "ScaledDotProductAttention", "split_heads", "merge_heads",
             "softmax"}


@contextmanager
def package_attention_unavailable():
    """While the answer runs, minblip's attention layers raise, and the answer may not
    name the package's attention helpers."""
    used = FORBIDDEN & set(mha_forward.__code__.co_names)
    assert not used, f"Exercise 2.3 is NumPy only; your mha_forward uses {sorted(used)}"
    saved = {name: getattr(attention_module, name).forward
             for name in ("MultiHeadAttention", "ScaledDotProductAttention")}

    def unavailable(*args, **kwargs):
        raise RuntimeError("Exercise 2.3: minblip's attention layers are unavailable while "
                           "your mha_forward runs")

    for name in saved:
        getattr(attention_module, name).forward = unavailable
    try:
        yield
    finally:
        for name, forward in saved.items():
            getattr(attention_module, name).forward = forward


def reference_attention(x, context, mask, weights, n_heads):
    """The same layer assembled from minblip's pieces: projections, then the package's
    scaled dot-product attention on the split heads."""
    source = x if context is None else context
    q, k, v = (attention_module.split_heads(a @ weights[f"W{n}"] + weights[f"b{n}"], n_heads)
               for a, n in ((x, "q"), (source, "k"), (source, "v")))
    heads_mask = None if mask is None else np.asarray(mask, bool)
    ctx, _ = attention_module.ScaledDotProductAttention().forward(q, k, v, heads_mask)
    return attention_module.merge_heads(ctx) @ weights["Wo"] + weights["bo"]


def random_weights(D, Dc, rng):
    return {"Wq": 0.4 * rng.standard_normal((D, D)), "bq": rng.standard_normal(D),
            "Wk": 0.4 * rng.standard_normal((Dc, D)), "bk": rng.standard_normal(D),
            "Wv": 0.4 * rng.standard_normal((Dc, D)), "bv": rng.standard_normal(D),
            "Wo": 0.4 * rng.standard_normal((D, D)), "bo": rng.standard_normal(D)}


rng = np.random.default_rng(23)
x_self, x_text, image = (rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 4, 8)),
                         rng.standard_normal((2, 6, 3)))
w_self, w_cross = random_weights(8, 8, rng), random_weights(8, 3, rng)
causal_padded = causal_mask(5, 5) & padding_mask(np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
no_image = padding_mask(np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]))  # text 1 sees nothing
cases = {"self-attention, no mask": (x_self, None, None, w_self),
         "self-attention, causal and padding": (x_self, None, causal_padded, w_self),
         "cross-attention to 6 image tokens": (x_text, image, no_image, w_cross)}
for name, (x_, ctx_, mask_, w_) in cases.items():
    with package_attention_unavailable():
        yours = mha_forward(x_, ctx_, mask_, w_, 2)
    expected = reference_attention(x_, ctx_, mask_, w_, 2)
    err = np.abs(yours - expected).max()
    print(f"{name:36s} max |yours - minblip's| = {err:.1e}")
    assert yours.shape == expected.shape and err < 1e-12, name
### BEGIN HIDDEN TESTS
w4 = random_weights(8, 3, rng)
with package_attention_unavailable():
    yours = mha_forward(x_text, image, None, w4, 4)
assert np.abs(yours - reference_attention(x_text, image, None, w4, 4)).max() < 1e-12
with package_attention_unavailable():
    masked = mha_forward(x_text, image, no_image, w4, 4)
assert np.allclose(masked[1], w4["bo"], rtol=0, atol=1e-12)  # nothing visible: only the bias
### END HIDDEN TESTS
