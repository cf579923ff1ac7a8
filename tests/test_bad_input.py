"""Bad input fails early, with a message that names what was expected and what came.

Each case asserts on the message: a NumPy broadcasting traceback from deep
inside a layer would raise too, but would not tell a student what to fix.
"""
import re

import numpy as np
import pytest

from minblip import Module, Param, gradcheck
from minblip.attention import MultiHeadAttention, causal_mask, padding_mask
from minblip.layers import GELU, Dropout, Embedding, LayerNorm, Linear
from minblip.softmax import CrossEntropyLoss, L2Normalize, LogSoftmax, Softmax
from minblip.transformer import PostNormBlock

rng = np.random.default_rng(0)


def shape(*dims):
    """A regex matching the printed tuple, e.g. shape(2, 3) -> '\\(2, 3\\)'."""
    return re.escape(str(tuple(dims)))


# ---------------------------------------------------------------------------
# Wrong rank or width
# ---------------------------------------------------------------------------

def test_linear_wrong_width():
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 4\).*got " + shape(2, 3)):
        Linear(4, 5, rng).forward(np.zeros((2, 3), np.float32))


def test_linear_wrong_rank():
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 4\).*got \(\)"):
        Linear(4, 5, rng).forward(np.zeros((), np.float32))


def test_layernorm_wrong_width():
    with pytest.raises(ValueError, match=r"LayerNorm.*\(\.\.\., 8\).*got " + shape(2, 3, 6)):
        LayerNorm(8).forward(np.zeros((2, 3, 6)))


def test_attention_wrong_rank():
    mha = MultiHeadAttention(8, 2, rng)
    with pytest.raises(ValueError, match=r"expected a 3-d array \(B, T, D\), got shape "
                       + shape(5, 8)):
        mha.forward(np.zeros((5, 8)))
    with pytest.raises(ValueError, match=r"context: expected a 3-d array.*got shape "
                       + shape(2, 8)):
        mha.forward(np.zeros((2, 3, 8)), np.zeros((2, 8)))


def test_attention_wrong_width():
    mha = MultiHeadAttention(8, 2, rng, d_context=6)
    with pytest.raises(ValueError, match=r"expected width 8, got shape " + shape(2, 3, 6)):
        mha.forward(np.zeros((2, 3, 6)))
    with pytest.raises(ValueError, match=r"context: expected width 6, got shape "
                       + shape(2, 4, 8)):
        mha.forward(np.zeros((2, 3, 8)), np.zeros((2, 4, 8)))


@pytest.mark.parametrize("n_heads", [3, 0, -2])
def test_heads_must_divide_width(n_heads):
    with pytest.raises(ValueError, match=rf"n_heads must divide d_model.*d_model=10, "
                                         rf"n_heads={n_heads}"):
        MultiHeadAttention(10, n_heads, rng)


def test_attention_batch_sizes_must_match():
    mha = MultiHeadAttention(8, 2, rng)
    with pytest.raises(ValueError, match=r"batch sizes differ, input " + shape(2, 3, 8)
                       + r" and context " + shape(3, 4, 8)):
        mha.forward(np.zeros((2, 3, 8)), np.zeros((3, 4, 8)))


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.ones((2, 4, 3), bool), np.ones((3, 1, 3), bool),
                                 causal_mask(4)])
def test_attention_mask_of_wrong_shape(bad):
    mha = MultiHeadAttention(8, 2, rng)
    with pytest.raises(ValueError, match=r"broadcastable to \(B, Tq, Tk\) = "
                       + shape(2, 3, 3) + r", got " + shape(*bad.shape)):
        mha.forward(np.zeros((2, 3, 8)), mask=bad)


def test_attention_mask_of_wrong_rank():
    mha = MultiHeadAttention(8, 2, rng)
    with pytest.raises(ValueError, match=r"expected 3 dims \(B, Tq, Tk\) = " + shape(2, 3, 3)
                       + r", got shape " + shape(3, 3)):
        mha.forward(np.zeros((2, 3, 8)), mask=np.ones((3, 3), bool))


def test_additive_float_mask_is_refused():
    # BERT's extended mask is 0 (attend) / -10000 (masked); read as booleans it
    # would be exactly inverted, so a float mask is refused rather than guessed at
    additive = np.where(np.array([[[1, 1, 0]]], bool), 0.0, -10000.0)
    mha = MultiHeadAttention(8, 2, rng)
    with pytest.raises(TypeError, match=r"expected a boolean array \(True = may attend\), got "
                                        r"dtype float64"):
        mha.forward(np.zeros((1, 3, 8)), mask=additive)
    out, _ = mha.forward(np.zeros((1, 3, 8)), mask=np.array([[[1, 1, 0]]]))  # 0/1 ints are fine
    assert out.shape == (1, 3, 8)


def test_cross_attention_mask_must_cover_the_context():
    mha = MultiHeadAttention(8, 2, rng)
    with pytest.raises(ValueError, match=shape(2, 3, 5) + r", got " + shape(2, 1, 3)):
        mha.forward(np.zeros((2, 3, 8)), np.zeros((2, 5, 8)),
                    mask=padding_mask(np.ones((2, 3))))


def test_mask_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"expected \(B, Tk\), got shape " + shape(2, 3, 4)):
        padding_mask(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"at least as many keys as queries, got Tq=5, Tk=3"):
        causal_mask(5, 3)


# ---------------------------------------------------------------------------
# Integer arrays where floats are expected
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [Linear(3, 2, rng), LayerNorm(3), GELU(), Softmax(),
                                   LogSoftmax(), L2Normalize(), MultiHeadAttention(3, 1, rng)],
                         ids=lambda layer: type(layer).__name__)
def test_integer_input_is_refused(layer):
    with pytest.raises(TypeError, match=r"expected a floating-point array, got dtype int"):
        layer.forward(np.ones((2, 4, 3), dtype=np.int64))


def test_integer_context_and_logits_are_refused():
    mha = MultiHeadAttention(4, 2, rng)
    with pytest.raises(TypeError, match=r"context: expected a floating-point array, got dtype "
                                        r"uint8"):
        mha.forward(np.zeros((1, 2, 4)), np.zeros((1, 3, 4), np.uint8))
    with pytest.raises(TypeError, match=r"logits: expected a floating-point array, got dtype "
                                        r"int"):
        CrossEntropyLoss().forward(np.zeros((2, 3), int), np.array([0, 1]))


def test_a_list_is_not_an_array():
    with pytest.raises(TypeError, match=r"expected a NumPy array, got list"):
        Linear(2, 2, rng).forward([[1.0, 2.0]])


# ---------------------------------------------------------------------------
# Token ids and targets
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("ids, bad", [([[0, 10, 3]], [10]), ([[-1, 2]], [-1]),
                                      ([[12, 4, 11]], [12, 11])])
def test_embedding_ids_out_of_range(ids, bad):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\), got "
                       + re.escape(str(bad))):
        Embedding(10, 4, rng).forward(np.array(ids))


def test_embedding_ids_must_be_integers():
    with pytest.raises(TypeError, match=r"expected integer token ids, got dtype float64"):
        Embedding(10, 4, rng).forward(np.array([[1.0, 2.0]]))


def test_cross_entropy_targets_out_of_range():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\) or equal "
                                         r"ignore_index=-100, got \[3, -1\]"):
        CrossEntropyLoss().forward(np.zeros((4, 3)), np.array([0, 3, -100, -1]))


def test_cross_entropy_targets_of_wrong_shape():
    with pytest.raises(ValueError, match=r"expected shape " + shape(2, 5) + r" to match logits "
                       + shape(2, 5, 7) + r", got " + shape(2, 4)):
        CrossEntropyLoss().forward(np.zeros((2, 5, 7)), np.zeros((2, 4), int))
    with pytest.raises(ValueError, match=r"soft targets: expected shape " + shape(2, 7)
                       + r", got " + shape(2, 6)):
        CrossEntropyLoss().forward(np.zeros((2, 7)), np.full((2, 6), 1 / 6))


def test_cross_entropy_targets_of_wrong_dtype():
    with pytest.raises(TypeError, match=r"integer ids or float probabilities, got dtype bool"):
        CrossEntropyLoss().forward(np.zeros((2, 3)), np.array([True, False]))


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_label_smoothing_out_of_range(eps):
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 1\], got {eps}"):
        CrossEntropyLoss(label_smoothing=eps)


# ---------------------------------------------------------------------------
# Hyper-parameters and the rest
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=rf"Dropout p must be in \[0, 1\), got {p}"):
        Dropout(p)


def test_gelu_unknown_approximation():
    with pytest.raises(ValueError, match=r"must be 'none' or 'tanh', got 'fast'"):
        GELU("fast")


def test_context_given_to_a_block_without_cross_attention():
    block = PostNormBlock(4, 2, 8, rng)
    with pytest.raises(ValueError, match=r"built without cross-attention, but a context"):
        block.forward(np.zeros((1, 2, 4)), context=np.zeros((1, 3, 4)))


def test_module_to_unsupported_dtype():
    with pytest.raises(TypeError, match=r"float32 or float64, got float16"):
        Linear(2, 2, rng).to(np.float16)


def test_param_must_be_floating_point():
    with pytest.raises(TypeError, match=r"floating point, got dtype int64"):
        Param(np.arange(3), dtype=np.int64)


@pytest.mark.parametrize("params, message", [
    ([np.ones(3)], r"expected Params, got ndarray for 'param0'"),
    ([("w", 2.0)], r"expected Params, got float for 'w'"),
    ({"w": np.ones(3)}, r"expected Params, got ndarray for 'w'"),
    (np.ones(3), r"expected a Module, a dict name -> Param or a list of Params, got ndarray"),
    (Param(np.ones(3), np.float64), r"a list of Params, got Param"),
])
def test_gradcheck_given_a_non_param(params, message):
    with pytest.raises(TypeError, match=message):
        gradcheck(lambda backward: 0.0, params)


def test_gradcheck_given_float32_params():
    class Tiny(Module):
        def __init__(self):
            self.w = Param(np.ones(2))

    with pytest.raises(TypeError, match=r"needs float64 Params.*'w' is float32"):
        gradcheck(lambda backward: 0.0, Tiny())
