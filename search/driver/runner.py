"""Start, resume and inspect a search: the driver that ties Ray Tune, Optuna and MLflow together
(where it keeps what: search.driver.stores). One process at a time runs or resumes a search; without
--address it starts its own local Ray with a watchdog (search.driver.ray_setup)."""
import collections
import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from htnet.errors import UserError, first_line
from htnet.io import atomic_write, ensure_writable_dir, read_yaml
from htnet.loso import parse_subjects
from search.driver.console import library_stdout, log_path, search_console
from search.driver.ray_setup import check_resources, ray_session
from search.driver.stores import (NAME_PATTERN, SETTINGS_KEYS, check_remote_storage, check_restorable, data_source,
                                  default_tracking_uri, load_data, manifest_path, no_such_search, open_optuna_storage, read_manifest,
                                  restore_deleted_checkpoints, search_lock, search_names, write_manifest)
from search.space import SPACES_DIR, check_fixed_values, load_space, parse_space, set_fixed, with_overrides

DEFAULT_SPACE = SPACES_DIR / "demo.yaml"


@dataclass
class Options:
    """Everything `python -m search run` takes; None leaves the space file's value."""
    space: str = str(DEFAULT_SPACE)
    name: str | None = None
    data: str | None = None
    storage: str = "runs"
    ray_storage: str | None = None
    optuna_storage: str | None = None
    tracking_uri: str | None = None
    experiment: str = "htnet"
    address: str | None = None
    num_cpus: int | None = None
    num_samples: int | None = None
    max_concurrent_trials: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    objective: str | None = None
    sampler: str | None = None
    seed: int | None = None
    pruner: str | None = None
    max_failures: int | None = None
    subjects: str | None = None
    save_weights: bool = False
    sets: list = field(default_factory=list)
    top: int = 10
    verbose: int = 0  # 0: the libraries' output only in the log file; 1, 2: on the console too (Ray Tune's verbose)


def resolve_space(options):
    """The space file with the options' search settings and --set values."""
    resources = {k: float(v) for k, v in (("cpu", options.cpus_per_trial), ("gpu", options.gpus_per_trial))
                 if v is not None}
    flags = ("num_samples", "max_concurrent_trials", "objective", "sampler", "seed", "pruner", "max_failures")
    space = with_overrides(load_space(options.space), resources=resources or None,
                           **{key: getattr(options, key) for key in flags})
    space = set_fixed(space, options.sets)
    if options.sets:
        check_fixed_values(space, "--set")
    return space


def trial_dirname(trial):
    return f"{trial.trainable_name}_{trial.trial_id}"


def make_trainable(space, data, overrides, provenance, replay=None):
    """The Ray trainable; `provenance` (tracking.provenance) goes into every trial's result and run tags."""
    from ray import tune

    from search.trainable import loso_trial

    settings = {"space": space, "overrides": overrides, "replay": replay or {}, "provenance": provenance}
    trainable = tune.with_parameters(loso_trial, data=data, settings=settings)
    return tune.with_resources(trainable, {"cpu": space.resources["cpu"], "gpu": space.resources["gpu"]})


def effective_samples(space):
    """The trials a search runs: a grid sampler's no more than its points."""
    return min(space.num_samples, len(space.grid_points())) if space.sampler["type"] == "grid" else space.num_samples


def run_search(options, out=None):
    """Start a new search; returns its summary (see `summarize`). Our own lines go to `out` (default: stdout),
    the libraries' output to the search's log file (search.driver.console)."""
    from search import tracking

    out = out or sys.stdout
    space = resolve_space(options)
    name = options.name or f"{Path(space.source).stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    tracking_uri = options.tracking_uri or default_tracking_uri()
    tracking.check_reachable(tracking_uri)  # before anything is written or any trial runs
    storage = ensure_writable_dir(Path(options.storage).resolve())
    with search_console(log_path(storage, name), options.verbose, out):
        return start_search(options, space, name, tracking_uri, storage, out)


def start_search(options, space, name, tracking_uri, storage, out):
    import optuna
    from ray import tune

    from htnet.folds import check_fold_classes
    from htnet.loso import lone_subjects_warning, select_subjects
    from search import tracking
    from search.driver.progress import SearchProgress
    from search.pruning import OptunaPruningScheduler, PruningOptunaSearch

    ray_storage = options.ray_storage or str(storage / "ray")
    if "://" in ray_storage:
        check_remote_storage(ray_storage)
    else:
        ray_storage = str(ensure_writable_dir(Path(ray_storage).resolve()))
    overrides = {**({"subjects": parse_subjects(options.subjects)} if options.subjects else {}),
                 **({"save_weights": True} if options.save_weights else {})}  # LOSO values of every trial
    source = data_source(options, space, storage)
    data, data_root = load_data(source)
    used = select_subjects(data, overrides.get("subjects"))
    check_fold_classes(used)  # before any trial: every fold must be trainable (a class in every training set)
    if warning := lone_subjects_warning(used):  # subjects with a single sample are valid folds: one line names them
        print(warning, file=sys.stderr)
    description = f"{space.description or Path(space.source).stem}; on {data_description(source, data, used)}"
    provenance = tracking.provenance(data)   # the code and data the trials run, as recorded
    with search_lock(storage, name, "wait for it to end or pick another --name"):
        if manifest_path(storage, name).exists():
            raise UserError(f"search {name!r} exists: resume it with `python -m search resume {name}` "
                            f"or pick another --name")
        client = tracking.client_for(tracking_uri)  # creates or checks a local store
        optuna_url = options.optuna_storage or f"sqlite:///{(storage / 'optuna.db').resolve()}"
        if name in optuna.get_all_study_names(open_optuna_storage(optuna_url)):
            raise UserError(f"an Optuna study named {name!r} exists in {optuna_url}: pick another --name")
        space.num_samples = effective_samples(space)
        with ray_session(options.address, options.num_cpus):
            flags = [f"{flag} {value:g}" for flag, value in (("--cpus-per-trial", options.cpus_per_trial),
                                                             ("--gpus-per-trial", options.gpus_per_trial),
                                                             ("--num-cpus", options.num_cpus)) if value is not None]
            check_resources(space.resources, " with ".join(flags) or f"{space.source}: resources")
            try:  # the search's records: only once its trials can run
                experiment_id = tracking.ensure_experiment(client, options.experiment, tracking_uri)
                parent_run_id = tracking.start_parent_run(
                    client, experiment_id, name, space, space.metric,
                    {"data": data_root, "optuna_storage": optuna_url, "ray_storage": ray_storage,
                     **{f"override.{k}": v for k, v in overrides.items()}},
                    {**tracking.provenance_tags(provenance), "mlflow.note.content": description})
            except tracking.mlflow_errors() as e:
                raise UserError(f"--tracking-uri {tracking_uri}: {first_line(e)}") from None
            manifest = {"name": name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                        "status": "running", "description": description, "space_file": space.source,
                        "space": space.raw, "verbose": options.verbose, "log": str(log_path(storage, name)),
                        "settings": {key: getattr(space, key) for key in SETTINGS_KEYS},
                        "sets": list(options.sets), "overrides": overrides, "data": source,
                        "data_root": data_root, "tracking_uri": tracking_uri, "experiment": options.experiment,
                        "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                        "optuna_storage": optuna_url, "ray_storage": ray_storage,
                        "ray_path": f"{ray_storage.rstrip('/')}/{name}", "address": options.address}
            write_manifest(storage, name, manifest)
            print(f"search {name}: {space.num_samples} trials of {shown_path(space.source)}, objective "
                  f"{space.metric} ({space.objective} protocol), {space.sampler['type']} sampler, "
                  f"{space.pruner['type']} pruner", file=out)
            print(f"data: {data_description(source, data, used, shown_path(data_root))}"
                  + (f" (--subjects {options.subjects})" if options.subjects else ""), file=out)
            print(log_line(manifest, storage, name), file=out, flush=True)
            searcher = PruningOptunaSearch(space=space.optuna_space(), metric=space.metric, mode="max",
                                           pruner=space.make_pruner(), sampler=space.make_sampler(),
                                           study_name=name, storage=open_optuna_storage(optuna_url))
            callback = tracking.MlflowTracking(tracking_uri, experiment_id, name, parent_run_id, space,
                                               searcher, overrides, results_path=manifest["ray_path"])
            progress = SearchProgress(space, searcher, space.num_samples)
            tuner = tune.Tuner(
                make_trainable(space, data, overrides, provenance),
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=OptunaPruningScheduler(searcher),
                    num_samples=space.num_samples, max_concurrent_trials=space.max_concurrent_trials,
                    trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name, storage_path=ray_storage, callbacks=[callback, progress],
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                    # each holds all finished folds: the latest two (the last may be half-written)
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    verbose=options.verbose))
            with library_stdout():
                tuner.fit()
        # MLflow went away mid-search: fill it in now if it is back
        return finish_or_report(storage, name, space, options.top, out, fill=callback.offline)


def resume_search(name, storage="runs", address=None, num_cpus=None, top=10, out=None):
    """Resume a search whose driver stopped (killed, Ctrl+C, machine restart). Everything else
    (space, data, stores, progress output) is as the search was started. Ray's experiment is
    checked before it is loaded (check_restorable)."""
    out = out or sys.stdout
    storage = Path(storage).resolve()
    if not NAME_PATTERN.match(name) or not (manifest_path(storage, name).is_file()
                                            or manifest_path(storage, name).with_suffix(".lock").is_file()):
        raise no_such_search(storage, name)
    with search_lock(storage, name):
        manifest = read_manifest(storage, name)
        with search_console(log_path(storage, name), manifest.get("verbose", 1), out):  # as it was started
            return continue_search(manifest, storage, name, address, num_cpus, top, out)


def continue_search(manifest, storage, name, address, num_cpus, top, out):
    from ray import tune

    from search import tracking

    check_restorable(manifest, name)
    if not tune.Tuner.can_restore(manifest["ray_path"]):
        raise UserError(f"search {name!r}: Ray Tune has no restorable experiment at {manifest['ray_path']}")
    tracking.check_reachable(manifest["tracking_uri"])
    space = space_of(manifest)
    data, data_root = load_data(manifest["data"])
    client = tracking.client_for(manifest["tracking_uri"])
    with ray_session(address or manifest.get("address"), num_cpus):
        check_resources(space.resources, f"search {name!r} (resources in {manifest_path(storage, name)})"
                        + (f" with --num-cpus {num_cpus}" if num_cpus is not None else ""))
        tracking.retry(client.update_run, manifest["parent_run_id"], status="RUNNING")
        replay = tracking.replay_results(client, manifest["experiment_id"], manifest["parent_run_id"],
                                         space.metric)
        manifest["status"] = "running"
        manifest.setdefault("log", str(log_path(storage, name)))  # a record from before the log files
        manifest.setdefault("resumed", []).append(datetime.datetime.now().isoformat(timespec="seconds"))
        write_manifest(storage, name, manifest)
        print(f"resuming search {name} from {manifest['ray_path']} ({len(replay)} trials already ended)",
              file=out)
        print(log_line(manifest, storage, name), file=out, flush=True)
        for trial_id in restore_deleted_checkpoints(manifest["ray_path"]):
            print(f"trial {trial_id}: Ray's snapshot named an older checkpoint than the trial's last; it goes on "
                  f"from its last one", file=out)
        tuner = tune.Tuner.restore(
            manifest["ray_path"], trainable=make_trainable(space, data, manifest.get("overrides") or {},
                                                          tracking.provenance(data), replay),
            resume_unfinished=True, resume_errored=False)
        with library_stdout():
            tuner.fit()
    return finish_or_report(storage, name, space, top, out, fill=True)


def space_of(manifest):
    space = parse_space(manifest["space"], manifest["space_file"])
    settings = manifest["settings"]
    space = with_overrides(space, **{k: settings[k] for k in SETTINGS_KEYS if k not in ("sampler", "pruner")})
    space.sampler, space.pruner = settings["sampler"], settings["pruner"]
    return set_fixed(space, manifest.get("sets"))


def data_description(source, data, used, root=None):
    """What the trials train on, e.g. 'the synthetic composite at R: 6 of its 9 subjects (casme2 2, samm 2,
    smic 2), 45 samples'."""
    kind = "the synthetic composite" if "synthetic" in source else "the release"
    count, total = len(used.subject_ids), len(data.subject_ids)
    per_dataset = ", ".join(f"{dataset} {n}" for dataset, n in used.summary()["subjects"].items())
    subjects = f"{count} of its {total} subjects" if count < total else f"{total} subjects"
    return f"{kind} at {root or data.source}: {subjects} ({per_dataset}), {len(used)} samples"


def shown_path(path):
    """A path as the user would type it: relative to the working folder when it lies under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def log_line(manifest, storage, name):
    where = shown_path(log_path(storage, name))
    if manifest.get("verbose", 1):
        return f"log: {where} (Ray's, MLflow's and Optuna's messages, also shown here)"
    return f"log: {where} holds Ray's, MLflow's and Optuna's messages (--verbose shows them here)"


# ----------------------------------------------------------------------------- the end

def optuna_trials(manifest):
    """The trials of the search's Optuna study (none where the study is gone)."""
    import optuna

    try:
        study = optuna.load_study(study_name=manifest["name"], storage=open_optuna_storage(manifest["optuna_storage"]))
    except KeyError:
        return []
    return study.get_trials(deepcopy=False)


def fill_mlflow(manifest, name, space, out):
    """Log to MLflow every ended trial that Ray Tune recorded and MLflow missed (tracking.backfill)."""
    from ray import tune

    from search import tracking

    check_restorable(manifest, name)  # ExperimentAnalysis unpickles the trials' state
    analysis = tune.ExperimentAnalysis(manifest["ray_path"])
    numbers = {t.user_attrs["ray_trial_id"]: t.number for t in optuna_trials(manifest)
               if "ray_trial_id" in t.user_attrs}
    filled = tracking.backfill(tracking.client_for(manifest["tracking_uri"]), manifest["experiment_id"],
                               manifest["parent_run_id"], name, space, analysis.trials, analysis.trial_dataframes,
                               manifest.get("overrides") or {}, numbers)
    if filled:
        print(f"MLflow: logged {len(filled)} ended trial(s) it had missed", file=out)


def finish_or_report(storage, name, space, top, out, fill=False):
    """Finish the search (after logging what MLflow missed, with `fill`), or, where MLflow does not answer, say so
    in one line and keep everything."""
    from search import tracking

    manifest = read_manifest(storage, name)
    try:
        reason = tracking.unreachable(manifest["tracking_uri"]) if fill else None
        if reason is None:
            if fill:
                fill_mlflow(manifest, name, space, out)
            return finish(storage, name, space, top, out)
    except tracking.mlflow_errors() as e:
        reason = tracking.short_reason(e)
    manifest["status"] = "interrupted"
    write_manifest(storage, name, manifest)
    print(f"error: {tracking.unreachable_message(manifest['tracking_uri'], reason, name, manifest['ray_path'])}",
          file=sys.stderr, flush=True)
    return {"name": name, "manifest": manifest, "complete": False, "mlflow_error": reason}


def summarize(storage, name, space=None):
    """The trial table of a search (from MLflow) with counts and the Optuna study's view."""
    from search import tracking

    manifest = read_manifest(storage, name)
    space = space or space_of(manifest)
    client = tracking.client_for(manifest["tracking_uri"])
    table = tracking.trial_table(client, manifest["experiment_id"], manifest["parent_run_id"],
                                 space.metric, space.names)
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    ended = sum(counts.get(s, 0) for s in ("finished", "pruned", "failed"))
    return {"name": name, "manifest": manifest, "space": space, "table": table, "counts": counts,
            "complete": ended >= manifest["settings"]["num_samples"], "client": client}


def finish(storage, name, space, top, out):
    from search import tracking

    summary = summarize(storage, name, space)
    manifest, complete = summary["manifest"], summary["complete"]
    manifest["status"] = "finished" if complete else "interrupted"
    write_manifest(storage, name, manifest)
    best = write_best_config(storage, name, summary)
    if not complete:
        tracking.mark_interrupted(summary["client"], manifest["experiment_id"], manifest["parent_run_id"])
        summary = summarize(storage, name, space)  # with the trial runs it marked
    tracking.finish_parent_run(summary["client"], manifest["parent_run_id"], summary["table"], space.metric,
                               "FINISHED" if complete else "KILLED")
    print_summary(summary, top, best, out)
    return {**summary, "best_config": best}


def write_best_config(storage, name, summary):
    import mlflow.artifacts

    table, metric = summary["table"], summary["space"].metric
    finished = table[table["status"] == "finished"] if len(table) else table
    if not len(finished) or finished[metric].isna().all():
        return None
    best = finished.loc[finished[metric].idxmax()]
    try:
        config = read_yaml(mlflow.artifacts.download_artifacts(run_id=best["run_id"], artifact_path="config.yaml",
                                                               tracking_uri=summary["manifest"]["tracking_uri"]))
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not read the best trial's config.yaml: {e}", file=sys.stderr)
        return None
    with atomic_write(path := manifest_path(storage, name).with_suffix(".best.yaml")) as f:
        f.write(f"# best trial {best['trial_id']} of search {name}: {metric} = {best[metric]:.4f}\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def browse_hint(tracking_uri, experiment):
    """One sentence: a tracking server is opened in a browser; a local store is served by `mlflow ui` first."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"browse the runs: open {tracking_uri} (experiment {experiment})"
    if tracking_uri.startswith("sqlite:///"):
        tracking_uri = f"sqlite:///{shown_path(tracking_uri[len('sqlite:///'):])}"
    return (f"browse the runs: mlflow ui --backend-store-uri {tracking_uri}, then open http://127.0.0.1:5000 "
            f"(experiment {experiment})")


def print_summary(summary, top, best, out):
    import pandas as pd

    table, space, manifest, counts = summary["table"], summary["space"], summary["manifest"], summary["counts"]
    shown = [f"{counts.get(s, 0)} {s}" for s in ("finished", "pruned", "failed")]
    shown += [f"{counts[s]} {s}" for s in ("running", "interrupted") if counts.get(s)]
    print(f"\nsearch {summary['name']} ({manifest['status']}): {', '.join(shown)} of "
          f"{manifest['settings']['num_samples']} trials; objective {space.metric} (max)", file=out)
    if len(table):
        columns = ["trial_id", "status", space.metric, "inner_full_uf1", "inner_full_uar",
                   "paper_full_uf1", "paper_full_uar", "folds_done", *space.names]
        shown = table[[c for c in dict.fromkeys(columns) if c in table]].head(top)
        with pd.option_context("display.width", 250, "display.max_columns", 40):
            text = shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")
        print(f"top trials:\n{text}", file=out)
    if best is not None:
        best, data = shown_path(best), shown_path(manifest["data_root"])
        print(f"best configuration: {best}\n  rerun it: python -m htnet train --config {best} --data {data}",
              file=out)
    if manifest["status"] != "finished":
        print(f"the search did not finish: resume it with `python -m search resume {summary['name']}`", file=out)
    print(browse_hint(manifest["tracking_uri"], manifest["experiment"]), file=out)
    print(f"inspect the Optuna study (pip install optuna-dashboard): optuna-dashboard "
          f"{manifest['optuna_storage']}", file=out)


def status(storage, name=None, top=10, out=None):
    """One search's summary and its Optuna study's trial states; without `name`, one line per search: a damaged
    record is marked on its line, the others are listed, and the list ends in one error line naming the damaged
    files (exit 2)."""
    out = out or sys.stdout
    if name is not None:
        summary = summarize(Path(storage), name)
        best = manifest_path(storage, name).with_suffix(".best.yaml")
        print_summary(summary, top, best if best.is_file() else None, out)
        counts = collections.Counter(trial.state.name for trial in optuna_trials(summary["manifest"]))
        print("Optuna study: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no trials"), file=out)
        return summary
    folder, names, damaged = Path(storage) / "searches", search_names(storage), []
    if not names:
        print(f"no searches in {folder}", file=out)
    for name in names:
        try:
            manifest = read_manifest(storage, name)
        except UserError as e:
            damaged.append(manifest_path(storage, name).name)
            print(f"{name}: DAMAGED: {e}", file=out)
            continue
        print(f"{name}: {manifest['status']}, started {manifest.get('created')}, "
              f"{manifest['settings']['num_samples']} trials of {manifest['space_file']}", file=out)
    if damaged:
        raise UserError(f"{folder}: damaged search record(s): {', '.join(damaged)} (the others are listed)")
    return names
