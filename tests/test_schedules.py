"""LR schedules at known points."""

import math

import pytest

from fastflat.methods.schedules import make_schedule


def test_cosine_starts_at_lr_halves_midway_and_ends_near_zero():
    f = make_schedule("cosine", 0.1, 100)
    assert f(0) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.05)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(25) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_step_decays_tenfold_at_half_and_three_quarters():
    f = make_schedule("step", 0.1, 100)
    assert [f(49), f(50), f(74), f(75)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_warmup_rises_linearly_then_hands_over():
    f = make_schedule("constant", 0.2, 100, warmup_steps=10)
    assert f(0) == pytest.approx(0.02)
    assert f(4) == pytest.approx(0.1)
    assert f(9) == pytest.approx(0.2)
    assert f(10) == pytest.approx(0.2)
    g = make_schedule("cosine", 0.2, 110, warmup_steps=10)
    assert g(10) == pytest.approx(0.2) and g(60) == pytest.approx(0.1)
