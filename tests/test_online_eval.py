"""The online probe and kNN read tiny, offset features (as a fresh zero-init ResNet gives) correctly."""

from __future__ import annotations

import torch

from twinray.train.online_eval import LinearProbe, knn_metrics, knn_scores


def _features(n: int = 400, seed: int = 0):
    """4 classes apart in a few dims, scaled down to std ~0.002 on top of a shared offset of 0.01."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 32, generator=g)
    x[:, :4] += 3 * torch.nn.functional.one_hot(labels, 4)
    return 0.01 + 0.002 * x, labels


def test_probe_learns_from_tiny_features():
    feats, labels = _features()
    probe = LinearProbe(32, 4, multilabel=False)
    for _ in range(20):
        for i in range(0, len(feats), 64):
            stats = probe.step(feats[i : i + 64], labels[i : i + 64])
    assert stats["probe_acc"] > 0.9
    assert not feats.requires_grad  # the probe never asks for gradients of its input


def test_knn_separates_offset_features():
    train_f, train_y = _features(seed=1)
    val_f, val_y = _features(n=100, seed=2)
    scores = knn_scores(train_f, train_y, val_f, classes=4, multilabel=False, k=20)
    metrics = knn_metrics(scores, val_y, multilabel=False)
    assert metrics["knn_acc"] > 0.9 and metrics["knn_balanced_acc"] > 0.9


def test_multilabel_auroc_masks_uncertain_and_blank():
    train_f, train_y = _features(seed=3)
    val_f, val_y = _features(n=100, seed=4)

    def codes(y):  # label c is positive where the class is c; a third of the entries uncertain or blank
        out = torch.nn.functional.one_hot(y, 4).to(torch.int8)
        out[::3, 0] = -1
        out[1::3, 1] = -128
        return out

    scores = knn_scores(train_f, codes(train_y), val_f, classes=4, multilabel=True)
    assert knn_metrics(scores, codes(val_y), multilabel=True)["knn_auroc"] > 0.9


def test_multilabel_probe_scores_only_certain_labels_and_survives_none():
    probe = LinearProbe(8, 3, multilabel=True)
    feats = torch.randn(16, 8)
    codes = torch.randint(0, 2, (16, 3), dtype=torch.int8)
    codes[:, 2] = -1  # uncertain: neither trained on nor scored
    stats = probe.step(feats, codes)
    assert 0 <= float(stats["probe_acc"]) <= 1 and torch.isfinite(stats["probe_loss"])
    stats = probe.step(feats, torch.full((16, 3), -128, dtype=torch.int8))  # all blank
    assert float(stats["probe_acc"]) == 0.0 and float(stats["probe_loss"]) == 0.0
