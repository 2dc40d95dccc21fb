"""python -m search: the one command line of the search and its reports.

Exit codes: 0 done, 1 the search did not finish (resume it; also when MLflow went away mid-search:
its results are kept) or nothing usable came out of a rerun/nested run, 2 bad input, an unreachable
or damaged store, or a search that another process is running (one line on stderr). SIGTERM stops a
search as Ctrl+C does.
"""
import argparse
import contextlib
import dataclasses
import importlib
import signal
import sys
import threading

from htnet.errors import ArgumentParser, UserError, first_line
from search.space import OBJECTIVES, PRUNERS, SAMPLERS


def at_least(minimum, kind=int, above=False):
    """An argparse type: a number of `kind` >= `minimum` (> with `above`)."""
    def parse(text):
        with contextlib.suppress(ValueError):
            value = kind(text)
            if value > minimum if above else value >= minimum:  # NaN is neither
                return value
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} "
                                         f"{'>' if above else '>='} {minimum}, got {text!r}")
    return parse


positive_int = at_least(1)


def comma_list(text):
    return [s for s in text.split(",") if s] or None


class KeyValues(argparse.Action):
    """KEY=VALUE, repeatable, into {KEY: VALUE} (the value as text)."""

    def __call__(self, parser, namespace, text, option_string=None):
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {text!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key.strip(): value.strip()})


def add_shared(p, storage=None, ray=False, per=None, store=True, ray_storage=False):
    """Options several commands share: --storage (the folder of `storage`), Ray's (with --cpus-/--gpus-per-`per`),
    the MLflow store's."""
    if storage:
        p.add_argument("--storage", default="runs", help=f"folder of {storage} (default: runs)")
    if ray or per:
        p.add_argument("--address", help="'auto' joins the running Ray cluster (default: start a local Ray)")
        p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    if ray_storage:
        p.add_argument("--ray-storage", help="Ray Tune results: a folder or s3://bucket/prefix, which every node of a "
                                             "cluster reaches (default: <storage>/ray)")
    if per:
        default = "the space file's" if per == "trial" else "1 CPU, 0 GPUs"
        p.add_argument(f"--cpus-per-{per}", type=at_least(0, float, above=True), help=f"default: {default}")
        p.add_argument(f"--gpus-per-{per}", type=at_least(0, float), help="0.25 packs four on a GPU")
    if store:
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                              "sqlite:///mlflow.db in the working folder)")
        p.add_argument("--experiment", default="htnet", help="MLflow experiment (default: htnet)")


def add_search(p, name_default, space_optional=False):
    """A search's own options (run, nested); None leaves the space file's value."""
    p.add_argument("space", nargs="?" if space_optional else None, help="a search space .py file, or the name of "
                   "one in search/spaces/" + (" (default: demo)" if space_optional else ""))
    p.add_argument("--name", help=f"default: {name_default}-<date>-<time>")
    p.add_argument("--data", help="release folder (default: the space's synthetic set)")
    p.add_argument("--subjects", help="restrict the data first: a count across datasets, or comma-separated ids")
    p.add_argument("--num-samples", type=positive_int, help="trials")
    p.add_argument("--objective", choices=OBJECTIVES, help="inner: the leak-free validation UF1 of the inner protocol; "
                   "paper: the test-fold UF1 of the paper protocol (leaks the test subject; tagged on every run); "
                   "final: the test-fold UF1 at the last epoch (leak-free)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--pruner", choices=PRUNERS, help="with the space file's arguments if its type matches")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="hold a LOSO config key fixed, e.g. epochs=5 or model_config.dim=64 (repeatable)")


def build_parser():
    parser = ArgumentParser(prog="python -m search", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser

    run = p = command("run", help="start a search (default: search/spaces/demo.py on synthetic data)")
    add_search(p, "<space>", space_optional=True)
    p.add_argument("--resume", metavar="NAME", help="resume the search NAME instead of starting one")
    p.add_argument("--max-concurrent", type=positive_int, dest="max_concurrent_trials", help="trials at once")
    p.add_argument("--max-failures", type=at_least(0), help="retries of a trial whose worker died")
    p.add_argument("--save-weights", action="store_true", help="log per-subject weights of every finished trial")
    p.add_argument("--verbose", type=int, nargs="?", const=1, choices=[0, 1, 2], default=0,
                   help="the libraries' output on the console too: 1 (or --verbose alone) with Ray Tune's table, 2 "
                        "with every result; 0 (default): only in <storage>/logs/<name>.log, a line per trial event")
    p.add_argument("--optuna-storage", help="sqlite:///FILE, an SQLAlchemy URL, or journal:FILE (default: "
                                            "sqlite:///<storage>/optuna.db)")
    resume = command("resume", help="go on with a search whose driver stopped (killed, Ctrl+C, lost head node)")
    resume.add_argument("name")
    status = command("status", help="list the searches, or one search's trials")
    status.add_argument("name", nargs="?")
    for p in (run, resume, status):
        add_shared(p, "the search records" + ("" if p is status else ", Ray results, the Optuna study and synthetic "
                   "data"), ray=p is resume, per="trial" if p is run else None, store=p is run,
                   ray_storage=p is run)
        p.add_argument("--top", type=int, default=10, help="trials shown (default: 10)")

    p = command("leaderboard", help="every trial of the searches, ranked by the objective (from MLflow)")
    p.add_argument("searches", nargs="*", metavar="SEARCH", help="default: every search")
    p.add_argument("--protocol", default="objective",
                   help="whose UF1/UAR: objective (each search's, default), inner, paper, final, or all (a row each)")
    p.add_argument("--status", type=comma_list, help="keep these trial statuses, comma-separated (finished,pruned,...)")
    p.add_argument("--param", action=KeyValues, metavar="KEY=VALUE",
                   help="keep trials whose parameter equals VALUE, e.g. model=htnet (repeatable)")
    p.add_argument("--top", type=int, help="keep the first N trials")
    p.add_argument("--csv")
    p.add_argument("--markdown", "--md", dest="markdown")
    p.add_argument("--latex", "--tex", dest="latex", help="booktabs, the compact paper form (model, key parameters, "
                                                          "objective, Full UF1/UAR)")
    p.add_argument("--full", action="store_true", help="LaTeX: every column, as in the CSV and Markdown")
    p.add_argument("--run-ids", action="store_true", help="show MLflow run ids")
    add_shared(p)

    p = command("rerun", help="a configuration (--best, --run-id, --preset, --config) with K seeds (Ray)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--best", metavar="SEARCH", help="the best finished trial of SEARCH (see --param)")
    source.add_argument("--run-id", help="an MLflow run with a config.yaml (trial, rerun, ...)")
    source.add_argument("--preset", choices=["htnet-paper", "ststnet", "offapexnet", "dual_inception"],
                        help="the HTNet paper's config, or STSTNet's or a baseline's reference settings (PRESETS)")
    source.add_argument("--config", help="a LOSO config YAML (python -m htnet train --config)")
    p.add_argument("--param", action=KeyValues, metavar="KEY=VALUE", dest="params",
                   help="with --best: the best trial whose parameter equals VALUE, e.g. model=htnet (repeatable)")
    p.add_argument("--seeds", type=positive_int, default=5, help="default 5")
    p.add_argument("--seed-list", type=comma_list, help="exact seeds, comma-separated (instead of --seeds)")
    p.add_argument("--method", help="row label in the paper table (default: from the source and what --set changed, "
                                    "e.g. 'HTNet (best found)', 'HTNet (paper config, epochs=1)')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="change a LOSO config key, e.g. device=cpu or epochs=5 (repeatable)")
    p.add_argument("--data", help="release folder (default: the search's data, else the synthetic set)")
    add_shared(p, "the synthetic data cache and of Ray's results (ray/)", per="seed", ray_storage=True)

    p = command("paper-table", help="published rows beside our reruns and nested LOSO (Markdown, LaTeX)")
    p.add_argument("--out", help="folder for paper_table.md, .tex and .csv")
    p.add_argument("--interval", choices=["std", "ci95", "none"], default="std",
                   help="beside each mean (3+ seeds): std (default), the 95%% bootstrap interval over seeds "
                        "and subjects, or nothing")
    p.add_argument("--rerun", "--method", dest="rerun", action=KeyValues, metavar="METHOD=RUN_ID",
                   help="row METHOD from this rerun/nested parent run (repeatable; names every row; default: per "
                        "method, the run on the published data with the most seeds)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="also rows on other data than the published rows' (synthetic, fewer subjects), marked")
    p.add_argument("--no-nested", action="store_true", help="leave out the nested LOSO rows")
    p.add_argument("--no-log", action="store_true", help="do not log the table to MLflow")
    add_shared(p)

    p = command("compare", help="paired per-subject comparison of two runs: bootstrap interval and p-value")
    p.add_argument("run_a", metavar="RUN_A", help="MLflow run id, or a predictions.csv / folder")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--protocol", default="inner", help="protocol of both runs (default: inner)")
    p.add_argument("--protocol-b", help="protocol of RUN_B when it differs (e.g. final for STSTNet)")
    p.add_argument("--dataset", default="full", choices=["full", "smic", "casme2", "samm"])
    p.add_argument("--n-boot", type=at_least(100), default=10_000, help="bootstrap replicates (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations")
    p.add_argument("--csv", help="write the per-subject table")
    p.add_argument("--json", help="write the summary as JSON")
    add_shared(p)

    p = command("nested", help="nested LOSO: the whole search inside every outer fold (unbiased)")
    add_search(p, "nested")
    p.add_argument("--method", help="row label in the paper table (default: 'Search + HTNet (nested LOSO)')")
    p.add_argument("--outer-subjects", help="outer folds to run: a count across datasets, or ids (default: all)")
    add_shared(p, "the synthetic data cache", per="fold")

    p = command("plots", help="Optuna's plots and the best trial's per-subject accuracy, on its parent run")
    p.add_argument("search", metavar="SEARCH")
    p.add_argument("--optuna-storage", help="default: the one the search logged")
    add_shared(p)

    p = command("local-cluster", help="cluster.yaml simulated here: autoscaled fake GPU workers, S3 and MLflow "
                                      "servers (cluster-local.yaml)")
    p.add_argument("action", choices=["start", "env", "stop"],
                   help="start prints the exports for the driver's shell: eval \"$(python -m search local-cluster "
                        "start)\"; env prints them again; stop ends this cluster's processes only")
    p.add_argument("--dir", default="runs/local-cluster", help="state, logs, MLflow store (default: %(default)s)")
    p.add_argument("--idle-timeout-minutes", type=at_least(0, float), help="default: cluster.yaml's")
    p.add_argument("--max-workers", type=positive_int, help="default: cluster.yaml's")
    p.add_argument("--s3-endpoint", metavar="URL", help="start: use this S3 endpoint (it creates the bucket there) "
                                                        "instead of starting a local S3 server")
    return parser


def options(cls, args):
    """An options dataclass from the parsed arguments of the same names (None keeps its default)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if getattr(args, f.name, None) is not None})


def open_store(args):
    return importlib.import_module("search.reports.leaderboard").open_store(args.tracking_uri, args.experiment)


def cmd_run(args, runner):
    """run, run --resume and resume; a finished search gets its plots (the driver never imports the reports)."""
    if args.command == "run" and not args.resume:
        summary = runner.run_search(options(runner.Options, args))
    else:
        summary = runner.resume_search(getattr(args, "resume", None) or args.name, storage=args.storage,
                                       address=args.address, num_cpus=args.num_cpus, top=args.top)
    if summary["complete"]:
        importlib.import_module("search.reports.plots").plot_finished_search(summary)
    return 0 if summary["complete"] else 1


def cmd_leaderboard(args, board):
    table = board.leaderboard(open_store(args), args.searches, protocol=args.protocol, statuses=args.status,
                              params=args.param, top=args.top)
    board.print_leaderboard(table, run_ids=args.run_ids)
    written = board.write_exports(table, args.csv, args.markdown, args.latex, full=args.full,
                                  caption=f"Leaderboard: {', '.join(args.searches) or 'all searches'}")
    if written:
        print(f"written: {', '.join(map(str, written))}")


def cmd_compare(args, compare):
    store = None
    with contextlib.suppress(UserError):  # local prediction files need no store
        store = open_store(args)
    (a, label_a), (b, label_b) = (compare.load_predictions(run, store) for run in (args.run_a, args.run_b))
    result = compare.compare(a, b, protocol=args.protocol, protocol_b=args.protocol_b, dataset=args.dataset,
                             n_boot=args.n_boot, seed=args.seed, labels=(label_a, label_b))
    compare.print_comparison(result)
    compare.write_outputs(result, args.csv, args.json)


def cmd_paper_table(args, paper_table):
    paper_table.paper_table(args.tracking_uri, args.experiment, picks=args.rerun, interval=args.interval,
                            nested=not args.no_nested, allow_mixed=args.allow_mixed, out_dir=args.out,
                            log=not args.no_log)


def cmd_local_cluster(args, local_cluster):
    if args.action == "start":
        state = local_cluster.start(args.dir, args.idle_timeout_minutes, args.max_workers, args.s3_endpoint)
        env = state["env"]
        print(f"# local cluster: Ray head {env['RAY_ADDRESS']}, MLflow {env['MLFLOW_TRACKING_URI']}, "
              f"S3 {env['AWS_ENDPOINT_URL']} (bucket {local_cluster.BUCKET}); logs in {state['folder']}",
              file=sys.stderr)
    elif args.action == "stop":
        print(f"local cluster in {local_cluster.stop(args.dir)['folder']} stopped", file=sys.stderr)
        return 0
    print(local_cluster.exports(local_cluster.read_state(args.dir)), end="")


def cmd_status(args, runner):  # what these return is not an exit code
    runner.status(args.storage, args.name, args.top)


def cmd_plots(args, plots):
    plots.log_search_plots(open_store(args), args.search, args.optuna_storage)


def with_module(command, module):
    """command(args, module) as command(args), search.<module> imported when it runs: --help and a bad flag load
    neither Ray nor MLflow."""
    return lambda args: command(args, importlib.import_module(f"search.{module}"))


COMMANDS = {name: with_module(command, module) for name, (command, module) in {  # a command's None: exit 0
    "run": (cmd_run, "driver.runner"), "resume": (cmd_run, "driver.runner"),
    "status": (cmd_status, "driver.runner"),
    "leaderboard": (cmd_leaderboard, "reports.leaderboard"),
    "rerun": (lambda args, rerun: 0 if len(rerun.rerun(options(rerun.RerunOptions, args))["summary"]) else 1,
              "reports.rerun"),
    "paper-table": (cmd_paper_table, "reports.paper_table"),
    "compare": (cmd_compare, "reports.compare"),
    "nested": (lambda args, nested: 0 if nested.run_nested(options(nested.NestedOptions, args))["metrics"] else 1,
               "nested"),
    "plots": (cmd_plots, "reports.plots"),
    "local-cluster": (cmd_local_cluster, "driver.local_cluster")}.items()}


def terminate(signum, frame):
    """SIGTERM does what Ctrl+C does: Ray Tune's handler stops the trials and saves the experiment
    (resume goes on from there), elsewhere a KeyboardInterrupt; either way Ray is shut down."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job): still stop
        raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return COMMANDS[args.command](args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = f"resume with `python -m search resume {getattr(args, 'name', None) or 'NAME'}`"
        hint = {"run": again, "resume": again, "rerun": "the same command again goes on from each seed's last "
                "finished fold"}.get(args.command, f"`{args.command}` keeps nothing: run it again")
        print(f"interrupted: {hint}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - an MLflow store that fails is one line, not a traceback
        if not isinstance(e, importlib.import_module("search.tracking").mlflow_errors()):
            raise
        print(f"error: MLflow: {first_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
