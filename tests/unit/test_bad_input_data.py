"""Bad data, configs, weights and a full disk: one line `error: ...` naming the file, field or
value, exit code 2, nothing written outside the expected places and nothing already there lost.

Like test_bad_input.py: real files, the CLIs run in-process; no case trains more than one epoch
of STSTNet on three subjects.
"""
import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import htnet.io
from htnet.data import load_release
from htnet.data.release import CSV_NAME, IMAGE_DIR, LANDMARKS_NAME, LOSO_DIR, _landmark_table, _read_table
from htnet.errors import UserError
from htnet.io import atomic_write, is_safe_name, path_under
from htnet.loso import LosoConfig, evaluate_weights, run_loso
from htnet.models import create_model
from release_edits import edit_csv
from test_bad_input import files_under, one_error_line, run_main

BASE = ["--epochs", "1", "--batch-size", "32", "--protocols", "final", "--device", "cpu", "--engine", "plain"]
TRAIN = ["--model", "ststnet", *BASE]
THREE = ["--subjects", "sub01,s01,006"]
RULE = "is not a safe name (letters, digits, '.', '_', '-')"


def all_files(folder):
    return set(files_under(folder))


def error_lines(err):
    """The `error:` lines of stderr that progress bars share (split at carriage returns)."""
    segments = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err))
    return [s.strip() for s in segments if s.strip().startswith("error:")]


def train_fails(capsys, tmp_path, data, *flags, message, base=TRAIN, code=2):
    """`htnet train` stops with exactly one error line holding `message`; nothing is written
    anywhere under tmp_path (the output folder included)."""
    before = all_files(tmp_path)
    out = tmp_path / "out"
    got, _, err = run_main("htnet", ["train", "--data", data, *base, *flags, "--out", out], capsys)
    assert got == code and message in one_error_line(err), err
    assert files_under(out) == [] and all_files(tmp_path) == before
    return one_error_line(err)


# ----------------------------------------------------------------------------- 1. unsafe ids

@pytest.mark.parametrize("column, value, what", [
    ("sub", "../../escaped", "subject id"),
    ("sub", "/tmp/escaped", "subject id"),
    ("sub", "a/b", "subject id"),
    ("sub", ".hidden", "subject id"),
    ("sub", "sub 01", "subject id"),
    ("sub", "", "subject id"),
    ("filename_o", "../../../etc/passwd", "sample name"),
    ("filename_o", "x..y", "sample name"),
])
def test_unsafe_id_in_the_release_csv(release, tmp_path, capsys, column, value, what):
    edit_csv(release, lambda t: t.__setitem__(column, t[column].where(t.index != 2, value)))
    train_fails(capsys, tmp_path, release, "--save-weights",
                message=f"{release / CSV_NAME}: row 4: {what} {value!r} {RULE}")


def test_nul_in_the_release_csv_is_refused_as_binary(release, tmp_path, capsys):
    text = (release / CSV_NAME).read_text().replace("sub01,syn02", "sub01\x00,syn02", 1)
    (release / CSV_NAME).write_text(text)
    train_fails(capsys, tmp_path, release, message=f"{release / CSV_NAME}: not a text file (contains NUL bytes)")


def loso_layout(synth_root, root, rename):
    """The synthetic set in the per-subject folder layout (no CSV), under the names
    rename(subject, sample) gives."""
    data = load_release(synth_root)
    for sample, subject, label in zip(data.samples, data.subjects, data.labels):
        new_subject, new_sample = rename(subject, sample)
        folder = root / LOSO_DIR / new_subject / "u_test" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_root / IMAGE_DIR / f"{sample} .png", folder / f"{new_sample} .png")
    return root


def test_unsafe_names_in_the_per_subject_folders(synth_root, tmp_path, capsys):
    bad_subject = loso_layout(synth_root, tmp_path / "a", lambda sub, s: ("sub 01" if sub == "sub01" else sub, s))
    train_fails(capsys, tmp_path, bad_subject, "--landmarks", "template",
                message=f"{bad_subject / LOSO_DIR / 'sub 01'}: subject id 'sub 01' {RULE}")
    bad_sample = loso_layout(synth_root, tmp_path / "b", lambda sub, s: (sub, "x;rm" if s == "s01_syn01" else s))
    train_fails(capsys, tmp_path, bad_sample, "--landmarks", "template", message=f"sample name 'x;rm' {RULE}")
    twice = loso_layout(synth_root, tmp_path / "c", lambda sub, s: (sub, "sub01_syn01" if s == "s01_syn01" else s))
    train_fails(capsys, tmp_path, twice, "--landmarks", "template", message="duplicate sample id 'sub01_syn01'")


def test_unsafe_sample_name_in_the_landmarks_csv(release, tmp_path, capsys):
    table = pd.read_csv(release / LANDMARKS_NAME, dtype=str, keep_default_na=False)
    table.loc[len(table)] = ["../x"] + [""] * (table.shape[1] - 1)
    table.to_csv(release / LANDMARKS_NAME, index=False)
    train_fails(capsys, tmp_path, release, message=f"{release / LANDMARKS_NAME}: row {len(table) + 1}: sample '../x' {RULE}")


def test_every_id_of_the_real_release_is_safe(real_root):
    table = _read_table(real_root / CSV_NAME)
    assert all(map(is_safe_name, table["sub"])) and all(map(is_safe_name, table["filename_o"]))
    assert len(_landmark_table(real_root / LANDMARKS_NAME)) == 442


def test_path_under_keeps_paths_in_their_root(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert path_under(root, "weights", "s01.pth") == root / "weights" / "s01.pth"
    (root / "link").symlink_to(tmp_path)
    for parts in [("..", "x.pth"), ("/etc/passwd",), ("weights", "../../x.pth"), ("link", "x.pth"), (".",)]:
        with pytest.raises(UserError, match="outside"):
            path_under(root, *parts)
    with pytest.raises(UserError, match="NUL"):
        path_under(root, "a\x00b")


def test_weights_of_an_unsafe_subject_are_not_written_outside_out(synth_data, tmp_path):
    """Defence in depth: ids that bypass the loader still cannot make a path outside --out."""
    data = synth_data.restrict(["sub01", "s01", "006"])
    # out/weights/../../../escaped.pth would be beside tmp_path
    data = type(data)(**{**data.__dict__, "subjects": np.where(data.subjects == "sub01", "../../../escaped", data.subjects)})
    before = all_files(tmp_path.parent)
    with pytest.raises(UserError, match="escaped.pth resolves to .*, outside"):
        run_loso({"model": "ststnet", "epochs": 1, "batch_size": 32, "protocols": ["final"], "device": "cpu",
                  "engine": "plain", "save_weights": True}, data, out_dir=tmp_path / "out", progress=False)
    assert all_files(tmp_path.parent) - before == {f"{tmp_path.name}/out/config.yaml"}   # the run's start only
    with pytest.raises(UserError, match="escaped.pth resolves to .*, outside"):
        evaluate_weights(tmp_path / "out", data, {"model": "ststnet", "device": "cpu", "protocols": ["final"]})


# ----------------------------------------------------------------------------- 2. numbers in the LOSO config

@pytest.mark.parametrize("values, message", [
    ({"epochs": 1.0}, "epochs must be an integer, got 1.0"),
    ({"batch_size": 32.0}, "batch_size must be an integer, got 32.0"),
    ({"epochs": True}, "epochs must be an integer, got True"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"inner_val_subjects": 2.5}, "inner_val_subjects must be an integer, got 2.5"),
    ({"inner_val_subjects": 0}, "inner_val_subjects must be a positive integer, got 0"),
    ({"inner_patience": 0}, "inner_patience must be a positive integer, got 0"),
    ({"eval_every": "2"}, "eval_every must be an integer, got '2'"),
    ({"fold_group_size": 2.0}, "fold_group_size must be an integer, got 2.0"),
    ({"report_every": 0}, "report_every must be a positive integer, got 0"),
    ({"lr": float("nan")}, "lr must be a positive finite number, got nan"),
    ({"lr": float("inf")}, "lr must be a positive finite number, got inf"),
    ({"lr": 0}, "lr must be a positive finite number, got 0"),
    ({"lr": True}, "lr must be a positive finite number, got True"),
    ({"weight_decay": float("nan")}, "weight_decay must be a non-negative finite number, got nan"),
    ({"weight_decay": -1e-4}, "weight_decay must be a non-negative finite number, got -0.0001"),
    ({"shuffle": "no"}, "shuffle must be true or false, got 'no'"),
    ({"protocols": 3}, "protocols must be a list of names, got 3"),
    ({"device": "cuda:x"}, "unknown device 'cuda:x'"),
    ({"crop_mode": "centre"}, "unknown crop_mode 'centre'"),
    ({"subjects": 1.5}, "subjects must be a count or a list of subject ids, got 1.5"),
    ({"model": "htnet", "model_config": {"dim": 32.5}}, "htnet: dim must be a positive integer, got 32.5"),
    ({"model": "htnet", "model_config": {"heads": float("nan")}}, "htnet: heads must be finite, got nan"),
    ({"model": "htnet", "model_config": {"block_repeats": [1, 1.5, 1]}}, "htnet: block_repeats [1, 1.5, 1] must be 3 positive integers"),
    ({"model_config": {"dropout": float("inf")}}, "ststnet: dropout must be finite, got inf"),
    ({"model_config": {1: 2}}, "model ststnet has no argument 1"),
])
def test_loso_config_numbers_are_checked(values, message):
    with pytest.raises(UserError) as error:
        LosoConfig.from_dict({"model": "ststnet", **values})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_loso_config_normalises_numbers():
    config = LosoConfig.from_dict({"model": "ststnet", "epochs": np.int64(3), "lr": "1e-3", "subjects": np.int32(4),
                                   "shuffle": np.bool_(True), "protocols": "final,paper"})
    assert (type(config.epochs), config.lr, type(config.subjects), config.shuffle, config.protocols) == \
        (int, 1e-3, int, True, ("final", "paper"))
    yaml.safe_dump(config.to_dict())  # plain types only


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "lr must be a positive finite number, got inf"),
    (["--weight-decay", "nan"], "weight_decay must be a non-negative finite number, got nan"),
    (["--weight-decay", "-1"], "weight_decay must be a non-negative finite number, got -1.0"),
    (["--seed", "-3"], "seed must be a non-negative integer, got -3"),
    (["--epochs", "1.0"], "argument --epochs: invalid int value: '1.0'"),
    (["--model-arg", "dropout=.nan"], "ststnet: dropout must be finite, got nan"),
])
def test_bad_numbers_on_the_command_line(synth_root, tmp_path, capsys, flags, message):
    train_fails(capsys, tmp_path, synth_root, *flags, message=message)


@pytest.mark.parametrize("content, message", [
    ({"epochs": 1.0}, "epochs must be an integer, got 1.0"),
    ({"batch_size": 32.0}, "batch_size must be an integer, got 32.0"),
    ({"lr": ".inf"}, "lr must be a positive finite number, got inf"),
    ({"model": "htnet", "model_config": {"dim": 32.5}}, "htnet: dim must be a positive integer, got 32.5"),
    ({"model": "htnet", "model_config": {"block_repeats": [1, 1.5]}}, "htnet: block_repeats [1, 1.5] must be 3"),
    ({"model_config": [1, 2]}, "model_config must be a mapping, got [1, 2]"),
])
def test_bad_numbers_in_a_config_file_name_the_file(synth_root, tmp_path, capsys, content, message):
    config = tmp_path / "config.yaml"
    tiny = {"model": "ststnet", "epochs": 1, "batch_size": 32, "protocols": ["final"], "engine": "plain"}
    config.write_text(yaml.safe_dump({**tiny, **content}).replace("'.inf'", ".inf"))
    line = train_fails(capsys, tmp_path, synth_root, "--config", config, message=message, base=["--device", "cpu"])
    assert line.startswith(f"error: {config}: "), line


def test_bad_numbers_in_a_search_space_or_set(tmp_path, capsys):
    space = tmp_path / "s.py"
    space.write_text("num_samples = 1\ndata = {'synthetic_subjects': 1}\n"
                     "fixed = {'model': 'ststnet', 'epochs': 1, 'batch_size': 32.0, 'device': 'cpu'}\n\n"
                     "def space(trial):\n    return {'lr': trial.suggest_float('lr', 1e-3, 1e-2)}\n")
    runs = tmp_path / "runs"
    common = ["run", "--name", "bad", "--storage", runs, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    code, _, err = run_main("search", [*common, space], capsys)
    line = one_error_line(err)  # LosoConfig's rule, named by the space file's key
    assert code == 2 and re.search(r"s\.py: fixed.batch_size: batch_size must be an integer, got 32\.0", line), err
    space.write_text(space.read_text().replace("32.0", "32"))
    code, _, err = run_main("search", [*common, space, "--set", "weight_decay=-0.5"], capsys)
    assert code == 2 and re.search(r"--set.*weight_decay.*-0\.5", one_error_line(err)), err
    assert files_under(runs) == [] and not (tmp_path / "mlflow.db").exists()


def test_bad_batched_environment_override(synth_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HTNET_BATCHED_GROUP", "two")
    train_fails(capsys, tmp_path, synth_root, *THREE, "--engine", "batched",
                message="environment variable HTNET_BATCHED_GROUP='two' must be an integer >= 1")


# ----------------------------------------------------------------------------- 3. --model-arg and --config files

def test_bad_model_arg_and_config_files(synth_root, tmp_path, capsys):
    train_fails(capsys, tmp_path, synth_root, "--model-arg", "dim=[1,", message="--model-arg dim=[1,: line 1: not valid YAML (expected the node content")
    files = {
        "latin1.yaml": ("epochs: 1\nname: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 19)"),
        "binary.yaml": (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text (byte 0x89 at offset 0)"),
        "nul.yaml": (b"epochs: 1\x00\n", "not a text file (contains NUL bytes)"),
        "broken.yaml": (b"epochs: [1,\n", "not valid YAML"),
        "list.yaml": (b"- epochs\n- 1\n", "expected a mapping of LOSO config keys, got a list"),
        "bomb.yaml": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcde", "bcdef")), "possible alias bomb"),
    }
    for name, (content, message) in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        line = train_fails(capsys, tmp_path, synth_root, "--config", path, message=message)
        assert line.startswith(f"error: {path}"), line
    train_fails(capsys, tmp_path, synth_root, "--config", tmp_path / "none.yaml",
                message=f"{tmp_path / 'none.yaml'}: no such file")


# ----------------------------------------------------------------------------- 4. landmark CSVs

def edit_landmarks(root, change):
    table = pd.read_csv(root / LANDMARKS_NAME, dtype=str, keep_default_na=False)
    change(table)
    table.to_csv(root / LANDMARKS_NAME, index=False)


def first_detected(table):
    return table.index[table["detected"] == "1"][0]


LANDMARK_CASES = {
    "duplicated sample": (lambda t: t.__setitem__("sample", t["sample"].where(t.index != 4, t["sample"][1])),
                          "row 6: duplicate sample 'sub01_syn02' (rows 3, 6)"),
    "non-numeric coordinate": (lambda t: t.loc.__setitem__((first_detected(t), "nose_x"), "12,5"),
                               "row 3: nose_x '12,5' is not a number"),
    "detected 2": (lambda t: t.loc.__setitem__((0, "detected"), "2"), "row 2: detected '2' is not 0 or 1"),
    "detected empty": (lambda t: t.loc.__setitem__((0, "detected"), ""), "row 2: detected '' is not 0 or 1"),
    "NaN where detected": (lambda t: t.loc.__setitem__((first_detected(t), "left_eye_y"), "nan"),
                           "row 3: sample 'sub01_syn02': left_eye_y 'nan' is not a finite number (and detected is 1)"),
    "empty where detected": (lambda t: t.loc.__setitem__((first_detected(t), "left_eye_y"), ""),
                             "row 3: sample 'sub01_syn02': left_eye_y '' is not a finite number (and detected is 1)"),
    "inf coordinate": (lambda t: t.loc.__setitem__((first_detected(t), "mouth_right_x"), "inf"),
                       "row 3: sample 'sub01_syn02': mouth_right_x 'inf' is not a finite number"),
    "missing column": (lambda t: t.pop("nose_y"), "missing column 'nose_y'"),
}


@pytest.mark.parametrize("case", list(LANDMARK_CASES))
def test_broken_landmarks_csv(release, tmp_path, capsys, case):
    change, message = LANDMARK_CASES[case]
    edit_landmarks(release, change)
    train_fails(capsys, tmp_path, release, message=f"{release / LANDMARKS_NAME}: {message}")


def test_binary_or_empty_landmarks_file(release, tmp_path, capsys):
    path = release / LANDMARKS_NAME
    path.write_bytes(os.urandom(64) + b"\x00")
    train_fails(capsys, tmp_path, release, message=f"{path}: not")  # not UTF-8 / not a text file
    path.write_bytes(b"")
    train_fails(capsys, tmp_path, release, message=f"{path}: empty file")
    other = tmp_path / "mine.csv"
    other.write_bytes("sample,detected\nsub01_syn01,\xe9\n".encode("latin-1"))
    train_fails(capsys, tmp_path, release, "--landmarks", other, message=f"{other}: not UTF-8 text (byte 0xe9 at offset 28)")


# ----------------------------------------------------------------------------- 5. the release CSV and images

@pytest.mark.parametrize("value, when", [(np.inf, ""), (3e38, " after standardisation")])
def test_non_finite_pixels(release, tmp_path, capsys, monkeypatch, value, when):
    """uint8 images cannot give these; the checks guard the float path (3e38 is finite but its
    channel statistics overflow)."""
    import htnet.data.release as module
    read = module.read_image
    monkeypatch.setattr(module, "read_image",
                        lambda path: np.full_like(read(path), value) if "s01_syn01" in str(path) else read(path))
    train_fails(capsys, tmp_path, release, "--standardize",
                message=f"{release}: sample '{'s01_syn01' if not when else 'sub01_syn01'}' has non-finite pixel values{when}")


# ----------------------------------------------------------------------------- 6. weights for evaluate

@pytest.mark.parametrize("content, message", [
    (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a state_dict"),
    (lambda p: torch.save({**create_model("ststnet").state_dict(), "fc.bias": torch.tensor([0.0, float("nan"), 0.0])}, p),
     "weight 'fc.bias' has non-finite values (NaN or inf)"),
    (lambda p: p.write_bytes(os.urandom(2000)), "not a PyTorch weights file (torch.load with weights_only=True failed"),
    (lambda p: p.write_bytes(b""), "not a PyTorch weights file"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(200)), "not a PyTorch weights file"),
])
def test_broken_weights_file(synth_root, tmp_path, capsys, content, message):
    weights = tmp_path / "weights"
    weights.mkdir()
    for subject in ["sub01", "s01", "006"]:
        torch.save(create_model("ststnet").state_dict(), weights / f"{subject}.pth")
    content(weights / "s01.pth")
    out = tmp_path / "eval"
    code, _, err = run_main("htnet", ["evaluate", "--data", synth_root, *THREE, "--weights", weights, "--model",
                                      "ststnet", "--device", "cpu", "--out", out], capsys)
    assert code == 2 and f"{weights / 's01.pth'}: {message}" in one_error_line(err), err
    assert files_under(out) == []


# ----------------------------------------------------------------------------- 7. a full disk

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_atomic_write_turns_a_full_disk_into_one_line(tmp_path, monkeypatch, code, stage):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    if stage != "write":
        monkeypatch.setattr(htnet.io.os, stage, fail)
    with pytest.raises(UserError) as error:
        with atomic_write(path) as f:
            f.write("new")
            if stage == "write":
                fail()
    assert str(error.value) == f"cannot write {path}: {os.strerror(code)}"
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_write_at_the_file_size_limit(tmp_path):
    """For real: RLIMIT_FSIZE (SIGXFSZ ignored) makes the kernel refuse the write with EFBIG."""
    script = (
        "import resource, signal, sys\n"
        "from htnet.io import write_files\n"
        "from htnet.errors import UserError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    write_files({sys.argv[1]: 'small', sys.argv[2]: 'x' * 5000})\n"
        "except UserError as e:\n"
        "    print(e)\n")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("old a")
    b.write_text("old b")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script, str(a), str(b)], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == f"cannot write {b}: File too large", done
    assert (a.read_text(), b.read_text()) == ("old a", "old b")  # all or none: a is not replaced either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


@pytest.fixture
def full_disk(tmp_path):
    """A 200 kB tmpfs (needs root; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(folder):
    """Fill the file system of `folder` (files can still be created, not written)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
                f.flush()


def test_train_onto_a_full_disk_keeps_the_previous_results(synth_root, full_disk, tmp_path, capsys):
    out = full_disk / "out"
    out.mkdir()
    old = {name: f"previous run's {name}\n" for name in ["predictions.csv", "history.csv", "metrics.json", "config.yaml"]}
    for name, text in old.items():
        (out / name).write_text(text)
    (out / "weights").mkdir()
    (out / "weights" / "sub01.pth").write_text("previous weights")
    new = full_disk / "new"
    new.mkdir()
    fill(full_disk)
    expected = sorted([*old, "weights/sub01.pth"])
    for flags in ([], ["--save-weights"]):
        # a folder holding a run is never written into without --resume or --overwrite
        code, _, err = run_main("htnet", ["train", "--data", synth_root, *TRAIN, *THREE, *flags, "--out", out], capsys)
        assert code == 2 and "is not empty (a run with 0 fold(s) done)" in one_error_line(err)
        assert files_under(out) == expected
        assert {name: (out / name).read_text() for name in old} == old
        assert (out / "weights" / "sub01.pth").read_text() == "previous weights"
        code, _, err = run_main("htnet", ["train", "--data", synth_root, *TRAIN, *THREE, *flags, "--out", new], capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and re.fullmatch(
            rf"error: cannot write {re.escape(str(new))}/\S+: No space left on device", lines[0]), err
        assert files_under(new) == []  # no temporary file left


def test_unsafe_names_in_a_preprocess_index(tmp_path, capsys):
    index = tmp_path / "index.csv"
    index.write_text("dataset,subject,sample,label,onset\ncasme2,s1,a,0,x.png\ncasme2,../up,b,0,x.png\n")
    code, _, err = run_main("htnet", ["preprocess", "--index", index, "--frames-root", tmp_path, "--out", tmp_path / "out",
                                      "--no-progress"], capsys)
    assert code == 2 and f"{index}: row 3: column 'subject' value '../up' {RULE}" in one_error_line(err), err
    assert files_under(tmp_path / "out") == []
