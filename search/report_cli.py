"""python -m search leaderboard|rerun|paper-table|compare|nested|plots: the reports, read from MLflow.

  leaderboard [SEARCH ...]   every trial of the searches (all when none named), ranked by the
                             search objective; --csv/--markdown/--latex export it
  rerun --best SEARCH        rerun a configuration with K seeds (default 5) in parallel on Ray;
        --run-id RUN | --preset htnet-paper|ststnet | --config FILE
  paper-table                the paper's table: published rows beside our reruns, paper protocol
                             and leak-free, and the nested LOSO estimate; Markdown + LaTeX
  compare RUN_A RUN_B        paired per-subject comparison: bootstrap interval and p-value
  nested SPACE               nested LOSO: the whole search inside every outer fold (unbiased
                             "search + model"); prints its cost first
  plots SEARCH               Optuna history / importances / parallel coordinates and the best
                             trial's per-subject accuracy, logged to the search's parent run

`register(subparsers)` adds these to `python -m search`; `COMMANDS` maps each to its handler.
Exit codes: 0 done, 1 nothing usable came out (every seed or fold failed), 2 bad input.
"""
import argparse

from htnet.errors import UserError
from search.space import PRUNERS

TRACKING_HELP = ("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                 "working folder)")


def _store_args(p):
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--experiment", default="htnet", help="MLflow experiment (default: htnet)")


def _ray_args(p, what):
    p.add_argument("--address", help="'auto' joins the running Ray cluster; default: start a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument(f"--cpus-per-{what}", type=float, default=1.0, help=f"CPUs per {what} (default 1)")
    p.add_argument(f"--gpus-per-{what}", type=float, default=0.0,
                   help=f"GPUs per {what}, fractions allowed (default 0)")


def _pairs(items, flag):
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def register(subparsers):
    """Add the report subcommands to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser("leaderboard", help="rank the trials of one or more searches (from MLflow)",
                              formatter_class=fmt)
    p.add_argument("searches", nargs="*", metavar="SEARCH", help="search names (default: every search)")
    p.add_argument("--protocol", default="objective",
                   help="whose UF1/UAR to show: objective (each search's objective protocol, default), "
                        "inner, paper, final, or all (a row per protocol)")
    p.add_argument("--status", help="keep these trial statuses, comma-separated (finished,pruned,failed,...)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="keep trials whose parameter equals VALUE, e.g. model=htnet (repeatable)")
    p.add_argument("--top", type=int, help="keep the first N trials")
    p.add_argument("--csv", help="write the table as CSV")
    p.add_argument("--markdown", "--md", dest="markdown", help="write the table as Markdown")
    p.add_argument("--latex", "--tex", dest="latex", help="write the table as LaTeX (booktabs)")
    p.add_argument("--run-ids", action="store_true", help="show MLflow run ids")
    _store_args(p)

    p = subparsers.add_parser("rerun", help="rerun a configuration with K seeds in parallel (Ray)",
                              formatter_class=fmt)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--best", metavar="SEARCH", help="the best finished trial of SEARCH")
    source.add_argument("--run-id", help="an MLflow run with a config.yaml (trial, rerun, ...)")
    source.add_argument("--preset", choices=["htnet-paper", "ststnet"],
                        help="htnet-paper: the HTNet paper config; ststnet: STSTNet, reference settings")
    source.add_argument("--config", help="a LOSO config YAML (python -m htnet train --config)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    p.add_argument("--seed-list", help="exact seeds, comma-separated (instead of --seeds)")
    p.add_argument("--method", help="row label in the paper table (default: from the source, e.g. "
                                    "'HTNet (best found)', 'HTNet (paper config)', 'STSTNet')")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="change a LOSO config key, e.g. epochs=10, device=cpu or model_config.dim=64")
    p.add_argument("--data", help="release folder (default: the search's data, else the synthetic set)")
    p.add_argument("--storage", default="runs", help="folder of the synthetic data cache (default: runs)")
    _ray_args(p, "seed")
    _store_args(p)

    p = subparsers.add_parser("paper-table", help="the paper's table from MLflow reruns (Markdown, LaTeX)",
                              formatter_class=fmt)
    p.add_argument("--out", help="folder for paper_table.md, .tex and .csv")
    p.add_argument("--interval", choices=["std", "ci95", "none"], default="std",
                   help="beside each mean: std over seeds (default), the 95%% t-interval, or nothing")
    p.add_argument("--method", action="append", default=[], metavar="LABEL=RUN_ID",
                   help="use this rerun/nested parent run for row LABEL (repeatable; default: the newest "
                        "finished run per htnet.method tag)")
    p.add_argument("--no-nested", action="store_true", help="leave out the nested LOSO rows")
    p.add_argument("--no-log", action="store_true", help="do not log the table to MLflow")
    _store_args(p)

    p = subparsers.add_parser("compare", help="paired per-subject comparison of two runs", formatter_class=fmt)
    p.add_argument("run_a", metavar="RUN_A", help="MLflow run id, or a predictions.csv / folder")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--protocol", default="inner", help="protocol of both runs (default: inner)")
    p.add_argument("--protocol-b", help="protocol of RUN_B when it differs (e.g. final for STSTNet)")
    p.add_argument("--dataset", default="full", choices=["full", "smic", "casme2", "samm"])
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap replicates (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations")
    p.add_argument("--csv", help="write the per-subject table")
    p.add_argument("--json", help="write the summary as JSON")
    _store_args(p)

    p = subparsers.add_parser("nested", help="nested LOSO: the search inside every outer fold (unbiased)",
                              formatter_class=fmt)
    p.add_argument("space", help="search space YAML, or the name of one in search/spaces/")
    p.add_argument("--name", help="name of the nested run (default: nested-<date>-<time>)")
    p.add_argument("--method", help="row label in the paper table (default: 'Search + HTNet (nested LOSO)')")
    p.add_argument("--data", help="release folder (default: the space's synthetic set)")
    p.add_argument("--storage", default="runs", help="folder of the synthetic data cache (default: runs)")
    p.add_argument("--subjects", help="restrict the data first: a count across datasets, or ids")
    p.add_argument("--outer-subjects", help="outer folds to run: a count across datasets, or ids (default: all)")
    p.add_argument("--num-samples", type=int, help="trials of the search in each outer fold")
    p.add_argument("--objective", choices=["inner", "paper"], help="the search objective (default: the space's)")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"])
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--pruner", choices=PRUNERS)
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="hold a LOSO config key fixed, e.g. epochs=5 (repeatable)")
    _ray_args(p, "fold")
    _store_args(p)

    p = subparsers.add_parser("plots", help="log a search's Optuna and per-subject plots to its parent run",
                              formatter_class=fmt)
    p.add_argument("search", metavar="SEARCH")
    p.add_argument("--optuna-storage", help="the Optuna storage (default: the one the search logged)")
    _store_args(p)
    return subparsers


# ----------------------------------------------------------------------------- handlers

def cmd_leaderboard(args):
    from search.reports.leaderboard import leaderboard, open_store, print_leaderboard, write_exports

    store = open_store(args.tracking_uri, args.experiment)
    statuses = [s for s in (args.status or "").split(",") if s] or None
    table = leaderboard(store, args.searches, protocol=args.protocol, statuses=statuses,
                        params=_pairs(args.param, "--param"), top=args.top)
    print_leaderboard(table, run_ids=args.run_ids)
    written = write_exports(table, args.csv, args.markdown, args.latex,
                            caption=f"Leaderboard: {', '.join(args.searches) or 'all searches'}")
    if written:
        print(f"written: {', '.join(map(str, written))}")
    return 0


def cmd_rerun(args):
    from search.reports.rerun import RerunOptions, rerun

    options = RerunOptions(best=args.best, run_id=args.run_id, preset=args.preset, config=args.config,
                           method=args.method, seeds=args.seeds,
                           seed_list=[s for s in (args.seed_list or "").split(",") if s] or None,
                           sets=args.sets, data=args.data, storage=args.storage, tracking_uri=args.tracking_uri,
                           experiment=args.experiment, address=args.address, num_cpus=args.num_cpus,
                           cpus_per_seed=args.cpus_per_seed, gpus_per_seed=args.gpus_per_seed)
    result = rerun(options)
    return 0 if len(result["summary"]) else 1


def cmd_paper_table(args):
    from search.reports.paper_table import paper_table

    paper_table(args.tracking_uri, args.experiment, methods=_pairs(args.method, "--method") or None,
                interval=args.interval, nested=not args.no_nested, out_dir=args.out, log=not args.no_log)
    return 0


def cmd_compare(args):
    from search.reports.compare import compare, load_predictions, print_comparison, write_outputs
    from search.reports.leaderboard import open_store

    store = None
    try:
        store = open_store(args.tracking_uri, args.experiment)
    except UserError:
        pass  # local prediction files need no store
    a, label_a = load_predictions(args.run_a, store)
    b, label_b = load_predictions(args.run_b, store)
    if args.n_boot < 100:
        raise UserError(f"--n-boot must be >= 100, got {args.n_boot}")
    result = compare(a, b, protocol=args.protocol, protocol_b=args.protocol_b, dataset=args.dataset,
                     n_boot=args.n_boot, seed=args.seed, labels=(label_a, label_b))
    print_comparison(result)
    write_outputs(result, args.csv, args.json)
    return 0


def cmd_nested(args):
    from search.nested import NestedOptions, run_nested

    options = NestedOptions(space=args.space, name=args.name, method=args.method, data=args.data,
                            storage=args.storage, subjects=args.subjects, outer_subjects=args.outer_subjects,
                            num_samples=args.num_samples, objective=args.objective, sampler=args.sampler,
                            seed=args.seed, pruner=args.pruner, sets=args.sets, tracking_uri=args.tracking_uri,
                            experiment=args.experiment, address=args.address, num_cpus=args.num_cpus,
                            cpus_per_fold=args.cpus_per_fold, gpus_per_fold=args.gpus_per_fold)
    result = run_nested(options)
    return 0 if result["metrics"] else 1


def cmd_plots(args):
    from search.reports.leaderboard import open_store
    from search.reports.plots import log_search_plots

    log_search_plots(open_store(args.tracking_uri, args.experiment), args.search, args.optuna_storage)
    return 0


COMMANDS = {"leaderboard": cmd_leaderboard, "rerun": cmd_rerun, "paper-table": cmd_paper_table,
            "compare": cmd_compare, "nested": cmd_nested, "plots": cmd_plots}
