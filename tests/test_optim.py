"""AdamW, the weight-decay mask, gradient clipping and the warmup-cosine schedule."""
import math

import numpy as np
import pytest

from minblip.core import Module, Param
from minblip.layers import Embedding, LayerNorm, Linear
from minblip.optim import AdamW, clip_grad_norm, decay_mask, warmup_cosine_lr


class Tiny(Module):
    """One Param of every kind the decay rule has to sort."""

    def __init__(self, rng, dtype=np.float64):
        self.emb = Embedding(7, 4, rng)
        self.fc1 = Linear(4, 5, rng)
        self.ln = LayerNorm(5)
        self.fc2 = Linear(5, 3, rng, bias=False)
        self.cls = Param(rng.normal(size=(1, 1, 4)))
        self.temp = Param(0.07)
        self.to(dtype)


DECAYING = {"fc1.W", "fc2.W"}


class Head(Module):
    """An output layer reading the embedding table (logits = h @ weight.T + bias)."""

    def __init__(self, weight: Param):
        self.weight = weight
        self.bias = Param(np.zeros(weight.shape[0]))


class TiedLM(Module):
    def __init__(self, rng):
        self.emb = Embedding(6, 4, rng)
        self.proj = Linear(4, 4, rng)
        self.head = Head(self.emb.weight)


def randomise(module, rng, scale=1.0):
    for p in module.params():
        p.data[...] = rng.normal(0.0, scale, p.shape)
        p.grad[...] = rng.normal(0.0, scale, p.shape)


def reference_adamw(params, grads_per_step, lrs, betas, eps, wd, decays):
    """Textbook AdamW (Loshchilov & Hutter, Algorithm 2) on plain arrays, one Param at a time."""
    b1, b2 = betas
    out = []
    for k, p0 in enumerate(params):
        p = p0.copy()
        m = np.zeros_like(p)
        v = np.zeros_like(p)
        for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
            g = grads[k]
            if decays[k]:
                p = p - lr * wd * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g ** 2
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


# ---------------------------------------------------------------------------
# decay_mask
# ---------------------------------------------------------------------------

def test_decay_mask_only_linear_weights():
    model = Tiny(np.random.default_rng(0))
    mask = decay_mask(model)
    assert list(mask) == [n for n, _ in model.named_params()]
    assert {n for n, d in mask.items() if d} == DECAYING


def test_decay_mask_tied_embedding_never_decays():
    model = TiedLM(np.random.default_rng(0))
    mask = decay_mask(model)
    assert mask == {"emb.weight": False, "proj.W": True, "proj.b": False, "head.bias": False}


def test_decay_mask_param_with_two_roles_does_not_decay():
    class Aliased(Module):
        def __init__(self, rng):
            self.fc = Linear(3, 3, rng)
            self.table = [self.fc.W]  # the same Param reached outside the Linear

    class Shared(Module):
        def __init__(self, rng):
            self.fc = Linear(3, 3, rng)
            self.blocks = [self.fc, self.fc]  # one Linear reached twice is still a Linear

    assert decay_mask(Aliased(np.random.default_rng(0)))["fc.W"] is False
    assert decay_mask(Shared(np.random.default_rng(0)))["fc.W"] is True


def test_decay_mask_rejects_non_module():
    with pytest.raises(TypeError, match="expects a Module"):
        decay_mask([("a", Param(np.zeros(2)))])


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------

def test_first_step_is_lr_times_sign_of_gradient():
    # with zero decay, step 1 gives m_hat = g and v_hat = g^2: p moves by -lr * g / (|g| + eps)
    p = Param(np.array([1.0, -2.0, 3.0]), dtype=np.float64)
    p.grad[...] = [0.5, -4.0, 1e-3]
    AdamW([("p", p)], lr=0.1, weight_decay=0.0).step()
    g = np.array([0.5, -4.0, 1e-3])
    np.testing.assert_allclose(p.data, [1.0, -2.0, 3.0] - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-14)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_adamw_matches_reference(dtype, rtol):
    rng = np.random.default_rng(1)
    model = Tiny(rng, dtype)
    randomise(model, rng)
    names = [n for n, _ in model.named_params()]
    params = model.params()
    start = [p.data.astype(np.float64) for p in params]
    betas, eps, wd = (0.9, 0.98), 1e-6, 0.3
    lrs = [1e-2, 5e-2, 2e-2, 1e-1, 3e-2, 1e-2]
    opt = AdamW(model, lr=0.0, betas=betas, eps=eps, weight_decay=wd)
    grads_per_step = []
    for lr in lrs:
        for p in params:
            p.grad[...] = rng.normal(0.0, 1.0, p.shape)
        model.temp.grad[...] = 0.0  # a Param without gradient still moves along its momentum
        grads_per_step.append([p.grad.astype(np.float64) for p in params])
        opt.step(lr=lr)
    expected = reference_adamw(start, grads_per_step, lrs, betas, eps, wd,
                               [n in DECAYING for n in names])
    for name, p, e in zip(names, params, expected):
        assert p.dtype == dtype, name
        np.testing.assert_allclose(p.data, e, rtol=rtol, atol=rtol * 1e-2, err_msg=name)
    assert opt.step_count == len(lrs)


def test_weight_decay_only_where_the_mask_says():
    # zero gradients: Adam's term vanishes and only the decoupled decay moves a Param
    rng = np.random.default_rng(2)
    model = Tiny(rng)
    randomise(model, rng)
    model.zero_grad()
    before = {n: p.data.copy() for n, p in model.named_params()}
    AdamW(model, lr=0.1, weight_decay=0.5).step()
    for name, p in model.named_params():
        factor = 1 - 0.1 * 0.5 if name in DECAYING else 1.0
        np.testing.assert_allclose(p.data, before[name] * factor, rtol=1e-15, err_msg=name)


def test_no_decay_argument_and_plain_list_default():
    rng = np.random.default_rng(3)
    a, b = Param(np.ones(2), np.float64), Param(np.ones(2), np.float64)
    AdamW([("a", a), ("b", b)], lr=0.1, weight_decay=1.0, no_decay=["b"]).step()
    np.testing.assert_allclose(a.data, 0.9)
    np.testing.assert_allclose(b.data, 1.0)
    model = Tiny(rng)
    opt = AdamW(model.named_params(), lr=0.1)  # a plain list: everything decays, as in PyTorch
    assert all(opt.decay)


def test_lr_override_is_for_one_step_only():
    rng = np.random.default_rng(4)
    m1, m2 = Tiny(np.random.default_rng(5)), Tiny(np.random.default_rng(5))
    grads = [[rng.normal(size=p.shape) for p in m1.params()] for _ in range(3)]
    opt1 = AdamW(m1, lr=1.0)
    opt2 = AdamW(m2, lr=0.02)
    for k in range(3):
        for p, q, g in zip(m1.params(), m2.params(), grads[k]):
            p.grad[...] = g
            q.grad[...] = g
        opt1.step(lr=0.02)
        opt2.step()
    assert opt1.lr == 1.0
    for p, q in zip(m1.params(), m2.params()):
        np.testing.assert_array_equal(p.data, q.data)


def test_tied_param_is_updated_once():
    model = TiedLM(np.random.default_rng(6))
    model.emb.weight.grad[...] = 1.0
    before = model.emb.weight.data.copy()
    AdamW(model, lr=0.01).step()
    np.testing.assert_allclose(model.emb.weight.data, before - 0.01 / (1 + 1e-8), rtol=1e-6)


def test_state_dict_round_trip_resumes_identically():
    rng = np.random.default_rng(7)
    grads = [[rng.normal(size=p.shape) for p in Tiny(np.random.default_rng(8)).params()]
             for _ in range(6)]

    def run(model, opt, steps):
        for k in steps:
            for p, g in zip(model.params(), grads[k]):
                p.grad[...] = g
            opt.step(lr=0.01 * (k + 1))

    straight = Tiny(np.random.default_rng(8))
    run(straight, AdamW(straight, lr=0.1), range(6))

    first = Tiny(np.random.default_rng(8))
    opt = AdamW(first, lr=0.1)
    run(first, opt, range(3))
    state = opt.state_dict()
    run(first, opt, range(3, 6))  # later steps must not change the saved state
    second = Tiny(np.random.default_rng(99))
    for p, q in zip(second.params(), Tiny(np.random.default_rng(8)).params()):
        p.data[...] = q.data
    run(second, AdamW(second, lr=0.1), range(3))
    opt2 = AdamW(second, lr=0.1)
    opt2.load_state_dict(state)
    assert opt2.step_count == 3
    run(second, opt2, range(3, 6))
    for p, q in zip(straight.params(), second.params()):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_keys_and_copies():
    model = TiedLM(np.random.default_rng(9))
    opt = AdamW(model, lr=0.1)
    state = opt.state_dict()
    assert set(state) == {"step"} | {f"{k}/{n}" for n, _ in model.named_params() for k in "mv"}
    assert state["step"].dtype == np.int64 and state["step"].shape == ()
    state["m/proj.W"][...] = 5.0
    assert not opt.m[opt.names.index("proj.W")].any()


def test_load_state_dict_errors_leave_state_unchanged():
    model = Tiny(np.random.default_rng(10))
    opt = AdamW(model, lr=0.1)
    good = opt.state_dict()
    bad_cases = {
        "missing": ({k: v for k, v in good.items() if k != "m/fc1.W"}, r"missing \['m/fc1.W'\]"),
        "extra": ({**good, "m/ghost.W": np.zeros(2)}, r"unexpected \['m/ghost.W'\]"),
        "shape": ({**good, "v/fc1.b": np.zeros(6)}, r"v/fc1.b: expected \(5,\) floating, found \(6,\)"),
        "step": ({**good, "step": np.array(-1)}, "step must be an integer scalar >= 0"),
    }
    for state, message in bad_cases.values():
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state)
    assert opt.step_count == 0


def test_adamw_argument_errors():
    p = Param(np.zeros(2))
    with pytest.raises(ValueError, match="listed twice"):
        AdamW([("a", p), ("b", p)], lr=0.1)
    with pytest.raises(ValueError, match="'a' is listed twice"):
        AdamW([("a", p), ("a", Param(np.zeros(2)))], lr=0.1)
    with pytest.raises(TypeError, match=r"\(name, Param\) pairs"):
        AdamW([p], lr=0.1)
    with pytest.raises(ValueError, match="no_decay names no Param"):
        AdamW([("a", p)], lr=0.1, no_decay=["b"])
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        AdamW([("a", p)], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW([("a", p)], lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr must be"):
        AdamW([("a", p)], lr=0.1).step(lr=float("nan"))


def test_step_after_dtype_change_is_refused():
    model = Tiny(np.random.default_rng(11), np.float32)
    opt = AdamW(model, lr=0.1)
    model.to(np.float64)
    with pytest.raises(TypeError, match="build the optimiser after Module.to"):
        opt.step()


def test_zero_grad():
    model = Tiny(np.random.default_rng(12))
    randomise(model, np.random.default_rng(13))
    AdamW(model, lr=0.1).zero_grad()
    assert all(not p.grad.any() for p in model.params())


# ---------------------------------------------------------------------------
# clip_grad_norm
# ---------------------------------------------------------------------------

def test_clip_grad_norm_scales_above_the_limit():
    model = Tiny(np.random.default_rng(14))
    randomise(model, np.random.default_rng(15))
    grads = [p.grad.copy() for p in model.params()]
    norm = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads))
    returned = clip_grad_norm(model, max_norm=1.0)
    assert returned == pytest.approx(norm, rel=1e-14)
    scale = 1.0 / (norm + 1e-6)
    for p, g in zip(model.params(), grads):
        np.testing.assert_allclose(p.grad, g * scale, rtol=1e-14)
    assert clip_grad_norm(model, max_norm=1.0) == pytest.approx(norm * scale, rel=1e-12)


def test_clip_grad_norm_leaves_small_gradients_alone():
    model = Tiny(np.random.default_rng(16))
    randomise(model, np.random.default_rng(17), scale=1e-3)
    grads = [p.grad.copy() for p in model.params()]
    clip_grad_norm(model.params(), max_norm=10.0)
    for p, g in zip(model.params(), grads):
        np.testing.assert_array_equal(p.grad, g)
    model.zero_grad()
    assert clip_grad_norm(model, 1.0) == 0.0


def test_clip_grad_norm_counts_a_tied_param_once():
    p = Param(np.zeros(4), np.float32)
    p.grad[...] = 3.0  # norm 6 once, 6*sqrt(2) if counted twice
    assert clip_grad_norm([("a", p), ("b", p)], max_norm=3.0) == pytest.approx(6.0)
    np.testing.assert_allclose(p.grad, 3.0 * 3.0 / (6.0 + 1e-6), rtol=1e-6)
    assert p.grad.dtype == np.float32


def test_clip_grad_norm_errors():
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm([Param(np.zeros(2))], 0.0)
    with pytest.raises(TypeError, match="expects Params"):
        clip_grad_norm([np.zeros(2)], 1.0)


# ---------------------------------------------------------------------------
# warmup_cosine_lr
# ---------------------------------------------------------------------------

def test_schedule_key_points():
    kw = dict(total_steps=110, base_lr=1e-4, warmup_steps=10, min_lr=1e-5, warmup_start_lr=1e-6)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert warmup_cosine_lr(5, **kw) == pytest.approx((1e-6 + 1e-4) / 2)
    assert warmup_cosine_lr(10, **kw) == pytest.approx(1e-4)
    assert warmup_cosine_lr(60, **kw) == pytest.approx((1e-4 + 1e-5) / 2)
    assert warmup_cosine_lr(110, **kw) == pytest.approx(1e-5)
    assert warmup_cosine_lr(35, **kw) == pytest.approx(
        1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert warmup_cosine_lr(0, 5, 0.1, 0) == 0.1  # no warmup starts at the base rate


def test_schedule_rises_then_decays_monotonically():
    lrs = np.array([warmup_cosine_lr(s, 200, 3e-4, 20, 1e-6, 0.0) for s in range(201)])
    assert np.all(np.diff(lrs[:21]) > 0)
    assert np.all(np.diff(lrs[20:]) < 0)
    assert lrs.max() == lrs[20] == pytest.approx(3e-4)


def test_schedule_validates_arguments():
    with pytest.raises(ValueError, match=r"step must be in \[0, total_steps=10\]"):
        warmup_cosine_lr(11, 10, 0.1, 2)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        warmup_cosine_lr(0, 10, 0.1, 10)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        warmup_cosine_lr(0, 0, 0.1, 0)
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine_lr(0, 10, 0.1, 2, min_lr=0.2)
    with pytest.raises(ValueError, match="base_lr must be a finite number"):
        warmup_cosine_lr(0, 10, -0.1, 2)
    with pytest.raises(TypeError, match="must be integers"):
        warmup_cosine_lr(1.5, 10, 0.1, 2)
    assert warmup_cosine_lr(np.int64(3), 10, 0.1, 2) == warmup_cosine_lr(3, 10, 0.1, 2)
