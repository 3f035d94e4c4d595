"""See what the model sees: original images beside their augmented views, as one PNG (like the study's figs. 7-9).

python -m twinray.pipelines.preview --data data/demo/packed --recipe seed-final --out grid.png [--n 6] [--views 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from twinray.cli import InputError, OneLineParser, run_cli
from twinray.pipelines.augment import Augment, load_recipe
from twinray.pipelines.augment.recipes import RECIPES, TOKENS
from twinray.pipelines.native import pad_batch
from twinray.prep import shard_cache
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings
from twinray.storage import location
from twinray.usage import examples, program

HEADER = 28


def _tile(image: np.ndarray, size: int, caption: str) -> np.ndarray:
    """A size x size grey tile (aspect kept, letterboxed) under a caption strip."""
    h, w = image.shape
    scale = size / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.zeros((size + HEADER, size), np.uint8)
    top, left = HEADER + (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    tile[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    cv2.putText(tile, caption[:28], (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1, cv2.LINE_AA)
    return tile


def preview_grid(
    data_dir,
    recipe="seed-final",
    n: int = 6,
    views: int = 2,
    split: str = "train",
    seed: int = 0,
    cache: CacheSettings | None = None,
):
    """Rows: samples. Columns: the stored image, then `views` augmented views. uint8 HxW. `cache`: how a URL
    `data_dir` is read (prep/shard_cache.py)."""
    data = open_dataset(data_dir, cache)
    rows = data.indices(split)[:n]
    if len(rows) == 0:
        raise InputError(f"{data_dir}: split {split!r} is empty")
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    originals = [data.image(int(i)) for i in rows]
    batch, sizes = pad_batch([torch.from_numpy(im) for im in originals])
    augment = Augment(recipe, seed=seed)
    outs = [(augment(batch, sizes)[:, 0].float().clamp(0, 1) * 255).round().byte().numpy() for _ in range(views)]
    size = recipe.size
    lines = []
    for k, i in enumerate(rows):
        meta = data.metadata(int(i))
        name = meta.get("class") or ", ".join(c for c, v in meta.get("labels", {}).items() if v == 1) or "no label"
        tiles = [_tile(originals[k], size, f"{name}")]
        tiles += [_tile(outs[v][k], size, f"view {v + 1}") for v in range(views)]
        lines.append(np.hstack(tiles))
    return np.vstack(lines)


def main(argv=None) -> int:
    prog = program("preview", "twinray.pipelines.preview")
    parser = OneLineParser(  # a bad argument is one line, exit 2
        prog=prog,
        description=__doc__,
        epilog=examples(
            prog,
            "--data data/packed/covid --out grid.png",
            "--data data/packed/covid --recipe base+vflip+equalize --n 4 --views 3 --out grid.png",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, type=location, help="a packed dataset or its URL (required)")
    shard_cache.add_arguments(parser)  # --shard-cache, ...: for a --data URL
    parser.add_argument(
        "--recipe",
        default="seed-final",
        help=f"the augmentation recipe: a named one ({', '.join(RECIPES)}), base+OP+... (OP: {', '.join(TOKENS)}) or "
        "a .yaml file (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write (required)")
    parser.add_argument(
        "--n", type=int, default=6, help="images, one row each: the split's first N (default: %(default)s)"
    )
    parser.add_argument("--views", type=int, default=2, help="augmented views beside each (default: %(default)s)")
    parser.add_argument("--split", default="train", help="the split the images come from (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the augmentations (default: %(default)s)")
    args = parser.parse_args(argv)
    cache = CacheSettings.from_args(args)
    grid = preview_grid(args.data, args.recipe, args.n, args.views, args.split, args.seed, cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), grid):
        raise InputError(f"could not write {args.out}")
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="preview", errors=(ValueError,))
