"""What a rerun starts from: the presets, the run or file it names and its configuration (checked, with --set), its
seeds and data, the tags of the data a row ran on, and a method's label with the settings it changed."""
import collections
import re
import sys
from pathlib import Path

from htnet.errors import UserError
from htnet.io import read_yaml
from htnet.loso import LosoConfig
from search.driver.stores import load_data
from search.reports.leaderboard import best_run_id, config_of_run, get_run, model_label, search_parents
from search.space import check_value, flatten, nest, parse_set

# LosoConfig's defaults are the references' (HTNet: dim 256, heads 3, 3 levels, blocks (2,2,10), patch 7, no
# shuffle; both: lr 5e-5, batch 256, 800 epochs, Adam); STSTNet publishes its final epoch.
# OFF-ApexNet: the paper's training settings were not at hand, so STSTNet's reference settings (the defaults).
# Dual-Inception: its released code's (Adam, lr 1e-4, batch 3, 40 epochs, shuffled; class_weight='auto' left out).
PRESETS = {"htnet-paper": ({"model": "htnet"}, "HTNet (paper config)"),
           "ststnet": ({"model": "ststnet", "protocols": ["paper", "final", "inner"]}, "STSTNet"),
           "offapexnet": ({"model": "offapexnet", "protocols": ["paper", "final", "inner"]}, "OFF-ApexNet"),
           "dual_inception": ({"model": "dual_inception", "lr": 1e-4, "batch_size": 3, "epochs": 40, "shuffle": True,
                               "protocols": ["paper", "final", "inner"]}, "Dual-Inception")}
# Not settings of a method: how it runs, and what the paper table states beside each row (subjects, seeds).
NOT_SETTINGS = ("device", "engine", "fold_group_size", "report_every", "save_weights", "protocols", "subjects",
                "seed")
LABEL_FIRST = ("epochs", "lr", "batch_size")  # named first in a changed label: what a reader checks first
SYNTHETIC_SAMPLE = re.compile(r".+_syn\d+")  # htnet.data.make_synthetic's sample names ('<sub>_syn01')
# search_run_id: set when a search chose the configuration on these data (its rerun takes fresh seeds)
RerunSource = collections.namedtuple("RerunSource", "config method run_id search search_run_id data description",
                                     defaults=(None, None, None, None, ""))


def resolve_source(store, options):
    """The configuration to rerun, its label and where it came from."""
    if sum(map(bool, (options.best, options.run_id, options.preset, options.config))) != 1:
        raise UserError("name exactly one of --best SEARCH, --run-id RUN, --preset NAME, --config FILE")
    if options.params and not options.best:
        raise UserError("--param picks among the trials of --best SEARCH: give --best")
    if options.preset:
        if options.preset not in PRESETS:
            raise UserError(f"--preset {options.preset!r}: known presets are {', '.join(PRESETS)}")
        config, label = PRESETS[options.preset]
        return RerunSource(dict(config), options.method or label, description=f"preset {options.preset}")
    if options.config:
        path = Path(options.config)
        config = read_yaml(path, f"--config {path}")  # missing, not UTF-8, not YAML, an alias bomb: one line
        if not isinstance(config, dict):
            raise UserError(f"--config {path}: expected a mapping of LOSO config keys")
        return RerunSource(config, options.method or f"{model_label(config.get('model', 'htnet'))} ({path.stem})",
                           description=f"config file {path}")
    run_id = options.run_id
    if options.best:
        parent = search_parents(store, [options.best])[0]
        if (run_id := best_run_id(store, parent, options.best, options.params)) is None:
            among = "".join(f" with {k}={v}" for k, v in options.params.items())
            raise UserError(f"search {options.best!r} has no finished trial{among} to rerun")
    run = get_run(store, run_id, f"no MLflow run {run_id!r} at {store.tracking_uri}")
    config, tags = config_of_run(store, run), run.data.tags
    parent_id = tags.get("mlflow.parentRunId") if tags.get("htnet.role") == "trial" else None
    data = get_run(store, parent_id, f"no MLflow run {parent_id!r}").data.params.get("data") if parent_id else None
    label = model_label(config.get("model", "htnet"))
    method, description = tags.get("htnet.method") or f"{label} (run {run_id[:8]})", f"run {run_id}"
    if options.best:
        objective = parent.data.tags.get("htnet.objective", "?")
        method = f"{label} (best found)"
        description = (f"best trial {tags.get('htnet.trial_id', run_id)} of search {options.best} by {objective} = "
                       f"{run.data.metrics.get(objective, float('nan')):.4f}")
    return RerunSource(config, options.method or method, run_id, tags.get("htnet.search"), parent_id, data,
                       description)


def changed_settings(before, after):
    """{key: value} of the flattened LOSO settings (NOT_SETTINGS aside) `after` changes from `before`."""
    defaults = flatten(LosoConfig().to_dict())  # not from_dict: its checks build the model
    old, new = ({**defaults, **flatten(c)} for c in (before, after))
    keys = sorted(dict.fromkeys([*old, *new]),  # stable: the others in config order
                  key=lambda k: LABEL_FIRST.index(k) if k in LABEL_FIRST else len(LABEL_FIRST))
    return {k: new.get(k) for k in keys if k.split(".")[0] not in NOT_SETTINGS and not _same(old.get(k), new.get(k))}


def _same(a, b):
    """Equal, or the same number (a YAML file's lr: 5e-5 is the text '5e-5' until LosoConfig reads it)."""
    try:
        return a == b or float(a) == float(b)
    except (TypeError, ValueError):
        return False


def changed_label(label, changes, named=3):
    """'HTNet (paper config)' with epochs=1 -> 'HTNet (paper config, epochs=1)', 'STSTNet' -> 'STSTNet (epochs=1)';
    past `named` changes, '+N more'."""
    if not changes:
        return label
    items = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in changes.items()]
    text = ", ".join(items[:named] + ([f"+{len(items) - named} more"] if len(items) > named else []))
    return f"{label[:-1]}, {text})" if label.endswith(")") else f"{label} ({text})"


def data_tags(data):
    """Tags of the data a parent's rows are computed on: the release folder's name (or 'synthetic'), the counts."""
    synthetic = len(data) and all(SYNTHETIC_SAMPLE.fullmatch(str(s)) for s in data.samples)
    return {"htnet.data_source": "synthetic" if synthetic else Path(data.source).name,
            "htnet.data_subjects": str(len(data.subject_ids)), "htnet.data_samples": str(len(data))}


def checked_config(source, sets, where):
    """The source's config with --set KEY=VALUE applied, every value checked (naming its origin) before any work."""
    given = dict(map(parse_set, sets or []))
    merged = {**flatten(source.config), **given}
    for key in sorted(merged, key=lambda k: k not in given):  # --set first
        check_value(key, merged[key], f"--set {key}" if key in given else f"{where}: {key}")
    return nest(merged)


def seeds_for(config, source, count, seed_list=None):
    """--seed-list, else `count` seeds from the config's; a search's choice gets fresh ones (the winner's curse)."""
    if seed_list:
        try:
            seeds = [int(s) for s in seed_list]
        except ValueError:
            raise UserError(f"--seed-list: expected comma-separated integers, got {','.join(seed_list)!r}") from None
        if len(set(seeds)) != len(seeds):
            raise UserError(f"--seed-list has repeated seeds: {seeds}")
        return seeds
    start = int(config.get("seed", 1)) + (1 if source.search_run_id else 0)
    return list(range(start, start + count))


def load_rerun_data(data, source, storage):
    """(data, root) of --data, else of the source search's data, else of the built-in synthetic set."""
    if data and not Path(data).exists():
        raise UserError(f"--data {data}: no such folder")
    if data or (source.data and Path(source.data).exists()):
        return load_data({"path": str(Path(data).resolve()) if data else source.data})
    if source.data:
        raise UserError(f"the data of search {source.search!r} ({source.data}) is not here: pass --data")
    print("no --data given: using the built-in synthetic set", file=sys.stderr)
    return load_data({"synthetic": {"subjects_per_dataset": 3, "seed": 0,
                                    "cache": str((Path(storage) / "synthetic").resolve())}})
