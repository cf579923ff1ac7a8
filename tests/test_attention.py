"""Attention, masks and the transformer blocks: gradient checks, a naive
reference implementation, and the properties attention must have (causality,
permutation equivariance, exact zeros for masked keys)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from layer_helpers import Seeded, randomize
from minblip import check_layer
from minblip.attention import (MultiHeadAttention, ScaledDotProductAttention, causal_mask,
                               padding_mask)
from minblip.transformer import PostNormBlock, PreNormBlock

# Inputs and Params come from default_rng(seed); the checker gets seed + 1 because
# check_layer draws its R from default_rng(seed), and R equal to the input hides
# bugs (L2Normalize's input gradient of sum(y * x) is exactly zero).
seeds = st.integers(0, 2**16)
# (heads, width) for blocks with LayerNorm: a width-2 LayerNorm is nearly a sign
# function (its output is +-1 per row), too steep for finite differences
heads_width = st.sampled_from([(1, 3), (1, 4), (2, 4), (3, 3), (2, 6)])


def random_padding(rng, B, T):
    """(B, T) validity with at least one real token per row (the first)."""
    valid = rng.random((B, T)) < 0.7
    valid[:, 0] = True
    return valid


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------

def test_padding_mask_shape_and_values():
    m = padding_mask(np.array([[1, 1, 0], [1, 0, 0]]))
    assert m.shape == (2, 1, 3) and m.dtype == bool
    np.testing.assert_array_equal(m[:, 0], [[True, True, False], [True, False, False]])


@given(Tq=st.integers(1, 6), prefix=st.integers(0, 4))
def test_causal_mask_with_prefix(Tq, prefix):
    Tk = Tq + prefix
    m = causal_mask(Tq, Tk)
    assert m.shape == (1, Tq, Tk) and m.dtype == bool
    for i in range(Tq):
        for j in range(Tk):  # query i is token prefix + i: it sees the prefix and itself
            assert m[0, i, j] == (j <= prefix + i)
    if prefix == 0:
        np.testing.assert_array_equal(causal_mask(Tq)[0], np.tril(np.ones((Tq, Tq), bool)))


def test_padding_and_causal_masks_combine_by_broadcasting():
    valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    m = padding_mask(valid) & causal_mask(4)
    assert m.shape == (2, 4, 4)
    np.testing.assert_array_equal(m[1, 3], [True, True, False, False])


# ---------------------------------------------------------------------------
# Gradient checks
# ---------------------------------------------------------------------------

@given(B=st.integers(1, 2), H=st.integers(1, 2), Tq=st.integers(1, 4), Tk=st.integers(1, 4),
       dh=st.integers(1, 3), masked=st.booleans(), seed=seeds)
def test_sdpa_gradcheck(B, H, Tq, Tk, dh, masked, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, dh)) for T in (Tq, Tk, Tk))
    mask = rng.random((B, Tq, Tk)) < 0.7 if masked else None  # may mask whole rows
    check_layer(ScaledDotProductAttention(), q, k, v, forward_kwargs={"mask": mask},
                seed=seed + 1)


@given(B=st.integers(1, 2), T=st.integers(1, 4), H=st.integers(1, 3), dh=st.integers(1, 3),
       mask_kind=st.sampled_from(["none", "padding", "causal", "both"]), seed=seeds)
def test_mha_self_attention_gradcheck(B, T, H, dh, mask_kind, seed):
    rng = np.random.default_rng(seed)
    mha = randomize(MultiHeadAttention(H * dh, H, rng), rng)
    x = rng.standard_normal((B, T, H * dh))
    mask = {"none": None, "padding": padding_mask(random_padding(rng, B, T)),
            "causal": causal_mask(T),
            "both": padding_mask(random_padding(rng, B, T)) & causal_mask(T)}[mask_kind]
    report = check_layer(mha, x, forward_kwargs={"mask": mask}, seed=seed + 1)
    assert len(report.rows) == 9  # 4 Linears x (W, b) + the input


@given(B=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 4), H=st.integers(1, 2),
       dh=st.integers(1, 3), d_context=st.integers(1, 5), masked=st.booleans(), seed=seeds)
def test_mha_cross_attention_gradcheck(B, T, S, H, dh, d_context, masked, seed):
    rng = np.random.default_rng(seed)
    mha = randomize(MultiHeadAttention(H * dh, H, rng, d_context=d_context), rng)
    x = rng.standard_normal((B, T, H * dh))
    context = rng.standard_normal((B, S, d_context))
    mask = padding_mask(random_padding(rng, B, S)) if masked else None
    report = check_layer(mha, x, context, forward_kwargs={"mask": mask}, seed=seed + 1)
    assert [r.name for r in report.rows][-2:] == ["input0", "input1"]


@given(T=st.integers(2, 4), seed=seeds)
def test_mha_with_attention_dropout_gradcheck(T, seed):
    rng = np.random.default_rng(seed)
    mha = randomize(MultiHeadAttention(4, 2, rng, dropout=0.3), rng)
    x = rng.standard_normal((2, T, 4))
    check_layer(Seeded(mha, seed), x, forward_kwargs={"mask": causal_mask(T)}, seed=seed + 1)


@given(B=st.integers(1, 2), T=st.integers(1, 4), hd=heads_width, masked=st.booleans(),
       dropout=st.sampled_from([0.0, 0.2]), seed=seeds)
def test_prenorm_block_gradcheck(B, T, hd, masked, dropout, seed):
    rng = np.random.default_rng(seed)
    H, d = hd
    block = randomize(PreNormBlock(d, H, 2 * d, rng, dropout=dropout), rng)
    x = rng.standard_normal((B, T, d))
    mask = padding_mask(random_padding(rng, B, T)) if masked else None
    check_layer(Seeded(block, seed), x, forward_kwargs={"mask": mask}, seed=seed + 1)


@given(B=st.integers(1, 2), T=st.integers(1, 4), hd=heads_width, causal=st.booleans(),
       dropout=st.sampled_from([0.0, 0.2]), seed=seeds)
def test_postnorm_block_without_cross_attention_gradcheck(B, T, hd, causal, dropout, seed):
    rng = np.random.default_rng(seed)
    H, d = hd
    block = randomize(PostNormBlock(d, H, 2 * d, rng, dropout=dropout), rng)
    x = rng.standard_normal((B, T, d))
    mask = causal_mask(T) if causal else padding_mask(random_padding(rng, B, T))
    check_layer(Seeded(block, seed), x, forward_kwargs={"mask": mask}, seed=seed + 1)


@given(B=st.integers(1, 2), T=st.integers(1, 3), S=st.integers(1, 4), hd=heads_width,
       d_context=st.integers(1, 4), dropout=st.sampled_from([0.0, 0.2]), seed=seeds)
def test_postnorm_block_with_cross_attention_gradcheck(B, T, S, hd, d_context, dropout, seed):
    rng = np.random.default_rng(seed)
    H, d = hd
    block = randomize(PostNormBlock(d, H, 2 * d, rng, dropout=dropout, cross_attention=True,
                                    d_context=d_context), rng)
    x = rng.standard_normal((B, T, d))
    context = rng.standard_normal((B, S, d_context))
    mask, context_mask = causal_mask(T), padding_mask(random_padding(rng, B, S))
    # check_layer passes inputs positionally: forward(x, mask, context, context_mask)
    report = check_layer(Seeded(block, seed), x, mask, context, context_mask, seed=seed + 1)
    names = [r.name for r in report.rows]
    assert names[-2:] == ["input0", "input2"]  # x and the context
    assert any(n.startswith("layer.cross_attn.") for n in names)


# ---------------------------------------------------------------------------
# Forward against a naive per-head loop
# ---------------------------------------------------------------------------

def naive_mha(mha, x, context=None, mask=None):
    """Multi-head attention one batch item, head and query at a time."""
    source = x if context is None else context
    B, T, D = x.shape
    S = source.shape[1]
    H = mha.n_heads
    dh = D // H
    allowed = np.ones((B, T, S), bool) if mask is None else np.broadcast_to(mask, (B, T, S))
    out = np.zeros((B, T, D))
    for b in range(B):
        heads = []
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            q = x[b] @ mha.query.W.data[:, cols] + mha.query.b.data[cols]  # (T, dh)
            k = source[b] @ mha.key.W.data[:, cols] + mha.key.b.data[cols]  # (S, dh)
            v = source[b] @ mha.value.W.data[:, cols] + mha.value.b.data[cols]  # (S, dh)
            head = np.zeros((T, dh))
            for i in range(T):
                keys = [j for j in range(S) if allowed[b, i, j]]
                if not keys:
                    continue  # a fully masked query reads nothing
                scores = {j: float(q[i] @ k[j]) / math.sqrt(dh) for j in keys}
                top = max(scores.values())
                w = {j: math.exp(s - top) for j, s in scores.items()}
                total = math.fsum(w.values())
                for j in keys:
                    head[i] += w[j] / total * v[j]
            heads.append(head)
        out[b] = np.concatenate(heads, axis=1) @ mha.out.W.data + mha.out.b.data
    return out


@given(B=st.integers(1, 2), T=st.integers(1, 5), H=st.integers(1, 3), dh=st.integers(1, 3),
       masked=st.booleans(), seed=seeds)
def test_mha_self_attention_equals_naive_loop(B, T, H, dh, masked, seed):
    rng = np.random.default_rng(seed)
    mha = randomize(MultiHeadAttention(H * dh, H, rng), rng)
    x = rng.standard_normal((B, T, H * dh))
    mask = padding_mask(random_padding(rng, B, T)) & causal_mask(T) if masked else None
    out, _ = mha.forward(x, mask=mask)
    np.testing.assert_allclose(out, naive_mha(mha, x, mask=mask), rtol=1e-11, atol=1e-12)


@given(B=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 5), H=st.integers(1, 3),
       dh=st.integers(1, 3), d_context=st.integers(1, 5), seed=seeds)
def test_mha_cross_attention_equals_naive_loop(B, T, S, H, dh, d_context, seed):
    rng = np.random.default_rng(seed)
    mha = randomize(MultiHeadAttention(H * dh, H, rng, d_context=d_context), rng)
    x = rng.standard_normal((B, T, H * dh))
    context = rng.standard_normal((B, S, d_context))
    mask = rng.random((B, T, S)) < 0.6  # an arbitrary (B, Tq, Tk) mask, rows may be empty
    out, _ = mha.forward(x, context, mask=mask)
    np.testing.assert_allclose(out, naive_mha(mha, x, context, mask), rtol=1e-11, atol=1e-12)


def test_mha_past_kv_steps_equal_one_causal_pass():
    rng = np.random.default_rng(0)
    mha = randomize(MultiHeadAttention(6, 2, rng), rng)
    x = rng.standard_normal((2, 5, 6))
    full, _ = mha.forward(x, mask=causal_mask(5))
    past = None
    for t in range(5):
        step, cache = mha.forward(x[:, t:t + 1], past_kv=past)
        past = cache["present"]
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-12, atol=1e-14)
    assert past[0].shape == (2, 2, 5, 3)


@given(P=st.integers(1, 3), T=st.integers(1, 3), seed=seeds)
def test_mha_with_past_kv_gradcheck(P, T, seed):
    # cached keys and values of earlier tokens are constants for backward
    rng = np.random.default_rng(seed)
    mha = randomize(MultiHeadAttention(4, 2, rng), rng)
    past = tuple(rng.standard_normal((2, 2, P, 2)) for _ in range(2))
    x = rng.standard_normal((2, T, 4))
    check_layer(mha, x, forward_kwargs={"past_kv": past, "mask": causal_mask(T, P + T)},
                seed=seed + 1)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

@given(B=st.integers(1, 2), T=st.integers(2, 6), hd=heads_width, block=st.booleans(),
       data=st.data())
def test_causal_mask_later_tokens_never_change_earlier_outputs(B, T, hd, block, data):
    seed = data.draw(seeds)
    t = data.draw(st.integers(1, T - 1), label="first changed position")
    rng = np.random.default_rng(seed)
    H, d = hd
    layer = (PostNormBlock(d, H, 2 * d, rng) if block else MultiHeadAttention(d, H, rng))
    randomize(layer, rng)
    x = rng.standard_normal((B, T, d))
    x2 = x.copy()
    x2[:, t:] = rng.standard_normal((B, T - t, d)) * 5.0
    y, cache = layer.forward(x, mask=causal_mask(T))
    y2, _ = layer.forward(x2, mask=causal_mask(T))
    np.testing.assert_allclose(y2[:, :t], y[:, :t], rtol=0, atol=1e-13)
    assert not np.allclose(y2[:, t:], y[:, t:])
    # and backward agrees: a loss on earlier outputs sends no gradient to later inputs
    dy = np.zeros_like(y)
    dy[:, :t] = rng.standard_normal((B, t, d))
    dx, _ = layer.backward(dy, cache)
    np.testing.assert_array_equal(dx[:, t:], 0.0)


@given(B=st.integers(1, 2), T=st.integers(2, 6), hd=heads_width,
       kind=st.sampled_from(["mha", "prenorm", "postnorm"]), data=st.data())
def test_self_attention_without_positions_is_permutation_equivariant(B, T, hd, kind, data):
    seed = data.draw(seeds)
    perm = np.array(data.draw(st.permutations(range(T)), label="perm"))
    rng = np.random.default_rng(seed)
    H, d = hd
    layer = {"mha": lambda: MultiHeadAttention(d, H, rng),
             "prenorm": lambda: PreNormBlock(d, H, 2 * d, rng),
             "postnorm": lambda: PostNormBlock(d, H, 2 * d, rng)}[kind]()
    randomize(layer, rng)
    x = rng.standard_normal((B, T, d))
    valid = random_padding(rng, B, T)
    y, _ = layer.forward(x, mask=padding_mask(valid))
    y_perm, _ = layer.forward(x[:, perm], mask=padding_mask(valid[:, perm]))
    np.testing.assert_allclose(y_perm, y[:, perm], rtol=1e-11, atol=1e-12)


@given(B=st.integers(1, 2), H=st.integers(1, 2), Tq=st.integers(1, 4), Tk=st.integers(1, 5),
       seed=seeds)
def test_masked_keys_get_exactly_zero_weight(B, H, Tq, Tk, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, 3)) * 4 for T in (Tq, Tk, Tk))
    mask = rng.random((B, Tq, Tk)) < 0.5
    sdpa = ScaledDotProductAttention()
    out, cache = sdpa.forward(q, k, v, mask)
    p = cache[3]  # the attention weights (B, H, Tq, Tk)
    assert np.all(p[np.broadcast_to(~mask[:, None], p.shape)] == 0.0)
    rows = mask.any(axis=-1)  # rows with at least one visible key sum to 1
    np.testing.assert_allclose(p.sum(-1)[np.broadcast_to(rows[:, None], p.shape[:3])], 1.0,
                               rtol=1e-14)
    # the values (and keys) behind masked positions cannot influence the output
    k2, v2 = k.copy(), v.copy()
    hidden = ~mask.any(axis=1)  # (B, Tk): keys no query may see
    k2[np.broadcast_to(hidden[:, None], k.shape[:3])] = 1e6
    v2[np.broadcast_to(hidden[:, None], v.shape[:3])] = -1e6
    out2, _ = sdpa.forward(q, k2, v2, mask)
    np.testing.assert_allclose(out2, out, rtol=1e-13, atol=1e-14)


def test_fully_masked_row_gives_zeros_not_nan():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 3, 4)) for _ in range(3))
    mask = np.ones((2, 3, 3), bool)
    mask[0, 1] = False  # query 1 of item 0 may see nothing
    sdpa = ScaledDotProductAttention()
    out, cache = sdpa.forward(q, k, v, mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, :, 1], 0.0)
    dq, dk, dv = sdpa.backward(np.ones_like(out), cache)
    assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
    np.testing.assert_array_equal(dq[0, :, 1], 0.0)
    # through MultiHeadAttention the row is the output bias alone
    mha = randomize(MultiHeadAttention(4, 2, rng), rng)
    y, _ = mha.forward(rng.standard_normal((2, 3, 4)), mask=mask)
    np.testing.assert_allclose(y[0, 1], mha.out.b.data, rtol=1e-15)


@pytest.mark.parametrize("mask", [padding_mask(np.array([[1, 1, 0]])), causal_mask(3),
                                  np.ones((1, 3, 3), bool)])
def test_mask_shapes_accepted_by_mha(mask):
    mha = MultiHeadAttention(4, 2, np.random.default_rng(0))
    out, _ = mha.forward(np.random.default_rng(1).standard_normal((1, 3, 4)), mask=mask)
    assert out.shape == (1, 3, 4)
