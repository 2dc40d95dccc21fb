"""What a search shows on the console: our own lines there (the header with the subjects used, a line per trial
event, a periodic table, the summary), Ray's, MLflow's and Optuna's output in <storage>/logs/<name>.log, and all
of it on the console again with --verbose. Real `python -m search run` processes, a real local Ray (private
RAY_TMPDIR), real MLflow and Optuna stores."""
import io
import os
import re

import yaml

from search.driver import progress, runner
from search_fixtures import REPO, parent_run, ray_tmpdir, run_cli, search_options, write_space  # noqa: F401

CHATTER = ["Token authentication", "Started a local Ray instance", "Configuration for experiment", "TensorBoard",
           "Trial status", "pid=", "A new study created", "Downloading artifacts", "Warning", "INFO", "bottleneck"]
OUR_LINE = re.compile(r"search quiet[: ]|data: |log: |top trials:|best configuration: |  rerun it: "
                      r"|browse the runs: |inspect the Optuna study|logged to the parent run|trial_id |[0-9a-f]{8} "
                      r"|\[\d+:\d\d:\d\d\] trial ")


def run_demo(tmp_path, ray_tmpdir, name, *flags):
    space = write_space(tmp_path / "s.yaml", num_samples=2, data={"synthetic_subjects": 2, "synthetic_seed": 0})
    return run_cli(["run", str(space), "--name", name, "--subjects", "4", "--storage", "runs", *flags], cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmpdir)})


def test_the_console_shows_the_search_and_the_log_file_holds_the_libraries_output(tmp_path, ray_tmpdir):
    done = run_demo(tmp_path, ray_tmpdir, "quiet")
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert not [word for word in CHATTER if word in console], console
    lines = console.splitlines()
    assert [line for line in lines if line.strip() and not OUR_LINE.match(line)] == [], console
    assert "data: the synthetic composite at runs/synthetic/s2-seed0: 4 of its 6 subjects (casme2 2, samm 1, " \
           "smic 1)" in console  # --subjects 4 takes them in turn from each dataset
    assert "log: runs/logs/quiet.log holds Ray's, MLflow's and Optuna's messages (--verbose shows them here)" in lines
    assert len(re.findall(r"\] trial #0[01]: 1/4 folds, inner_val_uf1 0\.\d{4} \(on cpu\)\n", console)) == 2
    for event in ("#00 started: ", "#01 started: ", "#00 finished: 4/4 folds", "#01 finished: 4/4 folds"):
        assert f"] trial {event}" in console, event
    assert "browse the runs: mlflow ui --backend-store-uri sqlite:///mlflow.db, then open http://127.0.0.1:5000 " \
           "(experiment htnet)" in lines

    log = (tmp_path / "runs" / "logs" / "quiet.log").read_text()
    for chatter in ("Started a local Ray instance", "Configuration for experiment", "(loso_trial pid=",
                    "A new study created in RDB with name: quiet", "mlflow.store.db.utils"):
        assert chatter in log, chatter
    record = yaml.safe_load((tmp_path / "runs" / "searches" / "quiet.yaml").read_text())
    assert record["description"] == (f"s; on the synthetic composite at {tmp_path}/runs/synthetic/s2-seed0: "
                                     "4 of its 6 subjects (casme2 2, samm 1, smic 1), 31 samples")  # s: the file's stem
    run = parent_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "quiet")
    assert run.data.tags["mlflow.note.content"] == record["description"]  # the run's description in MLflow


def test_verbose_brings_the_libraries_output_back(tmp_path, ray_tmpdir):
    done = run_demo(tmp_path, ray_tmpdir, "loud", "--verbose")
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    for chatter in ("Started a local Ray instance", "Configuration for experiment", "Trial status",
                    "A new study created", "(loso_trial pid="):
        assert chatter in console, chatter
    assert "] trial #00 finished: " in console  # our lines too
    assert "Started a local Ray instance" in (tmp_path / "runs" / "logs" / "loud.log").read_text()


def test_a_failed_trial_and_the_periodic_table(tmp_path, monkeypatch):
    """In-process, with the table due at every step that brought news: lr 1e12 diverges (one line, the error)."""
    monkeypatch.setattr(progress, "TABLE_EVERY_S", 0)
    space = write_space(tmp_path / "s.yaml", sampler={"type": "grid"}, max_concurrent_trials=1,
                        fixed={"optimizer": "sgd"}, space={"lr": {"choice": [1.0e12, 1.0e-2]}})
    out = io.StringIO()
    summary = runner.run_search(search_options(tmp_path, space, "table"), out=out)
    assert summary["counts"] == {"finished": 1, "failed": 1}
    shown = out.getvalue()
    assert re.search(r"\] trial #0[01] failed: TrainingDiverged: training loss is (nan|inf)", shown), shown
    assert "1 finished, 0 pruned, 1 failed, 0 running of 2 trials" in shown
    table = shown[shown.rindex("0 running of 2 trials"):].splitlines()
    assert table[1].split() == ["trial", "status", "folds", "inner_val_uf1", "configuration"]
    assert table[2].split()[1:3] == ["finished", "6/6"] and table[2].endswith("ststnet lr0.01")


def test_the_browse_hint_is_one_sentence():
    assert runner.browse_hint("http://mlflow.lab:5000", "htnet") == \
        "browse the runs: open http://mlflow.lab:5000 (experiment htnet)"
    assert runner.browse_hint("sqlite:////data/mlflow.db", "x") == \
        "browse the runs: mlflow ui --backend-store-uri sqlite:////data/mlflow.db, then open http://127.0.0.1:5000 " \
        "(experiment x)"
