"""BLIP-2 stage 1: the frozen image encoder, ITC with the max over queries, the
BLIP-2 negatives, the ITM and ITG passes, the whole step's gradient, training."""
import math

import numpy as np
import pytest

from minblip import world
from minblip.blip2_stage1 import Blip2Config, Blip2Stage1, sample_blip2_negatives, stage1_step
from minblip.core import Param
from minblip.evaluate_blip2 import stage1_captions, stage1_retrieval_metrics
from minblip.gradcheck import gradcheck
from minblip.objectives import (blip2_negative_weights, itc_max_backward, itc_max_forward,
                                sample_negatives)
from minblip.optim import AdamW, clip_grad_norm
from minblip.qformer import QFormerConfig
from minblip.softmax import log_softmax
from minblip.tokenizer import Tokenizer
from minblip.train import Trainer
from minblip.train_blip2 import Stage1Config, Stage1Training, pretrained_vision
from minblip.vit import ViTConfig, VisionTransformer

WORDS = "a red blue green circle square small large left right of the picture".split()
TOK = Tokenizer(WORDS)
TEXTS = ["a red circle", "a large blue square left of a green circle", "a small square",
         "the green circle"]


def tiny_config(**kw):
    vision = ViTConfig(image_size=8, patch_size=4, width=6, depth=1, heads=2, mlp_dim=12)
    q = QFormerConfig(vocab_size=TOK.vocab_size, width=8, depth=2, heads=2, mlp_dim=12,
                      num_queries=3, encoder_width=6, max_positions=12)
    return Blip2Config(qformer=q, vision=vision, embed_dim=5, **kw)


def make_model(seed=0, dtype=np.float64, randomize=True):
    rng = np.random.default_rng(seed)
    model = Blip2Stage1(tiny_config(), rng).to(dtype)
    if randomize:  # wider weights than the 0.02 init, so every gradient is far from zero
        for name, p in model.named_params():
            if name.endswith("gamma"):
                p.data[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
            elif name != "temp":
                p.data[...] += 0.4 * rng.standard_normal(p.shape)
        model.temp.data[...] = 0.5
    return model


def batch(B=3, seed=0, dtype=np.float64):
    ids, mask = TOK.encode(TEXTS[:B], max_length=10)
    images = np.random.default_rng(seed).standard_normal((B, 3, 8, 8)).astype(dtype)
    return images, ids, mask


def test_stage1_step_gradient_every_param():
    model = make_model(1)
    images, ids, mask = batch()
    negatives = (np.array([2, 0, 0]), np.array([1, 1, 0]))  # image 0 is a negative twice

    def loss_fn(backward):
        if backward:
            model.zero_grad()
        return stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, negatives=negatives,
                           backward=backward).loss

    report = gradcheck(loss_fn, model, n_coords=3, rtol=1e-5)
    names = [r.name for r in report.rows]
    assert "qformer.query_tokens" in names and "ln_vision.gamma" in names and "temp" in names
    assert not any(n.startswith("visual_encoder") for n in names)
    assert report.passed and report.max_rel_err <= 1e-5


def test_each_objective_adds_exactly_its_gradient():
    model = make_model(2)
    images, ids, mask = batch()
    negatives = (np.array([1, 2, 0]), np.array([2, 0, 1]))

    def grads(weights):
        model.zero_grad()
        r = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, negatives=negatives,
                        weights=weights)
        return r, [p.grad.copy() for p in model.params()]

    full, g_all = grads((1.0, 1.0, 1.0))
    parts = [grads(w) for w in [(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)]]
    for k, g in enumerate(g_all):
        np.testing.assert_allclose(g, sum(p[1][k] for p in parts), rtol=1e-10, atol=1e-12)
    assert math.isclose(full.loss, sum(p[0].loss for p in parts), rel_tol=1e-12)
    head = [i for i, (n, _) in enumerate(model.named_params()) if n == "lm_head.bias"][0]
    assert np.all(parts[0][1][head] == 0) and np.all(parts[1][1][head] == 0)  # ITG only


# ---------------------------------------------------------------------------------------
# The frozen image encoder
# ---------------------------------------------------------------------------------------

def test_params_exclude_the_frozen_encoder():
    model = make_model(0)
    vit_ids = {id(p) for p in model.visual_encoder.params(include_frozen=True)}
    assert vit_ids and not vit_ids & {id(p) for p in model.params()}
    assert model.visual_encoder.frozen and model.visual_encoder.params() == []
    counts = model.parameter_counts()
    assert counts["frozen"] == model.visual_encoder.param_count(include_frozen=True) > 0
    assert counts["trainable"] == sum(p.size for p in model.params())
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    assert counts["parts"]["visual_encoder"] == (0, counts["frozen"])
    # the LM head is tied to the Q-Former's word embeddings: one Param, listed once
    assert model.lm_head.weight is model.qformer.embeddings.word_embeddings.weight
    ids = [id(p) for p in model.params()]
    assert len(ids) == len(set(ids))


def test_frozen_encoder_gets_no_gradient_and_never_changes():
    model = make_model(3, dtype=np.float32, randomize=False)
    vit = model.visual_encoder
    before = [p.data.copy() for p in vit.params(include_frozen=True)]
    trainable_before = [p.data.copy() for p in model.params()]
    opt = AdamW(model, lr=1e-2, weight_decay=0.05)
    images, ids, mask = batch(4, dtype=np.float32)
    for step in range(3):
        model.zero_grad()
        stage1_step(model, images, ids, mask, dec_id=TOK.dec_id,
                    rng=np.random.default_rng(step))
        assert all(not p.grad.any() for p in vit.params(include_frozen=True))  # none computed
        clip_grad_norm(model, 1.0)
        opt.step()
    for b, p in zip(before, vit.params(include_frozen=True)):
        np.testing.assert_array_equal(p.data, b)  # its parameters never change
    assert all(not np.array_equal(b, p.data) for b, p in zip(trainable_before, model.params())
               if p.grad.any())
    assert model.ln_vision.gamma.grad.any()  # ln_vision is trainable (LAVIS does not freeze it)


def test_to_switches_the_frozen_encoder_too():
    model = Blip2Stage1(tiny_config(), np.random.default_rng(0))
    model.to(np.float64)
    assert all(p.dtype == np.float64 for p in model.visual_encoder.params(include_frozen=True))


def test_given_encoder_is_used_and_checked():
    cfg = tiny_config()
    vit = VisionTransformer(cfg.vision, np.random.default_rng(5))
    model = Blip2Stage1(cfg, np.random.default_rng(0), visual_encoder=vit)
    assert model.visual_encoder is vit and vit.frozen  # frozen in place, not copied
    other = VisionTransformer(ViTConfig(image_size=8, patch_size=4, width=6, depth=2, heads=2,
                                        mlp_dim=12), np.random.default_rng(0))
    with pytest.raises(ValueError, match="differs from cfg.vision"):
        Blip2Stage1(cfg, np.random.default_rng(0), visual_encoder=other)
    with pytest.raises(TypeError, match="VisionTransformer"):
        Blip2Stage1(cfg, np.random.default_rng(0), visual_encoder=model.qformer)


def test_precomputed_features_give_the_same_step():
    model = make_model(4)
    images, ids, mask = batch()
    kw = dict(dec_id=TOK.dec_id, negatives=(np.array([1, 2, 0]), np.array([2, 0, 1])))
    model.zero_grad()
    a = stage1_step(model, images, ids, mask, **kw)
    g = [p.grad.copy() for p in model.params()]
    model.zero_grad()
    b = stage1_step(model, None, ids, mask, image_features=model.frozen_features(images), **kw)
    assert a.loss == b.loss
    for x, p in zip(g, model.params()):
        np.testing.assert_array_equal(x, p.grad)


# ---------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------

def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_itc_max_matches_lavis_two_directions_and_label_smoothing():
    rng = np.random.default_rng(0)
    img, txt = unit(rng.standard_normal((4, 3, 5))), unit(rng.standard_normal((4, 5)))
    t = 0.3
    loss, cache = itc_max_forward(img, txt, Param(t, dtype=np.float64))
    # LAVIS computes the two directions separately: sim_q2t (B, B, Q) and sim_t2q (B, B, Q)
    sim_i2t = np.einsum("bqe,ce->bcq", img, txt).max(-1) / t
    sim_t2i = np.einsum("ce,bqe->cbq", txt, img).max(-1) / t
    K, eps = 4, 0.1
    target = (1 - eps) * np.eye(K) + eps / K

    def ce(logits):
        return -np.mean(np.sum(target * log_softmax(logits), axis=1))

    assert loss == pytest.approx(0.5 * (ce(sim_i2t) + ce(sim_t2i)), rel=1e-12)
    np.testing.assert_allclose(cache["sim"], sim_i2t, rtol=1e-12)
    np.testing.assert_array_equal(cache["best_query"],
                                  np.einsum("bqe,ce->bcq", img, txt).argmax(-1))


def test_itc_max_gradient_goes_only_to_winning_queries():
    rng = np.random.default_rng(1)
    img = Param(unit(rng.standard_normal((3, 4, 5))), dtype=np.float64)
    txt = Param(unit(rng.standard_normal((3, 5))), dtype=np.float64)
    temp = Param(0.2, dtype=np.float64)

    def loss_fn(backward):
        loss, cache = itc_max_forward(img.data, txt.data, temp)
        if backward:
            di, dt = itc_max_backward(1.0, cache, temp)
            img.grad += di
            txt.grad += dt
        return loss

    gradcheck(loss_fn, {"image_feats": img, "text_feat": txt, "temp": temp})
    _, cache = itc_max_forward(img.data, txt.data, temp)
    winners = np.zeros((3, 4), bool)
    winners[np.arange(3)[:, None], cache["best_query"]] = True
    d_img, _ = itc_max_backward(1.0, cache, Param(0.2, dtype=np.float64))
    assert np.all(d_img[~winners] == 0) and np.all(np.abs(d_img[winners]).sum(-1) > 0)


def test_temperature_is_not_clamped():
    model = make_model(0)
    model.temp.data[...] = 5.0  # BLIP would clamp this to 0.5
    images, ids, mask = batch()
    r = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id,
                    negatives=(np.array([1, 2, 0]), np.array([2, 0, 1])), backward=False)
    assert float(model.temp.data) == 5.0
    assert np.abs(r.sim_i2t).max() <= 1.0 / 5.0 + 1e-12


# ---------------------------------------------------------------------------------------
# ITM negatives and the ITM pass
# ---------------------------------------------------------------------------------------

def test_negative_weights_set_the_diagonal_before_the_softmax():
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((4, 4)) * 3
    w = blip2_negative_weights(sim)
    assert np.all(np.diag(w) == 0)
    np.testing.assert_allclose(w.sum(1), 1.0)
    off = ~np.eye(4, dtype=bool)
    expect = np.where(off, np.exp(sim), 0)
    np.testing.assert_allclose(w, expect / expect.sum(1, keepdims=True), rtol=1e-12)
    draws = np.array([sample_blip2_negatives(sim, np.random.default_rng(s))[1]
                      for s in range(3000)])
    assert not np.any(draws == np.arange(4))
    freq = np.mean(draws[:, 0][:, None] == np.arange(4), axis=0)
    np.testing.assert_allclose(freq, w[0], atol=0.03)


def test_itm_rows_are_pos_pos_neg_with_images_pos_neg_pos():
    model = make_model(5)
    images, ids, mask = batch()
    neg_img, neg_txt = np.array([2, 2, 0]), np.array([1, 0, 0])
    r = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, negatives=(neg_img, neg_txt),
                    backward=False)
    embeds = model.image_embeds(images)
    pairs = [(b, b) for b in range(3)] + [(neg_img[b], b) for b in range(3)] \
        + [(b, neg_txt[b]) for b in range(3)]  # (image, text)
    for row, (i, t) in enumerate(pairs):
        expect = model.itm_logits(embeds[i:i + 1], ids[t:t + 1], mask[t:t + 1])[0]
        np.testing.assert_allclose(r.itm_logits[row], expect, rtol=1e-10, atol=1e-12)
    labels = np.array([1] * 3 + [0] * 6)
    assert r.losses["itm"] == pytest.approx(-np.mean(log_softmax(r.itm_logits)[np.arange(9),
                                                                               labels]))


def test_sampled_negatives_are_reported_and_repeatable():
    model = make_model(6)
    images, ids, mask = batch(4)
    model.zero_grad()
    r1 = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, rng=np.random.default_rng(7))
    g1 = [p.grad.copy() for p in model.params()]
    assert not np.any(r1.neg_image_idx == np.arange(4))
    model.zero_grad()
    r2 = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id,
                     negatives=(r1.neg_image_idx, r1.neg_text_idx))
    assert r1.loss == r2.loss
    for a, p in zip(g1, model.params()):
        np.testing.assert_array_equal(a, p.grad)


# ---------------------------------------------------------------------------------------
# ITG
# ---------------------------------------------------------------------------------------

def test_itg_loss_equals_the_cached_formulation_by_hand():
    """[DEC] first, shifted targets, padding ignored, label smoothing 0.1, and the
    text reading the queries through their cached keys and values (LAVIS)."""
    model = make_model(7)
    images, ids, mask = batch()
    r = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, weights=(0, 0, 1.0),
                    backward=False)
    kv = model.qformer.query_kv(model.image_embeds(images))
    terms = []
    for b in range(3):
        n = int(mask[b].sum())
        dec = ids[b:b + 1, :n].copy()
        dec[0, 0] = TOK.dec_id
        h, _ = model.qformer.forward_incremental(dec, [(k[b:b + 1], v[b:b + 1]) for k, v in kv])
        logp = log_softmax(model.lm_head.forward(h)[0][0])
        for t in range(n - 1):
            terms.append(0.9 * -logp[t, ids[b, t + 1]] + 0.1 * -logp[t].mean())
    assert r.losses["itg"] == pytest.approx(np.mean(terms), rel=1e-12)


def test_captions_come_from_the_itg_head():
    model = make_model(8, randomize=False)
    images, _, _ = batch(2)
    caps = stage1_captions(model, TOK, images=images, max_length=6)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    beam = stage1_captions(model, TOK, images=images, method="beam", max_length=6)
    assert len(beam) == 2


# ---------------------------------------------------------------------------------------
# Batch of one, dtype, bad input
# ---------------------------------------------------------------------------------------

def test_batch_of_one():
    model = make_model(0)
    images, ids, mask = batch(1)
    model.zero_grad()
    r = stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, rng=np.random.default_rng(0))
    assert r.losses["itc"] == pytest.approx(0.0, abs=1e-12)  # one pair: a softmax over one entry
    assert r.losses["itm"] == 0.0 and r.itm_logits is None  # no negative to match against
    assert r.losses["itg"] > 0 and np.isfinite(r.loss)
    with pytest.raises(ValueError, match="at least 2"):
        sample_negatives(np.ones((1, 1)), np.ones((1, 1)), np.random.default_rng(0))


def test_float32_step_stays_float32():
    model = make_model(0, dtype=np.float32)
    images, ids, mask = batch(dtype=np.float32)
    model.zero_grad()
    stage1_step(model, images, ids, mask, dec_id=TOK.dec_id, rng=np.random.default_rng(0))
    assert all(p.grad.dtype == np.float32 for p in model.params())


def test_bad_input_messages():
    model = make_model(0)
    images, ids, mask = batch()
    kw = dict(dec_id=TOK.dec_id, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="same shape"):
        stage1_step(model, images, ids, mask[:, :4], **kw)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        stage1_step(model, images, ids[:2], mask[:2], **kw)
    with pytest.raises(ValueError, match="exactly one of images"):
        stage1_step(model, None, ids, mask, **kw)
    with pytest.raises(ValueError, match="exactly one of images"):
        stage1_step(model, images, ids, mask, image_features=np.zeros((3, 5, 6)), **kw)
    with pytest.raises(ValueError, match="image_features: expected width 6"):
        stage1_step(model, None, ids, mask, image_features=np.zeros((3, 5, 7)), **kw)
    with pytest.raises(TypeError, match="floating"):
        stage1_step(model, (images * 10).astype(np.uint8), ids, mask, **kw)
    with pytest.raises(ValueError):
        stage1_step(model, images[:, :, :4], ids, mask, **kw)
    with pytest.raises(ValueError, match="neg_image_idx"):
        stage1_step(model, images, ids, mask, dec_id=TOK.dec_id,
                    negatives=(np.array([0, 5, 1]), np.array([1, 0, 0])))
    with pytest.raises(ValueError, match="rng or fixed negatives"):
        stage1_step(model, images, ids, mask, dec_id=TOK.dec_id)
    with pytest.raises(ValueError, match="three numbers"):
        stage1_step(model, images, ids, mask, weights=(1, 1), **kw)
    with pytest.raises(ValueError, match="encoder_width"):
        Blip2Config(qformer=QFormerConfig(vocab_size=10, encoder_width=32))
    with pytest.raises(ValueError, match="k_test"):
        stage1_retrieval_metrics(model, TOK, TEXTS[:3], images=images, k_test=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        Stage1Config(steps=10, warmup_steps=10)


def test_config_round_trip():
    cfg = tiny_config()
    assert Blip2Config.from_dict(cfg.to_dict()) == cfg
    s = Stage1Config(steps=7, warmup_steps=1)
    assert Stage1Config.from_dict(s.to_dict()) == s


# ---------------------------------------------------------------------------------------
# A short run on the world
# ---------------------------------------------------------------------------------------

def test_short_training_run_reduces_every_loss():
    """16 world scenes, 60 steps: every loss on a fixed batch goes down, and ITC
    goes well below log(16), the loss of a model that cannot tell pairs apart."""
    ds = world.make_dataset(16, 0, 16, seed=0)
    vit = VisionTransformer(ViTConfig(width=32, heads=2, depth=1, mlp_dim=64),
                            np.random.default_rng(0))
    cfg = Stage1Config(width=32, depth=2, heads=2, mlp_dim=64, num_queries=4, embed_dim=16,
                       init_std=0.1, steps=60, warmup_steps=4, batch_size=16, lr=3e-3)
    trainer = Trainer(Stage1Training(cfg, vit, ds))
    model, tok = trainer.model, trainer.task.tokenizer
    ids, mask = tok.encode([world.canonical_caption(s) for s in ds.train.scenes],
                           max_length=cfg.max_text_len)
    negatives = (np.roll(np.arange(16), 1), np.roll(np.arange(16), -1))

    def losses():
        return stage1_step(model, None, ids, mask, image_features=trainer.task.train_features,
                           dec_id=tok.dec_id, negatives=negatives, backward=False).losses

    before = losses()
    trainer.run(progress=False)
    after = losses()
    for k in ("itc", "itm", "itg"):
        assert after[k] < before[k], (k, before, after)
    assert after["itc"] < math.log(16) - 0.3, after
    assert len(trainer.history["itc"]) == 60 and len(trainer.history["temp"]) == 60
    metrics = stage1_retrieval_metrics(model, tok, ds.test.captions, images=_pixels(ds.test),
                                       k_test=10)
    assert set(metrics) >= {"itc_i2t_recall@1", "t2i_recall@10"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_pretrained_vision_from_a_run_and_from_a_checkpoint(tmp_path):
    from minblip.train import TrainConfig, blip_trainer
    ds = world.make_dataset(8, 0, 0, seed=3)
    small = dict(width=8, depth=1, heads=2, embed_dim=4, batch_size=4, warmup_steps=0)
    run = pretrained_vision(dataset=ds, steps=2, **small)
    assert isinstance(run.encoder, VisionTransformer) and run.encoder is run.blip.visual_encoder
    assert run.train_config.n_train == 8 and len(run.history["itc"]) == 2
    trainer = blip_trainer(TrainConfig(n_train=8, n_val=0, n_test=0, seed=3, steps=1, **small),
                           dataset=ds)
    trainer.run(progress=False)
    path = tmp_path / "blip.npz"
    trainer.save(path)
    loaded = pretrained_vision(path)
    assert loaded.history is None and str(path) in loaded.source
    for a, b in zip(loaded.encoder.params(), trainer.model.visual_encoder.params()):
        np.testing.assert_array_equal(a.data, b.data)


def _pixels(split):
    from minblip.image import preprocess
    return preprocess(split.images, 32)
