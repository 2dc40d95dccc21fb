"""The Ray Tune function trainable: one trial = one LOSO run of one sampled configuration, reported to Optuna's
pruner as it goes (search.bridge). The trial's folder is its Ray checkpoint at every report, so a retried or resumed
trial trains only the missing folds (htnet.checkpoint); storage that stops answering (S3 down) does not end a trial."""
import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from htnet.errors import TrainingDiverged, UserError, first_line
from htnet.io import read_yaml
from htnet.loso import LosoConfig, resolve_device, run_loso
from search.bridge import fold_objectives
from search.space import trial_config
from search.tracking.figures import confusion_matrix_png, learning_curve_png


def _storage_wait_s():
    text = os.environ.get("HTNET_STORAGE_WAIT_S", "").strip() or "3600"
    with contextlib.suppress(ValueError):
        if 0 <= (value := float(text)) < math.inf:
            return value
    raise UserError(f"environment variable HTNET_STORAGE_WAIT_S={text!r} must be a number of seconds >= 0")


STORAGE_WAIT_S = _storage_wait_s()  # how long a trial's last report waits for storage before the trial fails
STORAGE_RETRY_S = 5.0


def _report(values, folder, metric, last=False):
    """tune.report with `folder` as its checkpoint. Storage that does not answer (pyarrow's OSError, or Ray's check
    that the storage is there): the result goes without it, saying so (the driver prints it once), the folds stay in
    `folder` for the next report; the last report waits, after a result without the objective meanwhile."""
    deadline, waiting = time.monotonic() + STORAGE_WAIT_S, False
    while True:
        try:
            return tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))
        except Exception as e:  # noqa: BLE001 - only storage errors are waited out
            if not (isinstance(e, OSError) or "cluster storage" in str(e)) or time.monotonic() > deadline:
                raise
            error = {"htnet_storage_error": f"{type(e).__name__}: {first_line(e)}"[:200]}
        if not last:
            return tune.report({**values, **error})
        if not waiting:
            waiting = True
            tune.report({**{k: v for k, v in values.items() if k.startswith("htnet_")}, metric: float("nan"),
                         "step": values["step"], "final": 0, "htnet_status": "running", **error})
        time.sleep(STORAGE_RETRY_S)


def _result(values, metric, info):
    """The numbers among `values` (NumPy and torch scalars as Python's) and `info`, the objective first: Ray Tune's
    progress table shows a result's first four numbers."""
    values = {**{k: v.item() if hasattr(v, "item") else v for k, v in values.items() if not isinstance(v, bool)
                 and (isinstance(v, (int, float)) or getattr(v, "ndim", None) == 0)}, **info}
    first = [metric, "step", "inner_full_uf1" if metric != "inner_full_uf1" else "paper_full_uf1", "train_loss"]
    return {**{k: values[k] for k in first if k in values}, **values}


def loso_trial(config, data=None, settings=None):
    """Run LOSO for the sampled `config` (`data` from Ray's object store, not copied). A configuration that cannot
    train reports `htnet_status: failed`, not raising: Ray's retries are for workers that died."""
    fixed = settings.get("base_config")   # a rerun: this configuration with the trial's seed
    metric = settings["metric"] if fixed else settings["space"].metric
    context = tune.get_context()
    resources = context.get_trial_resources()
    torch.set_num_threads(max(1, int(resources.required_resources.get("CPU", 1) if resources is not None else 1)))
    info = {"htnet_node": ray.get_runtime_context().get_node_id(), "htnet_pid": os.getpid(),
            **settings.get("provenance", {})}

    def failed(error, step=0):
        tune.report({metric: float("nan"), "step": step, "final": 1, "htnet_status": "failed",
                     "htnet_error": f"{type(error).__name__}: {first_line(error)}", **info})

    try:
        loso_config = LosoConfig.from_dict({**fixed, **config}) if fixed else \
            trial_config(settings["space"], config, settings.get("overrides"))
        device = resolve_device(loso_config.device)
        info["htnet_device"] = str(device)
        if device.type == "cuda":
            info["htnet_gpu"] = torch.cuda.get_device_name(device)
    except UserError as e:
        return failed(e)

    trial_id, done = context.get_trial_id(), {"step": 0}
    with tempfile.TemporaryDirectory(prefix=f"htnet-{trial_id}-", ignore_cleanup_errors=True) as folder:
        out, title = Path(folder), f"{loso_config.model} trial {trial_id}"
        if (previous := tune.get_checkpoint()) is not None:  # a retry (its worker died) or a `search resume`
            with previous.as_directory() as finished:
                shutil.copytree(finished, out, dirs_exist_ok=True)

        def resolved():  # what the engine resolved, from the config.yaml it writes first (schema.RESOLVED_PARAMS)
            if (group := read_yaml(out / "config.yaml").get("fold_group_size")) is not None:
                info["htnet_fold_group_size"] = group

        def callback(progress):
            done["step"] = progress["step"]
            resolved()
            if progress["step"] < progress["folds_total"]:  # the final report follows, with the files
                _report(_result({**progress, "final": 0}, metric, {"fold_objectives": fold_objectives(
                    progress, metric), "htnet_status": "running", **info}), folder, metric)

        try:
            result = run_loso(loso_config, data, callback=callback, out_dir=out, progress=False, resume=True)
        except (TrainingDiverged, UserError) as e:
            return failed(e, done["step"])
        confusion_matrix_png(result.predictions, out / "confusion_matrix.png", title=title)
        learning_curve_png(result.history, out / "learning_curve.png", title=title)
        main = result.history[result.history["run"] == "main"]
        if len(main):  # as in the engine's reports: the last epoch's mean over folds
            result.metrics.setdefault("train_loss", float(main.groupby("epoch")["train_loss"].mean().iloc[-1]))
        resolved()  # also where no callback came (every fold resumed)
        final = {**result.metrics, "step": result.folds_done, "folds_total": result.folds_total, "final": 1}
        _report(_result(final, metric, {"htnet_status": "finished", **info}), folder, metric, last=True)
