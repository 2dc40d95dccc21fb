"""Leaderboard, exports and the statistics of the reports, on MLflow runs with known values.

The searches here are written to a real MLflow store (sqlite in tmp_path) with search.tracking's
own functions, in the schema of docs/design.md, so that ranks and intervals can be checked
against hand-computed values. test_report.py runs real searches, reruns and nested LOSO.
"""
import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from htnet.metrics import uf1_uar
from search import cli, tracking
from search.reports.compare import compare
from report_tables import read_latex_table, read_markdown_table
from search.reports.export import format_numbers, latex_table, markdown_table
from search.reports.leaderboard import METRIC_COLUMNS, best_run_id, leaderboard, open_store, paper_form, search_parents
from search.space import load_space
from search.reports.stats import cluster_bootstrap_uf1_uar, paired_bootstrap, sign_flip_pvalue, uf1_uar_from_counts
from search_fixtures import write_space

DATASETS = ("full", "smic", "casme2", "samm")
PROTOCOLS = ("paper", "final", "inner")


def trial_metrics(base):
    """Distinct, recognisable values: protocol p, dataset d, metric m -> base + offsets."""
    out = {}
    for i, p in enumerate(PROTOCOLS):
        for j, d in enumerate(DATASETS):
            out[f"{p}_{d}_uf1"] = round(base + 0.01 * i + 0.001 * j, 6)
            out[f"{p}_{d}_uar"] = round(base + 0.01 * i + 0.001 * j + 0.0005, 6)
    return out


def add_trial(client, experiment_id, parent_id, search, trial_id, status, objective, value,
              params, attempt=1, extra_tags=None, folds=6, sampled=("lr", "batch_size")):
    """A trial run as the search writes it; `sampled`: the keys its space() returned (None: a run recorded before
    htnet.sampled)."""
    tags = {"mlflow.parentRunId": parent_id, "htnet.role": "trial", "htnet.search": search,
            "htnet.trial_id": trial_id, "htnet.attempt": attempt, "htnet.status": status,
            "htnet.objective": objective, **({} if sampled is None else {"htnet.sampled": ",".join(sampled)}),
            **(extra_tags or {})}
    run = client.create_run(experiment_id, tags={k: str(v) for k, v in tags.items()}, run_name=f"trial_{trial_id}")
    tracking.log_params(client, run.info.run_id, params)
    if status != "failed":
        tracking.log_metrics(client, run.info.run_id, {**trial_metrics(value), objective: value,
                                                       "folds_done": folds})
    client.set_terminated(run.info.run_id, "FAILED" if status == "failed" else "FINISHED")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two searches with known objective values.

    alpha (objective inner_val_uf1): t1 0.60, t2 0.80, t3 0.70 finished; t4 pruned at 0.95 (ranked
    after every finished trial); t5 failed; t6 failed once (retried) and finished with 0.65 on
    attempt 2; t7 lost with a killed driver (left out).
    beta (objective paper_full_uf1): b1 0.75, b2 0.50 finished."""
    tmp = tmp_path_factory.mktemp("leaderboard")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, "htnet", uri)
    space = load_space(write_space(tmp / "alpha.py", num_samples=7))
    parent = tracking.start_parent_run(client, experiment_id, "alpha", space, "inner_val_uf1")
    objective = "inner_val_uf1"
    ids = {}
    for trial_id, status, value, lr, batch in (("t1", "finished", 0.60, 1e-3, 16), ("t2", "finished", 0.80, 2e-3, 32),
                                               ("t3", "finished", 0.70, 5e-5, 16), ("t4", "pruned", 0.95, 3e-3, 32),
                                               ("t5", "failed", math.nan, 9e-3, 16)):
        ids[trial_id] = add_trial(client, experiment_id, parent, "alpha", trial_id, status, objective, value,
                                  {"model": "ststnet", "lr": lr, "batch_size": batch, "epochs": 2},
                                  folds=3 if status == "pruned" else 6)
    add_trial(client, experiment_id, parent, "alpha", "t6", "failed", objective, math.nan,
              {"model": "ststnet", "lr": 4e-3, "batch_size": 32, "epochs": 2}, extra_tags={"htnet.retried": "true"})
    ids["t6"] = add_trial(client, experiment_id, parent, "alpha", "t6", "finished", objective, 0.65,
                          {"model": "ststnet", "lr": 4e-3, "batch_size": 32, "epochs": 2}, attempt=2)
    add_trial(client, experiment_id, parent, "alpha", "t7", "failed", objective, 0.99,
              {"model": "ststnet", "lr": 1e-3, "batch_size": 16, "epochs": 2}, extra_tags={"htnet.lost": "true"})

    beta_space = load_space(write_space(tmp / "beta.py", num_samples=2, objective="paper"))
    beta = tracking.start_parent_run(client, experiment_id, "beta", beta_space, "paper_full_uf1")
    for trial_id, value in (("b1", 0.75), ("b2", 0.50)):
        ids[trial_id] = add_trial(client, experiment_id, beta, "beta", trial_id, "finished", "paper_full_uf1",
                                  value, {"model": "ststnet", "lr": 1e-3 * value, "batch_size": 16, "epochs": 2},
                                  sampled=None)
    return {"uri": uri, "tmp": tmp, "ids": ids, "store": open_store(uri, "htnet")}


def test_trials_are_ranked_by_the_objective_then_status(store):
    table = leaderboard(store["store"], ["alpha"])
    assert table["trial"].tolist() == ["t2", "t3", "t6", "t1", "t4", "t5"]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert table["status"].tolist() == ["finished"] * 4 + ["pruned", "failed"]
    assert table["objective_value"].iloc[:5].tolist() == [0.80, 0.70, 0.65, 0.60, 0.95]
    assert table["run_id"].iloc[2] == store["ids"]["t6"]  # the retried trial's latest attempt
    assert "t7" not in table["trial"].tolist()              # lost with the driver
    # The searched parameters (the keys its trials' space() returned) and the model are the key columns.
    assert {"model", "lr", "batch_size"} <= set(table.columns)
    assert table.loc[table["trial"] == "t3", "lr"].item() == pytest.approx(5e-5)
    # The objective protocol's UF1/UAR for Full, SMIC, CASME II, SAMM.
    t2 = table.iloc[0]
    assert t2["protocol"] == "inner"
    expected = trial_metrics(0.80)
    assert t2["Full UF1"] == pytest.approx(expected["inner_full_uf1"])
    assert t2["SAMM UAR"] == pytest.approx(expected["inner_samm_uar"])
    assert list(table.columns[-10:-2]) == list(METRIC_COLUMNS)
    assert table["folds"].iloc[:5].tolist() == [6, 6, 6, 6, 3] and pd.isna(table["folds"].iloc[5])


def test_the_trial_table_is_the_one_reader_of_a_search(store):
    """tracking.trial_table: every attempt (latest=False) or each trial's latest attempt, ranked;
    the runs of a trial lost with the driver are never in it."""
    s = store["store"]
    parent = tracking.newest_run_ids(s.client, s.experiment_id, "tags.`htnet.role` = 'search'", "htnet.search")
    every = tracking.trial_table(s.client, s.experiment_id, parent["alpha"], latest=False)
    assert sorted(every["trial_id"]) == ["t1", "t2", "t3", "t4", "t5", "t6", "t6"]
    assert every.loc[every["trial_id"] == "t6", ["attempt", "retried"]].values.tolist() == [[1, True], [2, False]]
    latest = tracking.trial_table(s.client, s.experiment_id, parent["alpha"], "inner_val_uf1", ["lr"])
    assert latest["trial_id"].tolist() == ["t2", "t3", "t6", "t1", "t4", "t5"]
    assert latest["run_id"].tolist()[2] == store["ids"]["t6"] and set(latest["run_status"]) == {"FINISHED", "FAILED"}
    assert latest["lr"].dtype.kind == "f"  # MLflow's text params read back as numbers
    assert latest["metrics.paper_full_uf1"].iloc[0] == pytest.approx(trial_metrics(0.80)["paper_full_uf1"])
    assert latest["folds_done"].tolist()[:5] == [6, 6, 6, 6, 3]
    none = tracking.runs(s.client, s.experiment_id, "tags.`htnet.role` = 'nothing'", ["tags.htnet.search"])
    assert len(none) == 0 and {"run_id", "status", "start_time", "tags.htnet.search"} <= set(none.columns)


def test_the_parent_run_counts_every_status_again_at_each_finish(tmp_path):
    """A search stopped with 2 trials running, resumed and finished: its parent run's counts are the last
    finish's, every status logged (0 too), so no stale trials_interrupted stands (seen on the cpu-study)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("e")).info.run_id
    stopped = pd.DataFrame({"status": ["finished", "interrupted", "interrupted"], "trial_id": ["a", "b", "c"]})
    tracking.finish_parent_run(client, parent, stopped, "inner_val_uf1", status="KILLED")
    assert client.get_run(parent).data.metrics["trials_interrupted"] == 2
    done = stopped.assign(status=["finished", "finished", "pruned"])
    tracking.finish_parent_run(client, parent, done, "inner_val_uf1")
    metrics = client.get_run(parent).data.metrics
    assert (metrics["trials_interrupted"], metrics["trials_finished"], metrics["trials_pruned"]) == (0, 2, 1)
    assert metrics["trials_failed"] == 0 and metrics["trials_running"] == 0


def test_several_searches_protocols_and_filters(store):
    both = leaderboard(store["store"])
    assert set(both["search"]) == {"alpha", "beta"} and len(both) == 8
    beta = both[both["search"] == "beta"]
    assert beta["protocol"].tolist() == ["paper", "paper"] and beta["objective"].iloc[0] == "paper_full_uf1"
    # b1 (0.75) sits between alpha's t2 (0.80) and t3 (0.70).
    assert both["trial"].tolist()[:3] == ["t2", "b1", "t3"]
    # beta's runs predate htnet.sampled: its key columns are the parameters that vary (lr), not the constant ones
    alone = leaderboard(store["store"], ["beta"])
    assert "lr" in alone and "batch_size" not in alone and "epochs" not in alone

    every = leaderboard(store["store"], ["alpha"], protocol="all")
    assert len(every) == 18 and every[every["trial"] == "t2"]["protocol"].tolist() == ["paper", "final", "inner"]
    assert every[every["trial"] == "t2"]["rank"].tolist() == [1, 1, 1]
    paper = leaderboard(store["store"], ["alpha"], protocol="paper")
    assert paper.iloc[0]["Full UF1"] == pytest.approx(trial_metrics(0.80)["paper_full_uf1"])

    finished = leaderboard(store["store"], ["alpha"], statuses=["finished"])
    assert finished["trial"].tolist() == ["t2", "t3", "t6", "t1"]
    assert leaderboard(store["store"], ["alpha"], params={"batch_size": "16"})["trial"].tolist() == ["t3", "t1", "t5"]
    assert leaderboard(store["store"], ["alpha"], params={"lr": "0.00005"})["trial"].tolist() == ["t3"]
    assert leaderboard(store["store"], ["alpha"], top=2)["trial"].tolist() == ["t2", "t3"]


def test_exports_parse_back(store, tmp_path, capsys):
    csv, md, tex = tmp_path / "lb.csv", tmp_path / "lb.md", tmp_path / "lb.tex"
    code = cli.main(["leaderboard", "alpha", "--tracking-uri", store["uri"], "--csv", str(csv),
                            "--markdown", str(md), "--latex", str(tex)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "t2" in printed and "written:" in printed
    table = leaderboard(store["store"], ["alpha"])

    back = pd.read_csv(csv)
    assert back["trial"].tolist() == table["trial"].tolist()
    np.testing.assert_allclose(back["Full UF1"], table["Full UF1"], equal_nan=True)
    np.testing.assert_allclose(back["lr"], table["lr"])

    full = tmp_path / "full.tex"
    assert cli.main(["leaderboard", "alpha", "--tracking-uri", store["uri"], "--latex", str(full), "--full"]) == 0
    for parsed in (read_markdown_table(md.read_text()), read_latex_table(full.read_text())):
        assert list(parsed.columns) == list(table.columns)
        assert parsed["trial"].tolist() == table["trial"].tolist()
        assert parsed["rank"].astype(int).tolist() == table["rank"].tolist()
        np.testing.assert_allclose(parsed["Full UF1"].astype(float), table["Full UF1"], atol=5e-5, equal_nan=True)
        np.testing.assert_allclose(parsed["lr"].astype(float), table["lr"], rtol=1e-5)
        assert parsed["objective"].iloc[0] == "inner_val_uf1"  # underscores survive LaTeX escaping
    assert r"inner\_val\_uf1" in full.read_text() and r"\toprule" in full.read_text()
    # the default LaTeX is the paper form: no run ids, trial ids or per-dataset columns
    paper = read_latex_table(tex.read_text())
    assert list(paper.columns) == ["Rank", "Status", "Model", "lr", "batch_size", "inner_val_uf1", "UF1 (inner)",
                                   "UAR (inner)"]   # the key parameters in the order space() returned them
    assert paper["Model"].tolist() == ["STSTNet"] * 6 and paper["Status"].iloc[4] == "pruned"
    np.testing.assert_allclose(paper["UF1 (inner)"].iloc[:5].astype(float), table["Full UF1"].iloc[:5], atol=5e-5)


def test_the_paper_form_of_mixed_models(tmp_path):
    """HTNet-only parameters: a column only where some trial has them, '-' for the STSTNet trials."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, "htnet", uri)
    space = load_space(write_space(tmp_path / "mixed.py", space={"model": {"choice": ["htnet", "ststnet"]}}))
    parent = tracking.start_parent_run(client, experiment_id, "mixed", space, "inner_val_uf1")
    for trial_id, value, params in (("h1", 0.7, {"model": "htnet", "lr": 2e-3, "model_config.dim": 32}),
                                    ("s1", 0.8, {"model": "ststnet", "lr": 3e-3})):
        add_trial(client, experiment_id, parent, "mixed", trial_id, "finished", "inner_val_uf1", value,
                  {**params, "epochs": 2}, sampled=list(params))
    table = leaderboard(open_store(uri), ["mixed"])
    form = paper_form(table)
    assert list(form.columns) == ["Rank", "Model", "lr", "dim", "inner_val_uf1", "UF1 (inner)", "UAR (inner)"]
    assert form["Model"].tolist() == ["STSTNet", "HTNet"] and form["dim"].tolist() == ["-", "32"]
    assert len(table.columns) > 2 * len(form.columns)
    store = open_store(uri)
    assert best_run_id(store, search_parents(store, ["mixed"])[0], "mixed", {"model": "htnet"}) == \
        table.loc[table["trial"] == "h1", "run_id"].item()


def test_cli_errors_are_one_line(store, capsys):
    assert cli.main(["leaderboard", "nope", "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no search named 'nope'") and err.count("\n") == 1 and "alpha" in err
    assert cli.main(["leaderboard", "alpha", "--tracking-uri", store["uri"], "--param", "x=1"]) == 2
    assert "no trial has parameter 'x'" in capsys.readouterr().err
    assert cli.main(["leaderboard", "--tracking-uri", store["uri"], "--experiment", "none"]) == 2
    assert "no MLflow experiment 'none'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- exports

def test_markdown_and_latex_round_trip_with_special_characters():
    table = pd.DataFrame({"name": ["a|b", "x_y & z", "50% {ok} ±"], "value": [0.5, np.nan, 1 / 3],
                          "lr": [5e-5, 1e-3, 0.25]})
    text = format_numbers(table, fixed=["value"])
    assert text["lr"].tolist() == ["5e-05", "0.001", "0.25"] and text["value"].tolist() == ["0.5000", "", "0.3333"]
    md = read_markdown_table(markdown_table(text))
    tex = read_latex_table(latex_table(text, caption="t", header_groups=[("", 1), ("numbers", 2)]))
    for parsed in (md, tex):
        assert parsed["name"].tolist() == table["name"].tolist()
        assert parsed["value"].isna().tolist() == [False, True, False]
        np.testing.assert_allclose(parsed["lr"].astype(float), table["lr"])


# ----------------------------------------------------------------------------- statistics

def test_sign_flip_and_bootstrap_known_cases():
    # All five differences positive: of the 32 sign vectors only all-plus and all-minus reach the
    # observed |mean|: p = 2/32.
    p, exact = sign_flip_pvalue([0.1, 0.2, 0.1, 0.3, 0.2])
    assert exact and p == pytest.approx(2 / 32)
    assert sign_flip_pvalue([0.1, -0.1, 0.2, -0.2])[0] == pytest.approx(1.0)
    p, exact = sign_flip_pvalue(np.full(20, 0.1), n_perm=20000)
    assert not exact and p < 1e-3
    assert paired_bootstrap([0.25] * 6) == (pytest.approx(0.25), pytest.approx(0.25))
    low, high = paired_bootstrap([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], n_boot=5000)
    assert 0.0 < low < 0.25 < high < 0.5


def test_vectorised_uf1_uar_equals_htnet_metrics():
    rng = np.random.default_rng(0)
    from htnet.metrics import confusion
    for absent in (None, 2):
        y = rng.integers(0, 3, 200)
        if absent is not None:
            y[y == absent] = 0
        pred = rng.integers(0, 3, 200)
        uf1, uar = uf1_uar_from_counts(confusion(y, pred))
        assert (float(uf1), float(uar)) == pytest.approx(uf1_uar(y, pred))


def _predictions(correct_by_subject, protocol="inner", n=4):
    rows = []
    for s, correct in correct_by_subject.items():
        for k in range(n):
            label = k % 3
            rows.append({"sample": f"{s}_{k}", "subject": s, "dataset": "casme2", "label": label,
                         "protocol": protocol, "prediction": label if k < correct else (label + 1) % 3, "epoch": 1})
    return pd.DataFrame(rows)


def test_paired_comparison_on_known_predictions():
    a = _predictions({"s1": 4, "s2": 3, "s3": 2, "s4": 4, "s5": 1})
    b = _predictions({"s1": 2, "s2": 3, "s3": 1, "s4": 2, "s5": 0, "s6": 4})   # s6: not in A
    result = compare(a, b, n_boot=2000)
    table = result["per_subject"]
    assert table["subject"].tolist() == ["s1", "s2", "s3", "s4", "s5"] and result["subjects"] == 5
    assert table["diff"].tolist() == pytest.approx([0.5, 0.0, 0.25, 0.5, 0.25])
    assert result["mean_diff"] == pytest.approx(0.3)
    assert (result["wins"], result["losses"], result["ties"]) == (4, 0, 1)
    # Exact sign-flip over 5 subjects (one zero): |mean| >= 0.3 only for all-plus/all-minus of
    # the non-zero ones, each with either sign of the zero: 4 of 32.
    assert result["p_exact"] and result["p_sign_flip"] == pytest.approx(4 / 32)
    assert result["ci95"][0] <= 0.3 <= result["ci95"][1]
    assert result["samples_dropped"] == [0, 4]
    assert result["uf1_a"] == pytest.approx(uf1_uar(a["label"], a["prediction"])[0])
    low, high = result["uf1_diff_ci95"]
    assert low <= result["uf1_diff"] <= high
    same = cluster_bootstrap_uf1_uar(np.ones((3, 3, 3)), np.ones((3, 3, 3)), n_boot=100)
    assert same["uf1"] == (0.0, 0.0)


def test_trial_run_names_read_at_a_glance():
    from search.tracking.schema import run_name

    sampled = {"model": "htnet", "model_config.dim": 64, "model_config.heads": 3, "lr": 3.1e-4, "batch_size": 128,
               "epochs": 200}
    assert run_name("htnet", sampled, 7) == "htnet d64 h3 lr3.1e-4 bs128 #07"
    blocks = {"lr": 0.05, "model_config.block_repeats": [2, 2, 10]}
    assert run_name("ststnet", blocks, "ab12") == "ststnet lr0.05 b2-2-10 #ab12"
