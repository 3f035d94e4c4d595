"""Downstream and online metrics when the evaluated split lacks a class: left out of the averages, null per class."""

import json
from itertools import product

import pytest
import torch

from twinray.train.metrics import multiclass_metrics
from twinray.train.online_eval import knn_metrics

CLASSES = ["a", "b", "c", "d"]


def hand_auroc(scores: list[float], positive: list[bool]) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ranked right, ties counting one half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_a_perfect_classifier_scores_1_when_a_class_is_absent_and_the_absent_class_is_null():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])  # no "d"
    m = multiclass_metrics(torch.eye(4)[targets] * 5, targets, CLASSES)
    assert m["auroc"] == 1.0  # torchmetrics' macro gave 0.75: d's one-vs-rest AUROC counted as 0
    assert m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["accuracy"] == 1.0
    assert m["per_class"]["d"] == {"support": 0, "precision": None, "recall": None, "f1": None, "auroc": None}
    assert m["per_class"]["a"] == {"support": 2, "precision": 1.0, "recall": 1.0, "f1": 1.0, "auroc": 1.0}
    assert '"auroc": null' in json.dumps(m["per_class"]["d"])  # results.json holds null, not 0


def test_macro_auroc_is_the_mean_over_present_classes_of_hand_computed_one_vs_rest_aurocs():
    targets = [0, 0, 1, 1, 1, 2, 2]  # no "d"
    logits = torch.tensor(
        [[2.0, 1, 0, 0], [0, 1, 0, 1], [1, 2, 0, 0], [0, 0, 1, 0], [1, 1, 0, 3], [0, 1, 2, 0], [1, 0, 1, 0]]
    )
    m = multiclass_metrics(logits, torch.tensor(targets), CLASSES)
    probs = logits.softmax(1)
    expected = [hand_auroc(probs[:, c].tolist(), [t == c for t in targets]) for c in range(3)]
    for c, name in enumerate(CLASSES[:3]):
        assert m["per_class"][name]["auroc"] == pytest.approx(expected[c], abs=1e-6)
    assert m["per_class"]["d"]["auroc"] is None
    assert m["auroc"] == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert 0.5 < m["auroc"] < 1.0  # a value that a wrong average (over 4 classes, or including 0) would miss


def test_a_predicted_absent_class_costs_recall_and_f1_but_is_not_averaged_as_a_class_of_the_split():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 3])  # one "c" taken for the absent "d"
    m = multiclass_metrics(torch.eye(4)[predicted] * 5, targets, CLASSES)
    # Recall over the 3 present classes (scikit-learn's balanced_accuracy_score); torchmetrics' macro gave 0.625.
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-6)
    assert m["per_class"]["d"]["recall"] is None and m["per_class"]["d"]["precision"] == 0.0
    assert m["per_class"]["d"]["f1"] == 0.0  # all of its predictions are wrong
    f1_c = 2 * 1 / (2 + 1)  # tp 1, support 2, predicted 1
    assert m["macro_f1"] == pytest.approx((1 + 1 + f1_c + 0) / 4, abs=1e-6)  # present or predicted, as sklearn


def test_knn_balanced_accuracy_leaves_out_classes_absent_from_val():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    votes = torch.eye(4)[torch.tensor([0, 0, 1, 1, 2, 3])]  # kNN vote rates; one "c" voted "d"
    metrics = knn_metrics(votes, labels, multilabel=False)
    assert metrics["knn_balanced_acc"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["knn_acc"] == pytest.approx(5 / 6)
