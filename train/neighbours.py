"""`twinray neighbours --emb EMB [--query PATH|ROW] -k 8`: an image's nearest images, and a cross-split leak check.

EMB is `twinray embed`'s folder. Similarity is the cosine of two embeddings once centred on the mean of EMB's:
pooled ReLU features all lie in one positive cone, so their raw cosines crowd near 1, and centring spreads them
(an exact duplicate still scores 1).

--query ROW|PATH  the image: its dataset row (rows.csv's `row`) or its source path (rows.csv's `path`, a unique
                  ending of one, or the file's path as you have it, e.g. data/raw/.../COVID/images/COVID-5.png,
                  that ends with one). Prints the k nearest other images (row, split, label, similarity, path) and draws
                  the query beside them as one PNG (--grid, default EMB/neighbours-ROW.png; redrawn each time,
                  as it is a view of EMB), the images read from the packed data that embed.json names.
leak check        always: the pairs of images from different splits whose similarity is at least --threshold
                  (near-duplicates: one patient's image in train and another in test, or one file packed twice),
                  counted per pair of splits; the most similar (up to LISTED, 10,000) are written to EMB/leaks.csv
                  (row_a, row_b, splits, similarity, paths), the most similar first. A pair above 0.99 deserves
                  a look; an exact duplicate scores 1.
docs/reuse.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from twinray.atomic import atomic, write_csv
from twinray.cli import InputError, OneLineParser, run_cli
from twinray.prep.open_dataset import open_dataset
from twinray.usage import examples, program

THRESHOLD = 0.99
LISTED = 10_000  # the leak check lists at most this many pairs in leaks.csv (the most similar); it counts them all


def load(emb: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """(float32 N x D embeddings, centred on their mean and L2-normalised; rows.csv's rows; embed.json) of an embed
    folder. Raises InputError naming a missing or mismatched file."""
    emb = Path(emb)
    for name in ("embeddings.npy", "rows.csv", "embed.json"):
        if not (emb / name).is_file():
            raise InputError(f"--emb {emb}: no {name} (a `twinray embed` folder holds embeddings.npy, rows.csv, "
                             "embed.json)")  # fmt: skip
    try:
        x = np.load(emb / "embeddings.npy", allow_pickle=False).astype(np.float32)
    except (ValueError, OSError, EOFError) as e:  # cut short, or not an array numpy wrote
        raise InputError(f"--emb {emb}: embeddings.npy does not read ({e}); run twinray embed again") from None
    if x.ndim != 2:
        raise InputError(f"--emb {emb}: embeddings.npy is {x.ndim}-D; embed writes an N x D matrix")
    with open(emb / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(x):
        raise InputError(f"--emb {emb}: rows.csv has {len(rows)} rows, embeddings.npy {len(x)}")
    try:
        info = json.loads((emb / "embed.json").read_text())
    except ValueError as e:
        raise InputError(f"--emb {emb}: embed.json is not valid JSON ({e})") from None
    x = x - x.mean(0, keepdims=True)  # centred: pooled ReLU features share one large positive direction
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), rows, info


def find(rows: list[dict], query: str) -> int:
    """The position in rows.csv of the image `query` names: a dataset row number, a source path, or a unique
    ending of one, or a longer path that ends with one (the file as the user's folder has it: the longest such
    source). Raises InputError when none or several match."""
    if query.isdigit():
        hits = [k for k, r in enumerate(rows) if r["row"] == query]
        if not hits:
            raise InputError(f"--query {query}: no image with that row here ({len(rows)} images embedded)")
        return hits[0]
    exact = [k for k, r in enumerate(rows) if r["path"] == query]
    hits = exact or [k for k, r in enumerate(rows) if r["path"].endswith("/" + query.lstrip("/"))]
    if not hits:  # the file's own path as the user has it (data/raw/.../COVID/images/COVID-5.png): the longest match
        under = [k for k, r in enumerate(rows) if r["path"] and query.endswith("/" + r["path"])]
        longest = max((len(rows[k]["path"]) for k in under), default=0)
        hits = [k for k in under if len(rows[k]["path"]) == longest]
    if len(hits) != 1:
        what = "no image's path is or ends with it" if not hits else f"{len(hits)} paths end with it; give more of it"
        raise InputError(f"--query {query}: {what}")
    return hits[0]


def nearest(x: np.ndarray, k: int, at: int) -> list[tuple[int, float]]:
    """The `k` positions most similar to position `at` (itself left out) and their cosine similarities."""
    sims = x @ x[at]
    sims[at] = -np.inf
    order = np.argsort(-sims, kind="stable")[: min(k, len(x) - 1)]
    return [(int(j), float(sims[j])) for j in order]


def leaks(x: np.ndarray, splits: list[str], threshold: float = THRESHOLD) -> tuple[dict[str, int], list[tuple]]:
    """The pairs of positions from different splits with cosine similarity >= threshold: (their count per pair of
    splits, "test-train": n; the LISTED most similar pairs as (i, j, similarity), i < j, most similar first).
    N x N similarities in blocks of about 2^26 (torch matmul, float32: 256 MB at a time)."""
    t = torch.from_numpy(x)
    names = list(dict.fromkeys(splits))
    codes = torch.tensor([names.index(s) for s in splits])
    block = max(1, 2**26 // max(1, len(t)))
    counts = torch.zeros(len(names) * len(names), dtype=torch.int64)
    kept = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    for start in range(0, len(t), block):
        sims = t[start : start + block] @ t.T
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        keep = (j > i + start) & (codes[i + start] != codes[j])
        i, j = i[keep], j[keep]
        a, b = torch.minimum(codes[i + start], codes[j]), torch.maximum(codes[i + start], codes[j])
        counts += torch.bincount(a * len(names) + b, minlength=len(counts))
        kept = tuple(torch.cat(p) for p in zip(kept, (i + start, j, sims[i, j])))
        if len(kept[2]) > LISTED:
            top = torch.topk(kept[2], LISTED).indices
            kept = tuple(p[top] for p in kept)
    per = {}
    for code in counts.nonzero().flatten().tolist():
        pair = "-".join(sorted((names[code // len(names)], names[code % len(names)])))
        per[pair] = int(counts[code])
    pairs = [(int(a), int(b), float(v)) for a, b, v in zip(*kept)]
    return per, sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def draw_grid(info: dict, rows: list[dict], at: int, hits: list[tuple[int, float]], path: Path) -> Path:
    """The query and its neighbours in one row of panels (split, label, similarity above each), from the packed
    data embed.json names. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = open_dataset(info["data"])
    panels = [(at, None), *hits]
    cols = min(len(panels), 5)
    lines = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(2.4 * cols, 2.7 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (k, sim) in zip(axes.flat, panels):
        r = rows[k]
        ax.imshow(data.image(int(r["row"])), cmap="gray", vmin=0, vmax=255)
        head = "query" if sim is None else f"{sim:.3f}"
        ax.set_title(f"{head}\nrow {r['row']} {r['split']} {r['label']}"[:60], fontsize=7)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    prog = program("neighbours", "twinray.train.neighbours")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(
            prog,
            "--emb emb/bt --query 17 -k 8",
            "--emb emb/bt --query COVID/images/COVID-5.png",
            "--emb emb/bt --threshold 0.995",
        ),  # fmt: skip
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--emb", required=True, type=Path, help="a `twinray embed` folder")
    parser.add_argument("--query", default=None, help="an image's row or source path (without: the leak check only)")
    parser.add_argument("-k", type=int, default=8, help="neighbours to show (8)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help=f"leak check's cosine ({THRESHOLD})")
    parser.add_argument("--grid", type=Path, default=None, help="the PNG (default: EMB/neighbours-ROW.png)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"-k {args.k}: must be at least 1")
    if not -1 <= args.threshold <= 1:
        parser.error(f"--threshold {args.threshold}: a cosine similarity is in [-1, 1]")
    if args.grid is not None and args.grid.is_dir():
        raise InputError(f"--grid {args.grid} is a folder; the grid is one PNG file: give its path")
    x, rows, info = load(args.emb)
    if args.grid is not None:  # its folder made before the work, not found missing after it
        try:
            args.grid.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--grid {args.grid}: cannot make its folder ({e.strerror or e})") from None
    if args.query is not None:
        at = find(rows, args.query)
        hits = nearest(x, args.k, at)
        q = rows[at]
        said = ", ".join(v for v in (q["split"], q["label"]) if v)  # an unlabeled dataset's label is empty
        print(f"query: row {q['row']} ({said}) {q['path']}")
        for rank, (j, sim) in enumerate(hits, 1):
            r = rows[j]
            print(f"{rank:>3}  {sim:.4f}  row {r['row']:>6}  {r['split']:<5}  {r['label']:<16}  {r['path']}")
        grid = draw_grid(info, rows, at, hits, args.grid or args.emb / f"neighbours-{q['row']}.png")
        print(f"wrote {grid}")
    counts, pairs = leaks(x, [r["split"] for r in rows], args.threshold)
    table = [{"row_a": rows[a]["row"], "row_b": rows[b]["row"], "split_a": rows[a]["split"],
              "split_b": rows[b]["split"], "similarity": round(s, 6), "path_a": rows[a]["path"],
              "path_b": rows[b]["path"]} for a, b, s in pairs]  # fmt: skip
    fields = ["row_a", "row_b", "split_a", "split_b", "similarity", "path_a", "path_b"]
    write_csv(args.emb / "leaks.csv", table, fields)
    per = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    total = sum(counts.values())
    listed = f"the {len(pairs)} most similar in" if len(pairs) < total else "listed in"
    print(f"leak check: {total} cross-split pairs at cosine >= {args.threshold} ({per}), {listed} {args.emb}/leaks.csv")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="neighbours")
