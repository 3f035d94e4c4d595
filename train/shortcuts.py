"""Source-shortcut probes: how well can a linear classifier tell the classes apart from features that carry no
disease, only the look of the hospital that sent the image, or its metadata? `twinray audit` (train/audit.py) runs
them and reads the result; this module computes the features and fits the probes.

Where every image of a class comes from one source (in the real-data study, all COVID-19 images come from Hannover
Medical School and the other classes from the NIH), a classifier can score by recognising the source. Each probe is
a multinomial logistic regression (L2, strength picked from `L2_GRID`) on one feature set:

- `statistics`: grey-level statistics of the model's input view (the unaugmented eval view at `size`, as
  train/finetune.py sees it): mean, standard deviation, the 1/5/25/50/75/95/99th percentiles and a 16-bin histogram
  (25 features).
- `border`: the view reduced to an 8 x 8 grid of cell means (area averaging), keeping only the 28 cells of the outer
  ring (the outer 12.5% of each side: collimation, labels, burnt-in text, padding), plus the ring's mean and std.
- `geometry`: the packed image's height, width and aspect ratio (prep keeps the aspect ratio, so this is the
  original's); the model sees a centre square, so this is the metadata a careless pipeline could leak.
- `all`: the three together.
- `thumbnail`: the trivial floor, not a source probe and not part of `all`: the view reduced to an 8 x 8 grid of
  cell means (all 64 cells), plus the view's mean and standard deviation (66 features). `fraction_floor` fits it at
  the models' label fractions, so a study can say whether learned features beat the crudest description of an image.
- one probe per metadata field of the sample JSON (`origin`, `view`, `ap_pa`, `sex`, `age`, ...; docs/format.md):
  a field of words is one-hot coded (a level per value, one for missing), a field of numbers is used as it is plus
  a missing indicator. The label's own fields, the patient, the split and fields that name each image apart (the
  source path) are not probes (`metadata_features` says why each was left out).

Two protocols (`PROTOCOLS`):

- `cv`: a patient-grouped, stratified k-fold cross-validation over every labelled image of every split
  (sklearn's StratifiedGroupKFold): each image is scored by the probe fitted on the folds without its patient, the
  L2 strength chosen inside those folds by a second grouped split (nested), features standardised on them.
- `held-out`: fit on train, pick the L2 strength on val, score test, as the models are scored.

Scores are torchmetrics' (train/metrics.py), on the scored images (every image in `cv`, the test split in
`held-out`): balanced accuracy, macro one-vs-rest AUROC and, with a `source_class`, that class's one-vs-rest AUROC
(for a single-source class, this is how well the source is recognised) and `rest_balanced_accuracy`, the mean recall
of the other classes (No_findings and Pneumonia in the study, which share the NIH as their source, so that one
source cannot explain it; predicting the source class counts as wrong). 95% intervals are percentile bootstraps
over the scored patients (over images when there is no patient id), 1000 resamples, because images of one patient
are not independent (Efron and Tibshirani 1993, ch. 13: the percentile interval).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from twinray.cli import InputError
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment.recipes import EVAL_RECIPE
from twinray.prep.format import LABEL_NONE, SPLITS, PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.train.label_fractions import label_fraction
from twinray.train.metrics import multiclass_metrics

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HISTOGRAM_BINS = 16
GRID = 8  # border cells: the outer ring of a GRID x GRID grid
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # weight-decay strengths tried, picked by balanced accuracy
FEATURE_SETS = ("statistics", "border", "geometry")
BOOTSTRAP = 1000
PROTOCOLS = ("cv", "held-out")
FOLDS = 5  # outer folds of `cv`
INNER_FOLDS = 3  # the grouped split inside each outer fold's training part that picks the L2 strength
MAX_LEVELS = 20  # a field of words with more values than this (or one per image) names images, not a category
NOT_METADATA = {  # sample JSON fields that are never probes, and why
    "label": "the label",
    "labels": "the label",
    "class": "the label's name",
    "split": "the split",
    "patient": "the patient id, the grouping",
    "source": "the source file's path, one per image",
}


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


def thumbnail(views: torch.Tensor) -> torch.Tensor:
    """B x 1 x S x S views in [0, 1] -> B x 66 float64: the 8 x 8 grid of cell means (area averaging), row by row,
    then the view's mean and standard deviation."""
    flat = views.flatten(1).double()
    cells = torch.nn.functional.adaptive_avg_pool2d(views.double(), GRID).flatten(1)
    return torch.cat([cells, flat.mean(1, keepdim=True), flat.std(1, keepdim=True)], 1)


def geometry(data: PackedDataset, rows: np.ndarray) -> torch.Tensor:
    """Packed height, width and height / width of `rows` -> len(rows) x 3."""
    h = torch.as_tensor(np.asarray(data.index["height"])[rows], dtype=torch.float64)
    w = torch.as_tensor(np.asarray(data.index["width"])[rows], dtype=torch.float64)
    return torch.stack([h, w, h / w], 1)


def split_features(data: PackedDataset, root: Path, split: str, size: int) -> dict:
    """The image feature sets, labels, patient ids and sample JSONs of one split, in index order. A row without a
    patient id is its own group (`image-ROW`)."""
    rows, stats, ring, thumbs = [], [], [], []
    settings = LoaderSettings(
        split=split, batch_size=64, device="cpu", recipe=EVAL_RECIPE, size=size, views=1, seed=0, drop_last=False
    )
    with build_loader(str(root), settings) as loader:
        for batch in loader:
            views = batch.views[0].float().cpu()
            rows.append(batch.indices.cpu().numpy())
            stats.append(statistics(views))
            ring.append(border(views))
            thumbs.append(thumbnail(views))
    rows = np.concatenate(rows)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    features = {
        "statistics": torch.cat(stats)[order],
        "border": torch.cat(ring)[order],
        "geometry": geometry(data, rows),
        "thumbnail": torch.cat(thumbs)[order],
    }
    metas = [data.metadata(int(r)) for r in rows]
    patients = [str(m["patient"]) if m.get("patient") is not None else f"image-{int(r)}" for m, r in zip(metas, rows)]
    labels = torch.as_tensor(data.labels(rows), dtype=torch.long)
    return {"rows": rows, "features": features, "labels": labels, "patients": patients, "metas": metas,
            "with_patient": [m.get("patient") is not None for m in metas]}  # fmt: skip


def metadata_features(metas: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Sample JSONs (N dicts) -> ({field: N x D float64 features}, {field: how it is coded}, {field: why it is not a
    probe}), fields in name order.

    Words (str, or mixed): one-hot, a column per value and one for missing, when 2 to MAX_LEVELS values occur and
    fewer than one per two images. Numbers (int, float, bool; None is missing): the value (missing ones the mean)
    and, where any is missing, a missing indicator. Lists and mappings, a single value and NOT_METADATA are left
    out. The coding uses no label, so it is made once over every image."""
    fields = sorted({k for m in metas for k in m})
    features, used, skipped = {}, {}, {}
    n = len(metas)
    for name in fields:
        if name in NOT_METADATA:
            skipped[name] = NOT_METADATA[name]
            continue
        values = [m.get(name) for m in metas]
        present = [v for v in values if v is not None]
        if any(isinstance(v, (list, dict)) for v in present):
            skipped[name] = "not a single value"
            continue
        if present and all(isinstance(v, (int, float, bool)) for v in present):
            numbers = np.array([np.nan if v is None else float(v) for v in values])
            known = ~np.isnan(numbers)
            if len(np.unique(numbers[known])) < 2:
                skipped[name] = "one value"
                continue
            columns = [np.where(known, numbers, numbers[known].mean())]
            if not known.all():
                columns.append((~known).astype(np.float64))
            features[name] = np.stack(columns, 1)
            used[name] = "number" + (", missing indicator" if not known.all() else "")
            continue
        words = ["\0missing" if v is None else str(v) for v in values]
        levels = sorted(set(words))
        if len(levels) < 2:
            skipped[name] = "one value"
        elif len(levels) > MAX_LEVELS or 2 * len(levels) > n:
            skipped[name] = f"{len(levels)} values in {n} images: names images, not a category"
        else:
            index = {level: k for k, level in enumerate(levels)}
            features[name] = np.eye(len(levels))[[index[w] for w in words]]
            used[name] = f"one-hot, {len(levels)} values" + (" (one is missing)" if "\0missing" in index else "")
    return features, used, skipped


def fit_logits(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, classes: int, l2: float) -> torch.Tensor:
    """A Logistic fitted on `train_x` (N x D, standardised with its own mean and std) -> logits of `x`, M x classes."""
    mean, std = train_x.mean(0), train_x.std(0).clip(min=1e-8)
    return Logistic((train_x - mean) / std, train_y, classes, l2).logits((x - mean) / std)


def _recall_mean(logits: torch.Tensor, y: np.ndarray) -> float:
    """Balanced accuracy over the classes present in `y` (a fold may lack one)."""
    pred = logits.argmax(1).numpy()
    return float(np.mean([np.mean(pred[y == k] == k) for k in np.unique(y)]))


def _folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions of a shuffled StratifiedGroupKFold (no group in two folds). Its warning for a class
    with fewer groups than folds is silenced: the audit reports small classes in its own line."""
    from sklearn.model_selection import StratifiedGroupKFold

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y, groups))


def pick_l2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: int, seed: int) -> float:
    """The L2_GRID strength with the best pooled out-of-fold balanced accuracy over an INNER_FOLDS grouped split of
    (x, y) (ties: the weaker penalty); the middle one where there are too few groups to split."""
    inner = min(INNER_FOLDS, len(np.unique(groups)))
    if inner < 2:
        return L2_GRID[len(L2_GRID) // 2]
    splits = _folds(y, groups, inner, seed)
    best = None
    for l2 in L2_GRID:
        logits = torch.zeros(len(y), classes, dtype=torch.float64)
        for train, test in splits:
            logits[test] = fit_logits(x[train], y[train], x[test], classes, l2)
        score = _recall_mean(logits, y)
        if best is None or score > best[1]:
            best = (l2, score)
    return best[0]


def cross_validated(x, y, patients, classes, source_class, folds=FOLDS, resamples=BOOTSTRAP, seed=0) -> dict:
    """One probe under `cv`: x N x D float64, y N int, patients N group names. Returns {"features", "l2" (one per
    fold), "test" (scores of the out-of-fold logits), "test_ci95"}."""
    groups = np.asarray(patients)
    logits = torch.zeros(len(y), len(classes), dtype=torch.float64)
    l2s = []
    for train, test in _folds(y, groups, folds, seed):
        l2 = pick_l2(x[train], y[train], groups[train], len(classes), seed)
        logits[test] = fit_logits(x[train], y[train], x[test], len(classes), l2)
        l2s.append(l2)
    y_t = torch.as_tensor(y)
    return {"features": int(x.shape[1]), "l2": l2s, "test": _scores(logits, y_t, classes, source_class),
            "test_ci95": bootstrap(logits, y_t, list(patients), classes, source_class, resamples, seed)}  # fmt: skip


def held_out(parts: dict, classes, source_class, resamples=BOOTSTRAP, seed=0) -> dict:
    """One probe under `held-out`: parts = {split: (x, y, patients)} for train, val and test. Returns {"features",
    "l2" (picked on val), "val", "test", "test_ci95"}."""
    train_x, train_y, _ = parts["train"]
    best = None
    for l2 in L2_GRID:
        logits = fit_logits(train_x, train_y, parts["val"][0], len(classes), l2)
        val = _scores(logits, torch.as_tensor(parts["val"][1]), classes, source_class)
        if best is None or val["balanced_accuracy"] > best[1]["balanced_accuracy"]:
            best = (l2, val)
    l2, val = best
    test_x, test_y, test_patients = parts["test"]
    logits = fit_logits(train_x, train_y, test_x, len(classes), l2)
    y = torch.as_tensor(test_y)
    return {"features": int(train_x.shape[1]), "l2": l2, "val": val, "test": _scores(logits, y, classes, source_class),
            "test_ci95": bootstrap(logits, y, test_patients, classes, source_class, resamples, seed)}  # fmt: skip


class Logistic:
    """Multinomial logistic regression: minimises mean cross-entropy + l2 * |W|^2 / 2 (bias not penalised) with
    scipy's L-BFGS-B on float64, from zeros, so a fit is deterministic. x: N x D (standardised), y: N int."""

    def __init__(self, x: np.ndarray, y: np.ndarray, classes: int, l2: float):
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


def _counts(y: np.ndarray, groups: list[str], classes: list[str]) -> dict:
    """{"images", "groups", "per_class": {class: {"images", "groups"}}} of a scored set."""
    groups = np.asarray(groups)
    per = {c: {"images": int((y == k).sum()), "groups": len(set(groups[y == k]))} for k, c in enumerate(classes)}
    return {"images": int(len(y)), "groups": len(set(groups)), "per_class": per}


def check(root: str | Path, size: int = 96, source_class: str | None = "COVID-19", resamples: int = BOOTSTRAP,
          protocol: str = "held-out", folds: int = FOLDS, seed: int = 0) -> dict:  # fmt: skip
    """Every probe's scores with intervals under `protocol` (PROTOCOLS), for a packed multiclass dataset at `root`.

    Returns {"data", "size", "classes", "source_class", "protocol", "folds" (cv), "seed", "n" (labelled images
    per split), "grouped_by" ("patient" or "image"), "without_patient" (images that are their own group),
    "scored" (_counts of the images scored), "test_patients" (groups scored), "metadata" ({"used", "skipped"}),
    "probes": {name: {"kind": "image" or "metadata", "features", "l2", "test", "test_ci95", ...}}}.
    Raises InputError (one line naming `root` or the value) for an unlabelled or multilabel dataset, a
    `source_class` not among the classes, and a dataset too small to score: fewer than 2 classes, a class with
    fewer than 2 groups, fewer groups than folds (cv), or a split of train, val and test without every class
    (held-out)."""
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    data = open_dataset(root)
    if data.task == "none":
        raise InputError(f"{root}: unlabelled (task 'none'): the audit predicts the label, so it needs labels")
    if data.task != "multiclass":
        raise InputError(f"{root}: the shortcut audit needs a multiclass dataset, not {data.task}")
    classes = list(data.classes)
    if source_class is not None and source_class not in classes:
        raise InputError(f"--source-class {source_class!r} is not one of {', '.join(classes)}")
    present = [s for s in SPLITS if len(data.indices(s))]
    if protocol == "held-out" and present != list(SPLITS):
        raise InputError(f"{root}: the held-out protocol needs images in train, val and test (try --protocol cv)")
    splits = {s: split_features(data, root, s, size) for s in present}
    for part in splits.values():  # rows with no class (LABEL_NONE) are not scored
        keep = (part["labels"] != LABEL_NONE).numpy()
        for key in ("rows", "labels"):
            part[key] = part[key][keep]
        part["features"] = {k: v[keep] for k, v in part["features"].items()}
        for key in ("patients", "metas", "with_patient"):
            part[key] = [v for v, k in zip(part[key], keep) if k]
    y_all = np.concatenate([splits[s]["labels"].numpy() for s in present])
    patients_all = [p for s in present for p in splits[s]["patients"]]
    metas_all = [m for s in present for m in splits[s]["metas"]]
    counts = _counts(y_all, patients_all, classes)
    found = [c for c, v in counts["per_class"].items() if v["images"]]
    if len(found) < 2:
        raise InputError(f"{root}: too small to audit: {len(y_all)} labelled images, classes present: "
                         f"{', '.join(found) or 'none'} (at least 2 are needed)")  # fmt: skip
    few = [f"{c} ({v['groups']})" for c, v in counts["per_class"].items() if v["groups"] < 2]
    if few:
        raise InputError(f"{root}: too small to audit: every class needs at least 2 patients, and "
                         f"{', '.join(few)} {'has' if len(few) == 1 else 'have'} fewer")  # fmt: skip
    if protocol == "cv" and counts["groups"] < folds:
        raise InputError(f"{root}: too small to audit: {counts['groups']} patients for {folds} folds (--folds)")
    if protocol == "held-out":
        for s in SPLITS:
            missing = sorted(set(classes) - {classes[k] for k in splits[s]["labels"].tolist()})
            if missing:
                raise InputError(f"{root}: the {s} split has no image of {', '.join(missing)} (try --protocol cv)")

    meta_features, used, skipped = metadata_features(metas_all)
    # probe name -> the metadata field it reads (None: an image probe)
    probe_fields = {name: None for name in (*FEATURE_SETS, "all")}
    for field in meta_features:
        probe_fields[f"meta:{field}" if field in probe_fields else field] = field
    ends = np.cumsum([0] + [len(splits[s]["labels"]) for s in present])
    span = {s: slice(int(a), int(b)) for s, a, b in zip(present, ends[:-1], ends[1:])}  # each split's rows in *_all

    def feats(name: str, split: str | None) -> np.ndarray:
        """Probe `name`'s features, N x D float64, of `split` (None: of every present split, in order)."""
        chosen = present if split is None else [split]
        field = probe_fields[name]
        if field is not None:
            return np.concatenate([meta_features[field][span[s]] for s in chosen])
        parts = FEATURE_SETS if name == "all" else (name,)
        return np.concatenate([torch.cat([splits[s]["features"][p] for p in parts], 1).numpy() for s in chosen])

    def _probe(name: str) -> dict:
        if protocol == "cv":
            return cross_validated(feats(name, None), y_all, patients_all, classes, source_class, folds, resamples,
                                   seed)  # fmt: skip
        parts = {s: (feats(name, s), splits[s]["labels"].numpy(), splits[s]["patients"]) for s in SPLITS}
        return held_out(parts, classes, source_class, resamples, seed)

    # Fits of a few hundred x a few dozen numbers gain nothing from BLAS threads, and on a busy machine threads
    # spinning against each other made each fit ~30-500x slower. (scipy's own OpenBLAS is limited only once it is
    # loaded: hence scipy.optimize imported at the top.)
    with threadpool_limits(limits=1, user_api="blas"):
        probes = {name: {"kind": "image" if field is None else "metadata", **_probe(name)}
                  for name, field in probe_fields.items()}  # fmt: skip
    if protocol == "cv":
        scored = counts
    else:
        scored = _counts(splits["test"]["labels"].numpy(), splits["test"]["patients"], classes)
    without = sum(not w for s in present for w in splits[s]["with_patient"])
    report = {"data": str(root), "size": size, "classes": classes, "source_class": source_class, "protocol": protocol}
    if protocol == "cv":
        report["folds"] = folds
    report.update({
        "seed": seed,
        "resamples": resamples,
        "n": {s: len(splits[s]["labels"]) if s in splits else 0 for s in SPLITS},
        "grouped_by": "image" if without == len(patients_all) else "patient",
        "without_patient": without,
        "scored": scored,
        "test_patients": scored["groups"],
        "metadata": {"used": used, "skipped": skipped},
        "probes": probes,
    })  # fmt: skip
    return report


def fraction_floor(root: str | Path, size: int, fractions: list[float], seeds: list[int], probe: str = "thumbnail",
                   source_class: str | None = None) -> list[dict]:  # fmt: skip
    """The `probe` feature set (`thumbnail`, or any of FEATURE_SETS) as a label-efficiency floor: for each fraction
    and seed, the held-out probe (L2 strength picked on all of val, scored on test) fitted on exactly the train
    images that train/finetune.py's `--fraction F --seed S` trains on (train/label_fractions.py). The views are the
    models' eval views at `size` px.

    Returns one row per fraction x seed: {"fraction", "seed", "train_images", "test_images", "l2",
    "balanced_accuracy", "auroc"} (and the source-class scores with a `source_class`). Raises InputError (one line)
    for an unknown probe, an unlabelled or multilabel dataset, or a split without images."""
    root = Path(root)
    if probe not in (*FEATURE_SETS, "thumbnail"):
        raise InputError(f"floor probe {probe!r} is not one of {', '.join((*FEATURE_SETS, 'thumbnail'))}")
    data = open_dataset(root)
    if data.task != "multiclass":
        raise InputError(f"{root}: the floor needs a multiclass dataset, not {data.task}")
    classes = list(data.classes)
    splits = {s: split_features(data, root, s, size) for s in SPLITS}
    for name, part in splits.items():
        if not len(part["rows"]):
            raise InputError(f"{root}: the {name} split has no image: the floor needs train, val and test")
    train = splits["train"]
    x_all = train["features"][probe].numpy()
    y_all = train["labels"].numpy()
    split_rows = data.indices("train")  # as train/finetune.py draws its fraction: from the split's rows, in order
    out = []
    with threadpool_limits(limits=1, user_api="blas"):
        for fraction in fractions:
            for seed in seeds:
                keep = np.isin(train["rows"], label_fraction(split_rows, data.labels(split_rows), fraction, seed))
                parts = {
                    "train": (x_all[keep], y_all[keep], [p for p, k in zip(train["patients"], keep) if k]),
                    **{s: (splits[s]["features"][probe].numpy(), splits[s]["labels"].numpy(), splits[s]["patients"])
                       for s in ("val", "test")},
                }  # fmt: skip
                probed = held_out(parts, classes, source_class, resamples=0, seed=seed)
                out.append({"fraction": float(fraction), "seed": seed, "train_images": int(keep.sum()),
                            "test_images": len(splits["test"]["rows"]), "l2": probed["l2"],
                            **probed["test"]})  # fmt: skip
    return out
