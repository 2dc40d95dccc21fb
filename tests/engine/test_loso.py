import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, recall_score

from htnet.errors import TrainingDiverged, UserError
from htnet.loso import LosoConfig, evaluate_weights, make_folds, run_loso
from htnet.metrics import per_subject_accuracy, uf1_uar

from conftest import TINY_STSTNET


@pytest.fixture(scope="module")
def tiny_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    reports = []
    result = run_loso({**TINY_STSTNET, "save_weights": True}, synth_data,
                      callback=lambda progress: reports.append(progress), out_dir=out, progress=False)
    return result, reports, out


def test_tiny_run_beats_chance_under_every_protocol(tiny_run):
    result, _, out = tiny_run
    assert result.folds_done == result.folds_total == 9 and not result.stopped
    for protocol in ("paper", "final", "inner"):
        assert result.metrics[f"{protocol}_full_uf1"] > 0.5, result.metrics  # chance is about 0.33
    assert {"smic", "casme2", "samm"} <= {k.split("_")[1] for k in result.metrics if k.startswith("final_")}
    saved = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    assert list(saved.columns) == ["sample", "subject", "dataset", "label", "protocol", "prediction", "epoch"]
    assert len(saved) == 3 * len(set(saved["sample"]))
    assert sorted(p.name for p in (out / "weights").iterdir()) == sorted(f"{s}.pth" for s in saved.subject.unique())


@pytest.mark.parametrize("name", ["offapexnet", "dual_inception"])
def test_tiny_baseline_run_learns(name, synth_data):
    """OFF-ApexNet and Dual-Inception (paper sizes) through the same fold-batched engine: a tiny LOSO run (6
    subjects, shuffled batches of 8, 8 epochs) learns, well above chance (UF1 about 0.33)."""
    result = run_loso({"model": name, "epochs": 8, "lr": 1e-3, "batch_size": 8, "shuffle": True, "subjects": 6,
                       "protocols": ["final"], "engine": "batched"}, synth_data, progress=False)
    assert result.folds_done == result.folds_total == 6 and result.config.fold_group_size > 1
    loss = result.history.groupby("epoch").train_loss.mean()
    assert loss.iloc[-1] < loss.iloc[0] - 0.25, loss
    assert result.metrics["final_full_uf1"] > 0.5, result.metrics


def test_paper_protocol_is_at_least_final(tiny_run):
    result, _, _ = tiny_run
    accuracy = per_subject_accuracy(result.predictions).pivot(index="subject", columns="protocol", values="accuracy")
    assert (accuracy["paper"] >= accuracy["final"]).all()
    assert result.metrics["paper_full_uf1"] >= result.metrics["final_full_uf1"]
    final = result.predictions[result.predictions.protocol == "final"]
    assert (final.epoch == TINY_STSTNET["epochs"]).all()


def test_callback_reports_every_fold_and_can_stop_the_run(tiny_run, synth_data):
    _, reports, _ = tiny_run
    assert [r["step"] for r in reports] == list(range(1, 10))
    assert all({"final_full_uf1", "paper_full_uar", "inner_val_uf1", "train_loss", "fold_epochs"} <= set(r)
               for r in reports)
    assert reports[-1]["fold_epochs"] > reports[0]["fold_epochs"]
    stopped = run_loso({**TINY_STSTNET, "epochs": 1, "protocols": ["final"]}, synth_data,
                       callback=lambda progress: progress["step"] >= 2, progress=False)
    assert stopped.stopped and stopped.folds_done == 2 and stopped.folds_total == 9


def test_each_report_carries_its_new_folds_own_metrics(tiny_run):
    """Pruners that pair folds across trials (Wilcoxon) need each fold's own objective, numbered by
    the fold's place in the LOSO order, not the pooled one."""
    result, reports, _ = tiny_run
    subjects = list(dict.fromkeys(result.predictions.subject))
    assert [[f["fold"] for f in r["folds"]] for r in reports] == [[n] for n in range(1, 10)]
    for report in reports:
        (fold,) = report["folds"]
        assert fold["subject"] == subjects[fold["fold"] - 1]
        own = result.predictions[(result.predictions.subject == fold["subject"])
                                 & (result.predictions.protocol == "final")]
        assert fold["final_full_uf1"] == pytest.approx(uf1_uar(own.label, own.prediction)[0])
        assert 0 <= fold["inner_val_uf1"] <= 1
    assert reports[0]["folds"][0]["final_full_uf1"] == pytest.approx(reports[0]["final_full_uf1"])
    assert any(r["folds"][0]["final_full_uf1"] != pytest.approx(r["final_full_uf1"]) for r in reports[1:])


def test_inner_protocol_never_looks_at_the_test_subject(synth_data):
    # The plain engine: in a batched group the label-sorted shared batch stream also holds the test
    # subject's samples (other members train on them), so its labels move every member's batch
    # boundaries, a perturbation like another seed, not a selection on them (docs/design.md).
    config = LosoConfig.from_dict({**TINY_STSTNET, "subjects": 6, "protocols": ["paper", "inner"], "engine": "plain"})
    for fold in make_folds(synth_data.restrict(synth_data.pick_subjects(6)), config):
        assert fold.subject not in fold.val_subjects
        assert len(fold.val_subjects) == 3 and len(set(fold.val_subjects)) == 3
    # Scramble the labels of one subject: the epoch `inner` picks for that subject's fold must
    # not move (it is chosen on validation subjects); `paper` is free to move.
    base = run_loso(config, synth_data, progress=False)
    subject = base.predictions.subject.iloc[0]
    labels = synth_data.labels.copy()
    mask = synth_data.subjects == subject
    labels[mask] = (labels[mask] + 1) % 3
    scrambled = run_loso(config, type(synth_data)(**{**synth_data.__dict__, "labels": labels}), progress=False)

    def chosen_epoch(result, protocol):
        rows = result.predictions
        return rows[(rows.subject == subject) & (rows.protocol == protocol)].epoch.iloc[0]
    assert chosen_epoch(base, "inner") == chosen_epoch(scrambled, "inner")


def test_same_seed_same_predictions_and_another_seed_differs(synth_data):
    config = {**TINY_STSTNET, "epochs": 3, "subjects": 4, "protocols": ["final"]}
    a = run_loso(config, synth_data, progress=False)
    b = run_loso(config, synth_data, progress=False)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    pd.testing.assert_frame_equal(a.history, b.history)
    c = run_loso({**config, "seed": 7, "shuffle": True}, synth_data, progress=False)
    assert c.predictions[["sample", "protocol"]].equals(a.predictions[["sample", "protocol"]])
    assert not np.allclose(c.history.train_loss, a.history.train_loss)  # other weights, other order


def test_evaluate_only_reproduces_the_saved_predictions(tiny_run, synth_data):
    result, _, out = tiny_run
    predictions, metrics = evaluate_weights(out / "weights", synth_data, result.config)
    paper = result.predictions[result.predictions.protocol == "paper"].set_index("sample")
    assert (predictions.set_index("sample").prediction == paper.prediction.loc[predictions["sample"]]).all()
    assert metrics["weights_full_uf1"] == pytest.approx(result.metrics["paper_full_uf1"])


def test_evaluate_rejects_missing_subject_and_other_architecture(tiny_run, synth_data, tmp_path):
    result, _, out = tiny_run
    weights = tmp_path / "weights"
    weights.mkdir()
    subjects = synth_data.subject_ids
    for s in subjects[1:]:
        (weights / f"{s}.pth").write_bytes((out / "weights" / f"{s}.pth").read_bytes())
    with pytest.raises(UserError, match=f"no {subjects[0]}.pth"):
        evaluate_weights(weights, synth_data, result.config)
    torch.save({"conv.weight": torch.zeros(1)}, weights / f"{subjects[0]}.pth")
    with pytest.raises(UserError, match="not weights of model ststnet"):
        evaluate_weights(weights, synth_data, result.config)


@pytest.mark.parametrize("values, message", [
    ({"epoch": 3}, "unknown LOSO config key 'epoch'"),
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"protocols": ["paper", "best"]}, "unknown protocol 'best'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
    ({"lr": -1.0}, "lr must be a positive finite number"),
])
def test_bad_config_is_rejected_before_training(values, message):
    with pytest.raises(UserError, match=message):
        LosoConfig.from_dict({"model": "ststnet", **values})


def test_fold_whose_training_set_lacks_a_class_is_rejected(synth_data):
    labels = synth_data.labels.copy()
    only_surprise = synth_data.subjects == synth_data.subject_ids[0]
    labels[(labels == 2) & ~only_surprise] = 0
    data = type(synth_data)(**{**synth_data.__dict__, "labels": labels})
    with pytest.raises(UserError, match=f"fold {synth_data.subject_ids[0]}: training set lacks class 2"):
        run_loso({**TINY_STSTNET, "epochs": 1}, data, progress=False)


def test_diverging_loss_fails_cleanly(synth_data):
    with pytest.raises(TrainingDiverged, match="training loss is"):
        run_loso({**TINY_STSTNET, "optimizer": "sgd", "lr": 1e12, "epochs": 3, "subjects": 2,
                  "protocols": ["final"]}, synth_data, progress=False)


def test_pooled_uf1_is_computed_over_all_folds(tiny_run):
    """UF1 and UAR are scikit-learn's macro F1 and macro recall of the predictions pooled over every fold (per
    dataset: its rows), not a mean of per-fold scores."""
    result, _, _ = tiny_run
    final = result.predictions[result.predictions.protocol == "final"]
    assert final.subject.nunique() == result.folds_total == 9
    for name, rows in [("full", final), *final.groupby("dataset")]:
        assert result.metrics[f"final_{name}_uf1"] == pytest.approx(f1_score(rows.label, rows.prediction,
                                                                             average="macro"))
        assert result.metrics[f"final_{name}_uar"] == pytest.approx(recall_score(rows.label, rows.prediction,
                                                                                 average="macro"))
    per_fold = final.groupby("subject").apply(lambda g: f1_score(g.label, g.prediction, average="macro",
                                                                 labels=[0, 1, 2], zero_division=0))
    assert result.metrics["final_full_uf1"] != pytest.approx(per_fold.mean())


def test_subjects_on_the_command_line_are_a_count_or_ids():
    from htnet.loso import parse_subjects
    assert parse_subjects("12") == 12
    assert parse_subjects("006") == ["006"]          # SAMM ids are zero-padded digits
    assert parse_subjects("sub01, s03,006") == ["sub01", "s03", "006"]
    assert parse_subjects(None) is None


def test_folds_are_visited_interleaved_across_datasets_in_proportion(synth_data, tmp_path):
    """A partial LOSO run (a pruner's early rung) covers every source dataset in proportion; the order is
    fixed per seed and written to folds.csv."""
    from htnet.folds import visit_order

    sizes = {"casme2": 24, "smic": 16, "samm": 28}   # the composite's subjects per dataset
    dataset_of = {f"{d}-{i}": d for d, n in sizes.items() for i in range(n)}
    order = visit_order(sorted(dataset_of), dataset_of, seed=1)
    assert sorted(order) == sorted(dataset_of)
    for k in range(1, len(order) + 1):
        for dataset, n in sizes.items():
            seen = sum(dataset_of[s] == dataset for s in order[:k])
            assert abs(seen - k * n / len(order)) <= 1.5, (k, dataset, seen)
    assert visit_order(sorted(dataset_of), dataset_of, seed=1) == order
    assert visit_order(sorted(dataset_of), dataset_of, seed=2) != order

    config = LosoConfig.from_dict({**TINY_STSTNET, "epochs": 1, "protocols": ["final"]})
    folds = make_folds(synth_data, config)
    datasets = dict(zip(synth_data.subjects, synth_data.datasets))
    assert {datasets[f.subject] for f in folds[:3]} == set(synth_data.datasets)
    result = run_loso(config, synth_data, out_dir=tmp_path, progress=False)
    written = pd.read_csv(tmp_path / "folds.csv", dtype={"subject": str})
    assert written["subject"].tolist() == [f.subject for f in folds] and written["trained"].all()
    assert written["fold"].tolist() == list(range(1, len(folds) + 1))
    assert result.predictions.drop_duplicates("subject")["subject"].tolist() == written["subject"].tolist()
