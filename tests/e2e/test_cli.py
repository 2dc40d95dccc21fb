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
