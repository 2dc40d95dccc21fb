"""Where a search keeps its state (the layout of --storage: docs/design.md): the search record and its lock, the
Optuna storage, the default MLflow store, the search's data, and the checks of the Ray experiment resume unpickles."""
import contextlib
import fcntl
import grp
import json
import os
import pickletools
import pwd
import re
import stat
import tempfile
from pathlib import Path

import optuna
import pyarrow
import pyarrow.fs
import yaml
from ray import tune

from htnet.checkpoint import FOLDS_DIR
from htnet.data import load_release, synthetic_cache
from htnet.errors import UserError, first_line
from htnet.io import atomic_write, file_lock, read_yaml
from htnet.loso import check_resumable

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MANIFEST_KEYS = {"name": str, "status": str, "space_file": str, "settings": dict,
                 "data": dict, "data_root": str, "tracking_uri": str, "experiment": str,
                 "experiment_id": str, "parent_run_id": str, "optuna_storage": str,
                 "ray_storage": str, "ray_path": str}
SETTINGS_KEYS = ("num_samples", "max_concurrent_trials", "objective", "resources", "max_failures",
                 "sampler", "pruner")


def default_tracking_uri():
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def open_optuna_storage(url):
    """sqlite:///path, any SQLAlchemy URL, or journal:path / a *.log file (JournalStorage)."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = Path(url.removeprefix("journal:")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
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


def space_copy(storage, name):
    """The copy of its space file a search started with (what `search resume` runs)."""
    return Path(storage) / "searches" / f"{name}.space.py"


def search_names(storage):
    folder = Path(storage) / "searches"
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.endswith(".best")) if folder.is_dir() else []


def no_such_search(storage, name):
    known = search_names(storage)
    return UserError(f"no search named {name!r} in {Path(storage) / 'searches'}"
                     + (f" (known: {', '.join(known)})" if known else ""))


def read_manifest(storage, name):
    """The search record; a damaged one is one line naming the file and what is wrong."""
    path = manifest_path(storage, name)
    if not path.is_file():
        raise no_such_search(storage, name)
    manifest = read_yaml(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: damaged search record (not a mapping of keys)")
    problems = [f"key {key!r} is missing" if key not in manifest else f"{key} is not a {kind.__name__}"
                for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    settings = manifest["settings"] if isinstance(manifest.get("settings"), dict) else {}
    problems += [f"key 'settings.{key}' is missing" for key in SETTINGS_KEYS if key not in settings]
    if problems or manifest["name"] != name:
        raise UserError(f"{path}: damaged search record: "
                        + (problems[0] if problems else f"it names search {manifest['name']!r}"))
    return manifest


def write_manifest(storage, name, manifest):
    with atomic_write(manifest_path(storage, name)) as f:
        yaml.safe_dump(manifest, f, sort_keys=False)


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
    """(CompositeData, its root folder) of a search: a release folder, or the synthetic set generated once."""
    if "path" in source:
        return load_release(source["path"]), source["path"]
    synth = source["synthetic"]
    Path(synth["cache"]).mkdir(parents=True, exist_ok=True)
    with file_lock(Path(synth["cache"]) / ".lock"):  # two searches starting at once make it once
        root = synthetic_cache(synth["cache"], synth["subjects_per_dataset"], synth["seed"])
    return load_release(root), str(root)


@contextlib.contextmanager
def search_lock(storage, name, hint="wait for it to end"):
    """Held (flock) while this process runs or resumes search `name`: two drivers would run its trials twice."""
    path = manifest_path(storage, name).with_suffix(".lock")
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


def check_remote_storage(uri, what="Ray storage"):
    """S3 storage must answer and its bucket exist before anything is recorded: Ray would say so only in a
    traceback once the Tuner runs."""
    try:
        fs, path = open_folder(uri)
        bucket = path.split("/")[0]
        found = fs.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"{what} {uri} does not answer ({first_line(e)[:300]}): check the endpoint and "
                        f"credentials, or try again when it is back") from None
    if not found:
        raise UserError(f"{what} {uri}: there is no bucket {bucket!r}; create it first")


def check_restorable(manifest, name):
    """Refuse (one line) a Ray experiment someone else could have written: resuming unpickles it (docs/design.md)."""
    storage, path = manifest["ray_storage"].rstrip("/"), manifest["ray_path"].rstrip("/")
    if path != f"{storage}/{name}":
        raise UserError(f"search {name!r}: its record names the Ray experiment {path}, not "
                        f"{storage}/{name}: refusing to load it")
    if "://" in storage:
        return check_remote_storage(storage)
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
        problem = (f"is owned by uid {info.st_uid}, not by you (uid {me})" if info.st_uid != me
                   else f"is writable by others than you (mode {stat.filemode(info.st_mode)})"
                   if info.st_mode & 0o002 or info.st_mode & 0o020 and not private_group(info.st_gid) else None)
        if problem:
            raise UserError(f"search {name!r}: refusing to load the Ray experiment {folder}: {item} {problem}; "
                            f"resuming unpickles these files, so whoever can write them could run code as you "
                            f"(if you trust them, chown them to you and chmod -R go-w {folder})")


def private_group(gid):
    """True for your own user-private group (your name, your primary group, no other member)."""
    with contextlib.suppress(KeyError):
        me, group = pwd.getpwuid(os.geteuid()), grp.getgrgid(gid)
        return gid == me.pw_gid and group.gr_name == me.pw_name and set(group.gr_mem) <= {me.pw_name}
    return False


def open_folder(folder):
    """(pyarrow file system, path) of a local folder or a URI such as s3://bucket/prefix (as Ray's storage)."""
    return pyarrow.fs.FileSystem.from_uri(str(Path(folder).resolve()) if "://" not in str(folder) else str(folder))


def folds_kept(fs, path):
    selector = pyarrow.fs.FileSelector(f"{path}/{FOLDS_DIR}", allow_not_found=True)
    return sum(info.base_name.endswith(".json") for info in fs.get_file_info(selector))


def resume_plan(trials, errored):
    """[(trial, file system, the checkpoint Ray's snapshot names, the one to go on from or None)] per trial to resume.
    A killed driver's snapshot can name a deleted or older checkpoint (Ray deletes old ones before it snapshots);
    the newest with at least as many fold records (an upload cut off while S3 was down has fewer) holds all of it."""
    plan = []
    for trial in trials:
        checkpoint = trial.checkpoint
        if trial.status == "TERMINATED" or trial.status == "ERROR" and not errored or checkpoint is None:
            continue
        fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
        folder, _, named = path.rpartition("/")
        exists, kept = fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound, folds_kept(fs, path)
        newer = sorted((info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
                        if info.type == pyarrow.fs.FileType.Directory
                        and re.fullmatch(r"checkpoint_\d+", info.base_name) and info.base_name > named
                        and folds_kept(fs, info.path) >= kept))
        plan.append((trial, fs, path, f"{folder}/{newer[-1]}" if newer else path if exists else None))
    return plan


def whole_pickle(data):
    """Read a pickle's opcodes to its end without running them (Ray unpickles it on resume): a cut one raises."""
    list(pickletools.genops(data))


def check_experiment(path, name, config_of, data, errored=False):
    """Load first what resuming loads from the Ray experiment at `path` (`config_of(trial)`: its LosoConfig), so a
    damaged file is one line naming it, before anything is written. Returns resume_plan's."""
    fs, folder = open_folder(path)

    def damaged(file, error):
        return UserError(f"{name}: {file} cannot be loaded ({type(error).__name__}: {first_line(error)[:200]}); "
                         f"nothing was changed: restore it from a backup, or start again under another name")
    files = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(folder)))
    for prefix, load in [("experiment_state-", json.loads), ("search_gen_state-", whole_pickle),
                         ("searcher-state-", whole_pickle), ("tuner.pkl", whole_pickle)]:
        for file in [f for f in files if f.startswith(prefix)][-1:]:   # Ray loads the newest
            try:
                with fs.open_input_stream(f"{folder}/{file}") as stream:
                    load(stream.read())
            except Exception as e:  # noqa: BLE001 - whatever the damage, the file is named
                raise damaged(f"{path}/{file}", e) from None
    try:
        plan = resume_plan(tune.ExperimentAnalysis(path).trials, errored)
    except Exception as e:  # noqa: BLE001
        state = [f for f in files if f.startswith("experiment_state-")][-1:] or ["its experiment state"]
        raise damaged(f"{path}/{state[0]} (a trial's state)", e) from None
    for trial, fs, _, source in plan:
        try:
            config = config_of(trial)
        except UserError:
            continue   # the trial fails by itself, as it did before
        with tempfile.TemporaryDirectory() as copy:
            try:
                if source is not None:
                    pyarrow.fs.copy_files(source, copy, source_filesystem=fs)
                    check_resumable(config, data, copy)
            except (UserError, OSError, pyarrow.ArrowException) as e:
                raise UserError(f"{name}: trial {trial.trial_id}'s checkpoint {first_line(e).replace(copy, source)}; "
                                f"nothing was changed: remove {source} to train the trial again from an earlier "
                                f"checkpoint or its first fold") from None
    return plan


def restore_deleted_checkpoints(plan):
    """Copy to each checkpoint of check_experiment's plan the one its trial goes on from (an empty folder where
    there is none: it starts again). Returns the trial ids mended."""
    mended = []
    for trial, fs, path, source in plan:
        if source == path:
            continue
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir_contents(path)
        if source is None:
            fs.create_dir(path)
        else:
            pyarrow.fs.copy_files(source, path, source_filesystem=fs, destination_filesystem=fs)
        mended.append(trial.trial_id)
    return mended
