"""Search efficiency of the Optuna pruner: the same sampled configurations run without a pruner
and with one; fold-epochs consumed and the best objective found.

    python -m benchmarks.pruning_efficiency [--data ../shared/data/htnet_composite] [--trials 16]
        [--subjects 24] [--epochs 15] [--pruner median] [--engine batched] [--json FILE]

Both arms draw their configurations from Optuna's RandomSampler with the same seed, which does not
look at results, so the two arms run the same N configurations (checked, and printed). The space
and the pruner are the search package's: `search.space.parse_space` (STSTNet: lr, batch size,
dropout, optimizer; fixed: all three protocols, report after every fold) and
`search.space.make_pruner` (default: the demo space's median pruner). Trials run one after another
in this process through `htnet.loso.run_loso`, whose callback reports the pooled objective after
every fold to the Optuna trial and stops the run when `trial.should_prune()` says so: the same
report/prune protocol the search's Ray trainable and its PruningOptunaSearch follow, without Ray
(whose overhead is benchmarks/orchestration_overhead.py's subject), so the comparison is
deterministic. Fold-epochs are the engine's count (run_loso's `fold_epochs`: inner + main epochs
of the folds reported); the batched engine also computes the rest of the group a stopped fold
belonged to, so the wall time of each arm is printed too.

Target (the issue): the pruned search reaches the unpruned search's best objective with at most
1/3 of its fold-epochs.
"""
import argparse
import datetime
import json
import math
import time
from pathlib import Path

SPACE = {
    "description": "pruning benchmark: STSTNet on the real composite",
    "objective": "inner",
    "sampler": {"type": "random", "seed": 0},
    "pruner": {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 3},
    "fixed": {"model": "ststnet", "protocols": ["paper", "final", "inner"], "inner_val_subjects": 3,
              "report_every": 1},
    "space": {
        "lr": {"low": 1.0e-5, "high": 3.0e-2, "log": True},
        "batch_size": {"choice": [32, 64, 128, 256]},
        "model_config.dropout": {"choice": [0.0, 0.25, 0.5]},
        "optimizer": {"choice": ["adam", "adamw", "sgd"]},
    },
}


def run_arm(space, data, pruner, trials, overrides, seed, label):
    import optuna

    from htnet.errors import TrainingDiverged
    from htnet.loso import run_loso

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed),
                                pruner=pruner)
    metric = space.metric
    rows, started = [], time.perf_counter()
    for number in range(trials):
        trial = study.ask()
        sampled = space.sample(trial)
        config = space.resolve(sampled, overrides)
        t = time.perf_counter()

        def callback(progress, trial=trial):
            value = progress.get(metric)
            if value is None or not math.isfinite(value):
                return False
            trial.report(float(value), progress["step"])
            return trial.should_prune()

        try:
            result = run_loso(config, data, callback=callback, progress=False)
        except TrainingDiverged:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append({"trial": number, "config": sampled, "status": "failed", "fold_epochs": 0,
                         "seconds": time.perf_counter() - t})
            continue
        value = result.metrics.get(metric, float("nan"))
        if result.stopped:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            status = "pruned"
        else:
            study.tell(trial, value if math.isfinite(value) else None,
                       state=optuna.trial.TrialState.COMPLETE if math.isfinite(value) else optuna.trial.TrialState.FAIL)
            status = "finished"
        rows.append({"trial": number, "config": sampled, "status": status, "folds_done": result.folds_done,
                     "fold_epochs": result.fold_epochs, metric: value,
                     "inner_full_uf1": result.metrics.get("inner_full_uf1"),
                     "paper_full_uf1": result.metrics.get("paper_full_uf1"),
                     "seconds": time.perf_counter() - t})
        print(f"  [{label}] trial {number}: {status} after {result.folds_done} folds, {result.fold_epochs} "
              f"fold-epochs, {metric} {value:.4f}, {rows[-1]['seconds']:.0f} s  {sampled}", flush=True)
    return rows, time.perf_counter() - started


def summary(rows, metric):
    finished = [r for r in rows if r["status"] == "finished" and math.isfinite(r.get(metric, float("nan")))]
    best = max(finished, key=lambda r: r[metric]) if finished else None
    return {"fold_epochs": sum(r["fold_epochs"] for r in rows),
            "finished": len(finished), "pruned": sum(r["status"] == "pruned" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "best": best[metric] if best else float("nan"), "best_trial": best["trial"] if best else None,
            "best_inner_full_uf1": best["inner_full_uf1"] if best else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/htnet_composite")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--subjects", default="24", help="a count or ids (default 24; 'all' for every subject)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pruner", default="median", help="median|percentile|successive_halving|hyperband")
    parser.add_argument("--n-startup-trials", type=int, default=3)
    parser.add_argument("--n-warmup-steps", type=int, default=3)
    parser.add_argument("--engine", default="batched")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--percentile", type=float, default=25.0, help="with --pruner percentile: prune a trial "
                        "whose best value so far is below this percentile of the others' at the same step "
                        "(50 = median; 75 keeps the top quarter; default 25)")
    parser.add_argument("--unpruned-from", help="a JSON this script wrote for the same trials, subjects, epochs, "
                        "engine and seed: take its no-pruner arm instead of running it again (the engine is "
                        "deterministic, so it is the same arm)")
    parser.add_argument("--json", default="outputs/bench/pruning_efficiency.json")
    args = parser.parse_args()

    from htnet.data import load_release, synthetic_cache
    from htnet.loso import parse_subjects
    from search.space import make_pruner, parse_space

    root = Path(args.data)
    if (root / "combined_3_class2_for_optical_flow.csv").is_file():
        data, source = load_release(root), str(root)
    else:
        data, source = load_release(synthetic_cache(subjects_per_dataset=8)), "SYNTHETIC (real release absent)"
    space = parse_space(SPACE, "benchmarks/pruning_efficiency.py")
    overrides = {"epochs": args.epochs, "engine": args.engine, "seed": 1}
    if args.subjects != "all":
        overrides["subjects"] = parse_subjects(args.subjects)
    spec = {"type": args.pruner}
    if args.pruner in ("median", "percentile"):
        spec.update(n_startup_trials=args.n_startup_trials, n_warmup_steps=args.n_warmup_steps)
    if args.pruner == "percentile":
        spec["percentile"] = args.percentile
    import optuna

    print(f"# pruning efficiency {datetime.date.today()} | data {source} | {args.trials} trials | "
          f"subjects {args.subjects} | {args.epochs} epochs | engine {args.engine} | pruner {spec}")
    if args.unpruned_from:
        earlier = json.loads(Path(args.unpruned_from).read_text())
        for key in ("data", "trials", "subjects", "epochs", "engine", "seed"):
            if earlier["args"][key] != vars(args)[key]:
                raise SystemExit(f"error: --unpruned-from {args.unpruned_from}: {key} was {earlier['args'][key]!r}, "
                                 f"not {vars(args)[key]!r}")
        unpruned, unpruned_s = earlier["unpruned"]["trials"], earlier["unpruned"]["wall_s"]
        print(f"no-pruner arm from {args.unpruned_from} ({earlier['date']})")
    else:
        unpruned, unpruned_s = run_arm(space, data, optuna.pruners.NopPruner(), args.trials, overrides, args.seed,
                                       "no pruner")
    pruned, pruned_s = run_arm(space, data, make_pruner(spec, "--pruner"), args.trials, overrides, args.seed, "pruner")
    same = [json.dumps(a["config"], sort_keys=True, default=str) for a in unpruned] == \
        [json.dumps(b["config"], sort_keys=True, default=str) for b in pruned]
    metric = space.metric
    a, b = summary(unpruned, metric), summary(pruned, metric)
    # the fold-epochs the pruned arm had spent when it first found a trial as good as the unpruned best
    spent, reached_at = 0, None
    for row in pruned:
        spent += row["fold_epochs"]
        if row["status"] == "finished" and row.get(metric, -1) >= a["best"] - 1e-12 and reached_at is None:
            reached_at = spent
    ratio = b["fold_epochs"] / a["fold_epochs"] if a["fold_epochs"] else float("nan")
    print(f"\nsame configurations in both arms: {same}")
    print("| arm | trials finished / pruned / failed | fold-epochs | wall | best " + metric + " | its inner_full_uf1 |")
    print("|---|---|---|---|---|---|")
    for name, s, wall in (("no pruner", a, unpruned_s), (f"{args.pruner} pruner", b, pruned_s)):
        print(f"| {name} | {s['finished']} / {s['pruned']} / {s['failed']} | {s['fold_epochs']} | {wall / 60:.1f} min | "
              f"{s['best']:.4f} (trial {s['best_trial']}) | {s['best_inner_full_uf1'] if s['best_inner_full_uf1'] is None else round(s['best_inner_full_uf1'], 4)} |")
    reached = f" after {reached_at} fold-epochs ({reached_at / a['fold_epochs']:.3f} of the unpruned arm's)" \
        if reached_at else ""
    print(f"pruned/unpruned fold-epochs: {ratio:.3f}; unpruned best reached: {b['best'] >= a['best'] - 1e-12}{reached}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(datetime.date.today()), "args": vars(args), "pruner": spec,
                               "same_configurations": same, "unpruned": {"summary": a, "wall_s": unpruned_s, "trials": unpruned},
                               "pruned": {"summary": b, "wall_s": pruned_s, "trials": pruned},
                               "fold_epoch_ratio": ratio, "reached_best_after_fold_epochs": reached_at},
                              indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
