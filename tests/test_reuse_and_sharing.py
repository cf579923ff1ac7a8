"""Reuse and sharing: the part of the contract BLIP leans on hardest.

BLIP runs one text encoder three times per step, ties encoder and decoder
weights, fans the image embeddings out to four losses and gathers negatives with
repeated indices. These tests check that all of that sums gradients correctly,
and that the gradient checker catches the classic ways to get it wrong
(``=`` instead of ``+=``, ``grad[ids] += d`` instead of ``np.add.at``).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minblip import GradcheckError, Module, Param, check_layer, gradcheck
from minblip.attention import MultiHeadAttention, causal_mask
from minblip.layers import Embedding, LayerNorm, Linear
from minblip.transformer import FeedForward, PostNormBlock

# Inputs, Params and R come from default_rng(seed); the checker's coordinates and
# random direction from seed + 1.
seeds = st.integers(0, 2**16)


def randomize(module, rng, std=0.5):
    """Redraw every Param (float64) from rng so the gradients are not tiny."""
    module.to(np.float64)
    for p in module.params():
        p.data[...] = rng.normal(0.0, std, p.shape)
    return module


def make_layer(kind, d, rng):
    return {"linear": lambda: Linear(d, d, rng),
            "layernorm": lambda: LayerNorm(d),
            "feedforward": lambda: FeedForward(d, 2 * d, rng),
            "attention": lambda: MultiHeadAttention(d, 2, rng),
            "postnorm": lambda: PostNormBlock(d, 2, 2 * d, rng)}[kind]()


def first(grads):
    """The input gradient, whether backward returns it alone or as (dx, dcontext)."""
    return grads[0] if isinstance(grads, tuple) else grads


class Model(Module):
    """A container of named sub-modules, for gradient-checking several at once."""

    def __init__(self, **modules):
        for name, m in modules.items():
            setattr(self, name, m)


def params_and_inputs(module, *inputs):
    return module.named_params() + [(f"x{i}", x) for i, x in enumerate(inputs)]


# ---------------------------------------------------------------------------
# One layer, several calls, one backward
# ---------------------------------------------------------------------------

@given(kind=st.sampled_from(["linear", "layernorm", "feedforward", "attention", "postnorm"]),
       B=st.integers(1, 2), T=st.integers(1, 3), seed=seeds)
def test_layer_called_twice_before_one_backward(kind, B, T, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(make_layer(kind, 4, rng), rng)
    x1 = Param(rng.standard_normal((B, T, 4)), dtype=np.float64)
    x2 = Param(rng.standard_normal((B, T + 1, 4)), dtype=np.float64)  # another length
    R1, R2 = rng.standard_normal((B, T, 4)), rng.standard_normal((B, T + 1, 4))

    def loss_fn(backward):  # L = sum(f(x1) * R1) + sum(f(x2) * R2)
        y1, c1 = layer.forward(x1.data)
        y2, c2 = layer.forward(x2.data)
        if backward:  # in the opposite order on purpose: the caches are independent
            x2.grad += first(layer.backward(R2, c2))
            x1.grad += first(layer.backward(R1, c1))
        return float(np.sum(y1 * R1) + np.sum(y2 * R2))

    gradcheck(loss_fn, params_and_inputs(layer, x1, x2), seed=seed + 1)


@given(seed=seeds)
def test_fan_out_one_input_to_two_calls_sums_its_gradient(seed):
    # x feeds a causal and an unmasked pass of the same block (BLIP's text
    # encoder sees the same caption in several modes); dx is the sum of both.
    rng = np.random.default_rng(seed)
    block = randomize(PostNormBlock(4, 2, 8, rng), rng)
    x = Param(rng.standard_normal((2, 3, 4)), dtype=np.float64)
    R1, R2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))

    def loss_fn(backward):
        y1, c1 = block.forward(x.data, mask=causal_mask(3))
        y2, c2 = block.forward(x.data)
        if backward:
            dx1, _ = block.backward(R1, c1)
            dx2, _ = block.backward(R2, c2)
            x.grad += dx1 + dx2
        return float(np.sum(y1 * R1) + np.sum(y2 * R2))

    gradcheck(loss_fn, params_and_inputs(block, x), seed=seed + 1)


# ---------------------------------------------------------------------------
# Shared Params and shared sub-modules
# ---------------------------------------------------------------------------

def test_two_modules_holding_one_param_get_the_sum_of_both_gradients():
    rng = np.random.default_rng(0)
    a, b = Linear(3, 2, rng).to(np.float64), Linear(3, 2, rng).to(np.float64)
    b.W = a.W  # tie the weights; the biases stay separate
    xa, xb = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    Ra, Rb = rng.standard_normal((4, 2)), rng.standard_normal((5, 2))
    _, ca = a.forward(xa)
    _, cb = b.forward(xb)
    a.backward(Ra, ca)
    b.backward(Rb, cb)
    np.testing.assert_allclose(a.W.grad, xa.T @ Ra + xb.T @ Rb, rtol=1e-14)
    assert b.W.grad is a.W.grad

    model = Model(a=a, b=b)

    def loss_fn(backward):
        ya, ca = a.forward(xa)
        yb, cb = b.forward(xb)
        if backward:
            a.backward(Ra, ca)
            b.backward(Rb, cb)
        return float(np.sum(ya * Ra) + np.sum(yb * Rb))

    report = gradcheck(loss_fn, model)
    assert [r.name for r in report.rows] == ["a.W", "a.b", "b.b"]  # the tied W once


def test_encoder_and_decoder_sharing_all_but_self_attention():
    # BLIP's text decoder shares every sub-module of the encoder except self-attention
    # (salesforce/BLIP models/blip_pretrain.py, tie_encoder_decoder_weights with
    # skip key '/attention'): cross-attention, FFN and their LayerNorms are the
    # same objects, and their gradients from both passes add up.
    rng = np.random.default_rng(1)
    enc = PostNormBlock(4, 2, 8, rng, cross_attention=True, d_context=3)
    dec = PostNormBlock(4, 2, 8, rng, cross_attention=True, d_context=3)
    dec.cross_attn, dec.cross_attn_ln = enc.cross_attn, enc.cross_attn_ln
    dec.ffn, dec.ffn_ln = enc.ffn, enc.ffn_ln
    model = randomize(Model(enc=enc, dec=dec), rng)
    n_shared = len(enc.cross_attn.params()) + 2 + len(enc.ffn.params()) + 2
    assert len(model.params()) == 2 * len(enc.params()) - n_shared
    x = rng.standard_normal((2, 3, 4))
    image = Param(rng.standard_normal((2, 5, 3)), dtype=np.float64)  # fans out to both
    R1, R2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))

    def loss_fn(backward):
        y1, c1 = enc.forward(x, context=image.data)
        y2, c2 = dec.forward(x, mask=causal_mask(3), context=image.data)
        if backward:
            image.grad += enc.backward(R1, c1)[1]
            image.grad += dec.backward(R2, c2)[1]
        return float(np.sum(y1 * R1) + np.sum(y2 * R2))

    report = gradcheck(loss_fn, params_and_inputs(model, image), n_coords=4)
    names = [r.name for r in report.rows]
    assert "enc.ffn.fc1.W" in names and not any(n.startswith("dec.ffn") for n in names)
    assert "dec.self_attn.query.W" in names  # self-attention stays separate


def test_params_lists_a_tied_param_once_with_its_first_name():
    rng = np.random.default_rng(0)
    emb = Embedding(10, 4, rng)
    head = Linear(4, 10, rng)
    shared = Param(rng.standard_normal(4))

    class Net(Module):
        def __init__(self):
            self.embed = emb
            self.blocks = [LayerNorm(4), LayerNorm(4)]
            self.blocks[1].gamma = self.blocks[0].gamma
            self.extra = {"scale": shared, "again": shared}
            self.head = head
            self.head_again = head  # the same sub-module twice

    net = Net()
    names = [n for n, _ in net.named_params()]
    assert names == ["embed.weight", "blocks.0.gamma", "blocks.0.beta", "blocks.1.beta",
                     "extra.scale", "head.W", "head.b"]
    assert len(net.params()) == len({id(p) for p in net.params()}) == 7
    assert net.param_count() == 40 + 4 + 4 + 4 + 4 + 40 + 10


def test_zero_grad_zeroes_every_param_including_shared_ones():
    rng = np.random.default_rng(0)
    a, b = Linear(3, 3, rng), Linear(3, 3, rng)
    b.W = a.W
    model = Model(a=a, b=b)
    for p in model.params():
        p.grad += 1.0
    model.zero_grad()
    assert all(np.all(p.grad == 0.0) for p in model.params())
    assert b.W.grad is a.W.grad


def test_to_float64_keeps_sharing_and_converts_data_and_grad():
    rng = np.random.default_rng(0)
    enc, dec = FeedForward(3, 6, rng), FeedForward(3, 6, rng)
    dec.fc1 = enc.fc1
    model = Model(enc=enc, dec=dec)
    ids_before = [id(p) for p in model.params()]
    values = [p.data.copy() for p in model.params()]
    enc.fc1.W.grad += 0.25
    assert model.dtype == np.float32
    assert model.to(np.float64) is model
    assert [id(p) for p in model.params()] == ids_before  # the same Param objects
    assert dec.fc1 is enc.fc1
    for p, v in zip(model.params(), values):
        assert p.data.dtype == p.grad.dtype == np.float64
        np.testing.assert_array_equal(p.data, v)
    np.testing.assert_array_equal(dec.fc1.W.grad, 0.25)
    model.to(np.float32)
    assert enc.fc1.W.dtype == np.float32 and dec.fc1.W.grad.dtype == np.float32


# ---------------------------------------------------------------------------
# Gathers with repeated indices
# ---------------------------------------------------------------------------

def test_embedding_backward_sums_repeated_ids():
    rng = np.random.default_rng(0)
    emb = Embedding(4, 3, rng).to(np.float64)
    ids = np.array([[2, 0, 2], [2, 3, 0]])
    dout = rng.standard_normal((2, 3, 3))
    _, cache = emb.forward(ids)
    emb.backward(dout, cache)
    want = np.zeros((4, 3))
    for b, t in np.ndindex(2, 3):
        want[ids[b, t]] += dout[b, t]
    np.testing.assert_allclose(emb.weight.grad, want, rtol=1e-15)
    np.testing.assert_array_equal(emb.weight.grad[1], 0.0)  # row 1 was never used


class BuggyEmbedding(Embedding):
    """The classic bug: fancy-index += keeps only one of the repeated rows."""

    def backward(self, dout, cache):
        ids = cache
        self.weight.grad[ids.reshape(-1)] += dout.reshape(-1, self.dim)


def test_gradcheck_catches_buggy_embedding_with_repeated_ids():
    rng = np.random.default_rng(0)
    unique = np.array([[0, 3, 1]])
    repeated = np.array([[2, 0, 2], [2, 3, 0]])
    check_layer(randomize(BuggyEmbedding(4, 3, rng), rng), unique, n_coords=12)  # passes...
    with pytest.raises(GradcheckError, match=r"weight\[[02], \d\]: analytic"):
        check_layer(randomize(BuggyEmbedding(4, 3, rng), rng), repeated, n_coords=12)
    check_layer(randomize(Embedding(4, 3, rng), rng), repeated, n_coords=12)  # the real one


class AssigningLinear(Linear):
    """The classic bug: ``=`` instead of ``+=``, so a second call overwrites the first."""

    def backward(self, dy, cache):
        x2 = cache.reshape(-1, self.d_in)
        dy2 = dy.reshape(-1, self.d_out)
        self.W.grad[...] = x2.T @ dy2
        self.b.grad[...] = dy2.sum(axis=0)
        return dy @ self.W.data.T


def twice_loss(layer, x1, x2, R1, R2):
    """L = sum(f(x1) * R1) + sum(f(x2) * R2), one backward per call."""
    def loss_fn(backward):
        y1, c1 = layer.forward(x1)
        y2, c2 = layer.forward(x2)
        if backward:
            layer.backward(R1, c1)
            layer.backward(R2, c2)
        return float(np.sum(y1 * R1) + np.sum(y2 * R2))
    return loss_fn


def test_gradcheck_catches_assigning_linear_only_when_called_twice():
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    R1, R2 = rng.standard_normal((4, 2)), rng.standard_normal((5, 2))
    buggy = randomize(AssigningLinear(3, 2, rng), np.random.default_rng(1))
    check_layer(buggy, x1, seed=1)  # called once, `=` and `+=` agree: the bug hides
    with pytest.raises(GradcheckError, match=r"W\[\d, \d\]: analytic"):
        gradcheck(twice_loss(buggy, x1, x2, R1, R2), buggy)
    right = randomize(Linear(3, 2, rng), np.random.default_rng(1))  # same values, right class
    gradcheck(twice_loss(right, x1, x2, R1, R2), right)
