"""Downstream metrics: one function per task, plus the confusion-matrix figure. torchmetrics counts the confusion
matrix and computes each one-vs-rest AUROC.

Multiclass: accuracy, balanced accuracy (mean per-class recall), macro-F1, macro one-vs-rest AUROC, per-class
support/precision/recall/F1/AUROC, and the confusion matrix in counts and normalised by true class (rows).
Multilabel: per-label and mean AUROC over the certain targets (a target of -1 is masked out).

A small split may lack a class. A score that such a class leaves undefined is None (null in JSON), never 0, and the
averages skip it, as scikit-learn does: recall and one-vs-rest AUROC need the class among the targets (AUROC also
needs another class), precision needs it among the predictions. So balanced accuracy and macro AUROC are means
over the classes present in the split, and macro-F1 over the classes present or predicted (a predicted absent class
has F1 0: its predictions are all wrong).
"""

from __future__ import annotations

from pathlib import Path

import torch

from twinray.train.labels import MASKED

# torchmetrics is imported in the functions that use it: importing it takes seconds, which every CLI that imports
# this module (finetune, pretrain, gradcam) would pay before it could print a one-line error.


def _round(x) -> float | None:
    return None if x is None else round(float(x), 6)


def _mean(values) -> float | None:
    """The mean of the defined values, None when there are none."""
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def per_class_recall(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class from a C x C confusion matrix (rows true, columns predicted); None for a class absent
    from the targets."""
    support = confusion.sum(1)
    return [float(confusion[i, i] / support[i]) if support[i] > 0 else None for i in range(len(confusion))]


def balanced_accuracy(confusion: torch.Tensor) -> float | None:
    """Mean recall over the classes present among the targets (scikit-learn's balanced_accuracy_score); None when
    there are no targets."""
    return _mean(per_class_recall(confusion))


def multiclass_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """`logits` N x C (any scores that rank alike after a softmax), `targets` N class numbers in [0, C). Returns
    the scores above, rounded to 6 decimals; undefined ones are None (see the module docstring)."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_confusion_matrix

    logits, targets, c = logits.float().cpu(), targets.long().cpu(), len(classes)
    probs = logits.softmax(1)
    counts = multiclass_confusion_matrix(probs, targets, c)  # rows: true class, columns: predicted (argmax)
    tp, support, predicted = counts.diag(), counts.sum(1), counts.sum(0)
    recall = per_class_recall(counts)
    precision = [float(tp[i] / predicted[i]) if predicted[i] > 0 else None for i in range(c)]
    f1 = [float(2 * tp[i] / (support[i] + predicted[i])) if support[i] + predicted[i] > 0 else None for i in range(c)]
    # One-vs-rest AUROC of class i needs positives (class i) and negatives (any other class) among the targets.
    auroc = [
        float(binary_auroc(probs[:, i], (targets == i).long())) if 0 < support[i] < len(targets) else None
        for i in range(c)
    ]
    per = {"precision": precision, "recall": recall, "f1": f1, "auroc": auroc}
    return {
        "n": len(targets),
        "accuracy": _round(tp.sum() / len(targets)) if len(targets) else None,
        "balanced_accuracy": _round(_mean(recall)),
        "macro_f1": _round(_mean(f1)),
        "auroc": _round(_mean(auroc)),
        "per_class": {
            name: {"support": int(support[i]), **{k: _round(v[i]) for k, v in per.items()}}
            for i, name in enumerate(classes)
        },
        "confusion": {
            "classes": classes,
            "counts": counts.tolist(),
            "normalized": (counts / counts.sum(1, keepdim=True).clamp(min=1)).round(decimals=4).tolist(),
        },
    }


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict:
    """`targets`: 1, 0, or -1 for a masked (uncertain or unmentioned, per the policy) target. `logits` may be any
    scores that rank alike (kNN vote rates, say): AUROC depends on the ranking only."""
    from torchmetrics.functional.classification import binary_auroc

    logits, targets = logits.float().cpu(), targets.long().cpu()
    per = {}
    for j, name in enumerate(labels):
        known = targets[:, j] != MASKED
        t = targets[known, j]
        # AUROC needs both classes among the known targets; a label without them is reported as None.
        per[name] = _round(binary_auroc(logits[known, j].sigmoid(), t)) if 0 < t.sum() < len(t) else None
    return {
        "n": len(targets),
        "mean_auroc": _round(_mean(per.values())),
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
