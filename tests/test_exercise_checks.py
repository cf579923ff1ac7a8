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
from minblip.blip import BLIP, BLIPConfig, pretrain_step
from minblip.capfilt import bootstrap_captions, keep_mask
from minblip.exercises import BY_ID
from minblip.exercises.runner import run_notebook_exercise
from minblip.generation import top_p_filter
from minblip.hf import fused_qkv_from_hf, fused_qkv_to_hf, hf_state_dict, load_hf_state_dict
from minblip.layers import LayerNorm
from minblip.lm import LanguageModel, LMConfig, lm_step
from minblip.objectives import (causal_lm_targets, hard_negative_weights, itc_backward,
                                itc_forward, itc_max_backward, itc_max_forward)
from minblip.qformer import MODES, qformer_mask
from minblip.softmax import CrossEntropyLoss, Softmax, softmax
from minblip.text import TextConfig, build_med, shared_parameter_names
from minblip.tokenizer import Tokenizer
from minblip.vit import PatchEmbed, ViTConfig, conv2d_patchify_reference, patchify, unpatchify

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
# 1.3 softmax backward
# ---------------------------------------------------------------------------

def test_ex_1_3_softmax_gradcheck():
    rng = np.random.default_rng(14)
    check_layer(Softmax(), rng.standard_normal((3, 5)), seed=15)
    check_layer(Softmax(), 3.0 * rng.standard_normal((2, 3, 4)), seed=16)


### BEGIN HIDDEN TESTS
def test_ex_1_3_other_axis():
    """The layer's axis, not always the last one."""
    rng = np.random.default_rng(17)
    check_layer(Softmax(axis=0), rng.standard_normal((4, 3)), seed=18)
    check_layer(Softmax(axis=1), rng.standard_normal((2, 5, 3)), seed=19)
### END HIDDEN TESTS


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
# 2.2 the backward of the attention scores, 2.3 the attention forward (notebook 02)
# ---------------------------------------------------------------------------

def test_ex_2_2_notebook():
    run_notebook("2.2")


def test_ex_2_3_notebook():
    run_notebook("2.3")


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
# 3.2 unpatchify, the backward of patchify
# ---------------------------------------------------------------------------

def test_ex_3_2_unpatchify_entries():
    """Pixel (c, i*p + u, j*p + v) comes from patch i*gw + j, entry (c*p + u)*p + v."""
    rng = np.random.default_rng(32)
    p, gh, gw, C = 2, 2, 3, 3
    patches = rng.standard_normal((2, gh * gw, C * p * p))
    images = unpatchify(patches, p, gh * p, gw * p)
    assert images.shape == (2, C, gh * p, gw * p), images.shape
    for c, i, j, u, v in np.ndindex(C, gh, gw, p, p):
        np.testing.assert_array_equal(images[:, c, i * p + u, j * p + v],
                                      patches[:, i * gw + j, (c * p + u) * p + v],
                                      err_msg=f"pixel (c={c}, y={i * p + u}, x={j * p + v})")


### BEGIN HIDDEN TESTS
def test_ex_3_2_unpatchify_is_the_backward():
    rng = np.random.default_rng(33)
    pixels = Param(rng.standard_normal((2, 3, 4, 6)), dtype=np.float64)  # not square
    R = rng.standard_normal((2, 6, 12))

    def loss_fn(backward):
        if backward:
            pixels.grad += unpatchify(R, 2, 4, 6)
        return float(np.sum(patchify(pixels.data, 2) * R))

    gradcheck(loss_fn, {"pixels": pixels})
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 4.1 text embeddings backward, 4.2 the capstone (notebook 04)
# ---------------------------------------------------------------------------

def test_ex_4_1_notebook():
    run_notebook("4.1")


def test_ex_4_2_notebook():
    run_notebook("4.2")


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


# ---------------------------------------------------------------------------
# 9.1 the Q-Former's three masks
# ---------------------------------------------------------------------------

def _grid(text):
    """Rows of 0/1 digits (spaces ignored) -> a bool array."""
    return np.array([[c == "1" for c in line.replace(" ", "")]
                     for line in text.strip().split("\n")])


# two queries, then four text positions; per mode the first caption (its last position
# is [PAD]) and the second (no padding)
MASKS = {
    "itc": ("""
        11 0000
        11 0000
        00 1110
        00 1110
        00 1110
        00 1110""", """
        11 0000
        11 0000
        00 1111
        00 1111
        00 1111
        00 1111"""),
    "itm": ("""
        11 1110
        11 1110
        11 1110
        11 1110
        11 1110
        11 1110""", """
        11 1111
        11 1111
        11 1111
        11 1111
        11 1111
        11 1111"""),
    "itg": ("""
        11 0000
        11 0000
        11 1000
        11 1100
        11 1110
        11 1110""", """
        11 0000
        11 0000
        11 1000
        11 1100
        11 1110
        11 1111"""),
}


def test_ex_9_1_masks_block_by_block():
    text_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    for mode, pictures in MASKS.items():
        mask = qformer_mask(mode, 2, text_mask)
        assert mask.shape == (2, 6, 6) and mask.dtype == bool, (mode, mask.shape, mask.dtype)
        for b, picture in enumerate(pictures):
            np.testing.assert_array_equal(mask[b], _grid(picture),
                                          err_msg=f"mode {mode!r}, caption {b}")


def test_ex_9_1_modes_without_queries():
    np.testing.assert_array_equal(qformer_mask("queries", 3), np.ones((1, 3, 3), bool))
    text_mask = np.array([[1, 1, 0]])
    np.testing.assert_array_equal(qformer_mask("text", 0, text_mask)[0],
                                  _grid("110\n110\n110"))
    np.testing.assert_array_equal(qformer_mask("itg", 0, text_mask)[0],
                                  _grid("100\n110\n110"))


### BEGIN HIDDEN TESTS
def _mask_entry(mode, Q, valid_row, i, j):
    """Whether position i may attend to position j, by the table of minblip.qformer."""
    if j >= Q and not valid_row[j - Q]:
        return False  # a padded key is never seen
    query_i, query_j = i < Q, j < Q
    if mode in ("queries", "text", "itc"):
        return query_i == query_j
    if mode == "itm":
        return True
    return query_j or (not query_i and j <= i)  # itg


def test_ex_9_1_masks_entry_by_entry():
    rng = np.random.default_rng(90)
    for _ in range(6):
        B, Q, T = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
        lengths = rng.integers(1, T + 1, size=B)
        text_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(int)
        for mode in ("itc", "itm", "itg"):
            mask = qformer_mask(mode, Q, text_mask)
            expect = np.array([[[_mask_entry(mode, Q, text_mask[b], i, j)
                                 for j in range(Q + T)] for i in range(Q + T)] for b in range(B)])
            np.testing.assert_array_equal(mask, expect, err_msg=f"{mode} Q={Q} T={T}")
    assert set(MODES) == {"queries", "text", "itc", "itm", "itg"}
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 9.2 the learned queries' gradient (notebook 09)
# ---------------------------------------------------------------------------

def test_ex_9_2_notebook():
    run_notebook("9.2")


# ---------------------------------------------------------------------------
# 10.1 ITC with a maximum over the queries: the backward
# ---------------------------------------------------------------------------

def test_ex_10_1_itc_max_gradcheck():
    """Two queries, four texts: in every image some query wins at least two texts."""
    rng = np.random.default_rng(100)
    feats = Param(rng.standard_normal((4, 2, 3)), dtype=np.float64)
    text = Param(rng.standard_normal((4, 3)), dtype=np.float64)
    temp = Param(0.3, dtype=np.float64)

    def loss_fn(backward):
        loss, cache = itc_max_forward(feats.data, text.data, temp)
        if backward:
            d_feats, d_text = itc_max_backward(1.0, cache, temp)
            feats.grad += d_feats
            text.grad += d_text
        return loss

    gradcheck(loss_fn, {"image_feats": feats, "text_feat": text, "temp": temp}, n_coords=24)


### BEGIN HIDDEN TESTS
def test_ex_10_1_only_winners_get_gradient():
    rng = np.random.default_rng(101)
    B, Q, E, t = 3, 4, 5, 0.5
    feats, text = rng.standard_normal((B, Q, E)), rng.standard_normal((B, E))
    temp = Param(t, dtype=np.float64)
    _, cache = itc_max_forward(feats, text, temp, label_smoothing=0.0)
    d_feats, d_text = itc_max_backward(2.5, cache, temp)
    logits, eye = cache["sim"], np.eye(B)
    # dL/dlogits, both directions: (softmax - one-hot) / B, halved, times the upstream 2.5
    G = 2.5 * 0.5 * ((softmax(logits) - eye) + (softmax(logits.T) - eye).T) / B
    expect_feats, expect_text = np.zeros_like(feats), np.zeros_like(text)
    for b in range(B):
        for c in range(B):
            q = int(np.argmax(feats[b] @ text[c]))
            expect_feats[b, q] += G[b, c] / t * text[c]
            expect_text[c] += G[b, c] / t * feats[b, q]
    np.testing.assert_allclose(d_feats, expect_feats, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d_text, expect_text, rtol=1e-10, atol=1e-12)
    assert math.isclose(float(temp.grad), -np.sum(G * logits) / t, rel_tol=1e-10)
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 10.2 ITG inputs and targets (notebook 10)
# ---------------------------------------------------------------------------

def test_ex_10_2_notebook():
    run_notebook("10.2")


# ---------------------------------------------------------------------------
# 11.1 masking the soft prompt out of the LM loss
# ---------------------------------------------------------------------------

def test_ex_11_1_targets():
    ids = np.array([[2, 5, 6, 7, 3, 0], [2, 8, 3, 0, 0, 0]])  # [CLS] words [SEP] [PAD]..
    mask = (ids != 0).astype(int)
    I = -100
    got = causal_lm_targets(ids, mask, n_prefix=3, prompt_length=2)
    assert got.shape == (2, 9) and got.dtype == np.int64
    np.testing.assert_array_equal(got, [[I, I, I, I, I, 6, 7, 3, I],
                                        [I, I, I, I, I, 3, I, I, I]])
    # LAVIS pre-trains with the empty prompt: then [CLS] itself is a target
    np.testing.assert_array_equal(causal_lm_targets(ids, mask, n_prefix=2),
                                  [[I, I, 2, 5, 6, 7, 3, I], [I, I, 2, 8, 3, I, I, I]])
    np.testing.assert_array_equal(causal_lm_targets(ids, mask), np.where(mask, ids, I))


### BEGIN HIDDEN TESTS
def test_ex_11_1_lm_loss_by_hand():
    """lm_step's loss is the mean -log p of exactly the tokens after the prompt."""
    rng = np.random.default_rng(110)
    lm = LanguageModel(LMConfig(vocab_size=9, width=8, depth=1, heads=2, mlp_dim=8,
                                max_positions=12), rng).to(np.float64)
    ids = np.array([[2, 5, 6, 7, 3, 0], [2, 8, 3, 0, 0, 0]])
    mask = (ids != 0).astype(int)
    prefix = rng.standard_normal((2, 3, 8))
    loss, _ = lm_step(lm, ids, mask, prefix, prompt_length=2, backward=False)
    logits, _ = lm.forward(ids, mask, prefix_embeds=prefix)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = [-logp[b, 3 + s - 1, ids[b, s]] for b in range(2) for s in range(2, 6) if mask[b, s]]
    assert len(nll) == 4
    assert math.isclose(loss, float(np.mean(nll)), rel_tol=1e-10)
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 11.2 the soft prompt's projection backward (notebook 11)
# ---------------------------------------------------------------------------

def test_ex_11_2_notebook():
    run_notebook("11.2")


# ---------------------------------------------------------------------------
# 12.1 the fused qkv weight of a Hugging Face ViT
# ---------------------------------------------------------------------------

def test_ex_12_1_fused_qkv_acts_like_nn_linear():
    rng = np.random.default_rng(120)
    D = 4
    x = rng.standard_normal((5, D))
    fused = rng.standard_normal((3 * D, D))  # nn.Linear(D, 3D).weight: y = x @ weight.T
    parts = np.split(x @ fused.T, 3, axis=-1)  # BlipAttention: q, k, v in this order
    weights = fused_qkv_from_hf(fused)
    assert len(weights) == 3 and all(w.shape == (D, D) for w in weights)
    for name, w, part in zip("qkv", weights, parts):
        np.testing.assert_allclose(x @ w, part, rtol=1e-12, err_msg=f"W{name}")
    w_q, w_k, w_v = (rng.standard_normal((D, D)) for _ in range(3))
    back = fused_qkv_to_hf([w_q, w_k, w_v])
    assert back.shape == (3 * D, D)
    np.testing.assert_allclose(x @ back.T, np.concatenate([x @ w_q, x @ w_k, x @ w_v], axis=-1),
                               rtol=1e-12)
    np.testing.assert_array_equal(fused_qkv_to_hf(fused_qkv_from_hf(fused)), fused)


### BEGIN HIDDEN TESTS
def test_ex_12_1_state_dict_round_trip():
    model, _, images, _, _ = _tiny_blip(121)
    other, _, _, _, _ = _tiny_blip(122)
    tensors = hf_state_dict(model, "retrieval")
    attn = model.visual_encoder.blocks[0].attn
    fused = tensors["vision_model.encoder.layers.0.self_attn.qkv.weight"]
    np.testing.assert_array_equal(fused[:4], attn.query.W.data.T)
    np.testing.assert_array_equal(fused[8:], attn.value.W.data.T)
    load_hf_state_dict(other, tensors, "retrieval")
    for lin in ("query", "key", "value"):
        np.testing.assert_array_equal(getattr(other.visual_encoder.blocks[0].attn, lin).W.data,
                                      getattr(attn, lin).W.data)
    np.testing.assert_array_equal(other.visual_encoder.forward(images)[0],
                                  model.visual_encoder.forward(images)[0])
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 13.1 the CapFilt filter decision
# ---------------------------------------------------------------------------

def test_ex_13_1_keep_mask():
    p = np.array([0.2, 0.5, 0.5 + 1e-9, 0.9, 1.0, 0.0])
    np.testing.assert_array_equal(keep_mask(p), [False, False, True, True, True, False])
    np.testing.assert_array_equal(keep_mask(p, 0.85), [False, False, False, True, True, False])
    assert keep_mask(p).dtype == bool


def test_ex_13_1_bootstrap_settings():
    web, syn = ["w0", "w1", "w2"], ["s0", "s1", "s2"]
    p_web, p_syn = [0.9, 0.3, 0.6], [0.2, 0.7, 0.5]  # 0.5 is not above the threshold
    settings = {(True, True): [["w0"], ["s1"], ["w2"]],
                (True, False): [["w0", "s0"], ["w1", "s1"], ["w2", "s2"]],
                (False, True): [["w0"], [], ["w2"]],
                (False, False): [["w0"], ["w1"], ["w2"]]}
    for (captioner, filt), expect in settings.items():
        got = bootstrap_captions(web, syn, p_web, p_syn, use_captioner=captioner,
                                 use_filter=filt)
        assert got == expect, f"use_captioner={captioner}, use_filter={filt}: {got}"


### BEGIN HIDDEN TESTS
def test_ex_13_1_bootstrap_threshold_and_order():
    got = bootstrap_captions(["w0", "w1", "w2"], ["s0", "s1", "s2"], [0.9, 0.3, 0.2],
                             [0.3, 0.1, 0.9], threshold=0.25)
    assert got == [["w0", "s0"], ["w1"], ["s2"]]
### END HIDDEN TESTS


# ---------------------------------------------------------------------------
# 13.2 p(match) from the ITM logits (notebook 13)
# ---------------------------------------------------------------------------

def test_ex_13_2_notebook():
    run_notebook("13.2")


# ---------------------------------------------------------------------------
# 14.1 linear warmup, then cosine decay (notebook 14)
# ---------------------------------------------------------------------------

def test_ex_14_1_notebook():
    run_notebook("14.1")


# ---------------------------------------------------------------------------
# 14.2 AdamW's decoupled weight decay (notebook 14)
# ---------------------------------------------------------------------------

def test_ex_14_2_notebook():
    run_notebook("14.2")
