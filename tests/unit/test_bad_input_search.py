"""Bad input on the search side: one line `error: ...` naming the file, key or value, exit code 2,
no traceback, no hang, and nothing written (no search record, Optuna study, MLflow store or Ray).

Cases that could hang or eat memory if a guard were missing (costly condition expressions, YAML
alias bombs) run in one subprocess, each case under a 20 s watchdog that ends the process; the
others run the CLIs in-process. The last test is a tiny real Ray search: a sampled value that
LosoConfig rejects fails its trial once, and the search goes on.
"""
import json
import subprocess
import sys
import time

import pytest

from search_fixtures import REPO, local_ray, optuna_trials, search_options, trial_runs, write_space  # noqa: F401
from test_bad_input import files_under, one_error_line, run_main, space_file

# A YAML list of 9**7 (4.8 million) strings written in one line, through 7 levels of aliases.
BOMB = "[" + ", ".join(
    [f"&a0 [{', '.join(['lol'] * 9)}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]) + "]"
BOMB_LINE = "YAML expands to over 200000 values through its aliases: refusing a possible alias bomb"


def condition_space(path, condition=None, when=None):
    """A valid tiny space, plus one condition (on batch_size) or one `when` (on lr)."""
    space = {"batch_size": {"choice": [16, 32]}, "lr": {"low": 1.0e-3, "high": 1.0e-2}}
    if when is not None:
        space["lr"]["when"] = when
    return space_file(path, space=space, conditions=[condition] if condition else [])


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
    "huge modulus (integer base grows)": (
        lambda d: ["run", condition_space(d / "s.yaml", "batch_size % (((10**64)**64)**64) == 0")],
        "s.yaml: conditions[0]: expression too costly (integer result over 128 bits)"),
    "huge power of a sampled value in a when": (
        lambda d: ["run", condition_space(d / "s.yaml", when="batch_size ** 100000 > 1")],
        "s.yaml: space.lr.when: expression too costly (integer result over 128 bits)"),
    "string repetition": (
        lambda d: ["run", condition_space(d / "s.yaml", "'a' * 10**9 != 'b' or batch_size > 0")],
        "s.yaml: conditions[0]: expression too costly (string result over 256 characters)"),
    "list repetition, nested": (
        lambda d: ["run", condition_space(d / "s.yaml", "[[[batch_size] * 30] * 30] * 30 != []")],
        "s.yaml: conditions[0]: expression too costly (list result over 1000 values)"),
    "string formatting": (
        lambda d: ["run", condition_space(d / "s.yaml", "'%0999999999d' % batch_size != ''")],
        "s.yaml: conditions[0]: \"'%0999999999d' % batch_size != ''\" failed: unsupported operand types str and int"),
    "deep unary chain": (
        lambda d: ["run", condition_space(d / "s.yaml", "- " * 400 + "batch_size < 0")],
        "s.yaml: conditions[0]: expression too costly (nested over 32 deep)"),
    "thousands of unary minus": (
        lambda d: ["run", condition_space(d / "s.yaml", "- " * 5000 + "batch_size < 0")],
        "s.yaml: conditions[0]: expression too long (10014 characters, limit 1000)"),
    "deeply nested parentheses": (
        lambda d: ["run", condition_space(d / "s.yaml", "(" * 300 + "batch_size" + ")" * 300 + " > 0")],
        "s.yaml: conditions[0]: cannot parse expression"),
    "too many nodes": (
        lambda d: ["run", condition_space(d / "s.yaml", "batch_size in [" + "1, " * 300 + "]")],
        "s.yaml: conditions[0]: expression too costly (over 200 nodes)"),
    "division by zero": (
        lambda d: ["run", condition_space(d / "s.yaml", "batch_size % (batch_size - 16) == 0")],
        "s.yaml: conditions[0]: 'batch_size % (batch_size - 16) == 0' failed: integer modulo by zero"),
    "division by zero in a when": (
        lambda d: ["run", condition_space(d / "s.yaml", when="1 / 0 > batch_size")],
        "s.yaml: space.lr.when: '1 / 0 > batch_size' failed: division by zero"),
    "type error": (
        lambda d: ["run", condition_space(d / "s.yaml", "batch_size + 'px' == 1")],
        "failed: unsupported operand type(s) for +: 'int' and 'str'"),
    "float overflow": (
        lambda d: ["run", condition_space(d / "s.yaml", "2.0 ** (batch_size * 1000) > 1")],
        "s.yaml: conditions[0]: '2.0 ** (batch_size * 1000) > 1' failed: (34, 'Numerical result out of range')"),
    "alias bomb in a space file": (
        lambda d: ["run", _write(d / "s.yaml", f"num_samples: 2\nfixed:\n  model_config.block_repeats: {BOMB}\n")],
        f"s.yaml: {BOMB_LINE}"),
    "alias bomb in search run --set": (
        lambda d: ["run", space_file(d / "s.yaml"), "--set", f"model_config.block_repeats={BOMB}"],
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
def test_costly_or_bombed_input_is_one_line_in_seconds(case, watched):
    result, folder = watched[case]
    assert result["code"] == 2, result
    expected = WATCHED_CASES[case][1].replace("{d}", str(folder))
    assert expected in one_error_line(result["err"]), result["err"]
    assert result["seconds"] < 10, result
    assert files_under(folder / "runs") == [] and not (folder / "mlflow.db").exists()


# ----------------------------------------------------------------------------- in-process

def yaml_file(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


NAN, INF = float("nan"), float("inf")
# name -> (space file content (space_file's keyword arguments) or raw text/bytes, extra flags, message)
RUN_CASES = {
    "epochs 1.0": ({"fixed": {"model": "ststnet", "epochs": 1.0}}, [], "s.yaml: fixed.epochs: epochs must be an integer, got 1.0"),
    "batch_size 32.0 in a choice": ({"space": {"batch_size": {"choice": [16, 32.0]}}}, [],
                                    "s.yaml: space.batch_size: batch_size must be an integer, got 32.0"),
    "lr .nan": ({"fixed": {"model": "ststnet", "epochs": 1, "lr": NAN}, "space": {"batch_size": {"choice": [16]}}}, [],
                "s.yaml: fixed.lr: lr must be a positive finite number, got nan"),
    "lr .inf": ({"fixed": {"model": "ststnet", "epochs": 1, "lr": INF}, "space": {"batch_size": {"choice": [16]}}}, [],
                "s.yaml: fixed.lr: lr must be a positive finite number, got inf"),
    "range bound nan": ({"space": {"lr": {"low": NAN, "high": 0.1}}}, [], "s.yaml: space.lr.low: expected a finite number, got nan"),
    "range bound inf": ({"space": {"lr": {"low": 0.001, "high": INF, "log": True}}}, [],
                        "s.yaml: space.lr.high: expected a finite number, got inf"),
    "range bound nan as text": ({"space": {"lr": {"low": 0.001, "high": "nan"}}}, [],
                                "s.yaml: space.lr.high: expected a finite number, got 'nan'"),
    "integer key with a fractional bound": ({"fixed": {"model": "ststnet"}, "space": {"epochs": {"low": 1.5, "high": 4}}}, [],
                                            "s.yaml: space.epochs.low: epochs must be an integer, got 1.5"),
    "int range with float bounds": ({"space": {"model_config.dropout": {"low": 1.0, "high": 2.0, "type": "int"}}}, [],
                                    "s.yaml: space.model_config.dropout.low: expected an integer, got 1.0"),
    "integer key as a float range": ({"fixed": {"model": "ststnet"},
                                      "space": {"epochs": {"low": 1, "high": 4, "type": "float"}}}, [],
                                     "s.yaml: space.epochs.type: epochs takes integers, not a float range"),
    "choice with nan": ({"space": {"lr": {"choice": [0.01, NAN]}}}, [], "s.yaml: space.lr: lr must be a positive finite number, got nan"),
    "num_samples 2.0": ({"num_samples": 2.0}, [], "s.yaml: num_samples: expected an integer >= 1, got 2.0"),
    "max_concurrent_trials true": ({"max_concurrent_trials": True}, [],
                                   "s.yaml: max_concurrent_trials: expected an integer >= 1, got True"),
    "resources cpu nan": ({"resources": {"cpu": NAN}}, [], "s.yaml: resources.cpu: expected a finite number, got nan"),
    "sampler seed 1.5": ({"sampler": {"type": "tpe", "seed": 1.5}}, [], "s.yaml: sampler.seed: expected an integer or null, got 1.5"),
    "pruner threshold nan": ({"pruner": {"type": "wilcoxon", "p_threshold": NAN}}, [],
                             "s.yaml: pruner.p_threshold: expected a number, got nan"),
    "space file not UTF-8": (b"num_samples: 2\ndescription: caf\xe9\n", [], "s.yaml: not UTF-8 text (byte 0xe9 at offset 31)"),
    "space file not YAML": ("space:\n  lr: {low: 1.0, high: [\n", [], "s.yaml: line 3: not valid YAML"),
    "space file not a mapping": ("- lr\n- epochs\n", [], "s.yaml: expected a mapping at the top level, got list"),
    "--set epochs=1.0": ({}, ["--set", "epochs=1.0"], "--set epochs: epochs must be an integer, got 1.0"),
    "--set batch_size=32.0": ({}, ["--set", "batch_size=32.0"], "--set batch_size: batch_size must be an integer, got 32.0"),
    "--set weight_decay=.nan": ({}, ["--set", "weight_decay=.nan"], "--set weight_decay: weight_decay must be a non-negative finite number, got nan"),
    "--set seed=true": ({}, ["--set", "seed=true"], "--set seed: seed must be an integer, got True"),
    "range end out of range": ({"fixed": {"model": "ststnet"}, "space": {"epochs": {"low": 0, "high": 2}}}, [],
                               "s.yaml: space.epochs.low: epochs must be a positive integer, got 0"),
}


def test_lr_written_1e_4_is_the_same_float_for_train_and_search(tmp_path):
    """YAML 1.1 reads `lr: 1e-4` (no dot) as text. `htnet train --config` (LosoConfig) converts it; a space
    file and `search --set` check values by LosoConfig's rules, so they accept and convert it the same way."""
    from htnet.io import read_yaml
    from htnet.loso import LosoConfig
    from search.space import parse_space, set_fixed

    config = yaml_file(tmp_path / "c.yaml", "model: ststnet\nlr: 1e-4\n")
    assert read_yaml(config)["lr"] == "1e-4"
    trained = LosoConfig.from_dict(read_yaml(config)).lr
    base = {"fixed": {"model": "ststnet", "epochs": 1}, "space": {"batch_size": {"choice": [16]}}}
    space_file_lr = parse_space({**base, "fixed": {**base["fixed"], **read_yaml(config)}}, "s.yaml").resolve({})["lr"]
    set_lr = set_fixed(parse_space(base, "s.yaml"), ["lr=1e-4"]).resolve({})["lr"]
    choice = parse_space({**base, "space": {"lr": {"choice": [read_yaml(config)["lr"], 1.0e-3]}}}, "s.yaml")
    assert trained == space_file_lr == set_lr == choice.params[0].choices[0] == 1e-4
    assert all(isinstance(v, float) for v in (trained, space_file_lr, set_lr, choice.params[0].choices[0]))


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_numbers_and_files_of_search_run(case, tmp_path, capsys):
    content, flags, message = RUN_CASES[case]
    path = tmp_path / "s.yaml"
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
    """A search's space.yaml artifact (leaderboard) and a run's config.yaml and params (rerun
    --run-id) go through the same limits: a bomb is refused in seconds, never expanded."""
    from search.reports.leaderboard import open_store, searched_names

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", create=True)
    client = store.client
    parent = client.create_run(store.experiment_id, tags={"htnet.role": "search", "htnet.search": "s"})
    client.log_text(parent.info.run_id, f"space: {BOMB}\n", "space.yaml")
    good = client.create_run(store.experiment_id, tags={"htnet.role": "search", "htnet.search": "g"})
    client.log_text(good.info.run_id, "space:\n  lr: {low: 0.1, high: 1.0}\n", "space.yaml")
    trial = client.create_run(store.experiment_id, tags={"htnet.role": "trial"})
    client.log_text(trial.info.run_id, f"model: ststnet\nmodel_config: {{x: {BOMB}}}\n", "config.yaml")
    by_params = client.create_run(store.experiment_id, tags={"htnet.role": "trial"})
    client.log_param(by_params.info.run_id, "model", "ststnet")
    client.log_param(by_params.info.run_id, "model_config.x", BOMB)

    started = time.monotonic()
    assert searched_names(store, client.get_run(parent.info.run_id)) is None  # falls back to what varies
    assert searched_names(store, client.get_run(good.info.run_id)) == ["lr"]
    for run, where in ((trial, "config.yaml"), (by_params, "param model_config.x")):
        code, _, err = run_main("search", ["rerun", "--run-id", run.info.run_id, "--storage", tmp_path / "runs",
                                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capsys)
        assert code == 2 and f"run {run.info.run_id}: {where}: {BOMB_LINE}" in one_error_line(err), err
    assert time.monotonic() - started < 30
    assert len(client.search_runs([store.experiment_id])) == 4  # no rerun run was created
    assert files_under(tmp_path / "runs") == []


def test_pruning_benchmark_refuses_a_bombed_pruner_spec():
    import argparse

    from benchmarks.pruning_efficiency import yaml_mapping

    started = time.monotonic()
    with pytest.raises(argparse.ArgumentTypeError, match="--pruner-spec: YAML expands to over"):
        yaml_mapping(f"{{type: median, extra: {BOMB}}}")
    with pytest.raises(argparse.ArgumentTypeError, match="--pruner-spec: line 1: not valid YAML"):
        yaml_mapping("{type: [")
    assert yaml_mapping("{type: median, n_startup_trials: 2}") == {"type": "median", "n_startup_trials": 2}
    assert time.monotonic() - started < 5


# ----------------------------------------------------------------------------- inside a trial

def test_config_error_of_a_sampled_combination_is_one_user_error():
    """What rejects a sampled combination inside a trial (LosoConfig, the model; with a UserError or
    with a TypeError) becomes one UserError: the trainable reports the trial failed, Ray does not
    retry it."""
    from htnet.errors import UserError
    from search.space import parse_space
    from search.space import trial_config

    raw = {"fixed": {"model": "ststnet", "epochs": 1},
           "space": {"optimizer": {"choice": ["adam", "bogus"]}, "model_config.dropout": {"choice": [0.1, 1.5]}}}
    with pytest.raises(UserError, match="t.yaml: space.optimizer: unknown optimizer 'bogus'"):  # LosoConfig, at load
        parse_space(raw, "t.yaml")
    space = parse_space({**raw, "space": {**raw["space"], "optimizer": {"choice": ["adam"]}}}, "t.yaml")
    assert trial_config(space, {"optimizer": "adam", "model_config.dropout": 0.1}).optimizer == "adam"
    with pytest.raises(UserError, match=r"ststnet: dropout must be a number in \[0, 1\), got 1.5") as info:
        trial_config(space, {"optimizer": "adam", "model_config.dropout": 1.5})  # the model only knows its own
    assert "\n" not in str(info.value)
    with pytest.raises(UserError) as info:  # a value the model cannot take, whatever it raises
        trial_config(space, {"optimizer": "adam", "model_config.dropout": [0.1]})
    assert "\n" not in str(info.value)


@pytest.mark.slow  # a real Ray search
def test_a_trial_losoconfig_rejects_fails_once_and_the_search_goes_on(local_ray, tmp_path):
    """Grid of 2 (STSTNet dropout 0.1 | 1.5), 1 epoch, max_failures 2: the model refuses 1.5 inside its
    trial (LosoConfig builds it), which is FAILED once (Optuna FAIL, its error recorded), not retried; the
    other finishes."""
    from search.driver import runner

    space = write_space(tmp_path / "s.yaml", sampler={"type": "grid"}, max_failures=2,
                        fixed={"epochs": 1, "batch_size": 32},
                        space={"model_config.dropout": {"choice": [0.1, 1.5]}})
    options = search_options(tmp_path, space, "opt")
    summary = runner.run_search(options)
    assert summary["complete"] and summary["counts"] == {"finished": 1, "failed": 1}
    runs = trial_runs(options.tracking_uri, "opt")
    assert len(runs) == 2 and all(r.data.tags["htnet.attempt"] == "1" for r in runs)
    failed = next(r for r in runs if r.data.params["model_config.dropout"] == "1.5")
    assert failed.info.status == "FAILED" and "dropout must be a number in [0, 1)" in failed.data.tags["htnet.error"]
    trials = optuna_trials(tmp_path / "runs", "opt")
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    assert any("dropout must be a number in [0, 1)" in t.user_attrs.get("error", "") for t in trials)


@pytest.mark.parametrize("argv, hint", [
    (["run", "space.yaml", "--name", "s1"], "resume with `python -m search resume s1`"),
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
