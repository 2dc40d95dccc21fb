"""The reports' statistics: bootstrap intervals over seeds and subjects, paired subject-level comparisons."""
import numpy as np
from scipy import stats as scipy_stats

from htnet.metrics import NUM_CLASSES

EXACT_MAX = 16  # the sign-flip test enumerates all 2^n sign vectors up to this many subjects
MIN_SEEDS = 3  # fewer seeds: no spread nor interval is reported (two seeds say little about a third)


def paired_bootstrap(d, n_boot=10000, confidence=0.95, seed=0):
    """Percentile bootstrap interval (low, high) of mean(d), resampling the pairs (subjects)."""
    d = np.asarray(d, dtype=float)  # one or more subjects (compare refuses runs sharing none)
    if np.all(d == d[0]):  # one subject, or all the same: scipy needs two values to resample
        return float(d[0]), float(d[0])
    result = scipy_stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                   method="percentile", rng=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_flip_pvalue(d, n_perm=100_000, seed=0):
    """(p, exact) of a two-sided sign-flip test of mean(d) = 0: exact up to EXACT_MAX subjects, else n_perm flips."""
    exact = len(d) <= EXACT_MAX
    result = scipy_stats.permutation_test((np.asarray(d, dtype=float),), np.mean, permutation_type="samples",
                                          n_resamples=np.inf if exact else n_perm, rng=seed)
    return float(result.pvalue), exact


def wilcoxon_pvalue(d):
    """Wilcoxon signed-rank two-sided p-value, a cross-check; NaN when every d is 0."""
    d = np.asarray(d, dtype=float)
    return float(scipy_stats.wilcoxon(d, zero_method="wilcox").pvalue) if np.any(d) else float("nan")


def uf1_uar_from_counts(confusions):
    """UF1 and UAR of confusion counts (..., C, C), rows true: htnet.metrics.uf1_uar vectorised (absent classes out)."""
    c = np.asarray(confusions, dtype=float)
    tp, positives, predicted = np.diagonal(c, axis1=-2, axis2=-1), c.sum(axis=-1), c.sum(axis=-2)
    present = positives > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(present, 2 * tp / (positives + predicted), 0.0).sum(axis=-1) / present.sum(axis=-1)
        return f1, np.where(present, tp / positives, 0.0).sum(axis=-1) / present.sum(axis=-1)


def _percentile_interval(values, confidence):
    values, alpha = values[np.isfinite(values)], (1 - confidence) / 2
    return tuple(float(q) for q in np.quantile(values, [alpha, 1 - alpha])) if len(values) else (np.nan, np.nan)


def cluster_bootstrap_uf1_uar(conf_a, conf_b, n_boot=10000, confidence=0.95, seed=0):
    """{'uf1': (low, high), 'uar': (low, high)}: subject-bootstrap intervals of pooled A - B from (S, C, C) counts,
    the same subjects drawn for both. Not scipy.stats.bootstrap: every replicate at once, as weights @ counts."""
    s = len(conf_a)
    weights = np.random.default_rng(seed).multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(float)
    a, b = (uf1_uar_from_counts(np.einsum("bs,sij->bij", weights, conf)) for conf in (conf_a, conf_b))
    return {name: _percentile_interval(a[i] - b[i], confidence) for i, name in enumerate(("uf1", "uar"))}


def seed_subject_bootstrap(predictions, n_boot=10000, confidence=0.95, seed=0):
    """{'{protocol}_{dataset}_{uf1|uar}': (low, high)} ('full' and each dataset): percentile intervals of the seeds'
    mean pooled UF1/UAR from K seeds' long predictions. Each replicate draws subjects within each source dataset
    (the composite's make-up is fixed by design) and, independently, K seeds; the same draws serve every protocol."""
    frame = predictions.assign(subject=predictions["subject"].astype(str))
    subjects = frame.drop_duplicates("subject").sort_values(["dataset", "subject"])[["subject", "dataset"]]
    seeds = sorted(frame["seed"].unique())
    rng = np.random.default_rng(seed)
    strata = {d: np.flatnonzero(subjects["dataset"].to_numpy() == d) for d in subjects["dataset"].unique()}
    subject_weights = np.zeros((n_boot, len(subjects)))
    for columns in strata.values():
        subject_weights[:, columns] = rng.multinomial(len(columns), np.full(len(columns), 1 / len(columns)), n_boot)
    seed_weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), n_boot) / len(seeds)
    subject_index, seed_index = ({s: i for i, s in enumerate(values)} for values in (subjects["subject"], seeds))
    out = {}
    for protocol, part in frame.groupby("protocol", sort=False):
        counts = np.zeros((len(subjects), len(seeds), NUM_CLASSES, NUM_CLASSES))  # per subject and seed
        np.add.at(counts, tuple(column.to_numpy() for column in (
            part["subject"].map(subject_index), part["seed"].map(seed_index), part["label"], part["prediction"])), 1)
        for dataset, columns in {"full": np.arange(len(subjects)), **strata}.items():
            flat = counts[columns].reshape(len(columns), -1)
            pooled = (subject_weights[:, columns] @ flat).reshape(n_boot, len(seeds), NUM_CLASSES, NUM_CLASSES)
            for name, values in zip(("uf1", "uar"), uf1_uar_from_counts(pooled)):  # a seed drawn twice counts twice
                out[f"{protocol}_{dataset}_{name}"] = _percentile_interval((seed_weights * values).sum(1), confidence)
    return out
