"""python -m search: the one command line of the search and its reports.

  run [SPACE]          start a search (default: search/spaces/demo.yaml on synthetic data)
  resume NAME          go on with a search whose driver stopped (killed, Ctrl+C, lost head node)
  status [NAME]        list the searches, or one search's trials
  leaderboard          every trial of the searches, ranked by the objective
  rerun                a configuration (--best SEARCH, --run-id, --preset, --config) with K seeds
  paper-table          published rows beside our reruns, paper protocol and leak-free, nested LOSO
  compare RUN_A RUN_B  paired per-subject comparison: bootstrap interval and p-value
  nested SPACE         nested LOSO: the whole search inside every outer fold (unbiased)
  plots SEARCH         Optuna's plots and the best trial's per-subject accuracy, on the parent run
  local-cluster start|env|stop|s3-down|s3-up
                       cluster.yaml simulated here: autoscaled fake GPU workers, S3 and MLflow servers

Exit codes: 0 done, 1 the search did not finish (resume it; also when MLflow went away mid-search:
its results are kept) or nothing usable came out of a rerun/nested run, 2 bad input, an unreachable
or damaged store, or a search that another process is running (one line on stderr). SIGTERM stops a
search as Ctrl+C does.
"""
import argparse
import contextlib
import dataclasses
import signal
import sys
import threading

from htnet.errors import ArgumentParser, UserError, first_line
from search.space import PRUNERS

OBJECTIVE_HELP = ("inner: the leak-free validation UF1 of the inner protocol (default); paper: the "
                  "test-fold UF1 of the paper protocol (leaks the test subject; tagged on every run)")
SAMPLERS = ["tpe", "random", "grid"]


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


def add_shared(p, storage=None, ray=False, per=None, store=True):
    """Options several commands share: --storage (the folder of `storage`), Ray's (with --cpus-/--gpus-per-`per`),
    the MLflow store's."""
    if storage:
        p.add_argument("--storage", default="runs", help=f"folder of {storage} (default: runs)")
    if ray or per:
        p.add_argument("--address", help="'auto' joins the running Ray cluster (default: start a local Ray)")
        p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    if per:
        p.add_argument(f"--cpus-per-{per}", type=at_least(0, float, above=True), default=1.0, help="default 1")
        p.add_argument(f"--gpus-per-{per}", type=at_least(0, float), default=0.0, help="fractions allowed; default 0")
    if store:
        p.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://HOST:5000 (default: "
                                              "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder)")
        p.add_argument("--experiment", default="htnet", help="MLflow experiment (default: htnet)")


def add_sets(p, verb="hold a LOSO config key fixed"):
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help=f"{verb}, e.g. epochs=5 or model_config.dim=64 (repeatable)")


def add_search_choices(p):
    p.add_argument("--num-samples", type=positive_int, help="trials (default: the space file's)")
    p.add_argument("--objective", choices=["inner", "paper"], help=OBJECTIVE_HELP)
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--pruner", choices=PRUNERS, help="Optuna pruner (arguments from the space file if it matches)")
    add_sets(p)


def build_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(prog="python -m search", description=__doc__, formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True)

    run = p = commands.add_parser("run", help="start (or with --resume, resume) a search")
    p.add_argument("space", nargs="?", help="search space YAML, or the name of one in search/spaces/ (default: demo)")
    p.add_argument("--resume", metavar="NAME", help="resume the search NAME instead of starting one")
    p.add_argument("--name", help="search name (default: <space>-<date>-<time>)")
    p.add_argument("--data", help="release folder (default: the built-in synthetic set)")
    p.add_argument("--subjects", help="limit every trial to these subjects: a count taken across "
                                      "datasets, or comma-separated ids (default: all)")
    add_search_choices(p)
    p.add_argument("--max-concurrent", type=positive_int, dest="max_concurrent_trials",
                   help="trials at once (default: the space file's)")
    p.add_argument("--cpus-per-trial", type=at_least(0, float, above=True),
                   help="CPUs per trial (default: the space file's)")
    p.add_argument("--gpus-per-trial", type=at_least(0, float),
                   help="GPUs per trial, fractions allowed: 0.25 packs four on a GPU")
    p.add_argument("--max-failures", type=at_least(0), help="retries of a trial whose worker died")
    p.add_argument("--save-weights", action="store_true", help="log per-subject weights of every finished trial")
    p.add_argument("--verbose", type=int, nargs="?", const=1, choices=[0, 1, 2], default=0,
                   help="the libraries' output on the console too: 1 (or --verbose alone) with Ray Tune's trial "
                        "table, 2 with every result; default 0: only in <storage>/logs/<name>.log, the console "
                        "shows a line per trial event and now and then a table")
    p.add_argument("--optuna-storage", help="Optuna storage: sqlite:///FILE, an SQLAlchemy URL, or "
                                            "journal:FILE (default: sqlite:///<storage>/optuna.db)")
    p.add_argument("--ray-storage", help="Ray Tune results: a folder or s3://bucket/prefix; a cluster "
                                         "needs storage every node reaches (default: <storage>/ray)")
    resume = commands.add_parser("resume", help="resume a search whose driver stopped")
    resume.add_argument("name")
    for p in (run, resume):
        add_shared(p, "the search records, Ray results, the Optuna study and synthetic data", ray=True,
                   store=p is run)
        p.add_argument("--top", type=int, default=10, help="trials in the final table (default: 10)")

    p = commands.add_parser("status", help="list searches, or show one search's trials")
    p.add_argument("name", nargs="?")
    add_shared(p, "the search records", store=False)
    p.add_argument("--top", type=int, default=10, help="trials shown (default: 10)")

    p = commands.add_parser("leaderboard", help="rank the trials of one or more searches (from MLflow)")
    p.add_argument("searches", nargs="*", metavar="SEARCH", help="search names (default: every search)")
    p.add_argument("--protocol", default="objective",
                   help="whose UF1/UAR to show: objective (each search's objective protocol, default), "
                        "inner, paper, final, or all (a row per protocol)")
    p.add_argument("--status", type=comma_list, help="keep these trial statuses, comma-separated (finished,pruned,...)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="keep trials whose parameter equals VALUE, e.g. model=htnet (repeatable)")
    p.add_argument("--top", type=int, help="keep the first N trials")
    p.add_argument("--csv", help="write the table as CSV")
    p.add_argument("--markdown", "--md", dest="markdown", help="write the table as Markdown")
    p.add_argument("--latex", "--tex", dest="latex", help="write the table as LaTeX (booktabs): the compact paper "
                                                          "form (model, key parameters, objective, Full UF1/UAR)")
    p.add_argument("--full", action="store_true", help="LaTeX: every column, as in the CSV and Markdown")
    p.add_argument("--run-ids", action="store_true", help="show MLflow run ids")
    add_shared(p)

    p = commands.add_parser("rerun", help="rerun a configuration with K seeds in parallel (Ray)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--best", metavar="SEARCH", help="the best finished trial of SEARCH (see --param)")
    source.add_argument("--run-id", help="an MLflow run with a config.yaml (trial, rerun, ...)")
    source.add_argument("--preset", choices=["htnet-paper", "ststnet"],
                        help="htnet-paper: the HTNet paper config; ststnet: STSTNet, reference settings")
    source.add_argument("--config", help="a LOSO config YAML (python -m htnet train --config)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="with --best: the best trial whose parameter equals VALUE, e.g. model=htnet (repeatable)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    p.add_argument("--seed-list", type=comma_list, help="exact seeds, comma-separated (instead of --seeds)")
    p.add_argument("--method", help="row label in the paper table (default: from the source, e.g. "
                                    "'HTNet (best found)', 'HTNet (paper config)', 'STSTNet'; with what --set "
                                    "changed, e.g. 'HTNet (paper config, epochs=1)')")
    add_sets(p, "change a LOSO config key, e.g. device=cpu")
    p.add_argument("--data", help="release folder (default: the search's data, else the synthetic set)")
    p.add_argument("--fold-storage", metavar="URI", help="where each seed keeps its finished folds until MLflow has "
                   "its result: a folder or s3://bucket/prefix (default: STORAGE/reruns); on a cluster one every node "
                   "reaches, so that a seed retried on another node goes on from there")
    add_shared(p, "the synthetic data cache and of the seeds' finished folds (reruns/)", per="seed")

    p = commands.add_parser("paper-table", help="the paper's table from MLflow reruns (Markdown, LaTeX)")
    p.add_argument("--out", help="folder for paper_table.md, .tex and .csv")
    p.add_argument("--interval", choices=["std", "ci95", "none"], default="std",
                   help="beside each mean (from 3 seeds on): std over seeds (default), the 95%% bootstrap "
                        "interval over seeds and subjects, or nothing")
    p.add_argument("--rerun", "--method", dest="rerun", action="append", default=[], metavar="METHOD=RUN_ID",
                   help="row METHOD from this rerun/nested parent run (repeatable; names every row; default: per "
                        "method, the finished run on the published data with the most seeds, newest first)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="also rows on other data than the published rows' (synthetic, fewer subjects), marked")
    p.add_argument("--no-nested", action="store_true", help="leave out the nested LOSO rows")
    p.add_argument("--no-log", action="store_true", help="do not log the table to MLflow")
    add_shared(p)

    p = commands.add_parser("compare", help="paired per-subject comparison of two runs")
    p.add_argument("run_a", metavar="RUN_A", help="MLflow run id, or a predictions.csv / folder")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--protocol", default="inner", help="protocol of both runs (default: inner)")
    p.add_argument("--protocol-b", help="protocol of RUN_B when it differs (e.g. final for STSTNet)")
    p.add_argument("--dataset", default="full", choices=["full", "smic", "casme2", "samm"])
    p.add_argument("--n-boot", type=at_least(100), default=10_000, help="bootstrap replicates, >= 100 (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations")
    p.add_argument("--csv", help="write the per-subject table")
    p.add_argument("--json", help="write the summary as JSON")
    add_shared(p)

    p = commands.add_parser("nested", help="nested LOSO: the search inside every outer fold (unbiased)")
    p.add_argument("space", help="search space YAML, or the name of one in search/spaces/")
    p.add_argument("--name", help="name of the nested run (default: nested-<date>-<time>)")
    p.add_argument("--method", help="row label in the paper table (default: 'Search + HTNet (nested LOSO)')")
    p.add_argument("--data", help="release folder (default: the space's synthetic set)")
    p.add_argument("--subjects", help="restrict the data first: a count across datasets, or ids")
    p.add_argument("--outer-subjects", help="outer folds to run: a count across datasets, or ids (default: all)")
    add_search_choices(p)
    add_shared(p, "the synthetic data cache", per="fold")

    p = commands.add_parser("plots", help="log a search's Optuna and per-subject plots to its parent run")
    p.add_argument("search", metavar="SEARCH")
    p.add_argument("--optuna-storage", help="the Optuna storage (default: the one the search logged)")
    add_shared(p)
    p = commands.add_parser("local-cluster", help="cluster-local.yaml: the cluster path simulated on this machine")
    p.add_argument("action", choices=["start", "env", "stop", "s3-down", "s3-up"],
                   help="start prints the exports for the driver's shell: eval \"$(python -m search local-cluster "
                        "start)\"; env prints them again; stop ends this cluster's processes only; s3-down and "
                        "s3-up switch its S3 endpoint off and on (an outage rehearsed, the contents kept)")
    p.add_argument("--dir", default="runs/local-cluster", help="its state, logs and MLflow store "
                                                                "(default: runs/local-cluster)")
    p.add_argument("--idle-timeout-minutes", type=at_least(0, float),
                   help="remove idle workers after this long (default: cluster.yaml's)")
    p.add_argument("--max-workers", type=positive_int, help="at most this many workers (default: cluster.yaml's)")
    return parser


def options(cls, args, **values):
    """An options dataclass from the parsed arguments of the same names (None keeps its default)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**given, **values})


def pairs(items, flag):
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def cmd_run(args):
    """run, run --resume and resume. A finished search gets its plots (the driver never imports the reports; their
    libraries' warnings go to the search's log as its own did)."""
    from search.driver import runner
    from search.driver.console import search_console
    from search.reports.leaderboard import open_store
    from search.reports.plots import log_search_plots

    if args.command == "run" and not args.resume:
        summary = runner.run_search(options(runner.Options, args))
    else:
        summary = runner.resume_search(getattr(args, "resume", None) or args.name, storage=args.storage,
                                       address=args.address, num_cpus=args.num_cpus, top=args.top)
    if summary["complete"]:
        manifest = summary["manifest"]
        with search_console(manifest["log"], manifest.get("verbose", 1)):
            try:
                store = open_store(manifest["tracking_uri"], manifest["experiment"])
                log_search_plots(store, summary["name"], manifest["optuna_storage"])
            except Exception as e:  # noqa: BLE001  (plots are a convenience: never fail a finished search)
                print(f"warning: could not log the search's plots: {first_line(e)}")
    return 0 if summary["complete"] else 1


def cmd_status(args):
    from search.driver import runner

    runner.status(args.storage, args.name, args.top)
    return 0


def cmd_leaderboard(args):
    from search.reports.leaderboard import leaderboard, open_store, print_leaderboard, write_exports

    table = leaderboard(open_store(args.tracking_uri, args.experiment), args.searches, protocol=args.protocol,
                        statuses=args.status, params=pairs(args.param, "--param"), top=args.top)
    print_leaderboard(table, run_ids=args.run_ids)
    written = write_exports(table, args.csv, args.markdown, args.latex, full=args.full,
                            caption=f"Leaderboard: {', '.join(args.searches) or 'all searches'}")
    if written:
        print(f"written: {', '.join(map(str, written))}")
    return 0


def cmd_rerun(args):
    from search.reports.rerun import RerunOptions, rerun

    return 0 if len(rerun(options(RerunOptions, args, params=pairs(args.param, "--param")))["summary"]) else 1


def cmd_paper_table(args):
    from search.reports.paper_table import paper_table

    paper_table(args.tracking_uri, args.experiment, picks=pairs(args.rerun, "--rerun") or None,
                interval=args.interval, nested=not args.no_nested, allow_mixed=args.allow_mixed, out_dir=args.out,
                log=not args.no_log)
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
    result = compare(a, b, protocol=args.protocol, protocol_b=args.protocol_b, dataset=args.dataset,
                     n_boot=args.n_boot, seed=args.seed, labels=(label_a, label_b))
    print_comparison(result)
    write_outputs(result, args.csv, args.json)
    return 0


def cmd_nested(args):
    from search.nested import NestedOptions, run_nested

    return 0 if run_nested(options(NestedOptions, args))["metrics"] else 1


def cmd_plots(args):
    from search.reports.leaderboard import open_store
    from search.reports.plots import log_search_plots

    log_search_plots(open_store(args.tracking_uri, args.experiment), args.search, args.optuna_storage)
    return 0


def cmd_local_cluster(args):
    from search.driver import local_cluster

    if args.action == "start":
        state = local_cluster.start(args.dir, args.idle_timeout_minutes, args.max_workers)
        print(f"# local cluster: Ray head {state['env']['RAY_ADDRESS']}, MLflow {state['env']['MLFLOW_TRACKING_URI']}, "
              f"S3 {state['env']['AWS_ENDPOINT_URL']} (bucket {local_cluster.BUCKET}); logs in {state['folder']}",
              file=sys.stderr)
    elif args.action == "stop":
        state = local_cluster.stop(args.dir)
        print(f"local cluster in {state['folder']} stopped", file=sys.stderr)
        return 0
    elif args.action in ("s3-down", "s3-up"):
        state = local_cluster.switch_s3(args.dir, up=args.action == "s3-up")
        print(f"S3 endpoint {state['env']['AWS_ENDPOINT_URL']} {args.action.removeprefix('s3-')}", file=sys.stderr)
        return 0
    print(local_cluster.exports(local_cluster.read_state(args.dir)), end="")
    return 0


COMMANDS = {"run": cmd_run, "resume": cmd_run, "status": cmd_status, "leaderboard": cmd_leaderboard,
            "rerun": cmd_rerun, "paper-table": cmd_paper_table, "compare": cmd_compare, "nested": cmd_nested,
            "plots": cmd_plots, "local-cluster": cmd_local_cluster}


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
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        name = getattr(args, "name", None) or "NAME"
        again = f"resume with `python -m search resume {name}`"
        hint = {"run": again, "resume": again, "rerun": "the same command again goes on from each seed's last "
                "finished fold"}.get(args.command, f"`{args.command}` keeps nothing: run it again")
        print(f"interrupted: {hint}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - an MLflow store that fails is one line, not a traceback
        from search.tracking import mlflow_errors

        if not isinstance(e, mlflow_errors()):
            raise
        print(f"error: MLflow: {first_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
