"""The statistics behind every verdict (EXPERIMENTS.md, "Verdicts and statistics").

Plain numpy/scipy on lists of numbers: t-intervals over seeds, one-sided rank tests over
examples (Mann-Whitney U for independent groups, Wilcoxon signed-rank for paired values), Wilson
intervals for proportions, Holm's correction, Spearman's rho with a Fisher-z interval, and a
seeded percentile bootstrap for the interval of an effect (a median, a ratio of medians).

A count censored by the budget (not flipped) is +inf: rank tests map it past every finite value
so it ranks largest. **One value per example**: `per_example` takes {(seed, example): value} and
returns each example's median over its seeds, the unit of replication of every rank test.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Callable, Hashable, Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
BOOTSTRAP = 2000  # resamples of the effect intervals (seeded: the same interval every run)


def median(v: Sequence[float]) -> float:
    return statistics.median(v) if len(v) else math.nan


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.{digits}g}"


def ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return math.nan
    return a / b if b not in (0, math.inf) else (0.0 if b == math.inf else math.nan)


# ----------------------------------------------------------------------------- one value per example
def per_example(values: dict[tuple[int, Hashable], float]) -> dict[Hashable, float]:
    """{(seed, example): value} -> {example: median over its seeds} (inf counts as largest)."""
    by: dict[Hashable, list[float]] = defaultdict(list)
    for (_, ex), v in values.items():
        by[ex].append(v)
    return {ex: statistics.median(vs) for ex, vs in by.items()}  # a median with inf is inf


# ----------------------------------------------------------------------------- over seeds
def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided 95% t-interval of the mean (n - 1 df)."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, -math.inf, math.inf
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def t_p_above(values: Sequence[float], threshold: float) -> float:
    """One-sided p of a t-test that the mean exceeds `threshold`."""
    x = np.asarray(values, dtype=float) - threshold
    if len(x) < 2:
        return math.nan
    if x.std(ddof=1) == 0:
        return 0.0 if x.mean() > 0 else 1.0
    return float(stats.ttest_1samp(x, 0.0, alternative="greater").pvalue)


# ----------------------------------------------------------------------------- over examples
def _finite(*groups: Sequence[float]) -> list[list[float]]:
    """inf as one more than the largest finite value (and -inf one less than the smallest)."""
    fin = [v for g in groups for v in g if math.isfinite(v)]
    hi = (max(fin) if fin else 0.0) + 1.0
    lo = (min(fin) if fin else 0.0) - 1.0
    return [[v if math.isfinite(v) else (hi if v > 0 else lo) for v in g] for g in groups]


def mann_whitney(a: Sequence[float], b: Sequence[float], alternative: str) -> float:
    """One-sided p that values in `a` tend to be `alternative` ('less' or 'greater') than in `b`."""
    x, y = _finite(a, b)
    return float(stats.mannwhitneyu(x, y, alternative=alternative).pvalue)


def wilcoxon(d: Sequence[float], alternative: str) -> float:
    """One-sided signed-rank p that the paired differences `d` tend to be `alternative` than 0
    (zeros dropped; +-inf beyond every finite difference)."""
    (x,) = _finite(d)
    x = np.asarray(x)
    if not np.any(x != 0):
        return 1.0
    return float(stats.wilcoxon(x, alternative=alternative, zero_method="wilcox").pvalue)


def wilcoxon_two_sided(d: Sequence[float]) -> float:
    (x,) = _finite(d)
    x = np.asarray(x)
    if not np.any(x != 0):
        return 1.0
    return float(stats.wilcoxon(x, zero_method="wilcox").pvalue)


def auc(a: Sequence[float], b: Sequence[float]) -> float:
    """P(a value from `a` exceeds one from `b`), ties half: Mann-Whitney's U / (n_a n_b)."""
    x, y = _finite(a, b)
    return float(stats.mannwhitneyu(x, y).statistic) / (len(x) * len(y))


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap(stat: Callable[..., np.ndarray], *groups: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of a statistic, each group resampled with replacement
    (seeded: the same interval every run). `stat` takes one (resamples, n_g) array per group and
    returns a value per resample (vectorized: 2,000 resamples cost one array op). inf is kept
    (a median of counts with unflipped targets); NaN resamples are dropped."""
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(g, dtype=float) for g in groups]
    vals = np.asarray(stat(*(a[rng.integers(0, len(a), (BOOTSTRAP, len(a)))] for a in arrs)), dtype=float)
    vals = vals[~np.isnan(vals)]
    if not len(vals):
        return math.nan, math.nan
    lo, hi = np.percentile(vals, [2.5, 97.5]) if np.isfinite(vals).all() else np.quantile(vals, [0.025, 0.975],
                                                                                              method="inverted_cdf")
    return float(lo), float(hi)


def medians(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=1)


def median_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.median(a, axis=1) / np.median(b, axis=1)
    return np.where(np.isinf(np.median(a, axis=1)) & np.isinf(np.median(b, axis=1)), np.nan, r)


def median_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """median(b) - median(a) per resample."""
    return np.median(b, axis=1) - np.median(a, axis=1)


def aucs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """AUC (ties half) per resample row, from ranks."""
    n1, n2 = a.shape[1], b.shape[1]
    ranks = stats.rankdata(np.concatenate([a, b], axis=1), axis=1)
    return (ranks[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n2)


def spearman_fisher(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """(rho, low, high): Spearman's rho with its Fisher-z 95% interval (se 1 / sqrt(n - 3))."""
    rho = float(stats.spearmanr(x, y).statistic)
    n = len(x)
    if math.isfinite(rho) and abs(rho) >= 1 and n >= 4:
        return rho, rho, rho
    if n < 4 or not math.isfinite(rho):
        return rho, math.nan, math.nan
    z, half = math.atanh(rho), 1.959964 / math.sqrt(n - 3)
    return rho, math.tanh(z - half), math.tanh(z + half)


# ----------------------------------------------------------------------------- many tests
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (NaN stays NaN and takes no part)."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
