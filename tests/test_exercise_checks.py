"""The checks of the classroom exercises (minblip.exercises): the autograder.

Each exercise lists its checks in ``minblip.exercises.EXERCISES``. They are plain
functions with no arguments and no fixtures, fast and deterministic, so a grader
can call them one by one. The tests between ``### BEGIN HIDDEN TESTS`` and
``### END HIDDEN TESTS`` are left out of the student version; the instructor
grades with them (docs/instructors.md). A notebook exercise is checked by running
its cells from the notebook (``run_notebook_exercise``).
"""
import math
from pathlib import Path

import numpy as np

from minblip import Module, Param, check_layer, gradcheck
from minblip.attention import ScaledDotProductAttention, causal_mask, padding_mask
from minblip.blip import BLIP, BLIPConfig, hard_negative_weights, itc_backward, itc_forward
from minblip.blip import pretrain_step
from minblip.exercises import BY_ID
from minblip.exercises.grading import run_notebook_exercise
from minblip.generation import top_p_filter
from minblip.layers import LayerNorm
from minblip.softmax import CrossEntropyLoss, softmax
from minblip.text import TextConfig, build_med, shared_parameter_names
from minblip.tokenizer import Tokenizer
from minblip.vit import PatchEmbed, ViTConfig, conv2d_patchify_reference, patchify

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(exercise_id):
    run_notebook_exercise(ROOT, BY_ID[exercise_id])


class Seeded(Module):
    """Calls a layer with a fresh generator of one seed: the same dropout mask every time."""

    def __init__(self, layer, seed):
        self.layer, self.seed = layer, seed

    def forward(self, *args, **kwargs):
        return self.layer.forward(*args, rng=np.random.default_rng(self.seed), **kwargs)

    def backward(self, dout, cache):
        return self.layer.backward(dout, cache)


# ---------------------------------------------------------------------------
# 1.1 softmax cross-entropy backward
# ---------------------------------------------------------------------------

def test_ex_1_1_class_ids_smoothing_and_ignore():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 6))
    targets = np.array([[1, 4, -100], [0, 5, 5]])
    check_layer(CrossEntropyLoss(label_smoothing=0.1), z, targets, seed=1)
    check_layer(CrossEntropyLoss(), z, targets, seed=2)


def test_ex_1_1_soft_targets():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 5))
    t = 0.8 * softmax(rng.standard_normal((4, 5)))  # rows summing to 0.8, not 1
    check_layer(CrossEntropyLoss(), z, t, wrt=[0], seed=4)


### BEGIN HIDDEN TESTS
def test_ex_1_1_upstream_gradient_and_all_ignored():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((3, 4))
    ce = CrossEntropyLoss()
    _, cache = ce.forward(z, np.array([1, -100, 3]))
    expect = softmax(z) - np.eye(4)[[1, 0, 3]]
    expect[1] = 0.0
    np.testing.assert_allclose(ce.backward(2.5, cache), 2.5 * expect / 2, rtol=1e-12)
    _, cache = ce.forward(z, np.full(3, -100))
    np.testing.assert_array_equal(ce.backward(1.0, cache), 0.0)
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 1.2 LayerNorm backward
# ---------------------------------------------------------------------------

def _layernorm(rng, dim=6):
    ln = LayerNorm(dim).to(np.float64)
    ln.gamma.data[...] = 1.0 + 0.5 * rng.standard_normal(dim)
    ln.beta.data[...] = rng.standard_normal(dim)
    return ln


def test_ex_1_2_layernorm_gradcheck():
    rng = np.random.default_rng(10)
    check_layer(_layernorm(rng), rng.standard_normal((2, 3, 6)), seed=11)


def test_ex_1_2_layernorm_used_twice():
    """Two calls, one backward each, before the check reads the gradient: `=` fails."""
    rng = np.random.default_rng(12)
    ln = _layernorm(rng)
    x1, x2 = rng.standard_normal((2, 6)), rng.standard_normal((3, 6))
    R1, R2 = rng.standard_normal((2, 6)), rng.standard_normal((3, 6))

    def loss_fn(backward):
        y1, c1 = ln.forward(x1)
        y2, c2 = ln.forward(x2)
        if backward:
            ln.backward(R2, c2)
            ln.backward(R1, c1)
        return float(np.sum(y1 * R1) + np.sum(y2 * R2))

    gradcheck(loss_fn, ln, seed=13)


# ---------------------------------------------------------------------------
# 1.3 softmax backward (notebook 01)
# ---------------------------------------------------------------------------

def test_ex_1_3_notebook():
    run_notebook("1.3")


# ---------------------------------------------------------------------------
# 2.1 scaled dot-product attention backward with a mask
# ---------------------------------------------------------------------------

def test_ex_2_1_masked_attention_gradcheck():
    rng = np.random.default_rng(20)
    q = rng.standard_normal((2, 2, 4, 3))
    k, v = rng.standard_normal((2, 2, 5, 3)), rng.standard_normal((2, 2, 5, 3))
    mask = padding_mask(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])) & causal_mask(4, 5)
    check_layer(ScaledDotProductAttention(), q, k, v, forward_kwargs={"mask": mask}, seed=21)


### BEGIN HIDDEN TESTS
def test_ex_2_1_attention_dropout():
    rng = np.random.default_rng(22)
    q, k, v = (rng.standard_normal((1, 2, 3, 2)) for _ in range(3))
    mask = causal_mask(3)
    check_layer(Seeded(ScaledDotProductAttention(dropout=0.4), 7), q, k, v,
                forward_kwargs={"mask": mask}, seed=23)
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 2.2 the backward of the attention scores (notebook 02)
# ---------------------------------------------------------------------------

def test_ex_2_2_notebook():
    run_notebook("2.2")


# ---------------------------------------------------------------------------
# 3.1 patchify
# ---------------------------------------------------------------------------

def test_ex_3_1_patchify_matches_a_convolution():
    rng = np.random.default_rng(30)
    pe = PatchEmbed(6, 3, 2, 4, rng).to(np.float64)
    conv_w, conv_b = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    pe.load_conv_weights(conv_w, conv_b)
    images = rng.standard_normal((2, 2, 6, 6))
    out, _ = pe.forward(images)
    expect = conv2d_patchify_reference(images, conv_w, conv_b).reshape(2, 4, -1).transpose(0, 2, 1)
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-12)


def test_ex_3_1_patch_order():
    """A non-square image: patch i*gw + j holds window (i, j), pixels in (c, kh, kw) order."""
    rng = np.random.default_rng(31)
    p, gh, gw = 2, 2, 3
    images = rng.standard_normal((2, 3, gh * p, gw * p))
    patches = patchify(images, p)
    assert patches.shape == (2, gh * gw, 3 * p * p)
    for i in range(gh):
        for j in range(gw):
            window = images[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(2, -1)
            np.testing.assert_array_equal(patches[:, i * gw + j], window)


# ---------------------------------------------------------------------------
# 3.2 patchify backward, 4.1 text embeddings backward (notebooks 03, 04)
# ---------------------------------------------------------------------------

def test_ex_3_2_notebook():
    run_notebook("3.2")


def test_ex_4_1_notebook():
    run_notebook("4.1")


# ---------------------------------------------------------------------------
# 5.1 ITC loss and backward
# ---------------------------------------------------------------------------

def _unit(rng, n, e):
    x = rng.standard_normal((n, e))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _itc_check(img, txt, temp, **banks):
    def loss_fn(backward):
        loss, cache = itc_forward(img.data, txt.data, temp, **banks)
        if backward:
            di, dt = itc_backward(1.0, cache, temp)
            img.grad += di
            txt.grad += dt
        return loss

    gradcheck(loss_fn, {"image_feat": img, "text_feat": txt, "temp": temp}, n_coords=8)


def test_ex_5_1_itc_gradcheck_in_batch():
    rng = np.random.default_rng(50)
    img = Param(rng.standard_normal((4, 3)), dtype=np.float64)
    txt = Param(rng.standard_normal((4, 3)), dtype=np.float64)
    _itc_check(img, txt, Param(0.3, dtype=np.float64))


def test_ex_5_1_itc_values():
    rng = np.random.default_rng(51)
    img, txt, t = _unit(rng, 3, 4), _unit(rng, 3, 4), 0.2
    loss, cache = itc_forward(img, txt, Param(t, dtype=np.float64))
    S = img @ txt.T / t
    np.testing.assert_allclose(cache["sim_i2t"], S, rtol=1e-12)
    np.testing.assert_allclose(cache["sim_t2i"], S.T, rtol=1e-12)
    expect = -0.5 * (np.mean(np.log(np.diag(softmax(S)))) + np.mean(np.log(np.diag(softmax(S.T)))))
    assert math.isclose(loss, expect, rel_tol=1e-12)


### BEGIN HIDDEN TESTS
def test_ex_5_1_itc_with_banks():
    rng = np.random.default_rng(52)
    img = Param(rng.standard_normal((3, 4)), dtype=np.float64)
    txt = Param(rng.standard_normal((3, 4)), dtype=np.float64)
    soft = softmax(rng.standard_normal((3, 6)))
    _itc_check(img, txt, Param(0.4, dtype=np.float64), image_bank=rng.standard_normal((6, 4)),
               text_bank=rng.standard_normal((6, 4)), soft_i2t=soft, soft_t2i=soft[::-1].copy())
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 5.2 L2 normalisation backward (notebook 05)
# ---------------------------------------------------------------------------

def test_ex_5_2_notebook():
    run_notebook("5.2")


# ---------------------------------------------------------------------------
# 6.1 hard negatives and the np.add.at gather
# ---------------------------------------------------------------------------

def test_ex_6_1_hard_negative_weights():
    rng = np.random.default_rng(60)
    sim = 3.0 * rng.standard_normal((3, 5))  # K = 5 > B = 3: only the in-batch columns count
    w = hard_negative_weights(sim)
    expect = softmax(sim[:, :3]) + 1e-4
    np.fill_diagonal(expect, 0.0)
    assert w.shape == (3, 3) and w.dtype == np.float64
    np.testing.assert_allclose(w, expect, rtol=1e-12)


def _tiny_blip(seed):
    words = "a red blue circle square small large of".split()
    vision = ViTConfig(image_size=4, patch_size=2, width=4, depth=1, heads=1, mlp_dim=8)
    text = TextConfig(vocab_size=len(words) + 6, width=4, depth=1, heads=1, mlp_dim=8,
                      max_positions=8, encoder_width=4)
    rng = np.random.default_rng(seed)
    model = BLIP(BLIPConfig(vision=vision, text=text, embed_dim=4), rng).to(np.float64)
    for name, p in model.named_params():
        if name != "temp":
            p.data[...] = (1.0 if name.endswith("gamma") else 0.0) + 0.4 * rng.standard_normal(p.shape)
    tok = Tokenizer(words)
    ids, mask = tok.encode(["a red circle", "a large blue square", "small square"], max_length=6)
    return model, tok, rng.standard_normal((3, 3, 4, 4)), ids, mask


def test_ex_6_1_repeated_negative_gradient():
    """ITM alone, image 0 drawn as the negative of two texts: its gradient must add up."""
    model, tok, images, ids, mask = _tiny_blip(61)
    pixels = Param(images, dtype=np.float64)
    negatives = (np.array([2, 0, 0]), np.array([1, 2, 0]))

    def loss_fn(backward):
        r = pretrain_step(model, pixels.data, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                          dec_id=tok.dec_id, negatives=negatives, weights=(0.0, 1.0, 0.0),
                          backward=backward)
        if backward:
            pixels.grad += r.d_images
        return r.loss

    gradcheck(loss_fn, [("pixels", pixels)] + model.visual_encoder.named_params(), n_coords=3,
              rtol=1e-5)


# ---------------------------------------------------------------------------
# 6.2 gather backward (notebook 06)
# ---------------------------------------------------------------------------

def test_ex_6_2_notebook():
    run_notebook("6.2")


# ---------------------------------------------------------------------------
# 7.1 nucleus filtering
# ---------------------------------------------------------------------------

def test_ex_7_1_top_p_keeps_the_nucleus():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # not sorted: the vocabulary order must come back
    logits = np.log(probs)[None]
    for top_p, keep in ((0.7, [False, True, False, True]), (0.9, [True, True, False, True]),
                        (0.1, [False, True, False, False]), (1.0, [True, True, True, True])):
        out = top_p_filter(logits, top_p)
        np.testing.assert_array_equal(np.isfinite(out[0]), keep, err_msg=f"top_p={top_p}")
        np.testing.assert_array_equal(out[0][keep], logits[0][keep])  # kept logits unchanged


### BEGIN HIDDEN TESTS
def test_ex_7_1_top_p_rows_and_ties():
    logits = np.log(np.array([[0.25, 0.25, 0.25, 0.25], [0.02, 0.08, 0.6, 0.3]]))
    out = top_p_filter(logits, 0.6)
    assert np.isfinite(out[0]).sum() == 3  # 0.25 + 0.25 < 0.6: a third token is needed
    np.testing.assert_array_equal(np.isfinite(out[1]), [False, False, True, False])
    assert np.isfinite(top_p_filter(logits, 0.61)[1]).sum() == 2
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 7.2 tied output backward (notebook 07)
# ---------------------------------------------------------------------------

def test_ex_7_2_notebook():
    run_notebook("7.2")


# ---------------------------------------------------------------------------
# 8.1 tying the MED encoder and decoder
# ---------------------------------------------------------------------------

def _text_config(depth=2):
    return TextConfig(vocab_size=12, width=4, depth=depth, heads=2, mlp_dim=8, max_positions=6,
                      encoder_width=3)


def test_ex_8_1_sharing_all_but_self_attention():
    enc, dec = build_med(_text_config(), np.random.default_rng(80))
    assert dec.bert.embeddings is enc.embeddings
    for e, d in zip(enc.layers, dec.bert.layers):
        for name in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
            assert getattr(d, name) is getattr(e, name), f"{name} is not shared"
        assert d.self_attn is not e.self_attn and d.self_attn_ln is not e.self_attn_ln
    assert dec.head.weight is enc.embeddings.word_embeddings.weight
    assert shared_parameter_names(enc, dec) == [n for n, _ in enc.named_params()
                                                if "self_attn" not in n]


### BEGIN HIDDEN TESTS
def test_ex_8_1_shared_gradient():
    """One loss through the encoder and the decoder: the shared Params get both parts."""
    rng = np.random.default_rng(81)
    enc, dec = build_med(_text_config(depth=1), rng)

    class Both(Module):
        def __init__(self):
            self.enc, self.dec = enc, dec

    both = Both().to(np.float64)
    for p in both.params():
        p.data[...] = 0.5 * rng.standard_normal(p.shape)
    ids = np.array([[1, 5, 7, 5], [2, 9, 3, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    image = rng.standard_normal((2, 3, 3))
    R_h, R_logits = rng.standard_normal((2, 4, 4)), rng.standard_normal((2, 4, 12))

    def loss_fn(backward):
        h, c_h = enc.forward(ids, mask, image)
        logits, c_l = dec.forward(ids, mask, image)
        if backward:
            dec.backward(R_logits, c_l)
            enc.backward(R_h, c_h)
        return float(np.sum(h * R_h) + np.sum(logits * R_logits))

    gradcheck(loss_fn, both, n_coords=2, seed=82)
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 8.2 one weight, two models (notebook 08)
# ---------------------------------------------------------------------------

def test_ex_8_2_notebook():
    run_notebook("8.2")
