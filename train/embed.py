"""`twinray embed --model RUN|EXPORT --data DIR --out EMB`: every image's embedding, and a 2-D map of them.

--model  a finished pretraining run (backbone.safetensors), a fine-tuning run (its backbone; the head is left out),
         a backbone .safetensors file, or a timm export (`twinray export`: config.json and model.safetensors).
--data   a packed directory (or URL), or a plain folder of images or a DICOM export: embed packs it first, as
         `twinray prep images` does with its defaults, into EMB/packed (class folders: pack them with `twinray prep
         folder` to keep their labels).

EMB is a folder, written beside itself and renamed into place when complete (an EMB that exists is kept unless
--force; --force never replaces an EMB that is or holds --model or --data):
    embeddings.npy  float32 N x D, one row per image, in rows.csv's order
    rows.csv        row (the index.npy row), path (the source file prep read), split, label (the class name;
                    multilabel: the positive labels joined by '|'; unlabeled: empty), then the metadata prep kept
                    for the image (origin, patient, view, sex, age, ...)
    embed.json      the model, the data (path, name, manifest sha256), N, D, the model's preprocessing
    map.png         PCA (or --map umap, with umap-learn installed) of the L2-normalised embeddings, coloured by
                    label or --color-by FIELD (any rows.csv column; `source` is the image's origin where prep
                    keeps one, the COVID-19 Radiography origin URLs, say)

Why .npy and CSV rather than Parquet: both need nothing beyond numpy and the standard library (pyarrow is a large
dependency that twinray does not otherwise need), np.load memory-maps the matrix, and the CSV opens in anything.

A model whose input channels are neither the data's (1, grey) nor 3 (grey repeated, as twinray's 3-channel runs
are fed) is one line, exit 2; so is a model that is not finished. When the data's prep settings differ from the
model's, one warning line says which (train/preprocessing.py). docs/reuse.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from twinray.atomic import atomic, write_json
from twinray.cli import InputError, OneLineParser, positive_int, run_cli
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep.cli import main as prep_main
from twinray.prep.format import LABEL_NONE, MANIFEST, SPLITS, PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.train import preprocessing, transfer
from twinray.train.export import publishing, unfinished
from twinray.usage import examples, program

MAPS = ("pca", "umap")
CHANNELS = (1, 3)  # a model fed grey (1) or grey repeated (3), as train/model.py's forward does
HIDDEN_META = ("label", "labels", "class", "split", "source")  # columns of their own, or the label again


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The backbone at `path` in eval mode (N x C x S x S float32 -> N x D) and what it is: {"timm_name",
    "in_chans", "output_stride", "size", "preprocessing" (None if unrecorded), "model"}. Raises InputError in one
    line for a missing path, an unfinished run, an ONNX export, or a model whose channels are not 1 or 3."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--model {path}: no such file or directory")
    if path.is_dir() and (path / "model.onnx").is_file():
        raise InputError(f"--model {path}: an ONNX export; embed reads a run, a backbone file or a timm export")
    if path.is_dir() and (path / "config.json").is_file() and "architecture" in _read(path / "config.json"):
        return _timm_export(path)
    if path.is_dir():
        if not (path / "backbone.safetensors").is_file() and not (path / "model.safetensors").is_file():
            if unfinished(path):
                raise InputError(f"--model {path}: the run has not finished (no backbone.safetensors yet)")
        weights = path / "backbone.safetensors"
        weights = weights if weights.is_file() else path / "model.safetensors"
    else:
        weights = path
    info = _read(weights.with_suffix(".json"))
    _check_channels(path, int(info.get("in_chans", 1)))
    try:
        backbone, init = transfer.load_backbone(str(path))
    except transfer.TransferError as e:
        raise InputError(str(e).replace("--init ", "--model ", 1)) from None
    size = info.get("size") or _read(weights.parent / "config.json").get("size") or 224
    found = {"timm_name": init["timm_name"], "in_chans": init["in_chans"], "size": int(size), "model": str(path),
             "output_stride": init["output_stride"]}  # fmt: skip
    return backbone.eval(), {**found, "preprocessing": info.get("preprocessing")}


def _timm_export(folder: Path) -> tuple[nn.Module, dict]:
    """A `twinray export --format timm` folder (or any timm Hub folder of a twinray backbone) without its
    classifier: the weights of config.json's architecture from model.safetensors, classifier keys dropped."""
    import timm

    config = _read(folder / "config.json")
    cfg = config.get("pretrained_cfg", {})
    model_args = dict(config.get("model_args") or {})  # what timm's own loader passes on: in_chans, output_stride
    in_chans = model_args["in_chans"] = int(model_args.get("in_chans", cfg.get("input_size", [3])[0]))
    _check_channels(folder, in_chans)
    if not (folder / "model.safetensors").is_file():
        raise InputError(f"--model {folder}: a timm folder without model.safetensors")
    try:
        model = timm.create_model(config["architecture"], num_classes=0, **model_args)
        head = cfg.get("classifier") or model.pretrained_cfg.get("classifier") or "fc"
        tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith(head + ".")}
        model.load_state_dict(tensors)
    except Exception as e:
        raise InputError(f"--model {folder}: not a timm export ({type(e).__name__}: {str(e)[:120]})") from None
    ours = config.get("twinray", {})
    size = int(ours.get("size") or cfg.get("input_size", [0, 224])[1])
    found = {"timm_name": config["architecture"], "in_chans": in_chans, "size": size, "model": str(folder),
             "output_stride": int(model_args.get("output_stride", 32))}  # fmt: skip
    return model.eval(), {**found, "preprocessing": ours.get("preprocessing")}


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _check_channels(path: Path, in_chans: int) -> None:
    if in_chans not in CHANNELS:
        raise InputError(
            f"--model {path}: the model takes {in_chans} input channels; the data is 1-channel grey, which feeds a "
            "1-channel model, or a 3-channel one with the grey repeated"
        )


def label_names(data: PackedDataset, rows: np.ndarray) -> list[str]:
    """Each row's label as text: the class name (multiclass), the positive labels joined by '|' (multilabel, code
    1), or '' (unlabeled, task "none")."""
    labels = data.labels(rows)
    if data.task == "multilabel":
        return ["|".join(c for c, code in zip(data.classes, r) if code == 1) for r in labels]
    return ["" if int(k) == LABEL_NONE else data.classes[int(k)] for k in labels]


def table(data: PackedDataset, rows: np.ndarray) -> list[dict]:
    """rows.csv's rows for dataset `rows`: row, path, split, label, then the sample JSON's other fields."""
    out = []
    for row, label in zip(rows, label_names(data, rows)):
        meta = data.metadata(int(row))
        extra = {k: ("|".join(map(str, v)) if isinstance(v, list) else v) for k, v in meta.items()}
        cells = {"row": int(row), "path": meta.get("source", ""), "split": SPLITS[data.index["split"][row]]}
        out.append({**cells, "label": label, **{k: v for k, v in extra.items() if k not in HIDDEN_META}})
    return out


@torch.no_grad()
def embed(model: nn.Module, info: dict, data: str, splits: list[str], device: str, batch_size: int = 256,
          workers: int | None = None, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(embeddings float32 N x D, their dataset rows int64 N) of every image of `splits`, in split order then the
    loader's order, through build_loader with EVAL_RECIPE at `size` (the model's by default). An empty split
    gives nothing."""
    model = model.to(device).to(memory_format=torch.channels_last)
    counts = open_dataset(data).manifest.get("splits", {})
    feats, rows = [], []
    for split in splits:
        if not counts.get(split):  # an empty split gives nothing; any other refusal is said, never passed over
            continue
        try:
            settings = LoaderSettings(
                split=split,
                batch_size=batch_size,
                device=device,
                recipe=EVAL_RECIPE,
                size=size or info["size"],
                views=1,
                drop_last=False,
                workers=workers,
            )
            loader = build_loader(data, settings)
        except ValueError as e:
            raise InputError(f"--data {data}: {e}") from None
        with loader:
            for batch in loader:
                x = batch.views[0]
                if x.shape[1] != info["in_chans"]:
                    x = x.expand(-1, info["in_chans"], -1, -1)
                feats.append(model(x).float().cpu())
                rows.append(batch.indices.cpu())
    if not feats:
        raise InputError(f"--data {data}: no images in {', '.join(splits)}")
    return torch.cat(feats).numpy(), torch.cat(rows).numpy().astype(np.int64)


def device_arg(text: str) -> str:
    """argparse type of --device: a torch device that is here (cpu, cuda, cuda:1, mps); else a one-line error."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no MPS device here; use --device cpu")
    return text


def view_size(text: str) -> int:
    """argparse type of --size: a side in px of at least 8 (the eval recipe's least)."""
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 8")
    return value


def project(x: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """N x 2 coordinates of the L2-normalised rows of x, and a description for the title. PCA: sklearn; UMAP:
    umap-learn (McInnes et al. 2018), cosine metric. Raises InputError for umap without umap-learn."""
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise InputError("--map umap needs umap-learn (pip install umap-learn); --map pca needs nothing") from None
        points = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(z)
        return np.asarray(points), "UMAP"
    from sklearn.decomposition import PCA

    n = min(2, *z.shape)
    pca = PCA(n_components=n, random_state=seed).fit(z)
    points = pca.transform(z)
    if n < 2:
        points = np.pad(points, ((0, 0), (0, 2 - n)))
    share = " / ".join(f"{v:.0%}" for v in pca.explained_variance_ratio_)
    return points, f"PCA ({share} of the variance)"


def color_field(rows: list[dict], field: str) -> str:
    """The rows.csv column `--color-by FIELD` names; `source` is the image's origin where prep keeps one.
    Raises InputError naming the columns there are."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if field == "source" and "source" not in columns and "origin" in columns:
        return "origin"
    if field not in columns:
        raise InputError(f"--color-by {field!r}: not a column here; there are {', '.join(columns)}")
    return field


def draw_map(points: np.ndarray, rows: list[dict], field: str, title: str, path: Path) -> Path:
    """map.png: one point per image, coloured by `field` (categories: a legend of the 20 commonest; numbers such
    as age: a colour bar). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r.get(field) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 6))
    size = max(4, 40 / math.sqrt(max(1, len(rows) / 100)))
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numeric and len(numeric) == len([v for v in values if v not in (None, "")]) and len(set(numeric)) > 20:
        c = np.array([float(v) if v not in (None, "") else np.nan for v in values])
        shown = ax.scatter(points[:, 0], points[:, 1], c=c, s=size, cmap="viridis")
        fig.colorbar(shown, ax=ax, label=field)
    else:
        text = ["(none)" if v in (None, "") else str(v) for v in values]
        counts = {}
        for t in text:
            counts[t] = counts.get(t, 0) + 1
        kept = sorted(counts, key=lambda t: (-counts[t], t))[:20]
        cmap = plt.get_cmap("tab20" if len(kept) > 10 else "tab10")
        for k, name in enumerate(kept):
            pick = np.array([t == name for t in text])
            label = name if len(name) <= 40 else name[:37] + "..."
            ax.scatter(points[pick, 0], points[pick, 1], s=size, color=cmap(k), label=f"{label} ({counts[name]})")
        rest = np.array([t not in kept for t in text])
        if rest.any():
            ax.scatter(points[rest, 0], points[rest, 1], s=size, color="lightgrey", label=f"other ({rest.sum()})")
        ax.legend(title=field, fontsize=7, loc="best", markerscale=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def unpacked_folder(data: str) -> Path | None:
    """`data` when it is a local folder that holds no packed dataset (no manifest.json): a plain tree of images
    that embed packs first (`prep images`); None for a packed directory or a URL."""
    if "://" in str(data):
        return None
    path = Path(data)
    return path if path.is_dir() and not (path / MANIFEST).is_file() else None


def run(args: argparse.Namespace) -> Path:
    """Embeds, writes EMB (the module docstring) and returns its path. A plain folder as --data is packed first
    with `prep images`' defaults into EMB/packed (which embed.json names, so neighbours can draw its images)."""
    model, info = load_model(args.model)
    splits = list(dict.fromkeys(s.strip() for s in args.splits.split(",")))  # `test,test` is the test split once
    for split in splits:
        if split not in SPLITS:
            raise InputError(f"--splits: {split!r} is not one of {', '.join(SPLITS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = unpacked_folder(args.data)
    if folder is None:
        open_dataset(args.data)  # a bad --data is one line before anything is written
    with publishing(args.out, args.force, inputs=(args.model, args.data)) as tmp:
        source, recorded = str(args.data), str(args.data)
        if folder is not None:  # a plain tree of images: packed without labels, as `prep images` packs it
            source, recorded = str(tmp / "packed"), str(Path(args.out) / "packed")
            prep_main(["images", "--src", str(folder), "--out", source])
        data = open_dataset(source)
        if data.manifest.get("image", {}).get("channels", 1) != 1:
            raise InputError(f"--data {args.data}: embed reads 1-channel grey datasets")
        warning = preprocessing.warn("embed", info["preprocessing"], data.manifest, str(args.data))
        wanted = np.concatenate([data.indices(split) for split in splits])
        by_row = {r["row"]: r for r in table(data, wanted)}  # read before the model runs: --color-by is checked first
        field = color_field(list(by_row.values()), args.color_by)
        x, rows = embed(model, info, source, splits, device, args.batch_size, args.workers, args.size)
        table_rows = [by_row[int(r)] for r in rows]
        np.save(tmp / "embeddings.npy", x.astype(np.float32), allow_pickle=False)
        write_rows(tmp / "rows.csv", table_rows)
        points, how = project(x, args.map)
        name = data.manifest.get("dataset", Path(str(args.data)).name)
        draw_map(points, table_rows, field, f"{name}: {len(x)} embeddings of {args.model}, {how}, by {field}",
                 tmp / "map.png")  # fmt: skip
        write_json(tmp / "embed.json", {
            "model": str(args.model), "timm_name": info["timm_name"], "in_chans": info["in_chans"],
            "output_stride": info["output_stride"], "size": args.size or info["size"], "data": recorded,
            "dataset": name, "data_digest": data.digest,
            "splits": splits, "n": int(x.shape[0]), "dim": int(x.shape[1]), "map": how, "color_by": field,
            "device": device, "preprocessing": info["preprocessing"], "prep_warning": warning,
        })  # fmt: skip
        data.close()
    print(f"embedded {len(x)} images ({x.shape[1]} features each) into {args.out}; map: {args.out / 'map.png'}")
    return Path(args.out)


def main(argv: list[str] | None = None) -> int:
    prog = program("embed", "twinray.train.embed")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(
            prog,
            "--model runs/bt --data data/packed/covid --out emb/bt",
            "--model exports/bt-timm --data data/packed/covid --out emb/bt --color-by source",
        ),  # fmt: skip
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="a run, a backbone .safetensors or a timm export")
    parser.add_argument(
        "--data",
        required=True,
        help="a packed directory or URL, or a plain folder of images (packed first into OUT/packed)",
    )
    parser.add_argument("--out", required=True, type=Path, help="the embeddings' folder")
    parser.add_argument("--splits", default=",".join(SPLITS), help="splits to embed, comma-separated (all)")
    parser.add_argument("--color-by", default="label", help="the map's colours: label (default), source, view, "
                        "sex or any rows.csv column")  # fmt: skip
    parser.add_argument("--map", choices=MAPS, default="pca", help="pca (default) or umap (needs umap-learn)")
    parser.add_argument("--size", type=view_size, default=None, help="input size in px (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per batch (256)")
    parser.add_argument("--device", type=device_arg, default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--workers", type=positive_int, default=None, help="decode threads (default: the loader's)")
    parser.add_argument("--force", action="store_true", help="replace an --out that exists")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main, prog="embed")
