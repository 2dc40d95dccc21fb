import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix

from htnet.metrics import breakdown, compute_metrics, confusion, per_subject_accuracy, uf1_uar


def reference_recognition_evaluation(final_gt, final_pred):
    """The HTNet reference's formula (main_HTNet.py), for comparison."""
    f1_list, ar_list = [], []
    for emotion_index in (0, 1, 2):
        gt = [1 if x == emotion_index else 0 for x in final_gt]
        pred = [1 if x == emotion_index else 0 for x in final_pred]
        try:
            tn, fp, fn, tp = confusion_matrix(gt, pred).ravel()
            f1_list.append((2 * tp) / (2 * tp + fp + fn))
            ar_list.append(tp / len([x for x in gt if x == 1]))
        except ValueError:
            pass
    return np.mean(f1_list), np.mean(ar_list)


def test_hand_computed_case():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 0, 2, 2, 2, 0]
    # class 0: TP 2, FP 2, FN 2 -> F1 4/8; recall 2/4
    # class 1: TP 1, FP 1, FN 1 -> F1 2/4; recall 1/2
    # class 2: TP 3, FP 1, FN 1 -> F1 6/8; recall 3/4
    uf1, uar = uf1_uar(y_true, y_pred)
    assert uf1 == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert uar == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert confusion(y_true, y_pred).tolist() == [[2, 1, 1], [1, 1, 0], [1, 0, 3]]


def test_equals_reference_formula_wherever_all_classes_occur():
    rng = np.random.default_rng(0)
    for _ in range(50):
        y_true = np.concatenate([[0, 1, 2], rng.integers(0, 3, 40)])
        y_pred = rng.integers(0, 3, len(y_true))
        assert uf1_uar(y_true, y_pred) == pytest.approx(reference_recognition_evaluation(y_true, y_pred))


def test_class_absent_from_ground_truth_is_left_out_of_both_means():
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]   # class 2 predicted once, never true
    uf1, uar = uf1_uar(y_true, y_pred)
    # averaged over classes 0 and 1 only: F1 0 = 2/3, F1 1 = 1; recall 0 = 1/2, recall 1 = 1
    assert uf1 == pytest.approx((2 / 3 + 1) / 2)
    assert uar == pytest.approx((0.5 + 1) / 2)
    # the reference would give UAR = NaN here (0/0 recall for class 2)
    with np.errstate(all="ignore"):
        assert np.isnan(reference_recognition_evaluation(y_true, y_pred)[1])


def test_per_dataset_breakdown_restricts_pooled_predictions():
    predictions = pd.DataFrame({
        "sample": list("abcdefgh"), "subject": ["s1", "s1", "s2", "s2", "t1", "t1", "t2", "t2"],
        "dataset": ["smic"] * 4 + ["samm"] * 4, "label": [0, 1, 2, 0, 0, 1, 2, 2],
        "prediction": [0, 1, 2, 1, 0, 0, 2, 2], "protocol": "final"})
    parts = breakdown(predictions)
    assert parts["smic"] == uf1_uar([0, 1, 2, 0], [0, 1, 2, 1])
    assert parts["samm"] == uf1_uar([0, 1, 2, 2], [0, 0, 2, 2])
    assert "casme2" not in parts
    metrics = compute_metrics(predictions)
    assert metrics["final_full_uf1"] == uf1_uar(predictions.label, predictions.prediction)[0]
    assert metrics["final_samm_uar"] == parts["samm"][1]
    accuracy = per_subject_accuracy(predictions).set_index("subject")["accuracy"]
    assert accuracy.to_dict() == {"s1": 1.0, "s2": 0.5, "t1": 0.5, "t2": 1.0}
