"""The paper table's row choice, data checks, intervals and marks, and the labels of reruns, on rerun parent
runs written to a real MLflow store (sqlite in tmp_path) by rerun's own log_summary from made-up predictions
of known accuracy: 68 subjects / 442 samples laid out as the composite release, or a 9-subject synthetic set."""
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from htnet.metrics import compute_metrics
from search import cli, tracking
from report_tables import read_latex_table, read_markdown_table
from search.reports.paper_table import PUBLISHED, PUBLISHED_DATA
from search.reports.rerun import log_summary
from search.reports.sources import PRESETS, RerunSource, changed_label, changed_settings, data_tags
from search.reports.stats import seed_subject_bootstrap
from search.space import flatten

COMPOSITE = {"casme2": (145, 24), "smic": (164, 16), "samm": (133, 28)}  # samples, subjects
SYNTHETIC = {"casme2": (12, 3), "smic": (12, 3), "samm": (12, 3)}


def predictions(layout, seeds, accuracy, protocols=("paper", "inner"), rng_seed=0):
    """Long predictions of every seed: each sample right with probability `accuracy`, else the next class."""
    rng, rows = np.random.default_rng(rng_seed), []
    for dataset, (samples, subjects) in layout.items():
        for k in range(samples):
            subject, label = f"{dataset}-{k % subjects}", k % 3
            for seed in seeds:
                for protocol in protocols:
                    right = rng.random() < accuracy
                    rows.append({"sample": f"{dataset}-{k}", "subject": subject, "dataset": dataset, "label": label,
                                 "protocol": protocol, "seed": seed, "epoch": 1,
                                 "prediction": label if right else (label + 1) % 3})
    return pd.DataFrame(rows)


def add_rerun(client, experiment_id, method, preset, seeds, layout, source="htnet_composite", sets=None,
              accuracy=0.7, protocols=("paper", "inner")):
    """A rerun parent as `rerun` writes it: its tags, params and config.yaml, then log_summary's metrics and
    artifacts from the seeds' predictions."""
    from htnet.loso import LosoConfig

    config = {k: v for k, v in LosoConfig.from_dict({**PRESETS[preset][0], **(sets or {})}).to_dict().items()
              if k != "seed"}
    frame = predictions(layout, seeds, accuracy, protocols, rng_seed=len(seeds))
    tags = {"htnet.role": "rerun", "htnet.method": method, "htnet.seeds": ",".join(map(str, seeds)),
            "htnet.data_source": source, "htnet.data_subjects": str(sum(s for _, s in layout.values())),
            "htnet.data_samples": str(sum(n for n, _ in layout.values())),
            "htnet.data_fingerprint": f"csv:{source[:6]} images:0", "mlflow.source.git.commit": "abc123"}
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"rerun {method}").info.run_id
    tracking.log_params(client, run_id, {**flatten(config), "seeds": tags["htnet.seeds"]})
    client.log_dict(run_id, config, "config.yaml")
    parts = [frame[frame["seed"] == s] for s in seeds]
    rows = [{"seed": s, "status": "finished", "run_id": "", **compute_metrics(p)} for s, p in zip(seeds, parts)]
    log_summary(client, RerunSource(config, method), run_id, rows, parts, 0.0)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A: 'HTNet (paper config)' on the composite, 5 seeds (oldest); B: the same, 2 seeds (newer); C: labelled
    'HTNet (paper config)' but with epochs=1, on synthetic data (newest); D: STSTNet on synthetic data only."""
    tmp = tmp_path_factory.mktemp("paper")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, "htnet", uri)
    ids = {"A": add_rerun(client, experiment_id, "HTNet (paper config)", "htnet-paper", [1, 2, 3, 4, 5], COMPOSITE),
           "B": add_rerun(client, experiment_id, "HTNet (paper config)", "htnet-paper", [1, 2], COMPOSITE),
           "C": add_rerun(client, experiment_id, "HTNet (paper config)", "htnet-paper", [1, 2, 3], SYNTHETIC,
                          "synthetic", {"epochs": 1}),
           "D": add_rerun(client, experiment_id, "STSTNet", "ststnet", [1, 2, 3], SYNTHETIC, "synthetic")}
    return {"uri": uri, "ids": ids, "client": client}


def table(store, tmp_path, capsys, *args):
    capsys.readouterr()
    code = cli.main(["paper-table", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-log", *args])
    captured = capsys.readouterr()
    if code:
        return code, captured.err, None
    md = (tmp_path / "paper_table.md").read_text()
    return code, captured.out, {"md": md, "table": read_markdown_table(md), "csv": pd.read_csv(tmp_path / "paper_table.csv"),
                                "tex": (tmp_path / "paper_table.tex").read_text()}


def test_rows_on_other_data_are_refused_and_the_rule_is_stated(store, tmp_path, capsys):
    code, out, t = table(store, tmp_path, capsys)
    assert code == 0
    ours = t["csv"][t["csv"]["kind"] == "rerun"]
    # the rule: on the published data, most seeds (A's 5, not the newer B's 2), nothing else
    assert set(ours["run_id"]) == {store["ids"]["A"]} and set(ours["method"]) == {"HTNet (paper config)"}
    assert ours["published_data"].all() and set(ours["data"]) == {"htnet_composite"}
    assert (ours["subjects"] == 68).all() and (ours["samples"] == 442).all() and set(ours["epochs"]) == {800}
    assert "rows (per method, the finished rerun (or nested LOSO run) on the published data with the most seeds" in out
    assert f"HTNet (paper config) = run {store['ids']['A']} (5 seeds, 800 epochs, data htnet_composite" in t["md"]
    # C and D ran on synthetic data: left out, each method named with its best run, its data and the flag
    assert (f"left out 'STSTNet': 1 finished run not on the published data (the best by the rule: run "
            f"{store['ids']['D']} (3 seeds, 800 epochs, data synthetic (9 subjects, 36 samples))); --allow-mixed "
            f"includes it, marked †") in out
    assert "left out 'HTNet (paper config, epochs=1)'" in out  # the preset's label only with its settings
    assert "missing row 'STSTNet': run `python -m search rerun --preset ststnet --data RELEASE`" in out
    assert ("missing row 'HTNet (best found)': run `python -m search rerun --best SEARCH --param model=htnet`"
            in out)
    assert t["md"].startswith("Table: Micro-expression recognition under LOSO on the composite set (442 samples")
    row = t["table"].set_index(["Method", "Protocol"]).loc[("HTNet (paper config)", "paper")]
    assert row["Source"] == "ours, 5 seeds, 800 epochs" and row["Data"] == "htnet_composite, 68 subjects"
    assert "Built from code at commit abc123 on data htnet_composite (csv:htnet_ images:0; 68 subjects, " \
           "442 samples): HTNet (paper config)." in t["md"]

    # named explicitly: a run on other data is refused in one line naming the run, its data and the flag
    code, err, _ = table(store, tmp_path, capsys, "--rerun", f"STSTNet={store['ids']['D']}")
    assert code == 2 and err.count("\n") == 1
    assert err == (f"error: --rerun STSTNet={store['ids']['D']}: ran on data synthetic (9 subjects, 36 samples), "
                   f"not the published data (the composite: 68 subjects, 442 samples); pass --allow-mixed to "
                   f"include it, marked †\n")


def test_allow_mixed_marks_the_rows_on_other_data(store, tmp_path, capsys):
    code, out, t = table(store, tmp_path, capsys, "--allow-mixed")
    assert code == 0 and "left out" not in out
    rows = t["table"].set_index(["Method", "Protocol"])
    assert rows.loc[("HTNet (paper config)", "inner"), "Source"] == "ours, 5 seeds, 800 epochs"  # still A
    assert rows.loc[("STSTNet †", "paper"), "Data"] == "synthetic, 9 subjects"
    assert rows.loc[("HTNet (paper config, epochs=1) †", "inner"), "Source"] == "ours, 3 seeds, 1 epoch"
    assert t["md"].startswith("Table: Micro-expression recognition under LOSO (3 classes); rows marked † are not")
    assert "- Rows marked †: not on the published data (see Data)" in t["md"]
    numbers = t["csv"].set_index("run_id")
    assert not numbers.loc[store["ids"]["D"], "published_data"].any()
    assert read_latex_table(t["tex"]).iloc[:, 0].str.endswith("†").sum() == 6  # 2 methods x 3 protocols


def test_intervals_stay_in_the_metric_range_and_need_three_seeds(store, tmp_path, capsys):
    a, b = store["ids"]["A"], store["ids"]["B"]
    code, _, t = table(store, tmp_path, capsys, "--interval", "ci95", "--rerun", f"HTNet (paper config)={a}",
                       "--rerun", f"two seeds={b}")
    assert code == 0
    numbers = t["csv"].set_index(["run_id", "protocol"])
    metrics = store["client"].get_run(a).data.metrics
    for protocol in ("paper", "inner"):
        row = numbers.loc[(a, protocol)]
        for column, key in (("Full UF1", "full_uf1"), ("SAMM UAR", "samm_uar"), ("SMIC UF1", "smic_uf1")):
            low, high, mean = row[f"{column} ci95_low"], row[f"{column} ci95_high"], row[column]
            assert 0 <= low <= mean <= high <= 1 and high - low < 0.2
            # the rerun parent logged the same bootstrap interval (not a t-interval)
            assert (metrics[f"{protocol}_{key}_ci95_low"], metrics[f"{protocol}_{key}_ci95_high"]) == \
                pytest.approx((low, high))
        cell = t["table"].set_index(["Method", "Protocol"]).loc[("HTNet (paper config)", protocol), "Full UF1"]
        assert cell == f"{row['Full UF1']:.4f} [{row['Full UF1 ci95_low']:.4f}, {row['Full UF1 ci95_high']:.4f}]"
    two = t["table"].set_index(["Method", "Protocol"]).loc[("two seeds", "paper")]
    assert two["Source"] == "ours, 2 seeds, 800 epochs"
    assert all("[" not in two[c] and "±" not in two[c] for c in ("Full UF1", "SAMM UAR"))  # the mean only
    assert numbers.loc[(b, "paper"), ["Full UF1 std", "Full UF1 ci95_low"]].isna().all()
    assert not any(k.endswith("_ci95_low") for k in store["client"].get_run(b).data.metrics)
    assert "with fewer than 3 seeds, the mean only" in t["md"] and "95% bootstrap interval" in t["md"]


def test_every_method_has_the_same_protocol_rows(tmp_path, capsys):
    """Two reruns with different protocol sets: both get paper, final, inner in that order; the protocol a run
    lacks is a row marked 'not run' (no numbers), never another protocol in its place; so do the published rows."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, "htnet", uri)
    htnet = add_rerun(client, experiment_id, "HTNet (paper config)", "htnet-paper", [1, 2, 3], COMPOSITE,
                      protocols=("paper", "inner"))
    ststnet = add_rerun(client, experiment_id, "STSTNet", "ststnet", [1, 2, 3], COMPOSITE,
                        protocols=("paper", "final", "inner"))
    code, _, t = table({"uri": uri}, tmp_path, capsys)
    assert code == 0
    order = ["paper", "final", "inner"]
    groups = t["csv"].fillna({"run_id": ""}).groupby(["method", "kind", "run_id"], sort=False)["protocol"]
    assert len(groups) == 2 + len(PUBLISHED) and all(list(protocols) == order for _, protocols in groups)
    for frame in (t["table"], read_latex_table(t["tex"])):
        assert {"HTNet *", "STSTNet *", "HTNet (paper config)", "STSTNet"} <= set(frame["Method"])
        assert all(list(rows["Protocol"]) == order for _, rows in frame.groupby("Method"))
    numbers = t["csv"].set_index(["run_id", "protocol"])
    assert numbers.loc[(htnet, "final"), "source"] == "not run"
    assert numbers.loc[(htnet, ["final"]), ["Full UF1", "Full UAR"]].isna().all().all()
    assert numbers.loc[(htnet, "inner"), "Full UF1"] > 0 and numbers.loc[(htnet, "paper"), "Full UF1"] > 0
    assert (numbers.loc[ststnet, "source"] == "ours, 3 seeds, 800 epochs").all()
    assert numbers.loc[ststnet, "Full UF1"].notna().all()
    shown = t["table"].set_index(["Method", "Protocol"])
    assert shown.loc[("HTNet (paper config)", "final"), "Source"] == "not run"
    assert pd.isna(shown.loc[("HTNet (paper config)", "final"), "Full UF1"])
    published = t["csv"][t["csv"]["kind"] == "published"].set_index(["method", "protocol"])
    assert published.loc[("STSTNet", "paper"), "source"] == "not published"
    assert published.loc[("STSTNet", "final"), "Full UF1"] == pytest.approx(0.7209)
    assert "Every method has a row per protocol, in the order paper, final, inner" in t["md"]


def test_notes_render_as_a_flat_list(store, tmp_path, capsys):
    _, _, t = table(store, tmp_path, capsys)
    notes = [line for line in t["md"].splitlines() if line.startswith("- ")]
    assert notes[0].startswith(r"- Rows marked \*: published numbers")  # not '- * ...': a nested bullet
    assert not any(line.lstrip("- ").startswith(("* ", "+ ", "- ")) for line in notes)
    assert r"Rows marked *: published numbers" in t["tex"]


def test_bootstrap_of_known_predictions():
    perfect = predictions(SYNTHETIC, [1, 2, 3], accuracy=1.0)
    assert set(seed_subject_bootstrap(perfect, n_boot=200).values()) == {(1.0, 1.0)}
    noisy = predictions(COMPOSITE, [1, 2, 3], accuracy=0.5)
    bounds = seed_subject_bootstrap(noisy, n_boot=2000)
    assert {k.rsplit("_", 2)[1] for k in bounds} == {"full", "casme2", "smic", "samm"}
    point = np.mean([compute_metrics(part)["inner_full_uf1"] for _, part in noisy.groupby("seed")])
    low, high = bounds["inner_full_uf1"]
    assert 0 <= low < point < high <= 1
    # one subject's worth of samples moves a dataset's interval more than the composite's
    assert np.ptp(bounds["inner_samm_uar"]) > np.ptp(bounds["inner_full_uar"])


def test_changed_settings_change_a_label():
    paper, ststnet = (PRESETS[name][0] for name in ("htnet-paper", "ststnet"))
    assert changed_label("HTNet (paper config)", changed_settings(paper, {**paper, "epochs": 1})) == \
        "HTNet (paper config, epochs=1)"
    assert changed_settings(paper, {**paper, "device": "cpu", "subjects": 6, "protocols": ["paper"]}) == {}
    assert changed_settings(paper, {**paper, "epochs": 800, "lr": 5e-5}) == {}  # the preset's own values
    changes = changed_settings(ststnet, {**ststnet, "batch_size": 32, "model_config": {"dropout": 0.1}, "lr": 1e-3,
                                         "epochs": 5})
    assert changed_label("STSTNet", changes) == "STSTNet (epochs=5, lr=0.001, batch_size=32, +1 more)"
    assert changed_label("HTNet (best found)", {"epochs": 100}) == "HTNet (best found, epochs=100)"


def test_data_tags_of_the_real_release_and_a_synthetic_set(real_root, synth_data):
    from htnet.data import load_release

    tags = data_tags(load_release(real_root))
    assert tags == {"htnet.data_source": real_root.resolve().name, "htnet.data_subjects": "68",
                    "htnet.data_samples": "442"}
    assert (int(tags["htnet.data_subjects"]), int(tags["htnet.data_samples"])) == tuple(PUBLISHED_DATA.values())
    assert data_tags(synth_data)["htnet.data_source"] == "synthetic"
    assert data_tags(synth_data.restrict(synth_data.subject_ids[:2]))["htnet.data_subjects"] == "2"
