"""The multilabel label-code policy (train/labels.py), and the scripts that use it on batches with no certain label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twinray.prep.format import LABEL_MISSING, PackWriter, encode_image
from twinray.train.labels import MASKED, certain_bce, certain_targets, policy_targets, targets_bce
from twinray.train.lr_find import main as lr_find

CODES = torch.tensor([[1, 0, -1, LABEL_MISSING]], dtype=torch.int8)


def test_certain_targets_mask_uncertain_and_blank():
    targets, mask = certain_targets(CODES)
    assert targets.tolist() == [[1.0, 0.0, 0.0, 0.0]] and mask.tolist() == [[True, True, False, False]]


def test_policies_treat_blank_as_negative_and_uncertain_by_name():
    columns = [0, 1, 2, 3]
    assert policy_targets(CODES, columns, "ones").tolist() == [[1, 0, 1, 0]]
    assert policy_targets(CODES, columns, "zeros").tolist() == [[1, 0, 0, 0]]
    assert policy_targets(CODES, columns, "ignore").tolist() == [[1, 0, MASKED, 0]]


def test_bce_counts_only_certain_labels_and_is_zero_without_any():
    logits = torch.tensor([[2.0, -1.0, 5.0, -7.0]])
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 2  # the two certain labels, float64
    assert certain_bce(logits, CODES).item() == pytest.approx(expected, rel=1e-6)
    none = torch.tensor([[-1, LABEL_MISSING, -1, -1]], dtype=torch.int8)
    assert certain_bce(logits, none).item() == 0.0
    assert targets_bce(logits, torch.full((1, 4), MASKED)).item() == 0.0


def test_lr_find_finetune_sweep_survives_batches_with_no_certain_label(tmp_path):
    """Multilabel data whose labels are all uncertain or blank: every batch's masked loss is 0, not NaN (which had
    ended the sweep at its first step)."""
    data = tmp_path / "uncertain"
    writer = PackWriter(data, "uncertain", "multilabel", ["x", "y"], "npy", 32, shard_samples=8)
    rng = np.random.default_rng(0)
    for k in range(8):
        image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        writer.add("train", encode_image(image, "npy"), *image.shape, {"labels": {"x": -1, "y": [None, -1][k % 2]}})
    writer.finish({"skipped": []})
    out = tmp_path / "lr.png"
    args = ["--data", str(data), "--task", "finetune", "--out", str(out), "--steps", "6", "--batch-size", "4"]
    assert lr_find([*args, "--size", "32", "--device", "cpu"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["lrs"]) == 6 and result["losses"] == [0.0] * 6
