"""Reruns, nested LOSO, the paper table, paired comparisons and plots, end to end on a small
synthetic search: real Ray (2 CPUs), Optuna and MLflow (sqlite in tmp_path), nothing mocked.

The search: 3 STSTNet trials (2 epochs) on 6 synthetic subjects. Reruns use 2-3 seeds, nested
LOSO 2 outer folds x 2 trials: about a minute in all on 2 cores. (tests/unit/test_paper_table.py checks
the paper table's rules on made-up reruns on the composite's 68 subjects.)
"""
import ast
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from ray import tune

from htnet.metrics import per_subject_accuracy
from search import cli
from search.driver import runner
from report_tables import read_latex_table, read_markdown_table
from search.reports.leaderboard import leaderboard, open_store, read_csv_artifact
from search.nested import NestedOptions, run_nested
from search.reports.paper_table import PUBLISHED
from search.reports.stats import seed_subject_bootstrap
from search_fixtures import died, kill_session, parent_run, search_options, start_cli, wait_until, write_space

TINY_HTNET = ["--set", "model_config.dim=16", "--set", "model_config.heads=1", "--set", "model_config.patch_size=14",
              "--set", "model_config.num_hierarchies=1", "--set", "model_config.block_repeats=[1]"]
SMALL = ["--set", "epochs=2", "--set", "batch_size=32", "--set", "lr=0.003", "--set", "subjects=6",
         "--set", "inner_val_subjects=2", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def ray2():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def runs_with(uri, **tags):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("htnet")
    where = " and ".join(f"tags.`{k.replace('_', '.')}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment.experiment_id], filter_string=where, max_results=1000)


def artifacts(uri, run_id, path=None):
    return {a.path for a in MlflowClient(uri).list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def work(ray2, tmp_path_factory):
    """One search, its reruns (best found with 3 seeds, the paper-config preset and STSTNet with 2
    seeds each, made small by --set) and a nested LOSO, all in one MLflow store."""
    tmp = tmp_path_factory.mktemp("report")
    space = write_space(tmp / "tiny.yaml", num_samples=3, max_concurrent_trials=2)
    options = search_options(tmp, space, "tiny", subjects="6")
    summary = runner.run_search(options)
    assert summary["complete"] and summary["counts"] == {"finished": 3}
    uri, storage = options.tracking_uri, str(tmp / "runs")
    common = ["--tracking-uri", uri, "--storage", storage]
    data = summary["manifest"]["data_root"]
    codes = {
        "best": cli.main(["rerun", "--best", "tiny", "--seeds", "3", *common]),
        "paper": cli.main(["rerun", "--preset", "htnet-paper", "--seeds", "2", "--data", data,
                                  *TINY_HTNET, *SMALL, *common]),
        "ststnet": cli.main(["rerun", "--preset", "ststnet", "--seeds", "2", "--data", data, *SMALL,
                                    "--set", "protocols=[paper,final]", *common]),
    }
    nested = run_nested(NestedOptions(space=str(space), name="nest", storage=storage, outer_subjects="2",
                                      num_samples=2, tracking_uri=uri))
    return {"tmp": tmp, "uri": uri, "storage": storage, "summary": summary, "codes": codes, "nested": nested,
            "data": data}


def test_leaderboard_ranks_the_real_search(work):
    table = leaderboard(open_store(work["uri"]), ["tiny"])
    runs = {r.info.run_id: r for r in runs_with(work["uri"], htnet_search="tiny", htnet_role="trial")}
    assert len(table) == 3 and set(table["run_id"]) == set(runs)
    values = [runs[r].data.metrics["inner_val_uf1"] for r in table["run_id"]]
    assert values == sorted(values, reverse=True) and table["objective_value"].tolist() == values
    assert {"lr", "batch_size", "model"} <= set(table.columns)
    for _, row in table.iterrows():
        assert row["Full UF1"] == runs[row["run_id"]].data.metrics["inner_full_uf1"]
        assert row["CASME II UAR"] == runs[row["run_id"]].data.metrics["inner_casme2_uar"]


def test_rerun_of_the_best_trial_reports_intervals(work):
    uri = work["uri"]
    assert work["codes"]["best"] == 0
    search = parent_run(uri, "tiny")
    [parent] = runs_with(uri, htnet_role="rerun", htnet_method="STSTNet (best found)")
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["htnet.source_run_id"] == search.data.tags["htnet.best_run_id"]
    assert tags["htnet.source_search"] == "tiny"
    assert tags["htnet.seeds"] == "2,3,4"   # the trial ran seed 1: its rerun takes fresh seeds
    assert parent.info.status == "FINISHED" and metrics["n_seeds"] == 3
    assert tags["mlflow.source.git.commit"] and tags["htnet.data_fingerprint"].startswith("csv:")
    assert "torch=" in tags["htnet.versions"]
    assert (tags["htnet.data_source"], tags["htnet.data_subjects"]) == ("synthetic", "6")
    children = runs_with(uri, mlflow_parentRunId=parent.info.run_id)
    assert sorted(int(c.data.tags["htnet.seed"]) for c in children) == [2, 3, 4]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["htnet.role"] == "rerun_seed"
        assert child.data.params["seed"] == child.data.tags["htnet.seed"]
        assert child.data.tags["htnet.data_fingerprint"] == tags["htnet.data_fingerprint"]
        assert child.data.params["lr"] == parent.data.params["lr"]
        assert {"predictions.csv", "config.yaml", "confusion_matrix.png", "learning_curve.png"} <= \
            artifacts(uri, child.info.run_id)
    assert {"seeds.csv", "summary.csv", "summary.md", "predictions.csv", "confusion_matrices.png",
            "config.yaml"} <= artifacts(uri, parent.info.run_id)
    pooled = read_csv_artifact(open_store(uri), parent.info.run_id, "predictions.csv")
    assert sorted(pooled["seed"].unique()) == [2, 3, 4]
    bounds = seed_subject_bootstrap(pooled)  # over seeds and subjects: inside [0, 1], unlike a t-interval
    for key in ("inner_full_uf1", "paper_samm_uar", "final_smic_uf1"):
        values = np.array([c.data.metrics[key] for c in children])
        assert metrics[f"{key}_mean"] == pytest.approx(values.mean())
        assert metrics[f"{key}_std"] == pytest.approx(values.std(ddof=1))
        low, high = metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"]
        assert (low, high) == pytest.approx(bounds[key]) and 0 <= low <= high <= 1
    assert "fold_epochs_ci95_low" not in metrics  # no interval where there are no predictions to resample
    assert "plots/rerun_confusion_matrices.png" in artifacts(uri, search.info.run_id, "plots")


def test_rerun_with_the_trials_seed_reproduces_it(work, capsys):
    uri = work["uri"]
    best_id = parent_run(uri, "tiny").data.tags["htnet.best_run_id"]
    code = cli.main(["rerun", "--run-id", best_id, "--seed-list", "1", "--method", "replica",
                            "--tracking-uri", uri, "--storage", work["storage"]])
    printed = capsys.readouterr().out
    assert code == 0 and "(one seed: no spread)" in printed and "fewer than 3 seeds: no interval" in printed
    assert "1 seed (1)" in printed and "1 seeds" not in printed
    [replica] = runs_with(uri, htnet_role="rerun", htnet_method="replica")
    trial = MlflowClient(uri).get_run(best_id)
    for key in ("paper_full_uf1", "inner_full_uar", "final_samm_uf1", "inner_val_uf1"):
        assert replica.data.metrics[f"{key}_mean"] == pytest.approx(trial.data.metrics[key])
    assert math.isnan(replica.data.metrics.get("inner_full_uf1_std", float("nan")))


def test_a_killed_rerun_run_again_goes_on_from_each_seeds_finished_folds(work, ray2, capsys):
    """A rerun's seeds are trials of a Ray Tune experiment in its Ray storage until MLflow has them (a finished
    rerun leaves none); the same command after the rerun's process is SIGKILLed mid-way trains only the folds that
    Ray's snapshot of it does not hold, and gives the same numbers as the uninterrupted replica."""
    uri, storage = work["uri"], work["storage"]
    assert not list((Path(storage) / "ray").glob("rerun-*")), "a finished rerun left its Ray Tune experiment"
    best_id = parent_run(uri, "tiny").data.tags["htnet.best_run_id"]
    command = ["rerun", "--run-id", best_id, "--seed-list", "1", "--method", "replica again", "--tracking-uri", uri,
               "--storage", storage, "--address", ray2.get_runtime_context().gcs_address]
    log = work["tmp"] / "killed-rerun.log"
    killed = start_cli(command, log)

    def worker():   # the seed's process, once it reported a finished fold (a line of Ray Tune's result.json)
        texts = [path.read_text() for path in (Path(storage) / "ray").glob("rerun-*/seed-1/result.json")]
        return texts and "\n" in texts[0] and json.loads(texts[0].partition("\n")[0])["htnet_pid"]

    def snapshot_folds():   # the finished folds in the checkpoint that Ray's snapshot of the experiment names
        [experiment] = (Path(storage) / "ray").glob("rerun-*")
        try:
            [trial] = tune.ExperimentAnalysis(str(experiment)).trials
        except ValueError:   # no snapshot yet
            return 0
        return len(list(Path(trial.checkpoint.path, "folds").glob("*.json"))) if trial.checkpoint else 0

    pid = wait_until(worker, timeout=600, interval=0.2, what="a finished fold", unless=died(killed, log))
    os.kill(pid, signal.SIGSTOP)   # mid-way: its other folds wait until it is killed
    wait_until(lambda: snapshot_folds() >= 1, timeout=300, what="a snapshot naming a checkpoint",
               unless=died(killed, log))
    for process in (killed.pid, pid):
        os.kill(process, signal.SIGKILL)
    killed.wait()
    kill_session(killed)
    assert cli.main(command) == 0
    printed = capsys.readouterr().out
    assert "going on from the interrupted rerun there" in printed and "fold-epochs from an earlier attempt" in printed
    [again] = [r for r in runs_with(uri, htnet_role="rerun", htnet_method="replica again")
               if r.info.status == "FINISHED"]   # the killed one's run stays RUNNING
    [replica] = runs_with(uri, htnet_role="rerun", htnet_method="replica")
    for key in ("paper_full_uf1", "inner_full_uar", "final_samm_uf1"):
        assert again.data.metrics[f"{key}_mean"] == replica.data.metrics[f"{key}_mean"]
    [seed] = runs_with(uri, mlflow_parentRunId=again.info.run_id)
    metrics = seed.data.metrics
    assert metrics["fold_epochs_resumed"] >= metrics["fold_epochs"] / 6   # the snapshot's fold or more
    assert metrics["fold_epochs_attempt"] == metrics["fold_epochs"] - metrics["fold_epochs_resumed"]  # the rest only
    assert not list((Path(storage) / "ray").glob("rerun-*"))


def test_nested_loso_runs_the_search_inside_each_outer_fold(work):
    uri, nested = work["uri"], work["nested"]
    [parent] = runs_with(uri, htnet_role="nested")
    metrics, tags = parent.data.metrics, parent.data.tags
    assert parent.info.status == "FINISHED" and tags["htnet.method"] == "Search + STSTNet (nested LOSO)"
    assert metrics["nested_outer_folds"] == 2 and metrics["nested_trials"] == 4
    assert metrics["nested_fold_epochs"] > 0 and metrics["nested_wall_time_s"] > 0
    assert "2 outer folds x 2 trials" in tags["htnet.cost"] and "fold-epochs" in tags["htnet.cost_actual"]
    assert 0 <= metrics["inner_full_uf1"] <= 1 and "paper_full_uf1" in metrics
    folds = runs_with(uri, mlflow_parentRunId=parent.info.run_id)
    assert len(folds) == 2
    store = open_store(uri)
    for fold in folds:
        outer = fold.data.tags["htnet.outer_subject"]
        trained_on = fold.data.params["subjects"]
        assert outer not in ast.literal_eval(trained_on) and len(ast.literal_eval(trained_on)) == 5
        predictions = read_csv_artifact(store, fold.info.run_id, "predictions.csv")
        assert set(predictions["subject"].astype(str)) == {outer}
        trials = read_csv_artifact(store, fold.info.run_id, "inner_trials.csv")
        assert len(trials) == 2 and set(trials["status"]) <= {"finished", "pruned", "failed"}
    pooled = nested["predictions"]
    assert pooled["subject"].nunique() == 2 and set(pooled["protocol"]) == {"paper", "final", "inner"}
    assert {"predictions.csv", "outer_folds.csv", "inner_trials.csv", "summary.md"} <= \
        artifacts(uri, parent.info.run_id)


PAPER_LABEL = "HTNet (paper config, epochs=2, lr=0.003, batch_size=32, +6 more)"  # TINY_HTNET and SMALL changed it
STSTNET_LABEL = "STSTNet (epochs=2, lr=0.003, batch_size=32, +1 more)"


def test_reruns_say_what_their_settings_changed(work, capsys):
    uri = work["uri"]
    assert work["codes"]["paper"] == 0 and work["codes"]["ststnet"] == 0
    [paper] = runs_with(uri, htnet_role="rerun", htnet_method=PAPER_LABEL)
    assert paper.data.params["epochs"] == "2" and paper.data.tags["htnet.data_source"] == "synthetic"
    [_] = runs_with(uri, htnet_role="rerun", htnet_method=STSTNET_LABEL)
    # --best picks among the trials with --param; this search tried STSTNet only
    code = cli.main(["rerun", "--best", "tiny", "--param", "model=htnet", "--tracking-uri", uri])
    assert code == 2 and capsys.readouterr().err == \
        "error: search 'tiny' has no finished trial with model=htnet to rerun\n"


def test_paper_table_refuses_other_data_unless_asked_and_marks_it(work, tmp_path, capsys):
    uri = work["uri"]
    out = tmp_path / "table"
    # every rerun here ran on the synthetic set: none is put beside the published rows
    assert cli.main(["paper-table", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    md = read_markdown_table((out / "paper_table.md").read_text())
    published = ["HTNet *", "STSTNet *", "Dual-Inception *", "OFF-ApexNet *"]
    assert md["Method"].tolist() == [m for m in published for _ in range(3)]  # a row per protocol each
    assert md["Protocol"].tolist() == ["paper", "final", "inner"] * len(published)
    for label in ("STSTNet (best found)", PAPER_LABEL, STSTNET_LABEL, "Search + STSTNet (nested LOSO)"):
        assert f"left out {label!r}: " in printed
    assert "data synthetic (6 subjects, " in printed and "--allow-mixed includes" in printed
    assert "missing row 'HTNet (best found)': run `python -m search rerun --best SEARCH --param model=htnet`" \
        in printed

    assert cli.main(["paper-table", "--tracking-uri", uri, "--out", str(out), "--allow-mixed"]) == 0
    printed = capsys.readouterr().out
    assert "missing row 'HTNet (paper config)'" in printed  # its settings were changed: not the paper config
    text = (out / "paper_table.md").read_text()
    md, tex = read_markdown_table(text), read_latex_table((out / "paper_table.tex").read_text())
    assert list(md.columns[:4]) == ["Method", "Protocol", "Source", "Data"] and len(md.columns) == 12
    assert list(tex.columns[4:]) == ["UF1", "UAR"] * 4
    assert md.fillna("").values.tolist() == tex.fillna("").values.tolist()  # the same table
    rows = {(m, p): row for m, p, row in zip(md["Method"], md["Protocol"], md.to_dict("records"))}

    htnet = rows[("HTNet *", "paper")]
    assert htnet["Source"].startswith("published") and htnet["Data"] == "composite, 68 subjects"
    assert [float(htnet[c]) for c in md.columns[4:]] == [.8603, .8475, .8049, .7905, .9532, .9516, .8131, .8124]
    ststnet = rows[("STSTNet *", "final")]
    assert (float(ststnet["Full UF1"]), float(ststnet["Full UAR"])) == (0.7209, 0.7250)
    assert all(pd.isna(ststnet[c]) for c in md.columns[6:])  # no per-dataset published numbers
    assert PUBLISHED[0]["values"]["full"] == (0.8603, 0.8475)

    # Ours, marked †: the paper protocol and the leak-free one; std from 3 seeds on, else the mean only.
    for method, leak_free, seeds in (("STSTNet (best found)", "inner", 3), (PAPER_LABEL, "inner", 2),
                                     (STSTNET_LABEL, "final", 2)):
        [run] = runs_with(uri, htnet_role="rerun", htnet_method=method)
        m = run.data.metrics
        for protocol in ("paper", leak_free):
            row = rows[(f"{method} †", protocol)]
            assert row["Source"] == f"ours, {seeds} seeds, 2 epochs" and row["Data"] == "synthetic, 6 subjects"
            full, samm = m[f"{protocol}_full_uf1_mean"], m[f"{protocol}_samm_uar_mean"]
            if seeds >= 3:
                assert row["Full UF1"] == f"{full:.4f} ± {m[f'{protocol}_full_uf1_std']:.4f}"
            else:
                assert (row["Full UF1"], row["SAMM UAR"]) == (f"{full:.4f}", f"{samm:.4f}")
    not_run = rows[(f"{STSTNET_LABEL} †", "inner")]  # that rerun ran paper and final only
    assert not_run["Source"] == "not run" and all(pd.isna(not_run[c]) for c in md.columns[4:])
    nested = rows[("Search + STSTNet (nested LOSO) †", "inner")]
    assert nested["Source"] == "ours, nested LOSO (2 outer folds), 2 epochs" and nested["Data"] == \
        "synthetic, 2 subjects"
    assert float(nested["Full UF1"]) == pytest.approx(work["nested"]["metrics"]["inner_full_uf1"], abs=5e-5)
    methods = md["Method"].tolist()
    assert methods.index("HTNet *") < methods.index(f"{PAPER_LABEL} †")
    assert methods.index("STSTNet *") < methods.index(f"{STSTNET_LABEL} †")
    assert text.startswith("Table: Micro-expression recognition under LOSO (3 classes); rows marked †")
    # the commit and data each of our rows was built from, in the notes and the CSV
    [run] = runs_with(uri, htnet_role="rerun", htnet_method=STSTNET_LABEL)
    built = (f"Built from code at commit {run.data.tags['mlflow.source.git.commit'][:12]}"
             f"{' (dirty)' if run.data.tags['htnet.git_dirty'] == 'true' else ''} "
             f"on data synthetic ({run.data.tags['htnet.data_fingerprint']}; 6 subjects, ")
    assert built in text and r"\multicolumn{2}{c}{CASME II}" in (out / "paper_table.tex").read_text()
    assert "rows (per method, the finished rerun (or nested LOSO run) with the most seeds" in text

    numbers = pd.read_csv(out / "paper_table.csv")
    assert set(numbers["kind"]) == {"published", "rerun", "nested"}
    ours = numbers[numbers["kind"] != "published"]
    assert set(ours["data"]) == {"synthetic"} and not ours["published_data"].any()
    assert set(ours["fingerprint"]) == {run.data.tags["htnet.data_fingerprint"]}
    [logged] = runs_with(uri, htnet_role="paper_table")
    assert logged.data.tags["mlflow.source.git.commit"] == run.data.tags["mlflow.source.git.commit"]
    assert logged.data.tags["htnet.allow_mixed"] == "true"
    assert {"paper_table.md", "paper_table.tex", "paper_table.csv"} <= artifacts(uri, logged.info.run_id)


def test_paired_comparison_of_two_trials(work, tmp_path, capsys):
    uri = work["uri"]
    table = leaderboard(open_store(uri), ["tiny"])
    best, worst = table["run_id"].iloc[0], table["run_id"].iloc[-1]
    out_json, out_csv = tmp_path / "cmp.json", tmp_path / "cmp.csv"
    code = cli.main(["compare", best, worst, "--tracking-uri", uri, "--n-boot", "2000",
                            "--json", str(out_json), "--csv", str(out_csv)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sign-flip permutation test, exact" in printed and "95% paired bootstrap interval" in printed
    result = json.loads(out_json.read_text())
    per_subject = pd.read_csv(out_csv, dtype={"subject": str})
    store = open_store(uri)
    expected = {}
    for name, run_id in (("a", best), ("b", worst)):
        acc = per_subject_accuracy(read_csv_artifact(store, run_id, "predictions.csv"))
        acc = acc[acc["protocol"] == "inner"]
        expected[name] = dict(zip(acc["subject"].astype(str), acc["accuracy"]))
    assert result["subjects"] == 6 == len(per_subject)
    for _, row in per_subject.iterrows():
        assert row["diff"] == pytest.approx(expected["a"][row["subject"]] - expected["b"][row["subject"]])
    assert result["mean_diff"] == pytest.approx(per_subject["diff"].mean())
    assert result["ci95"][0] <= result["mean_diff"] <= result["ci95"][1]
    assert 0 < result["p_sign_flip"] <= 1 and result["p_exact"]

    [rerun] = runs_with(uri, htnet_role="rerun", htnet_method="STSTNet (best found)")
    assert cli.main(["compare", rerun.info.run_id, worst, "--tracking-uri", uri, "--protocol", "paper",
                            "--n-boot", "500", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["seeds_a"] == 3
    assert cli.main(["compare", best, "no-such-run", "--tracking-uri", uri]) == 2
    assert "neither a file nor an MLflow run" in capsys.readouterr().err


def test_plots_are_logged_to_the_search_parent_run(work, tmp_path):
    uri = work["uri"]
    assert cli.main(["plots", "tiny", "--tracking-uri", uri]) == 0
    search = parent_run(uri, "tiny")
    logged = artifacts(uri, search.info.run_id, "plots")
    assert {"plots/optimization_history.png", "plots/param_importances.png", "plots/parallel_coordinate.png",
            "plots/best_trial_per_subject_accuracy.png"} <= logged
    import mlflow.artifacts
    local = mlflow.artifacts.download_artifacts(run_id=search.info.run_id, artifact_path="plots/param_importances.png",
                                                tracking_uri=uri, dst_path=str(tmp_path))
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
