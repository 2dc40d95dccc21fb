"""Nested LOSO, an unbiased estimate of "search + model": for every outer subject (a Ray task each) the whole
search runs on the other subjects, its best configuration is trained on them and scored on that subject."""
import math
import sys
import time
from dataclasses import dataclass, field

import pandas as pd

from htnet.errors import UserError, first_line
from htnet.metrics import PROTOCOLS, compute_metrics, summary_table
from search import tracking
from search.bridge import run_trial
from search.reports.export import format_numbers, markdown_table
from search.reports.leaderboard import open_store
from search.reports.rerun import log_frame, model_label
from search.space import flatten

@dataclass
class NestedOptions:
    space: str
    name: str | None = None
    method: str | None = None
    data: str | None = None
    storage: str = "runs"
    subjects: str | None = None          # restrict the data first (a count or ids)
    outer_subjects: str | None = None    # outer folds to run (a count or ids; default: all)
    num_samples: int | None = None
    objective: str | None = None
    sampler: str | None = None
    seed: int | None = None
    pruner: str | None = None
    sets: list = field(default_factory=list)
    tracking_uri: str | None = None
    experiment: str = "htnet"
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_fold: float = 1.0
    gpus_per_fold: float = 0.0


def fit_and_score(config, data, outer):
    """Train `config` on every subject of `data` but `outer` and score `outer`: one LOSO fold
    (with its inner run when the config has the inner protocol). Returns (predictions, outcome)."""
    import torch

    from htnet.folds import make_folds
    from htnet.loso import LosoConfig, model_inputs, resolve_device
    from htnet.engine import run_fold

    config = LosoConfig.from_dict({**config, "subjects": None, "save_weights": False})
    device = resolve_device(config.device)
    X = torch.tensor(model_inputs(data, config), device=device)  # a copy: Ray's arrays are read-only
    y = torch.tensor(data.labels, device=device)
    fold = next(f for f in make_folds(data, config) if f.subject == outer)
    outcome = run_fold(fold, X, y, data, config, device)
    rows = [pd.DataFrame({"sample": data.samples[outcome.test], "subject": outer,
                          "dataset": data.datasets[outcome.test], "label": data.labels[outcome.test],
                          "protocol": protocol, "prediction": predicted, "epoch": epoch})
            for protocol, (epoch, predicted) in outcome.chosen.items()]
    return pd.concat(rows, ignore_index=True), outcome


def inner_search(space, data, train_subjects, outer=""):
    """The search on `train_subjects` only, trial after trial; returns (rows, configs by trial number, study)."""
    import optuna

    from search.driver.runner import effective_samples

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=space.make_sampler(),
                                pruner=space.make_pruner(), study_name=f"nested-{outer}")
    overrides = {"subjects": list(train_subjects), "save_weights": False}
    rows, configs = [], {}
    for _ in range(effective_samples(space)):
        started = time.perf_counter()
        run = run_trial(study, space, data, overrides)
        row = {"outer_subject": outer, "trial": run.trial.number, **flatten(run.sampled), "status": run.status}
        if run.error is not None:
            row["error"] = first_line(run.error)
        if run.result is not None:
            row.update({space.metric: run.result.metrics.get(space.metric, float("nan")),
                        "folds_done": run.result.folds_done, "fold_epochs": run.result.fold_epochs})
        if run.status == "finished":
            configs[run.trial.number] = run.config.to_dict()
        rows.append({**row, "wall_time_s": time.perf_counter() - started})
    return rows, configs, study


def outer_fold(space, data, outer, threads=1):
    """One outer fold (run as a Ray task): the search on the other subjects, its best
    configuration trained on them and scored on `outer`."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    started = time.perf_counter()
    train = [s for s in data.subject_ids if s != outer]
    rows, configs, study = inner_search(space, data, train, outer)
    search_fold_epochs = int(sum(r.get("fold_epochs", 0) or 0 for r in rows))
    out = {"outer_subject": outer, "trials": rows, "search_fold_epochs": search_fold_epochs}
    if not configs:
        out.update(error="no inner trial finished", wall_time_s=time.perf_counter() - started)
        return out
    best = study.best_trial
    config = configs[best.number]
    predictions, outcome = fit_and_score(config, data, outer)
    out.update(best_trial=best.number, best_value=best.value, config=config, predictions=predictions,
               final_fold_epochs=int(outcome.fold_epochs), wall_time_s=time.perf_counter() - started)
    return out


def cost_estimate(space, n_subjects, n_outer):
    """Upper bounds (no pruning) of the nested run's work, and of a plain search's: fold-epochs count the
    largest `epochs` a trial can have, twice where the inner protocol trains a second model."""
    from htnet.loso import LosoConfig
    from search.driver.runner import effective_samples

    sampled = next((p for p in space.params if p.name == "epochs"), None)
    fixed = [f.value for f in space.fixed if f.name == "epochs"]
    epochs = max(sampled.choices) if sampled and sampled.kind == "choice" else sampled.high if sampled else \
        max(fixed) if fixed else LosoConfig.epochs
    protocols = next((f.value for f in space.fixed if f.name == "protocols" and f.when is None), PROTOCOLS)
    per_fold = int(epochs) * (2 if "inner" in protocols else 1)
    trials = effective_samples(space)
    folds = n_outer * trials * (n_subjects - 1)
    return {"outer_folds": n_outer, "trials_per_fold": trials, "inner_loso_runs": n_outer * trials,
            "inner_folds": folds, "fold_epochs": folds * per_fold + n_outer * per_fold,
            "plain_search_fold_epochs": trials * n_subjects * per_fold}


def describe_cost(estimate, n_subjects):
    ratio = estimate["fold_epochs"] / max(1, estimate["plain_search_fold_epochs"])
    return (f"{estimate['outer_folds']} outer folds x {estimate['trials_per_fold']} trials = "
            f"{estimate['inner_loso_runs']} inner LOSO runs over {n_subjects - 1} subjects "
            f"(<= {estimate['inner_folds']} folds) + {estimate['outer_folds']} final fits: "
            f"<= {estimate['fold_epochs']:,} fold-epochs, {ratio:.1f}x a plain search of "
            f"{estimate['trials_per_fold']} trials on {n_subjects} subjects "
            f"(<= {estimate['plain_search_fold_epochs']:,})")


def default_method(space):
    fixed = {f.name: f.value for f in space.fixed if f.when is None}
    models = [fixed["model"]] if "model" in fixed else \
        next((p.choices for p in space.params if p.name == "model" and p.kind == "choice"), ["htnet"])
    return f"Search + {'/'.join(model_label(m) for m in models)} (nested LOSO)"


def run_nested(options, out=None):
    """Run nested LOSO; returns a dict: parent_run_id, metrics (pooled), folds (DataFrame),
    trials (DataFrame), predictions, cost."""
    import ray

    from htnet.loso import parse_subjects, select_subjects
    from search.driver.ray_setup import init_ray, stop_ray
    from search.driver.runner import Options, resolve_space
    from search.driver.stores import data_source, load_data

    out = out or sys.stdout
    space = resolve_space(Options(space=options.space, num_samples=options.num_samples,
                                  objective=options.objective, sampler=options.sampler, seed=options.seed,
                                  pruner=options.pruner, sets=list(options.sets)))
    if options.cpus_per_fold <= 0 or options.gpus_per_fold < 0:
        raise UserError("--cpus-per-fold must be > 0 and --gpus-per-fold >= 0")
    source = data_source(Options(data=options.data), space, options.storage)
    data, data_root = load_data(source)
    data = select_subjects(data, parse_subjects(options.subjects))
    outer = parse_subjects(options.outer_subjects)
    if outer is None:
        outer = data.subject_ids
    elif isinstance(outer, int):
        if outer < 1:
            raise UserError(f"--outer-subjects must be >= 1, got {outer}")
        outer = data.pick_subjects(outer)
    else:
        unknown = [s for s in outer if s not in data.subject_ids]
        if unknown:
            raise UserError(f"--outer-subjects: subject {unknown[0]!r} is not in the data")
    n_subjects = len(data.subject_ids)
    if n_subjects < 4:
        raise UserError(f"nested LOSO needs at least 4 subjects, the data have {n_subjects}")
    name = options.name or f"nested-{time.strftime('%Y%m%d-%H%M%S')}"
    method = options.method or default_method(space)
    estimate = cost_estimate(space, n_subjects, len(outer))
    cost_text = describe_cost(estimate, n_subjects)
    print(f"nested LOSO {name!r} ({method}) with space {space.source}, objective {space.metric}", file=out)
    print(f"COST: {cost_text}", file=out)
    print(f"data: {data_root} ({len(data)} samples, {n_subjects} subjects); outer folds in parallel on Ray, "
          f"{options.cpus_per_fold:g} CPU / {options.gpus_per_fold:g} GPU each", file=out)

    store = open_store(options.tracking_uri, options.experiment, create=True)
    client = store.client
    tags = {"htnet.role": "nested", "htnet.method": method, "htnet.search": name,
            "htnet.objective": space.metric, "htnet.objective_protocol": space.objective,
            "htnet.cost": cost_text, "mlflow.runName": name}
    parent_id = tracking.retry(client.create_run, store.experiment_id, tags=tags, run_name=name).info.run_id
    tracking.log_params(client, parent_id, {
        "space_file": space.source, "num_samples": space.num_samples, "sampler": space.sampler,
        "pruner": space.pruner, "objective": space.objective, "data": data_root,
        "subjects": n_subjects, "outer_subjects": ",".join(outer), "sets": list(options.sets),
        "cpus_per_fold": options.cpus_per_fold, "gpus_per_fold": options.gpus_per_fold})
    tracking.retry(client.log_dict, parent_id, space.raw, "space.yaml")
    tracking.log_metrics(client, parent_id, {f"estimate_{k}": v for k, v in estimate.items()})

    started = time.time()
    results = []

    def logged(result):
        subject = result["outer_subject"]
        child_tags = {"mlflow.parentRunId": parent_id, "htnet.role": "outer_fold", "htnet.outer_subject": subject,
                      "htnet.search": name, "htnet.status": "failed" if "error" in result else "finished"}
        run_id = tracking.retry(client.create_run, store.experiment_id, tags=child_tags,
                                run_name=f"{name} outer {subject}").info.run_id
        trials = pd.DataFrame(result["trials"])
        statuses = trials["status"].value_counts().to_dict() if len(trials) else {}
        metrics = {"trials_finished": statuses.get("finished", 0), "trials_pruned": statuses.get("pruned", 0),
                   "trials_failed": statuses.get("failed", 0), "search_fold_epochs": result["search_fold_epochs"],
                   "wall_time_s": result.get("wall_time_s", float("nan"))}
        if len(trials):
            log_frame(client, run_id, trials, "inner_trials.csv")
        if "error" in result:
            tracking.set_tags(client, run_id, {"htnet.error": result["error"]})
            print(f"  outer {subject}: failed ({result['error']})", file=out)
        else:
            predictions = result["predictions"]
            for protocol, part in predictions.groupby("protocol"):
                metrics[f"{protocol}_outer_accuracy"] = float((part["label"] == part["prediction"]).mean())
            metrics.update({f"best_{space.metric}": result["best_value"],
                            "final_fold_epochs": result["final_fold_epochs"]})
            tracking.log_params(client, run_id, flatten(result["config"]))
            tracking.retry(client.log_dict, run_id, result["config"], "config.yaml")
            log_frame(client, run_id, predictions, "predictions.csv")
            acc = metrics.get("inner_outer_accuracy", metrics.get("final_outer_accuracy", float("nan")))
            print(f"  outer {subject}: best of {len(trials)} trials {space.metric} {result['best_value']:.4f}, "
                  f"outer accuracy {acc:.3f} ({result['wall_time_s']:.1f} s)", file=out)
        tracking.log_metrics(client, run_id, metrics)
        tracking.retry(client.set_terminated, run_id, "FAILED" if "error" in result else "FINISHED")
        results.append({**result, "run_id": run_id})

    started_ray = init_ray(options.address, options.num_cpus)
    try:
        task = ray.remote(outer_fold).options(num_cpus=options.cpus_per_fold, num_gpus=options.gpus_per_fold,
                                              max_retries=1)
        space_ref, data_ref = ray.put(space), ray.put(data)
        threads = max(1, math.floor(options.cpus_per_fold))
        pending = {task.remote(space_ref, data_ref, s, threads): s for s in outer}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    subject = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        lines = [line for line in str(e).splitlines() if line.strip()]
                        result = {"outer_subject": subject, "trials": [], "search_fold_epochs": 0,
                                  "error": (lines[-1] if lines else type(e).__name__)[:2000]}
                    logged(result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            tracking.retry(client.set_terminated, parent_id, "KILLED")
            raise
    finally:
        stop_ray(started_ray)
    return finish_nested(client, parent_id, name, method, space, results, estimate, started, out)


def finish_nested(client, parent_id, name, method, space, results, estimate, started, out):
    ok = [r for r in results if "error" not in r]
    trials = pd.DataFrame([row for r in results for row in r["trials"]])
    folds = pd.DataFrame([{"outer_subject": r["outer_subject"], "status": "failed" if "error" in r else "finished",
                           "best_trial": r.get("best_trial"), f"best_{space.metric}": r.get("best_value"),
                           "search_fold_epochs": r["search_fold_epochs"],
                           "final_fold_epochs": r.get("final_fold_epochs", 0),
                           "wall_time_s": r.get("wall_time_s"), "run_id": r.get("run_id"),
                           **{f"config.{k}": v for k, v in flatten(r.get("config") or {}).items()
                              if k in space.names or k == "model"}}
                          for r in results]).sort_values("outer_subject").reset_index(drop=True)
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    fold_epochs = int(folds["search_fold_epochs"].sum() + folds["final_fold_epochs"].sum())
    wall = time.time() - started
    cost = {"nested_outer_folds": len(ok), "nested_trials": len(trials),
            "nested_trials_pruned": counts.get("pruned", 0), "nested_trials_failed": counts.get("failed", 0),
            "nested_fold_epochs": fold_epochs, "nested_wall_time_s": wall,
            "nested_task_time_s": float(folds["wall_time_s"].fillna(0).sum())}
    metrics = {}
    predictions = pd.DataFrame()
    if ok:
        predictions = pd.concat([r["predictions"] for r in ok], ignore_index=True)
        metrics = compute_metrics(predictions)
        log_frame(client, parent_id, predictions, "predictions.csv")
    tracking.log_metrics(client, parent_id, {**metrics, **cost, "fold_epochs": fold_epochs, "wall_time_s": wall})
    cost_line = (f"{len(trials)} inner trials ({counts.get('pruned', 0)} pruned, {counts.get('failed', 0)} failed) "
                 f"in {len(results)} outer folds, {fold_epochs:,} fold-epochs (bound {estimate['fold_epochs']:,}), "
                 f"wall {wall:.1f} s, task time {cost['nested_task_time_s']:.1f} s")
    tracking.set_tags(client, parent_id, {"htnet.cost_actual": cost_line})
    log_frame(client, parent_id, folds, "outer_folds.csv")
    if len(trials):
        log_frame(client, parent_id, trials, "inner_trials.csv")
    table = summary_table(metrics) if metrics else pd.DataFrame()
    text = [f"# {method}: nested LOSO {name}", "", f"Cost: {cost_line}.", "",
            f"Pooled over {len(ok)} outer subjects; `inner` is the unbiased estimate, `paper` picks each "
            f"outer subject's epoch by its test accuracy (leaks).", ""]
    if len(table):
        text.append(markdown_table(format_numbers(table.reset_index(names="protocol"))))
    log_frame(client, parent_id, "\n".join(text), "summary.md", markdown=True)
    tracking.retry(client.set_terminated, parent_id, "FINISHED" if ok else "FAILED")

    print(f"\n{method} ({len(ok)} of {len(results)} outer folds):", file=out)
    if len(table):
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.to_string(float_format=lambda v: f"{v:.4f}"), file=out)
    print(f"COST: {cost_line}", file=out)
    print(f"MLflow: nested parent run {parent_id} (tag htnet.method={method!r})", file=out)
    return {"parent_run_id": parent_id, "metrics": metrics, "folds": folds, "trials": trials,
            "predictions": predictions, "cost": cost, "method": method}
