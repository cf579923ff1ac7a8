"""The OPT-style language model: gradients (trainable and frozen), causality, the
cached forward and generation, freezing, the question-answer text and pretraining."""
import numpy as np
import pytest

from minblip import Module, check_layer, gradcheck
from minblip import world
from minblip.evaluate_blip2 import generate_text, next_token_logits
from minblip.layers import Linear
from minblip.lm import LanguageModel, LMConfig, lm_step
from minblip.objectives import causal_lm_targets
from minblip.optim import AdamW
from minblip.questions import (QUESTION_KINDS, TEXT_KINDS, answer_choices, build_lm_tokenizer,
                               encode_documents, lm_text, qa_text, random_scenes,
                               scene_questions)
from minblip.train import Trainer
from minblip.train_blip2 import LMPretrainConfig, LMPretraining

V, D = 15, 8


def cfg(**kw):
    base = dict(vocab_size=V, width=D, depth=2, heads=2, mlp_dim=12, max_positions=12)
    base.update(kw)
    return LMConfig(**base)


def randomize(module, seed=0, scale=0.4):
    """Float64 and every Param random (LayerNorm gains around 1), so no gradient is tiny."""
    module.to(np.float64)
    rng = np.random.default_rng(seed)
    for name, p in module.named_params(include_frozen=True):
        p.data[...] = rng.normal(0.0, scale, p.shape) + (1.0 if name.endswith("gamma") else 0.0)
    return module


def batch(seed=1, B=2, T=5, P=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, T - 2:] = 0  # the second text is padded
    ids[1, T - 2:] = 0
    return ids, mask, rng.normal(size=(B, P, D))


# ---------------------------------------------------------------------------
# Gradient checks (float64, larger init, loss sum(out * R))
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradcheck_every_param_and_the_prefix(activation):
    lm = randomize(LanguageModel(cfg(activation=activation), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    report = check_layer(lm, ids, mask, None, prefix)
    assert report.rows[-1].name == "input3" and report.rows[-1].n_checked > 0  # d prefix
    assert {r.name for r in report.rows} >= {n for n, _ in lm.named_params()}
    assert report.directional.passed and report.max_rel_err <= 1e-6


def test_gradcheck_inputs_embeds_and_prefix_returns_both_in_order():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    embeds = np.random.default_rng(2).normal(size=(2, 5, D))
    report = check_layer(lm, None, mask, embeds, prefix)
    assert [r.name for r in report.rows[-2:]] == ["input2", "input3"]
    assert report.max_rel_err <= 1e-6


# OPT as checkpoints store it: positions read from row t + 2, token embeddings of
# another width projected in and out (OPT-350m's word_embed_proj_dim), and a variant
# without the final LayerNorm
OPT_OPTIONS = [dict(position_offset=2), dict(position_offset=2, word_embed_dim=6),
               dict(word_embed_dim=5, final_norm=False)]


@pytest.mark.parametrize("options", OPT_OPTIONS)
def test_gradcheck_opt_options(options):
    lm = randomize(LanguageModel(cfg(**options), np.random.default_rng(0)))
    E = lm.cfg.token_width
    ids, mask, _ = batch()
    prefix = np.random.default_rng(5).normal(size=(2, 3, E))
    embeds = np.random.default_rng(2).normal(size=(2, 5, E))
    report = check_layer(lm, ids, mask, None, prefix)
    assert {r.name for r in report.rows} >= {n for n, _ in lm.named_params()} | {"input3"}
    assert report.directional.passed and report.max_rel_err <= 1e-6
    assert check_layer(lm, None, mask, embeds, prefix).passed
    frozen = check_layer(lm.freeze(), ids, mask, None, prefix)  # through a frozen OPT
    assert [r.name for r in frozen.rows] == ["input3"] and frozen.directional.passed


@pytest.mark.parametrize("options", OPT_OPTIONS)
def test_opt_options_shape_the_model(options):
    lm = LanguageModel(cfg(**options), np.random.default_rng(0))
    E = lm.cfg.token_width
    assert lm.embed_tokens.weight.shape == (V, E)
    assert lm.embed_positions.weight.shape == (12 + lm.cfg.position_offset, D)
    assert (lm.project_in is None) == (E == D) and (lm.project_out is None) == (E == D)
    assert (lm.final_layer_norm is None) == (not lm.cfg.final_norm)
    if E != D:
        assert lm.project_in.b is None and lm.project_out.W.shape == (D, E)
    # the offset only moves which rows are read: positions 0..11 fit, 12 does not
    ids = np.ones((1, 12), dtype=np.int64)
    assert lm.forward(ids)[0].shape == (1, 12, V)
    with pytest.raises(ValueError, match="exceed max_positions=12"):
        lm.forward(np.ones((1, 13), dtype=np.int64))


def test_position_offset_reads_later_rows():
    plain = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    shifted = randomize(LanguageModel(cfg(position_offset=2), np.random.default_rng(0)))
    for a, b in zip(plain.params(), shifted.params()):
        if a.shape == b.shape:
            b.data[...] = a.data
    shifted.embed_positions.weight.data[2:] = plain.embed_positions.weight.data
    ids, mask, prefix = batch()
    np.testing.assert_array_equal(plain.forward(ids, mask, prefix_embeds=prefix)[0],
                                  shifted.forward(ids, mask, prefix_embeds=prefix)[0])


def test_frozen_lm_gradcheck_of_the_prefix_alone():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0))).freeze()
    ids, mask, prefix = batch()
    report = check_layer(lm, ids, mask, None, prefix)
    assert [r.name for r in report.rows] == ["input3"]  # a frozen LM offers no Param
    assert report.directional.passed


def test_lm_step_gradcheck_with_prompt_and_padding():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    from minblip.core import Param
    pre = Param(prefix, dtype=np.float64)

    def loss_fn(backward):
        loss, d_prefix = lm_step(lm, ids, mask, prefix_embeds=pre.data, prompt_length=2,
                                 backward=backward)
        if backward:
            pre.grad += d_prefix
        return loss

    report = gradcheck(loss_fn, lm.named_params() + [("prefix", pre)])
    assert report.passed


# ---------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------

def test_frozen_backward_passes_the_same_input_gradients_and_adds_into_no_param():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    embeds = np.random.default_rng(2).normal(size=(2, 5, D))
    logits, cache = lm.forward(None, mask, inputs_embeds=embeds, prefix_embeds=prefix)
    R = np.random.default_rng(3).normal(size=logits.shape)
    d_trainable = lm.backward(R, cache)
    lm.zero_grad()

    lm.freeze()
    for p in lm.params(include_frozen=True):
        p.grad = None  # any gradient added into a frozen Param would now raise
    d_frozen = lm.backward(R, cache)
    for a, b in zip(d_frozen, d_trainable):  # one formula: the same input gradients
        np.testing.assert_array_equal(a, b)
    assert lm.params() == [] and lm.param_count() == 0 and lm.frozen


def test_backward_returns_one_gradient_per_float_input_in_order():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    logits, cache = lm.forward(ids, mask)
    assert lm.backward(np.ones_like(logits), cache) == (None, None)
    logits, cache = lm.forward(ids, mask, prefix_embeds=prefix)
    d_embeds, d_prefix = lm.backward(np.ones_like(logits), cache)
    assert d_embeds is None and d_prefix.shape == prefix.shape


def test_frozen_lm_is_left_out_of_a_plain_holder_and_never_changes():
    class Holder(Module):  # a plain Module: no override of named_params
        def __init__(self):
            rng = np.random.default_rng(0)
            self.proj = Linear(4, D, rng, init_std=0.3)
            self.lm = LanguageModel(cfg(), rng).freeze()

    model = Holder()
    assert [n for n, _ in model.named_params()] == ["proj.W", "proj.b"]
    frozen = [p for p in model.params(include_frozen=True) if p.frozen]
    assert len(frozen) == len(model.lm.params(include_frozen=True)) > 0
    before = {n: p.data.copy() for n, p in model.lm.named_params(include_frozen=True)}
    opt = AdamW(model, lr=0.1, weight_decay=0.5)
    ids, mask, _ = batch()
    x = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)
    for _ in range(3):
        model.zero_grad()
        prefix, c_proj = model.proj.forward(x)
        _, d_prefix = lm_step(model.lm, ids, mask, prefix_embeds=prefix)
        model.proj.backward(d_prefix, c_proj)
        opt.step()
    assert np.abs(model.proj.W.grad).sum() > 0
    for n, p in model.lm.named_params(include_frozen=True):
        np.testing.assert_array_equal(p.data, before[n])
        assert not p.grad.any()


def test_unfreeze_and_to_reach_frozen_params():
    lm = LanguageModel(cfg(), np.random.default_rng(0)).freeze()
    lm.to(np.float64)
    assert lm.dtype == np.float64
    assert all(p.dtype == np.float64 for p in lm.params(include_frozen=True))
    lm.unfreeze()
    assert len(lm.params()) == len(lm.params(include_frozen=True)) and not lm.frozen


# ---------------------------------------------------------------------------
# Structure, causality, padding
# ---------------------------------------------------------------------------

def test_head_is_tied_to_the_token_embeddings():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    logits, cache = lm.forward(ids, mask, prefix_embeds=prefix)
    np.testing.assert_allclose(logits, cache["h"] @ lm.embed_tokens.weight.data.T)
    names = [n for n, _ in lm.named_params()]
    assert names.count("embed_tokens.weight") == 1 and not any("head" in n for n in names)
    assert logits.shape == (2, 3 + 5, V)


def test_causal_later_positions_never_change_earlier_logits():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    base, _ = lm.forward(ids, mask, prefix_embeds=prefix)
    P = prefix.shape[1]
    for t in range(ids.shape[1]):
        changed = ids.copy()
        changed[0, t] = (changed[0, t] % (V - 1)) + 1
        out, _ = lm.forward(changed, mask, prefix_embeds=prefix)
        np.testing.assert_array_equal(out[0, :P + t], base[0, :P + t])
        assert np.abs(out[0, P + t:] - base[0, P + t:]).max() > 1e-6
    later = prefix.copy()
    later[:, -1] += 1.0  # the last query of the soft prompt
    out, _ = lm.forward(ids, mask, prefix_embeds=later)
    np.testing.assert_array_equal(out[:, :P - 1], base[:, :P - 1])  # queries see queries <= i


def test_padding_never_changes_real_positions():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, mask, prefix = batch()
    other = ids.copy()
    other[1, -2:] = [7, 9]
    a, _ = lm.forward(ids, mask, prefix_embeds=prefix)
    b, _ = lm.forward(other, mask, prefix_embeds=prefix)
    np.testing.assert_array_equal(a[1, :-2], b[1, :-2])


def test_prefix_equals_inputs_embeds_concatenation():
    lm = randomize(LanguageModel(cfg(), np.random.default_rng(0)))
    ids, _, prefix = batch()
    a, _ = lm.forward(ids, prefix_embeds=prefix)
    tok = lm.embed_tokens.weight.data[ids]
    b, _ = lm.forward(inputs_embeds=np.concatenate([prefix, tok], axis=1))
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_targets_ignore_prefix_padding_and_prompt():
    ids = np.array([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    mask = (ids != 0).astype(int)
    t = causal_lm_targets(ids, mask, n_prefix=2, prompt_length=1)
    np.testing.assert_array_equal(t, [[-100, -100, -100, 7, 8, 3, -100],
                                      [-100, -100, -100, 9, 3, -100, -100]])


def test_dropout_is_repeatable_with_the_same_seed():
    lm = LanguageModel(cfg(dropout=0.3), np.random.default_rng(0))
    ids, mask, prefix = batch()
    a, _ = lm.forward(ids, mask, prefix_embeds=prefix.astype(np.float32),
                      rng=np.random.default_rng(5))
    b, _ = lm.forward(ids, mask, prefix_embeds=prefix.astype(np.float32),
                      rng=np.random.default_rng(5))
    c, _ = lm.forward(ids, mask, prefix_embeds=prefix.astype(np.float32))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


# ---------------------------------------------------------------------------
# Cached forward and generation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}] + OPT_OPTIONS)
def test_incremental_forward_equals_full_forward(options):
    lm = randomize(LanguageModel(cfg(**options), np.random.default_rng(0)))
    ids, _, _ = batch()
    prefix = np.random.default_rng(5).normal(size=(2, 3, lm.cfg.token_width))
    full, _ = lm.forward(ids, prefix_embeds=prefix)
    first, past = lm.forward_incremental(ids[:, :2], prefix_embeds=prefix)
    outs = [first]
    for t in range(2, ids.shape[1]):
        out, past = lm.forward_incremental(ids[:, t:t + 1], past, start=prefix.shape[1] + t)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-12)


def test_greedy_generation_equals_a_loop_of_full_forwards():
    tok = build_lm_tokenizer()
    lm = randomize(LanguageModel(LMConfig(vocab_size=tok.vocab_size, width=D, depth=2, heads=2,
                                          mlp_dim=12, max_positions=16),
                                 np.random.default_rng(0)), scale=0.3)
    prefix = np.random.default_rng(1).normal(size=(2, 3, D))
    texts = generate_text(lm, tok, prefix, prompt="a red", max_length=9, min_length=9)
    for b in range(2):
        seq = [tok.cls_id, tok.token_to_id("a"), tok.token_to_id("red")]
        while len(seq) < 9:
            logits, _ = lm.forward(np.array([seq]), prefix_embeds=prefix[b:b + 1])
            nxt = logits[0, -1].copy()
            if len(seq) < 9:
                nxt[tok.sep_id] = -np.inf  # min_length: no [SEP] before 9 tokens
            seq.append(int(np.argmax(nxt)))
        assert texts[b] == tok.decode(np.array(seq[3:]))
        first = tok.id_to_token(seq[3])
        other = generate_text(lm, tok, prefix[b:b + 1], prompt="a red", max_length=9,
                              suppress_words=first)
        assert other[0].split()[0] != first
    assert len(generate_text(lm, tok, batch_size=3, method="nucleus", max_length=6,
                             rng=np.random.default_rng(0))) == 3
    assert len(generate_text(lm, tok, prefix, method="beam", num_beams=2, max_length=6)) == 2


def test_next_token_logits_reads_each_row_at_its_last_word():
    tok = build_lm_tokenizer()
    lm = randomize(LanguageModel(LMConfig(vocab_size=tok.vocab_size, width=D, depth=1, heads=2,
                                          mlp_dim=12, max_positions=20),
                                 np.random.default_rng(0)), scale=0.3)
    prefix = np.random.default_rng(1).normal(size=(2, 3, D))
    prompts = ["question what colour is the circle answer", "question how many answer"]
    got = next_token_logits(lm, tok, prompts, prefix)
    for b, p in enumerate(prompts):
        ids, _ = tok.encode(p)
        logits, _ = lm.forward(ids[:, :-1], prefix_embeds=prefix[b:b + 1])
        np.testing.assert_allclose(got[b], logits[0, -1], atol=1e-12)


# ---------------------------------------------------------------------------
# Question-answer text and pretraining
# ---------------------------------------------------------------------------

def test_scene_questions_are_true_and_unambiguous():
    scene = world.Scene((world.Object("red", "circle", "large", 1, 0),
                         world.Object("blue", "circle", "small", 0, 2),
                         world.Object("red", "square", "small", 2, 2)))
    qa = {(k, q): a for k, q, a in scene_questions(scene)}
    assert qa[("colour", "what colour is the square")] == "red"
    assert not any(q == "what colour is the circle" for _, q in qa)  # two circles
    assert qa[("shape", "what shape is the blue object")] == "circle"
    assert not any(q == "what shape is the red object" for _, q in qa)  # two red objects
    assert qa[("size", "what size is the red circle")] == "large"
    assert qa[("shape_at", "what shape is on the left")] == "circle"
    assert qa[("count", "how many objects are there")] == "three"
    assert qa_text("how many objects are there", "two") == \
        "question how many objects are there answer two"
    for kind in QUESTION_KINDS:
        assert {a for k, _, a in scene_questions(scene) if k == kind} <= set(answer_choices(kind))


def test_every_pretraining_text_is_in_the_vocabulary():
    tok = build_lm_tokenizer()
    assert tok.words[:len(world.vocabulary())] == world.vocabulary()  # BLIP's ids kept
    rng = np.random.default_rng(0)
    held = set(world.HELD_OUT_COMBOS)
    for scene in random_scenes(60, rng, max_objects=3):
        assert not {(o.colour, o.shape) for o in scene.objects} & held
        for kind in TEXT_KINDS:
            segments = lm_text(scene, kind, rng)
            ids, mask = encode_documents(tok, [segments], max_length=48)
            real = ids[0, :mask.sum()]
            assert tok.unk_id not in real and real[-1] == tok.sep_id
            assert (real == tok.cls_id).sum() == len(segments) == (2 if kind in (
                "caption_qa", "paraphrase") else 1)


def test_short_pretraining_reduces_the_loss():
    tok = build_lm_tokenizer()
    lm = LanguageModel(LMConfig(vocab_size=tok.vocab_size, width=16, depth=1, heads=2,
                                mlp_dim=32, max_positions=48), np.random.default_rng(0))
    task = LMPretraining(lm, tok, LMPretrainConfig(steps=40, batch_size=8, lr=1e-2,
                                                   warmup_steps=2, corpus_size=64))
    loss = Trainer(task).run(progress=False)["loss"]
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:3])
    assert len(task.corpus) == 64
    with pytest.raises(ValueError, match="max_positions=48"):
        LMPretraining(lm, tok, LMPretrainConfig(steps=2, warmup_steps=0, max_length=60))
    with pytest.raises(ValueError, match="frozen"):
        LMPretraining(lm.freeze(), tok, LMPretrainConfig(steps=2, warmup_steps=0))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_bad_input():
    lm = LanguageModel(cfg(), np.random.default_rng(0))
    ids, mask, prefix = batch()
    prefix = prefix.astype(np.float32)
    with pytest.raises(ValueError, match="not both"):
        lm.forward(ids, inputs_embeds=prefix)
    with pytest.raises(ValueError, match="expected ids, inputs_embeds or prefix_embeds"):
        lm.forward()
    with pytest.raises(ValueError, match="width 8"):
        lm.forward(ids, prefix_embeds=np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="batch size 3"):
        lm.forward(ids, prefix_embeds=np.zeros((3, 3, D), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        lm.forward(ids, prefix_embeds=np.zeros((2, 3, D), np.int64))
    with pytest.raises(TypeError, match="integer token ids"):
        lm.forward(ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 15\)"):
        lm.forward(ids + V)
    with pytest.raises(ValueError, match="max_positions=12"):
        lm.forward(np.ones((1, 10), int), prefix_embeds=np.zeros((1, 3, D), np.float32))
    with pytest.raises(ValueError, match="0/1"):
        lm.forward(ids, mask * 2)
    with pytest.raises(ValueError, match=r"expected shape \(2, 5\)"):
        lm.forward(ids, mask[:, :3])
    logits, cache = lm.forward(ids, mask, prefix_embeds=prefix)
    with pytest.raises(ValueError, match="dlogits of shape"):
        lm.backward(logits[:, 1:], cache)
    with pytest.raises(ValueError, match="start must equal"):
        lm.forward_incremental(ids, start=2)
    with pytest.raises(ValueError, match="heads must divide"):
        cfg(heads=3)
    with pytest.raises(ValueError, match="activation"):
        cfg(activation="tanh")
    with pytest.raises(TypeError, match="LMConfig"):
        LanguageModel({"vocab_size": V}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="question kind"):
        answer_choices("where")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        generate_text(lm, build_lm_tokenizer(), suppress_words=("zebra",))
