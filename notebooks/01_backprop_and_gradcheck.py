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
# # 01 · Backprop and gradient checking from scratch
#
# **Goal.** Every layer in minblip has a backward pass written by hand. Before we
# build attention, a ViT and BLIP itself, we need two skills:
#
# 1. deriving a backward pass, with the shapes, from the forward;
# 2. *proving* it is right with a gradient check, and knowing how to read the
#    number the check prints.
#
# We do both on the two layers every later notebook uses — `Linear` and the softmax
# cross-entropy loss — and then break things on purpose: float32 versus float64,
# `=` versus `+=`, repeated token ids, and a forgotten gradient.

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

from minblip import GradcheckError, check_layer, gradcheck, rel_error
from minblip.layers import GELU, Embedding, LayerNorm, Linear
from minblip.softmax import CrossEntropyLoss, softmax

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The chain rule as we will use it
#
# A training step ends in one scalar, the loss $L$. For every array $v$ the forward
# computes, write $\bar v = \partial L / \partial v$: an array **with the same shape
# as $v$**. For one forward line $y = f(x)$ the chain rule says
#
# $$\bar x_i = \sum_j \frac{\partial y_j}{\partial x_i}\, \bar y_j
# \qquad\text{i.e.}\qquad \bar x = J_f^\top \bar y .$$
#
# We never build the Jacobian $J_f$; each layer knows how to multiply by its transpose.
# So a backward pass is **the forward read from the bottom up**: start from
# $\bar L = 1$ and undo one line at a time, handing $\bar y$ in and getting $\bar x$ out.
# Two more rules cover everything else:
#
# * if $x$ is used twice (fan-out), its gradient is the **sum** of both contributions;
# * a parameter's gradient is **added** to (`+=`) its `grad`, for the same reason —
#   a layer may be used several times before one backward.
#
# Here is a three-line forward and its backward, written in exactly that style.

# %%
rng = np.random.default_rng(0)
fc1, act, fc2 = Linear(4, 8, rng, init_std=0.5), GELU(), Linear(8, 3, rng, init_std=0.5)
for layer in (fc1, fc2):
    layer.to(np.float64)
x = rng.standard_normal((2, 4))
R = rng.standard_normal((2, 3))  # a fixed random "upstream gradient"


def loss_and_grad(x):
    h, c1 = fc1.forward(x)  # (2, 4) @ (4, 8) -> (2, 8)
    a, c2 = act.forward(h)
    y, c3 = fc2.forward(a)  # (2, 8) @ (8, 3) -> (2, 3)
    loss = np.sum(y * R)  # the test loss: dL/dy = R
    # backward: the same lines, bottom up
    da = fc2.backward(R, c3)  # undoes y = fc2(a)
    dh = act.backward(da, c2)  # undoes a = GELU(h)
    dx = fc1.backward(dh, c1)  # undoes h = fc1(x)
    return loss, dx


loss, dx = loss_and_grad(x)
print("loss", round(loss, 6))
print("dx\n", dx)

# %% [markdown]
# The loss $\sum y \odot R$ with a fixed random $R$ is the test loss used throughout
# minblip: its gradient with respect to $y$ is just $R$, so every output element is
# tested with a different weight.
#
# Is `dx` right? Nudge one input up and down by $h$ and look at the change in the loss:
# the **central difference** $\big(L(x + h e_i) - L(x - h e_i)\big) / 2h$.

# %%
h = 1e-5
numeric = np.zeros_like(x)
for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    numeric[i] = (loss_and_grad(x + e)[0] - loss_and_grad(x - e)[0]) / (2 * h)
print("numeric dx\n", numeric)
print("relative error", rel_error(dx, numeric))

# %% [markdown]
# That is a gradient check. The rest of the notebook is about doing it for every
# layer, and about what that last number means.
#
# ## 2. Linear
#
# $y = x W + b$ over the last axis, with $W$ stored `(d_in, d_out)` (PyTorch stores the
# transpose). $x$ may have any number of leading axes, e.g. `(B, T, d_in)`; fold them
# into one axis of length $N$ so that $X$ is `(N, d_in)` and $Y = XW + \mathbf 1 b^\top$
# is `(N, d_out)`. Element by element, $Y_{nj} = \sum_i X_{ni} W_{ij} + b_j$, so
#
# $$\bar W_{ij} = \sum_n X_{ni}\,\bar Y_{nj}
# \;\Rightarrow\; \bar W = X^\top \bar Y \quad (d_{in}, N)\,(N, d_{out}) \to (d_{in}, d_{out})$$
#
# $$\bar b_j = \sum_n \bar Y_{nj}
# \;\Rightarrow\; \bar b = \textstyle\sum_n \bar Y_{n,:} \quad (d_{out},)
# \qquad\text{($b$ was broadcast over every row)}$$
#
# $$\bar X_{ni} = \sum_j W_{ij}\,\bar Y_{nj}
# \;\Rightarrow\; \bar X = \bar Y W^\top \quad (N, d_{out})\,(d_{out}, d_{in}) \to (N, d_{in})$$
#
# A useful habit: the shapes alone almost force the answer. $\bar W$ must be
# `(d_in, d_out)` and can only be built from $X$ `(N, d_in)` and $\bar Y$ `(N, d_out)`
# by summing over $N$. The leading axes never matter: $\bar x$ is $\bar y W^\top$
# reshaped back. Here is minblip's `Linear`:

# %%
print(inspect.getsource(Linear.forward))
print(inspect.getsource(Linear.backward))

# %% [markdown]
# (The `trainable` tests are for frozen Params, which the optimiser must leave alone: a
# frozen layer still returns $\bar x$ but forms no $\bar W$ or $\bar b$. Notebook 11
# freezes a whole language model that way. Here every Param trains.)
#
# `check_layer` wraps a layer in the loss $\sum \text{out} \odot R$, switches it to
# float64, and compares every Param and every float input against central differences
# (a few coordinates each, plus one random direction — section 7 explains that row).
# We use a larger initialisation than the default 0.02 so the gradients are not tiny,
# and an input with two leading axes.

# %%
rng = np.random.default_rng(1)
lin = Linear(5, 3, rng, init_std=0.5)
lin.b.data[...] = rng.standard_normal(3)  # a non-zero bias, so it is tested too
x = rng.standard_normal((2, 4, 5))  # (B, T, d_in)
print(check_layer(lin, x))

# %% [markdown]
# ## 3. Softmax cross-entropy
#
# For logits $z \in \mathbb R^{N\times K}$, $p = \mathrm{softmax}(z)$ row by row, and a
# target distribution $t$ per row,
#
# $$L = -\frac1N \sum_n \sum_k t_{nk} \log p_{nk},\qquad
# \log p_{nk} = z_{nk} - \log\textstyle\sum_m e^{z_{nm}} .$$
#
# Differentiating the log-sum-exp gives the softmax back:
# $\partial \log p_{nk} / \partial z_{nj} = \delta_{kj} - p_{nj}$. Hence
#
# $$\bar z_{nj} = -\frac1N \sum_k t_{nk}(\delta_{kj} - p_{nj})
# = \frac1N\Big(p_{nj}\textstyle\sum_k t_{nk} - t_{nj}\Big).$$
#
# * **One-hot targets** ($\sum_k t_{nk} = 1$): $\bar z = (p - \mathrm{onehot}) / N$.
#   The famous "softmax minus one-hot".
# * **Label smoothing** $\varepsilon$ (BLIP's LM loss uses 0.1):
#   $t = (1-\varepsilon)\,\mathrm{onehot} + \varepsilon / K$ still sums to one, so
#   $\bar z = (p - t)/N$.
# * **`ignore_index`** (BLIP writes -100 into padding positions): an ignored row has
#   $t = 0$, so its gradient is exactly zero, and $N$ counts only the rows that are kept.
#
# minblip's backward keeps the general form $p \sum_k t_k - t$, which also covers soft
# targets and ignored rows:

# %%
print(inspect.getsource(CrossEntropyLoss.backward))

# %% [markdown]
# First a direct check of the formula: five positions, one of them ignored, with label
# smoothing.

# %%
rng = np.random.default_rng(2)
N, K, eps = 5, 4, 0.1
z = rng.standard_normal((N, K))
targets = np.array([2, 0, -100, 3, 2])  # position 2 is padding
ce = CrossEntropyLoss(label_smoothing=eps)
loss, cache = ce.forward(z, targets)
dz = ce.backward(1.0, cache)

keep = targets != -100
t = np.zeros((N, K))
t[np.flatnonzero(keep), targets[keep]] = 1.0
t = ((1 - eps) * t + eps / K) * keep[:, None]  # smoothed, ignored row all zero
by_hand = (softmax(z) - t) * keep[:, None] / keep.sum()
print("dz\n", dz)
print("equals (p - t) / N_kept on the kept rows, 0 on the ignored row:",
      np.allclose(dz, by_hand, rtol=0, atol=1e-15))

# %% [markdown]
# And the gradient check, with logits of shape `(B, T, K)` as a language-model head
# produces them. The integer targets are passed through unchanged; only the logits are
# checked.

# %%
z = rng.standard_normal((2, 3, 6))
targets = np.array([[1, 4, -100], [0, 5, 5]])
print(check_layer(CrossEntropyLoss(label_smoothing=0.1), z, targets))

# %% [markdown]
# ## 4. Why float64
#
# The central difference has two errors that pull in opposite directions:
#
# * **truncation**: Taylor's theorem gives
#   $\frac{L(x+h)-L(x-h)}{2h} = L'(x) + \frac{h^2}{6}L'''(x) + \dots$,
#   an error $\propto h^2$ — small $h$ is better;
# * **rounding**: $L(x\pm h)$ are each computed with a relative error of about the unit
#   roundoff $u$, and their difference is divided by $2h$, an error
#   $\approx u\,|L| / h$ — large $h$ is better.
#
# The sum is smallest near $h \approx u^{1/3}$, where both are about $u^{2/3}$. For
# float32, $u \approx 6\times10^{-8}$: the best achievable error is around $10^{-5}$.
# For float64, $u \approx 1.1\times10^{-16}$: around $10^{-11}$. Let us measure it on
# the loss "cross-entropy of a Linear layer", with respect to the input, running the
# *same code* in both precisions. Each numeric gradient is summarised by one number,
# $\lVert \text{numeric} - \text{exact} \rVert / \lVert \text{exact} \rVert$.

# %%
rng = np.random.default_rng(3)
lin = Linear(6, 5, rng, init_std=0.5)
ce = CrossEntropyLoss()
x = rng.standard_normal((4, 6))
targets = np.array([0, 3, 1, 4])


def ce_of_linear(x, dtype):
    lin.to(dtype)
    z, _ = lin.forward(x.astype(dtype))
    return ce.forward(z, targets)[0]


lin.to(np.float64)  # the reference gradient, exact up to float64 rounding
z, c_lin = lin.forward(x)
dz = (softmax(z) - np.eye(z.shape[1])[targets]) / len(targets)  # section 3: (p - onehot) / N
dx_exact = lin.backward(dz, c_lin)  # written out, so this section needs no exercise done

hs = 10.0 ** -np.arange(1.0, 10.01, 0.25)
errors = {}
for dtype in (np.float32, np.float64):
    errs = []
    for h in hs:
        numeric = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, down = x.astype(dtype), x.astype(dtype)
            up[i] += dtype(h)
            down[i] -= dtype(h)
            numeric[i] = (ce_of_linear(up, dtype) - ce_of_linear(down, dtype)) / (2 * h)
        errs.append(np.linalg.norm(numeric - dx_exact) / np.linalg.norm(dx_exact))
    errors[dtype] = np.array(errs)
    best = int(np.argmin(errs))
    print(f"{dtype.__name__}: best h = {hs[best]:.0e} with error {errs[best]:.1e}; "
          f"at h = 1e-5 the error is {errs[np.argmin(np.abs(hs - 1e-5))]:.1e}")

# %%
fig, ax = plt.subplots(figsize=(7, 4.5))
for dtype, color in ((np.float32, "C0"), (np.float64, "C1")):
    u = np.finfo(dtype).eps / 2  # unit roundoff
    ax.loglog(hs, errors[dtype], "o-", ms=3.5, color=color, label=dtype.__name__)
    ax.loglog(hs, 3 * u / hs, ":", color=color, lw=1, label=f"rounding, 3u/h (u = {u:.0e})")
ax.loglog(hs, 0.08 * hs**2, "k--", lw=1, label=r"truncation, $\propto h^2$")
ax.axvline(1e-5, color="gray", lw=0.8)
ax.annotate("h = 1e-5", (1e-5, 1e-12), xytext=(4, 4), textcoords="offset points",
            color="gray", fontsize=9)
ax.set_xlabel("step size h")
ax.set_ylabel("relative error of the numeric gradient")
ax.set_title("Central differences: truncation (right) versus rounding (left)")
ax.set_ylim(1e-12, 10)
ax.legend(fontsize=8, loc="lower left")
plt.show()

# %% [markdown]
# Read the plot from the right (large $h$) to the left. Both precisions start on the
# same slope-2 line: truncation error does not care about precision. Each one then
# turns around where rounding takes over and climbs along its slope $-1$ line. float32
# turns around early, at $h \approx 10^{-2}$ and an error of a few $10^{-5}$; by
# $h \approx 10^{-8}$, $x + h$ rounds back to $x$, the difference is 0 and the error
# is exactly 1. float64 goes down to a few $10^{-11}$.
#
# So gradient checks in minblip run in **float64**, even though training runs in
# float32 (every layer switches with `.to(np.float64)`). In float32 a correct layer and
# a subtly wrong one can both show errors of $10^{-3}$; in float64 a correct one shows
# $10^{-8}$ or less. **$h = 10^{-5}$** sits at the bottom of the float64 V for a loss
# of size about 1, where truncation and rounding are both near $10^{-11}$. A smaller
# $h$ such as $10^{-6}$ buys nothing on the truncation side and makes the rounding
# term ten times larger; a larger one such as $10^{-3}$ lets truncation grow a
# hundredfold.
#
# ## 5. What a relative error means
#
# `rel_error(a, b)` is CS231n's $\max_i |a_i - b_i| / (|a_i| + |b_i|)$. An absolute
# error alone says nothing: $10^{-6}$ is excellent for a gradient of size 100 and
# a disaster for one of size $10^{-6}$. A rough guide for a float64 check of one
# layer, after the CS231n notes:
#
# | relative error | reading |
# |---|---|
# | $\gtrsim 10^{-2}$ | the gradient is almost certainly wrong |
# | $10^{-4}$ to $10^{-2}$ | suspicious; acceptable only near kinks (ReLU, max) |
# | $10^{-7}$ to $10^{-4}$ | fine for a deep stack, too high for one smooth layer |
# | $\lesssim 10^{-7}$ | good |
#
# The ratio has a blind spot: where the true gradient is zero, the analytic value is
# $\approx 10^{-17}$, the numeric one $\approx 10^{-12}$ (rounding noise), and their
# relative error is about 1 even though both are correct. A real example: the sum of a
# LayerNorm's outputs is $\sum_i \hat x_i \gamma_i + \beta_i$; with $\gamma = 1$ it
# does not depend on $x$ at all, because the normalised $\hat x_i$ always sum to zero.

# %%
ln = LayerNorm(6)
ln.to(np.float64)
x = np.random.default_rng(4).standard_normal((1, 6))
y, cache = ln.forward(x)
dx = ln.backward(np.ones_like(y), cache)  # the gradient of sum(y)
numeric = np.array([(np.sum(ln.forward(x + e)[0]) - np.sum(ln.forward(x - e)[0])) / 2e-5
                    for e in 1e-5 * np.eye(6)[:, None, :]])
with np.printoptions(precision=1, suppress=False):
    print("analytic", dx.ravel())
    print("numeric ", numeric.ravel())
print("relative error", rel_error(dx, numeric))

# %% [markdown]
# This is why minblip's checker does not assert on the ratio alone. It asserts the
# combined rule (the same one as `numpy.isclose`), coordinate by coordinate:
#
# $$|a - n| \;\le\; \text{atol} + \text{rtol}\cdot\max(|a|, |n|),
# \qquad \text{atol} = 10^{-8},\ \text{rtol} = 10^{-6}.$$
#
# For large gradients the rtol term dominates (a relative test); near zero the atol
# term takes over (an absolute test), so the LayerNorm case above passes. The `max rel
# err` column of the report is only computed where $\max(|a|, |n|) > \text{atol}$.

# %%
a, n = dx.ravel(), numeric.ravel()
holds = np.abs(a - n) <= 1e-8 + 1e-6 * np.maximum(np.abs(a), np.abs(n))
print("combined rule holds everywhere:", bool(holds.all()))

# %% [markdown]
# ## 6. `=` versus `+=`
#
# BLIP's pretraining step runs **one text encoder three times** before a single
# backward: unimodal for the contrastive loss, then image-grounded for the positive
# and for the hard-negative pairs of the matching loss. Each run's backward must *add*
# its gradient into the shared weights. Here is the tempting bug: a `Linear` whose
# backward assigns.


# %%
class AssigningLinear(Linear):
    """A broken Linear: its backward overwrites the gradient instead of adding to it."""

    def backward(self, dy, cache):
        x2, dy2 = cache.reshape(-1, self.d_in), dy.reshape(-1, self.d_out)
        self.W.grad = x2.T @ dy2  # BUG: should be +=
        self.b.grad = dy2.sum(axis=0)  # BUG: should be +=
        return dy @ self.W.data.T


def three_uses(layer, seed=5):
    """A loss that runs `layer` three times (like BLIP's text encoder), then one backward."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((2, 4)) for _ in range(3)]
    Rs = [rng.standard_normal((2, 3)) for _ in range(3)]

    def loss_fn(backward):
        outs = [layer.forward(x) for x in xs]  # three forwards ...
        loss = sum(float(np.sum(y * R)) for (y, _), R in zip(outs, Rs))
        if backward:  # ... then the backwards, in reverse order
            for (_, cache), R in reversed(list(zip(outs, Rs))):
                layer.backward(R, cache)
        return loss

    return loss_fn


bad = AssigningLinear(4, 3, np.random.default_rng(6), init_std=0.5).to(np.float64)
try:
    gradcheck(three_uses(bad), bad)
except GradcheckError as err:
    print(err)

# %% [markdown]
# The checked coordinates are off by relative errors of order 1, and the report shows
# the analytic value next to the numeric one at the worst coordinate of each row. The
# same check with minblip's `Linear`:

# %%
good = Linear(4, 3, np.random.default_rng(6), init_std=0.5).to(np.float64)
print(gradcheck(three_uses(good), good))

# %% [markdown]
# Note the trap inside the trap: with **one** use, the assigning layer passes, because
# the checker zeroes the gradients first and `=` on zero equals `+=`. A test must use
# a layer at least twice before it can catch this bug.

# %%
once = AssigningLinear(4, 3, np.random.default_rng(6), init_std=0.5)
print("one use, assigning backward:")
print(check_layer(once, np.random.default_rng(7).standard_normal((2, 4))))

# %% [markdown]
# ### The same bug in disguise: `grad[ids] += d` with repeated ids
#
# An embedding lookup `out = W[ids]` is a gather; its backward is a scatter-add into the
# rows that were read. With NumPy fancy indexing, `grad[ids] += d` is evaluated as
# `grad[ids] = grad[ids] + d`: for a row that appears several times, each write
# replaces the previous one, and only the last survives. Captions repeat tokens ("a",
# "the", `[PAD]`) all the time. `np.add.at` does the unbuffered sum.

# %%
g = np.zeros(4)
g[[1, 1, 1, 3]] += 1.0
print("grad[ids] += 1     :", g)
g = np.zeros(4)
np.add.at(g, [1, 1, 1, 3], 1.0)
print("np.add.at(grad, ..):", g)


# %%
class FancyIndexEmbedding(Embedding):
    """A broken Embedding: scatters with fancy-index += instead of np.add.at."""

    def backward(self, dout, cache):
        self.weight.grad[cache] += dout  # BUG: repeated ids keep only one contribution
        return None


ids = np.array([[5, 2, 5, 5], [2, 7, 1, 5]])  # 5 and 2 repeat
for cls in (FancyIndexEmbedding, Embedding):
    emb = cls(10, 4, np.random.default_rng(8), init_std=0.5)
    report = check_layer(emb, ids, raise_on_fail=False)
    print(f"{cls.__name__}: {'passed' if report.passed else 'FAILED'}\n{report}\n")

# %% [markdown]
# ## 7. The random-direction check
#
# Checking every coordinate of every Param costs two forward passes per coordinate,
# too many for a model. So `gradcheck` samples: per Param, the coordinate with the
# largest analytic gradient plus a few random ones. Sampling has a blind spot. Suppose
# a model-level backward **forgets a producer** — here it never calls the embedding's
# backward, so the table gets no gradient at all. The analytic gradient is zero
# everywhere, and only the few rows of the ids in the batch have a non-zero true
# gradient. Random coordinates almost always land on unused rows, where zero is the
# right answer:

# %%
rng = np.random.default_rng(9)
emb, head = Embedding(500, 8, rng, init_std=0.5), Linear(8, 3, rng, init_std=0.5)
model_params = {"emb.weight": emb.weight, "head.W": head.W, "head.b": head.b}
for p in model_params.values():
    p.astype(np.float64)
ids = np.array([[3, 14, 15, 92, 65]])
R = rng.standard_normal((1, 5, 3))


def forgetful_loss(backward):
    h, c_emb = emb.forward(ids)
    y, c_head = head.forward(h)
    if backward:
        head.backward(R, c_head)  # BUG: dh is dropped, emb.backward is never called
    return float(np.sum(y * R))


print(gradcheck(forgetful_loss, model_params, directional=False))

# %% [markdown]
# Every sampled coordinate agrees, and the broken model would pass. The random-direction
# check closes the gap. Pick one random unit direction $d$ over **all** Params at once
# and compare the directional derivative two ways:
#
# $$\frac{L(\theta + h d) - L(\theta - h d)}{2h} \quad\text{vs}\quad
# \sum_{\text{Params}} \langle \nabla_\theta L,\ d\rangle .$$
#
# It costs two forwards, whatever the model's size, and $d$ touches every coordinate,
# so a missing piece of gradient anywhere changes the left side but not the right one
# (unless $d$ happens to be orthogonal to it, which has probability zero). It is on by
# default:

# %%
try:
    gradcheck(forgetful_loss, model_params)
except GradcheckError as err:
    print(err)

# %% [markdown]
# ## Summary
#
# * A backward is the forward read bottom up: each line turns $\bar y$ into $\bar x$
#   (same shapes as $y$ and $x$) by multiplying with the transposed Jacobian, never built.
# * Linear: $\bar W = X^\top \bar Y$, $\bar b = \sum_n \bar Y_n$, $\bar X = \bar Y W^\top$,
#   leading axes folded into $N$.
# * Softmax cross-entropy: $\bar z = (p\sum_k t_k - t)/N$, i.e. $(p - t)/N$ for one-hot or
#   smoothed targets, zero on ignored rows, $N$ counting the kept rows.
# * Central differences have a truncation error $\propto h^2$ and a rounding error
#   $\propto u/h$. float32 bottoms out near $10^{-4}$, float64 near $10^{-10}$; minblip
#   checks in float64 with $h = 10^{-5}$, the bottom of the float64 V.
# * Read relative errors on the CS231n scale ($\lesssim 10^{-7}$ good, $\gtrsim 10^{-2}$ a
#   bug); assert with atol + rtol so exact zeros do not cause false alarms.
# * `+=`, never `=`, into `Param.grad`; `np.add.at`, never `grad[ids] +=`; and test a
#   layer used at least twice.
# * Sampled coordinates can miss a Param that got no gradient; one random direction over
#   all Params catches it for the price of two forwards.
#
# ## Exercises
#
# 1. **LayerNorm backward.** Derive $\bar x$ for $\hat x = (x - \mu)/\sigma$ over the last
#    axis, remembering that $\mu$ and $\sigma$ depend on every element of the row. Show it
#    equals $\frac{1}{\sigma}\big(\bar{\hat x} - \mathrm{mean}(\bar{\hat x})
#    - \hat x\,\mathrm{mean}(\bar{\hat x}\odot\hat x)\big)$, then compare with
#    `LayerNorm.backward` and confirm with `check_layer(LayerNorm(8), x)` (set `gamma`
#    and `beta` to random values first).
# 2. **Make gradcheck fail on purpose.** Write a Linear subclass whose backward forgets
#    the bias, and one whose backward returns `dy @ W` instead of `dy @ W.T` (use a square
#    W — why would a non-square one not get as far as the check?). Which rows of the
#    report fail, and by how much?
# 3. **GELU, tanh form.** Derive the derivative of
#    $0.5\,x\,(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715 x^3)))$ and check
#    `GELU("tanh")` with `check_layer`. Then run the check with inputs in float32 (write the
#    central difference yourself, as in section 4): what error do you get, and which side
#    of the V are you on for $h = 10^{-5}$?
# 4. **The size of the loss.** Re-run the float64 sweep of section 4 with a constant
#    $10^4$ added to the loss (the gradient does not change). Where does the bottom of
#    the V move, and why does only the rounding side of the V rise?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 1.1,1.2,1.3` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names. The graded files are those of `minblip/`.
#
# ### Exercise 1.1 · Softmax cross-entropy backward
#
# **Goal.** Write `CrossEntropyLoss.backward` in `minblip/softmax.py`.
#
# **Hints.** Section 3 derives $\bar z = \bar L\,(p \sum_k t_k - t)/N$. The cache holds
# `logp`, so $p$ is `np.exp(logp)`; `dist` is the target distribution $t$ per row,
# already smoothed and all zero on an ignored row, and `scale` is $1/N$ with $N$ the
# number of kept rows. Do not forget the upstream gradient `dloss`, and give the result
# the logits' original shape.

# %% nbgrader={"grade": true, "grade_id": "ex1_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(20)
z = rng.standard_normal((2, 3, 6))
print(check_layer(CrossEntropyLoss(label_smoothing=0.1), z, np.array([[1, 4, -100], [0, 5, 5]])))
soft = 0.8 * softmax(rng.standard_normal((4, 6)))  # soft targets whose rows sum to 0.8
print(check_layer(CrossEntropyLoss(), rng.standard_normal((4, 6)), soft, wrt=[0]))

# %% [markdown]
# ### Exercise 1.2 · LayerNorm backward
#
# **Goal.** Write `LayerNorm.backward` in `minblip/layers.py`.
#
# **Hints.** The forward caches $\hat x$ and $r = 1/\sqrt{\mathrm{var} + \epsilon}$ (shape
# `(..., 1)`). Undo $y = \hat x\gamma + \beta$ first: $\bar\gamma$ and $\bar\beta$ sum over
# every leading axis, and go into `gamma.grad` and `beta.grad` with `+=`. Then undo
# $\hat x = (x - \mu)\,r$, where $\mu$ and $r$ depend on the whole row: open exercise 1 of
# the list above for the formula. The check uses the layer twice before reading the
# gradient (section 6), so `=` instead of `+=` fails.

# %% nbgrader={"grade": true, "grade_id": "ex1_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(21)
ln = LayerNorm(8).to(np.float64)
ln.gamma.data[...] = 1.0 + 0.5 * rng.standard_normal(8)
ln.beta.data[...] = rng.standard_normal(8)
print(check_layer(ln, rng.standard_normal((2, 3, 8))))
xs = [rng.standard_normal((2, 8)), rng.standard_normal((3, 8))]
Rs = [rng.standard_normal((2, 8)), rng.standard_normal((3, 8))]


def ln_twice(backward):
    outs = [ln.forward(x) for x in xs]
    if backward:
        for (_, cache), R in zip(outs, Rs):
            ln.backward(R, cache)
    return sum(float(np.sum(y * R)) for (y, _), R in zip(outs, Rs))


print(gradcheck(ln_twice, ln))

# %% [markdown]
# ### Exercise 1.3 · Softmax backward as a Jacobian-vector product
#
# **Goal.** Write `Softmax.backward` in `minblip/softmax.py`: its cache is
# $p = \mathrm{softmax}(x)$ along the layer's `axis`, and given $\bar p$ (the same shape)
# it returns $\bar x$.
#
# **Hints.** $\partial p_i / \partial x_j = p_i(\delta_{ij} - p_j)$, so the Jacobian is
# $\mathrm{diag}(p) - p p^\top$ (symmetric). Multiply $\bar p$ by it without building it:
# one elementwise product, one sum over `self.axis` with `keepdims=True`, one more
# product. It is one line. The hidden check uses an axis other than the last.

# %% nbgrader={"grade": true, "grade_id": "ex1_3_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.softmax import Softmax  # noqa: E402

rng = np.random.default_rng(22)
print(check_layer(Softmax(), rng.standard_normal((3, 5))))
### BEGIN HIDDEN TESTS
assert check_layer(Softmax(axis=0), rng.standard_normal((4, 3)), seed=23).passed
### END HIDDEN TESTS
