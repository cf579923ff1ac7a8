"""The encoder-decoder (T5-style) language model of BLIP-2: its layers, gradients
(trainable and frozen), relative positions, masks, cached decoding, its text and
its pretraining."""
import numpy as np
import pytest

from minblip import Param, check_layer, gradcheck
from minblip.evaluate_blip2 import answer_logits, generate_text
from minblip.generation import generate
from minblip.layers import RMSNorm
from minblip.questions import (build_lm_tokenizer, encode_seq2seq, prefix_split, qa_text,
                               seq2seq_corpus, seq2seq_pair)
from minblip.t5 import (EncoderDecoderCaptioner, EncoderDecoderLM, T5Config,
                        relative_position_buckets, seq2seq_step, shift_right)
from minblip.train import Trainer
from minblip.train_blip2 import LMPretrainConfig, LMPretraining, Seq2SeqPretraining
from minblip.transformer import GatedFeedForward

V, D = 13, 8


def cfg(**kw):
    base = dict(vocab_size=V, width=D, depth=2, heads=2, mlp_dim=12, num_buckets=8,
                max_distance=6, max_positions=16)
    base.update(kw)
    return T5Config(**base)


def randomize(module, seed=0, scale=0.3):
    """Float64, every Param random (norm weights around 1), so no gradient is tiny."""
    module.to(np.float64)
    rng = np.random.default_rng(seed)
    for name, p in module.named_params(include_frozen=True):
        p.data[...] = rng.normal(0.0, scale, p.shape) + (1.0 if p.data.ndim == 1 else 0.0)
    return module


def inputs(seed=1):
    """Encoder ids (2, 5) with the second row padded, decoder ids (2, 4) with the
    first padded, a soft prompt (2, 3, D)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (2, 5))
    mask = np.ones((2, 5), dtype=np.int64)
    mask[1, 3:] = 0
    ids[1, 3:] = 0
    dec = rng.integers(1, V, (2, 4))
    dec_mask = np.ones((2, 4), dtype=np.int64)
    dec_mask[0, 3:] = 0
    return ids, mask, dec, dec_mask, rng.normal(size=(2, 3, D))


# ---------------------------------------------------------------------------
# The layers T5 adds: RMSNorm and the gated feed-forward
# ---------------------------------------------------------------------------

def test_rmsnorm_forward_and_gradient():
    rng = np.random.default_rng(0)
    norm = RMSNorm(6, eps=1e-6).to(np.float64)
    norm.weight.data[...] = rng.normal(1.0, 0.3, 6)
    x = rng.normal(size=(2, 3, 6))
    y, _ = norm.forward(x)
    expected = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * norm.weight.data
    np.testing.assert_allclose(y, expected, rtol=1e-13)
    assert check_layer(norm, x).passed
    frozen = RMSNorm(6).to(np.float64).freeze()
    _, cache = frozen.forward(x)
    dx = frozen.backward(np.ones_like(x), cache)
    assert dx.shape == x.shape and not frozen.weight.grad.any()


def test_gated_feed_forward_forward_and_gradient():
    rng = np.random.default_rng(1)
    ffn = GatedFeedForward(5, 7, rng).to(np.float64)
    x = rng.normal(size=(2, 3, 5))
    y, _ = ffn.forward(x)
    from minblip.layers import erf
    g = x @ ffn.wi_0.W.data
    gelu = 0.5 * g * (1.0 + erf(g / np.sqrt(2.0)))
    np.testing.assert_allclose(y, (gelu * (x @ ffn.wi_1.W.data)) @ ffn.wo.W.data, rtol=1e-12)
    assert ffn.wi_0.b is None and ffn.wo.b is None  # T5 has no biases
    assert check_layer(ffn, x).passed


# ---------------------------------------------------------------------------
# Relative positions
# ---------------------------------------------------------------------------

def test_relative_position_buckets():
    # bidirectional, 8 buckets: 4 per direction, distances 0, 1 exact, then logarithmic
    got = relative_position_buckets(np.arange(1), np.arange(12), True, 8, 6)[0]
    assert got.tolist() == [0, 5, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7]  # keys after the query: 4..7
    back = relative_position_buckets(np.arange(12), np.arange(1), True, 8, 6)[:, 0]
    assert back.tolist() == [0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    # causal: every future key shares bucket 0 with the query itself
    causal = relative_position_buckets(np.arange(6), np.arange(6), False, 8, 6)
    assert (np.triu(causal, 1) == 0).all()
    assert causal[5].tolist() == [6, 4, 3, 2, 1, 0]  # 0-3 exact, 4 and 5 logarithmic
    # only the distance matters
    a = relative_position_buckets(np.arange(3, 6), np.arange(2, 9), True, 32, 128)
    b = relative_position_buckets(np.arange(0, 3), np.arange(-1, 6), True, 32, 128)
    np.testing.assert_array_equal(a, b)


def test_one_bias_table_per_stack_shared_by_its_layers():
    model = EncoderDecoderLM(cfg(depth=3), np.random.default_rng(0))
    tables = [n for n, _ in model.named_params() if "relative_attention_bias" in n]
    assert tables == ["encoder.relative_attention_bias.table.weight",
                      "decoder.relative_attention_bias.table.weight"]
    assert model.encoder.relative_attention_bias.bidirectional
    assert not model.decoder.relative_attention_bias.bidirectional
    assert all(b.cross_attn is None for b in model.encoder.blocks)
    assert all(b.cross_attn is not None for b in model.decoder.blocks)
    assert model.lm_head.W is not model.shared.weight  # FlanT5: untied head


# ---------------------------------------------------------------------------
# Gradients, float64
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("depth, heads", [(2, 2), (1, 4)])
def test_gradcheck_every_param_and_the_soft_prompt(depth, heads):
    model = randomize(EncoderDecoderLM(cfg(depth=depth, heads=heads), np.random.default_rng(0)))
    ids, mask, dec, dec_mask, prefix = inputs()
    report = check_layer(model, ids, mask, dec, dec_mask, prefix)
    assert {r.name for r in report.rows} == {n for n, _ in model.named_params()} | {"input4"}
    assert report.directional.passed and report.max_rel_err <= 1e-5


def test_gradcheck_of_the_prefix_lm_loss_through_the_frozen_model():
    """The loss BLIP-2 stage 2 trains with: the frozen model's backward returns the
    soft prompt's gradient, the same as when it trains, and adds into no Param."""
    model = randomize(EncoderDecoderLM(cfg(), np.random.default_rng(2)))
    ids, mask, _, _, prefix = inputs(3)
    labels = np.array([[5, 6, 3, -100], [7, 3, -100, -100]])
    trainable_grad = seq2seq_step(model, ids, mask, labels, prefix)[1]
    model.zero_grad()
    model.freeze()
    assert model.params() == []
    soft = Param(prefix, dtype=np.float64)

    def loss(backward):
        value, d = seq2seq_step(model, ids, mask, labels, soft.data, backward=backward)
        if backward:
            soft.grad += d
        return value

    report = gradcheck(loss, {"soft_prompt": soft}, n_coords=12)
    assert report.passed
    np.testing.assert_array_equal(soft.grad, trainable_grad)
    assert not any(p.grad.any() for p in model.params(include_frozen=True))


def test_loss_is_cross_entropy_of_shifted_labels():
    model = randomize(EncoderDecoderLM(cfg(), np.random.default_rng(4)))
    ids, mask, _, _, prefix = inputs(5)
    labels = np.array([[5, 6, 3, -100], [7, 3, -100, -100]])
    dec = shift_right(labels)
    assert dec.tolist() == [[0, 5, 6, 3], [0, 7, 3, 0]]
    logits, _ = model.forward(ids, mask, dec, None, prefix)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != -100
    expected = -np.mean(logp[keep, labels[keep]])
    loss, _ = seq2seq_step(model, ids, mask, labels, prefix, backward=False)
    assert abs(loss - expected) < 1e-12


# ---------------------------------------------------------------------------
# Masks: bidirectional encoder, causal decoder, padding
# ---------------------------------------------------------------------------

def test_encoder_sees_both_ways_decoder_only_back_and_padding_is_invisible():
    model = randomize(EncoderDecoderLM(cfg(), np.random.default_rng(6)))
    ids, mask, dec, dec_mask, prefix = inputs(7)
    base, _ = model.forward(ids, mask, dec, dec_mask, prefix)
    later = ids.copy()
    later[0, 4] = (later[0, 4] % (V - 1)) + 1
    changed, _ = model.forward(later, mask, dec, dec_mask, prefix)
    assert np.abs(changed[0] - base[0]).max() > 1e-6  # every decoder row reads the encoder
    padded = ids.copy()
    padded[1, 4] = 7  # under the mask
    same, _ = model.forward(padded, mask, dec, dec_mask, prefix)
    np.testing.assert_allclose(same, base, atol=1e-13)
    future = dec.copy()
    future[:, 3] = (future[:, 3] % (V - 1)) + 1
    causal, _ = model.forward(ids, mask, future, dec_mask, prefix)
    np.testing.assert_allclose(causal[:, :3], base[:, :3], atol=1e-13)


def test_cached_decoding_equals_the_full_forward_and_greedy_follows_it():
    model = randomize(EncoderDecoderLM(cfg(), np.random.default_rng(8)))
    ids, _, dec, _, prefix = inputs(9)
    full, _ = model.forward(ids, None, dec, None, prefix)
    memory, _, _ = model.encode(ids, None, prefix)
    cap = EncoderDecoderCaptioner(model)
    kv = cap.image_kv(memory)
    first, past = cap.forward_incremental(dec[:, :1], None, kv, 0)
    rest, _ = cap.forward_incremental(dec[:, 1:], past, kv, 1)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-12)
    out = generate(cap, memory, np.array([0]), sep_id=3, method="greedy", max_length=6,
                   min_length=1)
    seq = np.zeros((2, 1), dtype=np.int64)
    for _ in range(5):  # greedy by hand, with full forwards
        logits, _ = model.forward(ids, None, seq, None, prefix)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    for row, tokens in zip(seq[:, 1:], out.tokens):
        stop = np.flatnonzero(row == 3)
        np.testing.assert_array_equal(tokens, row[:stop[0]] if stop.size else row)


def test_bad_input_is_named():
    model = EncoderDecoderLM(cfg(), np.random.default_rng(0))
    ids, mask, dec, dec_mask, prefix = inputs()
    with pytest.raises(ValueError, match="decoder_ids"):
        model.forward(ids, mask)
    with pytest.raises(ValueError, match="encoder attention_mask"):
        model.forward(ids, mask[:, :3], dec)
    with pytest.raises(ValueError, match="width 8"):
        model.forward(ids, mask, dec, prefix_embeds=prefix[..., :5].astype(np.float32))
    with pytest.raises(ValueError, match="max_positions"):
        model.forward(np.ones((2, 20), int), None, dec)
    with pytest.raises(ValueError, match="token ids must lie"):
        model.forward(ids + V, mask, dec)
    with pytest.raises(ValueError, match="expected ids or prefix_embeds"):
        model.encode()
    with pytest.raises(ValueError, match="integer labels"):
        seq2seq_step(model, ids, mask, np.zeros(4))
    with pytest.raises(ValueError, match="heads must divide"):
        cfg(heads=3)
    with pytest.raises(ValueError, match="num_buckets"):
        cfg(num_buckets=7)
    with pytest.raises(ValueError, match="max_distance"):
        cfg(num_buckets=32, max_distance=16)
    with pytest.raises(TypeError, match="T5Config"):
        EncoderDecoderLM({"vocab_size": V}, np.random.default_rng(0))


# ---------------------------------------------------------------------------
# Its text: prefix / suffix pairs, and pretraining
# ---------------------------------------------------------------------------

def test_prefix_split_follows_the_authors_rule():
    rng = np.random.default_rng(0)
    text = "a big red circle left of a small blue square"  # 10 words, midpoint 5
    ks = []
    for _ in range(200):
        prefix, suffix = prefix_split(text, rng)
        assert f"{prefix} {suffix}" == text
        ks.append(len(prefix.split()))
    assert set(ks) == {1, 2, 3, 4, 5}
    assert {len(prefix_split(text, rng, min_prefix=0)[0].split()) for _ in range(200)} == \
        {0, 1, 2, 3, 4, 5}
    assert prefix_split("circle", rng) == ("circle", "")  # one word: the prefix takes it


def test_seq2seq_pairs_and_their_encoding():
    rng = np.random.default_rng(1)
    enc, answer = seq2seq_pair(["a red circle", qa_text("what colour is the circle", "red")],
                               rng)
    assert enc == ["a red circle", "question what colour is the circle answer"]
    assert answer == "red"
    enc, rest = seq2seq_pair(["a red circle", "there is a red disc"], rng)
    assert enc[0] == "a red circle" and f"{enc[1]} {rest}".strip() == "there is a red disc"
    tok = build_lm_tokenizer()
    ids, mask, labels = encode_seq2seq(tok, [["a red circle", ""], "red"], ["big", "a disc"])
    sep = tok.sep_id
    red, circle = tok.token_to_id("red"), tok.token_to_id("circle")
    assert ids[0].tolist() == [tok.token_to_id("a"), red, circle, sep, sep]  # "" -> [SEP]
    assert ids[1].tolist() == [red, sep, 0, 0, 0] and mask[1].tolist() == [1, 1, 0, 0, 0]
    assert labels.tolist() == [[tok.token_to_id("big"), sep, -100],
                               [tok.token_to_id("a"), tok.token_to_id("disc"), sep]]
    corpus = seq2seq_corpus(40, np.random.default_rng(2), ("paraphrase", "caption_qa"))
    assert all(len(e) == 2 and d for e, d in corpus)
    with pytest.raises(ValueError, match="max_length"):
        encode_seq2seq(tok, ["a red circle"], ["x"], max_length=3)


def test_pretraining_lowers_the_loss_and_the_lm_answers():
    tok = build_lm_tokenizer()
    lm = EncoderDecoderLM(T5Config(vocab_size=tok.vocab_size, width=16, depth=1, heads=2,
                                   mlp_dim=24), np.random.default_rng(0))
    trainer = Trainer(Seq2SeqPretraining(lm, tok, LMPretrainConfig(
        steps=40, batch_size=16, corpus_size=128, lr=1e-2, warmup_steps=4)))
    losses = trainer.run(progress=False)["loss"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    logits = answer_logits(lm, tok, [qa_text("how many objects are there")] * 2)
    assert logits.shape == (2, tok.vocab_size)
    texts = generate_text(lm, tok, prompt="a red circle", method="greedy", max_length=6)
    assert len(texts) == 1 and isinstance(texts[0], str)
    with pytest.raises(TypeError, match="EncoderDecoderLM"):
        Seq2SeqPretraining(object(), tok)
    with pytest.raises(TypeError, match="LanguageModel"):
        LMPretraining(lm, tok)
