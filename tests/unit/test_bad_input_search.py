"""Bad input on the search side: one line `error: ...` naming the file, key or value, exit code 2,
no traceback, no hang, and nothing written (no search record, Optuna study, MLflow store or Ray).

Cases that could hang or eat memory if a guard were missing (YAML alias bombs in --set and rerun
inputs) run in one subprocess, each case under a 20 s watchdog that ends the process; the others run
the CLIs in-process. A space file's own errors (a syntax error, space() raising, a bad value) are
test_search_space.py's; here they go through the CLI.
"""
import json
import os
import subprocess
import sys

import pytest

from search_fixtures import REPO
from test_bad_input import files_under, one_error_line, run_main, space_file

# A YAML list of 9**7 (4.8 million) strings written in one line, through 7 levels of aliases.
BOMB = "[" + ", ".join(
    [f"&a0 [{', '.join(['lol'] * 9)}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]) + "]"
BOMB_LINE = "YAML expands to over 200000 values through its aliases: refusing a possible alias bomb"


# ----------------------------------------------------------------------------- in a subprocess

WATCHED = r"""
import contextlib, faulthandler, io, json, sys, time, traceback
from search.cli import main

for name, argv in json.load(open(sys.argv[1])).items():
    faulthandler.dump_traceback_later(20, exit=True)  # a case that hangs ends the process
    err, started = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, err = "raised", io.StringIO(traceback.format_exc())
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"case": name, "code": code, "err": err.getvalue(),
                      "seconds": time.monotonic() - started}), flush=True)
"""

# name -> (write the input into folder and return the CLI arguments, the expected error line's text)
WATCHED_CASES = {
    "alias bomb in search run --set": (
        lambda d: ["run", space_file(d / "s.py"), "--set", f"model_config.block_repeats={BOMB}"],
        f"--set model_config.block_repeats: {BOMB_LINE}"),
    "alias bomb in search rerun --config": (
        lambda d: ["rerun", "--config", _write(d / "c.yaml", f"model: ststnet\nmodel_config: {{x: {BOMB}}}\n")],
        f"--config {{d}}/c.yaml: {BOMB_LINE}"),
    "alias bomb in search rerun --set": (
        lambda d: ["rerun", "--preset", "ststnet", "--set", f"model_config.x={BOMB}"],
        f"--set model_config.x: {BOMB_LINE}"),
}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """Every WATCHED_CASES case run by the CLI in one subprocess: {name: (result, its folder)}."""
    root = tmp_path_factory.mktemp("watched")
    cases, folders = {}, {}
    for i, (name, (make, _)) in enumerate(WATCHED_CASES.items()):
        folder = root / f"case{i}"
        folder.mkdir()
        store = ["--storage", folder / "runs", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
        args = make(folder)
        args += store + (["--name", "bad"] if args[0] == "run" else [])
        cases[name], folders[name] = [str(a) for a in args], folder
    (root / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, "-c", WATCHED, str(root / "cases.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    results = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    return {name: (results.get(name, {"code": "no result", "err": done.stderr[-3000:]}), folders[name])
            for name in cases}


@pytest.mark.parametrize("case", list(WATCHED_CASES))
def test_costly_or_bombed_input_is_one_line_never_expanded(case, watched):
    result, folder = watched[case]
    assert result["code"] == 2, result
    expected = WATCHED_CASES[case][1].replace("{d}", str(folder))
    assert expected in one_error_line(result["err"]), result["err"]
    # refused by the alias count (BOMB_LINE) before anything is expanded; a hang ends in the watchdog's "no result"
    assert files_under(folder / "runs") == [] and not (folder / "mlflow.db").exists()


# ----------------------------------------------------------------------------- in-process

def yaml_file(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# name -> (space_file's keyword arguments, or the file's text or bytes; extra flags; message)
RUN_CASES = {
    "epochs 1.0": ({"fixed": {"model": "ststnet", "epochs": 1.0}}, [], "s.py: fixed.epochs: epochs must be an integer, got 1.0"),
    "batch_size 32.0 in a choice": ({"space": {"batch_size": {"choice": [16, 32.0]}}}, [],
                                    "s.py: space() -> batch_size: batch_size must be an integer, got 32.0"),
    "lr nan": ("fixed = {'model': 'ststnet', 'lr': float('nan')}\n\ndef space(trial):\n    return {}\n", [],
               "s.py: fixed.lr: lr must be a positive finite number, got nan"),
    "a float range of an integer key": ({"space": {"epochs": {"low": 1.5, "high": 4.0}}}, [],
                                        "s.py: space() -> epochs: epochs must be an integer, got "),
    "range end out of range": ({"space": {"epochs": {"low": 0, "high": 2}}}, [],
                               "s.py: space() -> epochs: epochs must be a positive integer, got 0"),
    "an unknown key returned": ({"space": {"learning_rate": {"low": 0.1, "high": 1.0}}}, [],
                                "s.py: space() -> learning_rate: unknown LOSO config key 'learning_rate'"),
    "num_samples 2.0": ({"num_samples": 2.0}, [], "s.py: num_samples: expected an integer >= 1, got 2.0"),
    "max_concurrent_trials true": ({"max_concurrent_trials": True}, [],
                                   "s.py: max_concurrent_trials: expected an integer >= 1, got True"),
    "resources cpu 0": ({"resources": {"cpu": 0}}, [], "s.py: resources.cpu: expected a number > 0, got 0"),
    "space file not UTF-8": (b"num_samples = 2\ndescription = 'caf\xe9'\n", [],
                             "s.py: not UTF-8 text (byte 0xe9 at offset 34)"),
    "space file not Python": ("space:\n  lr: {low: 1.0}\n", [], "s.py: loading it raised SyntaxError: "),
    "space() raises": ("def space(trial):\n    return {'lr': 1 / 0}\n", [],
                       "s.py, line 2 (return {'lr': 1 / 0}): space() raised ZeroDivisionError: division by zero"),
    "--set epochs=1.0": ({}, ["--set", "epochs=1.0"], "--set epochs: epochs must be an integer, got 1.0"),
    "--set batch_size=32.0": ({}, ["--set", "batch_size=32.0"], "--set batch_size: batch_size must be an integer, got 32.0"),
    "--set weight_decay=.nan": ({}, ["--set", "weight_decay=.nan"], "--set weight_decay: weight_decay must be a non-negative finite number, got nan"),
    "--set seed=true": ({}, ["--set", "seed=true"], "--set seed: seed must be an integer, got True"),
    "--set of a sampled key": ({}, ["--set", "lr=0.1"], "--set lr: space() in "),
    "--set without a value": ({}, ["--set", "lr"], "--set 'lr': expected KEY=VALUE"),
    "a dropout the model refuses": ({"sampler": {"type": "grid"}, "space": {"model_config.dropout": {"choice": [0.1, 1.5]}}},
                                    [], "s.py: model_config.dropout=1.5: ststnet: dropout must be a number in [0, 1), got 1.5"),
}


def test_lr_written_1e_4_is_the_same_float_for_train_and_search(tmp_path):
    """YAML 1.1 reads `lr: 1e-4` (no dot) as text. `htnet train --config` (LosoConfig) converts it; `search --set`
    checks values by LosoConfig's rules, so it accepts and converts it the same way (a space file is Python: 1e-4)."""
    from htnet.io import read_yaml
    from htnet.loso import LosoConfig
    from search.space import load_space, with_settings

    config = yaml_file(tmp_path / "c.yaml", "model: ststnet\nlr: 1e-4\n")
    assert read_yaml(config)["lr"] == "1e-4"
    trained = LosoConfig.from_dict(read_yaml(config)).lr
    space = with_settings(load_space(space_file(tmp_path / "s.py", space={"batch_size": {"choice": [16]}})), ["lr=1e-4"])
    set_lr = space.config({"batch_size": 16}).lr
    assert trained == set_lr == 1e-4 and isinstance(trained, float) and isinstance(set_lr, float)


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_numbers_and_files_of_search_run(case, tmp_path, capsys):
    content, flags, message = RUN_CASES[case]
    path = tmp_path / "s.py"
    if isinstance(content, dict):
        space_file(path, **content)
    else:
        yaml_file(path, content)
    runs = tmp_path / "runs"
    code, _, err = run_main("search", ["run", path, "--name", "bad", "--storage", runs,
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *flags], capsys)
    assert code == 2 and message in one_error_line(err), err
    assert files_under(runs) == [] and not (tmp_path / "mlflow.db").exists()


# name -> (config file text, or None for --preset ststnet; --set flags; message)
RERUN_CASES = {
    "config epochs 1.0": ("model: ststnet\nepochs: 1.0\n", [], "--config {d}/c.yaml: epochs: epochs must be an integer, got 1.0"),
    "config lr .nan": ("model: ststnet\nlr: .nan\n", [], "--config {d}/c.yaml: lr: lr must be a positive finite number, got nan"),
    "config model_config inf": ("model: ststnet\nmodel_config: {dropout: .inf}\n", [],
                                "--config {d}/c.yaml: model_config.dropout: expected a finite number, got inf"),
    "config not UTF-8": (b"model: st\xffstnet\n", [], "--config {d}/c.yaml: not UTF-8 text"),
    "config not a mapping": ("[1, 2]\n", [], "--config {d}/c.yaml: expected a mapping of LOSO config keys"),
    "config missing": ("(missing)", [], "--config {d}/nope.yaml: no such file"),
    "--set epochs=1.0": (None, ["--set", "epochs=1.0"], "--set epochs: epochs must be an integer, got 1.0"),
    "--set lr=.inf": (None, ["--set", "lr=.inf"], "--set lr: lr must be a positive finite number, got inf"),
    "--set fixes the file": ("model: ststnet\nepochs: 1.0\n", ["--set", "epochs=0"],
                             "epochs must be a positive integer, got 0"),  # the file's 1.0 is overridden
    "--seed-list not integers": (None, ["--seed-list", "1,x"], "--seed-list: expected comma-separated integers"),
}


@pytest.mark.parametrize("case", list(RERUN_CASES))
def test_bad_numbers_and_files_of_search_rerun(case, tmp_path, capsys):
    text, flags, message = RERUN_CASES[case]
    if text is None:
        source = ["--preset", "ststnet"]
    elif text == "(missing)":
        source = ["--config", tmp_path / "nope.yaml"]
    else:
        source = ["--config", yaml_file(tmp_path / "c.yaml", text)]
    runs = tmp_path / "runs"
    code, _, err = run_main("search", ["rerun", *source, *flags, "--storage", runs,
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capsys)
    assert code == 2 and message.replace("{d}", str(tmp_path)) in one_error_line(err), err
    assert files_under(runs) == [] and not (tmp_path / "mlflow.db").exists()


def test_yaml_read_back_from_mlflow_is_refused_quickly(tmp_path, capsys):
    """A run's config.yaml and params (rerun --run-id) go through htnet.io's YAML limits: a bomb is refused by its
    alias count (BOMB_LINE), never expanded."""
    from search.reports.leaderboard import open_store

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", create=True)
    client = store.client
    trial = client.create_run(store.experiment_id, tags={"htnet.role": "trial"})
    client.log_text(trial.info.run_id, f"model: ststnet\nmodel_config: {{x: {BOMB}}}\n", "config.yaml")
    by_params = client.create_run(store.experiment_id, tags={"htnet.role": "trial"})
    client.log_param(by_params.info.run_id, "model", "ststnet")
    client.log_param(by_params.info.run_id, "model_config.x", BOMB)

    for run, where in ((trial, "config.yaml"), (by_params, "param model_config.x")):
        code, _, err = run_main("search", ["rerun", "--run-id", run.info.run_id, "--storage", tmp_path / "runs",
                                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capsys)
        assert code == 2 and f"run {run.info.run_id}: {where}: {BOMB_LINE}" in one_error_line(err), err
    assert len(client.search_runs([store.experiment_id])) == 2  # no rerun run was created
    assert files_under(tmp_path / "runs") == []


def test_pruning_benchmark_refuses_a_bombed_pruner_spec():
    import argparse

    from benchmarks.pruning_efficiency import yaml_mapping

    with pytest.raises(argparse.ArgumentTypeError, match="--pruner-spec: YAML expands to over"):
        yaml_mapping(f"{{type: median, extra: {BOMB}}}")
    with pytest.raises(argparse.ArgumentTypeError, match="--pruner-spec: line 1: not valid YAML"):
        yaml_mapping("{type: [")
    assert yaml_mapping("{type: median, n_startup_trials: 2}") == {"type": "median", "n_startup_trials": 2}


# ----------------------------------------------------------------------------- inside a trial

def test_config_error_of_a_sampled_combination_is_one_user_error(tmp_path):
    """What rejects a sampled combination inside a trial (LosoConfig, the model; with a UserError or with a TypeError)
    becomes one UserError naming the file and the values: the trainable reports the trial failed, Ray does not retry
    it. (A combination the start-up check draws stops the search before it starts: RUN_CASES.)"""
    from htnet.errors import UserError
    from search.space import load_space, trial_config

    space = load_space(space_file(tmp_path / "t.py", space={"model_config.dropout": {"choice": [0.1, 1.5]}}))
    assert trial_config(space, {"model_config.dropout": 0.1}).model_config == {"dropout": 0.1}
    with pytest.raises(UserError, match=r"t.py: model_config.dropout=1.5: ststnet: dropout must be a number in "
                                        r"\[0, 1\), got 1.5$"):
        trial_config(space, {"model_config.dropout": 1.5})  # the model only knows its own
    with pytest.raises(UserError, match=r"t.py: model_config.dropout=\[0.1\]: ") as info:  # whatever it raises
        trial_config(space, {"model_config": {"dropout": [0.1]}})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, hint", [
    (["run", "space.py", "--name", "s1"], "resume with `python -m search resume s1`"),
    (["resume", "s1"], "resume with `python -m search resume s1`"),
    (["rerun", "--preset", "ststnet"], "the same command again goes on from each seed's last finished fold"),
    (["compare", "a", "b"], "`compare` keeps nothing: run it again")])
def test_ctrl_c_says_how_to_go_on_for_that_command(argv, hint, monkeypatch, capsys):
    """Ctrl+C (a KeyboardInterrupt out of the command) is exit 130 and one line saying how to go on; a rerun is
    not told to `search resume` (as it was on the cpu-study): run again, it continues its seeds' folds."""
    from search import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, argv[0], interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: {hint}"


@pytest.mark.slow   # a CLI process each: the variable is read when search.trainable is imported
@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_bad_storage_wait_is_one_line_before_anything_is_recorded(tmp_path, value):
    """HTNET_STORAGE_WAIT_S is parsed where it is read (search.trainable, imported when `run` starts): garbage is
    one line naming the variable, exit 2, and no search record, Ray folder or MLflow store is written."""
    space = space_file(tmp_path / "s.py")
    done = subprocess.run([sys.executable, "-m", "search", "run", str(space), "--storage", str(tmp_path / "runs"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--name", "bad"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HTNET_STORAGE_WAIT_S": value})
    assert done.returncode == 2, done.stderr[-2000:]
    assert one_error_line(done.stderr) == \
        f"error: environment variable HTNET_STORAGE_WAIT_S={value!r} must be a number of seconds >= 0"
    assert files_under(tmp_path / "runs") == [] and not (tmp_path / "mlflow.db").exists()
