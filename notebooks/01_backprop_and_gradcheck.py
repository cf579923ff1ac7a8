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
# what the text below and the summary say about these curves
best32, best64 = errors[np.float32].min(), errors[np.float64].min()
assert 1e-5 <= best32 < 1e-4 and 3e-3 < hs[np.argmin(errors[np.float32])] < 3e-2
assert 1e-11 <= best64 < 1e-10 and errors[np.float64][np.argmin(np.abs(hs - 1e-5))] < 1e-10
assert errors[np.float32][np.argmin(np.abs(hs - 1e-8))] == 1.0  # x + h rounds back to x

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
# ## 8. The transformer's own pieces: LayerNorm, GELU, dropout
#
# Every transformer block of the later notebooks is `Linear`, attention (notebook 02)
# and three more layers. Here are their backwards, each derived and then checked
# numerically right away.
#
# ### LayerNorm
#
# Over the last axis of width $D$, for one row $x$:
#
# $$\mu = \tfrac1D\textstyle\sum_j x_j,\quad \sigma^2 = \tfrac1D\sum_j (x_j-\mu)^2,\quad
# r = (\sigma^2+\epsilon)^{-1/2},\quad \hat x = (x - \mu)\,r,\quad y = \gamma\odot\hat x + \beta .$$
#
# The last line is elementwise with parameters broadcast over the rows, like the bias
# of `Linear`: $\bar\beta = \sum_{\text{rows}} \bar y$, $\bar\gamma = \sum_{\text{rows}}
# \bar y \odot \hat x$, and $\bar{\hat x} = \bar y \odot \gamma$. The interesting step is
# $\hat x(x)$, because $\mu$ and $r$ depend on the whole row. With
# $\partial\mu/\partial x_j = 1/D$ and
# $\partial r/\partial x_j = -\tfrac12 r^3 \cdot \tfrac2D (x_j - \mu) = -r^3 (x_j-\mu)/D$
# (the term from $\partial\mu/\partial x_j$ inside $\sigma^2$ sums to zero, since
# $\sum_k (x_k-\mu) = 0$):
#
# $$\frac{\partial \hat x_i}{\partial x_j}
# = r\Big(\delta_{ij} - \tfrac1D\Big) - (x_i-\mu)\,\frac{r^3 (x_j-\mu)}{D}
# = r\Big(\delta_{ij} - \tfrac1D - \tfrac{\hat x_i \hat x_j}{D}\Big),
# \qquad J = r\Big(I - \tfrac1D \mathbf 1\mathbf 1^\top - \tfrac1D \hat x\hat x^\top\Big).$$
#
# $J$ is symmetric, so $\bar x = J\,\bar{\hat x}$. Two facts can be read off it: $J\mathbf 1
# = 0$ (adding a constant to a row changes nothing: the mean absorbs it) and $J\hat x = 0$
# when $\epsilon = 0$ (scaling a row changes nothing: the variance absorbs it; $\hat x^\top
# \hat x = D$). The first is the zero gradient of section 5. Let us compare this $J$ with
# a Jacobian measured by central differences of `LayerNorm.forward`:

# %%
D_ln = 6
ln = LayerNorm(D_ln, eps=0.0).to(np.float64)  # gamma = 1, beta = 0: y is x-hat; eps 0: J xhat = 0
x_row = np.random.default_rng(10).standard_normal(D_ln) * 2.0 + 1.0
xhat, (_, r) = ln.forward(x_row)
J_formula = r * (np.eye(D_ln) - 1.0 / D_ln - np.outer(xhat, xhat) / D_ln)
J_numeric = np.stack([(ln.forward(x_row + e)[0] - ln.forward(x_row - e)[0]) / 2e-5
                      for e in 1e-5 * np.eye(D_ln)], axis=1)  # column j: d xhat / d x_j
ln_jacobian_error = np.abs(J_formula - J_numeric).max()
print("max |J_formula - J_numeric| =", f"{ln_jacobian_error:.1e}")
print("symmetric:", np.allclose(J_formula, J_formula.T),
      "  |J 1| =", f"{np.abs(J_formula @ np.ones(D_ln)).max():.0e}",
      "  |J xhat| =", f"{np.abs(J_formula @ xhat).max():.0e}")
assert ln_jacobian_error < 1e-9

# %% [markdown]
# The formula agrees with the measured Jacobian to the rounding of the differences.
# Building $J$ costs $D^2$ numbers per row (BLIP-2's $D = 2560$ OPT rows would each need
# 6.5 million); multiplying by it does not. Expanding $J\bar{\hat x}$ gives three terms,
#
# $$\bar x = r\Big(\bar{\hat x} - \mathrm{mean}(\bar{\hat x})
# - \hat x\,\mathrm{mean}(\bar{\hat x}\odot\hat x)\Big),$$
#
# a mean and a weighted mean per row: turning that into code, with the broadcast
# parameters, is **exercise 1.2** below.
#
# ### GELU, exact and tanh
#
# $\mathrm{GELU}(x) = x\,\Phi(x)$ with $\Phi$ the standard normal CDF and $\varphi$ its
# density. The product rule gives
#
# $$\frac{d}{dx}\,x\Phi(x) = \Phi(x) + x\,\varphi(x),\qquad
# \varphi(x) = \tfrac{1}{\sqrt{2\pi}}e^{-x^2/2}.$$
#
# The tanh approximation (`GELU("tanh")`, GPT-2's) is
# $g(x) = \tfrac12 x\,(1 + \tanh u)$ with $u = \sqrt{2/\pi}\,(x + 0.044715\,x^3)$; with
# $\tanh' = 1 - \tanh^2$,
#
# $$g'(x) = \tfrac12(1 + \tanh u) + \tfrac12\,x\,(1 - \tanh^2 u)\,
# \sqrt{2/\pi}\,(1 + 3\cdot 0.044715\,x^2).$$
#
# Both are elementwise, so $\bar x = \bar y \odot \mathrm{GELU}'(x)$: no sum, no shape
# change. Checked on a grid against central differences of the forward, and against
# `GELU.backward`:

# %%
grid = np.linspace(-6, 6, 241)
h_g = 1e-5
for form in ("none", "tanh"):
    gelu = GELU(form)
    if form == "none":
        from minblip.layers import erf  # noqa: E402 - the package's float64 erf
        derived = 0.5 * (1 + erf(grid / np.sqrt(2))) + grid * np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi)
    else:
        u = np.sqrt(2 / np.pi) * (grid + 0.044715 * grid**3)
        derived = (0.5 * (1 + np.tanh(u)) + 0.5 * grid * (1 - np.tanh(u) ** 2)
                   * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * grid**2))
    numeric = (gelu.forward(grid + h_g)[0] - gelu.forward(grid - h_g)[0]) / (2 * h_g)
    package = gelu.backward(np.ones_like(grid), gelu.forward(grid)[1])
    print(f"GELU({form!r}): max |derived - numeric| = {np.abs(derived - numeric).max():.1e}, "
          f"max |derived - GELU.backward| = {np.abs(derived - package).max():.1e}")
    assert np.abs(derived - numeric).max() < 1e-9 and np.abs(derived - package).max() < 1e-12
exact, approx = GELU().forward(grid)[0], GELU("tanh").forward(grid)[0]
d_exact = GELU().backward(np.ones_like(grid), GELU().forward(grid)[1])
d_approx = GELU("tanh").backward(np.ones_like(grid), GELU("tanh").forward(grid)[1])
gelu_gap, dgelu_gap = np.abs(exact - approx).max(), np.abs(d_exact - d_approx).max()
print(f"the two forms differ by at most {gelu_gap:.1e} in value and {dgelu_gap:.1e} in slope")
lo, hi = np.argmin(d_exact), np.argmax(d_exact)
print(f"exact slope: minimum {d_exact[lo]:.3f} at x = {grid[lo]:.2f}, "
      f"maximum {d_exact[hi]:.3f} at x = {grid[hi]:.2f}")
assert d_exact[lo] < 0 and grid[lo] < 0 and d_exact[hi] > 1 and grid[hi] > 0

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(grid, exact, label=r"exact $x\Phi(x)$")
axes[0].plot(grid, approx, "--", label="tanh form")
axes[1].plot(grid, d_exact, label=r"$\Phi(x) + x\varphi(x)$")
axes[1].plot(grid, d_approx, "--", label="tanh form")
axes[0].set_title("GELU")
axes[1].set_title("its derivative (the backward's factor)")
for ax in axes:
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_xlabel("x")
plt.tight_layout()
plt.show()

# %% [markdown]
# Unlike ReLU's 0/1, the derivative dips below zero for some negative inputs and rises
# above one for some positive ones (the printed extremes). The two forms are close, but
# not equal (the printed gaps): a checkpoint trained with one should be run with the same one, which
# is why the fidelity notebook (12) matters. BERT, BLIP's ViT and minblip use the exact
# form; minblip's `erf` makes it exact to float64 rounding.
#
# ### Dropout
#
# In training, inverted dropout keeps each element with probability $1-p$ and scales
# the survivors: $y = x \odot m / (1-p)$ with $m_i \sim \mathrm{Bernoulli}(1-p)$, so
# $\mathbb E[y] = x$ and evaluation (no dropout) needs no rescaling. For a *fixed* mask
# it is elementwise and linear:
#
# $$\bar x = \bar y \odot m / (1-p),$$
#
# the same mask as the forward, which is why the mask is the cache. That has a
# consequence for gradient checking: central differences compare $L(x+h)$ with
# $L(x-h)$, and if each forward draws a new mask, the two losses are of two different
# functions. minblip passes the random generator in explicitly (the core contract), so a
# check can hand every forward a generator with the same seed, and the same mask:

# %%
from minblip import Module  # noqa: E402
from minblip.layers import Dropout  # noqa: E402


class DropoutWithSeed(Module):
    """Dropout whose every forward draws its mask from a generator of one fixed seed
    (or from one shared generator, a new mask each time, with fresh=True)."""

    def __init__(self, p, fresh=False):
        self.drop, self.fresh, self.rng = Dropout(p), fresh, np.random.default_rng(11)

    def forward(self, x):
        rng = self.rng if self.fresh else np.random.default_rng(11)
        return self.drop.forward(x, rng)

    def backward(self, dy, cache):
        return self.drop.backward(dy, cache)


x_d = np.random.default_rng(12).standard_normal((3, 8))
y_d, mask = DropoutWithSeed(0.25).forward(x_d)
print("kept:", int((mask > 0).sum()), "of", mask.size, "; survivors scaled by",
      np.unique(mask[mask > 0]), "= 1 / (1 - p)")
print("same mask every forward:", "passed" if check_layer(DropoutWithSeed(0.25), x_d).passed
      else "FAILED")
fresh = check_layer(DropoutWithSeed(0.25, fresh=True), x_d, raise_on_fail=False)
print("a new mask every forward:", "passed" if fresh.passed else "FAILED")
assert not fresh.passed
means = np.mean([Dropout(0.25).forward(x_d, np.random.default_rng(s))[0] for s in range(2000)],
                axis=0)
print(f"mean of 2000 dropped-out copies vs x: max difference {np.abs(means - x_d).max():.3f}")

# %% [markdown]
# With a fresh mask per forward the "numeric gradient" is noise and the check fails even
# though the backward is right: in a gradient check, randomness must be held fixed.
# The exercise checks of later notebooks (attention dropout, the post-norm block of
# notebook 04) do exactly this. The average of many masked copies is $x$ itself, up
# to sampling noise: inverted dropout leaves the expected activation unchanged.
#
# The residual connection and the post-norm block that combine these pieces are
# derived in notebook 04, where BLIP's BERT layer is built.

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
#   $\propto u/h$. Measured in section 4, float32 bottoms out at a few $10^{-5}$ and
#   float64 at a few $10^{-11}$; minblip checks in float64 with $h = 10^{-5}$, the bottom of
#   the float64 V.
# * Read relative errors on the CS231n scale ($\lesssim 10^{-7}$ good, $\gtrsim 10^{-2}$ a
#   bug); assert with atol + rtol so exact zeros do not cause false alarms.
# * `+=`, never `=`, into `Param.grad`; `np.add.at`, never `grad[ids] +=`; and test a
#   layer used at least twice.
# * Sampled coordinates can miss a Param that got no gradient; one random direction over
#   all Params catches it for the price of two forwards.
# * LayerNorm's Jacobian is $r(I - \mathbf 1\mathbf 1^\top/D - \hat x\hat x^\top/D)$ per row,
#   applied without being built; GELU's derivative is $\Phi(x) + x\varphi(x)$ (tanh form:
#   section 8); dropout's backward multiplies by the forward's own mask, so a gradient
#   check must hold the random generator fixed.
#
# ## Exercises
#
# 1. **RMSNorm.** LLaMA-style models replace LayerNorm by $y = \gamma \odot x / \rho$ with
#    $\rho = \sqrt{\mathrm{mean}(x^2) + \epsilon}$ (no mean subtracted, no $\beta$). Derive
#    its Jacobian the way section 8 derives LayerNorm's, write it as a `Module`, and check
#    it with `check_layer`. Which of LayerNorm's two invariances does it keep?
# 2. **Make gradcheck fail on purpose.** Write a Linear subclass whose backward forgets
#    the bias, and one whose backward returns `dy @ W` instead of `dy @ W.T` (use a square
#    W — why would a non-square one not get as far as the check?). Which rows of the
#    report fail, and by how much?
# 3. **GELU in float32.** Section 8 checks both GELU derivatives in float64. Run the same
#    comparison with float32 inputs (write the central difference yourself, as in
#    section 4): what error do you get for $h = 10^{-5}$, and which side of the V are you on?
#    Which $h$ would you choose for float32?
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
# $\hat x = (x - \mu)\,r$, where $\mu$ and $r$ depend on the whole row: section 8 derives
# its Jacobian and the three-term product; compute it for every row at once, with
# `keepdims` means over the last axis. The check uses the layer twice before reading the
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
