"""Statistics of the query service, in numpy (no scipy in the services): the paired
bootstrap behind CompareRuns' intervals, and Cohen's kappa and Spearman's rank correlation
behind the judge-human agreement of GetRunSummary."""

import numpy as np


def paired_bootstrap(differences: np.ndarray, resamples: int, seed: int,
                     level: float) -> np.ndarray:
    """Percentile bootstrap intervals of the means of the rows of `differences` (k rows of
    n paired differences, n >= 1): one (resamples x n) matrix of sample indices drawn with
    replacement by numpy.random.default_rng(seed), shared by every row (so the rows'
    intervals come from the same resampled samples), then the (1 - level) / 2 and
    (1 + level) / 2 quantiles (linear interpolation) of each row's resampled means.
    Returns k x 2 (low, high)."""
    rows = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, rows.shape[1], size=(resamples, rows.shape[1]))
    tail = (1.0 - level) / 2.0
    out = np.empty((rows.shape[0], 2))
    for k, row in enumerate(rows):
        means = row[index].mean(axis=1)
        out[k] = np.quantile(means, [tail, 1.0 - tail])
    return out


def cohen_kappa(first: np.ndarray, second: np.ndarray) -> float | None:
    """Cohen's kappa of two pass/fail verdict arrays of equal length; None when undefined
    (fewer than 2 pairs, or both sides constant, which leaves chance agreement at 1 or the
    statistic meaningless)."""
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if a.size < 2 or (np.all(a == a[0]) and np.all(b == b[0])):
        return None
    observed = float(np.mean(a == b))
    pa, pb = float(np.mean(a)), float(np.mean(b))
    chance = pa * pb + (1.0 - pa) * (1.0 - pb)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True,
                                   return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(first: np.ndarray, second: np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when undefined
    (fewer than 2 pairs, or either side constant)."""
    x, y = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt(np.sum(dx * dx) * np.sum(dy * dy)))
    if denominator == 0.0:
        return None
    return float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))
