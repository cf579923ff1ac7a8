"""Gradient checks and forward formulas for the basic layers and losses.

A gradient check only proves that backward is the derivative of forward; a
forward that is wrong but self-consistent passes it. So each layer is also
compared with an independent formula (math.erf, a textbook LayerNorm, a direct
-log p, ...).
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from layer_helpers import Seeded, randomize
from minblip import check_layer
from minblip.core import col_sum, row_max, row_mean, row_sum
from minblip.layers import GELU, Dropout, Embedding, LayerNorm, Linear, erf
from minblip.softmax import CrossEntropyLoss, L2Normalize, LogSoftmax, Softmax
from minblip.transformer import FeedForward

# Inputs and Params come from default_rng(seed); the checker gets seed + 1 because
# check_layer draws its R from default_rng(seed), and R equal to the input hides
# bugs (L2Normalize's input gradient of sum(y * x) is exactly zero).
seeds = st.integers(0, 2**16)
lead_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=3)  # 1-3 leading axes


# ---------------------------------------------------------------------------
# Gradient checks (float64, loss sum(out * R) with a fixed random R)
# ---------------------------------------------------------------------------

@given(lead=lead_shapes, d_in=st.integers(1, 5), d_out=st.integers(1, 5),
       bias=st.booleans(), seed=seeds)
def test_linear_gradcheck_2d_3d_4d(lead, d_in, d_out, bias, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(Linear(d_in, d_out, rng, bias=bias), rng)
    x = rng.standard_normal((*lead, d_in))
    report = check_layer(layer, x, seed=seed + 1)
    assert [r.name for r in report.rows] == (["W", "b"] if bias else ["W"]) + ["input0"]


@given(num=st.integers(1, 5), dim=st.integers(1, 4), B=st.integers(1, 3),
       T=st.integers(2, 6), seed=seeds)
def test_embedding_gradcheck_with_repeated_ids(num, dim, B, T, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(Embedding(num, dim, rng), rng)
    ids = rng.integers(0, num, (B, T))
    ids[0, 1] = ids[0, 0]  # at least one id appears twice
    check_layer(layer, ids, seed=seed + 1, n_coords=num * dim)  # every row, used or not


# width >= 3: a width-2 LayerNorm outputs +-1 per row, a near-step function that
# finite differences resolve poorly when the two inputs are close
@given(lead=lead_shapes, dim=st.integers(3, 6), eps=st.sampled_from([1e-5, 1e-6, 1e-12]),
       seed=seeds)
def test_layernorm_gradcheck(lead, dim, eps, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(LayerNorm(dim, eps), rng)
    check_layer(layer, rng.standard_normal((*lead, dim)) * 2.0, seed=seed + 1)


@given(lead=lead_shapes, approximate=st.sampled_from(["none", "tanh"]), seed=seeds)
def test_gelu_gradcheck(lead, approximate, seed):
    x = np.random.default_rng(seed).standard_normal(lead) * 3.0
    check_layer(GELU(approximate), x, seed=seed + 1)


@given(lead=lead_shapes, p=st.sampled_from([0.1, 0.5, 0.8]), seed=seeds)
def test_dropout_gradcheck_with_fixed_generator(lead, p, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, 4))
    check_layer(Seeded(Dropout(p), seed), x, seed=seed + 1)


@given(lead=lead_shapes, K=st.integers(1, 6), axis=st.sampled_from([0, -1]),
       log=st.booleans(), seed=seeds)
def test_softmax_and_log_softmax_gradcheck(lead, K, axis, log, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, K)) * 2.0
    check_layer((LogSoftmax if log else Softmax)(axis), x, seed=seed + 1)


@given(lead=lead_shapes, K=st.integers(2, 6), smoothing=st.sampled_from([0.0, 0.1]),
       ignore_index=st.sampled_from([-100, 0]), seed=seeds)
def test_cross_entropy_gradcheck_class_ids(lead, K, smoothing, ignore_index, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((*lead, K)) * 2.0
    targets = rng.integers(0, K, lead)
    targets[rng.random(lead) < 0.3] = ignore_index
    loss = CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=smoothing)
    check_layer(loss, logits, targets, seed=seed + 1)


@given(lead=lead_shapes, K=st.integers(2, 6), smoothing=st.sampled_from([0.0, 0.1]),
       seed=seeds)
def test_cross_entropy_gradcheck_soft_targets(lead, K, smoothing, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((*lead, K)) * 2.0
    targets = rng.dirichlet(np.ones(K), lead)
    # the targets are floats but constants: check the logits only
    check_layer(CrossEntropyLoss(label_smoothing=smoothing), logits, targets, wrt=[0],
                seed=seed + 1)


@given(lead=lead_shapes, dim=st.integers(1, 6), seed=seeds)
def test_l2_normalize_gradcheck(lead, dim, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, dim)) + 0.5
    check_layer(L2Normalize(), x, seed=seed + 1)


def test_l2_normalize_gradcheck_below_eps():
    # rows with norm < eps are divided by the constant eps: y = x / eps is linear
    # there. A large eps makes that branch wide enough for finite differences;
    # the last row stays above eps for comparison.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4)) * 1e-2
    x[2] *= 100.0
    layer = L2Normalize(eps=0.5)
    _, (_, _, clipped) = layer.forward(x)
    assert clipped[:, 0].tolist() == [True, True, False]
    check_layer(layer, x, seed=1)


@given(lead=lead_shapes, d=st.integers(1, 5), d_ff=st.integers(1, 8),
       activation=st.sampled_from(["gelu", "gelu_tanh", "relu"]), seed=seeds)
def test_feedforward_gradcheck(lead, d, d_ff, activation, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(FeedForward(d, d_ff, rng, activation=activation), rng)
    check_layer(layer, rng.standard_normal((*lead, d)), seed=seed + 1)


# ---------------------------------------------------------------------------
# Forward against independent formulas
# ---------------------------------------------------------------------------

def test_linear_forward_is_x_at_W_plus_b_per_row():
    rng = np.random.default_rng(0)
    layer = randomize(Linear(3, 2, rng), rng)
    x = rng.standard_normal((2, 4, 3))
    y, _ = layer.forward(x)
    for idx in np.ndindex(2, 4):
        want = [sum(x[idx][i] * layer.W.data[i, j] for i in range(3)) + layer.b.data[j]
                for j in range(2)]
        np.testing.assert_allclose(y[idx], want, rtol=1e-13, atol=1e-15)


@given(lead=lead_shapes, d=st.integers(1, 7), seed=seeds,
       dtype=st.sampled_from([np.float32, np.float64]), transposed=st.booleans())
def test_row_and_column_reductions_equal_numpy(lead, d, seed, dtype, transposed):
    # the BLAS forms of core's reductions against NumPy's own, strided inputs too
    x = np.random.default_rng(seed).standard_normal((*lead, d)).astype(dtype)
    if transposed:  # the same values in a non-contiguous layout
        x = np.ascontiguousarray(np.swapaxes(x, 0, -1)).swapaxes(0, -1)
    tol = dict(rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    np.testing.assert_allclose(row_sum(x), x.sum(axis=-1, keepdims=True), **tol)
    np.testing.assert_allclose(row_mean(x), x.mean(axis=-1, keepdims=True), **tol)
    np.testing.assert_array_equal(row_max(x), x.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(col_sum(x), x.reshape(-1, d).sum(axis=0), **tol)
    for out in (row_sum(x), row_mean(x), row_max(x), col_sum(x)):
        assert out.dtype == dtype
    assert col_sum(x).shape == (d,)


def test_embedding_forward_looks_up_rows():
    layer = Embedding(5, 3, np.random.default_rng(0))
    ids = np.array([[4, 0, 4], [2, 2, 1]])
    out, _ = layer.forward(ids)
    assert out.shape == (2, 3, 3)
    for b, t in np.ndindex(2, 3):
        np.testing.assert_array_equal(out[b, t], layer.weight.data[ids[b, t]])


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-12])
def test_layernorm_equals_textbook_formula(eps):
    rng = np.random.default_rng(1)
    layer = randomize(LayerNorm(7, eps), rng)
    x = rng.standard_normal((3, 5, 7)) * 4.0 + 1.5
    y, _ = layer.forward(x)
    for idx in np.ndindex(3, 5):
        row = [float(v) for v in x[idx]]
        mean = math.fsum(row) / 7
        var = math.fsum((v - mean) ** 2 for v in row) / 7  # biased, as in PyTorch
        want = [(v - mean) / math.sqrt(var + eps) * g + b
                for v, g, b in zip(row, layer.gamma.data, layer.beta.data)]
        np.testing.assert_allclose(y[idx], want, rtol=1e-12, atol=1e-13)


def test_layernorm_default_output_has_zero_mean_unit_variance():
    x = np.random.default_rng(2).standard_normal((4, 16)) * 10 - 3
    y, _ = LayerNorm(16, eps=1e-12).forward(x)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-12)


def test_erf_matches_math_erf_on_a_dense_grid():
    x = np.linspace(-10.0, 10.0, 400_001)
    want = np.array([math.erf(v) for v in x])
    assert np.max(np.abs(erf(x) - want)) <= 2.3e-16
    assert np.all(erf(x) == -erf(-x))  # odd by construction


def test_erf_edge_inputs():
    assert erf(0.5) == pytest.approx(math.erf(0.5), abs=2.3e-16)  # a Python scalar
    assert erf(np.array(-7.0)) == -1.0  # a 0-d array
    np.testing.assert_array_equal(erf(np.array([1, -2])), erf(np.array([1.0, -2.0])))  # ints
    with np.errstate(all="raise"):  # no overflow or invalid-cast warnings
        out = erf(np.array([np.inf, -np.inf, 1e300, -1e19, np.nan]))
    np.testing.assert_array_equal(out[:4], [1.0, -1.0, 1.0, -1.0])
    assert np.isnan(out[4])


def test_erf_float32_is_accurate_to_float32_resolution():
    x32 = np.linspace(-10, 10, 200_001, dtype=np.float32)
    y = erf(x32)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [math.erf(v) for v in x32.astype(np.float64)], atol=6e-7)
    assert np.all(y == -erf(-x32))
    with np.errstate(all="raise"):
        out = erf(np.array([np.inf, -np.inf, 1e30, np.nan], dtype=np.float32))
    np.testing.assert_array_equal(out[:3], [1.0, -1.0, 1.0])
    assert np.isnan(out[3])


def test_gelu_exact_matches_math_erf_elementwise():
    x = np.linspace(-10.0, 10.0, 200_001)
    y, _ = GELU().forward(x)
    want = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    # 1e-15 absolute for |y| <= 1, relative above (the rounding of y itself)
    assert np.max(np.abs(y - want) / np.maximum(1.0, np.abs(want))) <= 1e-15


def test_gelu_tanh_matches_its_formula():
    x = np.linspace(-8.0, 8.0, 20_001)
    y, _ = GELU("tanh").forward(x)
    c = math.sqrt(2.0 / math.pi)
    want = [0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-15)
    # and it is an approximation of the exact form, to about 1e-3
    assert np.max(np.abs(y - GELU().forward(x)[0])) < 1e-3


def log_softmax_row(row):
    m = max(row)
    return [v - m - math.log(math.fsum(math.exp(u - m) for u in row)) for v in row]


def test_cross_entropy_matches_direct_minus_log_p():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 5)) * 3
    targets = rng.integers(0, 5, (2, 3))
    loss, _ = CrossEntropyLoss().forward(logits, targets)
    nll = [-log_softmax_row(list(logits[b, t]))[targets[b, t]] for b, t in np.ndindex(2, 3)]
    assert loss == pytest.approx(math.fsum(nll) / 6, rel=1e-13)


def test_cross_entropy_ignore_index_is_left_out_of_the_mean():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 4))
    targets = np.array([1, -100, 3, -100, 0, 2])
    loss, cache = CrossEntropyLoss().forward(logits, targets)
    kept = [i for i in range(6) if targets[i] != -100]
    want = math.fsum(-log_softmax_row(list(logits[i]))[targets[i]] for i in kept) / len(kept)
    assert loss == pytest.approx(want, rel=1e-13)
    dlogits = CrossEntropyLoss().backward(1.0, cache)
    np.testing.assert_array_equal(dlogits[[1, 3]], 0.0)  # ignored rows get no gradient


def test_cross_entropy_label_smoothing_formula():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((5, 7)) * 2
    targets = np.array([3, 0, -100, 6, 1])
    e = 0.1
    loss, _ = CrossEntropyLoss(label_smoothing=e).forward(logits, targets)
    kept = [i for i in range(5) if targets[i] != -100]
    terms = []
    for i in kept:
        logp = log_softmax_row(list(logits[i]))
        terms.append((1 - e) * -logp[targets[i]] + e * math.fsum(-v for v in logp) / 7)
    assert loss == pytest.approx(math.fsum(terms) / len(kept), rel=1e-13)


def test_cross_entropy_soft_targets_formula():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, 3))
    targets = rng.dirichlet(np.ones(3), 4)
    loss, _ = CrossEntropyLoss().forward(logits, targets)
    want = math.fsum(-sum(t * lp for t, lp in zip(targets[i], log_softmax_row(list(logits[i]))))
                     for i in range(4)) / 4
    assert loss == pytest.approx(want, rel=1e-13)


def test_cross_entropy_all_ignored_gives_zero_loss_and_zero_gradient():
    ce = CrossEntropyLoss()
    logits = np.random.default_rng(7).standard_normal((2, 3, 4))
    loss, cache = ce.forward(logits, np.full((2, 3), -100))
    assert loss == 0.0 and not math.isnan(loss)
    dlogits = ce.backward(1.0, cache)
    assert dlogits.shape == logits.shape and np.all(dlogits == 0.0)


@given(lead=lead_shapes, K=st.integers(1, 8), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       seed=seeds)
def test_softmax_rows_sum_to_one(lead, K, scale, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, K)) * scale
    p, _ = Softmax().forward(x)
    assert np.all(p >= 0.0)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)


def test_softmax_is_invariant_to_adding_a_constant():
    x = np.random.default_rng(8).standard_normal((3, 6))
    p, _ = Softmax().forward(x)
    for c in (-50.0, 7.0, 1e3):
        np.testing.assert_allclose(Softmax().forward(x + c)[0], p, rtol=1e-12, atol=1e-15)
    p_axis0, _ = Softmax(axis=0).forward(x)
    np.testing.assert_allclose(p_axis0.sum(axis=0), 1.0, rtol=1e-14)


def test_softmax_and_log_softmax_are_stable_for_large_inputs():
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4 - 1.0], [-1e4, -1e4, -1e4]])
    p, _ = Softmax().forward(x)
    logp, _ = LogSoftmax().forward(x)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(logp))
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(p[2], [1 / 3] * 3, rtol=1e-15)
    np.testing.assert_allclose(logp[1], log_softmax_row([0.0, 0.0, -1.0]), rtol=1e-14)
    np.testing.assert_allclose(logp[0], [0.0, -1e4, -2e4])
    loss, cache = CrossEntropyLoss().forward(x, np.array([2, 0, 1]))
    assert np.isfinite(loss) and np.all(np.isfinite(CrossEntropyLoss().backward(1.0, cache)))


def test_log_softmax_equals_log_of_softmax():
    x = np.random.default_rng(9).standard_normal((4, 5)) * 3
    np.testing.assert_allclose(LogSoftmax().forward(x)[0], np.log(Softmax().forward(x)[0]),
                               rtol=1e-13)


def test_l2_normalize_gives_unit_norms_and_keeps_zero_vectors_zero():
    x = np.random.default_rng(10).standard_normal((3, 4, 5)) * 7
    x[1, 2] = 0.0
    layer = L2Normalize()
    y, cache = layer.forward(x)
    norms = np.linalg.norm(y, axis=-1)
    np.testing.assert_allclose(np.delete(norms.reshape(-1), 6), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(y[1, 2], 0.0)
    np.testing.assert_allclose(y[0, 0], x[0, 0] / math.sqrt(sum(v * v for v in x[0, 0])),
                               rtol=1e-14)
    dx = layer.backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(dx))


def test_dropout_is_the_identity_without_a_generator_or_with_p_zero():
    x = np.random.default_rng(11).standard_normal((4, 5))
    drop = Dropout(0.5)
    y, cache = drop.forward(x)  # rng=None: evaluation mode
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(drop.backward(x, cache), x)
    y0, _ = Dropout(0.0).forward(x, np.random.default_rng(0))
    np.testing.assert_array_equal(y0, x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_about_one_minus_p_scaled_by_inverse(p):
    x = np.ones(200_000)
    y, mask = Dropout(p).forward(x, np.random.default_rng(12))
    kept = y != 0.0
    # binomial standard deviation of the kept fraction is < 0.0012 here: 5 sigma
    assert abs(kept.mean() - (1 - p)) < 0.006
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - p), rtol=1e-15)
    assert y.mean() == pytest.approx(1.0, abs=0.03)  # inverted dropout keeps the mean
    np.testing.assert_array_equal(Dropout(p).backward(np.ones_like(x), mask), y)


def test_dropout_same_seed_same_mask():
    x = np.random.default_rng(13).standard_normal((8, 16))
    drop = Dropout(0.3)
    a, _ = drop.forward(x, np.random.default_rng(5))
    b, _ = drop.forward(x, np.random.default_rng(5))
    c, _ = drop.forward(x, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a == 0).any()
