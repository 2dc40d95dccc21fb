"""What the opt-in C stem kernels (htnet.kernels) buy the batched engine: STSTNet LOSO folds with
HTNET_CPU_KERNELS=1 and =0, in one process and with worker processes, interleaved round by round in
ONE run (the machine is shared: only same-run ratios mean anything), medians over rounds.

    python -m benchmarks.stem_kernels [--data ../shared/data/htnet_composite] [--folds 16]
        [--epochs 30] [--rounds 3] [--workers 0,2]
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch

from htnet.data import load_release, synthetic_cache
from htnet.engine import run_folds, tune_malloc
from htnet.folds import make_folds
from htnet.loso import LosoConfig, model_inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/htnet_composite")
    p.add_argument("--folds", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="0,2", help="HTNET_BATCHED_WORKERS values (0 = in process)")
    args = p.parse_args(argv)
    if os.path.isfile(os.path.join(args.data, "combined_3_class2_for_optical_flow.csv")):
        data = load_release(args.data)
    else:
        print("note: the real release is absent: synthetic data")
        data = load_release(synthetic_cache(subjects_per_dataset=8))
    config = LosoConfig.from_dict({"model": "ststnet", "epochs": args.epochs, "lr": 5e-5, "batch_size": 256,
                                   "protocols": ["paper", "final"], "engine": "batched", "device": "cpu"})
    X = torch.tensor(np.ascontiguousarray(model_inputs(data, config)))
    y = torch.tensor(data.labels)
    folds = make_folds(data, config)[:args.folds]
    tune_malloc()
    times = {}
    for round_ in range(args.rounds):
        for workers in args.workers.split(","):
            for on in ("1", "0"):
                os.environ.update(HTNET_CPU_KERNELS=on, HTNET_BATCHED_WORKERS=workers)
                start = time.perf_counter()
                list(run_folds(folds, X, y, data, config, torch.device("cpu")))
                ms = (time.perf_counter() - start) / (len(folds) * args.epochs) * 1000
                times.setdefault((workers, on), []).append(ms)
                print(f"round {round_}: workers {workers}, kernels {'on' if on == '1' else 'off'}: "
                      f"{ms:.1f} ms/fold-epoch", flush=True)
    print("\n| worker processes | kernels on | kernels off | on vs off |\n|---|---|---|---|")
    for workers in args.workers.split(","):
        on, off = statistics.median(times[(workers, "1")]), statistics.median(times[(workers, "0")])
        print(f"| {workers} | {on:.1f} ms | {off:.1f} ms | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
