"""A rerun's seeds as Ray tasks sharing the data, each keeping its finished folds in a seed folder (local, or
s3://... that every node of a cluster reaches) until MLflow has its result: a rerun run again after a kill, or
a seed's task retried on another node, goes on from the folds kept."""
import hashlib
import json
import math
from pathlib import Path

from htnet.errors import UserError
from search.driver.stores import mirrored


def seed_folder(root, config, data_root, seed):
    """A seed's finished folds until MLflow has its result, under `root` (a folder, or s3://... that every node of a
    cluster reaches): the same rerun (config, data, seed) run again after a kill, or a seed's task retried on
    another node, goes on from there, not from fold 1."""
    text = json.dumps([{k: v for k, v in config.items() if k != "seed"}, str(data_root)], sort_keys=True, default=str)
    key = f"{hashlib.sha256(text.encode()).hexdigest()[:12]}/seed-{seed}"
    return f"{root.rstrip('/')}/{key}" if "://" in str(root) else Path(root).resolve() / key


def _seed_task(config, data, threads, folder=None):
    """One seed's LOSO run (on from `folder`'s finished folds): its LosoResult, or {'error': ...} if it cannot train."""
    import torch

    from htnet.errors import TrainingDiverged, first_line
    from htnet.loso import LosoConfig, run_loso

    torch.set_num_threads(max(1, int(threads)))
    try:
        if "://" not in str(folder):
            return run_loso(LosoConfig.from_dict(config), data, progress=False, out_dir=folder,
                            resume=folder is not None)
        with mirrored(folder) as (local, store):   # each finished fold stored in `folder` (S3)
            return run_loso(LosoConfig.from_dict(config), data, progress=False, out_dir=local, resume=True,
                            callback=lambda report: store())
    except (TrainingDiverged, UserError) as e:
        return {"error": f"{type(e).__name__}: {first_line(e)}"}


def run_parallel(jobs, data, on_result, cpus=1.0, gpus=0.0, folders=None):
    """`jobs` ({key: config}) as Ray tasks sharing `data` (put once), each keeping its folds in `folders[key]`
    where given; on_result(key, result) in the driver."""
    import ray

    # a task whose node is lost is retried (Ray's default 3: spot nodes), from its folds where they are kept
    task = ray.remote(_seed_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=3)
    data_ref = ray.put(data)
    folders = folders or {}
    pending = {task.remote(config, data_ref, max(1, math.floor(cpus)), folders.get(key)): key
               for key, config in jobs.items()}
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                lines = [line for line in str(e).splitlines() if line.strip()]
                result = {"error": (lines[-1] if lines else type(e).__name__)[:2000]}
            on_result(pending.pop(ref), result)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
