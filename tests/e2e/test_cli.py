import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def htnet(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "htnet", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def test_synth_train_evaluate_end_to_end(tmp_path):
    data = tmp_path / "synth"
    made = htnet("synth", "--out", data, "--subjects-per-dataset", 2, "--seed", 3)
    assert made.returncode == 0, made.stderr
    assert (data / "combined_3_class2_for_optical_flow.csv").is_file()
    out = tmp_path / "run"
    trained = htnet("train", "--data", data, "--model", "htnet", "--model-arg", "dim=16", "--model-arg", "heads=2",
                    "--model-arg", "patch_size=14", "--model-arg", "num_hierarchies=2",
                    "--model-arg", "block_repeats=[1,1]", "--epochs", 2, "--lr", "1e-3", "--batch-size", 16,
                    "--protocols", "paper,final", "--save-weights", "--out", out)
    assert trained.returncode == 0, trained.stderr
    assert "Full UF1" in trained.stdout and "paper" in trained.stdout and "final" in trained.stdout
    assert len(list((out / "weights").glob("*.pth"))) == 6
    evaluated = htnet("evaluate", "--data", data, "--model", "htnet", "--model-arg", "dim=16", "--model-arg", "heads=2",
                      "--model-arg", "patch_size=14", "--model-arg", "num_hierarchies=2",
                      "--model-arg", "block_repeats=[1,1]", "--weights", out / "weights", "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr
    paper = pd.read_csv(out / "predictions.csv").query("protocol == 'paper'").set_index("sample").prediction
    again = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("sample").prediction
    assert (again == paper.loc[again.index]).all()
    # metrics.json as train writes it, under protocol "weights": the paper protocol's figures (the same predictions)
    trained = pd.read_json(out / "metrics.json", typ="series")
    metrics = pd.read_json(tmp_path / "eval" / "metrics.json", typ="series")
    assert sorted(metrics.index) == sorted(f"weights_{d}_{m}" for d in ("full", "smic", "casme2", "samm")
                                           for m in ("uf1", "uar"))
    assert all(metrics[k] == pytest.approx(trained[k.replace("weights_", "paper_")]) for k in metrics.index)
    assert f"results in {tmp_path / 'eval'}/ (predictions.csv, metrics.json)" in evaluated.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "no/such/folder", "--model", "ststnet"], "data folder not found"),
    (["train", "--model", "htnet", "--model-arg", "patch_size=5"], "image_size 28 is not divisible by patch_size 5"),
    (["train", "--model", "ststnet", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--model", "ststnet", "--protocols", "paper,best"], "unknown protocol 'best'"),
    (["evaluate", "--model", "ststnet", "--weights", "no/such/weights"], "weights folder not found"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = htnet(*args, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = htnet("train", "--model", "ststnet", "--out", blocker / "out", cwd=tmp_path)
    assert result.returncode == 2 and "not writable" in result.stderr


def test_train_killed_with_sigkill_resumes_training_only_the_missing_folds(tmp_path):
    """`htnet train` SIGKILLed after k of 9 folds; `--resume` trains the other 9 - k (counted in
    fold-epochs) and its files equal an uninterrupted run's. The killed folder is refused without
    --resume, and a resume with another config is refused with one line."""
    import signal
    import time

    data = tmp_path / "synth"
    assert htnet("synth", "--out", data, "--subjects-per-dataset", 3).returncode == 0
    epochs = 30   # a fold of seconds: the kill lands between folds 3 and 9
    args = ["train", "--data", data, "--model", "ststnet", "--epochs", epochs, "--lr", "3e-3", "--batch-size", 32,
            "--engine", "plain", "--protocols", "paper,final", "--device", "cpu"]
    full = htnet(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "htnet", *map(str, args), "--out", killed], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((killed / "folds").glob("*.json"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    done = len(list((killed / "folds").glob("*.json")))
    assert 3 <= done < 9 and not (killed / "predictions.csv").exists()

    again = htnet(*args, "--out", killed)
    assert again.returncode == 2 and again.stderr.strip().endswith(
        f"is not empty (a run with {done} fold(s) done): --resume continues its run, --overwrite clears it, "
        f"or choose another --out")
    other = htnet(*args[:-2], "--device", "cpu", "--lr", "1e-3", "--out", killed, "--resume")
    assert other.returncode == 2 and "config.yaml: the run there has lr=0.003, this command 0.001" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1

    resumed = htnet(*args, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (f"{9 * epochs} fold-epochs ({done * epochs} kept from earlier attempts, {(9 - done) * epochs} trained "
            f"in attempt 2)") in resumed.stdout
    for name in ("predictions.csv", "history.csv"):
        assert (killed / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    metrics = pd.read_json(killed / "metrics.json", typ="series")
    assert metrics["fold_epochs_attempt"] == (9 - done) * epochs and metrics["fold_epochs"] == 9 * epochs
    assert (pd.read_csv(killed / "folds.csv").attempt == [1] * done + [2] * (9 - done)).all()
