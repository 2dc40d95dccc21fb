"""A LOSO run's folder as its checkpoint: each finished fold is written as it ends (folds/<subject>.json,
after its weights), so a killed run continues where it was (`htnet train --resume`, a retried or resumed Ray
Tune trial) and trains only the folds not done. Folds are seeded per subject: nothing else is needed. Nothing read
back is trusted: each record carries the fingerprint of what made it and is checked field by field."""
import dataclasses
import io
import json
import math
import reprlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from htnet.data.release import NUM_CLASSES, check_rows, duplicates, read_csv
from htnet.errors import UserError
from htnet.folds import FoldOutcome, InnerChoice
from htnet.io import path_under, read_json, read_yaml, write_files

FOLDS_DIR = "folds"
ATTEMPTS = "attempts.csv"
# what a run folder holds (LosoResult.save, the fold records, weights): all --overwrite removes
RUN_FILES = ("config.yaml", "predictions.csv", "folds.csv", "history.csv", "metrics.json", ATTEMPTS,
             FOLDS_DIR, "weights")
# may differ on resume: where it runs and how often it reports change no result
FREE_ON_RESUME = ("device", "report_every")
# LosoConfig fields that change no fold's result (where and how it runs, what it reports and keeps); every other
# field, new ones too, is in the fingerprint each fold record carries (made_by): resume refuses another's records
NOT_RESULT = ("device", "engine", "fold_group_size", "compile", "report_every", "save_weights")
MAX_RECORD_BYTES = 16 * 1024 * 1024   # a record of 800 epochs is ~100 kB
ATTEMPT_COLUMNS = {"attempt": (1, 10**6), "fold_epochs": (0, 10**12), "folds": (0, 10**6)}   # integers in range


@dataclasses.dataclass(frozen=True)
class Rule:
    """A fold record field: int, float (finite, or NaN where `nan`) in low..high, or str (one of `among` if given);
    with `length`, a list of that many."""
    kind: type
    low: float = -math.inf
    high: float = math.inf
    length: int | None = None
    nan: bool = False
    among: tuple = ()

    def allows(self, value):
        if self.kind is str:
            return isinstance(value, str) and (not self.among or value in self.among)
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return self.nan and math.isnan(value)
        return self.low <= value <= self.high

    def __str__(self):
        if self.kind is str:
            return f"one of {', '.join(map(repr, self.among))}" if self.among else "text"
        return ("an integer" if self.kind is int else "a finite number") + (
            f" in {self.low}..{self.high}" if math.isfinite(self.high) else f" >= {self.low}") + " or NaN" * self.nan

    def check(self, where, name, value):
        if self.length is not None and not (isinstance(value, list) and len(value) == self.length):
            got = f"{len(value)}" if isinstance(value, list) else reprlib.repr(value)
            raise UserError(f"{where}: {name} must be a list of {self.length} values, got {got}")
        for k, item in enumerate(value) if self.length is not None else [(None, value)]:
            if not self.allows(item):
                at = "" if k is None else f"[{k}]"
                raise UserError(f"{where}: {name}{at} must be {self}, got {reprlib.repr(item)}")


def record_schema(config, fold, number):
    """A fold record's fields (dotted: nested) -> Rule, and its history rows' columns, for fold `number` of a run."""
    epochs, classes, inner, n = config.epochs, (0, NUM_CLASSES - 1), "inner" in config.protocols, len(fold.test)
    schema = {"fold": Rule(int, number, number), "attempt": Rule(int, *ATTEMPT_COLUMNS["attempt"]),
              "fold_epochs": Rule(int, epochs, epochs * (1 + inner)), "samples": Rule(str, length=n)}
    for p in config.protocols:
        schema |= {f"chosen.{p}.epoch": Rule(int, 1, epochs), f"chosen.{p}.predictions": Rule(int, *classes, n)}
    if inner:
        schema |= {"inner.epoch": Rule(int, 1, epochs), "inner.labels": Rule(int, *classes, len(fold.val)),
                   "inner.predictions": Rule(int, *classes, len(fold.val))}
    history = {"run": Rule(str, among=("inner", "main")), "epoch": Rule(int, 1, epochs), "train_loss": Rule(float, 0),
               "test_acc": Rule(float, 0, 1, nan=True), "val_uf1": Rule(float, 0, 1, nan=True)}
    return schema, history


def fingerprint(config, data, folds):
    """What made a run's fold records: its config but NOT_RESULT (as JSON holds it), its data, its fold order."""
    values = json.loads(json.dumps(config.to_dict()))
    return {**{k: v for k, v in values.items() if k not in NOT_RESULT}, "data": data.fingerprint(),
            "folds": [f.subject for f in folds]}


def _field(where, record, name):
    """record's field `name` (dotted: nested), or UserError naming the first part missing."""
    value = record
    for depth, key in enumerate(name.split(".")):
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{where}: {'.'.join(name.split('.')[:depth + 1])} is missing")
        value = value[key]
    return value


def prepare_folder(out_dir, resume=False, overwrite=False):
    """A folder never mixes two runs: one that holds a run is continued (`resume`), cleared (`overwrite`:
    only a run's files, anything else refuses) or refused."""
    out_dir = Path(out_dir)
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries or resume:
        return out_dir
    if not overwrite:
        done = len(list((out_dir / FOLDS_DIR).glob("*.json")))
        what = f"a run with {done} fold(s) done" if "config.yaml" in entries else f"{len(entries)} entries"
        raise UserError(f"{out_dir} is not empty ({what}): --resume continues its run, "
                        f"--overwrite clears it, or choose another --out")
    foreign = [name for name in entries if name not in RUN_FILES and not name.startswith(".")]
    if foreign:
        raise UserError(f"{out_dir} holds {foreign[0]!r}, which is not a run's file: --overwrite clears only "
                        f"run folders; choose another --out")
    for name in entries:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return out_dir


def continued_config(out_dir, config):
    """The config to resume `out_dir`'s run with: the command's, which must equal the folder's config.yaml
    but for FREE_ON_RESUME; an unset fold_group_size takes the folder's (the grouping shapes the results)."""
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        return config
    saved = read_yaml(path)
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a LOSO config (a {type(saved).__name__})")
    if config.fold_group_size is None and saved.get("fold_group_size") is not None:
        config = dataclasses.replace(config, fold_group_size=saved["fold_group_size"])
        try:
            config.validate()
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    ours = yaml.safe_load(yaml.safe_dump(config.to_dict()))  # as written: lists, plain numbers
    for key in sorted(set(ours) | set(saved)):
        if key not in FREE_ON_RESUME and ours.get(key) != saved.get(key):
            raise UserError(f"{path}: the run there has {key}={saved.get(key)!r}, this command "
                            f"{ours.get(key)!r}: resume with the same config, or --overwrite")
    return config


def begin(out_dir, folds, data, config, resume):
    """(finished folds as load_folds gives them, the attempts table, this attempt's number, the fingerprint its
    records carry) of a run in `out_dir` (None: kept nowhere). All that is read back is checked before config.yaml
    is written; a new run first removes an earlier one's records."""
    path = None if out_dir is None else Path(out_dir) / ATTEMPTS
    made_by = None if out_dir is None else fingerprint(config, data, folds)
    finished, attempts = read_back(out_dir, folds, data, config) if resume else ({}, read_attempts(None))
    attempt = 1 + max([0, *attempts.attempt, *(o.attempt for o in finished.values())])
    if out_dir is not None:
        if not resume:   # no fold record of an earlier run may count as this one's
            shutil.rmtree(Path(out_dir) / FOLDS_DIR, ignore_errors=True)
            path.unlink(missing_ok=True)
        write_files({Path(out_dir) / "config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False)})
    return finished, attempts, attempt, made_by


def save_fold(out_dir, outcomes, data, attempts, attempt, made_by):
    """The last of `outcomes`, trained in `attempt`: its weights, its record (the marker that the fold is done),
    then `attempts` with this attempt's row so far, returned (a killed attempt's work after its last fold is lost)."""
    outcome, trained_now = outcomes[-1], [o for o in outcomes if not o.resumed]
    if outcome.weights is not None:
        buffer = io.BytesIO()   # serialised first: torch.save makes a full disk an opaque RuntimeError
        torch.save(outcome.weights, buffer)
        write_files({path_under(out_dir, "weights", f"{outcome.subject}.pth"): buffer.getvalue()})
    inner = outcome.inner
    record = {"fold": len(outcomes), "subject": outcome.subject, "attempt": attempt,
              "fold_epochs": outcome.fold_epochs, "samples": data.samples[outcome.test].tolist(),
              "chosen": {p: {"epoch": None if e is None else int(e), "predictions": np.asarray(pred).tolist()}
                         for p, (e, pred) in outcome.chosen.items()},
              "inner": None if inner is None else {"epoch": int(inner.epoch), "labels": inner.labels.tolist(),
                                                   "predictions": np.asarray(inner.predictions).tolist()},
              "history": [[run, int(epoch), float(loss), float(acc), float(uf1)]
                          for run, epoch, loss, acc, uf1 in outcome.history], "made_by": made_by}
    write_files({path_under(out_dir, FOLDS_DIR, f"{outcome.subject}.json"): json.dumps(record)})
    table = pd.concat([attempts[attempts.attempt != attempt], pd.DataFrame([{
        "attempt": attempt, "fold_epochs": sum(o.fold_epochs for o in trained_now), "folds": len(trained_now)}])])
    write_files({Path(out_dir) / ATTEMPTS: table.to_csv(index=False)})
    return table


def read_back(out_dir, folds, data, config):
    """(finished folds, attempts table) of the run in `out_dir`, every record checked, nothing written."""
    path = Path(out_dir) / ATTEMPTS
    return (load_folds(out_dir, folds, data, config, fingerprint(config, data, folds)),
            read_attempts(path if path.exists() else None))


def read_attempts(path):
    """attempts.csv's ATTEMPT_COLUMNS as integers, one row per attempt (none without a `path`); anything else is
    one UserError line."""
    if path is None:
        return pd.DataFrame(columns=list(ATTEMPT_COLUMNS))
    table = read_csv(path, list(ATTEMPT_COLUMNS))
    numbers = table[list(ATTEMPT_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    check_rows(path, table, [(~numbers[c].between(low, high) | (numbers[c] % 1 != 0),
                              lambda row, c=c, low=low, high=high: f"{c} {row[c]!r} is not an integer in {low}..{high}")
                             for c, (low, high) in ATTEMPT_COLUMNS.items()] + [duplicates(table.attempt, "attempt")])
    return numbers.astype(np.int64)


def load_folds(out_dir, folds, data, config, made_by):
    """{fold index: FoldOutcome} of the folds `out_dir` finished, each record checked first: made by this run
    (`made_by`: fingerprint's), then field by field (record_schema); a bad one is one UserError line."""
    folder, done = Path(out_dir) / FOLDS_DIR, {}
    index_of = {f.subject: i for i, f in enumerate(folds)}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = read_json(path, MAX_RECORD_BYTES)
        for key, ours in made_by.items():
            if (theirs := _field(path, record, f"made_by.{key}")) != ours:
                raise UserError(f"{path}: made with {key}={reprlib.repr(theirs)}, this run has "
                                f"{key}={reprlib.repr(ours)}; use --overwrite to start again")
        Rule(str, among=(path.stem,)).check(path, "subject", _field(path, record, "subject"))
        if path.stem not in index_of:
            raise UserError(f"{path}: {path.stem!r} is not one of this run's folds")
        i = index_of[path.stem]
        fold, (schema, columns) = folds[i], record_schema(config, folds[i], i + 1)
        for name, rule in schema.items():
            rule.check(path, name, _field(path, record, name))
        history = _field(path, record, "history")
        if not isinstance(history, list) or not all(isinstance(r, list) and len(r) == len(columns) for r in history):
            raise UserError(f"{path}: history must be a list of [{', '.join(columns)}] rows")
        for (name, rule), column in zip(columns.items(), zip(*history)):   # history.<column>[row]
            dataclasses.replace(rule, length=len(history)).check(path, f"history.{name}", list(column))
        if record["samples"] != data.samples[fold.test].tolist():
            raise UserError(f"{path}: samples are not fold {fold.subject!r}'s in the data now")
        inner = None
        if "inner" in config.protocols:   # the validation labels are the data's
            inner = InnerChoice(data.labels[fold.val])
            inner.epoch = record["inner"]["epoch"]
            inner.predictions = np.asarray(record["inner"]["predictions"], np.int64)
        chosen = {p: (record["chosen"][p]["epoch"], np.asarray(record["chosen"][p]["predictions"], np.int64))
                  for p in config.protocols}
        done[i] = FoldOutcome(fold.subject, fold.test, chosen, inner, [tuple(row) for row in history],
                              record["fold_epochs"], resumed=True, attempt=record["attempt"])
    return done
