"""The function trainable: one Ray Tune trial = one full LOSO run of one sampled configuration.

`loso_trial(config, data, settings)` is wrapped by `tune.with_parameters`, which puts the
CompositeData into Ray's object store once; every node fetches it once into its shared-memory
store and trials read it from there (numpy arrays without a copy), so the release is read once
per search, from the driver, and moved once per node.

Every `report_every` folds the engine calls back with pooled results; the trial passes them to
`tune.report`, so the Optuna pruner (search.pruning) sees each intermediate LOSO result. The last
report carries the final metrics and, as a Ray checkpoint, the trial's files (predictions.csv,
history.csv, metrics.json, config.yaml, confusion_matrix.png, learning_curve.png, weights/), which
the driver logs to MLflow. A configuration that cannot train (diverged loss, impossible model
arguments, a value LosoConfig rejects: see `trial_config`) reports `htnet_status: failed` instead of
raising, so Ray does not retry it: retries are for infrastructure failures (a worker or node that
died).
"""
import math
import os
import shutil
import tempfile
from pathlib import Path

from search.tracking.figures import confusion_matrix_png, learning_curve_png

FINAL_FILES = ("predictions.csv", "history.csv", "metrics.json", "config.yaml")


def _report(values, metric):
    """The objective first: Ray Tune's progress table shows a result's first four numbers."""
    first = [metric, "step", "inner_full_uf1" if metric != "inner_full_uf1" else "paper_full_uf1", "train_loss"]
    return {**{k: values[k] for k in first if k in values}, **values}


def _numbers(values):
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            out[key] = value.item()
    return out


def _threads(resources):
    cpus = resources.required_resources.get("CPU", 1) if resources is not None else 1
    return max(1, int(math.floor(cpus)))


def trial_config(space, config, overrides=None):
    """The LosoConfig of a trial's sampled `config`. Whatever rejects the combination (LosoConfig's
    checks, a `when` or the model's constructor, with a UserError or with the TypeError or
    ValueError of a value it cannot take) raises one UserError: the trial fails once, not retried."""
    from htnet.errors import UserError
    from htnet.loso import LosoConfig

    try:
        return LosoConfig.from_dict(space.resolve(space.sampled(config), overrides))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - building a config is deterministic: a retry fails again
        text = str(e).strip()
        raise UserError(f"invalid configuration: {type(e).__name__}: "
                        f"{text.splitlines()[0] if text else 'no message'}") from None


def loso_trial(config, data=None, settings=None):
    """Run LOSO for the sampled `config`; see the module docstring."""
    import ray
    import torch
    from ray import tune

    from htnet.errors import TrainingDiverged, UserError
    from htnet.loso import resolve_device, run_loso
    from search.pruning import FOLDS_KEY
    from search.space import fold_objectives

    space = settings["space"]
    metric = space.metric
    context = tune.get_context()
    trial_id = context.get_trial_id()
    replay = (settings.get("replay") or {}).get(trial_id)
    if replay is not None:  # ended before the driver died, after Ray's last snapshot
        tune.report({**replay, "final": 1, "htnet_status": "replayed"})
        return

    torch.set_num_threads(_threads(context.get_trial_resources()))
    info = {"htnet_node": ray.get_runtime_context().get_node_id(), "htnet_pid": os.getpid()}

    def failed(error, step=0):
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        tune.report({metric: float("nan"), "step": step, "final": 1, "htnet_status": "failed",
                     "htnet_error": f"{type(error).__name__}: {message}", **info})

    try:
        loso_config = trial_config(space, config, settings.get("overrides"))
        info["htnet_device"] = str(resolve_device(loso_config.device))
    except UserError as e:
        failed(e)
        return

    done = {"step": 0}

    def callback(progress):
        done["step"] = progress["step"]
        if progress["step"] >= progress["folds_total"]:
            return None  # the final report follows, with the files
        tune.report(_report({**_numbers(progress), FOLDS_KEY: fold_objectives(progress, metric), "final": 0,
                             "htnet_status": "running", **info}, metric))
        return None

    out = Path(tempfile.mkdtemp(prefix=f"htnet-{trial_id}-"))
    try:
        try:
            result = run_loso(loso_config, data, callback=callback, out_dir=out, progress=False)
        except (TrainingDiverged, UserError) as e:
            failed(e, done["step"])
            return
        confusion_matrix_png(result.predictions, out / "confusion_matrix.png",
                             title=f"{loso_config.model} trial {trial_id}")
        learning_curve_png(result.history, out / "learning_curve.png",
                           title=f"{loso_config.model} trial {trial_id}")
        main = result.history[result.history["run"] == "main"]
        if len(main):  # as in the engine's reports: the last epoch's mean over folds
            result.metrics.setdefault("train_loss", float(main.groupby("epoch")["train_loss"].mean().iloc[-1]))
        final = {**_numbers(result.metrics), "step": result.folds_done,
                 "folds_total": result.folds_total, "final": 1, "htnet_status": "finished", **info}
        tune.report(_report(final, metric), checkpoint=tune.Checkpoint.from_directory(str(out)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
