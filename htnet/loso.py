"""Leave-one-subject-out cross-validation of one configuration (LosoConfig -> LosoResult), the run every
search trial is: per test subject a seeded model trains on the others; `callback` may stop it."""
import dataclasses
import math
import numbers
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from htnet import checkpoint
from htnet.data import CROP_MODES, CompositeData, htnet_input
from htnet.errors import UserError, first_line
from htnet.io import ensure_writable_dir, path_under, write_files
from htnet.metrics import PROTOCOLS, compute_metrics, uf1_uar
from htnet.engine import env_int, resolve_fold_group_size, run_folds
from htnet.folds import OPTIMIZERS, make_folds
from htnet.models import create_model, model_input

ENGINES = ("plain", "batched")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "eager")  # "": off; eager: Dynamo only (a check)
REPORTS_WITH_CALLBACK = 8
# validate's rules besides the annotated types: numbers are positive but these; names are one of their choices
NON_NEGATIVE = ("seed", "inner_val_subjects", "weight_decay")
CHOICES = {"optimizer": OPTIMIZERS, "engine": ENGINES, "crop_mode": CROP_MODES}
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")   # YAML 1.1 reads 1e-4 (no dot) as text


@dataclass
class LosoConfig:
    model: str = "htnet"
    model_config: dict = field(default_factory=dict)
    epochs: int = 800
    batch_size: int = 256
    lr: float = 5e-5
    optimizer: str = "adam"
    weight_decay: float = 0.0
    shuffle: bool = False
    seed: int = 1
    device: str = "auto"
    subjects: int | list | None = None  # a count or ids; None = all
    protocols: tuple = PROTOCOLS
    inner_val_subjects: int = 8   # the best of 3, 8, 16 (benchmarks/results/2026-12-07-inner-protocol)
    inner_patience: int | None = None
    eval_every: int = 1
    crop_mode: str = "reference"
    standardize: bool = False
    engine: str = "batched"  # "plain": groups of one fold-model, the reference recipe
    # batched: fold-models per group; None = what memory and the device allow (REPORTS_WITH_CALLBACK groups at
    # least when a pruner listens). A run records the value it used: it shapes the batches and dropout stream.
    fold_group_size: int | None = None
    save_weights: bool = False
    report_every: int = 1
    bf16: bool = True  # bf16 autocast for grouped HTNet on a CUDA device that supports it (STSTNet, CPU: float32)
    compile: str = ""  # torch.compile of the grouped model, one of COMPILE_MODES ("": off, slower on a CPU)

    @classmethod
    def from_dict(cls, values):
        if not isinstance(values, dict):
            raise UserError(f"a LOSO config must be a mapping of keys to values, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise UserError(f"unknown LOSO config key {key!r} (known: {', '.join(sorted(known))})")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self):
        return {**dataclasses.asdict(self), "protocols": list(self.protocols)}

    def validate(self):
        """Each field's type (its annotation) and range, one UserError line for the first bad one; numbers are
        normalised to int/float/bool (numpy scalars from a search too; 1.0 and True are not integers)."""
        protocols = self.protocols.split(",") if isinstance(self.protocols, str) else self.protocols
        if not isinstance(protocols, (list, tuple)):
            raise UserError(f"protocols must be a list of names, got {protocols!r}")
        self.protocols = tuple(protocols)
        names = [("protocol", p, PROTOCOLS) for p in protocols or ["(none)"]]
        for name, value, known in names + [(n, getattr(self, n), known) for n, known in CHOICES.items()]:
            if not isinstance(value, str) or value not in known:
                raise UserError(f"unknown {name} {value!r} (known: {', '.join(known)})")
        for f in dataclasses.fields(self):
            name, value = f.name, getattr(self, f.name)
            positive = name not in NON_NEGATIVE or (name == "inner_val_subjects" and "inner" in self.protocols)
            sign = "positive" if positive else "non-negative"
            if f.type is bool:
                if not isinstance(value, (bool, np.bool_)):
                    raise UserError(f"{name} must be true or false, got {value!r}")
                setattr(self, name, bool(value))
            elif f.type is float:
                value = float(value) if isinstance(value, str) and NUMBER.fullmatch(value.strip()) else value
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                        or not (value > 0 if positive else value >= 0):
                    raise UserError(f"{name} must be a {sign} finite number, got {value!r}")
                setattr(self, name, float(value))
            elif f.type in (int, int | None) and (value is not None or f.type is int):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise UserError(f"{name} must be an integer, got {value!r}")
                if value < (1 if positive else 0):
                    raise UserError(f"{name} must be a {sign} integer, got {value!r}")
                setattr(self, name, int(value))
        if not isinstance(self.compile, str) or self.compile not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {self.compile!r} (known: '' (off), {', '.join(COMPILE_MODES[1:])})")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UserError(f"unknown device {self.device!r} (auto, cpu, cuda, cuda:N)")
        subjects = self.subjects
        if isinstance(subjects, bool) or not isinstance(subjects, (type(None), numbers.Integral, list, tuple)) \
                or (isinstance(subjects, (list, tuple)) and not all(isinstance(s, (str, int)) for s in subjects)):
            raise UserError(f"subjects must be a count or a list of subject ids, got {subjects!r}")
        if isinstance(subjects, numbers.Integral):
            self.subjects = _subject_count(subjects)
        if not isinstance(self.model_config, dict):
            raise UserError(f"model_config must be a mapping, got {self.model_config!r}")
        for key in self.model_config:
            if not isinstance(key, str):
                raise UserError(f"model {self.model} has no argument {key!r}")
        with torch.device("meta"):  # built to be checked (UserError on an impossible config), no weights allocated
            create_model(self.model, **self.model_config)


def _subject_count(count):
    if count < 2:
        raise UserError(f"subjects must be at least 2 for LOSO, got {count}")
    return int(count)


@dataclass
class LosoResult:
    config: LosoConfig
    predictions: pd.DataFrame
    metrics: dict
    history: pd.DataFrame
    stopped: bool
    folds_done: int
    folds_total: int
    fold_epochs: int
    wall_time_s: float
    device: str
    fold_order: pd.DataFrame = None   # fold (visit number), subject, dataset: the order folds were trained in

    def save(self, out_dir):
        """The result files, all or none (a full disk keeps a previous run's set whole)."""
        out_dir = ensure_writable_dir(out_dir)
        write_files({out_dir / "predictions.csv": self.predictions.to_csv(index=False),
                     out_dir / "folds.csv": self.fold_order.to_csv(index=False),
                     out_dir / "history.csv": self.history.to_csv(index=False),
                     out_dir / "metrics.json": pd.Series(self.metrics, dtype=float).to_json(indent=2),
                     out_dir / "config.yaml": yaml.safe_dump(self.config.to_dict(), sort_keys=False)})
        return out_dir


def check_environment():
    """The HTNET_* settings the engine reads as it trains, parsed before a run records anything (one line each)."""
    env_int("HTNET_BATCHED_GROUP", 1)
    env_int("HTNET_BATCHED_WORKERS", 0)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)


def parse_subjects(text):
    """Command-line subjects: a count ('12') or comma-separated ids ('sub01,s03'; zero-padded digits: SAMM's '006')."""
    if text is None:
        return None
    text = str(text).strip()
    if text.isdigit() and not text.startswith("0"):
        return int(text)
    return [s.strip() for s in text.split(",") if s.strip()]


def select_subjects(data, subjects):
    """subjects: None (all), a count (taken in turn from each source dataset) or a list of ids."""
    if subjects is None:
        return data
    if isinstance(subjects, int):
        return data.restrict(data.pick_subjects(_subject_count(subjects)))
    return data.restrict([str(s) for s in subjects])


def model_inputs(data, config):
    """The (N, 3, 28, 28) array the model reads: HTNet's tiled landmark crops or the whole face."""
    if model_input(config.model) == "face_crops":
        return htnet_input(data.images, data.landmarks, config.crop_mode)
    return data.images


def _prepared(config, data):
    """(config validated, data of its subjects, device, model input tensor on it): a run's start."""
    config = config if isinstance(config, LosoConfig) else LosoConfig.from_dict(config)
    data = select_subjects(data, config.subjects)
    device = resolve_device(config.device)
    return config, data, device, torch.tensor(np.ascontiguousarray(model_inputs(data, config)), device=device)


def lone_subjects_warning(data):
    """One line naming the subjects with a single sample (the paper protocol then needs one right epoch), or None."""
    counts = pd.Series(data.subjects).value_counts()
    lone = [s for s in data.subject_ids if counts[s] == 1]
    if not lone:
        return None
    return (f"warning: {len(lone)} subject(s) with a single sample ({', '.join(lone)}): each fold tests "
            f"one sample (--min-samples-per-subject 2 makes this an error)")


def _prediction_rows(subject, test, chosen, data):
    """The long table's rows of one subject: chosen = {protocol: (epoch, predictions)}."""
    return [pd.DataFrame({"sample": data.samples[test], "subject": subject, "dataset": data.datasets[test],
                          "label": data.labels[test], "protocol": protocol, "prediction": predicted, "epoch": epoch})
            for protocol, (epoch, predicted) in chosen.items()]


def _pooled_metrics(prediction_rows, outcomes):
    predictions = pd.concat(prediction_rows, ignore_index=True)
    metrics = compute_metrics(predictions)
    inner = [o.inner for o in outcomes if o.inner is not None]
    if inner:
        metrics["inner_val_uf1"], metrics["inner_val_uar"] = uf1_uar(
            np.concatenate([i.labels for i in inner]), np.concatenate([i.predictions for i in inner]))
    return predictions, metrics


def check_resumable(config, data, out_dir):
    """Check what run_loso(..., resume=True) reads back from `out_dir`, writing nothing (one UserError line)."""
    data = select_subjects(data, config.subjects)
    config = checkpoint.continued_config(out_dir, config)
    checkpoint.read_back(out_dir, make_folds(data, config), data, config)


def run_loso(config, data: CompositeData, callback=None, out_dir=None, progress=True, resume=False):
    """Every fold of `data`'s `subjects`; every `report_every` folds `callback(report)` gets the pooled metrics,
    step, folds_total, fold_epochs, train_loss and `folds` (each new fold's own metrics, numbered in LOSO
    order, for pruners that pair folds across trials); True stops the run. With `out_dir` each fold is kept
    there as it ends (htnet.checkpoint); `resume` continues the run there, training only the folds not done
    (callbacks come for those), with the same results as a run never stopped."""
    started = time.perf_counter()
    check_environment()
    config, data, device, X = _prepared(config, data)
    out_dir = ensure_writable_dir(out_dir) if out_dir is not None else None
    resume = resume and out_dir is not None
    if resume:
        config = checkpoint.continued_config(out_dir, config)
    y = torch.tensor(data.labels, device=device)
    folds = make_folds(data, config)
    if config.engine == "batched":  # the grouping shapes the batch stream: the result records it
        config = dataclasses.replace(config, fold_group_size=resolve_fold_group_size(
            folds, config, device, min_groups=REPORTS_WITH_CALLBACK if callback else 1))
    finished, attempts, attempt, made_by = checkpoint.begin(out_dir, folds, data, config, resume)
    outcomes, prediction_rows, new_folds, stopped = [], [], [], False
    with tqdm(total=len(folds), desc="LOSO folds", disable=not progress) as bar:  # closed on errors too
        for outcome in run_folds(folds, X, y, data, config, device, progress=progress, finished=finished):
            outcomes.append(outcome)
            rows = _prediction_rows(outcome.subject, outcome.test, outcome.chosen, data)
            prediction_rows += rows
            if not outcome.resumed:
                outcome.attempt = attempt
                if out_dir is not None:
                    attempts = checkpoint.save_fold(out_dir, outcomes, data, attempts, attempt, made_by)
            bar.update(1)
            predictions, metrics = _pooled_metrics(prediction_rows, outcomes)
            bar.set_postfix_str(", ".join(f"{p} UF1 {metrics[f'{p}_full_uf1']:.3f}" for p in config.protocols))
            if callback is None or outcome.resumed:
                continue
            new_folds.append({"fold": len(outcomes), "subject": outcome.subject, **_pooled_metrics(rows, [outcome])[1]})
            if len(outcomes) % config.report_every == 0 or len(outcomes) == len(folds):
                main = pd.DataFrame([r[:3] for o in outcomes for r in o.history if r[0] == "main"],
                                    columns=["run", "epoch", "train_loss"])
                report = {"step": len(outcomes), "folds_total": len(folds),
                          "fold_epochs": sum(o.fold_epochs for o in outcomes),
                          "train_loss": float(main.groupby("epoch").train_loss.mean().iloc[-1]),
                          **metrics, "folds": new_folds}
                new_folds = []
                if callback(report) and len(outcomes) < len(folds):
                    stopped = True
                    break
    fold_epochs, wall = sum(o.fold_epochs for o in outcomes), time.perf_counter() - started
    earlier = int(attempts[attempts.attempt != attempt].fold_epochs.sum())
    resumed = sum(o.fold_epochs for o in outcomes if o.resumed)
    # fold_epochs: the result's (as a run never stopped); _attempt: trained now; _trained: by every attempt
    metrics.update(fold_epochs=fold_epochs, fold_epochs_attempt=fold_epochs - resumed,
                   fold_epochs_trained=earlier + fold_epochs - resumed, fold_epochs_resumed=resumed,
                   attempt=attempt, wall_time_s=wall)
    history = pd.DataFrame([(o.subject, *row) for o in outcomes for row in o.history],
                           columns=["subject", "run", "epoch", "train_loss", "test_acc", "val_uf1"])
    fold_order = pd.DataFrame({"fold": range(1, len(folds) + 1), "subject": [f.subject for f in folds],
                               "dataset": [data.datasets[f.test[0]] for f in folds],
                               "trained": [n < len(outcomes) for n in range(len(folds))],
                               "attempt": [o.attempt for o in outcomes] + [pd.NA] * (len(folds) - len(outcomes))})
    result = LosoResult(config, predictions, metrics, history, stopped, len(outcomes), len(folds),
                        fold_epochs, wall, str(device), fold_order)
    if out_dir is not None:
        result.save(out_dir)
    return result


def load_weights(path, device="cpu"):
    """A state_dict read with weights_only=True (no code runs); one UserError line for a file that is not one."""
    try:
        with warnings.catch_warnings(action="ignore"):  # torch warns about pickle protocols: one line is ours
            state = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError, ...: any unreadable file)
        raise UserError(f"{path}: not a PyTorch weights file (torch.load with weights_only=True failed: "
                        f"{type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state_dict "
                        f"(a mapping of parameter names to tensors)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: weight {bad!r} has non-finite values (NaN or inf)")
    return state


def evaluate_weights(weights_dir, data, config):
    """Test every subject with `<weights_dir>/<subject>.pth` (the reference's layout): (predictions, metrics)."""
    config, data, device, X = _prepared(config, data)
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise UserError(f"weights folder not found: {weights_dir}")
    paths = {s: path_under(weights_dir, f"{s}.pth") for s in data.subject_ids}
    missing = [s for s, path in paths.items() if not path.is_file()]
    if missing:
        raise UserError(f"weights folder {weights_dir} has no {missing[0]}.pth for subject {missing[0]!r}")
    model = create_model(config.model, **config.model_config).to(device).eval()
    rows = []
    for subject, path in paths.items():
        state = load_weights(path, device)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, AttributeError, ValueError) as e:
            raise UserError(f"{path}: not weights of model {config.model} with this config ({first_line(e)})") from None
        test = np.flatnonzero(data.subjects == subject)
        with torch.no_grad():
            rows += _prediction_rows(subject, test, {"weights": (np.nan, model(X[test]).argmax(1).cpu().numpy())}, data)
    predictions = pd.concat(rows, ignore_index=True)
    return predictions, compute_metrics(predictions)
