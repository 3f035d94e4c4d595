"""Feedback during pretraining, with no second run: a linear probe on detached features, and a weighted kNN.

Multiclass data reports accuracy; multilabel data (CheXpert) reports mean AUROC with uncertain and blank labels
masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# EVAL_RECIPE lives with the other recipes; re-exported here for the importers not yet moved (pretrain, shortcuts).
from twinray.pipelines.augment import EVAL_RECIPE as EVAL_RECIPE
from twinray.train.labels import MASKED, certain_targets, masked_bce


class LinearProbe(nn.Module):
    """Trained alongside pretraining on detached features; its loss never reaches the backbone."""

    def __init__(self, features: int, classes: int, multilabel: bool, lr: float = 1e-2):
        super().__init__()
        # Standardise first: backbone features start tiny (zero-initialised residual branches, std ~0.002 here),
        # and a plain linear head then sits at the majority class for many epochs.
        self.head = nn.Sequential(nn.BatchNorm1d(features, affine=False), nn.Linear(features, classes))
        self.multilabel = multilabel
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update; returns detached 0-dim tensors (probe_loss, probe_acc), read only when logged, so that no
        step waits for the GPU."""
        logits = self.head(features.detach().float())
        if self.multilabel:
            target, mask = certain_targets(labels)
            loss = masked_bce(logits, target, mask)
            hits = ((logits > 0).float() == target) & mask
            score = hits.sum() / mask.sum().clamp(min=1)  # 0 when no label is certain
        else:
            loss = F.cross_entropy(logits, labels)
            score = (logits.argmax(1) == labels).float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"probe_loss": loss.detach(), "probe_acc": score.detach().float()}


@torch.no_grad()
def knn_scores(train_feats, train_labels, query_feats, classes: int, multilabel: bool, k: int = 20, t: float = 0.07):
    """Weighted kNN (cosine similarity of centred features, weights exp(sim / t)): class scores (multiclass) or
    per-label positive rates (multilabel) for each query."""
    # Centre on the train mean before the cosine: a shared offset would make every pair look alike.
    centre = train_feats.float().mean(0)
    train_feats = F.normalize(train_feats.float() - centre, dim=1)
    query_feats = F.normalize(query_feats.float() - centre, dim=1)
    k = min(k, len(train_feats))
    targets = certain_targets(train_labels)[0] if multilabel else F.one_hot(train_labels.long(), classes).float()
    out = []
    for chunk in query_feats.split(1024):
        sim, idx = (chunk @ train_feats.T).topk(k, dim=1)
        weights = (sim / t).exp()
        votes = (weights[..., None] * targets[idx]).sum(1)
        out.append(votes / weights.sum(1, keepdim=True))
    return torch.cat(out)


def knn_metrics(scores: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> dict[str, float]:
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    from twinray.train.metrics import balanced_accuracy, multilabel_metrics

    if not multilabel:
        labels = labels.long()
        # Balanced accuracy (mean recall per class) is 1/classes at chance, whatever the class frequencies. A class
        # absent from val has no recall and is left out (predicting it still costs the recall of the true class).
        balanced = balanced_accuracy(multiclass_confusion_matrix(scores.argmax(1), labels, scores.shape[1]))
        knn_balanced = float("nan") if balanced is None else balanced
        return {"knn_acc": (scores.argmax(1) == labels).float().mean().item(), "knn_balanced_acc": knn_balanced}

    target, mask = certain_targets(labels)
    masked = torch.where(mask, target.long(), MASKED)  # left out, as the downstream metrics take it
    mean = multilabel_metrics(scores, masked, [str(c) for c in range(scores.shape[1])])["mean_auroc"]
    return {"knn_auroc": float("nan") if mean is None else mean}
