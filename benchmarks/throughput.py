"""Throughput of one LOSO run: fold-epochs per second of the reference-style loop
(benchmarks/reference_loop.py), the plain engine and the fold-batched engine, side by side in ONE
process, interleaved round by round (the machine is shared: only same-run ratios mean anything),
medians over rounds. A fold-epoch = one epoch of one fold's main model (training on the 67 other
subjects, then the test pass); protocols paper+final, as the reference trains.

    python -m benchmarks.throughput [--data ../shared/data/htnet_composite] [--device auto]
        [--models ststnet,htnet-small,htnet-paper] [--rounds 3] [--epochs 10] [--json FILE]

FLOPs: torch.utils.flop_counter.FlopCounterMode over one training step and one test pass of the
plain model (matmuls and convolutions; elementwise work is not counted), per sample, times the
samples a fold-epoch trains and tests on. The FLOP floor of a run = its FLOPs / the device's peak
(CPU: cores x clock x 32 fp32 FLOP/cycle with AVX2+FMA, else 16; GPU: the bf16 dense peak of the
card, --peak-gflops to override); "of peak" = achieved FLOP/s / peak.
Paper HTNet on a CPU is ~9 s per fold-epoch: it is measured over --paper-epochs epochs (default 1).
Without the real release (../shared/data/htnet_composite) it falls back to synthetic data, said in
the output.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODELS = {
    "ststnet": ("ststnet", {}),
    "htnet-small": ("htnet", {"dim": 32, "heads": 2, "block_repeats": [1, 1, 2]}),
    "htnet-paper": ("htnet", {}),
}
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def peak_gflops(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1000, f"{name} bf16 dense peak"
        return None, name
    mhz, flags = None, ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":")[1])
            if line.startswith("flags") and not flags:
                flags = line
    per_cycle = 32 if (" avx2" in flags and " fma" in flags) else 16
    cores = torch.get_num_threads()
    if mhz is None:
        return None, "unknown CPU"
    return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} fp32 FLOP/cycle"


def flops_per_sample(model_name, model_config, batch=256):
    """(training FLOPs per sample, test FLOPs per sample) of the plain model."""
    from torch.utils.flop_counter import FlopCounterMode

    from htnet.models import create_model

    model = create_model(model_name, **model_config)
    x, y = torch.rand(batch, 3, 28, 28), torch.randint(0, 3, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model.train()(x), y).backward()
    train = counter.get_total_flops() / batch
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return train, counter.get_total_flops() / batch


def pool_startup(procs, X, y, data, config):
    """Seconds to spawn the batched engine's worker pool and have every worker initialised."""
    import multiprocessing

    from htnet import engine

    t = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(
        procs, initializer=engine._worker_init, initargs=(X.cpu().numpy(), y.cpu().numpy(), data, config))
    pool.map(abs, range(procs))
    pool.close()
    pool.join()
    return time.perf_counter() - t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(args):
    from htnet.data import load_release, synthetic_cache

    root = Path(args.data)
    if (root / "combined_3_class2_for_optical_flow.csv").is_file():
        return load_release(root), f"real release {root} "
    return load_release(synthetic_cache(subjects_per_dataset=8)), "SYNTHETIC data (real release absent) "


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/htnet_composite")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="ststnet,htnet-small,htnet-paper")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per measurement (not paper HTNet)")
    parser.add_argument("--paper-epochs", type=int, default=1)
    parser.add_argument("--folds", type=int, default=8, help="folds per batched measurement")
    parser.add_argument("--ref-folds", type=int, default=2, help="folds per reference/plain measurement")
    parser.add_argument("--worker-epochs", type=int, default=100,
                        help="epochs of the multi-process measurement (it has a start-up to amortise)")
    parser.add_argument("--worker-folds", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the batched engine's multi-process row (CPU; default: threads)")
    parser.add_argument("--peak-gflops", type=float, default=None)
    parser.add_argument("--json", default="outputs/bench/throughput.json")
    args = parser.parse_args()

    from benchmarks.reference_loop import reference_fold
    from htnet.engine import run_fold, run_folds, tune_malloc
    from htnet.folds import make_folds
    from htnet.loso import LosoConfig, model_inputs, resolve_device

    device = resolve_device(args.device)
    data, source = load(args)
    peak, peak_note = (args.peak_gflops, "given") if args.peak_gflops else peak_gflops(device)
    threads = torch.get_num_threads()
    workers = args.workers if args.workers is not None else threads
    print(f"# throughput {datetime.date.today()} | {platform.node()} {platform.processor() or platform.machine()} | "
          f"device {device} | torch {torch.__version__}, {threads} threads | {source}| peak {peak} GFLOP/s ({peak_note})")
    if device.type == "cpu":
        tune_malloc()   # as the batched engine does; the same for every engine measured here
    results = {}
    for key in args.models.split(","):
        model_name, model_config = MODELS[key]
        paper = key == "htnet-paper"
        epochs = args.paper_epochs if paper else args.epochs
        config = LosoConfig.from_dict({"model": model_name, "model_config": model_config, "epochs": epochs,
                                       "lr": 5e-5, "batch_size": 256, "protocols": ["paper", "final"],
                                       "engine": "batched", "device": str(device)})
        X = torch.tensor(np.ascontiguousarray(model_inputs(data, config)), device=device)
        y = torch.tensor(data.labels, device=device)
        folds = make_folds(data, config)
        # mid-sized subjects (the median fold), the same ones for every engine
        by_size = sorted(range(len(folds)), key=lambda i: len(folds[i].test))
        middle = by_size[len(by_size) // 2 - args.folds // 2:][:args.folds]
        ref_folds = [folds[i] for i in middle[:(1 if paper else args.ref_folds)]]
        batch_folds = [folds[i] for i in middle[:(2 if paper else args.folds)]]
        train_flops, test_flops = flops_per_sample(model_name, model_config)

        def fold_flops(fs):
            return sum(len(f.train) * train_flops + len(f.test) * test_flops for f in fs) / len(fs)

        def reference():
            t = time.perf_counter()
            for f in ref_folds:
                reference_fold(X.cpu().numpy(), data.labels, f.train, f.test, model_name, model_config, epochs,
                               device=device)
            sync(device)
            return (time.perf_counter() - t) / (len(ref_folds) * epochs)

        def plain():
            t = time.perf_counter()
            for f in ref_folds:
                run_fold(f, X, y, data, config, device)
            sync(device)
            return (time.perf_counter() - t) / (len(ref_folds) * epochs)

        def batched(procs):
            def run():
                fs, cfg = batch_folds, config
                if procs:
                    fs = [folds[i] for i in by_size[len(by_size) // 2 - args.worker_folds // 2:][:args.worker_folds]]
                    cfg = LosoConfig.from_dict({**config.to_dict(), "epochs": args.worker_epochs})
                with env(HTNET_BATCHED_WORKERS=procs):
                    t = time.perf_counter()
                    outcomes = list(run_folds(fs, X, y, data, cfg, device))
                    sync(device)
                    assert len(outcomes) == len(fs)
                    spent = time.perf_counter() - t
                    if procs:   # the pool's start-up, once per LOSO run: measured and taken out
                        spent -= pool_startup(procs, X, y, data, cfg)
                    return spent / (len(fs) * cfg.epochs)
            return run

        engines = {"reference loop": reference, "plain engine": plain, "batched, 1 process": batched(0)}
        if device.type == "cpu" and workers > 1 and not paper:
            engines[f"batched, {workers} processes"] = batched(workers)
        times = {name: [] for name in engines}
        for _ in range(1 if paper else args.rounds):
            for name, fn in engines.items():
                times[name].append(fn())
                print(f"  {key} {name}: {times[name][-1] * 1000:.1f} ms/fold-epoch", flush=True)
        flops = fold_flops(ref_folds)
        rows = {}
        reference_s = statistics.median(times["reference loop"])
        for name, values in times.items():
            seconds = statistics.median(values)
            achieved = flops / seconds / 1e9
            rows[name] = {"s_per_fold_epoch": seconds, "fold_epochs_per_s": 1 / seconds,
                          "speedup_vs_reference": reference_s / seconds, "gflops": achieved,
                          "of_peak": achieved / peak if peak else None,
                          "full_run_min": seconds * len(folds) * 800 / 60, "samples": values}
        floor_s = flops * len(folds) * 800 / (peak * 1e9) if peak else None
        results[key] = {"model": model_name, "model_config": model_config, "gflop_per_fold_epoch": flops / 1e9,
                        "full_run_pflop": flops * len(folds) * 800 / 1e15, "full_run_floor_s": floor_s,
                        "epochs_per_measurement": epochs, "rows": rows}
        print(f"\n{key}: {flops / 1e9:.2f} GFLOP per fold-epoch; full run ({len(folds)} folds x 800 epochs) "
              f"{flops * len(folds) * 800 / 1e15:.3f} PFLOP, FLOP floor {floor_s / 60 if floor_s else float('nan'):.1f} min")
        print("| model | engine | ms / fold-epoch | fold-epochs/s | vs reference | GFLOP/s | of peak | full run (68x800) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {key} | {name} | {row['s_per_fold_epoch'] * 1000:.1f} | {row['fold_epochs_per_s']:.2f} | "
                  f"{row['speedup_vs_reference']:.2f}x | {row['gflops']:.1f} | "
                  f"{(row['of_peak'] or float('nan')) * 100:.1f}% | {row['full_run_min']:.0f} min |", flush=True)
        print()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(datetime.date.today()), "device": str(device), "threads": threads,
                               "source": source, "peak_gflops": peak, "peak_note": peak_note,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
