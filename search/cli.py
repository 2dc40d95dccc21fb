"""python -m search run|resume|status|leaderboard|rerun|paper-table|compare|nested|plots

  run [SPACE]      start a search (default space: search/spaces/demo.yaml, synthetic data)
  run --resume NAME, resume NAME
                   go on with a search whose driver stopped (killed, Ctrl+C, lost head node)
  status [NAME]    list the searches, or one search's trials
  leaderboard, rerun, paper-table, compare, nested, plots
                   the paper table and its evidence, read from MLflow (search/report_cli.py)

Exit codes: 0 done, 1 the search did not finish (resume it; also when MLflow went away mid-search:
its results are kept), 2 bad input, an unreachable or damaged store, or a search that another
process is running (one line on stderr). SIGTERM stops a search as Ctrl+C does.
"""
import argparse
import signal
import sys
import threading

from htnet.errors import ArgumentParser, UserError
from search.space import PRUNERS

OBJECTIVE_HELP = ("inner: the leak-free validation UF1 of the inner protocol (default); paper: the "
                  "test-fold UF1 of the paper protocol (leaks the test subject; tagged on every run)")


def build_parser():
    parser = ArgumentParser(prog="python -m search", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start (or with --resume, resume) a search",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("space", nargs="?", default=None,
                     help="search space YAML, or the name of one in search/spaces/ (default: demo)")
    run.add_argument("--resume", metavar="NAME", help="resume the search NAME instead of starting one")
    run.add_argument("--name", help="search name (default: <space>-<date>-<time>)")
    run.add_argument("--data", help="release folder (default: the built-in synthetic set)")
    run.add_argument("--subjects", help="limit every trial to these subjects: a count taken across "
                                        "datasets, or comma-separated ids (default: all)")
    run.add_argument("--objective", choices=["inner", "paper"], help=OBJECTIVE_HELP)
    run.add_argument("--num-samples", type=int, help="trials (default: the space file's)")
    run.add_argument("--max-concurrent", type=int, dest="max_concurrent_trials",
                     help="trials at once (default: the space file's)")
    run.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the space file's)")
    run.add_argument("--gpus-per-trial", type=float,
                     help="GPUs per trial, fractions allowed: 0.25 packs four trials on a GPU")
    run.add_argument("--sampler", choices=["tpe", "random", "grid"], help="Optuna sampler")
    run.add_argument("--seed", type=int, help="sampler seed")
    run.add_argument("--pruner", choices=PRUNERS,
                     help="Optuna pruner (its arguments come from the space file when the type matches)")
    run.add_argument("--max-failures", type=int, help="retries of a trial whose worker died")
    run.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                     help="hold a LOSO config key fixed, e.g. epochs=5 or model_config.dim=64 (repeatable)")
    run.add_argument("--save-weights", action="store_true", help="log per-subject weights of every finished trial")
    add_common(run)
    run.add_argument("--verbose", type=int, choices=[0, 1, 2], default=1,
                     help="Ray Tune's progress output: 0 silent, 1 trial table (default), 2 every result")
    run.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://HOST:5000 (default: "
                                            "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                                            "working folder)")
    run.add_argument("--experiment", default="htnet", help="MLflow experiment (default: htnet)")
    run.add_argument("--optuna-storage", help="Optuna storage: sqlite:///FILE, an SQLAlchemy URL, or "
                                              "journal:FILE (default: sqlite:///<storage>/optuna.db)")
    run.add_argument("--ray-storage", help="Ray Tune results: a folder or s3://bucket/prefix; a cluster "
                                           "needs storage every node reaches (default: <storage>/ray)")

    resume = commands.add_parser("resume", help="resume a search whose driver stopped",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    resume.add_argument("name")
    add_common(resume)

    status = commands.add_parser("status", help="list searches, or show one search's trials",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("name", nargs="?")
    status.add_argument("--storage", default="runs", help="folder of the search records (default: runs)")
    status.add_argument("--top", type=int, default=10, help="trials shown (default: 10)")

    from search import report_cli
    report_cli.register(commands)  # leaderboard, rerun, nested, paper-table, compare, plots
    return parser


def add_common(p):
    p.add_argument("--storage", default="runs",
                   help="folder for the search records, Ray results, the Optuna study and synthetic "
                        "data (default: runs)")
    p.add_argument("--address", help="'auto' joins the running Ray cluster (ray up / ray start); "
                                     "default: start a local Ray")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--top", type=int, default=10, help="trials in the final table (default: 10)")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def cmd_run(args):
    from search.driver import runner

    if args.resume:
        return cmd_resume(argparse.Namespace(**{**vars(args), "name": args.resume}))
    options = runner.Options(
        space=args.space or str(runner.DEFAULT_SPACE), name=args.name, data=args.data,
        storage=args.storage, ray_storage=args.ray_storage, optuna_storage=args.optuna_storage,
        tracking_uri=args.tracking_uri, experiment=args.experiment, address=args.address,
        num_cpus=args.num_cpus, num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent_trials, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, objective=args.objective, sampler=args.sampler,
        seed=args.seed, pruner=args.pruner, max_failures=args.max_failures, subjects=args.subjects,
        save_weights=args.save_weights, sets=args.sets, top=args.top, verbose=args.verbose)
    return ended(runner.run_search(options))


def cmd_resume(args):
    from search.driver import runner

    return ended(runner.resume_search(args.name, storage=args.storage, address=args.address,
                                      num_cpus=args.num_cpus, top=args.top))


def ended(summary):
    """A finished search gets its plots (the driver never imports the reports); exit code."""
    if summary["complete"]:
        log_plots(summary["manifest"], summary["name"])
    return 0 if summary["complete"] else 1


def log_plots(manifest, name, out=None):
    """Optuna's plots and the best trial's per-subject accuracy, on the search's parent run."""
    from search.reports.leaderboard import open_store
    from search.reports.plots import log_search_plots

    try:
        store = open_store(manifest["tracking_uri"], manifest["experiment"])
        log_search_plots(store, name, manifest["optuna_storage"], out=out)
    except Exception as e:  # noqa: BLE001  (plots are a convenience: never fail a finished search)
        print(f"warning: could not log the search's plots: {str(e).splitlines()[0] if str(e) else e!r}", file=out or sys.stdout)


def cmd_status(args):
    from search.driver import runner

    runner.status(args.storage, args.name, args.top)
    return 0


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
    from search import report_cli
    commands = {"run": cmd_run, "resume": cmd_resume, "status": cmd_status, **report_cli.COMMANDS}
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with `python -m search resume NAME`", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - an MLflow store that fails is one line, not a traceback
        from search.tracking import mlflow_errors

        if not isinstance(e, mlflow_errors()):
            raise
        text = str(e).strip()
        print(f"error: MLflow: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
