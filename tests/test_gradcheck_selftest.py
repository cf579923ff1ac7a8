"""Tests of the gradient checker itself.

Every other gradient test trusts ``gradcheck``, so it must pass on functions
whose derivatives we know by heart and, just as important, fail on gradients
that are wrong by a little.
"""
import re

import numpy as np
import pytest

from minblip import GradcheckError, Module, Param, check_layer, gradcheck, rel_error


def param64(rng, shape):
    return Param(rng.standard_normal(shape), dtype=np.float64)


def cube_loss(x, grad_of):
    """L = sum(x^3); backward adds grad_of(x) (3 x^2 when right) into x.grad."""
    def loss_fn(backward):
        if backward:
            x.grad += grad_of(x.data)
        return float(np.sum(x.data ** 3))
    return loss_fn


def matmul_loss(A, B, R, grad_A=True, grad_B=True):
    """L = sum((A @ B) * R); dL/dA = R B^T, dL/dB = A^T R."""
    def loss_fn(backward):
        if backward:
            if grad_A:
                A.grad += R @ B.data.T
            if grad_B:
                B.grad += A.data.T @ R
        return float(np.sum((A.data @ B.data) * R))
    return loss_fn


# ---------------------------------------------------------------------------
# Known derivatives pass
# ---------------------------------------------------------------------------

def test_passes_on_sum_of_cubes():
    x = param64(np.random.default_rng(0), (4, 5))
    report = gradcheck(cube_loss(x, lambda v: 3 * v * v), [("x", x)])
    assert report.passed
    assert report.max_rel_err < 1e-7
    assert report.rows[0].n_checked == 6 and report.directional.passed


def test_passes_on_sin():
    x = param64(np.random.default_rng(1), (7,))

    def loss_fn(backward):
        if backward:
            x.grad += np.cos(x.data)
        return float(np.sum(np.sin(x.data)))

    assert gradcheck(loss_fn, [x]).max_rel_err < 1e-7


def test_passes_on_matmul_of_two_params():
    rng = np.random.default_rng(2)
    A, B, R = param64(rng, (3, 4)), param64(rng, (4, 5)), rng.standard_normal((3, 5))
    report = gradcheck(matmul_loss(A, B, R), {"A": A, "B": B})
    assert [r.name for r in report.rows] == ["A", "B"]
    assert report.passed and report.max_rel_err < 1e-7


def test_passes_on_elementwise_function_of_two_params():
    rng = np.random.default_rng(3)
    a, b = param64(rng, (6,)), param64(rng, (6,))

    def loss_fn(backward):  # L = sum(exp(a) * b^2)
        if backward:
            a.grad += np.exp(a.data) * b.data ** 2
            b.grad += 2 * np.exp(a.data) * b.data
        return float(np.sum(np.exp(a.data) * b.data ** 2))

    assert gradcheck(loss_fn, [("a", a), ("b", b)]).passed


def test_checks_every_coordinate_of_a_small_param_and_leaves_data_and_grad():
    x = param64(np.random.default_rng(4), (2, 2))
    before = x.data.copy()
    report = gradcheck(cube_loss(x, lambda v: 3 * v * v), [x], n_coords=10)
    assert report.rows[0].n_checked == 4
    np.testing.assert_array_equal(x.data, before)  # perturbations were undone
    np.testing.assert_allclose(x.grad, 3 * before ** 2, rtol=1e-15)  # analytic grad kept


def test_gradient_accumulated_before_the_check_is_ignored():
    x = param64(np.random.default_rng(5), (5,))
    x.grad += 123.0  # stale gradient from an earlier step: gradcheck zeroes it first
    assert gradcheck(cube_loss(x, lambda v: 3 * v * v), [x]).passed


# ---------------------------------------------------------------------------
# Wrong gradients raise
# ---------------------------------------------------------------------------

def test_raises_on_slightly_wrong_gradient():
    x = param64(np.random.default_rng(0), (4, 5))
    with pytest.raises(GradcheckError):
        gradcheck(cube_loss(x, lambda v: 3 * v * v + 1e-3), [("x", x)])


def test_raises_on_missing_factor():
    x = param64(np.random.default_rng(0), (4, 5))
    with pytest.raises(GradcheckError):
        gradcheck(cube_loss(x, lambda v: v * v), [("x", x)])  # forgot the 3


def test_raises_on_transposed_matmul_gradient():
    rng = np.random.default_rng(6)
    A, B, R = param64(rng, (4, 4)), param64(rng, (4, 4)), rng.standard_normal((4, 4))

    def loss_fn(backward):
        if backward:
            A.grad += R @ B.data  # should be R @ B.T; same shape, wrong values
            B.grad += A.data.T @ R
        return float(np.sum((A.data @ B.data) * R))

    with pytest.raises(GradcheckError, match=r"A\["):
        gradcheck(loss_fn, {"A": A, "B": B})


def test_raises_when_one_of_two_params_gets_no_gradient_and_names_it():
    rng = np.random.default_rng(2)
    A, B, R = param64(rng, (3, 4)), param64(rng, (4, 5)), rng.standard_normal((3, 5))
    with pytest.raises(GradcheckError) as info:
        gradcheck(matmul_loss(A, B, R, grad_B=False), {"A": A, "B": B})
    text = str(info.value)
    lines = {line[0]: line for line in text.splitlines() if line.startswith(("A ", "B "))}
    assert lines["A"].endswith("ok") and lines["B"].endswith("FAIL")
    # the explanation names the failing Param, its worst coordinate and both values
    assert re.search(r"^  B\[\d+, \d+\]: analytic 0 vs numeric ", text, re.M)


def test_report_names_the_worst_param():
    rng = np.random.default_rng(7)
    good, bad = param64(rng, (3,)), param64(rng, (8,))

    def loss_fn(backward):
        if backward:
            good.grad += 3 * good.data ** 2
            bad.grad += 3 * bad.data ** 2
            bad.grad[5] += 0.5  # one coordinate of `bad` is off
        return float(np.sum(good.data ** 3) + np.sum(bad.data ** 3))

    report = gradcheck(loss_fn, [("good", good), ("bad", bad)], n_coords=8,
                       raise_on_fail=False)
    assert not report.passed
    worst = max(report.rows, key=lambda r: r.max_abs_err)
    assert worst.name == "bad" and worst.worst_index == (5,)
    assert "bad[5]: analytic" in str(report)
    assert "good[" not in str(report)


def test_random_direction_catches_a_param_the_sampling_misses():
    # `w` has 10,000 entries and the loss depends on only one of them, which the
    # buggy backward forgets. Six sampled coordinates (the analytic argmax, here
    # arbitrary, plus five at random) almost surely all have true gradient 0, so
    # the per-coordinate check passes; the one random direction over all Params
    # moves w[4321] too and sees the missing slope.
    rng = np.random.default_rng(8)
    x, w = param64(rng, (3,)), param64(rng, (10_000,))

    def loss_fn(backward):
        if backward:
            x.grad += 2 * x.data  # w's gradient 3 w[4321]^2 is missing
        return float(np.sum(x.data ** 2) + w.data[4321] ** 3)

    report = gradcheck(loss_fn, [("x", x), ("w", w)], raise_on_fail=False)
    assert all(r.passed for r in report.rows)  # sampling missed w[4321]
    assert not report.directional.passed
    assert gradcheck(loss_fn, [("x", x), ("w", w)], directional=False).passed
    with pytest.raises(GradcheckError, match=r"random direction"):
        gradcheck(loss_fn, [("x", x), ("w", w)])


def test_raise_on_fail_false_returns_a_failed_report():
    x = param64(np.random.default_rng(0), (4,))
    report = gradcheck(cube_loss(x, lambda v: 2 * v * v), [x], raise_on_fail=False)
    assert not report.passed and "FAILED" in str(report)


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------

def test_refuses_float32_params():
    x = Param(np.ones(3), dtype=np.float32)
    with pytest.raises(TypeError, match=r"float64.*'x' is float32"):
        gradcheck(cube_loss(x, lambda v: 3 * v * v), [("x", x)])


def test_refuses_non_params():
    with pytest.raises(TypeError, match=r"expected Params, got ndarray"):
        gradcheck(lambda backward: 0.0, [np.ones(3)])
    with pytest.raises(TypeError, match=r"expected Params, got list for 'w'"):
        gradcheck(lambda backward: 0.0, {"w": [1.0, 2.0]})


# ---------------------------------------------------------------------------
# check_layer and rel_error
# ---------------------------------------------------------------------------

class Scale(Module):
    """y = x * s with a Param s broadcast over the leading axes (a test layer)."""

    def __init__(self, dim, wrong=False):
        self.s = Param(np.linspace(0.5, 1.5, dim))
        self.wrong = wrong

    def forward(self, x):
        return x * self.s.data, x

    def backward(self, dy, cache):
        x = cache
        self.s.grad += (dy * x).sum(axis=tuple(range(dy.ndim - 1)))
        return dy * self.s.data * (2.0 if self.wrong else 1.0)


def test_check_layer_passes_a_right_layer_and_converts_it_to_float64():
    layer = Scale(4)
    assert layer.s.dtype == np.float32
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    report = check_layer(layer, x)  # R comes from default_rng(0), independent of x
    assert layer.s.dtype == np.float64
    assert [r.name for r in report.rows] == ["s", "input0"]
    assert report.passed


def test_check_layer_catches_a_wrong_input_gradient():
    x = np.random.default_rng(1).standard_normal((3, 4))
    with pytest.raises(GradcheckError, match=r"input0\[\d+, \d+\]: analytic"):
        check_layer(Scale(4, wrong=True), x)


def test_rel_error_basic_cases():
    assert rel_error(1.0, 1.0) == 0.0
    assert rel_error(0.0, 0.0) == 0.0  # no 0/0
    assert rel_error(1.0, -1.0) == 1.0  # opposite signs: the maximum
    assert rel_error(2.0, 0.0) == 1.0
    assert rel_error([1.0, 2.0], [1.0, 2.2]) == pytest.approx(0.2 / 4.2, rel=1e-12)
    assert rel_error(1.0, 1.0 + 1e-8) == pytest.approx(5e-9, rel=1e-6)
    assert rel_error(np.ones((2, 2)), np.ones((2, 2)) * 3) == pytest.approx(0.5)
