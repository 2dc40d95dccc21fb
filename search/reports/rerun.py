"""`python -m search rerun`: one configuration with K seeds in parallel, a Ray Tune grid over the seeds through the
search's trainable, logged to an MLflow parent run (mean ± std and, from MIN_SEEDS seeds, a 95% bootstrap interval)
with a child run per seed. Ray's experiment keeps finished folds until MLflow has them: the same command goes on."""
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from ray import tune

from htnet.checkpoint import FOLDS_DIR
from htnet.io import ensure_writable_dir
from htnet.loso import LosoConfig, select_subjects
from htnet.metrics import PROTOCOLS, summary_table
from search import tracking
from search.driver.ray_setup import check_resources, ray_session
from search.driver.stores import (check_experiment, check_remote_storage, check_restorable, open_folder,
                                  restore_deleted_checkpoints)
from search.reports.export import markdown_table, plural
from search.reports.leaderboard import METRICS, open_store
from search.reports.sources import (changed_label, changed_settings, checked_config, data_tags, load_rerun_data,
                                    resolve_source, seeds_for)
from search.reports.stats import MIN_SEEDS, seed_subject_bootstrap
from search.space import flatten
from search.tracking.figures import confusion_matrix_png
from search.trainable import loso_trial

METRIC_KEYS = (*(f"{p}_{key}_{m}" for p in PROTOCOLS for key, _, m in METRICS),
               "inner_val_uf1", "inner_val_uar", "fold_epochs", "wall_time_s")


@dataclass
class RerunOptions:
    best: str | None = None
    run_id: str | None = None
    preset: str | None = None
    config: str | None = None
    method: str | None = None
    params: dict = field(default_factory=dict)
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
    ray_storage: str | None = None   # the seeds' Ray Tune experiment (default: <storage>/ray)


def log_frame(client, run_id, frame, name, markdown=False):
    """A table as a CSV (or Markdown) artifact of the run; a text is logged as it is."""
    text = frame if isinstance(frame, str) else markdown_table(frame) if markdown else frame.to_csv(index=False)
    tracking.retry(client.log_text, run_id, text, name)


def end_seed(client, run_id, seed, result, out):
    """Its Ray Tune result onto the seed's run (its error, or its metrics and last checkpoint less the fold records),
    its line printed; returns (its row of seeds.csv, its predictions or None)."""
    values = result.metrics or {}
    if values.get("htnet_status") != "finished":
        lines = [line for line in str(result.error or "").splitlines() if line.strip()]   # a worker that died
        error = values.get("htnet_error") or (lines[-1][:2000] if lines else "it did not finish")
        tracking.set_tags(client, run_id, {"htnet.status": "failed", "htnet.error": error[:5000]})
        tracking.retry(client.set_terminated, run_id, "FAILED")
        print(f"  seed {seed}: failed ({error})", file=out)
        return {"seed": seed, "status": "failed", "run_id": run_id}, None
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory(prefix="htnet-rerun-") as files:
        shutil.copytree(folder, files, dirs_exist_ok=True, ignore=shutil.ignore_patterns(FOLDS_DIR))
        metrics = pd.read_json(Path(files, "metrics.json"), typ="series").to_dict()   # the LOSO result's
        predictions = pd.read_csv(Path(files, "predictions.csv")).assign(seed=seed)
        tracking.retry(client.log_artifacts, run_id, files)
    tracking.set_tags(client, run_id, {"htnet.status": "finished", "htnet.device": values.get("htnet_device")})
    tracking.log_metrics(client, run_id, {**metrics, "folds_done": values["step"]})
    tracking.retry(client.set_terminated, run_id, "FINISHED")
    leak_free, resumed = "inner" if "inner_full_uf1" in metrics else "final", metrics.get("fold_epochs_resumed")
    print(f"  seed {seed}: paper UF1 {metrics.get('paper_full_uf1', float('nan')):.4f}, {leak_free} UF1 "
          f"{metrics.get(f'{leak_free}_full_uf1', float('nan')):.4f} ({metrics['wall_time_s']:.1f} s"
          + (f"; {resumed:g} of {metrics['fold_epochs']:g} fold-epochs from an earlier attempt)" if resumed else ")"),
          file=out)
    return {"seed": seed, "status": "finished", "run_id": run_id,
            **{k: v for k, v in metrics.items() if k in METRIC_KEYS}}, predictions


def log_summary(client, source, parent_id, rows, predictions, started):
    """Log the parent run's summary (a row per metric key: n, mean, std over the finished seeds and, from MIN_SEEDS
    seeds, the 95% interval), tables and pooled confusion matrices, end it; returns (seeds table, summary)."""
    seeds_table = pd.DataFrame(rows).sort_values("seed").reset_index(drop=True)
    finished = seeds_table[seeds_table["status"] == "finished"]
    pooled = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame()
    values = finished[[k for k in METRIC_KEYS if k in finished and finished[k].notna().any()]].astype(float)
    bounds = seed_subject_bootstrap(pooled) if len(finished) >= MIN_SEEDS else {}
    summary = pd.DataFrame({"n": values.count(), "mean": values.mean(), "std": values.std(ddof=1),
                            **{f"ci95_{side}": [bounds.get(k, (np.nan, np.nan))[i] for k in values]
                               for i, side in enumerate(("low", "high"))}}).rename_axis("metric")
    tracking.log_metrics(client, parent_id, {
        **{f"{key}_{stat}": v for (key, stat), v in summary.drop(columns="n").stack().items()},
        "n_seeds": len(finished), "n_failed": len(seeds_table) - len(finished),
        "rerun_wall_time_s": time.time() - started})
    log_frame(client, parent_id, seeds_table, "seeds.csv")
    if len(summary):
        log_frame(client, parent_id, summary.reset_index(), "summary.csv")
        log_frame(client, parent_id, protocol_table(summary), "summary.md", markdown=True)
        log_frame(client, parent_id, pooled, "predictions.csv")
        figure = confusion_matrix_png(pooled, title=f"{source.method}: {plural(len(finished), 'seed')}, counts summed")
        for run_id, name in ((parent_id, "confusion_matrices.png"),
                             (source.search_run_id, "plots/rerun_confusion_matrices.png")):
            if run_id:
                tracking.retry(client.log_figure, run_id, figure, name, save_kwargs={"dpi": 100})
    tracking.retry(client.set_terminated, parent_id, "FINISHED" if len(finished) else "FAILED")
    return seeds_table, summary


def format_interval(stats, style="full"):
    """'mean ± std [low, high]' (style full), 'mean ± std' (std), 'mean [low, high]' (ci), else 'mean'."""
    if pd.isna(stats["mean"]):
        return ""
    spread = f" ± {stats['std']:.4f}" if style in ("full", "std") and pd.notna(stats["std"]) else ""
    low, high = stats["ci95_low"], stats["ci95_high"]
    return f"{stats['mean']:.4f}{spread}" + (f" [{low:.4f}, {high:.4f}]" if style in ("full", "ci") and pd.notna(low)
                                            else "")


def protocol_table(summary):
    """Rows = protocols, columns = Full/SMIC/CASME II/SAMM x UF1/UAR, cells 'mean ± std [95% interval]'."""
    cells = {key: format_interval(row) for key, row in summary.iterrows()}
    return summary_table(cells).fillna("").rename_axis("protocol").reset_index()


def experiment_path(ray_storage, config, data_root, seeds):
    """The rerun's Ray Tune experiment, named by what it computes: the same rerun run again goes on from it."""
    text = json.dumps([config, str(data_root), seeds], sort_keys=True, default=str)
    return f"{ray_storage.rstrip('/')}/rerun-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def fit_seeds(path, config, seeds, data, options, provenance, plan):
    """{seed: Tune result}: each seed a trial of a Ray Tune grid at `path` through the search's trainable; with `plan`
    (check_experiment's) a stopped rerun goes on, each seed from its last checkpoint."""
    settings = {"base_config": config, "metric": f"{config['protocols'][0]}_full_uf1", "provenance": provenance}
    trainable = tune.with_resources(tune.with_parameters(loso_trial, data=data, settings=settings),
                                    {"cpu": options.cpus_per_seed, "gpu": options.gpus_per_seed})
    storage, _, name = path.rpartition("/")
    if plan is not None:
        restore_deleted_checkpoints(plan)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"seed": tune.grid_search(seeds)}, tune_config=tune.TuneConfig(
            max_concurrent_trials=len(seeds), trial_dirname_creator=lambda trial: f"seed-{trial.config['seed']}"),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=3),   # a seed whose node is lost (spot) is retried
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))   # as the search's trials
    with contextlib.redirect_stdout(io.StringIO()):   # Ray Tune's experiment box: rerun says where it is
        return {result.config["seed"]: result for result in tuner.fit()}


def print_summary(method, seeds_table, summary, out):
    finished = int((seeds_table["status"] == "finished").sum())
    interval = "[95% bootstrap interval over seeds and subjects]" if finished >= MIN_SEEDS else \
        f"(fewer than {MIN_SEEDS} seeds: no interval)"
    print(f"\n{method}: {finished} of {plural(len(seeds_table), 'seed')} finished; mean ± std over seeds {interval}",
          file=out)
    if not len(summary):
        return print("no seed finished: nothing to summarize", file=out)
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        print(protocol_table(summary).set_index("protocol").T.rename_axis("").to_string(), file=out)
    for key in summary.index.intersection(["inner_val_uf1", "fold_epochs", "wall_time_s"]):
        print(f"{key}: {format_interval(summary.loc[key])}", file=out)
    if summary["std"].isna().all():
        print("(one seed: no spread)", file=out)


def rerun(options, out=None):
    """Rerun a configuration with K seeds: {parent_run_id, seeds (a row each), summary, method, config}."""
    out = out or sys.stdout
    # a config file or preset is checked before the MLflow store is opened (created): nothing written
    store = open_store(options.tracking_uri, options.experiment, create=True) if options.best or options.run_id \
        else None
    source = resolve_source(store, options)
    where = f"--config {options.config}" if options.config else \
        f"run {source.run_id}" if source.run_id else source.description
    config = checked_config(source, options.sets, where)
    config.pop("save_weights", None)
    seeds = seeds_for(config, source, options.seeds, options.seed_list)
    base = LosoConfig.from_dict({**config, "seed": seeds[0]}).to_dict()  # checks the config before any work
    unseeded = {k: v for k, v in base.items() if k != "seed"}
    if not options.method:  # a derived label (a preset's, 'best found', ...) says what --set changed
        source = source._replace(method=changed_label(source.method, changed_settings(source.config, base)))
    ray_storage = options.ray_storage or str(Path(options.storage, "ray"))
    if "://" in ray_storage:
        check_remote_storage(ray_storage, "--ray-storage")   # before anything is recorded
    data, data_root = load_rerun_data(options.data, source, options.storage)
    if "://" not in ray_storage:
        ray_storage = str(ensure_writable_dir(Path(ray_storage).resolve()))
    path = experiment_path(ray_storage, unseeded, data_root, seeds)
    plan = None
    if resumed := tune.Tuner.can_restore(path):   # restoring unpickles it: only an experiment no one else wrote
        check_restorable({"ray_storage": ray_storage, "ray_path": path}, path.rpartition("/")[2])
        plan = check_experiment(path, f"the rerun at {path}", lambda trial: LosoConfig.from_dict(
            {**unseeded, **trial.config}), data, errored=True)
    store = store or open_store(options.tracking_uri, options.experiment, create=True)
    client, method, provenance = store.client, source.method, tracking.provenance(data)
    seed_text, used = ",".join(map(str, seeds)), select_subjects(data, base["subjects"])

    def new_run(name, tags, params):
        tags = {k: v for k, v in {**tags, **tracking.provenance_tags(provenance)}.items() if v}
        run_id = tracking.retry(client.create_run, store.experiment_id, tags=tags, run_name=name).info.run_id
        tracking.log_params(client, run_id, params)
        tracking.log_dataset(client, run_id, provenance["htnet_data"], data_root,
                             data_tags(data)["htnet.data_source"] == "synthetic")
        return run_id

    with ray_session(options.address, options.num_cpus):
        check_resources({"cpu": options.cpus_per_seed, "gpu": options.gpus_per_seed}, "--cpus-/--gpus-per-seed")
        parent_id = new_run(f"rerun {method}", {
            "htnet.role": "rerun", "htnet.method": method, "htnet.model": base["model"], "htnet.seeds": seed_text,
            "htnet.protocols": ",".join(base["protocols"]), "htnet.source": source.description,
            "htnet.source_run_id": source.run_id, "htnet.source_search": source.search, **data_tags(used)},
            {**flatten(unseeded), "seeds": seed_text, "data": data_root, "cpus_per_seed": options.cpus_per_seed,
             "gpus_per_seed": options.gpus_per_seed})
        tracking.retry(client.log_dict, parent_id, unseeded, "config.yaml")
        folds, models = len(used.subject_ids), 2 if "inner" in base["protocols"] else 1
        print(f"rerun {method!r}: {source.description}; {plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))})"
              f" in parallel on Ray; data {data_root} ({plural(len(used), 'sample')}, {plural(folds, 'subject')} "
              f"used)\ncost: {plural(len(seeds), 'seed')} x {plural(folds, 'fold')} x "
              f"{plural(base['epochs'], 'epoch')} x {plural(models, 'model')} per fold = "
              f"{len(seeds) * folds * base['epochs'] * models:,} fold-epochs\nRay Tune experiment {path}"
              + (": going on from the interrupted rerun there" if resumed else ""), file=out, flush=True)
        started = time.time()
        children = {seed: new_run(f"{method} seed {seed}", {
            "mlflow.parentRunId": parent_id, "htnet.role": "rerun_seed", "htnet.seed": str(seed),
            "htnet.method": method, "htnet.status": "running"}, flatten({**base, "seed": seed})) for seed in seeds}
        try:
            results = fit_seeds(path, unseeded, seeds, data, options, provenance, plan)
            if any(r.error is None and (r.metrics or {}).get("final") != 1 for r in results.values()):
                raise KeyboardInterrupt   # Ray Tune stopped on Ctrl+C (or SIGTERM), its experiment kept
        except BaseException:
            for run_id in children.values():
                tracking.set_tags(client, run_id, {"htnet.status": "interrupted"})
                tracking.retry(client.set_terminated, run_id, "KILLED")
            tracking.retry(client.set_terminated, parent_id, "KILLED")
            raise
    rows, predictions = zip(*(end_seed(client, children[seed], seed, results[seed], out) for seed in seeds))
    seeds_table, summary = log_summary(client, source, parent_id, rows, [p for p in predictions if p is not None],
                                       started)
    with contextlib.suppress(OSError):   # MLflow has every seed: the same command again is a new rerun
        fs, folder = open_folder(path)
        fs.delete_dir(folder)
    print_summary(method, seeds_table, summary, out)
    print(f"MLflow: rerun parent run {parent_id} (experiment {store.experiment}, tag htnet.method={method!r})",
          file=out)
    return {"parent_run_id": parent_id, "seeds": seeds_table, "summary": summary, "method": method, "config": base}
