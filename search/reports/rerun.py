"""Rerun one configuration with K seeds, in parallel on Ray, and report mean +- std and a 95%
interval for every metric.

    python -m search rerun --best SEARCH            the search's best finished trial
    python -m search rerun --run-id RUN             any run with a config.yaml (trial, rerun, ...)
    python -m search rerun --preset htnet-paper     the HTNet paper configuration (LosoConfig defaults)
    python -m search rerun --preset ststnet         STSTNet with the reference training settings
    python -m search rerun --config FILE.yaml       a LOSO config file (python -m htnet train --config)

Every seed is a full `htnet.loso.run_loso` of the configuration (a Ray task each; the data go to
Ray's object store once). MLflow: a rerun parent run (tags htnet.role=rerun, htnet.method = the
row label of the paper table, htnet.source_run_id, htnet.source_search, htnet.seeds) with one
nested child run per seed (htnet.role=rerun_seed, htnet.seed; the trial's params, metrics and
artifacts). The parent gets `<metric>_mean`, `_std`, `_ci95_low`, `_ci95_high` for every metric
key, `n_seeds`, and artifacts seeds.csv, summary.csv, summary.md, predictions.csv (every seed,
with a `seed` column) and confusion_matrices.png (counts summed over the seeds); the confusion
matrices also go to the source search's parent run (plots/rerun_confusion_matrices.png).

Seeds: a configuration chosen by a search was chosen with its own seed, which favours that seed
(the winner's curse); its rerun therefore uses K fresh seeds (seed+1 .. seed+K). Configurations
not selected on these data (presets, files) start at their own seed (seed .. seed+K-1).
"""
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from htnet.errors import UserError
from htnet.metrics import PROTOCOLS
from search import tracking
from search.reports.export import markdown_table
from htnet.io import parse_yaml, read_yaml
from search.reports.leaderboard import (DATASET_COLUMNS, leaderboard, open_store, read_artifact_bytes,
                                search_parents)
from search.space import check_value, flatten, nest
from search.reports.stats import summarize_columns

MODEL_LABELS = {"htnet": "HTNet", "ststnet": "STSTNet"}
PRESETS = {
    # LosoConfig's defaults are the HTNet reference: dim 256, heads 3, 3 levels, blocks (2,2,10),
    # patch 7, lr 5e-5, batch 256, 800 epochs, Adam, no shuffle.
    "htnet-paper": ({"model": "htnet"}, "HTNet (paper config)"),
    # STSTNet's PyTorch reference: lr 5e-5, batch 256, 800 epochs, Adam; the published number is
    # its final epoch.
    "ststnet": ({"model": "ststnet", "protocols": ["paper", "final", "inner"]}, "STSTNet"),
}
METRIC_KEYS = tuple(f"{p}_{d}_{m}" for p in PROTOCOLS for d, _ in DATASET_COLUMNS for m in ("uf1", "uar")) + \
    ("inner_val_uf1", "inner_val_uar", "fold_epochs", "wall_time_s")


@dataclass
class RerunSource:
    config: dict
    method: str
    run_id: str | None = None
    search: str | None = None
    search_run_id: str | None = None
    data: str | None = None
    selected: bool = False          # chosen by a search on these data (fresh seeds)
    description: str = ""


@dataclass
class RerunOptions:
    best: str | None = None
    run_id: str | None = None
    preset: str | None = None
    config: str | None = None
    method: str | None = None
    seeds: int = 5
    seed_list: list | None = None
    sets: list = field(default_factory=list)
    data: str | None = None
    storage: str = "runs"
    tracking_uri: str | None = None
    experiment: str = "htnet"
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_seed: float = 1.0
    gpus_per_seed: float = 0.0


# ----------------------------------------------------------------------------- where the config comes from

def model_label(model):
    return MODEL_LABELS.get(model, model)


def config_of_run(store, run):
    """The LOSO config of a run: its config.yaml artifact, else its params."""
    run_id = run.info.run_id
    try:
        text = read_artifact_bytes(store, run_id, "config.yaml")
    except UserError:  # no such artifact: the params say it too
        text = None
    if text is not None:
        config = parse_yaml(text, f"run {run_id}: config.yaml")
        if isinstance(config, dict):
            return config
    params = run.data.params
    if not params or "model" not in params:
        raise UserError(f"run {run.info.run_id} has neither a config.yaml artifact nor LOSO params")
    from htnet.loso import LosoConfig
    import dataclasses

    known = {f.name for f in dataclasses.fields(LosoConfig)}
    flat = {k: parse_yaml(v, f"run {run_id}: param {k}") for k, v in params.items() if k.split(".")[0] in known}
    return nest(flat)


def resolve_source(store, options):
    """The configuration to rerun, its label and where it came from."""
    given = [x for x in (options.best, options.run_id, options.preset, options.config) if x]
    if len(given) != 1:
        raise UserError("name exactly one of --best SEARCH, --run-id RUN, --preset NAME, --config FILE")
    client = store.client if store is not None else None
    if options.best:
        parent = search_parents(store, [options.best])[0]
        run_id = parent.data.tags.get("htnet.best_run_id")
        if run_id is None:
            table = leaderboard(store, [options.best], statuses=["finished"])
            if not len(table):
                raise UserError(f"search {options.best!r} has no finished trial to rerun")
            run_id = table.iloc[0]["run_id"]
        run = tracking.retry(client.get_run, run_id)
        config = config_of_run(store, run)
        method = options.method or f"{model_label(config.get('model', 'htnet'))} (best found)"
        objective = parent.data.tags.get("htnet.objective", "?")
        return RerunSource(config, method, run_id, options.best, parent.info.run_id,
                           parent.data.params.get("data"), True,
                           f"best trial {run.data.tags.get('htnet.trial_id', run_id)} of search {options.best} "
                           f"by {objective} = {run.data.metrics.get(objective, float('nan')):.4f}")
    if options.run_id:
        try:
            run = tracking.retry(client.get_run, options.run_id)
        except Exception:  # noqa: BLE001 - MLflow's not-found error
            raise UserError(f"no MLflow run {options.run_id!r} at {store.tracking_uri}") from None
        config = config_of_run(store, run)
        tags = run.data.tags
        search, parent_id, data = tags.get("htnet.search"), tags.get("mlflow.parentRunId"), None
        if parent_id and tags.get("htnet.role") == "trial":
            parent = tracking.retry(client.get_run, parent_id)
            data = parent.data.params.get("data")
        method = options.method or tags.get("htnet.method") or \
            f"{model_label(config.get('model', 'htnet'))} (run {options.run_id[:8]})"
        return RerunSource(config, method, options.run_id, search,
                           parent_id if tags.get("htnet.role") == "trial" else None, data,
                           tags.get("htnet.role") == "trial", f"run {options.run_id}")
    if options.preset:
        if options.preset not in PRESETS:
            raise UserError(f"--preset {options.preset!r}: known presets are {', '.join(PRESETS)}")
        config, label = PRESETS[options.preset]
        return RerunSource(dict(config), options.method or label, description=f"preset {options.preset}")
    path = Path(options.config)
    config = read_yaml(path, f"--config {path}")  # missing, not UTF-8, not YAML, an alias bomb: one line
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: expected a mapping of LOSO config keys")
    return RerunSource(config, options.method or f"{model_label(config.get('model', 'htnet'))} ({path.stem})",
                       description=f"config file {path}")


def apply_sets(config, sets):
    """--set KEY=VALUE (YAML values; model_config.KEY for the model) on a copy of config."""
    flat = flatten(config)
    for text in sets or []:
        key, sep, value = str(text).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {text!r}: expected KEY=VALUE")
        flat[key] = parse_yaml(value, f"--set {key}")
        check_value(key, flat[key], f"--set {key}")
    return nest(flat)


def checked_config(source, sets, where):
    """The source's config with --set applied, each value checked where it came from (integers
    are integers, numbers finite) before anything is written."""
    config = apply_sets(source.config, sets)
    given = {str(text).partition("=")[0].strip() for text in sets or []}
    for key, value in flatten(source.config).items():
        if key not in given:
            check_value(key, value, f"{where}: {key}")
    return config


def seeds_for(config, source, count, seed_list=None):
    if seed_list:
        try:
            seeds = [int(s) for s in seed_list]
        except ValueError:
            raise UserError(f"--seed-list: expected comma-separated integers, got {','.join(seed_list)!r}") from None
        if len(set(seeds)) != len(seeds):
            raise UserError(f"--seed-list has repeated seeds: {seeds}")
        return seeds
    if count < 1:
        raise UserError(f"--seeds must be >= 1, got {count}")
    base = int(config.get("seed", 1))
    start = base + 1 if source.selected else base
    return list(range(start, start + count))


def load_rerun_data(data, source, storage):
    from search.driver.stores import load_data

    if data:
        if not Path(data).exists():
            raise UserError(f"--data {data}: no such folder")
        return load_data({"path": str(Path(data).resolve())})
    if source.data and Path(source.data).exists():
        return load_data({"path": source.data})
    if source.data:
        raise UserError(f"the data of search {source.search!r} ({source.data}) is not here: pass --data")
    print("no --data given: using the built-in synthetic set", file=sys.stderr)
    return load_data({"synthetic": {"subjects_per_dataset": 3, "seed": 0,
                                    "cache": str((Path(storage) / "synthetic").resolve())}})


# ----------------------------------------------------------------------------- the Ray tasks

def _seed_task(config, data, threads):
    """One seed: a full LOSO run. Returns the LosoResult, or {'error': ...} for a config that
    cannot train (diverged, impossible)."""
    import torch

    from htnet.errors import TrainingDiverged
    from htnet.loso import LosoConfig, run_loso

    torch.set_num_threads(max(1, int(threads)))
    try:
        return run_loso(LosoConfig.from_dict(config), data, progress=False)
    except (TrainingDiverged, UserError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run_parallel(jobs, data, cpus=1.0, gpus=0.0, on_result=None):
    """Run `jobs` ({key: config dict}) as Ray tasks sharing `data`; call on_result(key, result) as
    each ends (in the driver); return {key: result}."""
    import ray

    task = ray.remote(_seed_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    data_ref = ray.put(data)
    pending = {task.remote(config, data_ref, max(1, math.floor(cpus))): key for key, config in jobs.items()}
    results = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                key = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:
                    lines = [line for line in str(e).splitlines() if line.strip()]
                    result = {"error": (lines[-1] if lines else type(e).__name__)[:2000]}
                results[key] = result
                if on_result is not None:
                    on_result(key, result)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results


# ----------------------------------------------------------------------------- MLflow

def log_result_artifacts(client, run_id, result, title):
    """A LosoResult's files and PNGs as artifacts of `run_id` (as a search trial has them)."""
    from search.tracking.figures import confusion_matrix_png, learning_curve_png

    folder = Path(tempfile.mkdtemp(prefix="htnet-rerun-"))
    try:
        result.save(folder)
        confusion_matrix_png(result.predictions, folder / "confusion_matrix.png", title=title)
        learning_curve_png(result.history, folder / "learning_curve.png", title=title)
        tracking.retry(client.log_artifacts, run_id, str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_frame(client, run_id, frame, name, markdown=False):
    folder = Path(tempfile.mkdtemp(prefix="htnet-report-"))
    try:
        path = folder / name
        if markdown:
            path.write_text(frame if isinstance(frame, str) else markdown_table(frame))
        else:
            frame.to_csv(path, index=False)
        tracking.retry(client.log_artifact, run_id, str(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_png(client, run_id, draw, artifact_path):
    """draw(path) writes a PNG; it goes to `artifact_path` (folder/name.png) of the run."""
    folder = Path(tempfile.mkdtemp(prefix="htnet-report-"))
    try:
        name = Path(artifact_path).name
        draw(folder / name)
        parent = str(Path(artifact_path).parent)
        tracking.retry(client.log_artifact, run_id, str(folder / name), None if parent == "." else parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def interval_metrics(summary):
    """MLflow metrics of a summary (rows = metric keys): key_mean, _std, _ci95_low, _ci95_high."""
    out = {}
    for key, row in summary.iterrows():
        out[f"{key}_mean"] = row["mean"]
        out[f"{key}_std"] = row["std"]
        out[f"{key}_ci95_low"] = row["ci_low"]
        out[f"{key}_ci95_high"] = row["ci_high"]
    return out


def summary_frame(seeds_table):
    keys = [k for k in METRIC_KEYS if k in seeds_table and seeds_table[k].notna().any()]
    summary = summarize_columns(seeds_table, keys)
    summary.index.name = "metric"
    return summary


def protocol_table(summary, style="full"):
    """Rows = protocols, columns = Full/SMIC/CASME II/SAMM x UF1/UAR; cells 'mean ± std [low, high]'
    (style 'full'), 'mean ± std' ('std') or 'mean [low, high]' ('ci')."""
    rows = []
    for protocol in PROTOCOLS:
        if f"{protocol}_full_uf1" not in summary.index:
            continue
        row = {"protocol": protocol}
        for key, name in DATASET_COLUMNS:
            for m in ("uf1", "uar"):
                metric = f"{protocol}_{key}_{m}"
                row[f"{name} {m.upper()}"] = format_interval(summary.loc[metric], style) \
                    if metric in summary.index else ""
        rows.append(row)
    return pd.DataFrame(rows)


def format_interval(stats, style="full", digits=4):
    mean, std, low, high = stats["mean"], stats["std"], stats["ci_low"], stats["ci_high"]
    if pd.isna(mean):
        return ""
    text = f"{mean:.{digits}f}"
    if style in ("full", "std") and pd.notna(std):
        text += f" ± {std:.{digits}f}"
    if style in ("full", "ci") and pd.notna(low):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


# ----------------------------------------------------------------------------- the command

def rerun(options, out=None):
    """Rerun a configuration with K seeds; returns a dict with parent_run_id, seeds (DataFrame:
    one row per seed), summary (rows = metric keys: n, mean, std, ci_low, ci_high) and method."""
    from htnet.loso import LosoConfig
    from search.tracking.figures import confusion_matrix_png
    from search.driver.ray_setup import init_ray, stop_ray

    out = out or sys.stdout
    # a config file or preset is checked before the MLflow store is opened (created): nothing written
    store = open_store(options.tracking_uri, options.experiment, create=True) \
        if options.best or options.run_id else None
    source = resolve_source(store, options)
    where = f"--config {options.config}" if options.config else \
        f"run {source.run_id}" if source.run_id else source.description
    config = checked_config(source, options.sets, where)
    config.pop("save_weights", None)
    seeds = seeds_for(config, source, options.seeds, options.seed_list)
    base = LosoConfig.from_dict({**config, "seed": seeds[0]})  # checks the config before any work
    data, data_root = load_rerun_data(options.data, source, options.storage)
    if options.cpus_per_seed <= 0 or options.gpus_per_seed < 0:
        raise UserError("--cpus-per-seed must be > 0 and --gpus-per-seed >= 0")
    store = store or open_store(options.tracking_uri, options.experiment, create=True)
    client = store.client
    shown = {k: v for k, v in flatten(base.to_dict()).items() if k != "seed"}
    tags = {"htnet.role": "rerun", "htnet.method": source.method, "htnet.model": base.model,
            "htnet.seeds": ",".join(map(str, seeds)), "htnet.protocols": ",".join(base.protocols),
            "htnet.source": source.description, "mlflow.runName": f"rerun {source.method}"}
    if source.run_id:
        tags["htnet.source_run_id"] = source.run_id
    if source.search:
        tags["htnet.source_search"] = source.search
    parent = tracking.retry(client.create_run, store.experiment_id, tags=tags, run_name=f"rerun {source.method}")
    parent_id = parent.info.run_id
    tracking.log_params(client, parent_id, {**shown, "seeds": ",".join(map(str, seeds)), "data": data_root,
                                            "cpus_per_seed": options.cpus_per_seed,
                                            "gpus_per_seed": options.gpus_per_seed})
    tracking.retry(client.log_dict, parent_id, {k: v for k, v in base.to_dict().items() if k != "seed"},
                   "config.yaml")
    from htnet.loso import select_subjects

    folds = len(select_subjects(data, base.subjects).subject_ids)
    runs = 2 if "inner" in base.protocols else 1
    print(f"rerun {source.method!r}: {source.description}; {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
          f"in parallel on Ray; data {data_root} ({len(data)} samples, {len(data.subject_ids)} subjects)",
          file=out)
    print(f"cost: {len(seeds)} seeds x {folds} folds x {base.epochs} epochs x {runs} model(s) per fold = "
          f"{len(seeds) * folds * base.epochs * runs:,} fold-epochs", file=out)

    children, started = {}, time.time()
    for seed in seeds:
        child_tags = {"mlflow.parentRunId": parent_id, "htnet.role": "rerun_seed", "htnet.seed": seed,
                      "htnet.method": source.method, "htnet.status": "running"}
        run = tracking.retry(client.create_run, store.experiment_id, tags={k: str(v) for k, v in child_tags.items()},
                             run_name=f"{source.method} seed {seed}")
        children[seed] = run.info.run_id
        tracking.log_params(client, run.info.run_id, flatten({**base.to_dict(), "seed": seed}))

    rows, predictions = [], []

    def logged(seed, result):
        run_id = children[seed]
        if isinstance(result, dict):
            tracking.set_tags(client, run_id, {"htnet.status": "failed", "htnet.error": result["error"][:5000]})
            tracking.retry(client.set_terminated, run_id, "FAILED")
            rows.append({"seed": seed, "status": "failed", "run_id": run_id})
            print(f"  seed {seed}: failed ({result['error']})", file=out)
            return
        tracking.set_tags(client, run_id, {"htnet.status": "finished", "htnet.device": result.device})
        tracking.log_metrics(client, run_id, {**result.metrics, "folds_done": result.folds_done})
        log_result_artifacts(client, run_id, result, f"{source.method} seed {seed}")
        tracking.retry(client.set_terminated, run_id, "FINISHED")
        rows.append({"seed": seed, "status": "finished", "run_id": run_id,
                     **{k: v for k, v in result.metrics.items() if k in METRIC_KEYS}})
        predictions.append(result.predictions.assign(seed=seed))
        leak_free = "inner" if "inner_full_uf1" in result.metrics else "final"
        print(f"  seed {seed}: paper UF1 {result.metrics.get('paper_full_uf1', float('nan')):.4f}, "
              f"{leak_free} UF1 {result.metrics.get(f'{leak_free}_full_uf1', float('nan')):.4f} "
              f"({result.wall_time_s:.1f} s)", file=out)

    started_ray = init_ray(options.address, options.num_cpus)
    try:
        run_parallel({seed: {**base.to_dict(), "seed": seed} for seed in seeds}, data,
                     options.cpus_per_seed, options.gpus_per_seed, logged)
    except BaseException:
        for seed, run_id in children.items():
            if not any(r["seed"] == seed for r in rows):
                tracking.set_tags(client, run_id, {"htnet.status": "interrupted"})
                tracking.retry(client.set_terminated, run_id, "KILLED")
        tracking.retry(client.set_terminated, parent_id, "KILLED")
        raise
    finally:
        stop_ray(started_ray)

    seeds_table = pd.DataFrame(rows).sort_values("seed").reset_index(drop=True)
    finished = seeds_table[seeds_table["status"] == "finished"]
    summary = summary_frame(finished) if len(finished) else pd.DataFrame()
    tracking.log_metrics(client, parent_id, {**(interval_metrics(summary) if len(summary) else {}),
                                             "n_seeds": len(finished), "n_failed": len(seeds_table) - len(finished),
                                             "rerun_wall_time_s": time.time() - started})
    log_frame(client, parent_id, seeds_table, "seeds.csv")
    if len(summary):
        log_frame(client, parent_id, summary.reset_index(), "summary.csv")
        log_frame(client, parent_id, protocol_table(summary), "summary.md", markdown=True)
        pooled = pd.concat(predictions, ignore_index=True)
        log_frame(client, parent_id, pooled, "predictions.csv")
        title = f"{source.method}: {len(finished)} seeds, counts summed"
        log_png(client, parent_id, lambda p: confusion_matrix_png(pooled, p, title), "confusion_matrices.png")
        if source.search_run_id:
            log_png(client, source.search_run_id, lambda p: confusion_matrix_png(pooled, p, title),
                    "plots/rerun_confusion_matrices.png")
    tracking.retry(client.set_terminated, parent_id, "FINISHED" if len(finished) else "FAILED")
    print_rerun(source.method, seeds_table, summary, out)
    print(f"MLflow: rerun parent run {parent_id} (experiment {store.experiment}, tag htnet.method="
          f"{source.method!r})", file=out)
    return {"parent_run_id": parent_id, "seeds": seeds_table, "summary": summary, "method": source.method,
            "config": base.to_dict()}


def print_rerun(method, seeds_table, summary, out):
    finished = int((seeds_table["status"] == "finished").sum())
    print(f"\n{method}: {finished} of {len(seeds_table)} seeds finished; mean ± std [95% t-interval] "
          f"over seeds", file=out)
    if not len(summary):
        print("no seed finished: nothing to summarize", file=out)
        return
    table = protocol_table(summary).set_index("protocol").T
    table.index.name = ""
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.to_string(), file=out)
    extra = [k for k in ("inner_val_uf1", "fold_epochs", "wall_time_s") if k in summary.index]
    for key in extra:
        print(f"{key}: {format_interval(summary.loc[key])}", file=out)
    if np.isfinite(summary["std"]).sum() == 0:
        print("(one seed: no spread or interval)", file=out)
