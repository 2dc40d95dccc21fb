"""Bad input at the command line: one line `error: ...` naming the file, key or value, exit code 2
(1 for a diverged training), and nothing half-written.

The CLIs run in-process (`htnet.cli.main([...])`, `search.cli.main([...])`), on real files; none of
these cases gets as far as starting Ray. Library-level checks of the same inputs live in
test_data.py, test_loso.py, test_models.py and test_search_space.py; test_cli.py runs
`python -m htnet` in a subprocess for: missing data folder, impossible model config, epochs 0,
unknown protocol, missing weights folder, unwritable output folder (not repeated here).
"""
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from htnet.models import create_model
from release_edits import RELEASE_CASES, fold_lacks_class, one_sample_subject
from search_fixtures import free_port, run_main, write_space

TRAIN = ["--model", "ststnet", "--epochs", "1", "--batch-size", "32", "--protocols", "final", "--device", "cpu"]


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def files_under(folder):
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----------------------------------------------------------------------------- broken releases

@pytest.mark.parametrize("case", ["missing column", "subject with one sample (minimum asked)", "fold lacks a class"])
def test_broken_release_at_the_command_line(case, release, tmp_path, capsys):
    """`htnet train` and `search run` on the same broken release: one line, exit 2, nothing written (every case is
    checked where it is raised: test_data.py, test_loso.py)."""
    breakage, options, message = RELEASE_CASES.get(case) or (fold_lacks_class, {}, "fold sub01: training set lacks "
                                                                                  "class 2 (surprise)")
    breakage(release)
    flags = [f for key, value in options.items() for f in (f"--{key.replace('_', '-')}", str(value))]
    out = tmp_path / "out"
    code, _, err = run_main("htnet", ["train", "--data", release, *flags, *TRAIN, "--out", out], capsys)
    assert code == 2 and message in one_error_line(err), err
    assert files_under(out) == []
    if flags:  # --min-samples-per-subject is a `htnet train` flag only
        return
    runs = tmp_path / "runs"
    code, _, err = run_main("search", ["run", "--data", release, "--storage", runs, "--name", "bad",
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capsys)
    assert code == 2 and message in one_error_line(err), err
    assert files_under(runs) == [] and not (tmp_path / "mlflow.db").exists()


def test_subject_with_one_sample_is_trained_with_one_warning_line(release, tmp_path, capsys):
    """The real release has 8 such subjects: accepted, and named in one warning line."""
    one_sample_subject(release)
    code, out, err = run_main("htnet", ["train", "--data", release, *TRAIN, "--subjects", "008,sub01,s01",
                                        "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 subject(s) with a single sample (008): each fold tests one sample "
                        "(--min-samples-per-subject 2 makes this an error)"], err
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"subject": str})
    assert (predictions["subject"] == "008").sum() == 1


# ----------------------------------------------------------------------------- models, configs, weights

def test_model_and_config_errors_of_htnet_train(synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    config, ststnet = tmp_path / "config.yaml", tmp_path / "ststnet.yaml"
    config.write_text(yaml.safe_dump({"model": "resnet", "epochs": 1}))
    # the config file's model is the one checked (--model has no default to override it)
    ststnet.write_text(yaml.safe_dump({"model": "ststnet", "model_config": {"dim": 8}, "epochs": 1}))
    cases = [
        (["train", "--data", synth_root, "--model", "resnet", "--out", out],
         "error: python -m htnet train: argument --model: invalid choice: 'resnet'"),
        (["train", "--data", synth_root, "--config", config, "--out", out], "unknown model 'resnet'"),
        (["train", "--data", synth_root, "--config", ststnet, "--out", out], "model ststnet has no argument 'dim'"),
        (["train", "--data", synth_root, "--model", "htnet", "--model-arg", "heads=300", "--out", out],
         "heads 300 exceeds dim 256"),
        (["train", "--data", synth_root, *TRAIN, "--epochs", "-2", "--out", out], "epochs must be a positive integer, got -2"),
        (["train", "--data", synth_root, *TRAIN, "--protocols", "final,latest", "--out", out], "unknown protocol 'latest'"),
    ]
    for args, message in cases:
        code, _, err = run_main("htnet", args, capsys)
        assert code == 2 and message in one_error_line(err), (args, err)
    assert files_under(out) == []


def test_weights_folder_missing_a_subject_or_of_another_architecture(synth_root, tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    subjects = ["sub01", "s01", "006"]
    for subject in subjects:  # real files, as `train --save-weights` writes them
        torch.save(create_model("ststnet").state_dict(), weights / f"{subject}.pth")
    common = ["evaluate", "--data", synth_root, "--subjects", ",".join(subjects), "--weights", weights,
              "--device", "cpu", "--out", tmp_path / "eval"]
    code, _, err = run_main("htnet", [*common, "--model", "ststnet"], capsys)
    assert code == 0, err
    code, _, err = run_main("htnet", [*common, "--model", "htnet", "--model-arg", "dim=16",
                                      "--model-arg", "heads=2"], capsys)
    assert code == 2 and "sub01.pth: not weights of model htnet with this config" in one_error_line(err)
    (weights / "s01.pth").unlink()
    code, _, err = run_main("htnet", [*common, "--model", "ststnet"], capsys)
    assert code == 2 and f"weights folder {weights} has no s01.pth for subject 's01'" in one_error_line(err)


def test_diverging_training_exits_1_with_one_line(synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main("htnet", ["train", "--data", synth_root, *TRAIN, "--optimizer", "sgd", "--lr", "1e12",
                                      "--epochs", "3", "--subjects", "2", "--out", out], capsys)
    # progress bars share stderr: split at carriage returns, drop cursor moves
    segments = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err))
    errors = [s.strip() for s in segments if s.strip().startswith("error:")]
    assert code == 1 and len(errors) == 1 and "training failed: training loss is" in errors[0], err
    assert files_under(out) == ["config.yaml"]   # the run's start (resumable), no result of a failed run


# ----------------------------------------------------------------------------- search settings

def space_file(path, **content):
    """A tiny space file (write_space): STSTNet, 1 epoch, 1 synthetic subject per dataset."""
    return write_space(path, **{"data": {"synthetic_subjects": 1}, "fixed": {"epochs": 1},
                                "space": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}, **content})


def test_bad_search_settings_are_one_line_and_exit_2(tmp_path, capsys):
    """Every case stops before anything is written: no search record, no Optuna study, no MLflow
    store, no Ray."""
    good = space_file(tmp_path / "good.py")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    runs = tmp_path / "runs"
    cases = {
        "unknown setting": (space_file(tmp_path / "k.py", trials=3), [], "k.py: unknown setting 'trials'"),
        "empty choice list": (space_file(tmp_path / "c.py", space={"batch_size": {"choice": []}}), [],
                              "c.py, line 14 ('batch_size': trial.suggest_categorical('batch_size', []),): space() raised "
                              "ValueError: The `choices` must contain one or more elements."),
        "low > high": (space_file(tmp_path / "r.py", space={"lr": {"low": 0.1, "high": 0.01}}), [],
                       "r.py, line 14 ('lr': trial.suggest_float('lr', 0.1, 0.01, log=False),): space() raised "
                       "ValueError: `low <= high` must hold, but got (low=0.1, high=0.01)."),
        "unknown model in the space": (
            space_file(tmp_path / "m.py", space={"model": {"choice": ["htnet", "vit"]}}), [],
            "m.py: space() -> model: unknown model 'vit'"),
        "impossible fixed model config": (
            space_file(tmp_path / "i.py", fixed={"model": "htnet", "model_config.patch_size": 5, "epochs": 1}), [],
            "i.py: fixed values: htnet: image_size 28 is not divisible by patch_size 5"),
        "epochs 0 in the file": (space_file(tmp_path / "e.py", fixed={"model": "ststnet", "epochs": 0}), [],
                                 "e.py: fixed.epochs: epochs must be a positive integer, got 0"),
        "epochs 0 by --set": (good, ["--set", "epochs=0"], "--set epochs: epochs must be a positive integer, got 0"),
        "impossible model config by --set": (good, ["--set", "model=htnet", "--set", "model_config.patch_size=5"],
                                             "good.py: fixed and --set values: htnet: image_size 28 is not divisible "
                                             "by patch_size 5"),
        "unknown protocol": (good, ["--set", "protocols=[inner,best]"], "--set protocols: unknown protocol 'best'"),
        "unknown objective": (good, ["--objective", "test"], "argument --objective: invalid choice: 'test'"),
        "missing data folder": (good, ["--data", tmp_path / "nowhere"], f"--data {tmp_path / 'nowhere'}: no such folder"),
        "unwritable output folder": (good, ["--storage", blocker / "runs"], f"output folder {blocker / 'runs'} is not writable"),
        "missing space file": (tmp_path / "nope.py", [], "nope.py: no such file"),
    }
    for case, (space, flags, message) in cases.items():
        code, _, err = run_main("search", ["run", space, "--name", "bad", "--storage", runs,
                                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *flags], capsys)
        assert code == 2 and message in one_error_line(err), (case, err)
        assert files_under(runs) == [] and not (tmp_path / "mlflow.db").exists(), case
    code, _, err = run_main("search", ["resume", "no-such-search", "--storage", runs], capsys)
    assert code == 2 and "no search named 'no-such-search'" in one_error_line(err)


def test_unreachable_tracking_uri_fails_fast_before_any_trial(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    runs = tmp_path / "runs"
    code, _, err = run_main("search", ["run", space_file(tmp_path / "s.py"), "--name", "offline",
                                       "--storage", runs, "--tracking-uri", uri], capsys)
    line = one_error_line(err)
    assert code == 2 and f"MLflow tracking server at {uri} unreachable" in line, err
    assert "--tracking-uri" in line
    assert files_under(runs) == []  # no record, no study, no Ray experiment
