"""Grad-CAM of fine-tuned models side by side, on N test images per class (the study's figure 16).

    python train/gradcam.py --data DIR --models RUN_DIR [RUN_DIR ...] [--size S] [--per-class N] --out FILE.png

Each RUN_DIR is a train/finetune.py output (model.safetensors + model.json). One row per model, one column per
image; each panel overlays the heat map (blue low, red high) on the X-ray and names the true and predicted labels.
For multilabel data a "class" is a label: images positive for it, with the map and prediction for that label.
The maps come from the `grad-cam` package at the backbone's last convolutional stage.

Classes are matched by name (model.json's "classes" against the data's manifest), never by position: data that
holds some of a model's classes works, and a class of the data that a model does not know is one line, exit 2.
FILE.json beside the PNG records what each panel shows: the image's row and true class, and for each model the
output it maps (its index of that class) and its prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from twinray.atomic import write_json
from twinray.cli import InputError, OneLineParser, run_cli
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep import shard_cache
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings
from twinray.storage import location
from twinray.train.labels import POSITIVE
from twinray.train.model import Classifier, build_backbone
from twinray.train.transfer import class_indices
from twinray.usage import examples, program


def load_model(run: Path) -> tuple[Classifier, dict]:
    """A finetune run's model (eval mode, CPU) and its model.json."""
    info_file, weights = run / "model.json", run / "model.safetensors"
    if not (info_file.is_file() and weights.is_file()):
        raise InputError(f"{run}: not a finetune run (needs model.json and model.safetensors)")
    info = json.loads(info_file.read_text())
    backbone = build_backbone(info["timm_name"], info["in_chans"], output_stride=int(info.get("output_stride", 32)))
    model = Classifier(backbone, len(info["classes"]), info["in_chans"])
    model.load_state_dict(load_file(weights))
    return model.eval(), info


def target_layer(model: Classifier) -> torch.nn.Module:
    """The last convolutional stage: layer4 for ResNets, the head convolution for EfficientNets."""
    backbone = model.backbone
    if hasattr(backbone, "layer4"):
        return backbone.layer4[-1]
    return backbone.conv_head


def pick_rows(data: PackedDataset, classes: list[str], per_class: int) -> tuple[np.ndarray, list[str]]:
    """The first `per_class` test rows of each class named in `classes` (or positive for each label), all of them
    among `data.classes`: the rows (int64) and each row's class name. Raises InputError when there are none."""
    test = data.indices("test")
    labels = data.labels(test)
    rows, names = [], []
    for name in classes:
        column = data.classes.index(name)  # the data's number of the class, whatever the model's is
        hits = test[labels == column] if data.task == "multiclass" else test[labels[:, column] == POSITIVE]
        rows += hits[:per_class].tolist()
        names += [name] * len(hits[:per_class])
    if not rows:
        raise InputError(f"{data.location}: the test split has no image of {', '.join(classes)}")
    return np.array(rows), names


def shown_classes(data: PackedDataset, loaded: list[tuple[Classifier, dict]], runs: list[str]) -> list[str]:
    """The classes to draw, by name, in the first model's order: those of its classes the data has. Every model
    must be of the data's task and know every class of multiclass data (and every label drawn). Raises InputError
    (one line) naming the run, the class it does not know and its classes."""
    for (_, info), run in zip(loaded, runs):
        if info.get("task", "multiclass") != data.task:
            raise InputError(f"--models {run}: a {info.get('task')} model, and --data {data.location} is {data.task}")
    classes = [name for name in loaded[0][1]["classes"] if name in data.classes]
    for (_, info), run in zip(loaded, runs):
        class_indices(info["classes"], data.classes if data.task == "multiclass" else classes, f"--models {run}")
    if not classes:
        raise InputError(f"--data {data.location} has none of the labels of --models {runs[0]}")
    return classes


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


def run(args: argparse.Namespace, cache: CacheSettings | None = None) -> dict:
    """Draws the grid into args.out and writes its record beside it (FILE.json); returns the record: {"png",
    "data", "data_sha256", "rows", "true" (class names), "models": [{"run", "classes", "targets" (the model's output
    index mapped for each image), "predicted" (class names, or yes/no per label)}]}. `cache`: how a URL --data is
    read (prep/shard_cache.py)."""
    data = open_dataset(args.data, cache)
    loaded = [load_model(Path(m)) for m in args.models]
    runs = [str(m) for m in args.models]
    classes = shown_classes(data, loaded, runs)
    size = args.size or loaded[0][1]["size"]
    rows, true = pick_rows(data, classes, args.per_class)
    unique = np.unique(rows)  # an image positive for two labels is read once
    settings = LoaderSettings(
        split="test",
        batch_size=len(unique),
        recipe=EVAL_RECIPE,
        size=size,
        views=1,
        drop_last=False,
        rows=unique,
        shard_cache=cache,
    )
    with build_loader(str(args.data), settings) as loader:
        batch = next(iter(loader))  # every picked image in one batch, in the loader's shuffled order
    position = {int(row): k for k, row in enumerate(batch.indices)}
    images = batch.views[0][[position[int(r)] for r in rows]].float().contiguous()
    maps, titles, names, drawn = [], [], [], []
    for (model, info), path in zip(loaded, args.models):
        targets = class_indices(info["classes"], true, f"--models {path}")  # this model's output of each class
        with torch.no_grad():
            logits = model(images)
        if data.task == "multiclass":
            predicted = [info["classes"][int(k)] for k in logits.argmax(1)]
        else:
            predicted = [("yes" if logits[i, t] > 0 else "no") for i, t in enumerate(targets)]
        maps.append(cams(model, images, targets))
        titles.append([f"true: {name}\npred: {p}" for name, p in zip(true, predicted)])
        init = Path(info["init"])  # a backbone file is named by its run directory
        source = init.parent.name if init.suffix == ".safetensors" else info["init"]
        names.append(f"{Path(path).parent.name}/{Path(path).name}\ninit: {source}")
        drawn.append({"run": str(path), "classes": info["classes"], "targets": targets, "predicted": predicted})
    pictures = images[:, 0].numpy().clip(0, 1).astype(np.float32)
    png = draw(pictures, maps, titles, names, Path(args.out))
    record = {"png": str(png), "data": data.location, "data_sha256": data.digest, "rows": rows.tolist(),
              "true": true, "models": drawn}  # fmt: skip
    write_json(png.with_suffix(".json"), record)
    return record


def main(argv: list[str] | None = None) -> int:
    prog = program("gradcam", "twinray.train.gradcam")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(prog, "--data data/packed/covid --models runs/ft-random runs/ft-byol --out gradcam.png"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", type=location, required=True, help="the packed dataset the models were tuned on (required)"
    )
    shard_cache.add_arguments(parser)  # --shard-cache, ...: for a --data URL
    parser.add_argument("--models", nargs="+", required=True, help="finetune run directories, one row each (required)")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the first run's)")
    parser.add_argument("--per-class", type=int, default=1, help="test images per class (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, required=True, help="the PNG to write; its record goes beside it as .json (required)"
    )
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class {args.per_class} must be at least 1")
    if args.out.suffix.lower() == ".json":
        parser.error(f"--out {args.out}: the picture's file (its record goes beside it, as .json)")
    record = run(args, CacheSettings.from_args(args))
    print(f"wrote {record['png']} and {Path(record['png']).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="gradcam", errors=(ValueError,))
