"""Freezing, the core contract's rule: a frozen Param is in no parent's params(), so
no optimiser, clipping, trainable-state checkpoint or gradient check can reach it;
its module still runs forward and backward, the same formulas, and returns input
gradients while adding nothing into a frozen Param."""
import numpy as np
import pytest

from minblip import Module, check_layer
from minblip.checkpoint import load_checkpoint, save_checkpoint
from minblip.layers import Embedding, LayerNorm, Linear
from minblip.lm import LanguageModel, LMConfig
from minblip.optim import AdamW, clip_grad_norm
from minblip.vit import ViTConfig, VisionTransformer

from layer_helpers import randomize


class Holder(Module):
    """A plain parent: nothing here knows about freezing."""

    def __init__(self, frozen_part: Module, rng):
        self.head = Linear(4, 3, rng)
        self.part = frozen_part
        self.extra = [LayerNorm(3)]


def tiny_lm(rng):
    return LanguageModel(LMConfig(vocab_size=11, width=8, depth=1, heads=2, mlp_dim=12,
                                  max_positions=10), rng)


def tiny_vit(rng):
    return VisionTransformer(ViTConfig(image_size=8, patch_size=4, width=6, depth=1, heads=2,
                                       mlp_dim=12), rng)


@pytest.mark.parametrize("make", [tiny_lm, tiny_vit])
def test_a_plain_parent_lists_none_of_a_frozen_part(make):
    rng = np.random.default_rng(0)
    part = make(rng).freeze()
    holder = Holder(part, rng)
    names = [n for n, _ in holder.named_params()]
    assert names == ["head.W", "head.b", "extra.0.gamma", "extra.0.beta"]
    assert holder.param_count() == 4 * 3 + 3 + 3 + 3
    everything = holder.named_params(include_frozen=True)
    assert len(everything) == len(names) + len(part.params(include_frozen=True))
    counts = holder.parameter_counts()
    assert counts["parts"]["part"] == (0, part.param_count(include_frozen=True))
    assert counts["frozen"] == part.param_count(include_frozen=True)


@pytest.mark.parametrize("make", [tiny_lm, tiny_vit])
def test_adamw_with_weight_decay_leaves_a_frozen_part_bit_identical(make):
    rng = np.random.default_rng(0)
    part = make(rng).freeze()
    holder = Holder(part, rng)
    before = [p.data.copy() for p in part.params(include_frozen=True)]
    for p in holder.params(include_frozen=True):  # gradients everywhere, even where none belong
        p.grad[...] = 1.0
    opt = AdamW(holder, lr=0.5, weight_decay=0.9)
    clip_grad_norm(holder, 0.1)
    opt.step()
    for b, p in zip(before, part.params(include_frozen=True)):
        np.testing.assert_array_equal(p.data, b)
    assert not np.array_equal(holder.head.W.data, np.zeros_like(holder.head.W.data))


def test_an_optimiser_built_before_freezing_does_not_move_the_frozen_params():
    rng = np.random.default_rng(0)
    layer = Linear(3, 2, rng)
    opt = AdamW(layer, lr=0.5, weight_decay=0.9)
    layer.freeze()
    before = layer.W.data.copy()
    layer.W.grad[...] = 1.0
    opt.step()
    np.testing.assert_array_equal(layer.W.data, before)


def test_frozen_lm_input_gradient_is_gradient_checked():
    rng = np.random.default_rng(0)
    lm = randomize(tiny_lm(rng).to(np.float64), rng).freeze()
    ids = rng.integers(1, 11, (2, 4))
    prefix = rng.normal(size=(2, 3, 8))
    report = check_layer(lm, ids, None, None, prefix, seed=1)
    assert [r.name for r in report.rows] == ["input3"]  # only the input: no Param to check
    assert report.passed and report.max_rel_err < 1e-6
    assert all(not p.grad.any() for p in lm.params(include_frozen=True))


def test_frozen_vit_input_gradient_is_gradient_checked():
    rng = np.random.default_rng(0)
    vit = randomize(tiny_vit(rng).to(np.float64), rng).freeze()
    images = rng.normal(size=(2, 3, 8, 8))
    report = check_layer(vit, images, seed=2)
    assert [r.name for r in report.rows] == ["input0"]
    assert report.passed and report.max_rel_err < 1e-6
    assert all(not p.grad.any() for p in vit.params(include_frozen=True))


@pytest.mark.parametrize("make", [tiny_lm, tiny_vit])
def test_frozen_and_trainable_backward_give_the_same_input_gradient(make):
    rng = np.random.default_rng(0)
    model = randomize(make(rng).to(np.float64), rng)
    if isinstance(model, LanguageModel):
        args, pick = (rng.integers(1, 11, (2, 4)), None, None, rng.normal(size=(2, 3, 8))), 1
    else:
        args, pick = (rng.normal(size=(2, 3, 8, 8)),), None
    out, cache = model.forward(*args)
    R = rng.normal(size=out.shape)
    trainable = model.backward(R, cache)
    model.freeze()
    for p in model.params(include_frozen=True):
        p.grad = None  # adding into a frozen Param would raise
    frozen = model.backward(R, cache)
    if pick is not None:
        trainable, frozen = trainable[pick], frozen[pick]
    np.testing.assert_array_equal(frozen, trainable)


def test_freeze_and_unfreeze_round_trip():
    rng = np.random.default_rng(0)
    lm = tiny_lm(rng)
    names = [n for n, _ in lm.named_params()]
    assert lm.freeze() is lm and lm.frozen and lm.params() == []
    assert lm.unfreeze() is lm and not lm.frozen
    assert [n for n, _ in lm.named_params()] == names
    assert Module().frozen is False  # nothing to freeze


def test_a_param_shared_with_a_frozen_module_is_frozen_everywhere():
    rng = np.random.default_rng(0)
    table = Embedding(5, 3, rng)
    other = Holder(Linear(2, 2, rng), rng)
    other.table = table  # the same object, held by a trainable parent
    table.freeze()
    assert all(p is not table.weight for p in other.params())
    assert table.weight.frozen and not other.head.W.frozen


def test_layers_add_nothing_into_a_frozen_param_but_still_return_input_gradients():
    rng = np.random.default_rng(0)
    for layer, x in ((Linear(3, 2, rng), rng.normal(size=(4, 3)).astype(np.float32)),
                     (LayerNorm(3), rng.normal(size=(4, 3)).astype(np.float32))):
        y, cache = layer.forward(x)
        dx_trainable = layer.backward(np.ones_like(y), cache)
        layer.zero_grad()
        layer.freeze()
        dx = layer.backward(np.ones_like(y), cache)
        np.testing.assert_array_equal(dx, dx_trainable)
        assert all(not p.grad.any() for p in layer.params(include_frozen=True))
    emb = Embedding(5, 3, rng).freeze()
    out, cache = emb.forward(np.array([1, 1, 2]))
    assert emb.backward(np.ones_like(out), cache) is None and not emb.weight.grad.any()


def test_to_casts_frozen_params_and_trainable_state_checkpoints_skip_them(tmp_path):
    rng = np.random.default_rng(0)
    holder = Holder(tiny_vit(rng).freeze(), rng)
    holder.to(np.float64)
    assert all(p.dtype == np.float64 for p in holder.params(include_frozen=True))
    save_checkpoint(tmp_path / "trainable.npz", holder, {}, 0)
    keys = np.load(tmp_path / "trainable.npz").files
    assert not any(k.startswith("param/part.") for k in keys)
    assert "param/head.W" in keys
    save_checkpoint(tmp_path / "whole.npz", holder, {}, 0, include_frozen=True)
    other = Holder(tiny_vit(np.random.default_rng(9)).freeze(), np.random.default_rng(9))
    other.to(np.float64)
    load_checkpoint(tmp_path / "whole.npz", other, include_frozen=True)
    for (n, a), (_, b) in zip(holder.named_params(include_frozen=True),
                              other.named_params(include_frozen=True)):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
    with pytest.raises(ValueError, match="unexpected"):
        load_checkpoint(tmp_path / "whole.npz", other)  # the frozen part was saved too
