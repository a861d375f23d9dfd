"""The power-law fit of ranked block norms: recovery of a known α, goodness of fit, edge cases."""
import math

import numpy as np
import pytest
import torch

from sparse_grad.analysis import fit_power_law
from sparse_grad.analysis.power_law import ks_distance


def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ())))  # follows the test's torch seed


def pareto_norms(n, alpha, generator, scale=0.01):
    """A sample whose ranked values follow norm ∝ rank^-alpha: P(X > x) ∝ x^(-1/alpha)."""
    return scale * generator.random(n) ** -alpha


@pytest.mark.parametrize("n", [30_000, 100_000])
@pytest.mark.parametrize("alpha", [1.2, 1.5, 2.0])
def test_recovers_alpha_of_a_rank_size_law(alpha, n):
    fit = fit_power_law(pareto_norms(n, alpha, rng()))
    assert abs(fit.alpha - alpha) < 0.1, fit
    assert fit.alpha_stderr == pytest.approx(fit.alpha / math.sqrt(fit.tail_blocks))
    assert fit.tail_blocks > n // 10 and fit.ks < 0.02


@pytest.mark.parametrize("alpha", [1.2, 1.5, 2.0])
def test_recovers_alpha_of_a_tail_above_a_lognormal_body(alpha):
    """Realistic shape: most blocks in a lognormal body, the top 20% a power law."""
    g, n = rng(), 100_000
    tail = int(0.2 * n)
    norms = np.concatenate([g.lognormal(0.0, 0.5, n - tail), 3.0 * g.random(tail) ** -alpha])
    fit = fit_power_law(g.permutation(norms))
    assert abs(fit.alpha - alpha) < 0.1, fit
    assert 0.05 * n < fit.tail_blocks < 0.4 * n


def test_exact_zipf_ranks():
    ranks = np.arange(1, 20_001)
    fit = fit_power_law(5.0 * ranks ** -1.5)
    assert abs(fit.alpha - 1.5) < 0.01
    assert fit.plausible
    np.testing.assert_allclose(fit.ranked_line(ranks[:10]), 5.0 * ranks[:10] ** -1.5, rtol=0.05)


def test_ks_distance_matches_a_direct_computation():
    g = rng()
    tail = 2.0 * g.random(500) ** -1.3 + 1e-9
    xmin, alpha = 2.0, 1.25
    y = np.sort(tail)
    fitted = 1 - (y / xmin) ** (-1 / alpha)
    direct = max(max(abs((i + 1) / y.size - f), abs(i / y.size - f)) for i, f in enumerate(fitted))
    assert ks_distance(tail, xmin, alpha) == pytest.approx(direct, abs=1e-12)


def test_a_lognormal_body_alone_is_not_called_a_clean_power_law():
    fit = fit_power_law(rng().lognormal(0.0, 0.3, 50_000))
    assert fit.alpha < 0.5  # a thin tail: a steep drop in the value distribution, a flat ranked curve
    assert fit.tail_blocks < 50_000 // 2


def test_too_few_or_degenerate_norms_give_none_and_zeros_nan_are_ignored():
    assert fit_power_law(np.ones(1000)) is None
    assert fit_power_law(np.arange(1.0, 41.0)) is None  # fewer than min_tail + 1 = 51
    assert fit_power_law([]) is None
    base = pareto_norms(5000, 1.5, rng())
    noisy = np.concatenate([base, np.zeros(300), [np.nan, np.inf, -1.0]])
    assert fit_power_law(noisy) == fit_power_law(base)
    assert fit_power_law(torch.tensor(base)) == fit_power_law(base)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_tail": 1}, "min_tail"), ({"min_tail": 2.5}, "min_tail"), ({"candidates": 0}, "candidates"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(np.ones(100), **kwargs)
