"""`python -m prep`: convert X-ray collections to the packed format, check them, and describe them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from twinray.cli import InputError, OneLineParser, pixel_count, positive_float, positive_int, say_error
from twinray.prep import build, sample, shard_cache
from twinray.prep.datasets import chexpert, covid, folder, unlabeled
from twinray.prep.format import (
    ENCODINGS,
    LABEL_MISSING,
    LABEL_NONE,
    NEGATIVE,
    POSITIVE,
    SPLITS,
    UNCERTAIN,
    PackedDataset,
    verify,
)
from twinray.prep.images import DEFAULT_BIT_DEPTH, DEFAULT_MAX_PIXELS, parse_bit_depth
from twinray.prep.open_dataset import open_dataset
from twinray.prep.remote import pack_to_url
from twinray.prep.shard_cache import CacheSettings
from twinray.storage import is_url, join, local_path, location, storage_options_type
from twinray.usage import examples, program


def _bit_depth(text: str) -> str | int:
    try:
        return parse_bit_depth(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'full' or a whole number of bits from 8 to 16") from None


def _add_pack_options(p: argparse.ArgumentParser, split_default: str | None, out_default: Path | None = None):
    if out_default is None:
        p.add_argument("--out", required=True, type=location, help="output directory or URL (one dataset)")
    else:
        p.add_argument("--out", type=location, default=out_default, help=f"one sub-folder per dataset ({out_default})")
    p.add_argument("--size", type=positive_int, default=256, help="shorter side in px, never upsampled (256)")
    p.add_argument("--encoding", choices=list(ENCODINGS), default="jpeg", help="image member encoding (jpeg)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the shard order (0)")
    p.add_argument("--shard-samples", type=positive_int, default=1024, help="samples per shard (1024)")
    p.add_argument("--force", action="store_true", help="rebuild even if --out is already complete")
    p.add_argument(
        "--storage-options", type=storage_options_type, default=None, help="fsspec options (JSON) for a URL --out"
    )
    p.add_argument(
        "--max-pixels",
        type=pixel_count,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels, by their header, before decoding ({DEFAULT_MAX_PIXELS:.0e})",
    )
    p.add_argument(
        "--bit-depth",
        type=_bit_depth,
        default=DEFAULT_BIT_DEPTH,
        help="scale of 16-bit PNG/TIFF files that declare no depth (sBIT, SMaxSampleValue): 'full' (0..65535, "
        f"whatever the content) or N bits, 8 to 16, for the whole dataset ({DEFAULT_BIT_DEPTH})",
    )
    if split_default:
        p.add_argument("--split", default=split_default, help=f"split percentages ({split_default})")


def _pack(plan: build.Plan, args) -> int:
    if is_url(args.out):  # built locally, then uploaded with the manifest last (prep/remote.py)
        pack = lambda plan, out, **kw: pack_to_url(plan, out, args.storage_options, **kw)  # noqa: E731
    else:
        pack = build.pack
    result = pack(
        plan,
        args.out,
        size=args.size,
        encoding=args.encoding,
        workers=args.workers,
        seed=args.seed,
        shard_samples=args.shard_samples,
        force=args.force,
        max_pixels=args.max_pixels,
        bit_depth=args.bit_depth,
    )
    print(result.summary)
    return 0


def cmd_covid(args) -> int:
    return _pack(covid.plan(args.src, split=args.split, seed=args.seed), args)


def cmd_chexpert(args) -> int:
    return _pack(chexpert.plan(args.src, views=args.views, split=args.split, seed=args.seed), args)


def cmd_folder(args) -> int:
    plan = folder.plan(
        args.src,
        csv_file=args.csv,
        path_col=args.path_col,
        label_col=args.label_col,
        patient_col=args.patient_col,
        split=args.split,
        seed=args.seed,
        name=args.name,
    )
    return _pack(plan, args)


def cmd_images(args) -> int:
    plan = unlabeled.plan(
        args.src,
        views=args.views,
        modalities=args.modalities,
        body_parts=args.body_parts,
        patient_from=args.patient_from,
        csv_file=args.csv,
        path_col=args.path_col,
        patient_col=args.patient_col,
        drop_phi=args.drop_phi,
        split=args.split,
        seed=args.seed,
        name=args.name,
        workers=args.workers or build.default_workers(),
    )
    return _pack(plan, args)


def cmd_sample(args) -> int:
    if args.dicom_tree:
        root = sample.dicom_tree(args.out, patients=args.patients, seed=args.seed, force=args.force)
        print(f"sample ready: {root}")
        return 0
    root = sample.generate(
        args.out,
        n=args.n,
        seed=args.seed,
        workers=args.workers or 1,
        force=args.force,
        metadata=args.metadata,
        strength=args.finding_strength,
    )
    print(f"sample ready: {root}")
    return 0


def cmd_all(args) -> int:
    """Every known dataset found under --raw; the missing ones are skipped with one line each."""
    found = {
        "covid": [args.raw / covid.FOLDER_NAME],
        "chexpert": [args.raw / "CheXpert-v1.0-small", args.raw / "CheXpert-v1.0"],
    }
    for name, candidates in found.items():
        src = next((c for c in candidates if c.is_dir()), None)
        if src is None:
            print(f"skip {name}: {' or '.join(str(c) for c in candidates)} not found")
            continue
        plan = covid.plan(src, seed=args.seed) if name == "covid" else chexpert.plan(src, seed=args.seed)
        sub = argparse.Namespace(**{**vars(args), "out": join(args.out, name) if is_url(args.out) else args.out / name})
        _pack(plan, sub)
    return 0


def cmd_ffcv(args) -> int:
    """One .beton per split for the FFCV backend (it also writes them itself when missing)."""
    from twinray.prep.ffcv_pack import write_beton  # lazy: it imports torch, which no other prep command loads

    data = open_dataset(args.dir, CacheSettings.from_args(args))
    for split in args.splits.split(","):
        if split not in SPLITS:
            raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if data.manifest["splits"][split]:
            print(f"wrote {write_beton(data.root, split)}")  # the local copy of a URL, attached to its cache
    return 0


def cmd_verify(args) -> int:
    cache = CacheSettings.from_args(args)
    for line in verify(open_dataset(args.dir, cache)):
        print(line)
    data = open_dataset(args.dir, cache)
    if data.task == "none":
        print(f"ok: {args.dir} (unlabeled: {len(data)} images, no labels, every index label {LABEL_NONE})")
    else:
        print(f"ok: {args.dir}")
    return 0


def describe(data: PackedDataset) -> str:
    m = data.manifest
    size_mb = sum(data.shard_bytes(name) for name in data.shard_names) / 1e6
    lines = [
        f"{m['dataset']} ({m['task']}) in {data.location}",
        f"  format v{m['format_version']}: {m['image']['encoding']}, shorter side {m['image']['size']} px, "
        f"{len(data.shard_names)} shards, {size_mb:.1f} MB",
    ]
    splits = data.index["split"]
    width = max((len(c) for c in data.classes), default=0) + 2
    if data.task == "none":
        lines.append("  unlabeled (task none): no classes and no labels; for pretraining, with --eval-data to evaluate")
    elif data.task == "multiclass":
        lines.append("  " + "class".ljust(width) + "".join(s.rjust(8) for s in SPLITS) + "total".rjust(8))
        for k, name in enumerate(data.classes):
            per = [int(((data.index["label"] == k) & (splits == j)).sum()) for j in range(len(SPLITS))]
            lines.append("  " + name.ljust(width) + "".join(str(n).rjust(8) for n in per) + str(sum(per)).rjust(8))
    else:
        codes = data.index["labels"]
        lines.append(
            "  " + "label (train)".ljust(width) + "".join(h.rjust(10) for h in ("pos", "neg", "uncertain", "blank"))
        )
        train = splits == 0
        for k, name in enumerate(data.classes):
            column = codes[train, k]
            counts = [(column == code).sum() for code in (POSITIVE, NEGATIVE, UNCERTAIN, LABEL_MISSING)]
            lines.append("  " + name.ljust(width) + "".join(str(int(n)).rjust(10) for n in counts))
    lines += _describe_images(m)
    totals = " / ".join(f"{s} {m['splits'][s]}" for s in SPLITS)
    lines.append(f"  samples: {totals} ({sum(m['splits'].values())} in all)")
    if len(data):
        heights, widths = np.asarray(data.index["height"]), np.asarray(data.index["width"])
        lines.append(f"  image sizes: {heights.min()}-{heights.max()} high, {widths.min()}-{widths.max()} wide")
    skipped = m.get("skipped", [])
    lines.append(f"  skipped: {len(skipped)}")
    lines += [f"    {s['source']}: {s['reason']}" for s in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"    ... and {len(skipped) - 10} more (manifest.json lists all)")
    lines += [f"  note: {note}" for note in m.get("scan_notes", [])]
    notes = m.get("notes", [])
    if notes:
        lines.append(f"  notes: {len(notes)}")
        lines += [f"    {n['source']}: {n['note']}" for n in notes[:10]]
        if len(notes) > 10:
            lines.append(f"    ... and {len(notes) - 10} more (manifest.json lists all)")
    return "\n".join(lines)


def _describe_images(m: dict) -> list[str]:
    """`prep images`' manifest entries in words: patients, the DICOM selection, the header fields kept."""
    lines = []
    patients = m.get("patients")
    if patients:
        if patients["count"]:
            studies = f", {patients['studies']} studies" if patients.get("studies") else ""
            without = f"; {patients['images_without']} images without one" if patients["images_without"] else ""
            lines.append(
                f"  patients: {patients['count']} from {patients['from']}{studies}, each in one split{without}"
            )
        else:
            lines.append("  patients: none found; the split is per image")
    selection = m.get("selection")
    if selection:
        kept = "; ".join(
            f"{k} {', '.join(v) if isinstance(v, list) else v}"
            for k, v in selection.items()
            if k in ("ViewPosition", "Modality", "BodyPartExamined")
        )
        lines.append(
            f"  selection (DICOM): {kept}; {selection['dicom_images']} DICOM and {selection['other_images']}"
            " other images packed"
        )
        if selection["left_out"]:
            lines.append("  left out: " + ", ".join(f"{n} {reason}" for reason, n in selection["left_out"].items()))
        if selection["unknown"]:
            lines.append(
                "  kept without the attribute (unknown): "
                + ", ".join(f"{n} without {k}" for k, n in selection["unknown"].items())
            )
    metadata = m.get("metadata")
    if metadata:
        phi = "PHI left out (--drop-phi)" if metadata["drop_phi"] else "PatientID, StudyInstanceUID, dates included"
        lines.append(f"  sample JSON (DICOM headers): {', '.join(metadata['kept'])}; {phi}")
    return lines


def cmd_info(args) -> int:
    print(describe(open_dataset(args.dir, CacheSettings.from_args(args))))
    return 0


# What each subcommand's --help ends with: its arguments after `prep NAME`.
EXAMPLES = {
    "covid": ("--src data/raw/COVID-19_Radiography_Dataset --out data/packed/covid",),
    "chexpert": ("--src data/raw/CheXpert-v1.0-small --out data/packed/chexpert --views frontal",),
    "folder": (
        "--src my-xrays --out data/packed/mine",
        "--src my-xrays --csv labels.csv --patient-col patient --out data/packed/mine",
    ),
    "images": (
        "--src my-xrays --out data/packed/unlabeled",
        "--src /media/dicom-export --out data/packed/hospital --views PA,AP --modalities CR,DX --drop-phi",
        "--src png-tree --out data/packed/tree --patient-from level:1 --views all",
    ),
    "sample": ("--out data/demo/raw --n 400", "--out data/demo/raw --dicom-tree --patients 30"),
    "all": ("--raw data/raw --out data/packed",),
    "ffcv": ("data/packed/covid --splits train,val",),
    "verify": ("data/packed/covid",),
    "info": ("data/packed/covid",),
}


def build_parser() -> argparse.ArgumentParser:
    prog = program("prep", "twinray.prep")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(prog, EXAMPLES["sample"][0], EXAMPLES["covid"][0]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        """A subcommand whose --help ends with its EXAMPLES."""
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=examples(f"{prog} {name}", *EXAMPLES[name]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("covid", "the COVID-19 Radiography Database")
    p.add_argument("--src", required=True, type=local_path, help=f"the {covid.FOLDER_NAME} folder")
    _add_pack_options(p, "80/10/10")
    p.set_defaults(func=cmd_covid)

    p = command("chexpert", "CheXpert-v1.0-small or CheXpert-v1.0")
    p.add_argument("--src", required=True, type=local_path, help="the folder holding train.csv and valid.csv")
    p.add_argument("--views", choices=chexpert.VIEWS, default="frontal", help="frontal (default) or all")
    _add_pack_options(p, "90/10")
    p.set_defaults(func=cmd_chexpert)

    p = command("folder", "your own X-rays: class sub-folders or a CSV")
    p.add_argument("--src", required=True, type=local_path, help="root folder of the images")
    p.add_argument("--csv", type=local_path, help="CSV with a path and a label column (paths relative to --src)")
    p.add_argument("--path-col", default="path", help="CSV column with the image path (path)")
    p.add_argument("--label-col", default="label", help="CSV column with the class name (label)")
    p.add_argument("--patient-col", default=None, help="CSV column with a patient id: splits keep patients whole")
    p.add_argument("--name", default=None, help="dataset name in the manifest (default: the folder's name)")
    _add_pack_options(p, "80/10/10")
    p.set_defaults(func=cmd_folder)

    p = command("images", "any folder tree of X-rays or a DICOM export, without labels (task none)")
    p.add_argument("--src", required=True, type=local_path, help="root folder: every image under it, at any depth")
    p.add_argument(
        "--views",
        default="frontal",
        help="DICOM ViewPosition values kept, comma-separated (PA,AP,LL,...), 'frontal' (PA,AP) or 'all' (frontal)",
    )
    p.add_argument("--modalities", default="CR,DX", help="DICOM Modality values kept, or 'all' (CR,DX)")
    p.add_argument("--body-parts", default="all", help="DICOM BodyPartExamined values kept (CHEST,...), or 'all' (all)")
    p.add_argument(
        "--patient-from",
        default="auto",
        help="who the patient is, kept in one split: dicom (PatientID, else StudyInstanceUID), level:N (the folder N "
        "levels under --src), csv (--csv and --patient-col), none (per image); auto: csv with --csv, else dicom",
    )
    p.add_argument("--csv", type=local_path, help="CSV with a path and a patient column (paths relative to --src)")
    p.add_argument("--path-col", default="path", help="CSV column with the image path (path)")
    p.add_argument("--patient-col", default="patient", help="CSV column with the patient id (patient)")
    p.add_argument(
        "--drop-phi",
        action="store_true",
        help="leave PatientID, StudyInstanceUID, StudyDate and any patient id out of the sample JSON, and give "
        "ages over 89 as 90 (the split still keeps patients whole); source paths are kept as they are",
    )
    p.add_argument("--name", default=None, help="dataset name in the manifest (default: the folder's name)")
    _add_pack_options(p, "80/10/10")
    p.set_defaults(func=cmd_images)

    p = command("sample", "generate a synthetic COVID-19 Radiography Database (or a DICOM export) for demos and tests")
    p.add_argument(
        "--out", required=True, type=local_path, help="writes OUT/COVID-19_Radiography_Dataset (or OUT/dicom-export)"
    )
    p.add_argument(
        "--dicom-tree",
        action="store_true",
        help="write OUT/dicom-export instead: a DICOMDIR, PATIENT/STUDY/SERIES/IMAGE files without suffix, frontal "
        "and lateral views, a structured report and presentation states (for prep images)",
    )
    p.add_argument("--patients", type=positive_int, default=30, help="patients of --dicom-tree, 2 studies each (30)")
    p.add_argument("--n", type=positive_int, default=400, help="number of images (400)")
    p.add_argument("--seed", type=int, default=0, help="seeds the generated images and patients (0)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (1)")
    p.add_argument("--force", action="store_true", help="regenerate even if it exists")
    p.add_argument("--finding-strength", type=positive_float, default=1.0, help="scales each finding (1: subtle)")
    p.add_argument(
        "--no-metadata",
        dest="metadata",
        action="store_false",
        help="skip the metadata xlsx files (for machines without openpyxl)",
    )
    p.set_defaults(func=cmd_sample)

    p = command("all", "every known dataset under --raw (what `make prep` runs)")
    p.add_argument("--raw", type=local_path, default=Path("data/raw"), help="where the downloads are (data/raw)")
    _add_pack_options(p, None, out_default=Path("data/packed"))
    p.set_defaults(func=cmd_all)

    p = command("ffcv", "write DIR/ffcv/<split>.beton files for the FFCV backend")
    p.add_argument("dir", type=location, help="a packed directory or URL")
    shard_cache.add_arguments(p)
    p.add_argument("--splits", default="train,val,test", help="the splits to write, comma-separated (train,val,test)")
    p.set_defaults(func=cmd_ffcv)

    p = command("verify", "re-hash shards, decode every image, check the index")
    p.add_argument("dir", type=location, help="a packed directory or URL")
    shard_cache.add_arguments(p)
    p.set_defaults(func=cmd_verify)

    p = command("info", "counts per split and class, size, encoding, what was skipped")
    p.add_argument("dir", type=location, help="a packed directory or URL")
    shard_cache.add_arguments(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, ValueError) as e:  # ValueError: a missing extra, named in the message
        say_error("prep", str(e))
        return 2
    except KeyboardInterrupt:
        print("prep: interrupted; nothing was published", file=sys.stderr)
        return 130
