"""Feedback during pretraining, with no second run: a linear probe on detached features, and a weighted kNN.

Their labels come from the training data, or from a second, labelled dataset (`--eval-data`, `label_source`): the
kNN bank is then its train split and the score its val split, and the probe trains on its train split as a side
stream (`ProbeStream`). An unlabeled training data set without --eval-data has neither (NO_LABELS).

Multiclass data reports accuracy; multilabel data (CheXpert) reports mean AUROC with uncertain and blank labels
masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from twinray.cli import InputError
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings
from twinray.train.labels import MASKED, certain_targets, masked_bce
from twinray.train.metrics import balanced_accuracy, multilabel_metrics


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
        figures = torch.stack([loss.detach().float(), score.detach().float()])
        if _world() > 1:
            figures = self._all_average(figures)
        self.optimizer.step()
        return {"probe_loss": figures[0], "probe_acc": figures[1]}

    def _all_average(self, figures: torch.Tensor) -> torch.Tensor:
        """With several processes, each probe's gradients, BatchNorm running statistics and figures become their
        mean over the processes, in one all-reduce: every process then holds the same probe, updated from the global
        batch (as DDP averages gradients), and the logged figures are the global batch's. The running variance is
        the mean of the per-process variances, not the global batch's (the same at equal batch sizes up to the
        spread between the processes' means). Returns the averaged figures."""
        import torch.distributed as dist

        norm = self.head[0]
        params = [p for p in self.head.parameters() if p.grad is not None]
        parts = [p.grad.reshape(-1) for p in params] + [norm.running_mean, norm.running_var, figures]
        flat = torch.cat([t.float() for t in parts])
        dist.all_reduce(flat)
        flat /= _world()
        offset = 0
        for t in [p.grad for p in params] + [norm.running_mean, norm.running_var]:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return flat[offset:]


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


def _world() -> int:
    """The processes of this run: torch.distributed's world size once it is initialised, else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class LabelSource:
    """Where the kNN and the online probe read labels from: the training data itself, or `--eval-data`.

    location: the dataset as given (path or URL); data: it opened; digest: its manifest's sha256; external: True
    for --eval-data (its train split is the kNN bank and the probe's side stream, its val split the kNN's score)."""

    location: str
    data: PackedDataset
    external: bool

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def multilabel(self) -> bool:
        return self.data.task == "multilabel"

    @property
    def digest(self) -> str:
        return self.data.digest

    def describe(self) -> str:
        """The epoch line's note: "probe and kNN on --eval-data D (3 classes: a, b, c; train 40, val 10)"."""
        splits = self.data.manifest.get("splits", {})
        where = f"--eval-data {self.location}" if self.external else f"--data {self.location}'s labels"
        kind = "labels" if self.multilabel else "classes"
        counts = f"train {splits.get('train', 0)}, val {splits.get('val', 0)}"
        return f"probe and kNN on {where} ({len(self.classes)} {kind}: {', '.join(self.classes)}; {counts})"


NO_LABELS = "no labels: probe and kNN off; pass --eval-data DIR for them"


def label_source(
    data: PackedDataset, location: str, eval_data: str | None, size: int, world: int, cache: CacheSettings | None = None
):
    """The LabelSource the kNN and the probe use: `eval_data` when given (checked here), else `data`'s own, else None
    (an unlabeled `data`, task "none": probe and kNN off, NO_LABELS).

    `eval_data` must be a labelled packed dataset (multiclass or multilabel) with a train and a val split, images of
    `data`'s channel count, stored at no smaller a size than both `size` and `data`'s (else its views would be
    upscaled where the training views are not), and at least 2 train images per process (the probe's BatchNorm).
    Raises InputError, one line naming --eval-data and the value, otherwise (PackedDataset's own, after the flag,
    for a folder that is not a packed dataset). `cache`: how a URL `eval_data` is read (prep/shard_cache.py)."""
    if eval_data is None:
        return None if data.task == "none" else LabelSource(location, data, external=False)
    name = f"--eval-data {eval_data}"
    try:
        found = open_dataset(eval_data, cache)
    except InputError as e:  # "DIR: not a packed dataset ...": said as the flag's value, not --data's
        raise InputError(f"{name}: {e}") from None
    if found.task == "none":
        raise InputError(f"{name} is unlabeled (task none): the kNN and the probe need a labelled dataset")
    ours, theirs = data.manifest["image"].get("channels", 1), found.manifest["image"].get("channels", 1)
    if ours != theirs:
        raise InputError(f"{name} holds {theirs}-channel images, --data {location} {ours}-channel: they must match")
    stored = found.manifest["image"]["size"]
    if stored < min(size, data.manifest["image"]["size"]):
        raise InputError(
            f"{name} stores images at {stored} px, below --size {size} and --data's {data.manifest['image']['size']} "
            f"px: its views would be upscaled; pack it at {min(size, data.manifest['image']['size'])} px or more"
        )
    for split in ("train", "val"):
        if not len(found.indices(split)):
            raise InputError(
                f"{name} has no {split} split: the kNN compares its val split against its train split (and the "
                "probe trains on train); pack it with both"
            )
    if len(found.indices("train")) < MIN_PROBE_BATCH * world:
        raise InputError(
            f"{name} has {len(found.indices('train'))} train images: the probe needs at least {MIN_PROBE_BATCH} per "
            f"process ({world})"
        )
    return LabelSource(eval_data, found, external=True)


MIN_PROBE_BATCH = 2  # images per process of the probe's side stream: its BatchNorm needs a spread


class ProbeStream:
    """The online probe's side stream over --eval-data's train split: its own small loader (EVAL_RECIPE, one view,
    `batch_size` images per process, this rank's shard, reshuffled per epoch with the run's seed), prepared in the
    loader's background thread, so the pretraining step never waits for it.

    Each training step takes the stream's next batch (`step()`): the backbone's features of it, in eval mode (the
    running BatchNorm statistics, which the eval set must not move) and without gradients, then one probe update.
    The stream's position follows the run's step (`start(step)`: epoch step // len, batch step % len), so a resumed
    run reads the same batches as an uninterrupted one."""

    def __init__(self, loader, probe: LinearProbe, model: nn.Module, autocast):
        self.loader, self.probe, self.model, self.autocast = loader, probe, model, autocast
        self._it = None
        self._epoch = 0

    def start(self, step: int) -> None:
        """Positions the stream at the run's `step` (a fresh start is 0)."""
        self.close_epoch()
        self._epoch, start = divmod(step, len(self.loader))
        self.loader.set_epoch(self._epoch, start_step=start)
        self._it = iter(self.loader)

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._epoch += 1
            self.loader.set_epoch(self._epoch)
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> dict[str, torch.Tensor]:
        """One probe update on the stream's next batch; its figures as LinearProbe.step's (unread device tensors)."""
        batch = self._next()
        backbone = self.model.backbone
        was = backbone.training
        backbone.eval()
        try:
            x = batch.views[0]
            if x.shape[1] != self.model.in_chans:  # grey views repeated for a 3-channel stem, as PretrainModel does
                x = x.expand(-1, self.model.in_chans, -1, -1)
            with torch.no_grad(), self.autocast():
                features = backbone(x)
        finally:
            backbone.train(was)
        return self.probe.step(features, batch.labels)

    def close_epoch(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def close(self) -> None:
        self.close_epoch()
        self.loader.close()
