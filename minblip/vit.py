"""BLIP's image encoder: a Vision Transformer (ViT).

Mirrors salesforce/BLIP ``models/vit.py`` ``VisionTransformer`` (built from
timm's ``PatchEmbed`` and BLIP's ``Block``):

    patches = PatchEmbed(image)                  (B, N, D)   a p x p, stride p conv
    x = concat([CLS], patches) + pos_embed       (B, 1+N, D)
    x = Block(x) for each of the depth blocks    pre-norm, eps 1e-6
    image_embeds = LayerNorm(x)                  all 1+N tokens, eps 1e-6

``image_embeds`` is what BLIP's text transformer cross-attends to, and its row 0
(the [CLS] token) is what ITC projects into the shared embedding space.

BLIP-2's image encoder, the EVA ViT-g of salesforce/LAVIS ``eva_vit.py``, is
the same network with three options (``ViTConfig``): ``key_bias=False`` (its
attention has ``q_bias`` and ``v_bias`` but no key bias), ``final_norm=False``
(``forward_features`` returns the blocks' output; BLIP-2 normalises it with its
own ``ln_vision``, which Hugging Face's ``Blip2VisionModel`` stores as
``post_layernorm``) and its sizes (patch 14, width 1408, depth 39, heads 16,
mlp_dim 6144). ``qkv_bias=False`` is a ViT with no q, k, v biases at all
(Hugging Face ``Blip2VisionConfig(qkv_bias=False)``).

Left out: stochastic depth (``drop_path``; ViT-B in BLIP uses rate 0), the
attention-map hooks for Grad-CAM, gradient checkpointing, EVA's layer scale
(``init_values``; None in BLIP-2), and ``interpolate_pos_embed`` (resizing the
position table to a new resolution when loading a checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .core import Module, Param
from .layers import Dropout, LayerNorm, Linear
from .transformer import PreNormBlock


@dataclass
class ViTConfig:
    """Sizes of the ViT. The defaults are a toy; BLIP's ViT-B/16 is
    image_size=224 (384 when fine-tuning), patch_size=16, width=768, depth=12,
    heads=12, mlp_dim=3072 (``models/blip.py`` ``create_vit``)."""

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    width: int = 64  # D, the token width
    depth: int = 2  # number of transformer blocks
    heads: int = 2
    mlp_dim: int = 256  # hidden width of each block's MLP (4 * width in BLIP)
    eps: float = 1e-6  # LayerNorm eps, BLIP's ``partial(nn.LayerNorm, eps=1e-6)``
    dropout: float = 0.0  # BLIP's ViT uses drop_rate = attn_drop_rate = 0
    init_std: float = 0.02
    # std of the position table's init; None: init_std, as BLIP (trunc_normal_ std .02)
    pos_embed_std: float | None = None
    qkv_bias: bool = True  # biases on the q, k and v projections (BLIP: qkv_bias=True)
    key_bias: bool = True  # False: q and v biases only, as EVA's q_bias/v_bias (BLIP-2)
    final_norm: bool = True  # False: no LayerNorm after the blocks (EVA's forward_features)
    # True: the position table is added once more to the output tokens, after the final
    # LayerNorm, so the text's cross-attention reads where each token is at a scale the
    # blocks cannot shrink. A departure from BLIP (whose ViT adds it once, at the input)
    # that benchmarks/demo_recipe.py measures; Hugging Face's BLIP cannot hold it.
    pos_embed_at_output: bool = False

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "width", "depth", "heads", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: patch_size must divide image_size, got "
                             f"image_size={self.image_size}, patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig: heads must divide width, got width={self.width}, "
                             f"heads={self.heads}")
        if not self.eps > 0:
            raise ValueError(f"ViTConfig.eps must be positive, got {self.eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std >= 0:
            raise ValueError(f"ViTConfig.init_std must be >= 0, got {self.init_std}")
        if self.pos_embed_std is not None and not self.pos_embed_std >= 0:
            raise ValueError(f"ViTConfig.pos_embed_std must be None or >= 0, got "
                             f"{self.pos_embed_std}")
        for name in ("qkv_bias", "key_bias", "final_norm", "pos_embed_at_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N = (image_size / patch_size)^2; the ViT outputs 1 + N tokens."""
        return self.grid * self.grid


# ---------------------------------------------------------------------------
# Patch embedding. A Conv2d with kernel p and stride p looks at disjoint p x p
# windows, so it is a Linear layer applied to each window flattened: cut the
# image into a matrix of patches (a pure rearrangement of the pixels), then
# one matmul.
# ---------------------------------------------------------------------------

def patchify(images, patch_size: int):
    """images (B, C, H, W) -> patches (B, N, C*p*p), N = (H/p)(W/p).

    Patches are numbered row-major over the grid (index = row * W/p + col), as
    timm's ``flatten(2).transpose(1, 2)`` numbers the conv's output positions.
    Inside a patch the pixels are flattened in (c, kh, kw) order, the layout of
    a PyTorch conv weight (D, C, kh, kw). Exercise 3.1 (notebooks/03_vit_patch_embedding).
    """
    if images.ndim != 4:
        raise ValueError(f"patchify: expected images (B, C, H, W), got shape {images.shape}")
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: patch_size {p} must divide the image height and width, "
                         f"got images of shape {images.shape}")
    ### BEGIN SOLUTION
    gh, gw = H // p, W // p
    x = images.reshape(B, C, gh, p, gw, p)  # each spatial axis -> (grid, within patch)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p): grid first, then (c, kh, kw)
    return x.reshape(B, gh * gw, C * p * p)
    ### END SOLUTION


def unpatchify(patches, patch_size: int, height: int, width: int):
    """The inverse of :func:`patchify`: patches (B, N, C*p*p) -> images (B, C, H, W).

    patchify moves every pixel to exactly one place, so its Jacobian is a
    permutation and its backward is this inverse: PatchEmbed.backward uses it."""
    p = patch_size
    gh, gw = height // p, width // p
    if patches.ndim != 3 or patches.shape[1] != gh * gw or patches.shape[2] % (p * p):
        raise ValueError(f"unpatchify: expected patches (B, {gh * gw}, C*{p}*{p}) for a "
                         f"{height}x{width} image, got shape {patches.shape}")
    ### BEGIN SOLUTION
    B, _, K = patches.shape
    C = K // (p * p)
    x = patches.reshape(B, gh, gw, C, p, p)  # undoes patchify's last reshape
    x = x.transpose(0, 3, 1, 4, 2, 5)  # inverse of (0, 2, 4, 1, 3, 5): (B, C, gh, p, gw, p)
    return x.reshape(B, C, height, width)  # undoes its first reshape
    ### END SOLUTION


def conv2d_patchify_reference(images, conv_w, conv_b):
    """A direct, slow Conv2d with stride = kernel size, for checking PatchEmbed.

    images (B, C, H, W), conv_w (D, C, k, k) in PyTorch's layout, conv_b (D,)
    -> (B, D, H/k, W/k), the output of ``nn.Conv2d(C, D, k, stride=k)``:

        out[b, d, i, j] = sum_{c, u, v} images[b, c, i*k + u, j*k + v] * conv_w[d, c, u, v]
                          + conv_b[d]

    One output element per loop iteration, written from the definition of a
    convolution, with no reshaping tricks. timm's PatchEmbed then flattens the
    grid: ``out.reshape(B, D, -1).transpose(0, 2, 1)`` -> (B, N, D).
    """
    if images.ndim != 4 or conv_w.ndim != 4 or conv_w.shape[2] != conv_w.shape[3]:
        raise ValueError(f"conv2d_patchify_reference: expected images (B, C, H, W) and a square "
                         f"kernel (D, C, k, k), got {images.shape} and {conv_w.shape}")
    B, C, H, W = images.shape
    D, C_w, k, _ = conv_w.shape
    if C_w != C or conv_b.shape != (D,) or H % k or W % k:
        raise ValueError(f"conv2d_patchify_reference: images {images.shape}, kernel "
                         f"{conv_w.shape} and bias {conv_b.shape} do not fit (need matching "
                         f"channels, bias ({D},) and k dividing H and W)")
    stride = k
    out = np.empty((B, D, H // stride, W // stride),
                   dtype=np.result_type(images, conv_w, conv_b))
    for b in range(B):
        for d in range(D):
            for i in range(H // stride):
                for j in range(W // stride):
                    window = images[b, :, i * stride:i * stride + k, j * stride:j * stride + k]
                    out[b, d, i, j] = np.sum(window * conv_w[d]) + conv_b[d]
    return out


def _check_images(images, channels: int, size: int, who: str) -> None:
    want = f"(B, {channels}, {size}, {size})"
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{who}: expected images as a NumPy array {want}, "
                        f"got {type(images).__name__}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{who}: expected float images {want} (normalised pixels, e.g. from "
                        f"minblip.image.preprocess), got dtype {images.dtype}")
    if images.ndim != 4:
        hint = " (add a batch axis: images[None])" if images.ndim == 3 else ""
        raise ValueError(f"{who}: expected a 4-d batch {want}, got shape {images.shape}{hint}")
    if images.shape[1:] != (channels, size, size) or images.shape[0] == 0:
        hint = (" (channels last? transpose to channels first)"
                if images.shape[-1] == channels and images.shape[1] != channels else "")
        raise ValueError(f"{who}: expected images {want} with B >= 1, got shape "
                         f"{images.shape}{hint}")


class PatchEmbed(Module):
    """Cut images into p x p patches and project each to width D.

    salesforce/BLIP (via timm ``PatchEmbed``) uses ``nn.Conv2d(C, D, kernel_size=p,
    stride=p)`` followed by ``flatten(2).transpose(1, 2)``. minblip computes the
    same thing as :func:`patchify` followed by a :class:`Linear` ``proj`` with
    W (C*p*p, D), whose input order is (c, kh, kw): a PyTorch conv weight
    ``conv_w`` (D, C, p, p) is ``W = conv_w.reshape(D, -1).T`` (see
    :meth:`load_conv_weights`).

    Initialisation: BLIP's ``_init_weights`` only touches Linear and LayerNorm
    modules, so the conv keeps PyTorch's default, uniform(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for weight and bias with fan_in = C*p*p; minblip does the same.
    """

    def __init__(self, image_size: int, patch_size: int, channels: int, width: int,
                 rng: np.random.Generator):
        if image_size % patch_size:
            raise ValueError(f"PatchEmbed: patch_size must divide image_size, got "
                             f"image_size={image_size}, patch_size={patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.channels, self.width = channels, width
        self.num_patches = (image_size // patch_size) ** 2
        fan_in = channels * patch_size * patch_size
        self.proj = Linear(fan_in, width, rng)
        bound = 1.0 / math.sqrt(fan_in)
        self.proj.W.data[...] = rng.uniform(-bound, bound, (fan_in, width))
        self.proj.b.data[...] = rng.uniform(-bound, bound, width)

    def load_conv_weights(self, conv_w, conv_b) -> None:
        """Copy a PyTorch conv weight (D, C, p, p) and bias (D,) into ``proj``
        in place (the Params keep their identity and dtype)."""
        p = self.patch_size
        want = (self.width, self.channels, p, p)
        if np.shape(conv_w) != want or np.shape(conv_b) != (self.width,):
            raise ValueError(f"PatchEmbed.load_conv_weights: expected weight {want} and bias "
                             f"({self.width},), got {np.shape(conv_w)} and {np.shape(conv_b)}")
        # (D, C, p, p) -> (D, C*p*p) in (c, kh, kw) order -> transposed to (C*p*p, D)
        self.proj.W.data[...] = np.asarray(conv_w).reshape(self.width, -1).T
        self.proj.b.data[...] = conv_b

    def forward(self, images):
        """images (B, C, H, W) float -> patch embeddings (B, N, D)."""
        _check_images(images, self.channels, self.image_size, "PatchEmbed")
        patches = patchify(images, self.patch_size)  # (B, C, H, W) -> (B, N, C*p*p)
        return self.proj.forward(patches)  # (B, N, C*p*p) @ (C*p*p, D) -> (B, N, D)

    def backward(self, dout, cache):
        """dout (B, N, D) -> dimages (B, C, H, W); adds into proj.W and proj.b."""
        dpatches = self.proj.backward(dout, cache)  # undoes patches @ W + b: (B, N, C*p*p)
        # undoes patchify: it only moves pixels, each to exactly one place (the
        # windows do not overlap), so its adjoint is its inverse
        return unpatchify(dpatches, self.patch_size, self.image_size, self.image_size)


class VisionTransformer(Module):
    """BLIP's ViT: images (B, C, H, W) -> image_embeds (B, 1+N, D).

    Parameters, in salesforce/BLIP ``VisionTransformer.__init__`` order:
    ``patch_embed``, ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1+N, D),
    ``blocks`` (a list of :class:`PreNormBlock`), ``norm`` (final LayerNorm, or
    None with ``final_norm=False``).

    ``cls_token`` and ``pos_embed`` are drawn from normal(0, init_std). BLIP
    calls timm's ``trunc_normal_(std=.02)``, whose cut-offs a=-2, b=2 are
    absolute values, i.e. 100 standard deviations: in effect the same normal.
    BLIP's ViT stores q, k, v as one fused ``qkv`` Linear; minblip's blocks
    keep three separate ones, which compute the same thing.
    """

    def __init__(self, config: ViTConfig, rng: np.random.Generator):
        c = self.config = config
        D = c.width
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.channels, D, rng)
        self.cls_token = Param(rng.normal(0.0, c.init_std, (1, 1, D)))
        pos_std = c.init_std if c.pos_embed_std is None else c.pos_embed_std
        self.pos_embed = Param(rng.normal(0.0, pos_std, (1, 1 + c.num_patches, D)))
        self.pos_drop = Dropout(c.dropout)
        self.blocks = [PreNormBlock(D, c.heads, c.mlp_dim, rng, eps=c.eps, dropout=c.dropout,
                                    init_std=c.init_std, qkv_bias=c.qkv_bias,
                                    key_bias=c.qkv_bias and c.key_bias)
                       for _ in range(c.depth)]
        self.norm = LayerNorm(D, eps=c.eps) if c.final_norm else None

    def forward(self, images, rng: np.random.Generator | None = None, keep_cache: bool = True):
        """images (B, C, H, W) float, cast to the model's dtype -> (image_embeds
        (B, 1+N, D), cache). ``rng`` drives dropout; None means evaluation.

        ``keep_cache=False`` is for inference: each block's cache is dropped as
        soon as the next block runs, so a large ViT holds one block's
        intermediates at a time instead of all of them (ViT-B at 384 px: its
        attention weights alone are 16 MB a block), and the cache returned is
        None (no backward)."""
        c = self.config
        _check_images(images, c.channels, c.image_size, "VisionTransformer")
        images = images.astype(self.dtype, copy=False)
        B = images.shape[0]
        patches, c_patch = self.patch_embed.forward(images)  # (B, C, H, W) -> (B, N, D)
        cls = np.broadcast_to(self.cls_token.data, (B, 1, c.width))  # one [CLS] for every image
        x = np.concatenate([cls, patches], axis=1)  # (B, 1+N, D)
        x = x + self.pos_embed.data  # (B, 1+N, D) + (1, 1+N, D): the same table for every image
        x, c_drop = self.pos_drop.forward(x, rng)
        c_blocks = []
        for block in self.blocks:
            x, c_block = block.forward(x, rng=rng)  # (B, 1+N, D) -> (B, 1+N, D), no mask
            if keep_cache:
                c_blocks.append(c_block)
        c_norm = None
        if self.norm is not None:
            x, c_norm = self.norm.forward(x)  # every token is normalised, [CLS] included
        if c.pos_embed_at_output:
            x = x + self.pos_embed.data  # (B, 1+N, D) + (1, 1+N, D), after the normalisation
        return x, ((c_patch, c_drop, c_blocks, c_norm) if keep_cache else None)

    def backward(self, d_image_embeds, cache):
        """d_image_embeds (B, 1+N, D) -> d_images (B, C, H, W); adds into every Param."""
        c_patch, c_drop, c_blocks, c_norm = cache
        dx = d_image_embeds
        if self.config.pos_embed_at_output and self.pos_embed.trainable:
            self.pos_embed.grad += dx.sum(axis=0, keepdims=True)  # undoes the output's + pos_embed
        if self.norm is not None:
            dx = self.norm.backward(dx, c_norm)  # undoes the final LayerNorm
        for block, c_block in zip(reversed(self.blocks), reversed(c_blocks)):
            dx = block.backward(dx, c_block)  # undoes the blocks, last first
        dx = self.pos_drop.backward(dx, c_drop)
        if self.pos_embed.trainable:  # undoes + pos_embed, broadcast over B
            self.pos_embed.grad += dx.sum(axis=0, keepdims=True)
        if self.cls_token.trainable:  # undoes broadcast_to over B
            self.cls_token.grad += dx[:, :1].sum(axis=0, keepdims=True)
        return self.patch_embed.backward(dx[:, 1:], c_patch)  # undoes the concat, then PatchEmbed
