"""Search efficiency of the Optuna pruner: the same sampled configurations run without a pruner
and with one; fold-epochs consumed and the best objective found.

    python -m benchmarks.pruning_efficiency [--data ../shared/data/htnet_composite] [--trials 16]
        [--subjects 24] [--epochs 15] [--pruner median | --pruner-spec '{type: ...}'] [--seed 0]
        [--engine batched] [--json FILE]
    python -m benchmarks.pruning_efficiency --only-unpruned --json A.json      # the no-pruner arm only
    python -m benchmarks.pruning_efficiency --replay A.json --pruner-spec '{type: median}' \
        --pruner-spec '{type: successive_halving, reduction_factor: 3}'        # compare pruners, no training

Both arms draw their configurations from Optuna's RandomSampler with the same seed, which does not
look at results, so the two arms run the same N configurations (checked, and printed). The space
and the pruner are the search package's (`search.space.SearchSpace`: STSTNet's lr, batch size,
dropout, optimizer; `search.space.make_pruner`: any pruner a space file can name), and so is the
protocol: trials run one after another in this process through `search.bridge.run_trial`, the same
report -> prune -> tell steps the Ray search follows, without Ray (whose overhead is
benchmarks/orchestration_overhead.py's subject), so the comparison is deterministic. Two counts of
fold-epochs: "reported" (run_loso's `fold_epochs`, the folds whose results were reported) and
"trained" (what the engine computed: the batched engine trains a group of folds together, so a trial
stopped inside a group paid for the whole group). Shares use "trained".

Replay: every trial records the values it reported, fold by fold (pooled, and each fold's own). Because the engine is
deterministic, a trial reports the same values whether or not a pruner stops it later, so feeding
the no-pruner arm's records to a real Optuna study with another pruner gives exactly the pruned arm
that pruner would run (a real pruned arm prints its replay beside it as a check). Choosing a pruner
by replay on one set of configurations and then measuring it on another (--seed) keeps the choice
honest.

Target (the issue): the pruned search reaches the unpruned search's best objective with at most
1/3 of its fold-epochs.
"""
import argparse
import datetime
import json
import math
import time
from pathlib import Path

def space(trial):
    """STSTNet's lr, batch size, dropout and optimizer (as a space file's space(), search/spaces/)."""
    return {"lr": trial.suggest_float("lr", 1.0e-5, 3.0e-2, log=True),
            "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
            "model_config.dropout": trial.suggest_categorical("model_config.dropout", [0.0, 0.25, 0.5]),
            "optimizer": trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"])}


SETTINGS = {"description": "pruning benchmark: STSTNet on the real composite", "objective": "inner",
            "sampler": {"type": "random", "seed": 0},
            "pruner": {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 3},
            "fixed": {"model": "ststnet", "protocols": ["paper", "final", "inner"], "inner_val_subjects": 3,
                      "report_every": 1}}


def search_space():
    """The benchmark's search space (search.space.SearchSpace, built here rather than from a file)."""
    from search.space import SearchSpace

    return SearchSpace("benchmarks/pruning_efficiency.py", "", space, **SETTINGS)


STUDY_NAME = "pruning-benchmark"


def trained_fold_epochs_by_step(result, data):
    """{step: fold-epochs the engine had trained when the step-th fold was reported}. The batched
    engine trains a group of folds together, so a stop inside a group still paid for the whole group."""
    from htnet.engine import plan_groups
    from htnet.folds import make_folds
    from htnet.loso import select_subjects

    per_fold = result.fold_epochs // max(1, result.folds_done)
    folds = make_folds(select_subjects(data, result.config.subjects), result.config)
    group_ends = [max(m.fold_index for m in group) + 1  # the recorded fold_group_size fixes the grouping
                  for group in plan_groups(folds, result.config, "cpu")]
    return {step: per_fold * min(end for end in group_ends if end >= step)
            for step in range(1, result.folds_done + 1)}


def run_arm(space, data, pruner, trials, overrides, seed, label):
    import optuna

    from search.bridge import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, direction="maximize",  # Hyperband hashes the name
                                sampler=optuna.samplers.RandomSampler(seed=seed), pruner=pruner)
    metric = space.metric
    rows, started = [], time.perf_counter()
    for number in range(trials):
        t = time.perf_counter()
        run = run_trial(study, space, data, overrides)
        row = {"trial": number, "config": run.sampled, "status": run.status, "fold_epochs": 0}
        result = run.result
        if result is not None:
            row.update({"folds_done": result.folds_done, "folds_total": result.folds_total,
                        "fold_epochs": result.fold_epochs, "trained_by_step": trained_fold_epochs_by_step(result, data),
                        "reports": run.reports, metric: result.metrics.get(metric, float("nan")),
                        "inner_full_uf1": result.metrics.get("inner_full_uf1"),
                        "paper_full_uf1": result.metrics.get("paper_full_uf1")})
        rows.append({**row, "seconds": time.perf_counter() - t})
        print(f"  [{label}] trial {number}: {run.status} after {row.get('folds_done', 0)} folds, {row['fold_epochs']} "
              f"fold-epochs, {metric} {row.get(metric, float('nan')):.4f}, {rows[-1]['seconds']:.0f} s  {run.sampled}",
              flush=True)
    return rows, time.perf_counter() - started


def trained(row):
    """Fold-epochs a trial's engine trained (JSON turns the step keys into strings)."""
    by_step = {int(k): v for k, v in row.get("trained_by_step", {}).items()}
    return by_step.get(row.get("folds_done"), row["fold_epochs"])


def summary(rows, metric):
    finished = [r for r in rows if r["status"] == "finished" and math.isfinite(r.get(metric, float("nan")))]
    best = max(finished, key=lambda r: r[metric]) if finished else None
    return {"fold_epochs": sum(r["fold_epochs"] for r in rows), "trained_fold_epochs": sum(trained(r) for r in rows),
            "finished": len(finished), "pruned": sum(r["status"] == "pruned" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "best": best[metric] if best else float("nan"), "best_trial": best["trial"] if best else None,
            "best_inner_full_uf1": best["inner_full_uf1"] if best else None}


def reached_best_after(rows, best, metric):
    """Fold-epochs (reported, trained) spent when the arm first finished a trial at least as good as best."""
    spent = spent_trained = 0
    for row in rows:
        spent, spent_trained = spent + row["fold_epochs"], spent_trained + trained(row)
        if row["status"] == "finished" and row.get(metric, -1) >= best - 1e-12:
            return spent, spent_trained
    return None, None


def replay_arm(pruner, recorded, metric):
    """The pruned arm without training: feed a no-pruner arm's recorded reports, in order, to a real
    Optuna study with `pruner`. The engine is deterministic, so a trial reports the same values
    whether or not it is pruned later, and the study sees what a real pruned arm's study sees."""
    import optuna

    from search.bridge import report, tell

    study = optuna.create_study(study_name=STUDY_NAME, direction="maximize", pruner=pruner)
    rows = []
    for rec in recorded:
        trial = study.ask()
        stopped = next((i for i, (step, value, _, *folds) in enumerate(rec.get("reports") or []) if report(
            trial, pruner, step, value, folds[0] if folds else [], last=step >= rec["folds_total"])), None)
        tell(study, trial, rec.get(metric), pruned=stopped is not None, failed=rec["status"] == "failed")
        if stopped is None:
            rows.append(dict(rec))
            continue
        step, value, fold_epochs = rec["reports"][stopped][:3]
        rows.append({**rec, "status": "pruned", "folds_done": step, "fold_epochs": fold_epochs, metric: value})
    return rows


def pruner_spec(args):
    """The pruner --pruner and its options describe."""
    spec = {"type": args.pruner}
    if args.pruner in ("median", "percentile"):
        spec.update(n_startup_trials=args.n_startup_trials, n_warmup_steps=args.n_warmup_steps)
    if args.pruner == "percentile":
        spec["percentile"] = args.percentile
    return spec


def yaml_mapping(text):
    from htnet.errors import UserError
    from htnet.io import parse_yaml

    try:
        value = parse_yaml(text, "--pruner-spec")  # not YAML, an alias bomb: one line
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not isinstance(value, dict) or "type" not in value:
        raise argparse.ArgumentTypeError(f"expected a mapping with a type, like '{{type: median}}', not {text!r}")
    return value


def print_table(metric, arms, unpruned_summary):
    a = unpruned_summary
    print(f"| arm | finished / pruned / failed | fold-epochs reported | trained | share of unpruned (trained) | "
          f"best {metric} | unpruned best reached after (trained) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in arms:
        s = summary(rows, metric)
        _, reached = reached_best_after(rows, a["best"], metric)
        reached = f"{reached} ({reached / a['trained_fold_epochs']:.2f})" if reached else "not reached"
        print(f"| {name} | {s['finished']} / {s['pruned']} / {s['failed']} | {s['fold_epochs']} | "
              f"{s['trained_fold_epochs']} | {s['trained_fold_epochs'] / a['trained_fold_epochs']:.2f} | "
              f"{s['best']:.4f} (trial {s['best_trial']}) | {reached} |")


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
    parser.add_argument("--percentile", type=float, default=25.0, help="with --pruner percentile: Optuna keeps "
                        "the trials in the top PERCENTILE percent at a step (25 keeps the top quarter; 50 is the "
                        "median pruner; default 25)")
    parser.add_argument("--pruner-spec", action="append", type=yaml_mapping, help="a pruner as the search's space "
                        "file writes it, e.g. '{type: successive_halving, min_resource: 2, reduction_factor: 3}' "
                        "(overrides --pruner and its options; repeat it with --replay to compare several)")
    parser.add_argument("--unpruned-from", help="a JSON this script wrote for the same trials, subjects, epochs, "
                        "engine and seed: take its no-pruner arm instead of running it again (the engine is "
                        "deterministic, so it is the same arm)")
    parser.add_argument("--replay", metavar="JSON", help="train nothing: replay that JSON's no-pruner arm through "
                        "each --pruner-spec (or --pruner) and print what each pruned arm would spend and find")
    parser.add_argument("--only-unpruned", action="store_true", help="run and record the no-pruner arm only "
                        "(for --replay and --unpruned-from later)")
    parser.add_argument("--json", default="outputs/bench/pruning_efficiency.json")
    args = parser.parse_args()

    import optuna

    from htnet.errors import UserError
    from search.bridge import pairs_folds
    from search.space import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space()
    metric = space.metric
    specs = args.pruner_spec or [pruner_spec(args)]
    try:
        pruners = [make_pruner(spec, "--pruner-spec" if args.pruner_spec else "--pruner") for spec in specs]
    except UserError as e:
        raise SystemExit(f"error: {e}")
    if args.replay:
        earlier = json.loads(Path(args.replay).read_text())
        recorded = earlier["unpruned"]["trials"]
        if not all(r.get("reports") for r in recorded if r["status"] != "failed"):
            raise SystemExit(f"error: --replay {args.replay}: its no-pruner arm has no per-fold reports "
                             f"(written before they were recorded); run the benchmark again")
        if any(pairs_folds(p) for p in pruners) and not all(
                len(rec["reports"][0]) > 3 for rec in recorded if rec["status"] != "failed"):
            raise SystemExit(f"error: --replay {args.replay}: its no-pruner arm has no per-fold objectives "
                             f"(written before they were recorded), which a wilcoxon pruner needs; run it again")
        print(f"# pruning replay of {args.replay} ({earlier['date']}, {len(recorded)} trials, subjects "
              f"{earlier['args']['subjects']}, {earlier['args']['epochs']} epochs, seed {earlier['args']['seed']})")
        arms = [("no pruner", recorded)]
        arms += [(json.dumps(spec), replay_arm(pruner, recorded, metric)) for spec, pruner in zip(specs, pruners)]
        print_table(metric, arms, summary(recorded, metric))
        return

    from htnet.data import load_release, synthetic_cache
    from htnet.loso import parse_subjects

    root = Path(args.data)
    if (root / "combined_3_class2_for_optical_flow.csv").is_file():
        data, source = load_release(root), str(root)
    else:
        data, source = load_release(synthetic_cache(subjects_per_dataset=8)), "SYNTHETIC (real release absent)"
    overrides = {"epochs": args.epochs, "engine": args.engine, "seed": 1}
    if args.subjects != "all":
        overrides["subjects"] = parse_subjects(args.subjects)
    spec = specs[0]
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
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only_unpruned:
        out.write_text(json.dumps({"date": str(datetime.date.today()), "args": vars(args), "pruner": None,
                                   "unpruned": {"summary": summary(unpruned, metric), "wall_s": unpruned_s,
                                                "trials": unpruned}}, indent=2, default=str))
        print_table(metric, [("no pruner", unpruned)], summary(unpruned, metric))
        print(f"wrote {out}")
        return
    pruned, pruned_s = run_arm(space, data, pruners[0], args.trials, overrides, args.seed, "pruner")
    same = [json.dumps(a["config"], sort_keys=True, default=str) for a in unpruned] == \
        [json.dumps(b["config"], sort_keys=True, default=str) for b in pruned]
    a, b = summary(unpruned, metric), summary(pruned, metric)
    reached_at, reached_trained = reached_best_after(pruned, a["best"], metric)
    ratio = b["trained_fold_epochs"] / a["trained_fold_epochs"] if a["trained_fold_epochs"] else float("nan")
    print(f"\nsame configurations in both arms: {same}; walls: no pruner {unpruned_s / 60:.1f} min, "
          f"pruner {pruned_s / 60:.1f} min")
    arms = [("no pruner", unpruned), (json.dumps(spec), pruned)]
    if all(r.get("reports") for r in unpruned if r["status"] != "failed"):  # the replay must agree with the run
        arms.append((f"replay of {json.dumps(spec)}", replay_arm(make_pruner(spec, "--pruner"), unpruned, metric)))
    print_table(metric, arms, a)
    out.write_text(json.dumps({"date": str(datetime.date.today()), "args": vars(args), "pruner": spec,
                               "same_configurations": same, "unpruned": {"summary": a, "wall_s": unpruned_s, "trials": unpruned},
                               "pruned": {"summary": b, "wall_s": pruned_s, "trials": pruned},
                               "trained_fold_epoch_ratio": ratio, "reached_best_after_fold_epochs": reached_at,
                               "reached_best_after_trained_fold_epochs": reached_trained},
                              indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
