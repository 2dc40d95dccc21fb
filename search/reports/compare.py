"""Paired comparison of two configurations over the same subjects.

    python -m search compare RUN_A RUN_B [--protocol inner] [--dataset full]

RUN_A/RUN_B: MLflow run ids (a trial, a rerun seed, a rerun parent: its predictions of every
seed, a nested parent) or local paths (a predictions.csv or a folder holding one, as
`python -m htnet train --out` writes). Both runs are restricted to one protocol each and to the
samples they share (same subjects, same samples).

Statistic: per subject (= per LOSO fold), the correct rate of each run on that subject's shared
samples (over all seeds for a rerun parent); d_s = rate_A - rate_B. Reported:
- the mean of d over subjects (each subject weighs the same), with a paired bootstrap 95%
  percentile interval (subjects resampled with replacement, 10,000 replicates);
- p-value: two-sided paired sign-flip permutation test of mean(d) = 0 (exact over all 2^n sign
  vectors up to 16 subjects, else 100,000 random sign vectors); the Wilcoxon signed-rank p-value
  (scipy) is printed as a cross-check;
- pooled UF1/UAR of both runs on the shared samples, and a subject-level (cluster) bootstrap
  interval of their differences (the same resampled subjects for both runs).
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from htnet.errors import UserError
from htnet.metrics import NUM_CLASSES, confusion, uf1_uar
from search import tracking
from search.reports.stats import (cluster_bootstrap_uf1_uar, paired_bootstrap, sign_flip_pvalue,
                          wilcoxon_pvalue)

REQUIRED = ("sample", "subject", "dataset", "label", "protocol", "prediction")


def _check(frame, where):
    missing = [c for c in REQUIRED if c not in frame]
    if missing:
        raise UserError(f"{where}: predictions have no column {missing[0]!r}")
    return frame


def load_predictions(ref, store=None):
    """(predictions DataFrame, label) of a local path or an MLflow run id."""
    path = Path(ref)
    if path.exists():
        file = path / "predictions.csv" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{path}: no predictions.csv there")
        return _check(pd.read_csv(file), str(file)), str(path)
    if store is None:
        raise UserError(f"{ref}: no such file, and no MLflow store to look the run up in")
    from search.reports.leaderboard import read_csv_artifact

    try:
        run = tracking.retry(store.client.get_run, ref)
    except Exception:  # noqa: BLE001 - MLflow's not-found error
        raise UserError(f"{ref!r} is neither a file nor an MLflow run at {store.tracking_uri}") from None
    tags = run.data.tags
    label = tags.get("htnet.method") or tags.get("mlflow.runName") or ref[:8]
    names = {a.path for a in tracking.retry(store.client.list_artifacts, ref)}
    if "predictions.csv" in names:
        return _check(read_csv_artifact(store, ref, "predictions.csv"), f"run {ref}"), label
    frames = []  # a parent without its own predictions: its children's, one seed each
    for child in tracking.child_runs(store.client, store.experiment_id, ref):
        child_names = {a.path for a in tracking.retry(store.client.list_artifacts, child.info.run_id)}
        if "predictions.csv" in child_names:
            frame = read_csv_artifact(store, child.info.run_id, "predictions.csv")
            frames.append(frame.assign(seed=child.data.tags.get("htnet.seed", child.info.run_id)))
    if not frames:
        raise UserError(f"run {ref} has no predictions.csv artifact (nor do its child runs)")
    return _check(pd.concat(frames, ignore_index=True), f"run {ref}"), label


def _restrict(frame, protocol, dataset, where):
    protocols = sorted(frame["protocol"].unique())
    if protocol not in protocols:
        raise UserError(f"{where}: no {protocol!r} predictions (it has {', '.join(protocols)})")
    part = frame[frame["protocol"] == protocol]
    if dataset != "full":
        part = part[part["dataset"] == dataset]
        if not len(part):
            raise UserError(f"{where}: no {dataset!r} samples")
    return part.assign(correct=(part["label"] == part["prediction"]).astype(float))


def per_subject_confusions(part, subjects):
    """(S, 3, 3) confusion counts, one per subject in `subjects` order."""
    if not len(subjects):
        return np.zeros((0, NUM_CLASSES, NUM_CLASSES))
    groups = dict(tuple(part.groupby("subject")))
    return np.stack([confusion(groups[s]["label"], groups[s]["prediction"]) for s in subjects])


def compare(a, b, protocol="inner", protocol_b=None, dataset="full", n_boot=10_000, seed=0,
            labels=("A", "B")):
    """Compare two predictions tables (see the module docstring); returns a dict."""
    protocol_b = protocol_b or protocol
    pa = _restrict(a, protocol, dataset, labels[0])
    pb = _restrict(b, protocol_b, dataset, labels[1])
    common = sorted(set(pa["sample"]) & set(pb["sample"]))
    if not common:
        raise UserError(f"{labels[0]} and {labels[1]} share no samples: not runs on the same data")
    pa, pb = pa[pa["sample"].isin(common)], pb[pb["sample"].isin(common)]
    dropped = (len(set(a["sample"])) - len(common), len(set(b["sample"])) - len(common))
    rate_a = pa.groupby("subject")["correct"].mean()
    rate_b = pb.groupby("subject")["correct"].mean()
    subjects = sorted(set(rate_a.index) & set(rate_b.index))
    dataset_of = pa.drop_duplicates("subject").set_index("subject")["dataset"]
    samples = pa.drop_duplicates(["subject", "sample"]).groupby("subject").size()
    table = pd.DataFrame({"subject": subjects, "dataset": [dataset_of[s] for s in subjects],
                          "samples": [int(samples[s]) for s in subjects],
                          "rate_a": [rate_a[s] for s in subjects], "rate_b": [rate_b[s] for s in subjects]})
    table["diff"] = table["rate_a"] - table["rate_b"]
    d = table["diff"].to_numpy()
    low, high = paired_bootstrap(d, n_boot=n_boot, seed=seed)
    p, exact = sign_flip_pvalue(d, seed=seed)
    uf1_a, uar_a = uf1_uar(pa["label"], pa["prediction"])
    uf1_b, uar_b = uf1_uar(pb["label"], pb["prediction"])
    intervals = cluster_bootstrap_uf1_uar(per_subject_confusions(pa, subjects), per_subject_confusions(pb, subjects),
                                          n_boot=n_boot, seed=seed)
    return {"labels": list(labels), "protocol_a": protocol, "protocol_b": protocol_b, "dataset": dataset,
            "subjects": len(subjects), "samples": len(common), "samples_dropped": list(dropped),
            "seeds_a": int(a["seed"].nunique()) if "seed" in a else 1,
            "seeds_b": int(b["seed"].nunique()) if "seed" in b else 1,
            "mean_rate_a": float(table["rate_a"].mean()), "mean_rate_b": float(table["rate_b"].mean()),
            "mean_diff": float(d.mean()) if len(d) else float("nan"), "ci95": [low, high],
            "p_sign_flip": p, "p_exact": exact, "p_wilcoxon": wilcoxon_pvalue(d),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
            "uf1_a": uf1_a, "uf1_b": uf1_b, "uf1_diff": uf1_a - uf1_b, "uf1_diff_ci95": list(intervals["uf1"]),
            "uar_a": uar_a, "uar_b": uar_b, "uar_diff": uar_a - uar_b, "uar_diff_ci95": list(intervals["uar"]),
            "n_boot": n_boot, "per_subject": table}


def print_comparison(result, out=None):
    out = out or sys.stdout
    a, b = result["labels"]
    pa, pb = result["protocol_a"], result["protocol_b"]
    print(f"A = {a} ({pa}, {result['seeds_a']} seed(s)); B = {b} ({pb}, {result['seeds_b']} seed(s))", file=out)
    print(f"{result['subjects']} subjects, {result['samples']} shared samples ({result['dataset']})"
          + (f"; left out as not shared: {result['samples_dropped'][0]} of A's, {result['samples_dropped'][1]} of B's"
             if any(result["samples_dropped"]) else ""), file=out)
    low, high = result["ci95"]
    print(f"per-subject accuracy: A {result['mean_rate_a']:.4f}, B {result['mean_rate_b']:.4f}; "
          f"mean difference A-B {result['mean_diff']:+.4f}, 95% paired bootstrap interval "
          f"[{low:+.4f}, {high:+.4f}]", file=out)
    kind = "exact" if result["p_exact"] else "Monte Carlo"
    print(f"p = {result['p_sign_flip']:.4g} (two-sided paired sign-flip permutation test, {kind}); "
          f"Wilcoxon signed-rank p = {result['p_wilcoxon']:.4g}; A better on {result['wins']}, "
          f"worse on {result['losses']}, tied on {result['ties']} subjects", file=out)
    for m in ("uf1", "uar"):
        lo, hi = result[f"{m}_diff_ci95"]
        print(f"pooled {m.upper()}: A {result[f'{m}_a']:.4f}, B {result[f'{m}_b']:.4f}, A-B "
              f"{result[f'{m}_diff']:+.4f}, 95% subject-bootstrap interval [{lo:+.4f}, {hi:+.4f}]", file=out)
    if "paper" in (pa, pb):
        print("note: the paper protocol picks each subject's epoch by its test accuracy (leaks)", file=out)


def write_outputs(result, csv=None, json_path=None):
    from htnet.io import atomic_write

    if csv:
        with atomic_write(csv) as f:
            result["per_subject"].to_csv(f, index=False)
    if json_path:
        with atomic_write(json_path) as f:
            json.dump({k: v for k, v in result.items() if k != "per_subject"}, f, indent=2)
