"""Nested LOSO, an unbiased estimate of "search + model": for every outer subject (a Ray task each) the whole
search runs on the other subjects, its best configuration is trained on them and scored on that subject."""
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass

import optuna
import pandas as pd
import ray
import torch

from htnet.engine import run_fold
from htnet.errors import UserError, first_line
from htnet.folds import make_folds
from htnet.loso import LosoConfig, model_inputs, parse_subjects, resolve_device, select_subjects
from htnet.metrics import compute_metrics, summary_table
from search import tracking
from search.bridge import run_trial
from search.driver.ray_setup import ray_session
from search.driver.runner import Options, resolve_space
from search.driver.stores import data_source, load_data
from search.reports.export import format_numbers, markdown_table
from search.reports.leaderboard import model_label, open_store
from search.reports.rerun import data_tags, log_frame
from search.space import check, flatten


@dataclass
class NestedOptions(Options):
    """A search's options (`subjects` restricts the data first) and nested LOSO's own."""
    method: str | None = None
    outer_subjects: str | None = None    # outer folds to run (a count or ids; default: all)
    cpus_per_fold: float = 1.0
    gpus_per_fold: float = 0.0


def fit_and_score(config, data, outer):
    """Train `config` on every subject but `outer` and score `outer` (one LOSO fold); (predictions, outcome)."""
    config = LosoConfig.from_dict({**config, "subjects": None, "save_weights": False})
    device = resolve_device(config.device)
    X = torch.tensor(model_inputs(data, config), device=device)  # a copy: Ray's arrays are read-only
    fold = next(f for f in make_folds(data, config) if f.subject == outer)
    outcome = run_fold(fold, X, torch.tensor(data.labels, device=device), data, config, device)
    test = outcome.test
    predictions = pd.concat([pd.DataFrame({"sample": data.samples[test], "subject": outer,
                                           "dataset": data.datasets[test], "label": data.labels[test],
                                           "protocol": protocol, "prediction": predicted, "epoch": epoch})
                             for protocol, (epoch, predicted) in outcome.chosen.items()], ignore_index=True)
    return predictions, outcome


def outer_fold(space, data, outer, threads=1):
    """One outer fold (a Ray task): the search, trial after trial, on the other subjects, then its best
    configuration trained on them and scored on `outer`."""
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    study = optuna.create_study(direction="maximize", sampler=space.make_sampler(),
                                pruner=space.make_pruner(), study_name=f"nested-{outer}")
    overrides = {"subjects": [s for s in data.subject_ids if s != outer], "save_weights": False}
    rows, configs = [], {}  # Optuna trial number -> the LOSO config of a finished trial
    for _ in range(space.num_samples):
        trial_started = time.perf_counter()
        run = run_trial(study, space, data, overrides)
        result = run.result
        if run.status == "finished":
            configs[run.trial.number] = run.config.to_dict()
        rows.append({"outer_subject": outer, "trial": run.trial.number, **run.sampled, "status": run.status,
                     **({"error": first_line(run.error)} if run.error is not None else {}),
                     **({space.metric: result.metrics.get(space.metric, math.nan), "folds_done": result.folds_done,
                         "fold_epochs": result.fold_epochs} if result is not None else {}),
                     "wall_time_s": time.perf_counter() - trial_started})
    out = {"outer_subject": outer, "trials": rows, "search_fold_epochs": sum(r.get("fold_epochs") or 0 for r in rows)}
    if configs:
        best = study.best_trial
        predictions, outcome = fit_and_score(configs[best.number], data, outer)
        out.update(best_trial=best.number, best_value=best.value, config=configs[best.number],
                   predictions=predictions, final_fold_epochs=int(outcome.fold_epochs))
    else:
        out["error"] = "no inner trial finished"
    return {**out, "wall_time_s": time.perf_counter() - started}


def cost_estimate(space, draws, n_subjects, n_outer):
    """Upper bounds of the nested run's fold-epochs and a plain search's (the largest `epochs` drawn, twice where
    the inner protocol trains a second model, no pruning), and the line that says them."""
    per_fold = max(c.epochs * (2 if "inner" in c.protocols else 1) for _, c in draws)
    trials = space.num_samples
    folds = n_outer * trials * (n_subjects - 1)
    total, plain = (folds + n_outer) * per_fold, trials * n_subjects * per_fold
    text = (f"{n_outer} outer folds x {trials} trials = {n_outer * trials} inner LOSO runs over {n_subjects - 1} "
            f"subjects (<= {folds} folds) + {n_outer} final fits: <= {total:,} fold-epochs, "
            f"{total / max(1, plain):.1f}x a plain search of {trials} trials on {n_subjects} subjects (<= {plain:,})")
    return {"outer_folds": n_outer, "trials_per_fold": trials, "inner_loso_runs": n_outer * trials,
            "inner_folds": folds, "fold_epochs": total, "plain_search_fold_epochs": plain}, text


def run_nested(options, out=None):
    """Run nested LOSO; a dict: parent_run_id, metrics (pooled), folds, trials, predictions, cost, method."""
    out = out or sys.stdout
    space = resolve_space(options)
    draws = check(space)
    data, data_root = load_data(data_source(options, space, options.storage))
    data = select_subjects(data, parse_subjects(options.subjects))
    outer = parse_subjects(options.outer_subjects)
    outer = data.subject_ids if outer is None else data.pick_subjects(outer) if isinstance(outer, int) else outer
    if unknown := [s for s in outer if s not in data.subject_ids]:
        raise UserError(f"--outer-subjects: subject {unknown[0]!r} is not in the data")
    n_subjects = len(data.subject_ids)
    if n_subjects < 4:
        raise UserError(f"nested LOSO needs at least 4 subjects, the data have {n_subjects}")
    name = options.name or f"nested-{time.strftime('%Y%m%d-%H%M%S')}"
    models = dict.fromkeys(config.model for _, config in draws)
    method = options.method or f"Search + {'/'.join(map(model_label, models))} (nested LOSO)"
    estimate, cost_text = cost_estimate(space, draws, n_subjects, len(outer))
    print(f"nested LOSO {name!r} ({method}) with space {space.source}, objective {space.metric}\nCOST: {cost_text}\n"
          f"data: {data_root} ({len(data)} samples, {n_subjects} subjects); outer folds in parallel on Ray, "
          f"{options.cpus_per_fold:g} CPU / {options.gpus_per_fold:g} GPU each", file=out)

    store = open_store(options.tracking_uri, options.experiment, create=True)
    client = store.client
    parent_id = tracking.start_parent_run(client, store.experiment_id, name, space, space.metric, extra_params={
        "data": data_root, "subjects": n_subjects, "outer_subjects": ",".join(outer), "sets": list(options.sets),
        "cpus_per_fold": options.cpus_per_fold, "gpus_per_fold": options.gpus_per_fold,
        "epochs": "searched" if any("epochs" in sampled for sampled, _ in draws) else draws[0][1].epochs}, tags={
        "htnet.role": "nested", "htnet.method": method, "htnet.cost": cost_text,
        **tracking.provenance_tags(tracking.provenance(data)), **data_tags(data.restrict(outer))})  # pooled: outer
    tracking.log_metrics(client, parent_id, {f"estimate_{k}": v for k, v in estimate.items()})

    started, results = time.time(), []
    with ray_session(options.address, options.num_cpus):
        task = ray.remote(outer_fold).options(num_cpus=options.cpus_per_fold, num_gpus=options.gpus_per_fold,
                                              max_retries=1)
        space_ref, data_ref, threads = ray.put(space), ray.put(data), max(1, math.floor(options.cpus_per_fold))
        pending = {task.remote(space_ref, data_ref, s, threads): s for s in outer}
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                subject = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker died: the fold fails, the others go on
                    lines = [line for line in str(e).splitlines() if line.strip()]
                    result = {"outer_subject": subject, "trials": [], "search_fold_epochs": 0,
                              "error": (lines[-1] if lines else type(e).__name__)[:2000]}
                results.append({**result, "run_id": log_outer(store, parent_id, name, space, result, out)})
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            tracking.retry(client.set_terminated, parent_id, "KILLED")
            raise
    return finish_nested(client, parent_id, name, method, space, results, estimate, started, out)


def log_outer(store, parent_id, name, space, result, out):
    """An outer fold's child run: its inner trials, and its best config and predictions or its error."""
    client, subject, failed = store.client, result["outer_subject"], "error" in result
    tags = {"mlflow.parentRunId": parent_id, "htnet.role": "outer_fold", "htnet.outer_subject": subject,
            "htnet.search": name, "htnet.status": "failed" if failed else "finished"}
    run_id = tracking.retry(client.create_run, store.experiment_id, tags=tags,
                            run_name=f"{name} outer {subject}").info.run_id
    statuses = Counter(t["status"] for t in result["trials"])
    metrics = {**{f"trials_{s}": statuses[s] for s in ("finished", "pruned", "failed")},
               "search_fold_epochs": result["search_fold_epochs"], "wall_time_s": result.get("wall_time_s")}
    if result["trials"]:
        log_frame(client, run_id, pd.DataFrame(result["trials"]), "inner_trials.csv")
    if failed:
        tracking.set_tags(client, run_id, {"htnet.error": result["error"]})
        print(f"  outer {subject}: failed ({result['error']})", file=out)
    else:
        predictions = result["predictions"]
        correct = (predictions["label"] == predictions["prediction"]).groupby(predictions["protocol"]).mean()
        metrics.update({**correct.add_suffix("_outer_accuracy"), f"best_{space.metric}": result["best_value"],
                        "final_fold_epochs": result["final_fold_epochs"]})
        tracking.log_params(client, run_id, flatten(result["config"]))
        tracking.retry(client.log_dict, run_id, result["config"], "config.yaml")
        log_frame(client, run_id, predictions, "predictions.csv")
        acc = metrics.get("inner_outer_accuracy", metrics.get("final_outer_accuracy", math.nan))
        print(f"  outer {subject}: best of {len(result['trials'])} trials {space.metric} {result['best_value']:.4f}, "
              f"outer accuracy {acc:.3f} ({result['wall_time_s']:.1f} s)", file=out)
    tracking.log_metrics(client, run_id, metrics)
    tracking.retry(client.set_terminated, run_id, "FAILED" if failed else "FINISHED")
    return run_id


def finish_nested(client, parent_id, name, method, space, results, estimate, started, out):
    """The parent run's pooled metrics, cost, tables and summary; what the console shows at the end."""
    ok = [r for r in results if "error" not in r]
    trials = pd.DataFrame([row for r in results for row in r["trials"]])  # its columns name the sampled keys
    folds = pd.DataFrame([{"outer_subject": r["outer_subject"], "status": "failed" if "error" in r else "finished",
                           "best_trial": r.get("best_trial"), f"best_{space.metric}": r.get("best_value"),
                           "search_fold_epochs": r["search_fold_epochs"],
                           "final_fold_epochs": r.get("final_fold_epochs", 0),
                           "wall_time_s": r.get("wall_time_s"), "run_id": r.get("run_id"),
                           **{f"config.{k}": v for k, v in flatten(r.get("config") or {}).items()
                              if k in trials or k == "model"}}
                          for r in results]).sort_values("outer_subject").reset_index(drop=True)
    counts = Counter(trials.get("status", []))
    fold_epochs, wall = int(folds["search_fold_epochs"].sum() + folds["final_fold_epochs"].sum()), time.time() - started
    cost = {"nested_outer_folds": len(ok), "nested_trials": len(trials),
            "nested_trials_pruned": counts["pruned"], "nested_trials_failed": counts["failed"],
            "nested_fold_epochs": fold_epochs, "nested_wall_time_s": wall,
            "nested_task_time_s": float(folds["wall_time_s"].fillna(0).sum())}
    predictions = pd.concat([r["predictions"] for r in ok], ignore_index=True) if ok else pd.DataFrame()
    metrics = compute_metrics(predictions) if ok else {}
    tracking.log_metrics(client, parent_id, {**metrics, **cost, "fold_epochs": fold_epochs, "wall_time_s": wall})
    cost_line = (f"{len(trials)} inner trials ({counts['pruned']} pruned, {counts['failed']} failed) "
                 f"in {len(results)} outer folds, {fold_epochs:,} fold-epochs (bound {estimate['fold_epochs']:,}), "
                 f"wall {wall:.1f} s, task time {cost['nested_task_time_s']:.1f} s")
    tracking.set_tags(client, parent_id, {"htnet.cost_actual": cost_line})
    for frame, artifact in ((folds, "outer_folds.csv"), (trials, "inner_trials.csv"), (predictions, "predictions.csv")):
        if len(frame):
            log_frame(client, parent_id, frame, artifact)
    table = summary_table(metrics) if metrics else None
    text = [f"# {method}: nested LOSO {name}", "", f"Cost: {cost_line}.", "",
            f"Pooled over {len(ok)} outer subjects; `inner` is the unbiased estimate, `paper` picks each "
            f"outer subject's epoch by its test accuracy (leaks).", ""]
    log_frame(client, parent_id, "\n".join(text + ([] if table is None else [
        markdown_table(format_numbers(table.reset_index(names="protocol")))])), "summary.md")
    tracking.retry(client.set_terminated, parent_id, "FINISHED" if ok else "FAILED")

    print(f"\n{method} ({len(ok)} of {len(results)} outer folds):", file=out)
    if table is not None:
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.to_string(float_format=lambda v: f"{v:.4f}"), file=out)
    print(f"COST: {cost_line}", file=out)
    print(f"MLflow: nested parent run {parent_id} (tag htnet.method={method!r})", file=out)
    return {"parent_run_id": parent_id, "metrics": metrics, "folds": folds, "trials": trials,
            "predictions": predictions, "cost": cost, "method": method}
