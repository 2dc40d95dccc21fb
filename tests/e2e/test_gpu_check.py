"""benchmarks.gpu_check, the one command for the first GPU, runs its whole code path on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["reference loop", "plain engine (G=1)", "batched, float32", "batched, bf16 autocast", "batched, torch.compile"]


def test_gpu_check_quick_on_cpu_measures_every_row_and_runs_a_two_trial_search(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick",
                           "--data", str(tmp_path / "no-release"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and "SYNTHETIC" in report["data"]
    rows = report["engine"]["rows"]
    assert list(rows) == ROWS
    for name in ROWS:
        assert "error" not in rows[name], (name, rows[name])
        assert rows[name]["s_per_fold_epoch"] > 0 and rows[name]["vs_reference"] > 0
    search = report["search"]
    assert search["complete"] and search["counts"] == {"finished": 2}, search
    assert all(t["folds_done"] == 3 for t in search["trials"])
    text = (out / "gpu_check.md").read_text()
    assert "| measurement | ms / fold-epoch | vs reference loop | peak GPU memory |" in text
    assert "| batched, torch.compile |" in text and "2-trial search (space demo," in text
