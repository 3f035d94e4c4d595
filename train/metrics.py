"""Downstream metrics, computed with torchmetrics: one function per task, plus the confusion-matrix figure.

Multiclass: accuracy, balanced accuracy (mean per-class recall), macro-F1, macro one-vs-rest AUROC, per-class
precision/recall/F1/AUROC, and the confusion matrix in counts and normalised by true class (rows).
Multilabel: per-label and mean AUROC over the certain targets (a target of -1 is masked out).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


def _round(x: torch.Tensor) -> float:
    return round(float(x), 6)


def multiclass_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    with warnings.catch_warnings():  # a small split may lack a class: its scores are 0, as documented, not an error
        warnings.simplefilter("ignore", UserWarning)
        return _multiclass(logits, targets, classes)


def _multiclass(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    logits, targets, c = logits.float().cpu(), targets.long().cpu(), len(classes)
    probs = logits.softmax(1)
    per = {
        "precision": multiclass_precision(probs, targets, c, average="none"),
        "recall": multiclass_recall(probs, targets, c, average="none"),
        "f1": multiclass_f1_score(probs, targets, c, average="none"),
        "auroc": multiclass_auroc(probs, targets, c, average="none"),
    }
    counts = multiclass_confusion_matrix(probs, targets, c)
    return {
        "n": len(targets),
        "accuracy": _round(multiclass_accuracy(probs, targets, c, average="micro")),
        "balanced_accuracy": _round(multiclass_recall(probs, targets, c, average="macro")),
        "macro_f1": _round(multiclass_f1_score(probs, targets, c, average="macro")),
        "auroc": _round(multiclass_auroc(probs, targets, c, average="macro")),
        "per_class": {name: {k: _round(v[i]) for k, v in per.items()} for i, name in enumerate(classes)},
        "confusion": {
            "classes": classes,
            "counts": counts.tolist(),
            "normalized": (counts / counts.sum(1, keepdim=True).clamp(min=1)).round(decimals=4).tolist(),
        },
    }


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict:
    """`targets`: 1, 0, or -1 for a masked (uncertain or unmentioned, per the policy) target. `logits` may be any
    scores that rank alike (kNN vote rates, say): AUROC depends on the ranking only."""
    logits, targets = logits.float().cpu(), targets.long().cpu()
    per = {}
    for j, name in enumerate(labels):
        known = targets[:, j] >= 0
        t = targets[known, j]
        # AUROC needs both classes among the known targets; a label without them is reported as None.
        per[name] = _round(binary_auroc(logits[known, j].sigmoid(), t)) if 0 < t.sum() < len(t) else None
    defined = [v for v in per.values() if v is not None]
    return {
        "n": len(targets),
        "mean_auroc": round(sum(defined) / len(defined), 6) if defined else None,
        "per_label_auroc": per,
    }


def draw_confusion(confusion: dict, out: Path, title: str = "") -> Path:
    """Counts (left) and row-normalised percentages (right), like the study's figure 14."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = confusion["classes"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(classes), 0.4 + 1.1 * len(classes) + 1))
    for ax, key, fmt in ((axes[0], "counts", "{:.0f}"), (axes[1], "normalized", "{:.0%}")):
        grid = torch.tensor(confusion[key], dtype=torch.float64)
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(float(grid.max()), 1e-9))
        top = max(float(grid.max()), 1e-9)
        for i in range(len(classes)):
            for j in range(len(classes)):
                v = grid[i, j].item()
                color = "white" if v > 0.6 * top else "black"
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{key}{': ' + title if title else ''}", fontsize=9)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
