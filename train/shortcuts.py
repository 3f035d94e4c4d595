"""Source-shortcut check: how well can a linear classifier tell the classes apart from features that carry no
disease, only the look of the hospital that sent the image?

    python train/shortcuts.py --data DIR [--size 96] [--out shortcuts.json]

Where every image of a class comes from one source (in the real-data study, all COVID-19 images come from Hannover
Medical School and the other classes from the NIH), a classifier can score by recognising the source. This check
fits a multinomial logistic regression (L2, strength picked on val) on three feature sets and reports its test
scores, to be read beside the models' scores:

- `statistics`: grey-level statistics of the model's input view (the unaugmented eval view at `--size`, as
  train/finetune.py sees it): mean, standard deviation, the 1/5/25/50/75/95/99th percentiles and a 16-bin histogram
  (25 features).
- `border`: the view reduced to an 8 x 8 grid of cell means (area averaging), keeping only the 28 cells of the outer
  ring (the outer 12.5% of each side: collimation, labels, burnt-in text, padding), plus the ring's mean and std.
- `geometry`: the packed image's height, width and aspect ratio (prep keeps the aspect ratio, so this is the
  original's); the model sees a centre square, so this is the metadata a careless pipeline could leak.

Test metrics are torchmetrics' (train/metrics.py): balanced accuracy, macro one-vs-rest AUROC, the one-vs-rest
AUROC of `--source-class` (COVID-19 by default: for a single-source class, this is how well the source is
recognised) and `rest_balanced_accuracy`, the mean recall of the other classes (No_findings and Pneumonia, which
share the NIH as their source, so that one source cannot explain it; predicting the source class counts as
wrong). 95% intervals are percentile bootstraps over test patients (over images when there is no patient id), 1000
resamples, because images of one patient are not independent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from twinray.atomic import write_json
from twinray.cli import InputError, OneLineParser, run_cli, say_error
from twinray.pipelines import build_loader
from twinray.pipelines.augment.recipes import EVAL_RECIPE
from twinray.prep.format import PackedDataset
from twinray.train.metrics import multiclass_metrics

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HISTOGRAM_BINS = 16
GRID = 8  # border cells: the outer ring of a GRID x GRID grid
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # weight-decay strengths tried, picked on val balanced accuracy
FEATURE_SETS = ("statistics", "border", "geometry")
BOOTSTRAP = 1000


def statistics(views: torch.Tensor) -> torch.Tensor:
    """B x 1 x S x S views in [0, 1] -> B x 25: mean, std, 7 percentiles, 16-bin histogram (fractions)."""
    flat = views.flatten(1).double()
    q = torch.quantile(flat, torch.tensor(PERCENTILES, dtype=flat.dtype) / 100, dim=1).T
    bins = (flat.clamp(0, 1) * HISTOGRAM_BINS).long().clamp(max=HISTOGRAM_BINS - 1)
    hist = torch.zeros(len(flat), HISTOGRAM_BINS, dtype=flat.dtype).scatter_add_(1, bins, torch.ones_like(flat))
    return torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), q, hist / flat.shape[1]], 1)


def border(views: torch.Tensor) -> torch.Tensor:
    """B x 1 x S x S -> B x 30: the 28 outer cells of an 8 x 8 grid of cell means, then their mean and std."""
    cells = torch.nn.functional.adaptive_avg_pool2d(views.double(), GRID).flatten(1)
    ring = torch.zeros(GRID, GRID, dtype=torch.bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    outer = cells[:, ring.flatten()]
    return torch.cat([outer, outer.mean(1, keepdim=True), outer.std(1, keepdim=True)], 1)


def geometry(data: PackedDataset, rows: np.ndarray) -> torch.Tensor:
    """Packed height, width and height / width of `rows` -> len(rows) x 3."""
    h = torch.as_tensor(np.asarray(data.index["height"])[rows], dtype=torch.float64)
    w = torch.as_tensor(np.asarray(data.index["width"])[rows], dtype=torch.float64)
    return torch.stack([h, w, h / w], 1)


def split_features(data: PackedDataset, root: Path, split: str, size: int) -> dict:
    """Every feature set, labels and patient ids of one split, in index order."""
    rows, stats, ring = [], [], []
    with build_loader(str(root), split=split, batch_size=64, device="cpu", recipe=EVAL_RECIPE, size=size, views=1,
                      seed=0, drop_last=False) as loader:  # fmt: skip
        for batch in loader:
            views = batch.views[0].float().cpu()
            rows.append(batch.indices.cpu().numpy())
            stats.append(statistics(views))
            ring.append(border(views))
    rows = np.concatenate(rows)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    features = {
        "statistics": torch.cat(stats)[order],
        "border": torch.cat(ring)[order],
        "geometry": geometry(data, rows),
    }
    patients = [data.metadata(int(r)).get("patient", f"image-{int(r)}") for r in rows]
    labels = torch.as_tensor(data.labels(rows), dtype=torch.long)
    return {"rows": rows, "features": features, "labels": labels, "patients": patients}


class Logistic:
    """Multinomial logistic regression: minimises mean cross-entropy + l2 * |W|^2 / 2 (bias not penalised) with
    scipy's L-BFGS-B on float64, from zeros, so a fit is deterministic. x: N x D (standardised), y: N int."""

    def __init__(self, x: np.ndarray, y: np.ndarray, classes: int, l2: float):
        from scipy.optimize import minimize
        from scipy.special import log_softmax

        n, d = x.shape
        xb = np.hstack([x, np.ones((n, 1))])
        onehot = np.eye(classes)[y]
        mask = np.ones((d + 1, classes))
        mask[-1] = 0.0  # the bias row

        def loss_grad(flat):
            w = flat.reshape(d + 1, classes)
            logp = log_softmax(xb @ w, axis=1)
            loss = -(onehot * logp).sum() / n + 0.5 * l2 * ((w * mask) ** 2).sum()
            grad = xb.T @ (np.exp(logp) - onehot) / n + l2 * w * mask
            return loss, grad.ravel()

        result = minimize(loss_grad, np.zeros((d + 1) * classes), jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000})  # fmt: skip
        self.w = result.x.reshape(d + 1, classes)

    def logits(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]) @ self.w)


def _scores(logits: torch.Tensor, y: torch.Tensor, classes: list[str], source_class: str | None) -> dict:
    m = multiclass_metrics(logits, y, classes)
    out = {"balanced_accuracy": m["balanced_accuracy"], "auroc": m["auroc"]}
    if source_class is not None:
        out["source_class_auroc"] = m["per_class"][source_class]["auroc"]
        recalls = [v["recall"] for k, v in m["per_class"].items() if k != source_class and v["recall"] is not None]
        out["rest_balanced_accuracy"] = round(float(np.mean(recalls)), 6) if recalls else None
    return out


def fast_scores(probs: np.ndarray, y: np.ndarray, source: int | None) -> dict:
    """Balanced accuracy and one-vs-rest AUROCs in numpy (the Mann-Whitney U statistic with mid-ranks for ties),
    equal to torchmetrics' on the same inputs (tested) and fast enough for 1000 bootstrap resamples."""
    from scipy.stats import rankdata

    classes = probs.shape[1]
    pred = probs.argmax(1)
    recall = [np.mean(pred[y == k] == k) for k in range(classes)]
    aurocs = []
    for k in range(classes):
        positive = y == k
        ranks = rankdata(probs[:, k])
        n_pos, n_neg = positive.sum(), (~positive).sum()
        aurocs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    out = {"balanced_accuracy": float(np.mean(recall)), "auroc": float(np.mean(aurocs))}
    if source is not None:
        out["source_class_auroc"] = float(aurocs[source])
        out["rest_balanced_accuracy"] = float(np.mean([r for k, r in enumerate(recall) if k != source]))
    return out


def bootstrap(logits, y, patients, classes, source_class, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """95% percentile intervals of each score, resampling test patients (with all their images)."""
    groups = sorted(set(patients))
    members = {g: [] for g in groups}
    for i, p in enumerate(patients):
        members[p].append(i)
    probs, y = logits.softmax(1).numpy(), y.numpy()
    source = classes.index(source_class) if source_class is not None else None
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        pick = np.concatenate([members[groups[k]] for k in rng.integers(0, len(groups), len(groups))])
        if len(np.unique(y[pick])) < len(classes):  # a resample without some class has no macro AUROC
            continue
        for key, value in fast_scores(probs[pick], y[pick], source).items():
            draws.setdefault(key, []).append(value)
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in draws.items()}  # fmt: skip


def check(root: str | Path, size: int = 96, source_class: str | None = "COVID-19", resamples: int = BOOTSTRAP) -> dict:
    """The three probes' val and test scores, with intervals: {"probes": {name: {...}}, "classes", "n", ...}."""
    root = Path(root)
    data = PackedDataset(root)
    if data.task != "multiclass":
        raise InputError(f"{root}: the shortcut check needs a multiclass dataset, not {data.task}")
    classes = list(data.classes)
    if source_class is not None and source_class not in classes:
        raise InputError(f"--source-class {source_class!r} is not one of {', '.join(classes)}")
    splits = {s: split_features(data, root, s, size) for s in ("train", "val", "test")}
    if any(len(splits[s]["rows"]) == 0 for s in splits):
        raise InputError(f"{root}: the shortcut check needs images in train, val and test")
    probes = {}
    for name in (*FEATURE_SETS, "all"):

        def feats(split, name=name):
            parts = FEATURE_SETS if name == "all" else (name,)
            return torch.cat([splits[split]["features"][p] for p in parts], 1).numpy()

        train_x = feats("train")
        mean, std = train_x.mean(0), train_x.std(0).clip(min=1e-8)
        train_y = splits["train"]["labels"].numpy()
        best = None
        for l2 in L2_GRID:
            model = Logistic((train_x - mean) / std, train_y, len(classes), l2)
            logits = model.logits((feats("val") - mean) / std)
            val = _scores(logits, splits["val"]["labels"], classes, source_class)
            if best is None or val["balanced_accuracy"] > best[1]["balanced_accuracy"]:
                best = (l2, val, model)
        l2, val, model = best
        logits = model.logits((feats("test") - mean) / std)
        y, patients = splits["test"]["labels"], splits["test"]["patients"]
        probes[name] = {
            "features": int(train_x.shape[1]),
            "l2": l2,
            "val": val,
            "test": _scores(logits, y, classes, source_class),
            "test_ci95": bootstrap(logits, y, patients, classes, source_class, resamples),
        }
    n = {s: len(v["rows"]) for s, v in splits.items()}
    return {"data": str(root), "size": size, "classes": classes, "source_class": source_class, "n": n,
            "test_patients": len(set(splits["test"]["patients"])), "probes": probes}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="train/shortcuts.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, required=True, help="a packed multiclass dataset")
    parser.add_argument("--size", type=int, default=96, help="side of the eval view in px, as the models' (96)")
    parser.add_argument("--source-class", default="COVID-19", help="the class from a single source (COVID-19)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size {args.size} must be at least 8")
    try:
        report = check(args.data, args.size, args.source_class)
    except InputError as e:
        say_error("shortcuts", str(e))
        return 2
    if args.out is not None:
        write_json(args.out, report)
    for name, probe in report["probes"].items():
        t, ci = probe["test"], probe["test_ci95"]
        extra = f"  {args.source_class} AUROC {t['source_class_auroc']:.3f}" if "source_class_auroc" in t else ""
        low, high = ci["balanced_accuracy"]
        print(f"{name:<11} ({probe['features']:>2} features)  test balanced accuracy {t['balanced_accuracy']:.3f} "
              f"[{low:.3f}, {high:.3f}]  AUROC {t['auroc']:.3f}{extra}")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_cli(main)
