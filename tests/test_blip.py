"""BLIP: the three objectives, the shared-parameter pretraining step and its gradient."""
import math

import numpy as np
import pytest

from minblip.blip import (BLIP, BLIPConfig, MomentumDistillation, hard_negative_weights,
                          itc_backward, itc_forward, pretrain_step, sample_hard_negatives)
from minblip.core import Param
from minblip.gradcheck import gradcheck
from minblip.softmax import softmax
from minblip.text import TextConfig
from minblip.tokenizer import Tokenizer
from minblip.vit import ViTConfig

WORDS = "a red blue green circle square small large left right of the picture".split()


def tiny_config(sharing="all_but_self_attention", **kw):
    vision = ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16)
    text = TextConfig(vocab_size=len(WORDS) + 6, width=8, depth=1, heads=2, mlp_dim=16,
                      max_positions=12, encoder_width=8)
    return BLIPConfig(vision=vision, text=text, embed_dim=6, sharing=sharing, **kw)


def randomize(model, rng, scale=0.3):
    """Wider weights than the 0.02 init, so every gradient is far from zero."""
    for name, p in model.named_params():
        if name.endswith("gamma"):
            p.data[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
        elif name != "temp":
            p.data[...] = scale * rng.standard_normal(p.shape)


def batch(rng, B=3, dtype=np.float64):
    tok = Tokenizer(WORDS)
    texts = ["a red circle", "a large blue square left of a green circle", "a small square",
             "the green circle", "a picture of a red square"][:B]
    ids, mask = tok.encode(texts, max_length=10)
    images = rng.standard_normal((B, 3, 8, 8)).astype(dtype)
    return tok, images, ids, mask


def make_model(seed=0, sharing="all_but_self_attention", dtype=np.float64):
    rng = np.random.default_rng(seed)
    model = BLIP(tiny_config(sharing), rng).to(dtype)
    randomize(model, rng)
    return model


@pytest.mark.parametrize("sharing", ["all_but_self_attention", "all", "none"])
def test_pretrain_step_gradient_every_param_and_pixels(sharing):
    model = make_model(1, sharing)
    tok, images, ids, mask = batch(np.random.default_rng(2))
    pixels = Param(images, dtype=np.float64)
    negatives = (np.array([2, 0, 0]), np.array([1, 1, 0]))  # image 0 is a negative twice

    def loss_fn(backward):
        if backward:
            model.zero_grad()
        r = pretrain_step(model, pixels.data, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                          dec_id=tok.dec_id, negatives=negatives, backward=backward)
        if backward:
            pixels.grad += r.d_images
        return r.loss

    named = model.named_params() + [("pixels", pixels)]
    report = gradcheck(loss_fn, named, n_coords=4, rtol=1e-5)
    assert report.passed


def test_each_objective_contributes_exactly_its_gradient():
    model = make_model(3)
    tok, images, ids, mask = batch(np.random.default_rng(4))
    negatives = (np.array([1, 2, 0]), np.array([2, 0, 1]))
    kw = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id, negatives=negatives)

    def grads(weights):
        model.zero_grad()
        r = pretrain_step(model, images, ids, mask, weights=weights, **kw)
        return r, [p.grad.copy() for p in model.params()]

    full, g_all = grads((1.0, 1.0, 1.0))
    parts = [grads(w) for w in [(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)]]
    for k, g in enumerate(g_all):
        np.testing.assert_allclose(g, sum(p[1][k] for p in parts), rtol=1e-10, atol=1e-12)
    assert math.isclose(full.loss, sum(p[0].loss for p in parts), rel_tol=1e-12)
    without_lm, g_no_lm = grads((1.0, 1.0, 0))
    lm_only = parts[2][1]
    for a, b, c in zip(g_all, g_no_lm, lm_only):
        np.testing.assert_allclose(a - b, c, rtol=1e-9, atol=1e-12)
    # the decoder-only LM head gets gradient from LM alone
    model.zero_grad()
    pretrain_step(model, images, ids, mask, weights=(1.0, 1.0, 0.0), **kw)
    assert np.all(model.text_decoder.head.bias.grad == 0)


def test_shared_parameters_are_the_same_objects():
    for sharing in ["all_but_self_attention", "all", "none"]:
        model = make_model(0, sharing)
        enc, dec = model.text_encoder, model.text_decoder.bert
        for le, ld in zip(enc.layers, dec.layers):
            shared_sa = le.self_attn is ld.self_attn
            shared_ffn = le.ffn is ld.ffn and le.cross_attn is ld.cross_attn
            assert shared_sa == (sharing == "all")
            assert shared_ffn == (sharing != "none")
        assert (enc.embeddings is dec.embeddings) == (sharing != "none")
        # the LM head reads the decoder's word embedding table
        assert model.text_decoder.head.weight is dec.embeddings.word_embeddings.weight
        ids = [id(p) for p in model.params()]
        assert len(ids) == len(set(ids))


def test_parameter_count_shrinks_with_sharing():
    counts = {s: make_model(0, s).param_count() for s in ["none", "all_but_self_attention", "all"]}
    assert counts["none"] > counts["all_but_self_attention"] > counts["all"]


def test_itc_symmetric_under_swapping_images_and_texts():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 4))
    b = rng.standard_normal((5, 4))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    temp = Param(0.1, dtype=np.float64)
    l1, _ = itc_forward(a, b, temp)
    l2, _ = itc_forward(b, a, temp)
    assert l1 == pytest.approx(l2, rel=1e-14)


def test_itc_equals_log_n_when_all_similarities_are_equal():
    n = 7
    feats = np.tile(np.array([[0.6, 0.8]]), (n, 1))
    loss, _ = itc_forward(feats, feats.copy(), Param(0.07, dtype=np.float64))
    assert loss == pytest.approx(math.log(n), rel=1e-12)


def test_itc_gradient_closed_form_3x3():
    """With S = I T^T / t, dL/dI = (1/2B) [(P_i2t - Y) T + (P_t2i - Y)^T T] / t."""
    rng = np.random.default_rng(1)
    img = rng.standard_normal((3, 4))
    txt = rng.standard_normal((3, 4))
    t = 0.2
    temp = Param(t, dtype=np.float64)
    loss, cache = itc_forward(img, txt, temp)
    d_img, d_txt = itc_backward(1.0, cache, temp)
    S = img @ txt.T / t
    Y = np.eye(3)
    P_i2t, P_t2i = softmax(S), softmax(S.T)
    expect_img = ((P_i2t - Y) @ txt + (P_t2i - Y).T @ txt) / (2 * 3 * t)
    expect_txt = ((P_t2i - Y) @ img + (P_i2t - Y).T @ img) / (2 * 3 * t)
    np.testing.assert_allclose(d_img, expect_img, rtol=1e-12)
    np.testing.assert_allclose(d_txt, expect_txt, rtol=1e-12)
    expect_loss = -0.5 * (np.mean(np.log(np.diag(P_i2t))) + np.mean(np.log(np.diag(P_t2i))))
    assert loss == pytest.approx(expect_loss, rel=1e-12)
    # d loss / d t = -sum(dlogits * S) / t
    expect_dt = -0.5 / 3 * (np.sum((P_i2t - Y) * S) + np.sum((P_t2i - Y) * S.T)) / t
    assert temp.grad == pytest.approx(expect_dt, rel=1e-10)


def test_itc_with_momentum_banks_gradient():
    rng = np.random.default_rng(5)
    img = Param(rng.standard_normal((3, 4)), dtype=np.float64)
    txt = Param(rng.standard_normal((3, 4)), dtype=np.float64)
    temp = Param(0.3, dtype=np.float64)
    image_bank = rng.standard_normal((6, 4))
    text_bank = rng.standard_normal((6, 4))
    soft = softmax(rng.standard_normal((3, 6)))

    def loss_fn(backward):
        loss, cache = itc_forward(img.data, txt.data, temp, image_bank, text_bank, soft, soft)
        if backward:
            di, dt = itc_backward(1.0, cache, temp)
            img.grad += di
            txt.grad += dt
        return loss

    gradcheck(loss_fn, {"image_feat": img, "text_feat": txt, "temp": temp})


def test_hard_negative_weights_and_sampling():
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((4, 4)) * 3
    w = hard_negative_weights(sim)
    assert np.all(np.diag(w) == 0)
    np.testing.assert_allclose(w + np.eye(4) * (softmax(sim) + 1e-4), softmax(sim) + 1e-4)
    draws = np.array([sample_hard_negatives(sim, sim.T, np.random.default_rng(s))[1]
                      for s in range(4000)])
    assert not np.any(draws == np.arange(4))  # never the positive
    freq = np.mean(draws[:, 0][:, None] == np.arange(4), axis=0)
    expect = w[0] / w[0].sum()
    np.testing.assert_allclose(freq, expect, atol=0.03)
    a = sample_hard_negatives(sim, sim.T, np.random.default_rng(9))
    b = sample_hard_negatives(sim, sim.T, np.random.default_rng(9))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sampled_negatives_are_reported_and_repeatable():
    model = make_model(2)
    tok, images, ids, mask = batch(np.random.default_rng(3), B=4)
    kw = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id)
    model.zero_grad()
    r1 = pretrain_step(model, images, ids, mask, rng=np.random.default_rng(7), **kw)
    g1 = [p.grad.copy() for p in model.params()]
    model.zero_grad()
    r2 = pretrain_step(model, images, ids, mask,
                       negatives=(r1.neg_image_idx, r1.neg_text_idx), **kw)
    assert r1.loss == r2.loss
    for a, p in zip(g1, model.params()):
        np.testing.assert_array_equal(a, p.grad)


def test_batch_of_one_works():
    model = make_model(0)
    tok, images, ids, mask = batch(np.random.default_rng(0), B=1)
    model.zero_grad()
    r = pretrain_step(model, images, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                      dec_id=tok.dec_id, rng=np.random.default_rng(0))
    assert r.losses["itc"] == pytest.approx(0.0, abs=1e-12)  # one pair: softmax over one entry
    assert r.losses["itm"] == 0.0 and r.losses["lm"] > 0
    assert np.isfinite(r.loss)


def test_lm_loss_ignores_padding_and_prompt_tokens():
    model = make_model(4)
    tok, images, ids, mask = batch(np.random.default_rng(1))
    kw = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id, weights=(0, 0, 1.0))
    dec_ids = ids.copy()
    dec_ids[:, 0] = tok.dec_id
    embeds, _ = model.visual_encoder.forward(images)
    logits, _ = model.text_decoder.forward(dec_ids, mask, embeds)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for prompt in [0, 3]:
        # position t predicts token t+1; a target counts if it is real text beyond the prompt
        terms = []
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if mask[b, t + 1] and t + 1 >= prompt:
                    lp = logp[b, t]
                    terms.append(0.9 * -lp[ids[b, t + 1]] + 0.1 * -lp.mean())
        r = pretrain_step(model, images, ids, mask, prompt_length=prompt, backward=False, **kw)
        assert r.losses["lm"] == pytest.approx(np.mean(terms), rel=1e-12)


def test_momentum_distillation_update_and_queue():
    model = make_model(0, dtype=np.float64)
    tok, images, ids, mask = batch(np.random.default_rng(0))
    md = MomentumDistillation(model, queue_size=6, momentum=0.9)
    assert all(a is not b for a, b in zip(md.params(), model.params()))
    before = [p.data.copy() for p in md.visual_encoder.params()]
    for p in model.visual_encoder.params():
        p.data += 1.0
    md.update(model)
    for b, pm, p in zip(before, md.visual_encoder.params(), model.visual_encoder.params()):
        np.testing.assert_allclose(pm.data, 0.9 * b + 0.1 * p.data)
    model.zero_grad()
    r = pretrain_step(model, images, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                      dec_id=tok.dec_id, rng=np.random.default_rng(1), momentum=md, alpha=0.4)
    assert np.isfinite(r.loss)
    assert md.queue_ptr == 3
    assert r.sim_i2t.shape == (3, 3 + 6)
    with pytest.raises(ValueError, match="multiple of the batch size"):
        MomentumDistillation(model, queue_size=4).enqueue(np.zeros((3, 6)), np.zeros((3, 6)))


def test_temperature_clamp():
    model = make_model(0)
    model.temp.data[...] = 5.0
    model.clamp_temperature()
    assert float(model.temp.data) == 0.5
    model.temp.data[...] = -1.0
    model.clamp_temperature()
    assert float(model.temp.data) == 0.001


def test_bad_input_messages():
    model = make_model(0)
    tok, images, ids, mask = batch(np.random.default_rng(0))
    kw = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id,
              rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="ids and mask"):
        pretrain_step(model, images, ids[:2], mask[:2], **kw)
    with pytest.raises((ValueError, TypeError)):
        pretrain_step(model, images[:, :, :4], ids, mask, **kw)
    with pytest.raises(TypeError, match="floating"):
        pretrain_step(model, (images * 10).astype(np.uint8), ids, mask, **kw)
    with pytest.raises(ValueError, match="encoder_width"):
        BLIPConfig(vision=ViTConfig(width=16, heads=2), text=TextConfig(vocab_size=10))
    with pytest.raises(ValueError, match="sharing"):
        tiny_config(sharing="some")


def test_config_round_trip():
    cfg = tiny_config()
    assert BLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_float32_training_step_runs_in_float32():
    model = make_model(0, dtype=np.float32)
    tok, images, ids, mask = batch(np.random.default_rng(0), dtype=np.float32)
    model.zero_grad()
    r = pretrain_step(model, images, ids, mask, cls_id=tok.cls_id, enc_id=tok.enc_id,
                      dec_id=tok.dec_id, rng=np.random.default_rng(0))
    assert all(p.grad.dtype == np.float32 for p in model.params())
    assert r.d_images.dtype == np.float32
