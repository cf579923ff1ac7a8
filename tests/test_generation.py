"""Caption generation: cached keys/values give exactly the uncached results."""
import numpy as np
import pytest

from minblip.generation import apply_repetition_penalty, generate, top_p_filter
from minblip.softmax import softmax
from minblip.text import TextConfig, build_med

V = 20
SEP = 3
DEC = 4


def make_decoder(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    cfg = TextConfig(vocab_size=V, width=16, depth=2, heads=2, mlp_dim=32, max_positions=24,
                     encoder_width=12)
    _, decoder = build_med(cfg, rng)
    decoder.to(dtype)
    for name, p in decoder.named_params():
        if not name.endswith(("gamma", "beta")):
            p.data[...] = 0.4 * rng.standard_normal(p.shape)
    embeds = rng.standard_normal((3, 5, 12)).astype(dtype)
    return decoder, embeds


PROMPT = np.array([DEC, 7, 8])


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_cache_gives_exactly_the_uncached_tokens_and_scores(method):
    decoder, embeds = make_decoder(1)
    kw = dict(sep_id=SEP, method=method, max_length=14, min_length=5, num_beams=3)
    with_cache = generate(decoder, embeds, PROMPT, use_cache=True,
                          rng=np.random.default_rng(5), **kw)
    without = generate(decoder, embeds, PROMPT, use_cache=False,
                       rng=np.random.default_rng(5), **kw)
    for a, b in zip(with_cache.tokens, without.tokens):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(with_cache.scores, without.scores, rtol=1e-10, atol=1e-12)


def test_greedy_picks_the_argmax_of_the_full_forward():
    decoder, embeds = make_decoder(2)
    out = generate(decoder, embeds[:1], PROMPT, sep_id=SEP, method="greedy", max_length=10,
                   min_length=0)
    seq = PROMPT.copy()
    for token in out.tokens[0]:
        mask = np.ones((1, seq.size), np.int64)
        logits, _ = decoder.forward(seq[None], mask, embeds[:1])
        assert int(np.argmax(logits[0, -1])) == token
        seq = np.append(seq, token)


def test_lengths_are_respected():
    decoder, embeds = make_decoder(3)
    for method in ["greedy", "beam", "nucleus"]:
        out = generate(decoder, embeds, PROMPT, sep_id=SEP, method=method, max_length=9,
                       min_length=7, rng=np.random.default_rng(0))
        for tokens in out.tokens:
            assert PROMPT.size + len(tokens) <= 9
            assert PROMPT.size + len(tokens) >= 7 - 1 or SEP not in tokens
            assert SEP not in tokens


def test_min_length_forbids_sep():
    decoder, embeds = make_decoder(4)
    # make [SEP] overwhelmingly likely, then ask for at least 8 tokens
    decoder.head.bias.data[SEP] = 50.0
    out = generate(decoder, embeds, PROMPT, sep_id=SEP, method="greedy", max_length=12,
                   min_length=8)
    assert all(PROMPT.size + len(t) >= 8 for t in out.tokens)
    out = generate(decoder, embeds, PROMPT, sep_id=SEP, method="greedy", max_length=12,
                   min_length=0)
    assert all(len(t) == 0 for t in out.tokens)


@pytest.mark.parametrize("sep_bias", [0.0, 8.0])
def test_beam_score_is_the_length_normalised_log_probability_of_its_tokens(sep_bias):
    decoder, embeds = make_decoder(6)
    decoder.head.bias.data[SEP] += sep_bias  # 8.0: every search ends with [SEP]
    max_length = 12
    out = generate(decoder, embeds, PROMPT, sep_id=SEP, method="beam", num_beams=4,
                   max_length=max_length, min_length=0)
    finished = 0
    for b, (tokens, score) in enumerate(zip(out.tokens, out.scores)):
        # a hypothesis cut at max_length has no [SEP]; a finished one ends with it
        cut = PROMPT.size + len(tokens) == max_length
        seq = np.concatenate([PROMPT, tokens] + ([] if cut else [[SEP]]))
        finished += not cut
        mask = np.ones((1, seq.size - 1), np.int64)
        logits, _ = decoder.forward(seq[None, :-1], mask, embeds[b:b + 1])
        logp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
        total = sum(logp[t, seq[t + 1]] for t in range(PROMPT.size - 1, seq.size - 1))
        assert score == pytest.approx(total / (seq.size - PROMPT.size), rel=1e-9)
    assert finished == (3 if sep_bias else 0)


def test_beam_search_with_one_beam_never_beats_a_wider_search_on_its_own_score():
    decoder, embeds = make_decoder(9)
    kw = dict(sep_id=SEP, method="beam", max_length=12, min_length=0)
    narrow = generate(decoder, embeds, PROMPT, num_beams=1, **kw)
    wide = generate(decoder, embeds, PROMPT, num_beams=6, **kw)
    assert np.all(wide.scores >= narrow.scores - 1e-12)


BEAM_OPTIONS = [dict(num_beams=3, min_length=5, max_length=14),
                dict(num_beams=1, min_length=0, max_length=10),
                dict(num_beams=4, min_length=7, max_length=12, repetition_penalty=1.3),
                dict(num_beams=2, min_length=0, max_length=16)]


@pytest.mark.parametrize("seed", [10, 11, 12])
@pytest.mark.parametrize("options", BEAM_OPTIONS)
def test_batched_beam_search_gives_each_image_its_own_search(seed, options):
    decoder, embeds = make_decoder(seed)
    decoder.head.bias.data[SEP] += 3.0  # likely [SEP]: the images stop at different steps
    embeds = np.concatenate([embeds, make_decoder(seed + 100)[1]])  # 6 images
    kw = dict(sep_id=SEP, method="beam", **options)
    batched = generate(decoder, embeds, PROMPT, **kw)
    assert len({len(t) for t in batched.tokens}) > 1
    for b in range(embeds.shape[0]):
        alone = generate(decoder, embeds[b:b + 1], PROMPT, **kw)
        np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
        assert batched.scores[b] == pytest.approx(alone.scores[0], rel=1e-12)
    uncached = generate(decoder, embeds, PROMPT, use_cache=False, **kw)
    for a, b in zip(batched.tokens, uncached.tokens):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(batched.scores, uncached.scores, rtol=1e-10, atol=1e-12)


def test_top_p_filter_keeps_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(top_p_filter(logits, 0.7))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(top_p_filter(logits, 0.9))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
    kept = np.isfinite(top_p_filter(logits, 0.1))  # at least one token survives
    np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_repetition_penalty():
    logits = np.array([[2.0, -2.0, 1.0]])
    seqs = np.array([[0, 1, 1]])
    out = apply_repetition_penalty(logits, seqs, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0]])
    assert apply_repetition_penalty(logits, seqs, 1.0) is logits


def test_nucleus_sampling_is_repeatable_and_needs_rng():
    decoder, embeds = make_decoder(7)
    kw = dict(sep_id=SEP, method="nucleus", max_length=12, min_length=3)
    a = generate(decoder, embeds, PROMPT, rng=np.random.default_rng(1), **kw)
    b = generate(decoder, embeds, PROMPT, rng=np.random.default_rng(1), **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
    with pytest.raises(ValueError, match="rng"):
        generate(decoder, embeds, PROMPT, **kw)


def test_sampling_frequencies_follow_the_filtered_distribution():
    decoder, embeds = make_decoder(8)
    first = [generate(decoder, embeds[:1], PROMPT, sep_id=SEP, method="nucleus", max_length=4,
                      min_length=0, top_p=1.0, repetition_penalty=1.0,
                      rng=np.random.default_rng(s)).tokens[0][:1] for s in range(1500)]
    mask = np.ones((1, PROMPT.size), np.int64)
    logits, _ = decoder.forward(PROMPT[None], mask, embeds[:1])
    p = softmax(logits[0, -1])
    counts = np.bincount([int(t[0]) if len(t) else SEP for t in first], minlength=V) / 1500
    np.testing.assert_allclose(counts, p, atol=0.04)


def test_bad_input():
    decoder, embeds = make_decoder(0)
    with pytest.raises(ValueError, match="method"):
        generate(decoder, embeds, PROMPT, sep_id=SEP, method="topk")
    with pytest.raises(ValueError, match="max_length"):
        generate(decoder, embeds, PROMPT, sep_id=SEP, max_length=3)
    with pytest.raises(ValueError, match="image_embeds"):
        generate(decoder, embeds[0], PROMPT, sep_id=SEP)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(decoder, embeds, np.array([], np.int64), sep_id=SEP)
