"""The multilabel label codes (CheXpert's) and the one policy for turning them into training targets.

A packed multilabel dataset keeps each label as a code (prep/format.py): 1 positive, 0 negative, -1 uncertain and
-128 blank (not mentioned). Here they become targets of 1, 0 or MASKED (-1: the label counts for nothing in the loss
or the metrics). The pretraining feedback (online_eval) and the LR range test mask every label that is not certain;
fine-tuning follows the CheXpert competition (Irvin et al. 2019): blank counts as negative, and uncertain follows a
policy (U-Ones, U-Zeros or U-Ignore).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinray.prep.format import LABEL_MISSING, NEGATIVE, POSITIVE, UNCERTAIN  # the codes a packed dataset holds

BLANK = LABEL_MISSING
MASKED = -1  # a target that the loss and the metrics leave out
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")  # what an uncertain label becomes: 1, 0 or MASKED


def certain_targets(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N x L, any integer dtype) -> float targets (1.0 for positive, else 0.0) and the bool mask of certain
    labels (positive or negative); uncertain and blank labels are masked out."""
    mask = (codes == NEGATIVE) | (codes == POSITIVE)
    return (codes == POSITIVE).float(), mask


def policy_targets(codes: torch.Tensor, columns: list[int], uncertain: str) -> torch.Tensor:
    """Codes (N x L) -> int64 targets (N x len(columns)) of 1, 0 or MASKED for the chosen label columns. Blank counts
    as negative, as in the CheXpert competition; uncertain becomes 1 ("ones"), 0 ("zeros") or MASKED ("ignore").
    ValueError for another policy."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
    codes = codes[:, columns].long()
    out = (codes == POSITIVE).long()
    if uncertain == "ones":
        out[codes == UNCERTAIN] = 1
    elif uncertain == "ignore":
        out[codes == UNCERTAIN] = MASKED
    return out


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (0-dim float32) averaged over the masked-in targets only. A batch with no certain label
    gives 0 (no gradient), not NaN: a NaN would stop a training run or an LR range test that is otherwise fine."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def certain_bce(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """masked_bce of logits (N x L) against codes (N x L), every uncertain or blank label masked out."""
    return masked_bce(logits, *certain_targets(codes))


def targets_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """masked_bce of logits (N x L) against policy_targets' 1, 0 or MASKED targets."""
    return masked_bce(logits, targets.clamp(min=0), targets != MASKED)
