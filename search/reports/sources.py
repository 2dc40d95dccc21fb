"""What a rerun starts from (search.reports.rerun): the run it names and its configuration (checked, with --set),
its seeds and data, the tags of the data a row ran on, and a method's label with the settings it changed."""
import collections
import dataclasses
import re
import sys
from pathlib import Path

from htnet.errors import UserError
from htnet.io import parse_yaml
from htnet.loso import LosoConfig
from search import tracking
from search.driver.stores import load_data
from search.reports.leaderboard import leaderboard, read_yaml_artifact
from search.space import check_value, flatten, nest, parse_set

# Not settings of a method: how it runs (device, engine, ...), and what the paper table states beside each row
# (the subjects, the seeds); changing any other LOSO key changes the method's label.
NOT_SETTINGS = ("device", "engine", "fold_group_size", "report_every", "save_weights", "protocols", "subjects",
                "seed")
LABEL_FIRST = ("epochs", "lr", "batch_size")  # named first in a changed label: what a reader checks first
SYNTHETIC_SAMPLE = re.compile(r".+_syn\d+")  # htnet.data.make_synthetic's sample names ('<sub>_syn01')


# search_run_id: set when a search chose the configuration on these data (its rerun takes fresh seeds)
RerunSource = collections.namedtuple("RerunSource", "config method run_id search search_run_id data description",
                                     defaults=(None, None, None, None, ""))


def best_run_id(store, parent, search, params=None):
    """The search's best finished trial (with `params`, as leaderboard's --param): its parent's tag, or the first."""
    if "htnet.best_run_id" in parent.data.tags and not params:
        return parent.data.tags["htnet.best_run_id"]
    table = leaderboard(store, [search], statuses=["finished"], params=params)
    return table.iloc[0]["run_id"] if len(table) else None


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
    """The label of a method whose settings were changed: 'HTNet (paper config)' with epochs=1 ->
    'HTNet (paper config, epochs=1)', 'STSTNet' -> 'STSTNet (epochs=1)'; past `named` changes, '+N more'."""
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


def get_run(store, run_id, missing):
    """The MLflow run, or a UserError with the message `missing` when there is none."""
    try:
        return tracking.retry(store.client.get_run, run_id)
    except Exception:  # noqa: BLE001 - MLflow's not-found error
        raise UserError(missing) from None


def config_of_run(store, run):
    """The LOSO config of a run: its config.yaml artifact, else its params."""
    run_id = run.info.run_id
    if isinstance(config := read_yaml_artifact(store, run_id, "config.yaml"), dict):
        return config
    if "model" not in run.data.params:
        raise UserError(f"run {run_id} has neither a config.yaml artifact nor LOSO params")
    known = {f.name for f in dataclasses.fields(LosoConfig)}
    return nest({k: parse_yaml(v, f"run {run_id}: param {k}") for k, v in run.data.params.items()
                 if k.split(".")[0] in known})


def checked_config(source, sets, where):
    """The source's config with --set KEY=VALUE applied, every value checked before anything is written."""
    given = dict(map(parse_set, sets or []))
    for key, value in given.items():
        check_value(key, value, f"--set {key}")
    flat = flatten(source.config)
    for key, value in flat.items():
        if key not in given:
            check_value(key, value, f"{where}: {key}")
    return nest({**flat, **given})


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
