"""`htnet train --resume` trusts nothing it reads back from --out: a tampered fold record or attempts.csv, records
of another configuration or data, a release CSV with a duplicated column and a bad HTNET_* setting are each one
line `error: <file>: <field> ...`, exit 2, with every file of the run folder byte-identical afterwards.

One tiny run (STSTNet, 2 epochs, 3 subjects, protocols final and inner) is trained once; each case tampers a copy.
"""
import json
import shutil

import pytest

from htnet.checkpoint import ATTEMPTS, FOLDS_DIR
from htnet.cli import main
from htnet.data import load_release, make_synthetic
from htnet.data.release import CSV_NAME
from htnet.errors import UserError
from htnet.loso import run_loso, select_subjects
from search_fixtures import run_main
from test_bad_input import one_error_line

FLAGS = ["--model", "ststnet", "--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--protocols", "final,inner",
         "--inner-val-subjects", "1", "--subjects", "3", "--device", "cpu", "--engine", "plain"]


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data", str(synth_root), *FLAGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def resume_fails(capsys, out, data, *flags, message):
    """`htnet train --resume` on `out` is one error line ending in `message`; nothing in `out` changes."""
    before = snapshot(out)
    code, _, err = run_main("htnet", ["train", "--data", data, *FLAGS, *flags, "--out", out, "--resume"], capsys)
    line = one_error_line(err)
    assert code == 2 and line == f"error: {message}", err
    assert snapshot(out) == before
    return line


def first_record(out):
    return sorted((out / FOLDS_DIR).glob("*.json"))[0]


def test_an_untouched_folder_resumes(run, synth_root, capsys):
    """The checks pass a run's own files: a run killed before its last fold trains that fold only."""
    last = sorted((run / FOLDS_DIR).glob("*.json"))[-1]
    last.unlink()
    code, _, err = run_main("htnet", ["train", "--data", synth_root, *FLAGS, "--out", run, "--resume"], capsys)
    assert code == 0, err
    assert (run / ATTEMPTS).read_text().splitlines() == ["attempt,fold_epochs,folds", "1,12,3", "2,4,1"]
    assert json.loads(last.read_text())["attempt"] == 2


# a change to a fold record in place (or its file's new text, returned) -> the message's field part, given the
# record as it was
RECORD_CASES = {
    "attempt as text": (lambda r: r.update(attempt="1"), lambda r: "attempt must be an integer in 1..1000000, got '1'"),
    "fold_epochs a bool": (lambda r: r.update(fold_epochs=True),
                           lambda r: "fold_epochs must be an integer in 2..4, got True"),
    "NaN loss": (lambda r: r["history"][0].__setitem__(2, float("nan")),
                 lambda r: "history.train_loss[0] must be a finite number >= 0, got nan"),
    "infinite accuracy": (lambda r: r["history"][-1].__setitem__(3, float("inf")),
                          lambda r: f"history.test_acc[{len(r['history']) - 1}] must be a finite number in 0..1 "
                                    f"or NaN, got inf"),
    "history row too short": (lambda r: r["history"][1].pop(),
                              lambda r: "history must be a list of [run, epoch, train_loss, test_acc, val_uf1] rows"),
    "history run unknown": (lambda r: r["history"][0].__setitem__(0, "mine"),
                            lambda r: "history.run[0] must be one of 'inner', 'main', got 'mine'"),
    "nested 1000 deep": (lambda r: json.dumps(r).replace('"chosen": ', f'"chosen": {"[" * 1000}{"]" * 1000}, "was": '),
                         lambda r: "JSON nested deeper than 16 levels"),
    "nested 20 deep": (lambda r: r.update(samples=json.loads("[" * 20 + "]" * 20)),
                       lambda r: f"samples{'[0]' * 15} is nested deeper than 16 levels"),
    "a prediction missing": (lambda r: r["chosen"]["final"]["predictions"].pop(),
                             lambda r: f"chosen.final.predictions must be a list of {len(r['samples'])} values, "
                                       f"got {len(r['samples']) - 1}"),
    "class 3": (lambda r: r["chosen"]["final"]["predictions"].__setitem__(0, 3),
                lambda r: "chosen.final.predictions[0] must be an integer in 0..2, got 3"),
    "class -1 in the inner run": (lambda r: r["inner"]["predictions"].__setitem__(0, -1),
                                  lambda r: "inner.predictions[0] must be an integer in 0..2, got -1"),
    "epoch past the run's": (lambda r: r["chosen"]["inner"].update(epoch=3),
                             lambda r: "chosen.inner.epoch must be an integer in 1..2, got 3"),
    "protocol missing": (lambda r: r["chosen"].pop("inner"), lambda r: "chosen.inner is missing"),
    "chosen a list": (lambda r: r.update(chosen=[]), lambda r: "chosen.final is missing"),
    "no fingerprint": (lambda r: r.pop("made_by"), lambda r: "made_by is missing"),
    "other samples": (lambda r: r["samples"].reverse(),
                      lambda r: f"samples are not fold {r['subject']!r}'s in the data now"),
    "inner.labels out of range": (lambda r: r["inner"]["labels"].__setitem__(0, 3),
                                  lambda r: "inner.labels[0] must be an integer in 0..2, got 3"),
    "not a mapping": (lambda r: "[1, 2]", lambda r: "made_by is missing"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_a_tampered_fold_record(run, synth_root, capsys, case):
    change, field = RECORD_CASES[case]
    path = first_record(run)
    record = json.loads(path.read_text())
    message = f"{path}: {field(record)}"
    changed = change(record)
    path.write_text(changed if isinstance(changed, str) else json.dumps(record))
    resume_fails(capsys, run, synth_root, message=message)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (b"{" + b" " * (16 * 1024 * 1024) + b"}", "16777218 bytes is too big for a JSON file (limit 16777216)"),
    (b"\xff{}", "not UTF-8 text (byte 0xff at offset 0)"),
])
def test_an_unreadable_fold_record(run, synth_root, capsys, content, message):
    path = first_record(run)
    path.write_bytes(content)
    resume_fails(capsys, run, synth_root, message=f"{path}: {message}")


@pytest.mark.parametrize("text, message", [
    ("attempt,fold_epochs,folds\nx,12,3\n", "row 2: attempt 'x' is not an integer in 1..1000000"),
    ("attempt,fold_epochs,folds\n1,1.5,3\n", "row 2: fold_epochs '1.5' is not an integer in 0..1000000000000"),
    ("attempt,fold_epochs,folds\n1,nan,3\n", "row 2: fold_epochs 'nan' is not an integer in 0..1000000000000"),
    ("attempt,fold_epochs,folds\n1,12,-3\n", "row 2: folds '-3' is not an integer in 0..1000000"),
    ("attempt,fold_epochs,folds\n1,12,3\n1,12,3\n", "row 3: duplicate attempt '1' (rows 2, 3)"),
    ("attempt,fold_epochs,attempt\n1,12,3\n", "column 'attempt' appears twice in the header"),
    ("attempt,fold_epochs\n1,12\n", "missing column 'folds' (required: attempt, fold_epochs, folds)"),
])
def test_a_tampered_attempts_file(run, synth_root, capsys, text, message):
    (run / ATTEMPTS).write_text(text)
    resume_fails(capsys, run, synth_root, message=f"{run / ATTEMPTS}: {message}")


def test_records_of_another_configuration_are_refused_until_overwrite(run, synth_root, capsys):
    """The folder's config.yaml says epochs 3 (or is gone), its records were made with 2: they are not this run's."""
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 2", "epochs: 3"))
    expected = f"{first_record(run)}: made with epochs=2, this run has epochs=3; use --overwrite to start again"
    resume_fails(capsys, run, synth_root, "--epochs", "3", message=expected)
    config.unlink()
    resume_fails(capsys, run, synth_root, "--epochs", "3", message=expected)
    code, _, err = run_main("htnet", ["train", "--data", synth_root, *FLAGS, "--epochs", "3", "--out", run,
                                      "--overwrite"], capsys)
    assert code == 0, err
    assert {json.loads(p.read_text())["made_by"]["epochs"] for p in (run / FOLDS_DIR).glob("*.json")} == {3}


def test_records_of_other_data_are_refused(run, tmp_path, capsys):
    other = make_synthetic(tmp_path / "other", subjects_per_dataset=3, seed=1)   # the same ids, other pixels
    theirs = json.loads(first_record(run).read_text())["made_by"]["data"]
    ours = select_subjects(load_release(other), 3).fingerprint()
    resume_fails(capsys, run, other, message=f"{first_record(run)}: made with data={theirs!r}, this run has "
                                             f"data={ours!r}; use --overwrite to start again")


def test_the_search_trainables_resume_refuses_before_writing(run, synth_data):
    """search.trainable resumes a trial's folder by run_loso(..., resume=True): the same checks, nothing written."""
    path = first_record(run)
    record = json.loads(path.read_text())
    record["chosen"]["final"]["predictions"][0] = 7
    path.write_text(json.dumps(record))
    before = snapshot(run)
    config = {"model": "ststnet", "epochs": 2, "batch_size": 32, "lr": 3e-3, "protocols": ["final", "inner"],
              "inner_val_subjects": 1, "subjects": 3, "device": "cpu", "engine": "plain"}
    with pytest.raises(UserError, match=rf"^{path}: chosen.final.predictions\[0\] must be an integer in 0..2, got 7$"):
        run_loso(config, synth_data, out_dir=run, progress=False, resume=True)
    assert snapshot(run) == before


def test_a_release_csv_with_a_duplicated_column(run, release, capsys):
    lines = (release / CSV_NAME).read_text().splitlines()
    (release / CSV_NAME).write_text("\n".join([lines[0] + ",label"] + [line + ",0" for line in lines[1:]]) + "\n")
    resume_fails(capsys, run, release, message=f"{release / CSV_NAME}: column 'label' appears twice in the header")


@pytest.mark.parametrize("name, value, rule", [
    ("HTNET_BATCHED_WORKERS", "x", "must be an integer >= 0"),
    ("HTNET_BATCHED_WORKERS", "-1", "must be an integer >= 0"),
    ("HTNET_BATCHED_GROUP", "0", "must be an integer >= 1"),
])
def test_a_bad_environment_setting(run, synth_root, synth_data, tmp_path, capsys, monkeypatch, name, value, rule):
    monkeypatch.setenv(name, value)
    message = f"environment variable {name}={value!r} {rule}"
    resume_fails(capsys, run, synth_root, message=message)
    before = snapshot(run)   # --overwrite clears nothing either
    code, _, err = run_main("htnet", ["train", "--data", synth_root, *FLAGS, "--out", run, "--overwrite"], capsys)
    assert code == 2 and one_error_line(err) == f"error: {message}" and snapshot(run) == before
    with pytest.raises(UserError, match=f"^{message}$"):   # the search's trials: before their folder is made
        run_loso({"model": "ststnet", "device": "cpu"}, synth_data, out_dir=tmp_path / "trial", progress=False)
    assert not (tmp_path / "trial").exists()
