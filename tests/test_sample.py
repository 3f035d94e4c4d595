"""The generated sample: the real layout, deterministic, and a class signal that brightness alone misses."""

from __future__ import annotations

import cv2
import numpy as np
import timm
import torch
from openpyxl import load_workbook
from PIL import Image

from twinray.prep import sample
from twinray.prep.datasets.covid import CLASSES


def test_layout_matches_the_real_database(covid_sample):
    assert sorted(p.name for p in covid_sample.iterdir()) == sorted(
        [*CLASSES, *(f"{c}.metadata.xlsx" for c in CLASSES), "README.md.txt"]
    )
    counts = sample.class_counts(60)
    for name in CLASSES:
        images = sorted((covid_sample / name / "images").iterdir())
        masks = sorted((covid_sample / name / "masks").iterdir())
        assert len(images) == len(masks) == counts[name]
        assert (covid_sample / name / "images" / f"{name}-1.png").is_file()
        with Image.open(images[0]) as im:
            assert (im.mode, im.size) == ("L", (299, 299))
        with Image.open(masks[0]) as im:
            assert (im.mode, im.size) == ("RGB", (256, 256))
        sheet = load_workbook(covid_sample / f"{name}.metadata.xlsx")["Sheet1"]
        rows = list(sheet.iter_rows(values_only=True))
        assert rows[0] == ("FILE NAME", "FORMAT", "SIZE", "URL")
        assert rows[1][0] == ("NORMAL-1" if name == "Normal" else f"{name}-1")
        assert rows[1][2] == "256*256"


def test_same_seed_same_bytes(tmp_path):
    a = sample.generate(tmp_path / "a", n=8, seed=4)
    b = sample.generate(tmp_path / "b", n=8, seed=4, workers=2)
    c = sample.generate(tmp_path / "c", n=8, seed=5)
    rel = "COVID/images/COVID-2.png"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


def _balanced_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """A class-weighted linear classifier (L-BFGS), scored on the held-out rows."""
    x = torch.tensor(features, dtype=torch.float64)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    y = torch.tensor(labels)
    weight = torch.tensor(len(train) / (4 * np.bincount(labels[train], minlength=4)), dtype=torch.float64)
    w = torch.zeros(x.shape[1], 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ w + b, y[train], weight=weight) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    test = np.setdiff1d(np.arange(len(labels)), train)
    pred = (x[test] @ w + b).argmax(1).numpy()
    return float(np.mean([np.mean(pred[labels[test] == k] == k) for k in range(4)]))


def test_class_signal_is_learnable_but_not_brightness(tmp_path):
    root = sample.generate(tmp_path, n=480, seed=11, workers=2)
    images, labels = [], []
    for k, name in enumerate(CLASSES):
        for path in sorted((root / name / "images").iterdir()):
            images.append(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float64) / 255)
            labels.append(k)
    images, labels = np.stack(images), np.array(labels)
    train = np.random.default_rng(0).permutation(len(labels))[:360]
    brightness = _balanced_accuracy(images.mean((1, 2))[:, None], labels, train)
    # Simple image features: a 32x32 thumbnail and an 8x8 map of fine-detail (Laplacian) energy.
    thumbnails = np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA).ravel() for im in images])
    detail = np.stack(
        [
            cv2.resize(
                np.abs(cv2.Laplacian(cv2.GaussianBlur(im, (0, 0), 1.5), cv2.CV_64F)),
                (8, 8),
                interpolation=cv2.INTER_AREA,
            ).ravel()
            for im in images
        ]
    )
    features = _balanced_accuracy(np.concatenate([thumbnails, detail], 1), labels, train)
    # Features of an untrained ResNet-18 (the random-init baseline a pretrained backbone has to beat).
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=0, in_chans=1).eval()
    with torch.no_grad():
        small = torch.nn.functional.interpolate(
            torch.tensor(images, dtype=torch.float32)[:, None], size=128, mode="area"
        )
        random_init = _balanced_accuracy(torch.cat([resnet(b) for b in small.split(120)]).numpy(), labels, train)
    assert brightness < 0.42  # chance is 0.25; measured 0.35
    assert features > 0.65  # measured 0.76
    assert random_init < features - 0.15  # measured 0.33


def test_sample_without_metadata_packs_with_unknown_origins(tmp_path):
    from twinray.prep.datasets import covid

    root = sample.generate(tmp_path, n=8, seed=1, metadata=False)
    assert not list(root.glob("*.xlsx"))
    assert {r.meta["origin"] for r in covid.plan(root).records} == {"unknown"}
