"""services.query.stats against scipy (ranks, Spearman) and the definitions (kappa,
bootstrap), with the undefined cases."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from services.query.stats import average_ranks, cohen_kappa, paired_bootstrap, spearman


def test_average_ranks_match_scipy_rankdata_with_ties():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    assert np.array_equal(average_ranks(values), scipy_stats.rankdata(values))


def test_spearman_matches_scipy_and_is_unset_when_undefined():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 30).astype(float)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert spearman([1.0], [2.0]) is None
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_kappa_by_its_definition_and_undefined_cases():
    a = [True, True, False, False, True, False]
    b = [True, False, False, False, True, True]
    observed, pa, pb = 4 / 6, 0.5, 0.5
    chance = pa * pb + (1 - pa) * (1 - pb)
    assert cohen_kappa(a, b) == pytest.approx((observed - chance) / (1 - chance))
    assert cohen_kappa([True], [True]) is None
    assert cohen_kappa([True, True], [True, True]) is None
    assert cohen_kappa([True, True], [False, False]) is None
    assert cohen_kappa([True, True, True], [True, False, True]) == pytest.approx(0.0)


def test_bootstrap_rows_share_resamples_and_degenerate_cases():
    d = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0]])
    low_high = paired_bootstrap(d, 500, 5, 0.9)
    index = np.random.default_rng(5).integers(0, 4, size=(500, 4))
    for row, (low, high) in zip(d, low_high, strict=True):
        assert (low, high) == pytest.approx(np.quantile(row[index].mean(axis=1), [0.05, 0.95]))
    assert paired_bootstrap(np.array([[2.5]]), 100, 0, 0.95).tolist() == [[2.5, 2.5]]
    assert paired_bootstrap(np.full((1, 7), 1.0), 100, 0, 0.95).tolist() == [[1.0, 1.0]]
