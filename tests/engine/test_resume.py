"""A LOSO run continues from its folder (htnet.checkpoint): only the folds not done train, and the
results equal a run never stopped, for the plain engine and for batched groups (a group done in part
trains again whole). A stop is made real here by keeping only the first k fold records of a finished
run's folder, which is what a run killed after k folds leaves (the SIGKILL tests: tests/e2e)."""
import json
import shutil

import pandas as pd
import pytest

from htnet.checkpoint import FOLDS_DIR, continued_config, prepare_folder
from htnet.errors import UserError
from htnet.loso import LosoConfig, run_loso

from conftest import TINY_STSTNET

CONFIGS = {
    "plain": {**TINY_STSTNET, "epochs": 4, "engine": "plain"},
    # 2 folds (inner + main runs) per group: keeping 3 folds leaves the second group half done
    "batched": {**TINY_STSTNET, "epochs": 4, "engine": "batched", "fold_group_size": 4},
}
SAME = ["predictions.csv", "history.csv", "folds.csv"]


def keep_first_folds(full, folder, k):
    """`folder` as a run killed after its first k folds leaves it: config.yaml and k fold records."""
    folder.mkdir()
    shutil.copy(full / "config.yaml", folder / "config.yaml")
    (folder / FOLDS_DIR).mkdir()
    order = pd.read_csv(full / "folds.csv", dtype={"subject": str})
    for subject in order.subject[:k]:
        shutil.copy(full / FOLDS_DIR / f"{subject}.json", folder / FOLDS_DIR / f"{subject}.json")
    return order


@pytest.mark.parametrize("engine", CONFIGS)
def test_resumed_run_trains_only_missing_folds_and_equals_an_unstopped_run(engine, synth_data, tmp_path):
    config = CONFIGS[engine]
    full = run_loso(config, synth_data, out_dir=tmp_path / "full", progress=False)
    assert full.metrics["attempt"] == 1 and full.metrics["fold_epochs_attempt"] == full.fold_epochs
    order = keep_first_folds(tmp_path / "full", tmp_path / "killed", 3)
    per_fold = {s: json.loads((tmp_path / "full" / FOLDS_DIR / f"{s}.json").read_text())["fold_epochs"]
                for s in order.subject}
    reports = []
    resumed = run_loso(config, synth_data, out_dir=tmp_path / "killed", progress=False, resume=True,
                       callback=lambda progress: reports.append(progress["step"]))

    retrained = order.subject[3:] if engine == "plain" else order.subject[2:]   # batched: folds 3-4 are a group
    assert resumed.metrics["fold_epochs_attempt"] == sum(per_fold[s] for s in retrained)
    assert resumed.metrics["fold_epochs_resumed"] == full.fold_epochs - resumed.metrics["fold_epochs_attempt"]
    assert resumed.metrics["fold_epochs"] == full.fold_epochs and resumed.metrics["attempt"] == 2
    assert reports == list(range(len(order) - len(retrained) + 1, len(order) + 1))   # only trained folds report
    for name in ("predictions.csv", "history.csv"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    folds = pd.read_csv(tmp_path / "killed" / "folds.csv", dtype={"subject": str})
    assert folds.attempt.tolist() == [1] * (len(order) - len(retrained)) + [2] * len(retrained)
    assert {k: v for k, v in resumed.metrics.items() if not k.startswith(("fold_epochs", "attempt", "wall"))} == \
        {k: v for k, v in full.metrics.items() if not k.startswith(("fold_epochs", "attempt", "wall"))}
    attempts = pd.read_csv(tmp_path / "killed" / "attempts.csv")
    assert attempts.attempt.tolist() == [2] and attempts.fold_epochs.tolist() == [sum(per_fold[s] for s in retrained)]


def test_a_finished_run_resumes_without_training(synth_data, tmp_path):
    config = {**CONFIGS["plain"], "protocols": ["final"]}
    full = run_loso(config, synth_data, out_dir=tmp_path, progress=False)
    again = run_loso(config, synth_data, out_dir=tmp_path, progress=False, resume=True)
    assert again.metrics["fold_epochs_attempt"] == 0 and again.metrics["fold_epochs_resumed"] == full.fold_epochs
    assert again.metrics["fold_epochs_trained"] == full.fold_epochs   # attempt 1 trained them all
    assert again.predictions.equals(full.predictions)


def test_resume_refuses_another_config_or_data(synth_data, tmp_path):
    config = {**CONFIGS["plain"], "protocols": ["final"], "subjects": 6}
    run_loso(config, synth_data, out_dir=tmp_path, progress=False)
    with pytest.raises(UserError, match=r"config.yaml: the run there has lr=0.003, this command 0.001"):
        continued_config(tmp_path, LosoConfig.from_dict({**config, "lr": 1e-3}))
    # device and report_every change no result: the command's are kept; an unset fold_group_size takes the folder's
    saved, original = tmp_path / "config.yaml", (tmp_path / "config.yaml").read_text()
    saved.write_text(original.replace("fold_group_size: null", "fold_group_size: 2"))
    got = continued_config(tmp_path, LosoConfig.from_dict({**config, "device": "cpu", "report_every": 3}))
    assert (got.device, got.report_every, got.fold_group_size, got.lr) == ("cpu", 3, 2, config["lr"])
    saved.write_text(original.replace("fold_group_size: null", "fold_group_size: -2"))
    with pytest.raises(UserError, match=r"config.yaml: fold_group_size must be a positive integer, got -2$"):
        continued_config(tmp_path, LosoConfig.from_dict(config))
    saved.write_text(original)
    bad = tmp_path / FOLDS_DIR / next(p.name for p in (tmp_path / FOLDS_DIR).iterdir())
    bad.write_text("{not json")
    with pytest.raises(UserError, match=rf"{bad.name}: not valid JSON \(Expecting property name"):
        run_loso(config, synth_data, out_dir=tmp_path, progress=False, resume=True)


def test_a_folder_never_mixes_two_runs(tmp_path):
    run = tmp_path / "run"
    (run / FOLDS_DIR).mkdir(parents=True)
    (run / "config.yaml").write_text("model: ststnet\n")
    (run / FOLDS_DIR / "s1.json").write_text("{}")
    with pytest.raises(UserError, match=r"is not empty \(a run with 1 fold\(s\) done\): --resume continues"):
        prepare_folder(run)
    assert prepare_folder(run, resume=True) == run and (run / "config.yaml").exists()
    prepare_folder(run, overwrite=True)
    assert list(run.iterdir()) == []
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds 'notes.txt', which is not a run's file"):
        prepare_folder(run, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"
    assert prepare_folder(tmp_path / "new") == tmp_path / "new"
