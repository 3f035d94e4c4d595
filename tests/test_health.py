"""Representation-health figures (train/health.py) on toy batches whose answer is known."""

import math

import pytest
import torch

from twinray.train.health import cross_correlation, effective_rank, embedding_std


def test_a_collapsed_embedding_has_rank_one_and_no_spread():
    rows = torch.randn(1, 64).repeat(200, 1)  # every row the same
    assert effective_rank(rows) == pytest.approx(1.0, abs=1e-3)
    assert embedding_std(rows) == pytest.approx(0.0, abs=1e-12)
    assert cross_correlation(rows, rows) == (pytest.approx(0.0, abs=1e-9), pytest.approx(0.0, abs=1e-9))


def test_a_random_gaussian_embedding_is_near_full_rank_and_spread_evenly():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 64, generator=g)
    rank = effective_rank(z)
    assert 0.9 * 64 < rank <= 64  # Marchenko-Pastur spread keeps it a little below 64
    assert embedding_std(z) == pytest.approx(1 / math.sqrt(64), rel=0.03)


def test_rank_follows_the_number_of_directions():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 8, generator=g) @ torch.randn(8, 128, generator=g)  # rank 8 in 128 dims
    assert 6 < effective_rank(z) <= 8.01


def test_cross_correlation_of_identical_and_independent_views():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8192, 16, generator=g)
    on, off = cross_correlation(z, z)
    assert on == pytest.approx(1.0, abs=1e-4)  # var / (var + eps)
    assert off == pytest.approx(math.sqrt(2 / math.pi) / math.sqrt(8192), rel=0.1)  # E|N(0, 1/N)|
    on, _ = cross_correlation(z, torch.randn(8192, 16, generator=g))
    assert abs(on) < 0.05


def test_cross_correlation_matches_the_papers_formula_in_float64():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(50, 5, generator=g, dtype=torch.float64), torch.randn(50, 5, generator=g, dtype=torch.float64)
    n1 = (z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + 1e-5).sqrt()
    n2 = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + 1e-5).sqrt()
    c = [[sum(n1[b, i] * n2[b, j] for b in range(50)) / 50 for j in range(5)] for i in range(5)]
    on = sum(c[i][i] for i in range(5)) / 5
    off = sum(abs(c[i][j]) for i in range(5) for j in range(5) if i != j) / 20
    assert cross_correlation(z1, z2) == (pytest.approx(float(on), rel=1e-9), pytest.approx(float(off), rel=1e-9))


@pytest.mark.parametrize("bad", [torch.zeros(1, 4), torch.zeros(4)])
def test_too_few_rows_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="N x D"):
        embedding_std(bad)
