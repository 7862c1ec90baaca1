"""Consensus math against hand-computed values."""

import math

import numpy as np
import pytest

from cascade.consensus import EPS, fuse_matrix, weighted_geometric_mean


def test_equal_weights_two_tiers():
    # sqrt(.8*.6) / (sqrt(.8*.6) + sqrt(.2*.4))
    num = math.sqrt(0.8 * 0.6)
    assert weighted_geometric_mean([0.8, 0.6], [1, 1]) == pytest.approx(num / (num + math.sqrt(0.2 * 0.4)))


def test_weights_are_normalised_and_scale_free():
    a = 0.9 ** (2 / 3) * 0.3 ** (1 / 3)
    b = 0.1 ** (2 / 3) * 0.7 ** (1 / 3)
    assert weighted_geometric_mean([0.9, 0.3], [2, 1]) == pytest.approx(a / (a + b))
    assert weighted_geometric_mean([0.9, 0.3], [20, 10]) == pytest.approx(a / (a + b))


def test_single_tier_is_its_own_probability():
    assert weighted_geometric_mean([0.37], [5.0]) == pytest.approx(0.37)


def test_extremes_are_clipped_not_vetoing():
    p = weighted_geometric_mean([0.0, 1.0], [1, 1])
    assert p == pytest.approx(0.5)
    assert 0 < weighted_geometric_mean([0.0], [1]) <= EPS * 1.01


def test_zero_and_bad_weights():
    assert weighted_geometric_mean([0.8, 0.2], [0, 0]) == pytest.approx(0.5)
    assert weighted_geometric_mean([0.8, 0.2], [1, float("nan")]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        weighted_geometric_mean([], [])
    with pytest.raises(ValueError):
        weighted_geometric_mean([0.5], [1, 2])


def test_fuse_matrix_renormalises_over_answering_tiers():
    P = np.array([[0.9, 0.3], [0.9, np.nan], [np.nan, np.nan]])
    out = fuse_matrix(P, [2, 1])
    assert out[0] == pytest.approx(weighted_geometric_mean([0.9, 0.3], [2, 1]))
    assert out[1] == pytest.approx(0.9)
    assert math.isnan(out[2])
