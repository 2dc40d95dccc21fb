"""STSTNet under the `final` protocol on the real composite: the reference's training recipe
(800 epochs, Adam lr 5e-5, batch 256, no shuffle), compared with the published PyTorch result
(Full UF1 0.7209, UAR 0.7250).

    python -m benchmarks.ststnet_final [--data ../shared/data/htnet_composite] [--engine plain]

Prints a Markdown row for benchmarks/RESULTS.md and writes the run to outputs/bench-ststnet-final/.
"""
import argparse
import datetime
import platform

import torch

from htnet.data import load_release
from htnet.loso import run_loso
from htnet.metrics import summary_table

PUBLISHED = {"Full UF1": 0.7209, "Full UAR": 0.7250}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/htnet_composite")
    parser.add_argument("--engine", default="plain")
    parser.add_argument("--epochs", type=int, default=800)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/bench-ststnet-final")
    args = parser.parse_args()
    data = load_release(args.data)
    config = {"model": "ststnet", "epochs": args.epochs, "lr": 5e-5, "batch_size": 256, "shuffle": False,
              "protocols": ["final"], "engine": args.engine, "seed": args.seed, "device": args.device}
    result = run_loso(config, data, out_dir=args.out)
    table = summary_table(result.metrics, ["final"]).round(4)
    print(table.to_string())
    row = table.loc["final"]
    print(f"\n| {datetime.date.today()} | STSTNet final, engine {args.engine}, {args.epochs} epochs, seed {args.seed} "
          f"| {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {result.device} "
          f"| {' | '.join(f'{v:.4f}' for v in row)} | {result.wall_time_s / 60:.1f} min "
          f"| {result.wall_time_s / result.fold_epochs * 1000:.1f} ms |")
    print(f"published: {PUBLISHED}")


if __name__ == "__main__":
    main()
