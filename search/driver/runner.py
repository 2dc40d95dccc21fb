"""Start and resume a search: one tune.Tuner over Ray Tune, Optuna and MLflow, one driver per search (its lock).
MLflow is a view of Ray's results: a search's end and every resume log what it lacks (tracking.sync)."""
import dataclasses
import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from ray import tune

from htnet.errors import UserError, first_line
from htnet.folds import check_fold_classes
from htnet.io import atomic_write, ensure_writable_dir
from htnet.loso import lone_subjects_warning, parse_subjects, select_subjects
from search import tracking
from search.driver.console import library_output, log_path, search_console
from search.driver.progress import SearchProgress
from search.driver.ray_setup import check_resources, ray_session
from search.driver.stores import (NAME_PATTERN, SETTINGS_KEYS, check_experiment, check_remote_storage,
                                  check_restorable, data_source, default_tracking_uri, load_data, manifest_path,
                                  no_such_search, open_optuna_storage, read_manifest, restore_deleted_checkpoints,
                                  search_lock, space_copy, write_manifest)
from search.driver.summary import browse_hint, finish, optuna_trials, shown_path, status  # noqa: F401 - the CLI's
from search.pruning import OptunaPruningScheduler, PruningOptunaSearch
from search.space import SPACES_DIR, check, load_space, trial_config, with_settings
from search.trainable import loso_trial

FLAGS = ("num_samples", "max_concurrent_trials", "objective", "sampler", "seed", "pruner", "max_failures")


@dataclass
class Options:
    """Everything `python -m search run` takes; None leaves the space file's value."""
    space: str = str(SPACES_DIR / "demo.py")
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
    verbose: int = 0  # 0: the libraries' output only in the log file; 1, 2: on the console too


def resolve_space(options):
    """The space file with the options' settings and --set values."""
    return with_settings(load_space(options.space), options.sets, options.cpus_per_trial, options.gpus_per_trial,
                         **{key: getattr(options, key) for key in FLAGS})


def trial_dirname(trial):  # by name in Ray's tuner.pkl: searches started earlier restore it
    return f"{trial.trainable_name}_{trial.trial_id}"


def make_trainable(space, data, overrides, provenance):
    trainable = tune.with_parameters(loso_trial, data=data,
                                     settings={"space": space, "overrides": overrides, "provenance": provenance})
    return tune.with_resources(trainable, {"cpu": space.resources["cpu"], "gpu": space.resources["gpu"]})


def run_search(options, out=None):
    """Start a new search; returns its summary. Our own lines go to `out` (default: stdout), the libraries'
    output to the search's log file."""
    out = out or sys.stdout
    space = resolve_space(options)
    check(space)  # before anything is written
    name = options.name or f"{Path(space.source).stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    tracking_uri = options.tracking_uri or default_tracking_uri()
    tracking.check_reachable(tracking_uri)  # before anything is written or any trial runs
    storage = ensure_writable_dir(Path(options.storage).resolve())
    with search_console(log_path(storage, name), options.verbose, out):
        return start_search(options, space, name, tracking_uri, storage, out)


def start_search(options, space, name, tracking_uri, storage, out):
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
    check_fold_classes(used)  # before any trial: every fold must have a class in every training set
    if warning := lone_subjects_warning(used):
        print(warning, file=sys.stderr)
    description = f"{space.description or Path(space.source).stem}; on {data_description(source, data, used)}"
    provenance = tracking.provenance(data)
    dataset = dataset_of(source, provenance, data_root)
    optuna_url = options.optuna_storage or f"sqlite:///{(storage / 'optuna.db').resolve()}"
    with search_lock(storage, name, "wait for it to end or pick another --name"):
        if manifest_path(storage, name).exists():
            raise UserError(f"search {name!r} exists: resume it with `python -m search resume {name}` "
                            f"or pick another --name")
        client = tracking.client_for(tracking_uri)  # creates or checks a local store
        if name in optuna.get_all_study_names(open_optuna_storage(optuna_url)):
            raise UserError(f"an Optuna study named {name!r} exists in {optuna_url}: pick another --name")
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
                    {**tracking.provenance_tags(provenance), "mlflow.note.content": description}, dataset)
            except tracking.mlflow_errors() as e:
                raise UserError(f"--tracking-uri {tracking_uri}: {first_line(e)}") from None
            manifest = {"name": name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                        "status": "running", "description": description,
                        "space_file": str(Path(space.source).resolve()), "verbose": options.verbose,
                        "log": str(log_path(storage, name)),
                        "settings": {key: getattr(space, key) for key in SETTINGS_KEYS}, "sets": list(options.sets),
                        "overrides": overrides, "data": source, "data_root": data_root, "tracking_uri": tracking_uri,
                        "experiment": options.experiment, "experiment_id": experiment_id,
                        "parent_run_id": parent_run_id, "optuna_storage": optuna_url, "ray_storage": ray_storage,
                        "ray_path": f"{ray_storage.rstrip('/')}/{name}", "address": options.address}
            with atomic_write(space_copy(storage, name)) as f:
                f.write(space.text)
            write_manifest(storage, name, manifest)
            print(f"search {name}: {space.num_samples} trials of {shown_path(space.source)}, objective "
                  f"{space.metric} ({space.objective} protocol), {space.sampler['type']} sampler, "
                  f"{space.pruner['type']} pruner\ndata: {data_description(source, data, used, shown_path(data_root))}"
                  + (f" (--subjects {options.subjects})" if options.subjects else ""), file=out)
            searcher = PruningOptunaSearch(space=space.optuna_space(), metric=space.metric, mode="max",
                                           pruner=space.make_pruner(), sampler=space.make_sampler(),
                                           study_name=name, storage=open_optuna_storage(optuna_url))
            callbacks = [tracking.MlflowTracking(tracking_uri, experiment_id, name, parent_run_id, space, searcher,
                                                 overrides, dataset),
                         SearchProgress(space, searcher, space.num_samples)]
            fit(manifest, storage, out, tune.Tuner(
                make_trainable(space, data, overrides, provenance),
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=OptunaPruningScheduler(searcher),
                    num_samples=space.num_samples, max_concurrent_trials=space.max_concurrent_trials,
                    trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name, storage_path=ray_storage, callbacks=callbacks,
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                    # each holds all finished folds: the latest two (the last may be half-written)
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=options.verbose)))
        return sync_and_finish(storage, manifest, space, options.top, out, dataset)


def resume_search(name, storage="runs", address=None, num_cpus=None, top=10, out=None):
    """Resume a search whose driver stopped, as it was started (space, data, stores, console)."""
    out = out or sys.stdout
    storage = Path(storage).resolve()
    if not NAME_PATTERN.match(name) or not (manifest_path(storage, name).is_file()
                                            or manifest_path(storage, name).with_suffix(".lock").is_file()):
        raise no_such_search(storage, name)
    with search_lock(storage, name):
        manifest = read_manifest(storage, name)
        with search_console(log_path(storage, name), manifest.get("verbose", 1), out):
            return continue_search(manifest, storage, name, address, num_cpus, top, out)


def continue_search(manifest, storage, name, address, num_cpus, top, out):
    check_restorable(manifest, name)
    if not tune.Tuner.can_restore(manifest["ray_path"]):
        raise UserError(f"search {name!r}: Ray Tune has no restorable experiment at {manifest['ray_path']}")
    tracking.check_reachable(manifest["tracking_uri"])
    space = dataclasses.replace(with_settings(load_space(space_copy(storage, name)), manifest.get("sets") or ()),
                                **{key: manifest["settings"][key] for key in SETTINGS_KEYS})  # as it was started
    data, data_root = load_data(manifest["data"])
    overrides = manifest.get("overrides") or {}
    plan = check_experiment(manifest["ray_path"], f"search {name!r}", lambda trial: trial_config(
        space, trial.config, overrides), data)
    provenance, client = tracking.provenance(data), tracking.client_for(manifest["tracking_uri"])
    with ray_session(address or manifest.get("address"), num_cpus):
        check_resources(space.resources, f"search {name!r} (resources in {manifest_path(storage, name)})"
                        + (f" with --num-cpus {num_cpus}" if num_cpus is not None else ""))
        tracking.retry(client.update_run, manifest["parent_run_id"], status="RUNNING")
        manifest["status"] = "running"
        manifest.setdefault("log", str(log_path(storage, name)))  # a record from before the log files
        write_manifest(storage, name, manifest)
        print(f"resuming search {name} from {manifest['ray_path']}", file=out)
        on_disk = Path(manifest["space_file"])
        if on_disk.is_file() and on_disk.read_text(errors="replace") != space.text:
            print(f"{shown_path(on_disk)} has changed since the search started: it goes on with the copy it started "
                  f"with, {shown_path(space.source)}", file=out)
        for trial_id in restore_deleted_checkpoints(plan):
            print(f"trial {trial_id}: Ray's snapshot named an older checkpoint than the trial's last; it goes on "
                  f"from its last one", file=out)
        fit(manifest, storage, out, tune.Tuner.restore(
            manifest["ray_path"], trainable=make_trainable(space, data, overrides, provenance),
            resume_unfinished=True, resume_errored=False))
    return sync_and_finish(storage, manifest, space, top, out, dataset_of(manifest["data"], provenance, data_root))


def fit(manifest, storage, out, tuner):
    """Say where the libraries' messages go, and run the trials."""
    where = shown_path(log_path(storage, manifest["name"]))
    print(f"log: {where} (Ray's, MLflow's and Optuna's messages, also shown here)" if manifest.get("verbose", 1)
          else f"log: {where} holds Ray's, MLflow's and Optuna's messages (--verbose shows them here)",
          file=out, flush=True)
    with library_output():
        tuner.fit()


def data_description(source, data, used, root=None):
    """E.g. 'the synthetic composite at R: 6 of its 9 subjects (casme2 2, samm 2, smic 2), 45 samples'."""
    kind = "the synthetic composite" if "synthetic" in source else "the release"
    count, total = len(used.subject_ids), len(data.subject_ids)
    per_dataset = ", ".join(f"{dataset} {n}" for dataset, n in used.summary()["subjects"].items())
    subjects = f"{count} of its {total} subjects" if count < total else f"{total} subjects"
    return f"{kind} at {root or data.source}: {subjects} ({per_dataset}), {len(used)} samples"


def dataset_of(source, provenance, data_root):
    return provenance["htnet_data"], data_root, "synthetic" in source  # tracking.log_dataset's arguments


def sync_and_finish(storage, manifest, space, top, out, dataset):
    """Log to MLflow what it lacks of Ray's results and finish; where MLflow does not answer, one line, and
    everything is kept for the next `search resume`."""
    name, uri = manifest["name"], manifest["tracking_uri"]
    try:
        if (reason := tracking.unreachable(uri)) is None:
            check_restorable(manifest, name)  # ExperimentAnalysis unpickles the trials' state
            numbers = {t.user_attrs["ray_trial_id"]: t.number for t in optuna_trials(manifest)
                       if "ray_trial_id" in t.user_attrs}
            filled = tracking.sync(tracking.client_for(uri), manifest["experiment_id"], manifest["parent_run_id"],
                                   name, space, tune.ExperimentAnalysis(manifest["ray_path"]),
                                   manifest.get("overrides") or {}, numbers, dataset)
            if filled:
                print(f"MLflow: logged {len(filled)} ended trial(s) it lacked, from Ray's results", file=out)
            return finish(storage, name, space, top, out)
    except tracking.mlflow_errors() as e:
        reason = tracking.short_reason(e)
    manifest["status"] = "interrupted"
    write_manifest(storage, name, manifest)
    print(f"error: {tracking.unreachable_message(uri, reason, name, manifest['ray_path'])}", file=sys.stderr,
          flush=True)
    return {"name": name, "manifest": manifest, "complete": False, "mlflow_error": reason}
