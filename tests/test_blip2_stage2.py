"""BLIP-2 stage 2: gradients through the frozen LM into the soft prompt's makers,
nothing into the frozen parts, the loss mask, training, captions and questions."""
import numpy as np
import pytest

from minblip import gradcheck, world
from minblip.blip2_stage1 import Blip2Config, Blip2Stage1
from minblip.blip2_stage2 import Blip2Stage2, build_stage2, stage2_prefix_step, stage2_step
from minblip.evaluate_blip2 import (evaluate_stage2_captions, qa_items, stage2_captions,
                                    zero_shot_qa)
from minblip.image import preprocess
from minblip.layers import LayerNorm, Linear
from minblip.lm import LanguageModel, LMConfig
from minblip.optim import AdamW
from minblip.qformer import QFormer, QFormerConfig
from minblip.questions import build_lm_tokenizer
from minblip.softmax import CrossEntropyLoss, log_softmax
from minblip.train import Trainer
from minblip.train_blip2 import Stage2Config, Stage2Training
from minblip.vit import ViTConfig, VisionTransformer

Q = 3


def vit_cfg(**kw):
    return ViTConfig(**{**dict(image_size=8, patch_size=4, width=6, depth=1, heads=2,
                               mlp_dim=8), **kw})


def q_cfg(**kw):
    return QFormerConfig(**{**dict(vocab_size=10, width=8, depth=2, heads=2, mlp_dim=12,
                                   num_queries=Q, encoder_width=6, cross_attention_freq=1), **kw})


def build(vocab=11, lm_width=10, seed=0, max_positions=12):
    rng = np.random.default_rng(seed)
    vit = VisionTransformer(vit_cfg(), rng)
    lm = LanguageModel(LMConfig(vocab_size=vocab, width=lm_width, depth=1, heads=2, mlp_dim=12,
                                max_positions=max_positions), rng)
    return Blip2Stage2(vit, LayerNorm(6), QFormer(q_cfg(), rng), lm, rng)


def randomize(model, seed=5, scale=0.4):
    model.to(np.float64)
    rng = np.random.default_rng(seed)
    for name, p in model.named_params(include_frozen=True):
        p.data[...] = rng.normal(0.0, scale, p.shape) + (1.0 if name.endswith("gamma") else 0.0)
    return model


def batch(seed=1):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, 3, 8, 8))
    ids = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    return images, ids, (ids != 0).astype(np.int64)


def frozen_params(model):
    return (model.language_model.named_params(include_frozen=True)
            + model.visual_encoder.named_params(include_frozen=True))


# ---------------------------------------------------------------------------
# What trains and what does not
# ---------------------------------------------------------------------------

def test_params_are_exactly_the_trainable_parts():
    model = build()
    names = [n for n, _ in model.named_params()]
    assert names[:2] == ["ln_vision.gamma", "ln_vision.beta"]
    assert "qformer.query_tokens" in names
    assert names[-2:] == ["language_projection.W", "language_projection.b"]
    assert not any(n.startswith(("language_model", "visual_encoder")) for n in names)
    # LAVIS removes the Q-Former's text-only parts for stage 2
    assert not any("word_embeddings" in n or "position_embeddings" in n or ".ffn." in n
                   or ".ffn_ln." in n for n in names)
    trainable = {id(p) for p in model.params()}
    assert not trainable & {id(p) for _, p in frozen_params(model)}
    assert all(p.frozen for _, p in frozen_params(model))
    counts = model.parameter_counts()
    assert counts["trainable"] == model.param_count()
    assert counts["total"] == counts["trainable"] + sum(p.size for _, p in frozen_params(model))
    assert counts["parts"]["language_model"] == (
        0, model.language_model.param_count(include_frozen=True))
    assert counts["parts"]["visual_encoder"][0] == 0


def test_stage2_gradcheck_through_the_frozen_lm():
    model = randomize(build())
    images, ids, mask = batch()

    def loss_fn(backward):
        return stage2_step(model, images, ids, mask, prompt_length=1, backward=backward).loss

    report = gradcheck(loss_fn, model, n_coords=4)
    names = {r.name for r in report.rows}
    assert {"qformer.query_tokens", "ln_vision.gamma", "language_projection.W"} <= names
    assert report.directional.passed and report.max_rel_err <= 1e-6
    # the check ran on the trainable Params only and left the frozen ones without gradient
    assert all(not p.grad.any() for _, p in frozen_params(model))


def test_frozen_lm_runs_its_own_backward_and_adds_nothing(monkeypatch):
    """The frozen LM is back-propagated through its ordinary layers (one backward
    formula each) and no weight gradient reaches any frozen Param; the frozen ViT,
    whose input is pixels, is never back-propagated at all."""
    model = randomize(build())
    images, ids, mask = batch()
    lm_linears = {id(m) for m in _linears(model.language_model)}
    assert len(lm_linears) == 6  # q, k, v, out, fc1, fc2
    ran = set()
    original = Linear.backward
    monkeypatch.setattr(Linear, "backward",
                        lambda self, *a: ran.add(id(self)) or original(self, *a))
    monkeypatch.setattr(VisionTransformer, "backward",
                        lambda *a: pytest.fail("the frozen ViT was back-propagated"))
    model.zero_grad()
    result = stage2_step(model, images, ids, mask)
    assert lm_linears <= ran  # the frozen LM's layers carried the gradient to the prompt
    assert all(not p.grad.any() for _, p in frozen_params(model))
    assert np.abs(result.d_soft_prompt).sum() > 0
    assert np.abs(model.language_projection.W.grad).sum() > 0
    assert np.abs(model.qformer.query_tokens.grad).sum() > 0
    assert np.abs(model.ln_vision.gamma.grad).sum() > 0


def _linears(module):
    return [m for m in module.modules() if isinstance(m, Linear)]


def test_frozen_parts_never_change_under_the_optimiser():
    model = build()
    images, ids, mask = batch()
    images = images.astype(np.float32)
    before = {id(p): p.data.copy() for _, p in frozen_params(model)}
    trainable_before = {id(p): p.data.copy() for p in model.params()}
    opt = AdamW(model, lr=0.05, weight_decay=0.5)
    assert len(opt.params) == len(model.params())
    for _ in range(3):
        model.zero_grad()
        stage2_step(model, images, ids, mask)
        opt.step()
    for _, p in frozen_params(model):
        np.testing.assert_array_equal(p.data, before[id(p)])
    assert all(not np.array_equal(p.data, trainable_before[id(p)]) for p in model.params())


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------

def test_loss_is_plain_ce_over_the_text_only():
    model = randomize(build())
    images, ids, mask = batch()
    result = stage2_step(model, images, ids, mask, prompt_length=2, backward=False)
    assert (result.targets[:, :Q + 2] == -100).all()  # soft prompt and prompt tokens
    # by hand: row t predicts token t + 1; only real text tokens after the prompt count
    logp = log_softmax(result.logits)
    terms = [-logp[b, Q + t - 1, ids[b, t]] for b in range(2) for t in range(2, ids.shape[1])
             if mask[b, t]]
    assert result.loss == pytest.approx(np.mean(terms), rel=1e-12)


def test_changing_what_sits_at_ignored_positions_changes_nothing():
    model = randomize(build())
    images, ids, mask = batch()
    base = stage2_step(model, images, ids, mask, prompt_length=1, backward=False)
    padded = ids.copy()
    padded[mask == 0] = 9  # other tokens under the padding (never attended to, never labels)
    other = stage2_step(model, images, padded, mask, prompt_length=1, backward=False)
    assert other.loss == base.loss
    # nothing written at an ignored row of the logits reaches the loss
    noisy = base.logits.copy()
    ignored = np.concatenate([base.targets[:, 1:] == -100, np.ones((2, 1), bool)], axis=1)
    noisy[ignored] += np.random.default_rng(0).normal(0, 5, noisy[ignored].shape)
    loss, _ = CrossEntropyLoss().forward(noisy[:, :-1], base.targets[:, 1:])
    assert loss == pytest.approx(base.loss, rel=1e-12)
    # the BOS label is masked with a prompt, so the soft prompt's last row is not trained
    model.zero_grad()
    result = stage2_step(model, images, ids, mask, prompt_length=1)
    np.testing.assert_array_equal(result.targets[:, Q], -100)
    no_prompt = stage2_step(model, images, ids, mask, prompt_length=0, backward=False)
    assert (no_prompt.targets[:, Q] == ids[:, 0]).all()  # LAVIS: with "" BOS is a label


# ---------------------------------------------------------------------------
# Starting from stage 1, training, generation, questions
# ---------------------------------------------------------------------------

def tiny_world():
    return world.make_dataset(24, 0, 6, seed=0, image_size=32, max_objects=2)


def tiny_stage2(tok, seed=0):
    rng = np.random.default_rng(seed)
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=16, width=8, depth=1, heads=2,
                                      mlp_dim=16), rng)
    # a random LM with large weights, so its output depends strongly on the soft prompt
    lm = LanguageModel(LMConfig(vocab_size=tok.vocab_size, width=16, depth=1, heads=2,
                                mlp_dim=32, max_positions=32, init_std=0.5), rng)
    qformer = QFormer(q_cfg(encoder_width=8, width=16, mlp_dim=32, num_queries=4), rng)
    return Blip2Stage2(vit, LayerNorm(8), qformer, lm, rng)


def test_from_stage1_copies_the_qformer_and_shares_the_frozen_vit():
    rng = np.random.default_rng(0)
    stage1 = Blip2Stage1(Blip2Config(qformer=q_cfg(), vision=vit_cfg()), rng)
    lm = LanguageModel(LMConfig(vocab_size=11, width=10, depth=1, heads=2, mlp_dim=12,
                                max_positions=12), rng)
    model = Blip2Stage2.from_stage1(stage1, lm, rng)
    assert model.visual_encoder is stage1.visual_encoder and model.visual_encoder.frozen
    assert model.qformer is not stage1.qformer
    np.testing.assert_array_equal(model.qformer.query_tokens.data, stage1.qformer.query_tokens.data)
    assert stage1.qformer.embeddings.word_embeddings is not None  # stage 1 keeps its text parts
    before = [p.data.copy() for p in stage1.params()]
    images, ids, mask = batch()
    opt = AdamW(model, lr=0.05)
    model.zero_grad()
    stage2_step(model, images.astype(np.float32), ids, mask)
    opt.step()
    assert all(np.array_equal(a, p.data) for a, p in zip(before, stage1.params()))


def test_build_stage2_from_stage1_or_fresh():
    rng = np.random.default_rng(0)
    stage1 = Blip2Stage1(Blip2Config(qformer=q_cfg(), vision=vit_cfg()), rng)

    def lm():
        return LanguageModel(LMConfig(vocab_size=11, width=10, depth=1, heads=2, mlp_dim=12,
                                      max_positions=12), rng)

    started = build_stage2(lm(), rng, stage1=stage1)
    np.testing.assert_array_equal(started.ln_vision.gamma.data, stage1.ln_vision.gamma.data)
    fresh = build_stage2(lm(), rng, visual_encoder=stage1.visual_encoder, qformer_cfg=q_cfg())
    assert fresh.visual_encoder is stage1.visual_encoder
    assert fresh.qformer.cfg == q_cfg() and fresh.ln_vision.eps == 1e-5
    with pytest.raises(ValueError, match="neither"):
        build_stage2(lm(), rng, stage1=stage1, qformer_cfg=q_cfg())
    with pytest.raises(ValueError, match="both visual_encoder and qformer_cfg"):
        build_stage2(lm(), rng, qformer_cfg=q_cfg())


def test_short_stage2_run_reduces_the_loss_and_the_tools_run():
    tok = build_lm_tokenizer()
    data = tiny_world()
    model = tiny_stage2(tok)
    task = Stage2Training(model, tok, data.train,
                          Stage2Config(steps=25, batch_size=8, lr=1e-2, warmup_steps=2))
    losses = Trainer(task).run(progress=False)["loss"]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:2])
    metrics, captions = evaluate_stage2_captions(model, tok, data.test, method="greedy",
                                                 max_length=12)
    assert len(captions) == len(data.test) and 0.0 <= metrics["caption_attribute_accuracy"] <= 1.0
    assert {"caption_colour_accuracy", "caption_shape_accuracy", "caption_size_accuracy",
            "caption_position_accuracy"} <= set(metrics)
    pixels = preprocess(data.test.images[:2], 32)
    beams = stage2_captions(model, tok, pixels, method="beam", num_beams=2, max_length=8)
    assert len(beams) == 2 and all(isinstance(c, str) for c in beams)
    qa = zero_shot_qa(model, tok, data.test)
    assert qa["colour"]["chance"] == pytest.approx(1 / 6) and qa["size"]["chance"] == 0.5
    assert qa["count"]["chance"] == 0.5  # one or two objects in this world
    assert qa["overall"]["n"] == len(qa["items"]) == len(qa_items(data.test))
    assert all(it["prediction"] in tok.tokens for it in qa["items"])


def test_soft_prompt_matches_the_training_forward():
    tok = build_lm_tokenizer()
    model = tiny_stage2(tok)
    pixels = preprocess(tiny_world().test.images[:3], 32)
    ids, mask = tok.encode(["a red circle", "a blue box", "a big cross"])
    result = stage2_step(model, pixels, ids, mask, backward=False)
    np.testing.assert_allclose(model.soft_prompt(pixels), result.soft_prompt, rtol=1e-6)
    assert result.soft_prompt.shape == (3, 4, 16)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_bad_input():
    model = build()
    images, ids, mask = batch()
    images = images.astype(np.float32)
    with pytest.raises(ValueError, match="images or image_embeds"):
        stage2_step(model, None, ids, mask)
    with pytest.raises(ValueError, match="same shape"):
        stage2_step(model, images, ids, mask[:, :3])
    with pytest.raises(ValueError, match="3 texts for 2 images"):
        stage2_step(model, images, np.vstack([ids, ids[:1]]), np.vstack([mask, mask[:1]]))
    with pytest.raises(TypeError, match="integer token ids"):
        stage2_step(model, images, ids.astype(float), mask)
    with pytest.raises(TypeError, match="floating-point"):
        stage2_step(model, images.astype(np.uint8), ids, mask)
    with pytest.raises(ValueError, match="prompt_length"):
        stage2_step(model, images, ids, mask, prompt_length=9)
    with pytest.raises(ValueError, match="max_positions"):
        stage2_step(model, images, np.ones((2, 10), int), np.ones((2, 10), int))
    rng = np.random.default_rng(0)
    vit = VisionTransformer(vit_cfg(width=4), rng)
    lm = LanguageModel(LMConfig(vocab_size=11, width=10, depth=1, heads=2, mlp_dim=12), rng)
    with pytest.raises(ValueError, match="ViT width"):
        Blip2Stage2(vit, LayerNorm(4), QFormer(q_cfg(), rng), lm, rng)
    with pytest.raises(TypeError, match="language_model must be a LanguageModel"):
        Blip2Stage2(VisionTransformer(vit_cfg(), rng), LayerNorm(6), QFormer(q_cfg(), rng),
                    "opt", rng)
    with pytest.raises(TypeError, match="stage-1 model"):
        Blip2Stage2.from_stage1(object(), lm, rng)
    tok = build_lm_tokenizer()
    with pytest.raises(ValueError, match="tokenizer has"):
        Stage2Training(model, tok, tiny_world().train,
                       Stage2Config(steps=1, batch_size=2, warmup_steps=0))


# ---------------------------------------------------------------------------
# The encoder-decoder design: Blip2T5.forward, the prefix language-modelling loss
# ---------------------------------------------------------------------------

def build_t5(vocab=11, seed=0):
    from minblip.t5 import EncoderDecoderLM, T5Config
    rng = np.random.default_rng(seed)
    lm = EncoderDecoderLM(T5Config(vocab_size=vocab, width=10, depth=1, heads=2, mlp_dim=12,
                                   num_buckets=8, max_distance=8, max_positions=14), rng)
    return Blip2Stage2(VisionTransformer(vit_cfg(), rng), LayerNorm(6), QFormer(q_cfg(), rng),
                       lm, rng)


def split_batch(k):
    """One caption "w5 w6 w7 w8 [SEP]" (ids 5-8, [SEP] = 3) cut after k words, and a
    second, shorter one cut after one word, T5's layout: the prefix closed by [SEP],
    the suffix closed by [SEP], padding 0 in the encoder and -100 in the labels."""
    words = [5, 6, 7, 8]
    enc = [words[:k] + [3], [9, 3]]
    dec = [words[k:] + [3], [10, 3]]
    width_e, width_d = max(map(len, enc)), max(map(len, dec))
    enc_ids = np.array([r + [0] * (width_e - len(r)) for r in enc])
    labels = np.array([r + [-100] * (width_d - len(r)) for r in dec])
    return enc_ids, (enc_ids != 0).astype(np.int64), labels


@pytest.mark.parametrize("k", [0, 1, 2])
def test_gradcheck_prefix_lm_step_at_every_split(k):
    """Every trainable Param of the T5 design, for the empty prefix (zero-shot
    captioning's), one word, and the midpoint; nothing reaches the frozen parts."""
    model = randomize(build_t5())
    images = np.random.default_rng(3).normal(size=(2, 3, 8, 8))
    enc_ids, enc_mask, labels = split_batch(k)
    report = gradcheck(lambda backward: stage2_prefix_step(
        model, images, enc_ids, enc_mask, labels, backward=backward).loss, model, n_coords=4)
    assert report.passed and report.directional.passed
    frozen = [p for p in model.params(include_frozen=True) if p.frozen]
    assert frozen and not any(p.grad.any() for p in frozen)


def test_prefix_is_read_by_the_encoder_and_never_scored():
    model = randomize(build_t5())
    images = np.random.default_rng(4).normal(size=(2, 3, 8, 8))
    enc_ids, enc_mask, labels = split_batch(2)
    base = stage2_prefix_step(model, images, enc_ids, enc_mask, labels, backward=False)
    other = enc_ids.copy()
    other[0, 0] = 9  # another prefix word: the loss changes (the encoder reads it) ...
    changed = stage2_prefix_step(model, images, other, enc_mask, labels, backward=False)
    assert abs(changed.loss - base.loss) > 1e-9
    # ... but it is no target: the loss is the decoder's cross-entropy on the suffix only
    from minblip.t5 import seq2seq_step
    direct, _ = seq2seq_step(model.language_model, enc_ids, enc_mask, labels,
                             prefix_embeds=base.soft_prompt, backward=False)
    assert direct == base.loss
    assert base.soft_prompt.shape == (2, Q, 10) and base.logits is None


def test_each_design_refuses_the_other_loss():
    images, ids, mask = batch()
    enc_ids, enc_mask, labels = split_batch(1)
    with pytest.raises(TypeError, match="stage2_prefix_step"):
        stage2_step(build_t5(), images, ids, mask)
    with pytest.raises(TypeError, match="stage2_step"):
        stage2_prefix_step(build(), images, enc_ids, enc_mask, labels)
    with pytest.raises(ValueError, match="labels"):
        stage2_prefix_step(build_t5(), images, enc_ids, enc_mask, labels[:1])


def test_t5_stage2_trains_captions_and_answers_on_a_tiny_world():
    tok = build_lm_tokenizer()
    from minblip.t5 import EncoderDecoderLM, T5Config
    rng = np.random.default_rng(0)
    lm = EncoderDecoderLM(T5Config(vocab_size=tok.vocab_size, width=12, depth=1, heads=2,
                                   mlp_dim=16, max_positions=40), rng)
    model = build_stage2(lm, rng, visual_encoder=VisionTransformer(vit_cfg(image_size=16,
                                                                           patch_size=8), rng),
                         qformer_cfg=q_cfg(vocab_size=tok.vocab_size))
    split = tiny_world().train
    trainer = Trainer(Stage2Training(model, tok, split, Stage2Config(steps=6, batch_size=4,
                                                                     warmup_steps=1)))
    losses = trainer.run(progress=False)["loss"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    batch_ = trainer.task.sample_batch(np.random.default_rng(0))
    assert len(batch_) == 4 and (batch_[3] != -100).any()  # features, prefix, mask, labels
    captions = stage2_captions(model, tok, preprocess(split.images[:3], 16), num_beams=2,
                               max_length=6)
    assert len(captions) == 3
    qa = zero_shot_qa(model, tok, split)
    assert 0.0 <= qa["overall"]["accuracy"] <= 1.0 and qa["overall"]["n"] > 0
