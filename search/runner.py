"""Start, resume and inspect a search: the driver that ties Ray Tune, Optuna and MLflow together.

    runs/                      (--storage; every path below can be moved by a flag)
      ray/<name>/              Ray Tune's experiment (Tuner.restore resumes from here)
      searches/<name>.yaml     what the search was started with (space, data, stores, parent run)
      searches/<name>.best.yaml the best finished trial's LOSO config (python -m htnet train --config)
      optuna.db                the Optuna studies, one per search (optuna-dashboard sqlite:///runs/optuna.db)
      searches/<name>.lock     held (flock) by the process running or resuming the search
      synthetic/               the built-in synthetic data set, generated once
    mlflow.db                  the MLflow store (mlflow ui --backend-store-uri sqlite:///mlflow.db)

One process at a time runs or resumes a search (the lock above); the shared stores (MLflow's and
Optuna's sqlite files, the synthetic data) are created under a file lock beside them. Without
--address the driver starts its own local Ray and a watchdog process that ends that Ray session's
processes when the driver ends, however it ends (SIGKILL included).
"""
import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from htnet.errors import UserError
from htnet.io import atomic_write, ensure_writable_dir, read_yaml
from htnet.loso import parse_subjects
from search.space import SPACES_DIR, check_fixed_values, load_space, parse_space, set_fixed, with_overrides

DEFAULT_SPACE = SPACES_DIR / "demo.yaml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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
    verbose: int | None = 1


# ----------------------------------------------------------------------------- stores and paths

def default_tracking_uri():
    """MLFLOW_TRACKING_URI (set on the cluster's head), else sqlite:///mlflow.db here."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def default_optuna_storage(storage):
    return f"sqlite:///{(Path(storage) / 'optuna.db').resolve()}"


def open_optuna_storage(url):
    """sqlite:///path, any SQLAlchemy URL, or journal:path / a *.log file (JournalStorage)."""
    import optuna

    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = Path(url[len("journal:"):] if url.startswith("journal:") else url).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    from search.tracking import file_lock

    lock = contextlib.nullcontext()
    if url.startswith("sqlite:///"):  # a new file gets its tables: one process at a time
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = file_lock(path.parent / f".{path.name}.lock")
    try:
        with lock:
            return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - any bad URL or damaged file is the user's
        raise UserError(f"Optuna storage {url}: {first_line(getattr(e, 'orig', None) or e)}") from None


def manifest_path(storage, name):
    return Path(storage) / "searches" / f"{name}.yaml"


MANIFEST_KEYS = {"name": str, "status": str, "space_file": str, "space": dict, "settings": dict,
                 "data": dict, "data_root": str, "tracking_uri": str, "experiment": str,
                 "experiment_id": str, "parent_run_id": str, "optuna_storage": str,
                 "ray_storage": str, "ray_path": str}
SETTINGS_KEYS = ("num_samples", "max_concurrent_trials", "objective", "resources", "max_failures",
                 "sampler", "pruner")


def search_names(storage):
    folder = Path(storage) / "searches"
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.endswith(".best")) if folder.is_dir() else []


def no_such_search(storage, name):
    known = search_names(storage)
    return UserError(f"no search named {name!r} in {Path(storage) / 'searches'}"
                     + (f" (known: {', '.join(known)})" if known else ""))


def read_manifest(storage, name):
    """The search record, checked: a damaged one (not YAML, binary, a key missing) is one line
    naming the file and what is wrong."""
    path = manifest_path(storage, name)
    if not path.is_file():
        raise no_such_search(storage, name)
    manifest = read_yaml(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: damaged search record (not a mapping of keys)")
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest:
            raise UserError(f"{path}: damaged search record: key {key!r} is missing")
        if not isinstance(manifest[key], kind):
            raise UserError(f"{path}: damaged search record: {key} is not a {kind.__name__}")
    missing = [k for k in SETTINGS_KEYS if k not in manifest["settings"]]
    if missing:
        raise UserError(f"{path}: damaged search record: key 'settings.{missing[0]}' is missing")
    if manifest["name"] != name:
        raise UserError(f"{path}: damaged search record: it names search {manifest['name']!r}")
    return manifest


def write_manifest(storage, name, manifest):
    with atomic_write(manifest_path(storage, name)) as f:
        yaml.safe_dump(manifest, f, sort_keys=False)


def check_name(name):
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return name


# ----------------------------------------------------------------------------- pieces

def resolve_space(options):
    space = load_space(options.space)
    resources = {}
    if options.cpus_per_trial is not None:
        if options.cpus_per_trial <= 0:
            raise UserError(f"--cpus-per-trial must be > 0, got {options.cpus_per_trial}")
        resources["cpu"] = float(options.cpus_per_trial)
    if options.gpus_per_trial is not None:
        if options.gpus_per_trial < 0:
            raise UserError(f"--gpus-per-trial must be >= 0, got {options.gpus_per_trial}")
        resources["gpu"] = float(options.gpus_per_trial)
    for flag, value, minimum in (("--num-samples", options.num_samples, 1),
                                 ("--max-concurrent", options.max_concurrent_trials, 1),
                                 ("--max-failures", options.max_failures, 0)):
        if value is not None and value < minimum:
            raise UserError(f"{flag} must be >= {minimum}, got {value}")
    space = with_overrides(space, num_samples=options.num_samples,
                           max_concurrent_trials=options.max_concurrent_trials,
                           objective=options.objective, sampler=options.sampler, seed=options.seed,
                           pruner=options.pruner, max_failures=options.max_failures,
                           resources=resources or None)
    space = set_fixed(space, options.sets)
    if options.sets:
        check_fixed_values(space, "--set")
    return space


def overrides_of(options):
    """LOSO config values the CLI sets for every trial."""
    overrides = {}
    if options.subjects:
        overrides["subjects"] = parse_subjects(options.subjects)
    if options.save_weights:
        overrides["save_weights"] = True
    return overrides


def data_source(options, space, storage):
    if options.data:
        path = Path(options.data).resolve()
        if not path.exists():
            raise UserError(f"--data {options.data}: no such folder")
        return {"path": str(path)}
    return {"synthetic": {"subjects_per_dataset": space.data["synthetic_subjects"],
                          "seed": space.data["synthetic_seed"],
                          "cache": str((Path(storage) / "synthetic").resolve())}}


def load_data(source):
    """The CompositeData of a search: a release folder, or the synthetic set generated once."""
    from htnet.data import load_release, synthetic_cache

    from search.tracking import file_lock

    if "path" in source:
        return load_release(source["path"]), source["path"]
    synth = source["synthetic"]
    Path(synth["cache"]).mkdir(parents=True, exist_ok=True)
    with file_lock(Path(synth["cache"]) / ".lock"):  # two searches starting at once make it once
        root = synthetic_cache(synth["cache"], synth["subjects_per_dataset"], synth["seed"])
    return load_release(root), str(root)


# The watchdog of a local Ray, run as `python -I -c WATCHDOG DRIVER_PID SESSION_DIR` (standard
# library only, so it starts in a blink). It waits until the driver writes to or closes its stdin
# (after ray.shutdown) or dies (SIGKILL included, when nothing can run in the driver), then ends
# every process left of that Ray session: those whose command line names the session folder
# (gcs_server, raylet, ...) or whose stdout/stderr go into it (agents and workers, whose process
# titles Ray rewrites). Ray's own fate-sharing ends only its direct children, and its agents and
# workers otherwise linger for a minute or more. Other Ray sessions are never touched.
WATCHDOG = r"""
import os, select, signal, sys, time
driver, session = int(sys.argv[1]), sys.argv[2].rstrip("/")
for sig in (signal.SIGINT, signal.SIGHUP):  # Ctrl+C, a closed terminal: the driver handles them
    signal.signal(sig, signal.SIG_IGN)
events = [sys.stdin]
try:
    events.append(os.pidfd_open(driver))
except (AttributeError, OSError):
    pass  # no pidfd: os.getppid() notices the driver's death within a second
while os.getppid() == driver and not select.select(events, [], [], 1.0)[0]:
    pass
marks = (session + "/").encode(), (session + "\0").encode()

def session_processes():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (os.getpid(), driver):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read() + b"\0"
        except OSError:
            continue
        outputs = []
        for fd in (1, 2):
            try:
                outputs.append(os.readlink(f"/proc/{entry}/fd/{fd}"))
            except OSError:
                pass
        if any(m in cmdline for m in marks) or any(o.startswith(session + "/") for o in outputs):
            found.append(int(entry))
    return found

first, deadline = {}, time.monotonic() + 60
while time.monotonic() < deadline:
    pids = session_processes()
    if not pids:
        break
    for pid in pids:  # SIGTERM, then SIGKILL what is still there 3 s later
        if pid not in first:
            first[pid], sig = time.monotonic(), signal.SIGTERM
        elif time.monotonic() - first[pid] > 3:
            sig = signal.SIGKILL
        else:
            continue
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(0.2)
"""

_watchdog = None  # the watchdog of the local Ray this process started (subprocess.Popen)


def init_ray(address, num_cpus):
    """Join the Ray cluster at `address`, or start a local Ray with its watchdog (WATCHDOG).
    address="local" makes Ray start one even if a ray_current_cluster file (maybe left by a crashed
    Ray) or RAY_ADDRESS names another cluster. Returns False if Ray was already initialized (the
    caller's Ray, left alone), else True; end with stop_ray."""
    import ray

    global _watchdog
    if ray.is_initialized():
        return False
    if num_cpus is not None and num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {num_cpus}")
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"--address {address}: {first_line(e)}") from None
        restore_sigterm(sigterm)
        return True
    end_watchdog()  # this process's previous local Ray was shut down: clear what is left of it
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    restore_sigterm(sigterm)
    _watchdog = subprocess.Popen([sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()),
                                  context.address_info["session_dir"]],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return True


def restore_sigterm(handler):
    """ray.init replaces the driver's SIGTERM handler (with one that exits at once, and a crash
    handler that aborts): put back the one that was there (the CLI's stops the search as Ctrl+C
    does). Without one of ours, Ray's stays: SystemExit, so stop_ray still runs."""
    import threading

    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def end_watchdog():
    """Tell the watchdog that Ray is shut down; wait while it ends what is left of the session."""
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        watchdog.stdin.write(b"x")  # wakes it even if a forked child still holds this pipe open
        watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(timeout=90)


def stop_ray(started):
    if started:
        import ray

        try:
            ray.shutdown()
        finally:
            end_watchdog()


@contextlib.contextmanager
def ray_session(address, num_cpus):
    """init_ray ... stop_ray around the block, whatever ends it (an error, Ctrl+C, SIGTERM)."""
    started = init_ray(address, num_cpus)
    try:
        yield started
    finally:
        stop_ray(started)


def is_local_ray():
    """True when this process's Ray is a cluster ray.init() started (one node, no autoscaler)."""
    import ray

    return bool(getattr(getattr(ray._private.worker, "_global_node", None), "ray_init_cluster", False))


def check_resources(resources, where):
    """Ray keeps a trial that fits no node PENDING forever: refuse it before anything is recorded.
    A cluster that was joined (--address) may still get such a node from its autoscaler: a warning."""
    import ray

    cpu, gpu = float(resources["cpu"]), float(resources["gpu"])
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        return
    most = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    text = (f"{where}: a trial needs cpu={cpu:g}, gpu={gpu:g}, but no node of the Ray cluster has that "
            f"much (the most any node has: cpu={most['CPU']:g}, gpu={most['GPU']:g})")
    if is_local_ray():
        raise UserError(f"{text}; its trials would wait forever")
    print(f"warning: {text}; the trials wait until the cluster gets such a node", file=sys.stderr, flush=True)


def lock_path(storage, name):
    return Path(storage) / "searches" / f"{name}.lock"


@contextlib.contextmanager
def search_lock(storage, name, hint="wait for it to end"):
    """Held (flock) while this process runs or resumes search `name`, from before its first record
    is written to its end. A second process is refused in one line: two drivers of one search would
    run its trials twice and overwrite each other's records."""
    import fcntl

    path = lock_path(storage, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"search {name!r} is running in another process (pid {holder}); {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock (the kernel does it too if this process is killed)


def check_restorable(manifest, name):
    """Refuse (one line) a Ray experiment that someone else could have written.

    `tune.Tuner.restore` unpickles the experiment's tuner.pkl, its searcher state and its trial
    state, and so does `tune.ExperimentAnalysis`: whoever can write those files can run code as you
    when you resume. So only the experiment the search record names is read, `<ray_storage>/<name>`,
    which must lie inside the recorded Ray storage (symbolic links resolved), and only if every
    folder from the storage root down to it and everything in it is owned by you and writable by
    nobody else (no group or other write bit). For storage given as a URL (s3://, gs://, ...) this
    cannot be checked from here: the bucket or prefix must be writable by you alone."""
    import stat

    storage, path = manifest["ray_storage"].rstrip("/"), manifest["ray_path"].rstrip("/")
    if path != f"{storage}/{name}":
        raise UserError(f"search {name!r}: its record names the Ray experiment {path}, not "
                        f"{storage}/{name}: refusing to load it")
    if "://" in storage:
        return
    root, folder = Path(storage).resolve(), Path(path).resolve()
    if root not in folder.parents:
        raise UserError(f"search {name!r}: the Ray experiment {path} leads outside the Ray storage {storage} "
                        f"(a symbolic link?): refusing to load it")
    if not folder.is_dir():
        return  # nothing to load: the caller says there is no restorable experiment
    inside = [folder] + [Path(d) / n for d, dirs, files in os.walk(folder) for n in dirs + files]
    me = os.geteuid()
    for item in [root, *reversed([p for p in folder.parents if root in p.parents]), *inside]:
        try:
            info = item.stat()  # a link: what it points to is what would be read
        except OSError:
            continue
        if info.st_uid != me:
            problem = f"is owned by uid {info.st_uid}, not by you (uid {me})"
        elif info.st_mode & 0o002 or (info.st_mode & 0o020 and not private_group(info.st_gid)):
            problem = f"is writable by others than you (mode {stat.filemode(info.st_mode)})"
        else:
            continue
        raise UserError(f"search {name!r}: refusing to load the Ray experiment {folder}: {item} {problem}; "
                        f"resuming unpickles these files, so whoever can write them could run code as you "
                        f"(if you trust them, chown them to you and chmod -R go-w {folder})")


def private_group(gid):
    """True for your own user-private group (your name, your primary group, no other member): with
    umask 002, as many distributions set it, Ray writes group-writable files, and a group that only
    you are in lets nobody else write them."""
    import grp
    import pwd

    try:
        me, group = pwd.getpwuid(os.geteuid()), grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == me.pw_gid and group.gr_name == me.pw_name and set(group.gr_mem) <= {me.pw_name}


def trial_dirname(trial):
    return f"{trial.trainable_name}_{trial.trial_id}"


def make_searcher(space, name, storage_url):
    from search.pruning import PruningOptunaSearch

    return PruningOptunaSearch(space=space.optuna_space(), metric=space.metric, mode="max",
                               pruner=space.make_pruner(), sampler=space.make_sampler(),
                               study_name=name, storage=open_optuna_storage(storage_url))


def make_trainable(space, data, overrides, replay=None):
    from ray import tune

    from search.trainable import loso_trial

    settings = {"space": space, "overrides": overrides, "replay": replay or {}}
    trainable = tune.with_parameters(loso_trial, data=data, settings=settings)
    return tune.with_resources(trainable, {"cpu": space.resources["cpu"], "gpu": space.resources["gpu"]})


def effective_samples(space):
    if space.sampler["type"] == "grid":
        return min(space.num_samples, len(space.grid_points()))
    return space.num_samples


# ----------------------------------------------------------------------------- run / resume

def run_search(options, out=None):
    """Start a new search; returns its summary (see `summarize`)."""
    import optuna
    from ray import tune

    from search import tracking
    from search.pruning import OptunaPruningScheduler

    out = out or sys.stdout
    space = resolve_space(options)
    name = check_name(options.name or f"{Path(space.source).stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    tracking_uri = options.tracking_uri or default_tracking_uri()
    tracking.check_reachable(tracking_uri)  # before anything is written or any trial runs
    storage = ensure_writable_dir(Path(options.storage).resolve())
    ray_storage = options.ray_storage or str(storage / "ray")
    if "://" not in ray_storage:
        ray_storage = str(ensure_writable_dir(Path(ray_storage).resolve()))
    overrides = overrides_of(options)
    source = data_source(options, space, storage)
    data, data_root = load_data(source)
    check_data(data, overrides)
    with search_lock(storage, name, "wait for it to end or pick another --name"):
        if manifest_path(storage, name).exists():
            raise UserError(f"search {name!r} exists: resume it with `python -m search resume {name}` "
                            f"or pick another --name")
        client = tracking.client_for(tracking_uri)  # creates or checks a local store
        optuna_url = options.optuna_storage or default_optuna_storage(storage)
        if name in optuna.get_all_study_names(open_optuna_storage(optuna_url)):
            raise UserError(f"an Optuna study named {name!r} exists in {optuna_url}: pick another --name")
        space.num_samples = min(space.num_samples, effective_samples(space))
        with ray_session(options.address, options.num_cpus):
            check_resources(space.resources, resources_flags(options) or f"{space.source}: resources")
            try:  # the search's records: only once its trials can run
                experiment_id = tracking.ensure_experiment(client, options.experiment, tracking_uri)
                parent_run_id = tracking.start_parent_run(
                    client, experiment_id, name, space, space.metric,
                    {"data": data_root, "optuna_storage": optuna_url, "ray_storage": ray_storage,
                     **{f"override.{k}": v for k, v in overrides.items()}})
            except tracking.mlflow_errors() as e:
                raise UserError(f"--tracking-uri {tracking_uri}: {first_line(e)}") from None
            manifest = {"name": name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                        "status": "running", "space_file": space.source, "space": space.raw,
                        "settings": {"num_samples": space.num_samples,
                                     "max_concurrent_trials": space.max_concurrent_trials,
                                     "objective": space.objective, "resources": space.resources,
                                     "max_failures": space.max_failures, "sampler": space.sampler,
                                     "pruner": space.pruner},
                        "sets": list(options.sets), "overrides": overrides, "data": source,
                        "data_root": data_root, "tracking_uri": tracking_uri, "experiment": options.experiment,
                        "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                        "optuna_storage": optuna_url, "ray_storage": ray_storage,
                        "ray_path": f"{ray_storage.rstrip('/')}/{name}", "address": options.address}
            write_manifest(storage, name, manifest)
            print(f"search {name}: {space.num_samples} trials of {space.source}, objective {space.metric} "
                  f"({space.objective} protocol), {space.sampler['type']} sampler, {space.pruner['type']} pruner",
                  file=out)
            print(f"data: {data_root} ({len(data)} samples, {len(data.subject_ids)} subjects)", file=out)
            searcher = make_searcher(space, name, optuna_url)
            callback = tracking.MlflowTracking(tracking_uri, experiment_id, name, parent_run_id, space,
                                               searcher, overrides, results_path=manifest["ray_path"])
            tuner = tune.Tuner(
                make_trainable(space, data, overrides),
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=OptunaPruningScheduler(searcher),
                    num_samples=space.num_samples, max_concurrent_trials=space.max_concurrent_trials,
                    trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name, storage_path=ray_storage, callbacks=[callback],
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                    verbose=options.verbose))
            tuner.fit()
        if callback.offline:  # MLflow went away mid-search: fill it in now if it is back
            return fill_and_finish(storage, name, space, options.top, out)
        return guarded_finish(storage, name, space, options.top, out)


def resources_flags(options):
    flags = [f"{flag} {value:g}" for flag, value in (("--cpus-per-trial", options.cpus_per_trial),
                                                     ("--gpus-per-trial", options.gpus_per_trial),
                                                     ("--num-cpus", options.num_cpus)) if value is not None]
    return " with ".join(flags)


def resume_search(name, storage="runs", address=None, num_cpus=None, top=10, out=None):
    """Resume a search whose driver stopped (killed, Ctrl+C, machine restart). Everything else
    (space, data, stores, progress output) is as the search was started. Ray's experiment is
    checked before it is loaded (check_restorable)."""
    from ray import tune

    from search import tracking

    out = out or sys.stdout
    storage = Path(storage).resolve()
    if not NAME_PATTERN.match(name) or not (manifest_path(storage, name).is_file()
                                            or lock_path(storage, name).is_file()):
        raise no_such_search(storage, name)
    with search_lock(storage, name):
        manifest = read_manifest(storage, name)
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
            manifest.setdefault("resumed", []).append(datetime.datetime.now().isoformat(timespec="seconds"))
            write_manifest(storage, name, manifest)
            print(f"resuming search {name} from {manifest['ray_path']} ({len(replay)} trials already ended)",
                  file=out)
            tuner = tune.Tuner.restore(
                manifest["ray_path"], trainable=make_trainable(space, data, manifest.get("overrides") or {}, replay),
                resume_unfinished=True, resume_errored=False)
            tuner.fit()
        return fill_and_finish(storage, name, space, top, out)


def space_of(manifest):
    space = parse_space(manifest["space"], manifest["space_file"])
    settings = manifest["settings"]
    space = with_overrides(space, num_samples=settings["num_samples"],
                           max_concurrent_trials=settings["max_concurrent_trials"],
                           objective=settings["objective"], max_failures=settings["max_failures"],
                           resources=settings["resources"])
    space.sampler, space.pruner = settings["sampler"], settings["pruner"]
    return set_fixed(space, manifest.get("sets"))


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def check_data(data, overrides):
    """Before any trial: every fold must be trainable (a class in every training set); subjects
    with a single sample are valid folds, named in one warning line."""
    from htnet.loso import check_fold_classes, lone_subjects_warning, select_subjects

    data = select_subjects(data, overrides.get("subjects"))
    check_fold_classes(data)
    warning = lone_subjects_warning(data)
    if warning:
        print(warning, file=sys.stderr)


# ----------------------------------------------------------------------------- MLflow gone

def fill_mlflow(storage, name, out=None):
    """Log to MLflow every ended trial that Ray Tune recorded and MLflow missed (see
    tracking.backfill); returns the trial ids filled in."""
    import optuna
    from ray import tune

    from search import tracking

    manifest = read_manifest(storage, name)
    space = space_of(manifest)
    check_restorable(manifest, name)  # ExperimentAnalysis unpickles the trials' state
    analysis = tune.ExperimentAnalysis(manifest["ray_path"])
    try:
        study = optuna.load_study(study_name=name, storage=open_optuna_storage(manifest["optuna_storage"]))
        numbers = {t.user_attrs["ray_trial_id"]: t.number for t in study.get_trials(deepcopy=False)
                   if "ray_trial_id" in t.user_attrs}
    except KeyError:
        numbers = {}
    client = tracking.client_for(manifest["tracking_uri"])
    filled = tracking.backfill(client, manifest["experiment_id"], manifest["parent_run_id"], name, space,
                               analysis.trials, analysis.trial_dataframes, manifest.get("overrides") or {},
                               numbers)
    if filled:
        print(f"MLflow: logged {len(filled)} ended trial(s) it had missed", file=out or sys.stdout)
    return filled


def mlflow_down(storage, name, reason, out):
    """MLflow does not answer at the end of a search: say so in one line, keep everything."""
    from search import tracking

    manifest = read_manifest(storage, name)
    manifest["status"] = "interrupted"
    write_manifest(storage, name, manifest)
    print(f"error: {tracking.unreachable_message(manifest['tracking_uri'], reason, name, manifest['ray_path'])}",
          file=sys.stderr, flush=True)
    return {"name": name, "manifest": manifest, "complete": False, "mlflow_error": reason}


def fill_and_finish(storage, name, space, top, out):
    from search import tracking

    reason = tracking.unreachable(read_manifest(storage, name)["tracking_uri"])
    if reason is not None:
        return mlflow_down(storage, name, reason, out)
    try:
        fill_mlflow(storage, name, out)
    except tracking.mlflow_errors() as e:
        return mlflow_down(storage, name, tracking.short_reason(e), out)
    return guarded_finish(storage, name, space, top, out)


def guarded_finish(storage, name, space, top, out):
    from search import tracking

    try:
        return finish(storage, name, space, top, out)
    except tracking.mlflow_errors() as e:
        return mlflow_down(storage, name, tracking.short_reason(e), out)


# ----------------------------------------------------------------------------- the end

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
    manifest, table = summary["manifest"], summary["table"]
    status = "finished" if summary["complete"] else "interrupted"
    manifest["status"] = status
    write_manifest(storage, name, manifest)
    best = write_best_config(storage, name, summary)
    if not summary["complete"]:
        tracking.mark_interrupted(summary["client"], manifest["experiment_id"], manifest["parent_run_id"])
        summary = summarize(storage, name, space)
        table = summary["table"]
    tracking.finish_parent_run(summary["client"], manifest["parent_run_id"], table, space.metric,
                               "FINISHED" if summary["complete"] else "KILLED")
    if summary["complete"]:
        log_plots(manifest, name, out)
    print_summary(summary, top, best, out)
    summary["best_config"] = best
    return summary


def log_plots(manifest, name, out):
    """Optuna's plots and the best trial's per-subject accuracy, on the search's parent run."""
    from search.leaderboard import open_store
    from search.report_plots import log_search_plots

    try:
        store = open_store(manifest["tracking_uri"], manifest["experiment"])
        log_search_plots(store, name, manifest["optuna_storage"], out=out)
    except Exception as e:  # noqa: BLE001  (plots are a convenience: never fail a finished search)
        print(f"warning: could not log the search's plots: {str(e).splitlines()[0] if str(e) else e!r}", file=out)


def write_best_config(storage, name, summary):
    import mlflow.artifacts

    table, metric = summary["table"], summary["space"].metric
    finished = table[table["status"] == "finished"] if len(table) else table
    if not len(finished) or finished[metric].isna().all():
        return None
    best = finished.loc[finished[metric].idxmax()]
    path = Path(storage) / "searches" / f"{name}.best.yaml"
    try:
        local = mlflow.artifacts.download_artifacts(run_id=best["run_id"], artifact_path="config.yaml",
                                                    tracking_uri=summary["manifest"]["tracking_uri"])
        config = read_yaml(local)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not read the best trial's config.yaml: {e}", file=sys.stderr)
        return None
    with atomic_write(path) as f:
        f.write(f"# best trial {best['trial_id']} of search {name}: {metric} = {best[metric]:.4f}\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def ui_command(tracking_uri):
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        try:
            shown = db.relative_to(Path.cwd())
        except ValueError:
            shown = db
        return f"mlflow ui --backend-store-uri sqlite:///{shown}"
    return f"open {tracking_uri} in a browser"


def print_summary(summary, top, best, out):
    import pandas as pd

    table, space, manifest = summary["table"], summary["space"], summary["manifest"]
    counts = summary["counts"]
    print(f"\nsearch {summary['name']} ({manifest['status']}): "
          + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("finished", "pruned", "failed", "running")
                      if s != "running" or counts.get(s))
          + "".join(f", {counts[s]} {s}" for s in ("interrupted",) if counts.get(s))
          + f" of {manifest['settings']['num_samples']} trials; objective {space.metric} (max)", file=out)
    if len(table):
        columns = ["trial_id", "status", space.metric, "inner_full_uf1", "inner_full_uar",
                   "paper_full_uf1", "paper_full_uar", "folds_done", *space.names]
        shown = table[[c for c in dict.fromkeys(columns) if c in table]].head(top).copy()
        for column in space.names:  # MLflow params are text: numbers print as numbers
            numbers = pd.to_numeric(shown[column], errors="coerce")
            if numbers.notna().sum() == shown[column].notna().sum():
                shown[column] = numbers
        with pd.option_context("display.width", 250, "display.max_columns", 40):
            text = shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")
        print(f"top trials:\n{text}", file=out)
    if best is not None:
        data = manifest["data_root"]
        print(f"best configuration: {best}\n  rerun it: python -m htnet train --config {best} --data {data}",
              file=out)
    if manifest["status"] != "finished":
        print(f"the search did not finish: resume it with `python -m search resume {summary['name']}`", file=out)
    print(f"browse the runs: {ui_command(manifest['tracking_uri'])}   (then http://127.0.0.1:5000, "
          f"experiment {manifest['experiment']})", file=out)
    print(f"inspect the Optuna study (pip install optuna-dashboard): optuna-dashboard "
          f"{manifest['optuna_storage']}", file=out)


def list_searches(storage, out=None):
    """One line per search; a damaged record is marked on its line, the others are listed, and
    the list ends in one error line naming the damaged files (exit 2)."""
    out = out or sys.stdout
    folder = Path(storage) / "searches"
    names, damaged = search_names(storage), []
    if not names:
        print(f"no searches in {folder}", file=out)
        return []
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


def optuna_counts(manifest):
    import optuna

    try:
        study = optuna.load_study(study_name=manifest["name"],
                                  storage=open_optuna_storage(manifest["optuna_storage"]))
    except KeyError:
        return {}
    counts = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def status(storage, name=None, top=10, out=None):
    out = out or sys.stdout
    if name is None:
        return list_searches(storage, out)
    summary = summarize(Path(storage), name)
    best = Path(storage) / "searches" / f"{name}.best.yaml"
    print_summary(summary, top, best if best.is_file() else None, out)
    counts = optuna_counts(summary["manifest"])
    print("Optuna study: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no trials"), file=out)
    return summary

