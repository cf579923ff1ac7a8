"""The Q-Former: gradients in every mode, the broadcast queries, the masks and who
sees whom, the cached formulation of ITG, and bad input."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minblip.gradcheck import check_layer
from minblip.qformer import MODES, QFormer, QFormerConfig, qformer_mask

Q = 3


def config(**kw):
    base = dict(vocab_size=20, width=8, depth=2, heads=2, mlp_dim=12, num_queries=Q,
                encoder_width=6, max_positions=8, init_std=0.4)
    base.update(kw)
    return QFormerConfig(**base)


def make(seed=1, dtype=np.float64, **kw):
    """A Q-Former with wide random weights (no gradient is tiny) and distinct FFNs."""
    rng = np.random.default_rng(seed)
    q = QFormer(config(**kw), rng).to(dtype)
    for name, p in q.named_params():
        if name.endswith("gamma"):
            p.data[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
        else:
            p.data[...] += 0.3 * rng.standard_normal(p.shape)
    return q


IDS = np.array([[2, 7, 8, 9, 3, 0], [2, 10, 11, 3, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


def image(B=2, seed=0):
    return np.random.default_rng(seed).standard_normal((B, 4, 6))


def inputs(mode):
    if mode == "queries":
        return (image(),)
    if mode == "text":
        return (None, IDS, MASK)
    return (image(), IDS, MASK)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_every_mode(mode):
    """All Params (query_tokens included), d image_embeds and a random direction."""
    report = check_layer(make(), *inputs(mode), forward_kwargs={"mode": mode}, n_coords=3)
    names = [r.name for r in report.rows]
    assert "query_tokens" in names
    assert ("input0" in names) == (mode != "text")
    assert report.passed and report.directional.passed


def test_gradient_text_only_causal():
    report = check_layer(make(), None, IDS, MASK,
                         forward_kwargs={"mode": "itg", "use_queries": False}, n_coords=2)
    assert report.passed


def test_query_tokens_gradient_is_the_sum_over_the_batch():
    q = make(2)
    img = image(3, seed=4)
    ids, mask = np.vstack([IDS, IDS[:1]]), np.vstack([MASK, MASK[:1]])
    R = np.random.default_rng(5).standard_normal((3, Q + 6, 8))
    q.zero_grad()
    _, cache = q.forward(img, ids, mask, mode="itm")
    q.backward(R, cache)
    whole = q.query_tokens.grad.copy()
    per_example = np.zeros_like(whole)
    for b in range(3):
        q.zero_grad()
        _, cache = q.forward(img[b:b + 1], ids[b:b + 1], mask[b:b + 1], mode="itm")
        q.backward(R[b:b + 1], cache)
        per_example += q.query_tokens.grad
    assert q.query_tokens.shape == (1, Q, 8)
    np.testing.assert_allclose(whole, per_example, rtol=1e-12, atol=1e-14)


def test_output_shapes():
    q = make()
    assert q.forward(image(), mode="queries")[0].shape == (2, Q, 8)
    assert q.forward(None, IDS, MASK, mode="text")[0].shape == (2, 6, 8)
    for mode in ("itc", "itm", "itg"):
        assert q.forward(image(), IDS, MASK, mode=mode)[0].shape == (2, Q + 6, 8)
        assert q.forward(None, IDS, MASK, mode=mode, use_queries=False)[0].shape == (2, 6, 8)


# ---------------------------------------------------------------------------------------
# The masks
# ---------------------------------------------------------------------------------------

def test_dense_masks_by_hand():
    m = np.array([[1, 1, 0]])  # Q = 2 queries, 2 real tokens and one pad
    expect = {
        "itc": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]],
        "itm": [[1, 1, 1, 1, 0]] * 5,
        "itg": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],
    }
    for mode, e in expect.items():
        got = qformer_mask(mode, 2, m)
        assert got.dtype == bool and got.shape == (1, 5, 5)
        np.testing.assert_array_equal(got[0], np.array(e, dtype=bool), err_msg=mode)
    np.testing.assert_array_equal(qformer_mask("queries", 2), np.ones((1, 2, 2), bool))
    np.testing.assert_array_equal(qformer_mask("text", 0, m)[0], [[1, 1, 0]] * 3)
    np.testing.assert_array_equal(make().attention_mask("itg", 2, m), qformer_mask("itg", 2, m))


@given(st.integers(0, 4), st.lists(st.integers(0, 6), min_size=1, max_size=3))
def test_mask_properties(n_queries, lengths):
    T = 6
    text = np.array([[1] * k + [0] * (T - k) for k in lengths])
    itc, itm, itg = (qformer_mask(m, n_queries, text) for m in ("itc", "itm", "itg"))
    q = slice(0, n_queries)
    t = slice(n_queries, None)
    assert not itc[:, q, t].any() and not itc[:, t, q].any()  # ITC: never meet
    assert not itg[:, q, t].any() and itg[:, t, q].all()  # ITG: queries never see text
    assert np.all(itc <= itm) and np.all(itg <= itm)  # ITM is the widest
    np.testing.assert_array_equal(itc[:, q, q], itg[:, q, q])  # queries see all queries
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(itg[:, t, t], itc[:, t, t] & causal)  # text: causal ITC
    pad = np.repeat((text == 0)[:, None, :], n_queries + T, axis=1)
    assert not itm[:, :, t][pad].any()  # nobody attends to padding


def change(ids, b, pos, new=15):
    out = ids.copy()
    out[b, pos] = new
    return out


def test_itc_queries_and_text_never_meet():
    q = make(3)
    img = image()
    h, _ = q.forward(img, IDS, MASK, mode="itc")
    hq, _ = q.forward(img, mode="queries")
    ht, _ = q.forward(None, IDS, MASK, mode="text")
    np.testing.assert_allclose(h[:, :Q], hq, rtol=1e-12, atol=1e-12)  # one pass = two passes
    np.testing.assert_allclose(h[:, Q:], ht, rtol=1e-12, atol=1e-12)
    h2, _ = q.forward(img, change(IDS, 0, 2), MASK, mode="itc")
    np.testing.assert_array_equal(h2[:, :Q], h[:, :Q])  # text changed: queries unchanged
    assert not np.allclose(h2[0, Q:], h[0, Q:])
    h3, _ = q.forward(image(seed=9), IDS, MASK, mode="itc")
    np.testing.assert_array_equal(h3[:, Q:], h[:, Q:])  # image changed: text unchanged
    assert not np.allclose(h3[:, :Q], h[:, :Q])


def test_itg_is_causal_and_queries_never_see_text():
    q = make(4)
    img = image()
    h, _ = q.forward(img, IDS, MASK, mode="itg")
    hq, _ = q.forward(img, mode="queries")
    np.testing.assert_allclose(h[:, :Q], hq, rtol=1e-12, atol=1e-12)
    for pos in range(1, 4):  # change text token `pos` of text 0
        h2, _ = q.forward(img, change(IDS, 0, pos), MASK, mode="itg")
        np.testing.assert_array_equal(h2[:, :Q + pos], h[:, :Q + pos])  # queries and earlier text
        assert not np.allclose(h2[0, Q + pos], h[0, Q + pos])  # the token itself changes
    h3, _ = q.forward(image(seed=9), IDS, MASK, mode="itg")
    assert not np.allclose(h3[:, Q:], h[:, Q:])  # the text reads the image through the queries


def test_itm_everything_sees_everything():
    q = make(5)
    img = image()
    h, _ = q.forward(img, IDS, MASK, mode="itm")
    for pos in range(int(MASK[0].sum())):  # every real token, [SEP] included
        h2, _ = q.forward(img, change(IDS, 0, pos), MASK, mode="itm")
        assert not np.allclose(h2[0, :Q], h[0, :Q]), pos  # the queries read the text
        np.testing.assert_array_equal(h2[1], h[1])  # the other pair is untouched
    h3, _ = q.forward(img, change(IDS, 1, 5), MASK, mode="itm")  # a padding position
    np.testing.assert_array_equal(h3[:, :Q + 4], h[:, :Q + 4])
    np.testing.assert_array_equal(h3[1, :Q + int(MASK[1].sum())], h[1, :Q + int(MASK[1].sum())])


def test_cross_attention_only_for_queries():
    q = make(6)
    assert q.layers[0].cross_attn is not None and q.layers[1].cross_attn is None
    q4 = QFormer(config(depth=4, cross_attention_freq=2), np.random.default_rng(0))
    assert [layer.cross_attn is not None for layer in q4.layers] == [True, False, True, False]
    # no query positions: no image allowed, and the text-only output ignores any image
    with pytest.raises(ValueError, match="only query positions cross-attend"):
        q.forward(image(), IDS, MASK, mode="text")
    R = np.random.default_rng(0).standard_normal((2, Q + 6, 8))
    R[:, :Q] = 0.0  # a loss on the text rows of ITC only
    _, cache = q.forward(image(), IDS, MASK, mode="itc")
    d_image = q.backward(R, cache)
    assert np.all(d_image == 0.0)


def test_query_ffn_starts_as_a_copy_of_the_text_ffn_but_is_separate():
    q = QFormer(config(), np.random.default_rng(0))
    for layer in q.layers:
        np.testing.assert_array_equal(layer.ffn_query.fc1.W.data, layer.ffn.fc1.W.data)
        assert layer.ffn_query.fc1.W is not layer.ffn.fc1.W
    ids = [id(p) for p in q.params()]
    assert len(ids) == len(set(ids))
    assert not q.embeddings.word_embeddings.weight.data[0].any()  # [PAD] row starts at zero


# ---------------------------------------------------------------------------------------
# ITG: the dense UniLM mask equals LAVIS's cached query keys and values
# ---------------------------------------------------------------------------------------

def test_itg_joint_mask_equals_cached_query_keys_and_values():
    q = make(7)
    img = image()
    h, _ = q.forward(img, IDS, MASK, mode="itg")
    kv = q.query_kv(img)
    assert kv[0][0].shape == (2, 2, Q, 4)  # (B, H, Q, dh)
    cached, present = q.forward_incremental(IDS, kv)
    real = MASK.astype(bool)  # padded rows may differ: the cached call has no padding mask
    np.testing.assert_allclose(cached[real], h[:, Q:][real], rtol=1e-12, atol=1e-12)
    # and token by token, carrying the text cache, as in captioning
    past, steps = None, []
    for t in range(IDS.shape[1]):
        step, past = q.forward_incremental(IDS[:, t:t + 1], kv, past, start=t)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), cached, rtol=1e-12, atol=1e-12)
    assert present[0][0].shape == (2, 2, 6, 4)  # the text part only


def test_itg_gradient_is_the_gradient_of_the_cached_formulation():
    """The cached formulation (LAVIS) as the loss; the joint pass's backward as the
    gradient: finite differences of one agree with the other."""
    from minblip.core import Param
    from minblip.gradcheck import gradcheck
    q = make(8)
    ids = IDS[:, :4]  # unpadded
    img = Param(image(), dtype=np.float64)
    R = np.random.default_rng(1).standard_normal((2, 4, 8))

    def loss_fn(backward):
        if backward:
            h, cache = q.forward(img.data, ids, None, mode="itg")
            dh = np.zeros_like(h)
            dh[:, Q:] = R
            img.grad += q.backward(dh, cache)
            return float(np.sum(h[:, Q:] * R))
        out, _ = q.forward_incremental(ids, q.query_kv(img.data))
        return float(np.sum(out * R))

    report = gradcheck(loss_fn, q.named_params() + [("image_embeds", img)], n_coords=2)
    assert report.passed


# ---------------------------------------------------------------------------------------
# Batch of one, dtype, bad input
# ---------------------------------------------------------------------------------------

def test_batch_of_one_every_mode():
    q = make(9)
    for mode in MODES:
        args = inputs(mode)
        args = tuple(None if a is None else a[:1] for a in args)
        h, cache = q.forward(*args, mode=mode)
        assert h.shape[0] == 1 and np.all(np.isfinite(h))
        q.backward(np.ones_like(h), cache)


def test_float32_stays_float32():
    q = QFormer(config(), np.random.default_rng(0))
    h, cache = q.forward(image().astype(np.float32), IDS, MASK, mode="itg")
    assert h.dtype == np.float32
    d = q.backward(np.ones_like(h), cache)
    assert d.dtype == np.float32 and q.query_tokens.grad.dtype == np.float32


def test_bad_input_messages():
    q = make()
    img = image()
    with pytest.raises(ValueError, match="mode"):
        q.forward(img, IDS, MASK, mode="captioning")
    with pytest.raises(ValueError, match="needs text ids"):
        q.forward(img, mode="itm")
    with pytest.raises(ValueError, match="image_embeds .* is needed"):
        q.forward(None, IDS, MASK, mode="itg")
    with pytest.raises(ValueError, match="takes no text"):
        q.forward(img, IDS, mode="queries")
    with pytest.raises(ValueError, match="use_queries=False"):
        q.forward(img, mode="queries", use_queries=False)
    with pytest.raises(ValueError, match="encoder_width=6"):
        q.forward(np.zeros((2, 4, 5)), mode="queries")
    with pytest.raises(ValueError, match="batch size 3"):
        q.forward(image(3), IDS, MASK, mode="itm")
    with pytest.raises(TypeError, match="floating"):
        q.forward(img.astype(np.int64), mode="queries")
    with pytest.raises(ValueError, match=r"\(B, S, encoder_width\)"):
        q.forward(img[0], mode="queries")
    with pytest.raises(ValueError, match="attention_mask"):
        q.forward(img, IDS, MASK[:, :4], mode="itm")
    with pytest.raises(ValueError, match="0/1"):
        q.forward(img, IDS, MASK * 2, mode="itm")
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        q.forward(img, IDS + 19, MASK, mode="itm")
    with pytest.raises(TypeError, match="integer token ids"):
        q.forward(img, IDS.astype(float), MASK, mode="itm")
    with pytest.raises(ValueError, match="max_positions=8"):
        q.forward(img, np.full((2, 9), 2), None, mode="itm")
    with pytest.raises(TypeError, match="Generator"):
        q.forward(img, mode="queries", rng=0)
    h, cache = q.forward(img, IDS, MASK, mode="itm")
    with pytest.raises(ValueError, match="dhidden of shape"):
        q.backward(h[:, :Q], cache)
    with pytest.raises(ValueError, match="start must equal"):
        q.forward_incremental(IDS, q.query_kv(img), start=2)
    with pytest.raises(ValueError, match="query_kv must be a list"):
        q.forward_incremental(IDS, q.query_kv(img)[:1])
    with pytest.raises(ValueError, match="heads must divide"):
        config(width=9)
    with pytest.raises(ValueError, match="num_queries"):
        config(num_queries=0)
    with pytest.raises(ValueError, match="dropout"):
        config(dropout=1.0)
    with pytest.raises(ValueError, match="text mask"):
        qformer_mask("itm", 2, np.array([1, 0]))
