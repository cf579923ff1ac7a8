"""Tests of the ViT image encoder (minblip.vit) and image preprocessing (minblip.image)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from minblip.core import Param
from minblip.gradcheck import check_layer, gradcheck
from minblip.image import CLIP_MEAN, CLIP_STD, denormalize, preprocess
from minblip.vit import (PatchEmbed, ViTConfig, VisionTransformer, conv2d_patchify_reference,
                         patchify, unpatchify)

TINY = dict(image_size=8, patch_size=4, width=8, depth=2, heads=2, mlp_dim=16)


def rerandomise(module, rng, std=0.3):
    """Give every Param O(std) random values (LayerNorm gains around 1) so that no
    gradient is tiny or structurally zero by accident of the initialisation."""
    for name, p in module.named_params():
        centre = 1.0 if name.endswith("gamma") else 0.0
        p.data[...] = centre + std * rng.standard_normal(p.shape)


def tiny_vit(seed=0, **overrides):
    rng = np.random.default_rng(seed)
    vit = VisionTransformer(ViTConfig(**{**TINY, **overrides}), rng).to(np.float64)
    rerandomise(vit, rng)
    return vit


# ---------------------------------------------------------------------------
# Patch embedding = convolution with stride = kernel
# ---------------------------------------------------------------------------

@given(grid=st.integers(1, 4), p=st.integers(1, 5), channels=st.integers(1, 3),
       width=st.integers(1, 6), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_patch_embed_equals_conv_reference(grid, p, channels, width, batch, seed):
    rng = np.random.default_rng(seed)
    size = grid * p
    pe = PatchEmbed(size, p, channels, width, rng).to(np.float64)
    conv_w = rng.standard_normal((width, channels, p, p))
    conv_b = rng.standard_normal(width)
    pe.load_conv_weights(conv_w, conv_b)
    images = rng.standard_normal((batch, channels, size, size))

    out, _ = pe.forward(images)
    conv = conv2d_patchify_reference(images, conv_w, conv_b)  # (B, D, grid, grid)
    expected = conv.reshape(batch, width, -1).transpose(0, 2, 1)  # timm: flatten(2).transpose(1, 2)
    assert out.shape == (batch, grid * grid, width)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size,p", [(32, 8), (96, 16), (12, 3), (8, 8)])
def test_conv_weight_layout_is_c_kh_kw(size, p):
    """A conv kernel that picks one input pixel (c, u, v) must pick the same
    pixel of every patch through W = conv_w.reshape(D, -1).T."""
    rng = np.random.default_rng(1)
    pe = PatchEmbed(size, p, 3, 1, rng).to(np.float64)
    c, u, v = 2, p - 1, 0
    conv_w = np.zeros((1, 3, p, p))
    conv_w[0, c, u, v] = 1.0
    pe.load_conv_weights(conv_w, np.zeros(1))
    images = rng.standard_normal((1, 3, size, size))
    out, _ = pe.forward(images)
    np.testing.assert_array_equal(out[0, :, 0], images[0, c, u::p, v::p].reshape(-1))


def test_patch_order_is_row_major():
    p, gh, gw = 2, 3, 4
    images = np.zeros((1, 1, gh * p, gw * p))
    for i in range(gh):
        for j in range(gw):
            images[0, 0, i * p:(i + 1) * p, j * p:(j + 1) * p] = i * gw + j
    patches = patchify(images, p)  # (1, 12, 4)
    np.testing.assert_array_equal(patches[0], np.repeat(np.arange(gh * gw), p * p).reshape(-1, 4))
    np.testing.assert_array_equal(unpatchify(patches, p, gh * p, gw * p), images)


def test_load_conv_weights_rejects_wrong_shape():
    pe = PatchEmbed(8, 4, 3, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(5, 3, 4, 4\).*\(5, 3, 2, 2\)"):
        pe.load_conv_weights(np.zeros((5, 3, 2, 2)), np.zeros(5))


def test_patch_embed_gradcheck():
    rng = np.random.default_rng(2)
    pe = PatchEmbed(12, 4, 3, 6, rng)
    images = rng.standard_normal((2, 3, 12, 12))
    report = check_layer(pe, images)  # images, proj.W, proj.b and a random direction
    assert {r.name for r in report.rows} == {"proj.W", "proj.b", "input0"}
    assert report.max_rel_err <= 1e-6


# ---------------------------------------------------------------------------
# The full ViT
# ---------------------------------------------------------------------------

def test_vit_shapes_and_config():
    cfg = ViTConfig()
    assert cfg.num_patches == 16
    vit = VisionTransformer(cfg, np.random.default_rng(0))
    images = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out, cache = vit.forward(images)
    assert out.shape == (3, 17, 64) and out.dtype == np.float32
    dimages = vit.backward(np.ones_like(out), cache)
    assert dimages.shape == images.shape and dimages.dtype == np.float32
    # the final LayerNorm acts on every token (gamma = 1, beta = 0 at init)
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-5)


def test_position_table_std_defaults_to_init_std():
    rng = np.random.default_rng
    wide = ViTConfig(image_size=64, patch_size=4, init_std=0.02)  # 257 x 64 numbers
    table = VisionTransformer(wide, rng(0)).pos_embed.data
    assert table.std() == pytest.approx(0.02, rel=0.05)
    bigger = VisionTransformer(ViTConfig(**{**wide.__dict__, "pos_embed_std": 1.0}), rng(0))
    assert bigger.pos_embed.data.std() == pytest.approx(1.0, rel=0.05)
    # only the position table changes: every other Param is drawn as before
    for (name, a), (_, b) in zip(VisionTransformer(wide, rng(0)).named_params(),
                                 bigger.named_params()):
        if name != "pos_embed":
            np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_position_at_output_adds_the_table_once_more():
    images = np.random.default_rng(4).standard_normal((2, 3, 8, 8))
    plain, again = tiny_vit(), tiny_vit(pos_embed_at_output=True)
    out_plain, _ = plain.forward(images)
    out_again, _ = again.forward(images)
    np.testing.assert_allclose(out_again, out_plain + plain.pos_embed.data, rtol=1e-12)
    assert again.param_count() == plain.param_count()  # the same table, used twice
    report = check_layer(again, images)
    assert report.passed and report.directional.passed, str(report)


@pytest.mark.parametrize("bad", [dict(image_size=30), dict(heads=3), dict(patch_size=0),
                                 dict(dropout=1.0), dict(eps=0.0), dict(final_norm=0),
                                 dict(pos_embed_std=-0.1), dict(pos_embed_at_output=1)])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="ViTConfig"):
        ViTConfig(**bad)


def test_vit_gradcheck_float64():
    vit = tiny_vit()
    images = np.random.default_rng(3).standard_normal((2, 3, 8, 8))
    report = check_layer(vit, images)  # every Param + pixels + one random direction
    assert len(report.rows) == len(vit.params()) + 1
    assert report.max_rel_err <= 1e-6, str(report)


# BLIP-2's EVA ViT: q and v biases without a key bias, no final LayerNorm; and a ViT
# without any q, k, v bias (Blip2VisionConfig(qkv_bias=False))
EVA_OPTIONS = [dict(key_bias=False, final_norm=False), dict(qkv_bias=False),
               dict(final_norm=False)]


@pytest.mark.parametrize("options", EVA_OPTIONS)
def test_vit_options_gradcheck_float64(options):
    vit = tiny_vit(**options)
    images = np.random.default_rng(3).standard_normal((2, 3, 8, 8))
    report = check_layer(vit, images)
    assert len(report.rows) == len(vit.params()) + 1
    assert report.passed and report.directional.passed, str(report)


@pytest.mark.parametrize("options", EVA_OPTIONS)
def test_vit_options_leave_out_exactly_their_params(options):
    vit = tiny_vit(**options)
    names = {n for n, _ in vit.named_params()}
    attn = vit.blocks[0].attn
    qkv = options.get("qkv_bias", True)
    assert (attn.query.b is not None) == qkv and (attn.value.b is not None) == qkv
    assert (attn.key.b is not None) == (qkv and options.get("key_bias", True))
    assert ("norm.gamma" in names) == options.get("final_norm", True)
    plain = tiny_vit()
    dropped = plain.param_count() - vit.param_count()
    D, depth = 8, 2
    assert dropped == (0 if options.get("final_norm", True) else 2 * D) + depth * D * (
        3 if not qkv else 0 if options.get("key_bias", True) else 1)


def test_vit_key_bias_cannot_change_the_output():
    """A key bias adds q.b to every score of a query's row: the softmax ignores it,
    which is why EVA can leave it out."""
    vit = tiny_vit()
    images = np.random.default_rng(3).standard_normal((2, 3, 8, 8))
    before, _ = vit.forward(images)
    for block in vit.blocks:
        block.attn.key.b.data[...] = np.random.default_rng(9).normal(0, 3.0, 8)
    np.testing.assert_allclose(vit.forward(images)[0], before, atol=1e-12)


def test_forward_without_cache_gives_the_same_embeddings():
    vit = tiny_vit()
    images = np.random.default_rng(3).standard_normal((2, 3, 8, 8))
    out, cache = vit.forward(images, keep_cache=False)
    assert cache is None
    np.testing.assert_array_equal(out, vit.forward(images)[0])


def test_vit_gradcheck_with_dropout():
    """Dropout on the position-embedded tokens, the attention weights and the
    residual branches, with the masks fixed by re-seeding the generator."""
    vit = tiny_vit(seed=4, dropout=0.3)
    images = Param(np.random.default_rng(5).standard_normal((2, 3, 8, 8)), dtype=np.float64)
    out, _ = vit.forward(images.data, rng=np.random.default_rng(6))
    R = np.random.default_rng(7).standard_normal(out.shape)

    def loss_fn(backward):
        out, cache = vit.forward(images.data, rng=np.random.default_rng(6))
        if backward:
            images.grad += vit.backward(R, cache)
        return float(np.sum(out * R))

    clean, _ = vit.forward(images.data)
    assert not np.allclose(out, clean)  # dropout really is on
    report = gradcheck(loss_fn, vit.named_params() + [("images", images)])
    assert report.max_rel_err <= 1e-6, str(report)


def test_batch_of_one_matches_row_of_batch():
    vit = tiny_vit(seed=8)
    images = np.random.default_rng(9).standard_normal((3, 3, 8, 8))
    out_all, _ = vit.forward(images)
    out_one, cache = vit.forward(images[1:2])
    assert out_one.shape == (1, 5, 8)
    np.testing.assert_allclose(out_one[0], out_all[1], rtol=0, atol=1e-12)
    assert vit.backward(np.ones_like(out_one), cache).shape == (1, 3, 8, 8)


def test_batch_gradient_is_sum_of_per_image_gradients():
    """cls_token and pos_embed are broadcast over the batch, so their gradient
    for a batch is the sum of the per-image gradients."""
    vit = tiny_vit(seed=10)
    rng = np.random.default_rng(11)
    images = rng.standard_normal((2, 3, 8, 8))
    R = rng.standard_normal((2, 5, 8))
    vit.zero_grad()
    _, cache = vit.forward(images)
    vit.backward(R, cache)
    batch_grads = [p.grad.copy() for p in vit.params()]
    vit.zero_grad()
    # two forwards, then their backwards in reverse order: nothing is kept on the module
    _, cache0 = vit.forward(images[0:1])
    _, cache1 = vit.forward(images[1:2])
    vit.backward(R[1:2], cache1)
    vit.backward(R[0:1], cache0)
    for (name, p), g in zip(vit.named_params(), batch_grads):
        np.testing.assert_allclose(p.grad, g, rtol=1e-10, atol=1e-12, err_msg=name)


def test_cls_depends_on_every_patch_and_inputs_are_not_mutated():
    vit = tiny_vit(seed=12)
    rng = np.random.default_rng(13)
    images = rng.standard_normal((1, 3, 8, 8))
    images_copy = images.copy()
    out, cache = vit.forward(images)
    dout = rng.standard_normal(out.shape)
    dout_copy = dout.copy()
    vit.backward(dout, cache)
    np.testing.assert_array_equal(images, images_copy)
    np.testing.assert_array_equal(dout, dout_copy)
    for i in range(2):
        for j in range(2):
            moved = images.copy()
            moved[0, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4] += 0.5
            out2, _ = vit.forward(moved)
            assert np.abs(out2[0, 0] - out[0, 0]).max() > 1e-6, f"patch ({i}, {j})"


@pytest.mark.parametrize("images,error,pattern", [
    (np.zeros((2, 3, 16, 16)), ValueError,
     r"expected images \(B, 3, 8, 8\).*got shape \(2, 3, 16, 16\)"),
    (np.zeros((2, 1, 8, 8)), ValueError,
     r"expected images \(B, 3, 8, 8\).*got shape \(2, 1, 8, 8\)"),
    (np.zeros((2, 8, 8, 3)), ValueError, r"got shape \(2, 8, 8, 3\) \(channels last"),
    (np.zeros((2, 3, 8, 8), dtype=np.uint8), TypeError,
     r"expected float images \(B, 3, 8, 8\).*got dtype uint8"),
    (np.zeros((3, 8, 8)), ValueError,
     r"expected a 4-d batch \(B, 3, 8, 8\), got shape \(3, 8, 8\)"),
    (np.zeros((0, 3, 8, 8)), ValueError, r"B >= 1, got shape \(0, 3, 8, 8\)"),
    ([[0.0]], TypeError, r"expected images as a NumPy array \(B, 3, 8, 8\), got list"),
])
def test_vit_rejects_bad_images(images, error, pattern):
    vit = VisionTransformer(ViTConfig(**TINY), np.random.default_rng(0))
    with pytest.raises(error, match=pattern):
        vit.forward(images)


def test_vit_takes_preprocessed_images():
    vit = VisionTransformer(ViTConfig(**TINY), np.random.default_rng(0))
    photo = np.random.default_rng(1).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    out, _ = vit.forward(preprocess(photo, 8))
    assert out.shape == (2, 5, 8) and np.isfinite(out).all()


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------

def test_preprocess_shapes_and_inputs(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arrays[0]).save(path)
    as_batch = preprocess(arrays, 16)
    assert as_batch.shape == (2, 3, 16, 16) and as_batch.dtype == np.float32
    for single in (arrays[0], Image.fromarray(arrays[0]), str(path), path, [path]):
        np.testing.assert_array_equal(preprocess(single, 16), as_batch[:1])
    mixed = preprocess([Image.fromarray(arrays[0]), arrays[1]], 16)
    np.testing.assert_array_equal(mixed, as_batch)


def test_preprocess_is_bicubic_resize_then_clip_normalisation():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(pixels).resize((24, 24), Image.BICUBIC))
    expected = ((resized / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(preprocess(pixels, 24), expected, rtol=0, atol=1e-5)


def test_preprocess_constant_mean_image_maps_to_zero():
    pixels = np.broadcast_to(np.round(CLIP_MEAN * 255).astype(np.uint8), (10, 14, 3))
    x = preprocess(np.ascontiguousarray(pixels), 8)
    # rounding the mean to whole pixel values moves it by at most 0.5/255
    assert np.abs(x).max() <= 0.5 / 255 / CLIP_STD.min() + 1e-6


def test_preprocess_converts_modes():
    rgba = Image.new("RGBA", (9, 9), (10, 200, 30, 0))
    np.testing.assert_array_equal(preprocess(rgba, 4),
                                  preprocess(Image.new("RGB", (9, 9), (10, 200, 30)), 4))
    gray = preprocess(Image.new("L", (9, 9), 77), 4)
    rgb = gray[0].transpose(1, 2, 0) * CLIP_STD + CLIP_MEAN  # back to [0, 1], channels last
    np.testing.assert_allclose(rgb, 77 / 255, atol=1e-6)
    palette = Image.new("P", (9, 9))
    palette.putpalette([5, 6, 7, 200, 100, 50])
    palette.paste(1, (0, 4, 9, 9))  # top 4 rows colour 0, the rest colour 1
    rgb = denormalize(preprocess(palette, 9))[0]  # no resize at the same size
    np.testing.assert_array_equal(rgb[:4], np.broadcast_to([5, 6, 7], (4, 9, 3)))
    np.testing.assert_array_equal(rgb[4:], np.broadcast_to([200, 100, 50], (5, 9, 3)))


def test_denormalize_round_trip():
    pixels = np.random.default_rng(2).integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(denormalize(preprocess(pixels, 12)), pixels)


def test_preprocess_errors(tmp_path):
    missing = tmp_path / "no_such_photo.jpg"
    with pytest.raises(FileNotFoundError, match="no_such_photo.jpg"):
        preprocess(str(missing), 8)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a JPEG")
    with pytest.raises(ValueError, match="notes.jpg"):
        preprocess([not_an_image], 8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*got shape \(5, 5, 4\)"):
        preprocess(np.zeros((5, 5, 4), np.uint8), 8)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\), got shape \(2, 5, 5, 1\)"):
        preprocess(np.zeros((2, 5, 5, 1), np.uint8), 8)
    with pytest.raises(TypeError, match="uint8.*float64"):
        preprocess(np.zeros((5, 5, 3)), 8)
    with pytest.raises(ValueError, match="empty list"):
        preprocess([], 8)
    with pytest.raises(TypeError, match="image 1 of the list.*int"):
        preprocess([np.zeros((5, 5, 3), np.uint8), 3], 8)
    with pytest.raises(ValueError, match="positive"):
        preprocess(np.zeros((5, 5, 3), np.uint8), 0)
