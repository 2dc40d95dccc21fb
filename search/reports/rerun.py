"""`python -m search rerun`: one configuration with K seeds in parallel on Ray, each metric's mean ± std
and (3 seeds or more) a 95% bootstrap interval over seeds and subjects, logged to an MLflow rerun parent run
with a child run per seed."""
import collections
import contextlib
import dataclasses
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from htnet.errors import UserError
from htnet.io import parse_yaml, read_yaml
from htnet.metrics import PROTOCOLS, summary_table
from search import tracking
from search.driver.stores import check_remote_storage, folds_kept, open_folder
from search.reports.export import markdown_table, plural
from search.reports.leaderboard import METRICS, leaderboard, model_label, open_store, read_yaml_artifact, search_parents
from search.reports.seeds import run_parallel, seed_folder
from search.reports.stats import MIN_SEEDS, seed_subject_bootstrap
from search.space import check_value, flatten, nest, parse_set

# LosoConfig's defaults are the references' (HTNet: dim 256, heads 3, 3 levels, blocks (2,2,10), patch 7, no
# shuffle; both: lr 5e-5, batch 256, 800 epochs, Adam); STSTNet publishes its final epoch.
PRESETS = {"htnet-paper": ({"model": "htnet"}, "HTNet (paper config)"),
           "ststnet": ({"model": "ststnet", "protocols": ["paper", "final", "inner"]}, "STSTNet")}
METRIC_KEYS = (*(f"{p}_{key}_{m}" for p in PROTOCOLS for key, _, m in METRICS),
               "inner_val_uf1", "inner_val_uar", "fold_epochs", "wall_time_s")
# Not settings of a method: how it runs (device, engine, ...), and what the paper table states beside each row
# (the subjects, the seeds); changing any other LOSO key changes the method's label.
NOT_SETTINGS = ("device", "engine", "fold_group_size", "report_every", "save_weights", "protocols", "subjects",
                "seed")
LABEL_FIRST = ("epochs", "lr", "batch_size")  # named first in a changed label: what a reader checks first
SYNTHETIC_SAMPLE = re.compile(r".+_syn\d+")  # htnet.data.make_synthetic's sample names ('<sub>_syn01')


# search_run_id: set when a search chose the configuration on these data (its rerun takes fresh seeds)
RerunSource = collections.namedtuple("RerunSource", "config method run_id search search_run_id data description",
                                     defaults=(None, None, None, None, ""))


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
    fold_storage: str | None = None   # where seeds keep their finished folds (default: <storage>/reruns)


def best_run_id(store, parent, search, params=None):
    """The search's best finished trial (with `params`, as leaderboard's --param): its parent's tag, or the first."""
    if "htnet.best_run_id" in parent.data.tags and not params:
        return parent.data.tags["htnet.best_run_id"]
    table = leaderboard(store, [search], statuses=["finished"], params=params)
    return table.iloc[0]["run_id"] if len(table) else None


def changed_settings(before, after):
    """{key: value} of the flattened LOSO settings (NOT_SETTINGS aside) `after` changes from `before`."""
    from htnet.loso import LosoConfig

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


def preset_label(label, config):
    """A preset's label with what `config` changes from the preset's settings; any other label as it is."""
    settings = next((settings for settings, name in PRESETS.values() if name == label), None)
    return label if settings is None else changed_label(label, changed_settings(settings, config))


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
    from htnet.loso import LosoConfig

    run_id = run.info.run_id
    if isinstance(config := read_yaml_artifact(store, run_id, "config.yaml"), dict):
        return config
    if "model" not in run.data.params:
        raise UserError(f"run {run_id} has neither a config.yaml artifact nor LOSO params")
    known = {f.name for f in dataclasses.fields(LosoConfig)}
    return nest({k: parse_yaml(v, f"run {run_id}: param {k}") for k, v in run.data.params.items()
                 if k.split(".")[0] in known})


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
        run_id = best_run_id(store, parent, options.best, options.params)
        if run_id is None:
            among = "".join(f" with {k}={v}" for k, v in options.params.items())
            raise UserError(f"search {options.best!r} has no finished trial{among} to rerun")
    run = get_run(store, run_id, f"no MLflow run {run_id!r} at {store.tracking_uri}")
    config, tags, metrics = config_of_run(store, run), run.data.tags, run.data.metrics
    parent_id = tags.get("mlflow.parentRunId") if tags.get("htnet.role") == "trial" else None
    data = get_run(store, parent_id, f"no MLflow run {parent_id!r}").data.params.get("data") if parent_id else None
    label = model_label(config.get("model", "htnet"))
    method, description = tags.get("htnet.method") or f"{label} (run {run_id[:8]})", f"run {run_id}"
    if options.best:
        objective = parent.data.tags.get("htnet.objective", "?")
        method = f"{label} (best found)"
        description = (f"best trial {tags.get('htnet.trial_id', run_id)} of search {options.best} by {objective} = "
                       f"{metrics.get(objective, float('nan')):.4f}")
    return RerunSource(config, options.method or method, run_id, tags.get("htnet.search"), parent_id, data,
                       description)


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
    if count < 1:
        raise UserError(f"--seeds must be >= 1, got {count}")
    start = int(config.get("seed", 1)) + (1 if source.search_run_id else 0)
    return list(range(start, start + count))


def load_rerun_data(data, source, storage):
    """(data, root) of --data, else of the source search's data, else of the built-in synthetic set."""
    from search.driver.stores import load_data

    if data and not Path(data).exists():
        raise UserError(f"--data {data}: no such folder")
    if data or (source.data and Path(source.data).exists()):
        return load_data({"path": str(Path(data).resolve()) if data else source.data})
    if source.data:
        raise UserError(f"the data of search {source.search!r} ({source.data}) is not here: pass --data")
    print("no --data given: using the built-in synthetic set", file=sys.stderr)
    return load_data({"synthetic": {"subjects_per_dataset": 3, "seed": 0,
                                    "cache": str((Path(storage) / "synthetic").resolve())}})


def log_frame(client, run_id, frame, name, markdown=False):
    """A table as a CSV (or Markdown) artifact of the run; a text is logged as it is."""
    text = frame if isinstance(frame, str) else markdown_table(frame) if markdown else frame.to_csv(index=False)
    tracking.retry(client.log_text, run_id, text, name)


def end_seed(client, run_id, seed, result, title):
    """A seed's end on its run: the error, or its metrics, result files and PNGs; returns its row of seeds.csv."""
    from search.tracking.figures import confusion_matrix_png, learning_curve_png

    if isinstance(result, dict):
        tracking.set_tags(client, run_id, {"htnet.status": "failed", "htnet.error": result["error"][:5000]})
        tracking.retry(client.set_terminated, run_id, "FAILED")
        return {"seed": seed, "status": "failed", "run_id": run_id}
    tracking.set_tags(client, run_id, {"htnet.status": "finished", "htnet.device": result.device})
    tracking.log_metrics(client, run_id, {**result.metrics, "folds_done": result.folds_done})
    with tempfile.TemporaryDirectory(prefix="htnet-rerun-") as folder:
        result.save(folder)
        confusion_matrix_png(result.predictions, Path(folder) / "confusion_matrix.png", title=title)
        learning_curve_png(result.history, Path(folder) / "learning_curve.png", title=title)
        tracking.retry(client.log_artifacts, run_id, folder)
    tracking.retry(client.set_terminated, run_id, "FINISHED")
    return {"seed": seed, "status": "finished", "run_id": run_id,
            **{k: v for k, v in result.metrics.items() if k in METRIC_KEYS}}


def seeds_summary(finished, predictions):
    """Rows = metric keys: n, mean, std over the seeds; from MIN_SEEDS seeds, the predicted metrics' 95% interval."""
    keys = [k for k in METRIC_KEYS if k in finished and finished[k].notna().any()]
    values = finished[keys].apply(pd.to_numeric, errors="coerce")
    summary = pd.DataFrame({"n": values.count(), "mean": values.mean(), "std": values.std(ddof=1)})
    bounds = seed_subject_bootstrap(predictions) if len(finished) >= MIN_SEEDS else {}
    intervals = [bounds.get(k, (float("nan"),) * 2) for k in summary.index]
    return summary.assign(ci_low=[low for low, _ in intervals], ci_high=[high for _, high in intervals])


def log_summary(client, source, parent_id, rows, predictions, started):
    """Log the parent run's intervals, tables and pooled confusion matrices, end it; (seeds table, summary)."""
    from search.tracking.figures import confusion_matrix_png

    seeds_table = pd.DataFrame(rows).sort_values("seed").reset_index(drop=True)
    finished = seeds_table[seeds_table["status"] == "finished"]
    pooled = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame()
    summary = seeds_summary(finished, pooled).rename_axis("metric") if len(finished) else pd.DataFrame()
    intervals = {f"{key}_{name}": row[stat] for key, row in summary.iterrows() for stat, name in
                 (("mean", "mean"), ("std", "std"), ("ci_low", "ci95_low"), ("ci_high", "ci95_high"))}
    tracking.log_metrics(client, parent_id, {**intervals, "n_seeds": len(finished),
                                             "n_failed": len(seeds_table) - len(finished),
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


def format_interval(stats, style="full", digits=4):
    """'mean ± std [low, high]' (style full), 'mean ± std' (std), 'mean [low, high]' (ci), else 'mean'."""
    if pd.isna(stats["mean"]):
        return ""
    text = f"{stats['mean']:.{digits}f}"
    if style in ("full", "std") and pd.notna(stats["std"]):
        text += f" ± {stats['std']:.{digits}f}"
    if style in ("full", "ci") and pd.notna(stats["ci_low"]):
        text += f" [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"
    return text


def protocol_table(summary):
    """Rows = protocols, columns = Full/SMIC/CASME II/SAMM x UF1/UAR, cells 'mean ± std [95% interval]'."""
    cells = {key: format_interval(row) for key, row in summary.iterrows()}
    return summary_table(cells).fillna("").rename_axis("protocol").reset_index()


def rerun(options, out=None):
    """Rerun a configuration with K seeds: {parent_run_id, seeds (a row each), summary, method, config}."""
    from htnet.loso import LosoConfig, select_subjects
    from search.driver.ray_setup import ray_session

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
    if not options.method:  # a derived label (a preset's, 'best found', ...) says what --set changed
        source = source._replace(method=changed_label(source.method, changed_settings(source.config, base)))
    if options.cpus_per_seed <= 0 or options.gpus_per_seed < 0:
        raise UserError("--cpus-per-seed must be > 0 and --gpus-per-seed >= 0")
    fold_root = options.fold_storage or str(Path(options.storage) / "reruns")
    if "://" in fold_root:
        check_remote_storage(fold_root, "--fold-storage")   # before anything is recorded
    data, data_root = load_rerun_data(options.data, source, options.storage)
    store = store or open_store(options.tracking_uri, options.experiment, create=True)
    client, method, seed_text = store.client, source.method, ",".join(map(str, seeds))
    provenance = tracking.provenance_tags(tracking.provenance(data))   # on the parent and every seed
    used = select_subjects(data, base["subjects"])

    def new_run(name, tags, params):
        tags = {k: v for k, v in {**tags, **provenance}.items() if v}
        run_id = tracking.retry(client.create_run, store.experiment_id, tags=tags, run_name=name).info.run_id
        tracking.log_params(client, run_id, params)
        return run_id

    unseeded = {k: v for k, v in base.items() if k != "seed"}
    parent_id = new_run(f"rerun {method}", {
        "htnet.role": "rerun", "htnet.method": method, "htnet.model": base["model"], "htnet.seeds": seed_text,
        "htnet.protocols": ",".join(base["protocols"]), "htnet.source": source.description,
        "htnet.source_run_id": source.run_id, "htnet.source_search": source.search, **data_tags(used)},
        {**flatten(unseeded), "seeds": seed_text, "data": data_root, "cpus_per_seed": options.cpus_per_seed,
         "gpus_per_seed": options.gpus_per_seed})
    tracking.retry(client.log_dict, parent_id, unseeded, "config.yaml")
    folds = len(used.subject_ids)
    models = 2 if "inner" in base["protocols"] else 1
    print(f"rerun {method!r}: {source.description}; {plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))}) "
          f"in parallel on Ray; data {data_root} ({plural(len(used), 'sample')}, {plural(folds, 'subject')} used)",
          file=out)
    print(f"cost: {plural(len(seeds), 'seed')} x {plural(folds, 'fold')} x {plural(base['epochs'], 'epoch')} x "
          f"{plural(models, 'model')} per fold = {len(seeds) * folds * base['epochs'] * models:,} fold-epochs",
          file=out)
    rows, predictions, started = [], [], time.time()
    children = {seed: new_run(f"{method} seed {seed}", {
        "mlflow.parentRunId": parent_id, "htnet.role": "rerun_seed", "htnet.seed": str(seed), "htnet.method": method,
        "htnet.status": "running"}, flatten({**base, "seed": seed})) for seed in seeds}

    folders = {seed: seed_folder(fold_root, base, data_root, seed) for seed in seeds}
    for seed, folder in folders.items():
        if kept := folds_kept(*open_folder(folder)):
            print(f"  seed {seed}: {kept} of {plural(folds, 'fold')} kept from an interrupted rerun ({folder})",
                  file=out)

    def logged(seed, result):
        rows.append(end_seed(client, children[seed], seed, result, f"{method} seed {seed}"))
        with contextlib.suppress(OSError):   # in MLflow now (a failed seed starts afresh)
            fs, path = open_folder(folders[seed])
            fs.delete_dir(path)
        if isinstance(result, dict):
            print(f"  seed {seed}: failed ({result['error']})", file=out)
            return
        predictions.append(result.predictions.assign(seed=seed))
        leak_free = "inner" if "inner_full_uf1" in result.metrics else "final"
        print(f"  seed {seed}: paper UF1 {result.metrics.get('paper_full_uf1', float('nan')):.4f}, "
              f"{leak_free} UF1 {result.metrics.get(f'{leak_free}_full_uf1', float('nan')):.4f} "
              f"({result.wall_time_s:.1f} s)", file=out)

    with ray_session(options.address, options.num_cpus):
        try:
            run_parallel({seed: {**base, "seed": seed} for seed in seeds}, data, logged, options.cpus_per_seed,
                         options.gpus_per_seed, folders)
        except BaseException:
            for seed in set(seeds) - {r["seed"] for r in rows}:
                tracking.set_tags(client, children[seed], {"htnet.status": "interrupted"})
                tracking.retry(client.set_terminated, children[seed], "KILLED")
            tracking.retry(client.set_terminated, parent_id, "KILLED")
            raise

    seeds_table, summary = log_summary(client, source, parent_id, rows, predictions, started)
    finished = int((seeds_table["status"] == "finished").sum())
    interval = "[95% bootstrap interval over seeds and subjects]" if finished >= MIN_SEEDS else \
        f"(fewer than {MIN_SEEDS} seeds: no interval)"
    print(f"\n{method}: {finished} of {plural(len(seeds_table), 'seed')} finished; mean ± std over seeds {interval}",
          file=out)
    if len(summary):
        with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
            print(protocol_table(summary).set_index("protocol").T.rename_axis("").to_string(), file=out)
        for key in ("inner_val_uf1", "fold_epochs", "wall_time_s"):
            if key in summary.index:
                print(f"{key}: {format_interval(summary.loc[key])}", file=out)
        if not summary["std"].notna().any():
            print("(one seed: no spread)", file=out)
    else:
        print("no seed finished: nothing to summarize", file=out)
    print(f"MLflow: rerun parent run {parent_id} (experiment {store.experiment}, tag htnet.method={method!r})",
          file=out)
    return {"parent_run_id": parent_id, "seeds": seeds_table, "summary": summary, "method": method, "config": base}
