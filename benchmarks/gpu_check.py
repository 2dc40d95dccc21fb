"""Ready for the first GPU: one command that measures what a GPU study needs, in at most ~8 minutes,
and writes one JSON plus a Markdown block for benchmarks/RESULTS.md.

    python -m benchmarks.gpu_check [--data ../shared/data/htnet_composite] [--out outputs/bench]
    python -m benchmarks.gpu_check --device cpu --quick     # the same code path, under a minute

1. The paper HTNet (small HTNet with --quick) per fold-epoch, side by side in one process: the
   reference loop (benchmarks/reference_loop.py), the plain engine, and the batched engine in float32
   (bf16: false), bf16 autocast (its GPU default) and torch.compile (compile: default; --quick:
   Dynamo with the eager backend, as inductor's code generation takes minutes on 2 cores). The
   first round of each row includes its warm-up (cudnn autotuning, compilation); the figure is the
   best round. Peak GPU memory per row.
2. A 2-trial search through the search driver (search/spaces/htnet.py, --gpus-per-trial 0.5, a few
   epochs and subjects; --quick: demo.py on the CPU) on the real composite where it is present,
   else on the synthetic set (said in the output), with its stores in a temporary folder.
A row that fails (e.g. torch.compile on a new GPU) is recorded with its error; the others go on.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from benchmarks.throughput import env, load, sync


def measure(fn, rounds, device):
    """(best seconds, every round's seconds, peak GPU MiB) of `fn()`; `fn` returns work units done."""
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(rounds):
        started = time.perf_counter()
        units = fn()
        sync(device)
        seconds.append((time.perf_counter() - started) / units)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return min(seconds), seconds, peak


def engine_rows(data, device, args):
    from benchmarks.reference_loop import reference_fold
    from htnet.engine import run_fold, run_folds
    from htnet.folds import make_folds
    from htnet.loso import LosoConfig, model_inputs

    model_config = {"dim": 32, "heads": 2, "block_repeats": [1, 1, 2]} if args.quick else {}
    config = LosoConfig.from_dict({"model": "htnet", "model_config": model_config, "epochs": args.epochs,
                                   "protocols": ["paper", "final"], "device": str(device)})
    X = torch.tensor(np.ascontiguousarray(model_inputs(data, config)), device=device)
    y = torch.tensor(data.labels, device=device)
    folds = make_folds(data, config)[:args.folds]

    def reference():
        reference_fold(X.cpu().numpy(), data.labels, folds[0].train, folds[0].test, "htnet", model_config,
                       args.epochs, device=device)
        return args.epochs

    def plain():
        run_fold(folds[0], X, y, data, config, device)
        return args.epochs

    def batched(**fields):  # LosoConfig fields
        def run():
            with env(HTNET_BATCHED_WORKERS=0):
                varied = dataclasses.replace(config, **fields)
                assert len(list(run_folds(folds, X, y, data, varied, device))) == len(folds)
            return len(folds) * args.epochs
        return run

    rows = {"reference loop": reference, "plain engine (G=1)": plain,
            "batched, float32": batched(bf16=False), "batched, bf16 autocast": batched(bf16=True),
            "batched, torch.compile": batched(compile="eager" if args.quick else "default")}
    results = {}
    for name, fn in rows.items():
        try:
            best, rounds, peak = measure(fn, args.rounds, device)
            results[name] = {"s_per_fold_epoch": best, "rounds_s": rounds, "peak_gpu_mib": peak}
        except Exception as e:  # noqa: BLE001 - one failing row is a finding, not the end of the check
            results[name] = {"error": traceback.format_exception_only(e)[-1].strip()}
        print(f"  {name}: {results[name]}", flush=True)
    reference_s = results["reference loop"].get("s_per_fold_epoch")
    for row in results.values():
        if reference_s and "s_per_fold_epoch" in row:
            row["vs_reference"] = reference_s / row["s_per_fold_epoch"]
    return {"model_config": model_config or "paper (dim 256, heads 3, blocks 2,2,10)", "epochs": args.epochs,
            "folds": len(folds), "rows": results}


def search_check(data_root, device, args):
    from search.driver.runner import Options, run_search

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        gpu = 0.5 if device.type == "cuda" else 0.0
        options = Options(space="demo" if args.quick else "htnet", name="gpu-check", data=data_root,
                          storage=f"{tmp}/runs", tracking_uri=f"sqlite:///{tmp}/mlflow.db", num_samples=2,
                          max_concurrent_trials=2, cpus_per_trial=1, gpus_per_trial=gpu,
                          num_cpus=None if device.type == "cuda" else 2, subjects=str(args.subjects),
                          sets=[f"epochs={args.search_epochs}", f"device={device.type}", "inner_val_subjects=1"],
                          verbose=0)
        started = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            summary = run_search(options)
        wall = time.perf_counter() - started
        table = summary["table"]
        columns = [c for c in ("trial_id", "status", summary["metric"], "folds_done") if c in table]
        return {"space": options.space, "gpus_per_trial": gpu, "subjects": args.subjects,
                "epochs": args.search_epochs, "wall_s": wall, "complete": summary["complete"],
                "counts": {k: int(v) for k, v in summary["counts"].items()},
                "trials": table[columns].to_dict("records")}


def markdown(report):
    lines = [f"GPU check, {report['date']}: {report['device_name']}, torch {report['torch']}, {report['data']}; "
             f"`{report['command']}`", "",
             f"HTNet {report['engine']['model_config']}, {report['engine']['folds']} folds x "
             f"{report['engine']['epochs']} epochs per round, best of {report['rounds']} rounds:", "",
             "| measurement | ms / fold-epoch | vs reference loop | peak GPU memory |", "|---|---|---|---|"]
    for name, row in report["engine"]["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | |")
            continue
        memory = f"{row['peak_gpu_mib']:.0f} MiB" if row["peak_gpu_mib"] is not None else "-"
        lines.append(f"| {name} | {row['s_per_fold_epoch'] * 1000:.1f} | {row.get('vs_reference', float('nan')):.2f}x "
                     f"| {memory} |")
    if report["device"] == "cpu":
        lines += ["", "On a CPU the bf16 row runs float32 (the engine's autocast is GPU-only) and --quick's single "
                      "round includes the warm-up: these figures only prove the code path."]
    search = report["search"]
    if "error" in search:
        lines += ["", f"2-trial search: failed: {search['error']}"]
    else:
        lines += ["", f"2-trial search (space {search['space']}, --gpus-per-trial {search['gpus_per_trial']}, "
                      f"{search['subjects']} subjects, {search['epochs']} epochs): {search['wall_s']:.0f} s, "
                      f"{search['counts']}, complete: {search['complete']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/htnet_composite")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small HTNet, 1 epoch, demo search: the CPU test")
    parser.add_argument("--out", default="outputs/bench", help="folder for gpu_check.json and gpu_check.md")
    args = parser.parse_args(argv)
    args.epochs, args.folds, args.rounds = (1, 2, 1) if args.quick else (3, 8, 2)
    args.subjects, args.search_epochs = (3, 1) if args.quick else (12, 3)

    from htnet.loso import resolve_device

    device = resolve_device(args.device)
    data, source = load(args)
    print(f"# gpu_check {datetime.date.today()} | device {device} | {source}", flush=True)
    report = {"date": str(datetime.date.today()), "host": platform.node(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "data": source.strip(), "rounds": args.rounds,
              "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])}
    report["engine"] = engine_rows(data, device, args)
    try:
        report["search"] = search_check(data.source, device, args)
    except Exception as e:  # noqa: BLE001
        report["search"] = {"error": traceback.format_exception_only(e)[-1].strip()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
