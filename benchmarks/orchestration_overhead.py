"""Orchestration overhead: the time Ray Tune + Optuna + MLflow add to a search, as a share of the
trial time, at 1, 2 and 4 concurrent trials.

    python -m benchmarks.orchestration_overhead [--data ../shared/data/htnet_composite]
        [--concurrency 1,2,4] [--trials 4] [--subjects 16] [--epochs 30] [--engine batched]

For every concurrency c it runs a real search (`search.driver.runner.run_search`, the code behind
`python -m search run`) of `--trials` identical-cost STSTNet trials (the sampled parameter is the
seed), c at a time with 2/c CPUs each (this machine has 2 cores), into a fresh folder with its own
MLflow store (sqlite) and Optuna storage; no pruner. Then, from MLflow:

- LOSO time of trial i: `wall_time_s` (inside run_loso: the engine's work);
- search wall: from the call until run_search returns (Ray start, trials, MLflow logging of every
  trial's metrics and files, the summary and the search's plots);
- overhead share = 1 - sum_i(LOSO time_i) / (c x search wall): the part of the c trial slots'
  time not spent training. It also prints the per-trial part: trial wall (`trial_wall_time_s`,
  the driver's view) minus its LOSO time, and the fixed part (search wall - sum of trial walls / c).
- straggler tail: the slot-seconds the last c trials' slots sit idle waiting for the slowest of
  them (from the MLflow runs' end times). Trials sharing cores finish at different times; that
  idle time is neither Ray's nor MLflow's, so the share is also given without it:
  1 - sum_i(LOSO time_i) / (c x search wall - tail).

`--compare REV` measures the code of git revision REV too (an export of it, run as its own process), each
concurrency old then new, side by side in one run: the table has a row per code and concurrency.

The share depends on how long a trial is: the fixed seconds per trial and per search are printed
so the share of a full-size trial (a full LOSO run is minutes to hours) can be read off.
Target (the issue): overhead <= 5% of trial time.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SPACE = """description = "orchestration overhead benchmark: identical-cost STSTNet trials"
num_samples = {trials}
max_concurrent_trials = 1
objective = "inner"
resources = {{"cpu": 1, "gpu": 0}}
max_failures = 0
sampler = {{"type": "grid"}}
pruner = {{"type": "none"}}
data = {{"synthetic_subjects": 8, "synthetic_seed": 0}}
fixed = {{"model": "ststnet", "epochs": {epochs}, "lr": 5.0e-4, "batch_size": 64,
         "protocols": ["paper", "final", "inner"], "report_every": 1, "engine": "{engine}", "device": "cpu"}}
grid = {{"seed": list(range(1, {trials} + 1))}}


def space(trial):
    return {{"seed": trial.suggest_categorical("seed", grid["seed"])}}
"""


def space_file(folder, trials, subjects, epochs, engine):
    path = Path(folder) / "overhead.py"
    path.write_text(SPACE.format(trials=trials, epochs=epochs, engine=engine))
    return path


def one_search(args, c, folder):
    from search import tracking
    from search.driver.runner import Options, run_search

    folder = Path(folder)
    options = Options(space=str(space_file(folder, args.trials, args.subjects, args.epochs, args.engine)),
                      name=f"overhead-c{c}", data=args.data_path, storage=str(folder / "runs"),
                      tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", num_cpus=args.cpus,
                      max_concurrent_trials=c, cpus_per_trial=args.cpus / c, verbose=0,
                      subjects=None if args.subjects == "all" else args.subjects)
    started = time.perf_counter()
    summary = run_search(options, out=open(folder / "search.log", "w"))
    wall = time.perf_counter() - started
    client = tracking.client_for(options.tracking_uri)
    trials = []
    for run_id in summary["table"]["run_id"]:
        run = client.get_run(run_id)
        metrics = run.data.metrics
        trials.append({"loso_s": metrics.get("wall_time_s"), "trial_s": metrics.get("trial_wall_time_s"),
                       "fold_epochs": metrics.get("fold_epochs"), "end_ms": run.info.end_time})
    loso = sum(t["loso_s"] or 0 for t in trials)
    trial_walls = [t["trial_s"] for t in trials if t["trial_s"] is not None]
    # slots idle while the last trials finish at different speeds (c trials sharing 2 cores): not
    # Ray's or MLflow's time, so also reported apart
    ends = sorted(t["end_ms"] for t in trials if t["end_ms"])[-c:]
    tail = sum(ends[-1] - e for e in ends) / 1000 if ends else 0.0
    return {"concurrency": c, "cpus_per_trial": args.cpus / c, "search_wall_s": wall, "trials": trials,
            "finished": int((summary["table"]["status"] == "finished").sum()),
            "loso_s_sum": loso, "overhead_share": 1 - loso / (c * wall), "straggler_tail_s": tail,
            "overhead_share_without_tail": 1 - loso / (c * wall - tail),
            "per_trial_overhead_s": (sum(trial_walls) - loso) / len(trials) if trial_walls else None,
            "fixed_overhead_s": wall - sum(trial_walls) / c if trial_walls else None}


def old_search(args, c, tree):
    """one_search's figures for concurrency c from the old code in `tree` (its own benchmark, its own process)."""
    out = Path(tree) / f"c{c}.json"
    flags = [f"--{k}={v}" for k, v in [("data", args.data), ("trials", args.trials), ("subjects", args.subjects),
                                       ("epochs", args.epochs), ("engine", args.engine), ("cpus", args.cpus)]]
    subprocess.run([sys.executable, "-m", "benchmarks.orchestration_overhead", f"--concurrency={c}", *flags,
                    f"--json={out}"], cwd=tree, check=True, env={**os.environ, "PYTHONPATH": tree})
    [r] = json.loads(out.read_text())["results"]
    print(f"  c={c} ({args.compare}): search {r['search_wall_s']:.1f} s, overhead {r['overhead_share'] * 100:.1f}%",
          flush=True)
    return {"code": args.compare, **r}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/htnet_composite")
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--subjects", default="16", help="a count or ids, or 'all'")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--engine", default="batched")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--keep", help="keep the searches' folders here (default: a temporary folder)")
    parser.add_argument("--json", default="outputs/bench/orchestration_overhead.json")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV's code, side by side")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    args.data_path = args.data if (Path(args.data) / "combined_3_class2_for_optical_flow.csv").is_file() else None
    print(f"# orchestration overhead {datetime.date.today()} | data {args.data_path or 'SYNTHETIC (8 per dataset)'} | "
          f"{args.trials} trials of STSTNet, {args.subjects} subjects, {args.epochs} epochs, engine {args.engine} | "
          f"{args.cpus} CPUs", flush=True)
    results, old_tree = [], tempfile.TemporaryDirectory(prefix="overhead-old-") if args.compare else None
    if old_tree:   # the old code as its own tree, run by its own benchmark script
        archive = subprocess.run(["git", "archive", args.compare], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old_tree.name], input=archive, check=True)
    for c in [int(v) for v in args.concurrency.split(",")]:
        if old_tree:
            results.append(old_search(args, c, old_tree.name))
        with tempfile.TemporaryDirectory(prefix=f"overhead-c{c}-", dir=args.keep) as folder:
            if args.keep:
                folder = Path(args.keep) / f"c{c}"
                folder.mkdir(parents=True, exist_ok=True)
            r = {"code": "this tree", **one_search(args, c, folder)}
        results.append(r)
        print(f"  c={c}: search {r['search_wall_s']:.1f} s, {r['finished']}/{args.trials} finished, sum LOSO "
              f"{r['loso_s_sum']:.1f} s, overhead {r['overhead_share'] * 100:.1f}%", flush=True)
    print("\n| code | concurrent trials | CPUs per trial | search wall | mean trial LOSO time | overhead share | "
          "per-trial overhead | fixed per search | straggler tail (slot-s) | share without the tail |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mean_loso = r["loso_s_sum"] / max(1, len(r["trials"]))
        per_trial = "n/a" if r["per_trial_overhead_s"] is None else f"{r['per_trial_overhead_s']:.1f} s"
        fixed = "n/a" if r["fixed_overhead_s"] is None else f"{r['fixed_overhead_s']:.1f} s"
        print(f"| {r['code']} | {r['concurrency']} | {r['cpus_per_trial']:g} | {r['search_wall_s']:.1f} s | {mean_loso:.1f} s | "
              f"{r['overhead_share'] * 100:.1f}% | {per_trial} | {fixed} | {r['straggler_tail_s']:.1f} s | "
              f"{r['overhead_share_without_tail'] * 100:.1f}% |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(datetime.date.today()), "args": {k: v for k, v in vars(args).items()},
                               "results": results}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
