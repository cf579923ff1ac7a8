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
# # 03 · The ViT image encoder: patches, [CLS] and position embeddings
#
# **Goal.** BLIP sees an image through a Vision Transformer (ViT). Before any attention
# happens, the ViT turns a photograph into a sequence of tokens. In this notebook we do
# that step by step on a real photograph:
#
# 1. preprocess the photo exactly as BLIP does at test time;
# 2. cut it into a grid of patches and check that "reshape + one matmul" *is* the
#    strided convolution BLIP's code uses;
# 3. add the [CLS] token and the position embeddings, and see why the model is blind to
#    patch order without them;
# 4. derive the backward of the patch embedding and gradient-check the whole ViT;
# 5. look at the position embeddings' similarity map — honestly.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import copy
import inspect
import time
import timeit

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cbook
from PIL import Image

from minblip.gradcheck import check_layer
from minblip.image import CLIP_MEAN, CLIP_STD, denormalize, preprocess
from minblip.vit import (PatchEmbed, ViTConfig, VisionTransformer, conv2d_patchify_reference,
                         patchify, unpatchify)

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The paper's idea
#
# Dosovitskiy et al. (2021), *An Image is Worth 16x16 Words*: cut an image
# $x \in \mathbb R^{C \times H \times W}$ into $N = HW/p^2$ non-overlapping $p \times p$
# patches, flatten each into a vector $x_p^i \in \mathbb R^{Cp^2}$, and map it to width $D$
# with one shared matrix $E \in \mathbb R^{Cp^2 \times D}$. Prepend a learned
# $x_\text{class}$ and add learned position embeddings:
#
# $$z_0 = \big[\,x_\text{class};\; x_p^1 E;\; x_p^2 E;\; \dots;\; x_p^N E\,\big] + E_\text{pos},
# \qquad E_\text{pos} \in \mathbb R^{(N+1) \times D}.$$
#
# Then $z_0$ goes through pre-norm transformer blocks and a final LayerNorm. BLIP uses
# ViT-B/16 (salesforce/BLIP `models/vit.py`, `VisionTransformer`): $p = 16$, $D = 768$,
# 224-pixel images during pre-training, so $N = 14 \times 14 = 196$ patches plus [CLS] =
# 197 tokens (577 at 384 pixels when fine-tuning). All 197 output tokens are the
# `image_embeds` that BLIP's text transformer cross-attends to; row 0, the [CLS] token,
# is what the image–text contrastive loss projects and compares with the text.
#
# ## 2. A photograph, preprocessed the BLIP way
#
# The photo is the portrait of the computer scientist and U.S. Navy officer Grace Hopper
# that ships with matplotlib as sample data. It is an official U.S. Navy photograph
# (1984), a work of the U.S. federal government and so in the public domain. The
# repository keeps a copy in `data_samples/photos/`; if that folder is missing we read
# matplotlib's copy, the same file.

# %%
def find_photo(name="grace_hopper.jpg"):
    for folder in (Path("data_samples/photos"), Path("../data_samples/photos")):
        if (folder / name).is_file():
            return folder / name, f"data_samples/photos/{name}"
    return Path(cbook.get_sample_data(name, asfileobj=False)), "matplotlib's sample data"


photo_path, source = find_photo()
photo = Image.open(photo_path)
print(f"read from {source}: {photo.size[0]}x{photo.size[1]} pixels (width x height), "
      f"mode {photo.mode}")

# %% [markdown]
# BLIP's evaluation transform is `Resize((s, s), interpolation=BICUBIC)`, `ToTensor()`,
# `Normalize(mean, std)` with CLIP's per-channel statistics. `preprocess` does the same
# with pillow. Note that the resize **ignores the aspect ratio**: this 512x600 portrait is
# squashed by 15% vertically, as BLIP squashes every test image. We use 96x96 pixels and
# 16x16 patches, a 6x6 grid.

# %%
S, P = 96, 16
x = preprocess(photo_path, S)  # (1, 3, 96, 96) float32
print("images", x.shape, x.dtype)
print("per-channel mean after normalisation", x.mean(axis=(0, 2, 3)))
print("CLIP mean", CLIP_MEAN, " CLIP std", CLIP_STD)

# %% [markdown]
# ## 3. Cutting the image into patches
#
# `patchify` is three lines of pure rearrangement. Split each spatial axis into
# (grid position, position inside the patch), move the two grid axes to the front, and
# flatten:
#
# | step | shape |
# |---|---|
# | images | `(B, C, H, W)` = `(1, 3, 96, 96)` |
# | `reshape(B, C, gh, p, gw, p)` | `(1, 3, 6, 16, 6, 16)` |
# | `transpose(0, 2, 4, 1, 3, 5)` | `(1, 6, 6, 3, 16, 16)` = (B, row, col, c, kh, kw) |
# | `reshape(B, gh*gw, C*p*p)` | `(1, 36, 768)` |
#
# The patch index is `row * 6 + col` (row-major), and inside a patch the 768 numbers are
# in (c, kh, kw) order. Both choices are forced on us if we want to load BLIP's
# weights: they are the order of timm's `flatten(2).transpose(1, 2)` over the conv
# output and the layout of a PyTorch conv weight `(D, C, kh, kw)`. (That a 16x16 RGB
# patch has 768 numbers, the same as ViT-B's width, is a coincidence.)

# %%
print(inspect.getsource(patchify))
patches = patchify(x, P)
print("patches", patches.shape)
print("unpatchify(patchify(x)) == x exactly:", np.array_equal(unpatchify(patches, P, S, S), x))

# %%
pixels = denormalize(x)[0]  # (96, 96, 3) uint8
grid = S // P
fig = plt.figure(figsize=(10, 4.6))
ax = fig.add_axes([0.02, 0.05, 0.42, 0.88])
ax.imshow(pixels)
for k in range(1, grid):
    ax.axhline(k * P - 0.5, color="w", lw=1)
    ax.axvline(k * P - 0.5, color="w", lw=1)
for n in range(grid * grid):
    r, c = divmod(n, grid)
    ax.text(c * P + 2, r * P + 5, str(n), color="yellow", fontsize=8, weight="bold")
ax.set_title("96x96 input, 6x6 grid of 16x16 patches")
ax.axis("off")
# each row of the patch matrix, shown as a 16x16 picture again, spread apart
for n in range(grid * grid):
    r, c = divmod(n, grid)
    sub = fig.add_axes([0.52 + c * 0.078, 0.80 - r * 0.15, 0.07, 0.13])
    one = patches[0, n].reshape(1, 3, P, P)  # (768,) in (c, kh, kw) order -> (1, 3, 16, 16)
    sub.imshow(denormalize(one)[0])
    sub.set_xticks([])
    sub.set_yticks([])
    sub.set_title(str(n), fontsize=7, pad=1)
fig.text(0.73, 0.96, "rows 0..35 of patchify(x)", ha="center", fontsize=11)
plt.show()

# %% [markdown]
# ## 4. Reshape + matmul *is* the convolution
#
# BLIP's ViT (via timm's `PatchEmbed`) computes the patch embeddings with
# `nn.Conv2d(3, D, kernel_size=16, stride=16)`. By definition a convolution computes
#
# $$\text{out}[b, d, i, j] = \sum_{c,u,v} x[b, c, ip + u, jp + v]\; w[d, c, u, v] + \beta_d .$$
#
# With stride equal to the kernel size the windows tile the image without overlapping:
# output position $(i, j)$ sees exactly patch $n = i \cdot g + j$, and the sum over
# $(c, u, v)$ is a dot product of that patch (flattened in $(c, u, v)$ order) with filter
# $d$ (flattened the same way). All outputs at once are therefore one matrix product
#
# $$Y = \text{patchify}(x)\, W + \beta, \qquad W = w.\text{reshape}(D, -1)^\top
# \quad (N, Cp^2)\,(Cp^2, D) \to (N, D).$$
#
# `conv2d_patchify_reference` is that definition written as loops, one output element at
# a time. Load the same random filters into both and compare.

# %%
rng = np.random.default_rng(0)
D = 64
conv_w = rng.standard_normal((D, 3, P, P)) * 0.05  # PyTorch layout (out, in, kh, kw)
conv_b = rng.standard_normal(D) * 0.05
x64 = x.astype(np.float64)

embed = PatchEmbed(S, P, 3, D, rng).to(np.float64)
embed.load_conv_weights(conv_w, conv_b)  # W = conv_w.reshape(D, -1).T

fast, _ = embed.forward(x64)  # (1, 36, 64)
conv = conv2d_patchify_reference(x64, conv_w, conv_b)  # (1, 64, 6, 6), a Conv2d output
slow = conv.reshape(1, D, -1).transpose(0, 2, 1)  # timm: flatten(2).transpose(1, 2)
print("reshape + matmul", fast.shape)
print("loop convolution", conv.shape, "->", slow.shape)
print("max |difference|", np.abs(fast - slow).max())

cpu = {}  # CPU seconds per call, best of 5 (CPU time: less disturbed by other jobs)
for name, run, number in (("reshape + matmul", lambda: embed.forward(x64), 20),
                          ("loop convolution",
                           lambda: conv2d_patchify_reference(x64, conv_w, conv_b), 2)):
    cpu[name] = min(timeit.Timer(run, timer=time.process_time).repeat(5, number)) / number
    print(f"{name}: {cpu[name] * 1e3:8.3f} ms of CPU per call (best of 5)")
print(f"the loop takes {cpu['loop convolution'] / cpu['reshape + matmul']:.0f} times as long")

# %% [markdown]
# They agree to the last few bits of float64 (the sums are only added in a different
# order), and one matmul is much faster than a Python loop over the 2,304 outputs (the
# ratio printed above; it depends on the machine). A
# convolution with stride *smaller* than the kernel would not be this simple: the windows
# overlap, so a pixel belongs to several patches, and the "patch matrix" has to copy it
# several times (im2col) — exercise 1.
#
# ## 5. The [CLS] token and the position embeddings
#
# Now the whole ViT, a toy one: width 64, 2 blocks, 4 heads.

# %%
cfg = ViTConfig(image_size=S, patch_size=P, width=64, depth=2, heads=4, mlp_dim=256)
vit = VisionTransformer(cfg, np.random.default_rng(1))
print(cfg)
print("num_patches", cfg.num_patches, "-> tokens", 1 + cfg.num_patches)
for name, p in vit.named_params()[:4]:
    print(f"{name:<20} {p.shape}")
print("... and", len(vit.params()) - 4, "more Params in the blocks and the final LayerNorm;",
      vit.param_count(), "numbers in all")

image_embeds, _ = vit.forward(x)
print("image_embeds", image_embeds.shape, image_embeds.dtype)

# %% [markdown]
# The forward, in BLIP's order (`VisionTransformer.forward`): patch embeddings, then
# the [CLS] vector — one learned `(1, 1, D)` Param, the same for every image — is
# broadcast over the batch and concatenated in front, then the `(1, 1+N, D)` position
# table is added, again the same for every image. Both start as normal(0, 0.02) draws:
# BLIP calls timm's `trunc_normal_(std=.02)`, whose cut-offs $\pm 2$ are absolute
# values, i.e. 100 standard deviations, so the truncation never happens in practice.

# %%
print(inspect.getsource(VisionTransformer.forward))

# %% [markdown]
# **Why position embeddings?** Attention treats its input as a *set*: permute the tokens
# and every output is permuted the same way, nothing else changes. The patch embedding
# only sees one patch at a time. So without $E_\text{pos}$ the ViT cannot tell a
# photograph from the same photograph with its patches shuffled, and the [CLS] output —
# which BLIP uses as *the* image feature — would not change at all. Let's check in
# float64, with a copy of the ViT whose position table is zeroed.

# %%
vit64 = copy.deepcopy(vit).to(np.float64)
no_pos = copy.deepcopy(vit64)
no_pos.pos_embed.data[...] = 0.0

perm = np.random.default_rng(2).permutation(cfg.num_patches)
shuffled = unpatchify(patchify(x64, P)[:, perm], P, S, S)  # the same 36 patches, reordered

for name, model in (("without position embeddings", no_pos), ("with position embeddings", vit64)):
    a, _ = model.forward(x64)
    b, _ = model.forward(shuffled)
    print(f"{name}:")
    print(f"   [CLS] output changes by        {np.abs(a[0, 0] - b[0, 0]).max():.2e}")
    print(f"   patch outputs == permuted ones: {np.allclose(a[0, 1:][perm], b[0, 1:], atol=1e-12)}")

# %% [markdown]
# Without the table the [CLS] output is unchanged up to rounding and the patch outputs
# are just permuted; with it, the model sees that something moved.
#
# ## 6. The backward of the patch embedding
#
# Write $X$ for the images `(B, C, H, W)`, $P = \text{patchify}(X)$ `(B, N, K)` with
# $K = Cp^2$, and $Y = PW + b$ `(B, N, D)`. Reading the forward from the bottom up:
#
# **The Linear.** As in notebook 01, folding $(B, N)$ into one axis:
#
# $$\bar W = \sum_{b,n} P_{bn}^\top \bar Y_{bn} \quad (K, D), \qquad
# \bar b = \sum_{b,n} \bar Y_{bn} \quad (D,), \qquad
# \bar P = \bar Y W^\top \quad (B, N, D)(D, K) \to (B, N, K).$$
#
# **patchify.** Every entry of $P$ is a copy of exactly one pixel,
# $P[b, n, k] = X[b, \pi(n, k)]$, and every pixel is copied exactly once, because the
# patches tile the image. So $\partial L / \partial X[b, \pi(n,k)] = \bar P[b, n, k]$: the
# gradient of each pixel is sent back to where the pixel came from,
#
# $$\bar X = \text{unpatchify}(\bar P).$$
#
# In matrix language patchify is a permutation $\Pi$, and the adjoint of a permutation
# is its inverse, $\Pi^\top = \Pi^{-1}$. (With overlapping windows a pixel would have
# several copies and its gradient would be the **sum** over them — a scatter-add.)
#
# **The ViT around it.** $z_0 = \text{concat}(\text{broadcast}(c), Y) + E_\text{pos}$. The
# concat's backward splits $\bar z_0$ into row 0 and rows $1..N$; a broadcast's backward
# sums over the axis it broadcast along, here the batch:
#
# $$\bar E_\text{pos} = \sum_b \bar z_0[b] \quad (1, 1{+}N, D), \qquad
# \bar c = \sum_b \bar z_0[b, 0] \quad (1, 1, D), \qquad \bar Y = \bar z_0[:, 1:].$$

# %%
print(inspect.getsource(PatchEmbed.backward))
print(inspect.getsource(VisionTransformer.backward))

# %% [markdown]
# ## 7. Gradient checks
#
# First the patch embedding alone, on the photo in float64: the images, $W$ and $b$, a few
# coordinates each, plus one random direction through all of them.

# %%
print(check_layer(PatchEmbed(S, P, 3, 16, np.random.default_rng(3)), x64))

# %% [markdown]
# Then the whole ViT on the photo. As in notebook 01, we initialise with std 0.3 instead
# of 0.02 so no gradient is tiny, and the loss is $\sum \text{out} \odot R$ for a fixed
# random $R$. Every Param is sampled (the one coordinate with the largest gradient and a
# few random ones), and so are the pixels.

# %%
check_cfg = ViTConfig(image_size=S, patch_size=P, width=32, depth=2, heads=4, mlp_dim=64,
                      init_std=0.3)
report = check_layer(VisionTransformer(check_cfg, np.random.default_rng(4)), x64)
print(report)
print(f"\nworst relative error over {len(report.rows)} rows: {report.max_rel_err:.1e}")

# %% [markdown]
# (The key bias shows a gradient of exactly zero: adding the same vector to every key
# adds the same number to every score of a query, and softmax ignores that.)
#
# ## 8. What do the position embeddings look like?
#
# A common picture (the ViT paper's Figure 7) shows, for each patch, the cosine
# similarity of its position embedding with those of all other patches. Here it is for
# our ViT's table, 36 small 6x6 maps, one per patch, laid out on the 6x6 grid.
#
# Our ViT is **untrained**, so its table is random noise, and that is what the map
# shows: each patch is similar to itself, and to everything else only by chance
# (cosines around $\pm 1/\sqrt{64} \approx 0.13$). For contrast, the right panel shows a
# *fixed* 2-D sine–cosine table: half the channels encode the row and half the column
# (the split of the ViT paper's "2-D" variant in its appendix D.4, which learns the two
# halves), as sines and cosines of geometrically spaced frequencies (the fixed table
# MAE uses). There, patches in the
# same row or column, and nearby patches, are similar by construction. The ViT paper
# reports that *learned* embeddings develop the same row/column structure during
# training. The small trained BLIP that notebook 00 loads has a trained table, on its
# 4x4 grid of patches; exercise 4 draws its map.
#
# Mind the colour scales. The random table's cosines spread around 0; the sine–cosine
# table's only range from its printed minimum (below) to 1, because with the usual base of
# 10000 most of its 16 frequencies per axis barely change over 6 positions. Its structure
# is there, but compressed near 1.

# %%
def sincos_2d(grid, dim, base=10000.0):
    """Fixed 2-D position table (grid*grid, dim): dim/2 channels for the row,
    dim/2 for the column, each half [sin(pos * w_k), cos(pos * w_k)]."""
    quarter = dim // 4
    omega = 1.0 / base ** (np.arange(quarter) / quarter)  # (dim/4,) frequencies
    rows, cols = np.divmod(np.arange(grid * grid), grid)  # row-major, like the patches

    def encode(pos):
        angle = pos[:, None] * omega[None, :]  # (N, dim/4)
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)  # (N, dim/2)

    return np.concatenate([encode(rows), encode(cols)], axis=1)  # (N, dim)


def cosine_mosaic(table, grid):
    """table (grid*grid, dim) -> one image with a grid x grid map per patch, NaN gaps."""
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    sim = unit @ unit.T  # (N, N) cosine similarities
    step = grid + 1
    mosaic = np.full((grid * step - 1, grid * step - 1), np.nan)
    for n in range(grid * grid):
        r, c = divmod(n, grid)
        mosaic[r * step:r * step + grid, c * step:c * step + grid] = sim[n].reshape(grid, grid)
    return mosaic


learned = vit.pos_embed.data[0, 1:]  # (36, 64): the [CLS] row has no place on the grid
tables = {"this ViT's pos_embed (random init, untrained)": learned,
          "fixed 2-D sine-cosine table": sincos_2d(grid, cfg.width)}
fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
for ax, (title, table) in zip(axes, tables.items()):
    mosaic = cosine_mosaic(table, grid)
    im = ax.imshow(mosaic, cmap="viridis", vmin=np.nanmin(mosaic), vmax=1.0)
    ax.set_title(title, fontsize=11)
    ax.axis("off")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
fig.suptitle("Tile (r, c): similarity of patch (r, c)'s position embedding to every patch "
             "(each panel has its own colour scale)", fontsize=11)
plt.show()

unit = learned / np.linalg.norm(learned, axis=1, keepdims=True)
off_diagonal = (unit @ unit.T)[~np.eye(cfg.num_patches, dtype=bool)]
print(f"random table: off-diagonal cosines have mean {off_diagonal.mean():+.3f}, "
      f"std {off_diagonal.std():.3f} (1/sqrt(64) = {1 / np.sqrt(64):.3f})")
fixed = sincos_2d(grid, cfg.width)
fixed_unit = fixed / np.linalg.norm(fixed, axis=1, keepdims=True)
print(f"sine-cosine table: cosines from {(fixed_unit @ fixed_unit.T).min():.2f} to 1")
assert 0.6 < (fixed_unit @ fixed_unit.T).min() < 0.8
assert abs(off_diagonal.std() - 1 / np.sqrt(64)) < 0.05  # "around +-1/sqrt(64)"

# %% [markdown]
# ## Summary
#
# * BLIP's test-time preprocessing: RGB, bicubic resize to a square (aspect ratio
#   ignored), scale to [0, 1], normalise with CLIP's mean and std.
# * A $p \times p$ convolution with stride $p$ is a Linear layer on the matrix of
#   flattened patches: `patchify` (reshape, transpose, reshape; row-major patches,
#   $(c, k_h, k_w)$ inside a patch) and one matmul with $W$ = `conv_w.reshape(D, -1).T`.
# * Its backward is the Linear backward followed by `unpatchify`: patchify only moves
#   pixels, each to exactly one place, so its adjoint is its inverse.
# * The ViT prepends a learned [CLS] token and adds a learned position table, both
#   shared by every image in the batch, so their gradients are sums over the batch.
# * Without position embeddings the ViT is blind to where patches are: shuffling them
#   leaves the [CLS] output unchanged.
# * An untrained position table is noise; structure (rows, columns, locality) appears only
#   with training, or by construction in a fixed sine–cosine table.
#
# ## Exercises
#
# 1. **Overlapping patches.** Write a Conv2d with kernel 16 and stride 8 as im2col + matmul:
#    build the patch matrix with `np.lib.stride_tricks.sliding_window_view`, then derive
#    and write its backward, where a pixel's gradient is the sum over every window that
#    contains it (`np.add.at`). Check it against a loop convolution and with
#    `minblip.gradcheck.gradcheck`.
# 2. **A new resolution.** BLIP pre-trains at 224 pixels (a 14x14 grid) and fine-tunes at
#    384 (24x24) by resizing the position table bicubically, leaving the [CLS] row alone
#    (salesforce/BLIP `interpolate_pos_embed`). Do the same for our ViT, from 6x6 to 8x8
#    (resize each of the 64 channels as a pillow `"F"` image), build a ViT with
#    `image_size=128`, copy every other Param, and run the photo at 128 pixels. How many
#    numbers are in ViT-B/16's position table at 224 and at 384 pixels? (151,296 and
#    443,136.)
# 3. **Pixel order inside a patch.** Permute the 768 numbers inside *every* patch the same
#    way. Show that a PatchEmbed whose rows of $W$ are permuted accordingly gives exactly
#    the same output. Why does the (c, kh, kw) order then not matter to a model trained
#    from scratch, but matter a lot to one loading BLIP's weights?
# 4. **A trained map.** Redraw the similarity map of section 8 from the `pos_embed` of the
#    trained BLIP that notebook 00 loads (`minblip.tour.load_tour_model()`; a 4x4 grid).
#    Does row/column structure appear? Train the same model for fewer steps
#    (`minblip.tour.tour_config(steps=...)`): when does it appear?

# %% [markdown]
# ## Graded exercises
#
# These come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after an exercise passes once your code is
# right, and `python -m minblip.exercises check 3.1,3.2` runs the same checks from a
# terminal and says what is wrong and where. You write a package exercise in the
# function of `minblip/` it names. The graded files are those of `minblip/`.
#
# ### Exercise 3.1 · Patch embedding as reshape plus matmul
#
# **Goal.** Write the body of `patchify` in `minblip/vit.py`: images `(B, C, H, W)` to
# patches `(B, N, C·p·p)`, patches numbered row by row over the grid, the pixels of a patch
# in `(c, kh, kw)` order. `PatchEmbed` then needs only one matmul.
#
# **Hints.** Split each spatial axis into (grid position, position inside the patch) with
# one `reshape` to `(B, C, H/p, p, W/p, p)`. One `transpose` brings the two grid axes
# forward and leaves `(C, p, p)` last; a final `reshape` flattens both groups. No loops, no
# copies by hand. The check compares `PatchEmbed` with the loop convolution of section 4
# and the patch order on a non-square image.

# %% nbgrader={"grade": true, "grade_id": "ex3_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(30)
pe = PatchEmbed(6, 3, 2, 4, rng).to(np.float64)
conv_w, conv_b = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
pe.load_conv_weights(conv_w, conv_b)
imgs = rng.standard_normal((2, 2, 6, 6))
out, _ = pe.forward(imgs)
conv = conv2d_patchify_reference(imgs, conv_w, conv_b).reshape(2, 4, -1).transpose(0, 2, 1)
print("PatchEmbed equals the convolution:", np.allclose(out, conv, rtol=0, atol=1e-12))
assert np.allclose(out, conv, rtol=0, atol=1e-12)
wide = rng.standard_normal((1, 3, 4, 6))  # a 2 x 3 grid of 2 x 2 patches
patches = patchify(wide, 2)
assert patches.shape == (1, 6, 12)
assert np.array_equal(patches[0, 1 * 3 + 2], wide[0, :, 2:4, 4:6].reshape(-1))  # row 1, column 2
print("patch order and pixel order: ok")

# %% [markdown]
# ### Exercise 3.2 · The backward of patchify
#
# **Goal.** Write the body of `unpatchify(patches, patch_size, height, width)` in
# `minblip/vit.py`: patches `(B, N, C·p·p)` back to images `(B, C, H, W)`. It is the
# inverse of `patchify`, and section 6 showed that it is also its backward:
# `PatchEmbed.backward` calls it.
#
# **Hints.** `patchify` moves every pixel to exactly one place, so its Jacobian is a
# permutation matrix, and the transpose of a permutation is its inverse. Undo the three
# steps of `patchify` in reverse order: reshape to six axes, the inverse transpose, reshape
# back. Which permutation of six axes undoes `(0, 2, 4, 1, 3, 5)`?

# %% nbgrader={"grade": true, "grade_id": "ex3_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip import Param, gradcheck  # noqa: E402

rng = np.random.default_rng(31)
pixels = Param(rng.standard_normal((2, 3, 4, 6)), dtype=np.float64)  # not square on purpose
R = rng.standard_normal((2, 6, 12))


def patch_loss(backward):
    if backward:
        pixels.grad += unpatchify(R, 2, 4, 6)
    return float(np.sum(patchify(pixels.data, 2) * R))


print(gradcheck(patch_loss, {"pixels": pixels}))
