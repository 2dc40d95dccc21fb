"""`python -m search compare RUN_A RUN_B`: paired per-subject comparison of two runs on their shared samples."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from htnet.errors import UserError
from htnet.io import write_files
from htnet.metrics import confusion, uf1_uar
from search.reports.export import plural
from search.reports.leaderboard import get_run, read_artifact_bytes
from search.reports.stats import cluster_bootstrap_uf1_uar, paired_bootstrap, sign_flip_pvalue, wilcoxon_pvalue

REQUIRED = ("sample", "subject", "dataset", "label", "protocol", "prediction")


def load_predictions(ref, store=None):
    """(predictions, label) of a predictions.csv, a folder holding one, or an MLflow run id (a rerun parent's
    have a `seed` column)."""
    path = Path(ref)
    if path.exists():
        file = path / "predictions.csv" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{path}: no predictions.csv there")
        frame, label, where = pd.read_csv(file), str(path), str(file)
    elif store is None:
        raise UserError(f"{ref}: no such file, and no MLflow store to look the run up in")
    else:
        tags = get_run(store, ref, f"{ref!r} is neither a file nor an MLflow run at {store.tracking_uri}").data.tags
        label, where = tags.get("htnet.method") or tags.get("mlflow.runName") or ref[:8], f"run {ref}"
        if (text := read_artifact_bytes(store, ref, "predictions.csv", optional=True)) is None:
            raise UserError(f"run {ref} has no predictions.csv artifact")
        frame = pd.read_csv(io.BytesIO(text))
    if missing := [c for c in REQUIRED if c not in frame]:
        raise UserError(f"{where}: predictions have no column {missing[0]!r}")
    return frame, label


def _restrict(frame, protocol, dataset, where):
    if protocol not in (protocols := sorted(frame["protocol"].unique())):
        raise UserError(f"{where}: no {protocol!r} predictions (it has {', '.join(protocols)})")
    part = frame[(frame["protocol"] == protocol) & ((frame["dataset"] == dataset) | (dataset == "full"))]
    if not len(part):
        raise UserError(f"{where}: no {dataset!r} samples")
    return part.assign(correct=(part["label"] == part["prediction"]).astype(float))


def per_subject_confusions(part, subjects):
    """(S, 3, 3) confusion counts, one per subject in `subjects` order."""
    groups = dict(tuple(part.groupby("subject")))
    return np.array([confusion(groups[s]["label"], groups[s]["prediction"]) for s in subjects])


def compare(a, b, protocol="inner", protocol_b=None, dataset="full", n_boot=10_000, seed=0, labels=("A", "B")):
    """Per subject, the correct rate of each run on the shared samples (over every seed) and d = A - B:
    mean(d) with a paired bootstrap interval, sign-flip and Wilcoxon p-values, and pooled UF1/UAR with
    subject-bootstrap intervals of their differences. Returns a dict (per_subject: the table)."""
    protocol_b = protocol_b or protocol
    pa, pb = _restrict(a, protocol, dataset, labels[0]), _restrict(b, protocol_b, dataset, labels[1])
    common = sorted(set(pa["sample"]) & set(pb["sample"]))
    if not common:
        raise UserError(f"{labels[0]} and {labels[1]} share no samples: not runs on the same data")
    pa, pb = pa[pa["sample"].isin(common)], pb[pb["sample"].isin(common)]
    table = (pa.groupby("subject").agg(dataset=("dataset", "first"), samples=("sample", "nunique"),
                                       rate_a=("correct", "mean"))
             .join(pb.groupby("subject")["correct"].mean().rename("rate_b"), how="inner").reset_index())
    subjects = table["subject"].tolist()
    table["diff"] = table["rate_a"] - table["rate_b"]
    d = table["diff"].to_numpy()
    p, exact = sign_flip_pvalue(d, seed=seed)
    pooled = dict(zip(("uf1", "uar"), zip(*(uf1_uar(part["label"], part["prediction"]) for part in (pa, pb)))))
    intervals = cluster_bootstrap_uf1_uar(per_subject_confusions(pa, subjects), per_subject_confusions(pb, subjects),
                                          n_boot=n_boot, seed=seed)
    return {"labels": list(labels), "protocol_a": protocol, "protocol_b": protocol_b, "dataset": dataset,
            "subjects": len(subjects), "samples": len(common),
            "samples_dropped": [len(set(a["sample"])) - len(common), len(set(b["sample"])) - len(common)],
            **{f"seeds_{k}": int(f["seed"].nunique()) if "seed" in f else 1 for k, f in (("a", a), ("b", b))},
            "mean_rate_a": float(table["rate_a"].mean()), "mean_rate_b": float(table["rate_b"].mean()),
            "mean_diff": float(d.mean()),
            "ci95": list(paired_bootstrap(d, n_boot=n_boot, seed=seed)),
            "p_sign_flip": p, "p_exact": exact, "p_wilcoxon": wilcoxon_pvalue(d),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
            **{f"{m}_{k}": v for m, (x, y) in pooled.items()
               for k, v in {"a": x, "b": y, "diff": x - y, "diff_ci95": list(intervals[m])}.items()},
            "n_boot": n_boot, "per_subject": table}


def print_comparison(result, out=None):
    r, (a, b), dropped = result, result["labels"], result["samples_dropped"]
    (low, high), paper = r["ci95"], "paper" in (r["protocol_a"], r["protocol_b"])
    lines = [f"A = {a} ({r['protocol_a']}, {plural(r['seeds_a'], 'seed')}); "
             f"B = {b} ({r['protocol_b']}, {plural(r['seeds_b'], 'seed')})",
             f"{r['subjects']} subjects, {r['samples']} shared samples ({r['dataset']})"
             + (f"; left out as not shared: {dropped[0]} of A's, {dropped[1]} of B's" if any(dropped) else ""),
             f"per-subject accuracy: A {r['mean_rate_a']:.4f}, B {r['mean_rate_b']:.4f}; mean difference A-B "
             f"{r['mean_diff']:+.4f}, 95% paired bootstrap interval [{low:+.4f}, {high:+.4f}]",
             f"p = {r['p_sign_flip']:.4g} (two-sided paired sign-flip permutation test, "
             f"{'exact' if r['p_exact'] else 'Monte Carlo'}); Wilcoxon signed-rank p = {r['p_wilcoxon']:.4g}; "
             f"A better on {r['wins']}, worse on {r['losses']}, tied on {r['ties']} subjects",
             *(f"pooled {m.upper()}: A {r[f'{m}_a']:.4f}, B {r[f'{m}_b']:.4f}, A-B {r[f'{m}_diff']:+.4f}, 95% "
               f"subject-bootstrap interval [{r[f'{m}_diff_ci95'][0]:+.4f}, {r[f'{m}_diff_ci95'][1]:+.4f}]"
               for m in ("uf1", "uar")),
             *(["note: the paper protocol picks each subject's epoch by its test accuracy (leaks)"] if paper else [])]
    print("\n".join(lines), file=out or sys.stdout)


def write_outputs(result, csv=None, json_path=None):
    texts = {csv: lambda: result["per_subject"].to_csv(index=False),
             json_path: lambda: json.dumps({k: v for k, v in result.items() if k != "per_subject"}, indent=2)}
    write_files({path: text() for path, text in texts.items() if path})
