"""The statistics of the reports: bootstrap intervals over seeds and subjects, and paired subject-level
comparisons."""
import numpy as np
from scipy import stats as scipy_stats

EXACT_MAX = 16  # the sign-flip test enumerates all 2^n sign vectors up to this many subjects
MIN_SEEDS = 3  # fewer seeds: no spread nor interval is reported (two seeds say little about a third)


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


def seed_subject_bootstrap(predictions, n_boot=10000, confidence=0.95, seed=0):
    """{'{protocol}_{dataset}_{uf1|uar}': (low, high)} (dataset 'full' and each source dataset): percentile
    intervals of the seeds' mean pooled UF1/UAR, from the long predictions of K seeds (columns seed, subject,
    dataset, label, prediction, protocol). Each replicate draws subjects with replacement within each source
    dataset (the composite's make-up is fixed by design) and, independently, K seeds with replacement; the
    same draws serve every protocol and dataset. Its values are UF1/UARs, so the interval stays in [0, 1]."""
    from htnet.metrics import NUM_CLASSES

    frame = predictions.assign(subject=predictions["subject"].astype(str))
    subjects = frame.drop_duplicates("subject").sort_values(["dataset", "subject"])[["subject", "dataset"]]
    seeds = sorted(frame["seed"].unique())
    rng = np.random.default_rng(seed)
    strata = {d: np.flatnonzero(subjects["dataset"].to_numpy() == d) for d in subjects["dataset"].unique()}
    subject_weights = np.zeros((n_boot, len(subjects)))
    for columns in strata.values():
        subject_weights[:, columns] = rng.multinomial(len(columns), np.full(len(columns), 1 / len(columns)), n_boot)
    seed_weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), n_boot) / len(seeds)
    subject_index = {s: i for i, s in enumerate(subjects["subject"])}
    seed_index = {s: i for i, s in enumerate(seeds)}
    alpha, out = (1 - confidence) / 2, {}
    for protocol, part in frame.groupby("protocol", sort=False):
        counts = np.zeros((len(subjects), len(seeds), NUM_CLASSES, NUM_CLASSES))  # per subject and seed
        np.add.at(counts, tuple(column.to_numpy() for column in (
            part["subject"].map(subject_index), part["seed"].map(seed_index), part["label"], part["prediction"])), 1)
        for dataset, columns in {"full": np.arange(len(subjects)), **strata}.items():
            flat = counts[columns].reshape(len(columns), -1)
            pooled = (subject_weights[:, columns] @ flat).reshape(n_boot, len(seeds), NUM_CLASSES, NUM_CLASSES)
            for name, values in zip(("uf1", "uar"), uf1_uar_from_counts(pooled)):
                means = (seed_weights * values).sum(axis=1)  # a seed drawn twice counts twice
                means = means[np.isfinite(means)]
                out[f"{protocol}_{dataset}_{name}"] = tuple(float(q) for q in np.quantile(means, [alpha, 1 - alpha])) \
                    if len(means) else (np.nan, np.nan)
    return out
