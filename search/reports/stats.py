"""The statistics of the reports: seed intervals (Student t) and paired subject-level comparisons."""
import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

EXACT_MAX = 16  # the sign-flip test enumerates all 2^n sign vectors up to this many subjects


def summarize_columns(table, columns=None, confidence=0.95):
    """One row per column over its finite values: n, mean, std (ddof=1) and the two-sided Student-t interval
    mean +- t_{0.975, n-1} * std / sqrt(n) (none for one value)."""
    values = table[list(table.columns if columns is None else columns)].apply(pd.to_numeric, errors="coerce")
    values = values.where(np.isfinite(values))
    n, mean, std = values.count(), values.mean(), values.std(ddof=1)
    # not scipy.stats.t.interval: it gives NaN where std = 0, not the point
    half = pd.Series(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1), index=n.index) * std / np.sqrt(n)
    return pd.DataFrame({"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
                         "half_width": half})


def mean_interval(values, confidence=0.95):
    """summarize_columns of one list of values, as a dict."""
    row = summarize_columns(pd.DataFrame({"x": pd.Series(values, dtype=float)}), confidence=confidence).iloc[0]
    return {"n": int(row["n"]), **{k: float(row[k]) for k in ("mean", "std", "ci_low", "ci_high", "half_width")}}


def paired_bootstrap(d, n_boot=10000, confidence=0.95, seed=0):
    """Percentile bootstrap interval (low, high) of mean(d), resampling the pairs (subjects)."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan")
    if np.all(d == d[0]):  # every resample has the same mean (scipy warns on degenerate data)
        return float(d[0]), float(d[0])
    result = scipy_stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                   method="percentile", rng=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_flip_pvalue(d, n_perm=100_000, seed=0):
    """(p, exact): two-sided paired permutation test of mean(d) = 0, flipping the signs of the differences:
    every sign vector up to EXACT_MAX subjects, else n_perm random ones (the observed one counted)."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan"), True
    exact = len(d) <= EXACT_MAX
    result = scipy_stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
                                          permutation_type="samples", alternative="two-sided",
                                          n_resamples=np.inf if exact else n_perm, rng=seed)
    return float(result.pvalue), exact


def wilcoxon_pvalue(d):
    """Wilcoxon signed-rank two-sided p-value, a cross-check; NaN when every d is 0."""
    d = np.asarray(d, dtype=float)
    if not np.any(d):
        return float("nan")
    return float(scipy_stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def uf1_uar_from_counts(confusions):
    """UF1 and UAR of confusion counts (..., C, C), rows true: vectorised htnet.metrics.uf1_uar (the classes
    absent from the ground truth left out; NaN when none is present)."""
    c = np.asarray(confusions, dtype=float)
    tp, positives, predicted = np.diagonal(c, axis1=-2, axis2=-1), c.sum(axis=-1), c.sum(axis=-2)
    present = positives > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(present, 2 * tp / (positives + predicted), 0.0).sum(axis=-1) / present.sum(axis=-1)
        return f1, np.where(present, tp / positives, 0.0).sum(axis=-1) / present.sum(axis=-1)


def cluster_bootstrap_uf1_uar(conf_a, conf_b, n_boot=10000, confidence=0.95, seed=0):
    """{'uf1': (low, high), 'uar': (low, high)}: subject-level bootstrap intervals of pooled A - B from (S, C, C)
    per-subject confusion counts, the same S subjects drawn for both runs. Not scipy.stats.bootstrap: all the
    replicates' pooled counts at once, as multinomial weights times the counts."""
    conf_a, conf_b = np.asarray(conf_a, float), np.asarray(conf_b, float)
    s = len(conf_a)
    weights = np.random.default_rng(seed).multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(float)
    uf1_a, uar_a = uf1_uar_from_counts(np.einsum("bs,sij->bij", weights, conf_a))
    uf1_b, uar_b = uf1_uar_from_counts(np.einsum("bs,sij->bij", weights, conf_b))
    alpha, out = (1 - confidence) / 2, {}
    for name, diff in (("uf1", uf1_a - uf1_b), ("uar", uar_a - uar_b)):
        diff = diff[np.isfinite(diff)]
        out[name] = tuple(float(q) for q in np.quantile(diff, [alpha, 1 - alpha])) if len(diff) else (np.nan,) * 2
    return out
