"""Grad-CAM of fine-tuned models side by side, on N test images per class (the study's figure 16).

    python train/gradcam.py --data DIR --models RUN_DIR [RUN_DIR ...] [--size S] [--per-class N] --out FILE.png

Each RUN_DIR is a train/finetune.py output (model.safetensors + model.json). One row per model, one column per
image; each panel overlays the heat map (blue low, red high) on the X-ray and names the true and predicted labels.
For multilabel data a "class" is a label: images positive for it, with the map and prediction for that label.
The maps come from the `grad-cam` package at the backbone's last convolutional stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from twinray.cli import InputError, OneLineParser, run_cli
from twinray.pipelines import build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep import shard_cache
from twinray.prep.format import PackedDataset
from twinray.storage import location
from twinray.train.labels import POSITIVE
from twinray.train.model import Classifier, build_backbone


def load_model(run: Path) -> tuple[Classifier, dict]:
    """A finetune run's model (eval mode, CPU) and its model.json."""
    info_file, weights = run / "model.json", run / "model.safetensors"
    if not (info_file.is_file() and weights.is_file()):
        raise InputError(f"{run}: not a finetune run (needs model.json and model.safetensors)")
    info = json.loads(info_file.read_text())
    model = Classifier(build_backbone(info["timm_name"], info["in_chans"]), len(info["classes"]), info["in_chans"])
    model.load_state_dict(load_file(weights))
    return model.eval(), info


def target_layer(model: Classifier) -> torch.nn.Module:
    """The last convolutional stage: layer4 for ResNets, the head convolution for EfficientNets."""
    backbone = model.backbone
    if hasattr(backbone, "layer4"):
        return backbone.layer4[-1]
    return backbone.conv_head


def pick_rows(data: PackedDataset, classes: list[str], per_class: int) -> tuple[np.ndarray, list[int]]:
    """The first `per_class` test rows of each class (or positive for each label): rows and their class numbers."""
    test = data.indices("test")
    labels = data.labels(test)
    rows, targets = [], []
    for c, name in enumerate(classes):
        if data.task == "multiclass":
            hits = test[labels == c]
        else:
            hits = test[labels[:, data.classes.index(name)] == POSITIVE]
        rows += hits[:per_class].tolist()
        targets += [c] * len(hits[:per_class])
    if not rows:
        raise InputError(f"{data.root}: the test split has no image of {', '.join(classes)}")
    return np.array(rows), targets


def cams(model: Classifier, images: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps (N x H x W in [0, 1]) for class `targets[i]` of image i."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])


def draw(images: np.ndarray, maps: list[np.ndarray], titles: list[list[str]], names: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    n_rows, n_cols = len(maps), len(images)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.1 * n_cols, 2.4 * n_rows), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            grey = np.repeat(images[c][..., None], 3, axis=2)
            axes[r][c].imshow(show_cam_on_image(grey, maps[r][c], use_rgb=True))
            axes[r][c].set_title(titles[r][c], fontsize=7)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(names[r], fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> Path:
    data = PackedDataset(args.data)
    loaded = [load_model(Path(m)) for m in args.models]
    classes = loaded[0][1]["classes"]
    if any(info["classes"] != classes for _, info in loaded):
        raise InputError("--models: the runs were trained on different classes")
    size = args.size or loaded[0][1]["size"]
    rows, targets = pick_rows(data, classes, args.per_class)
    unique = np.unique(rows)  # an image positive for two labels is read once
    with build_loader(str(args.data), split="test", batch_size=len(unique), recipe=EVAL_RECIPE, size=size,
                      views=1, drop_last=False, rows=unique) as loader:  # fmt: skip
        batch = next(iter(loader))  # every picked image in one batch, in the loader's shuffled order
    position = {int(row): k for k, row in enumerate(batch.indices)}
    images = batch.views[0][[position[int(r)] for r in rows]].float().contiguous()
    maps, titles, names = [], [], []
    for (model, info), path in zip(loaded, args.models):
        with torch.no_grad():
            logits = model(images)
        if data.task == "multiclass":
            predicted = [classes[int(k)] for k in logits.argmax(1)]
        else:
            predicted = [("yes" if logits[i, t] > 0 else "no") for i, t in enumerate(targets)]
        maps.append(cams(model, images, targets))
        titles.append([f"true: {classes[t]}\npred: {p}" for t, p in zip(targets, predicted)])
        init = Path(info["init"])  # a backbone file is named by its run directory
        source = init.parent.name if init.suffix == ".safetensors" else info["init"]
        names.append(f"{Path(path).parent.name}/{Path(path).name}\ninit: {source}")
    pictures = images[:, 0].numpy().clip(0, 1).astype(np.float32)
    return draw(pictures, maps, titles, names, Path(args.out))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=location, required=True, help="the packed dataset the models were tuned on")
    shard_cache.add_arguments(parser)  # --shard-cache, ...: for a --data URL
    parser.add_argument("--models", nargs="+", required=True, help="finetune run directories, one row each")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the first run's)")
    parser.add_argument("--per-class", type=int, default=1, help="test images per class")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    shard_cache.configure_from(args)
    if args.per_class < 1:
        parser.error(f"--per-class {args.per_class} must be at least 1")
    print(f"wrote {run(args)}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="gradcam", errors=(ValueError,))
