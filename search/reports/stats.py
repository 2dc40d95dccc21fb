"""The statistics behind the reports: seed intervals, paired subject-level comparisons.

- `mean_interval(values)`: mean, sample std (ddof=1) and the two-sided 95% Student-t interval
  mean +- t_{0.975, K-1} * std / sqrt(K) over K reruns (seeds). K = 1 gives no std or interval.
- `paired_bootstrap(d)`: percentile interval of the mean of paired differences, resampling the
  pairs (subjects) with replacement (scipy.stats.bootstrap).
- `sign_flip_pvalue(d)`: two-sided paired permutation test of "mean difference = 0": under the
  null each subject's difference is as likely +d as -d (scipy.stats.permutation_test). Exact (all
  2^n sign vectors) up to n = EXACT_MAX subjects, else Monte Carlo with the observed vector counted.
- `uf1_uar_from_counts(confusions)`: UF1/UAR from (..., 3, 3) confusion counts, vectorised, with
  the classes absent from the ground truth left out as `htnet.metrics.uf1_uar` does; used for the
  subject-level (cluster) bootstrap of pooled UF1/UAR.
"""
import math

import numpy as np
from scipy import stats as scipy_stats

EXACT_MAX = 16


def mean_interval(values, confidence=0.95):
    """{'n', 'mean', 'std', 'ci_low', 'ci_high', 'half_width'} of the finite values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    out = {"n": n, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"),
           "ci_high": float("nan"), "half_width": float("nan")}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n >= 2:
        std = float(x.std(ddof=1))
        half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, half_width=half, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def summarize_columns(table, columns=None, confidence=0.95):
    """One row per column of `table` (e.g. seeds x metrics): n, mean, std, ci_low, ci_high."""
    import pandas as pd

    columns = list(table.columns if columns is None else columns)
    rows = {c: mean_interval(pd.to_numeric(table[c], errors="coerce").tolist(), confidence) for c in columns}
    return pd.DataFrame.from_dict(rows, orient="index")[["n", "mean", "std", "ci_low", "ci_high", "half_width"]]


def paired_bootstrap(d, n_boot=10000, confidence=0.95, seed=0):
    """Percentile bootstrap interval (low, high) of mean(d), resampling the pairs (scipy)."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan")
    if np.all(d == d[0]):  # every resample has the same mean (scipy warns on degenerate data)
        return float(d[0]), float(d[0])
    result = scipy_stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                   method="percentile", rng=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_flip_pvalue(d, n_perm=100_000, seed=0):
    """(p, exact): two-sided paired sign-flip permutation p-value of mean(d) = 0 (scipy's
    permutation_test on one sample flips signs): all 2^n sign vectors up to EXACT_MAX subjects,
    else n_perm random ones with the observed one counted."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0:
        return float("nan"), True
    exact = n <= EXACT_MAX
    result = scipy_stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
                                          permutation_type="samples", alternative="two-sided",
                                          n_resamples=np.inf if exact else n_perm, rng=seed)
    return float(result.pvalue), exact


def wilcoxon_pvalue(d):
    """Wilcoxon signed-rank two-sided p-value (scipy), a cross-check; nan when every d is 0."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0 or np.all(d == 0):
        return float("nan")
    return float(scipy_stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def uf1_uar_from_counts(confusions):
    """UF1 and UAR of confusion counts (..., C, C) (rows true, columns predicted), over the
    classes present in the ground truth. Returns two arrays of shape (...)."""
    c = np.asarray(confusions, dtype=float)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    positives = c.sum(axis=-1)
    predicted = c.sum(axis=-2)
    present = positives > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / np.maximum(positives + predicted, 1e-300), 0.0)
        recall = np.where(present, tp / np.maximum(positives, 1e-300), 0.0)
        count = present.sum(axis=-1)
        uf1 = np.where(count > 0, f1.sum(axis=-1) / np.maximum(count, 1), np.nan)
        uar = np.where(count > 0, recall.sum(axis=-1) / np.maximum(count, 1), np.nan)
    return uf1, uar


def cluster_bootstrap_uf1_uar(conf_a, conf_b, n_boot=10000, confidence=0.95, seed=0):
    """Subject-level bootstrap of pooled UF1/UAR of two runs on the same subjects. Not
    scipy.stats.bootstrap: each replicate pools resampled per-subject confusion counts, done here for
    all replicates at once as multinomial weights times the counts.

    conf_a, conf_b: (S, C, C) per-subject confusion counts. Each replicate draws S subjects with
    replacement (the same draw for both runs) and pools their counts. Returns
    {'uf1': (low, high), 'uar': (low, high)} intervals of (A - B)."""
    conf_a, conf_b = np.asarray(conf_a, float), np.asarray(conf_b, float)
    s = len(conf_a)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(float)   # (B, S)
    pooled_a = np.einsum("bs,sij->bij", weights, conf_a)
    pooled_b = np.einsum("bs,sij->bij", weights, conf_b)
    uf1_a, uar_a = uf1_uar_from_counts(pooled_a)
    uf1_b, uar_b = uf1_uar_from_counts(pooled_b)
    alpha = (1 - confidence) / 2
    out = {}
    for name, diff in (("uf1", uf1_a - uf1_b), ("uar", uar_a - uar_b)):
        diff = diff[np.isfinite(diff)]
        out[name] = (float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha))) if len(diff) \
            else (float("nan"), float("nan"))
    return out
