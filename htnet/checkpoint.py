"""A LOSO run's folder as its checkpoint: each finished fold is written as it ends (folds/<subject>.json,
after its weights), so a killed run continues where it was (`htnet train --resume`, a retried or resumed Ray
Tune trial) and trains only the folds not done. Folds are seeded per subject: nothing else is needed."""
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from htnet.errors import UserError
from htnet.folds import FoldOutcome, InnerChoice
from htnet.io import path_under, read_bytes, read_yaml, write_files

FOLDS_DIR = "folds"
ATTEMPTS = "attempts.csv"
# what a run folder holds (LosoResult.save, the fold records, weights): all --overwrite removes
RUN_FILES = ("config.yaml", "predictions.csv", "folds.csv", "history.csv", "metrics.json", ATTEMPTS,
             FOLDS_DIR, "weights")
# may differ on resume: where it runs and how often it reports change no result
FREE_ON_RESUME = ("device", "report_every")


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
    ours = yaml.safe_load(yaml.safe_dump(config.to_dict()))  # as written: lists, plain numbers
    for key in sorted(set(ours) | set(saved)):
        if key not in FREE_ON_RESUME and ours.get(key) != saved.get(key):
            raise UserError(f"{path}: the run there has {key}={saved.get(key)!r}, this command "
                            f"{ours.get(key)!r}: resume with the same config, or --overwrite")
    return config


def begin(out_dir, folds, data, config, resume):
    """(finished folds as load_folds gives them, the attempts table, this attempt's number) of a run in `out_dir`
    (None: kept nowhere), whose config.yaml is written; a new run first removes an earlier one's records."""
    path = None if out_dir is None else Path(out_dir) / ATTEMPTS
    finished = load_folds(out_dir, folds, data) if resume else {}
    empty = pd.DataFrame(columns=["attempt", "fold_epochs", "folds"])
    attempts = pd.read_csv(path) if resume and path.is_file() else empty
    attempt = 1 + max([0, *attempts.attempt.astype(int), *(o.attempt for o in finished.values())])
    if out_dir is not None:
        if not resume:   # no fold record of an earlier run may count as this one's
            shutil.rmtree(Path(out_dir) / FOLDS_DIR, ignore_errors=True)
            path.unlink(missing_ok=True)
        write_files({Path(out_dir) / "config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False)})
    return finished, attempts, attempt


def save_fold(out_dir, outcomes, data, attempts, attempt):
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
                          for run, epoch, loss, acc, uf1 in outcome.history]}
    write_files({path_under(out_dir, FOLDS_DIR, f"{outcome.subject}.json"): json.dumps(record)})
    table = pd.concat([attempts[attempts.attempt != attempt], pd.DataFrame([{
        "attempt": attempt, "fold_epochs": sum(o.fold_epochs for o in trained_now), "folds": len(trained_now)}])])
    write_files({Path(out_dir) / ATTEMPTS: table.to_csv(index=False)})
    return table


def load_folds(out_dir, folds, data):
    """{fold index: FoldOutcome} of the folds `out_dir` finished; a record that does not fit these folds and
    data (another release, another subject set) is one UserError line naming the file."""
    folder, done = Path(out_dir) / FOLDS_DIR, {}
    index_of = {f.subject: i for i, f in enumerate(folds)}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(read_bytes(path))
            subject = record["subject"]
            i = index_of.get(subject)
            if i is None or record["fold"] != i + 1:
                raise UserError(f"{path}: fold {subject!r} (number {record['fold']}) is not one of this run's "
                                f"folds: resume with the same data and subjects, or --overwrite")
            test = folds[i].test
            if record["samples"] != data.samples[test].tolist():
                raise UserError(f"{path}: fold {subject!r} tested other samples than the data has now")
            chosen = {p: (c["epoch"], np.asarray(c["predictions"], dtype=np.int64))
                      for p, c in record["chosen"].items()}
            inner = None
            if record["inner"] is not None:
                inner = InnerChoice(np.asarray(record["inner"]["labels"], dtype=data.labels.dtype))
                inner.epoch = record["inner"]["epoch"]
                inner.predictions = np.asarray(record["inner"]["predictions"], dtype=np.int64)
            history = [(run, epoch, loss, acc, uf1) for run, epoch, loss, acc, uf1 in record["history"]]
            done[i] = FoldOutcome(subject, test, chosen, inner, history, int(record["fold_epochs"]),
                                  resumed=True, attempt=int(record["attempt"]))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a fold record ({type(e).__name__}: {e})") from None
    return done
