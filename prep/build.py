"""Turns a dataset plan (files, labels, splits) into a packed directory: converts in parallel, writes shards
in a fixed order, and renames the result into place only when it is complete."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from twinray.atomic import naming
from twinray.cli import InputError
from twinray.lock import exclusive
from twinray.prep.format import MANIFEST, SPLITS, PackWriter
from twinray.prep.images import (
    DEFAULT_BIT_DEPTH,
    DEFAULT_MAX_PIXELS,
    Converted,
    ImageError,
    convert_file,
    parse_bit_depth,
)


@dataclass
class Record:
    """One source image: where it is, its path relative to the source root, its split and its JSON fields."""

    path: Path
    source: str
    split: str
    meta: dict


@dataclass
class Plan:
    """What a dataset module hands to `pack`."""

    dataset: str
    task: str
    classes: list[str]
    records: list[Record]
    args: dict  # the prep arguments that shape the output, stored in the manifest
    skipped: list[dict] = field(default_factory=list)  # found while scanning, before any image is read
    scan_notes: list[str] = field(default_factory=list)  # dataset-level facts the summary line must state
    manifest: dict = field(default_factory=dict)  # dataset-level manifest entries of this kind of plan
    # given the sources packed (after conversion), more manifest entries and scan notes: counts of what was packed
    describe_packed: Callable[[list[str]], tuple[dict, list[str]]] | None = None
    count_reasons: bool = False  # the summary line counts the skipped files by reason (prep images)


@dataclass
class Result:
    out: Path
    manifest: dict
    written: bool  # False when the output was already complete and left alone
    count_reasons: bool = False

    @property
    def summary(self) -> str:
        """One line: packed per split, skipped, every source file found (found = packed + skipped), with
        `count_reasons` the skipped counted by reason (the six most common), the dataset's scan notes, and how many
        per-file notes the manifest holds."""
        splits = " / ".join(f"{s} {n}" for s, n in self.manifest["splits"].items())
        total = sum(self.manifest["splits"].values())
        skipped = len(self.manifest["skipped"])
        verb = "packed" if self.written else "already packed (use --force to rebuild):"
        line = f"{verb} {total} images into {self.out} ({splits}), {skipped} skipped ({total + skipped} found)"
        if self.count_reasons and skipped:
            line += ": " + count_reasons(s["reason"] for s in self.manifest["skipped"])
        line += "".join(f"; {note}" for note in self.manifest.get("scan_notes", []))
        notes = len(self.manifest.get("notes", []))
        if notes:
            line += f"; {notes} file note{'s' * (notes != 1)} in {MANIFEST} (`python -m prep info` lists them)"
        return line


def count_reasons(reasons: Iterable[str], shown: int = 6) -> str:
    """'6 lateral (ViewPosition LL), 1 DICOMDIR (...)': the `shown` most common reasons with their counts, most
    common first (then by text), and how many other reasons there are. A reason over 60 characters that holds a
    digit counts by its words before the first parenthesis (a decoder's message names each file's own numbers, so
    whole it would count each file apart); the manifest keeps each reason whole."""
    heads = (r if len(r) <= 60 or not any(c.isdigit() for c in r) else r.split(" (", 1)[0] for r in reasons)
    counts = sorted(Counter(heads).items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{n} {reason}" for reason, n in counts[:shown])
    rest = len(counts) - shown
    return text + (f", and {rest} other reason{'s' * (rest != 1)}" if rest > 0 else "")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _convert(job: tuple[str, int, str, int, str | int]) -> Converted | str:
    """One file -> Converted, or the skip reason. Every exception is a skip: one bad file never stops a run."""
    path, size, encoding, max_pixels, bit_depth = job
    try:
        return convert_file(path, size, encoding, max_pixels, bit_depth)
    except ImageError as e:
        return str(e)
    except Exception as e:  # a decoder's or library's own error: still this one file's problem
        text = " ".join(str(e).split())
        if len(text) > 300:
            text = text[:297] + "..."
        return f"could not convert ({type(e).__name__}: {text})"


def _quiet_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image per process: OpenCV's own threads would only contend


def _write_order(records: list[Record], seed: int) -> list[Record]:
    """Split by split; within a split a seeded shuffle, so each shard mixes classes for streaming readers."""
    rng = np.random.default_rng(seed)
    ordered = []
    for split in SPLITS:
        members = sorted((r for r in records if r.split == split), key=lambda r: r.source)
        ordered.extend(members[i] for i in rng.permutation(len(members)))
    return ordered


def _clean_stale(out: Path) -> None:
    """Remove what a killed run left beside `out` (temp dirs of processes that are gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, out)


def check_output(out: Path, force: bool) -> dict | None:
    """The existing manifest when `out` is already complete and not forced; an error if `out` is foreign."""
    manifest = out / MANIFEST
    if manifest.is_file():
        return None if force else json.loads(manifest.read_text())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a packed dataset; pick another --out or empty it")
    return None


def other_settings(manifest: dict, dataset: str, asked: dict) -> list[str]:
    """Each way a finished dataset's manifest differs from what this prep run would pack ("size 256, now 64"): its
    dataset kind and the prep arguments it recorded. Source paths compare by the folder they name (relative or
    absolute, through links); a setting the manifest did not record is not compared."""
    recorded = manifest.get("prep") or {}
    differ = []
    if manifest.get("dataset") != dataset:
        differ.append(f"dataset {manifest.get('dataset')!r}, now {dataset!r}")
    for key, value in asked.items():
        if key not in recorded:
            continue
        old = recorded[key]
        if key in ("src", "csv") and old is not None and value is not None:
            same = os.path.realpath(str(old)) == os.path.realpath(str(value))
        else:
            same = old == value
        if not same:
            differ.append(f"{key} {old!r}, now {value!r}")
    return differ


def pack(plan: Plan, out: str | Path, **options) -> Result:
    """Convert and write every record of `plan` into `out` (the options: `_pack`'s), holding `out`'s lock
    (twinray.lock) from the check of what `out` holds to the publish: a second prep into the same `out` is refused
    in one line while this one runs, and afterwards finds the dataset complete. A full disk is an OSError naming
    `out` (twinray.cli.run_cli's one line); the temporary folder is deleted and `out` is left as it was."""
    out = Path(out).absolute()
    with exclusive(out, "prep"), naming(out):
        return _pack(plan, out, **options)


def _pack(
    plan: Plan,
    out: str | Path,
    *,
    size: int = 256,
    encoding: str = "jpeg",
    workers: int | None = None,
    seed: int = 0,
    shard_samples: int = 1024,
    force: bool = False,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    bit_depth: str | int = DEFAULT_BIT_DEPTH,
) -> Result:
    """Convert and write every record of `plan` into `out`. Files that cannot be packed are listed in the manifest's
    `skipped` with the reason, pipeline departures in its `notes`; every record ends up packed or skipped."""
    out = Path(out).absolute()
    try:
        bit_depth = parse_bit_depth(bit_depth)  # one scale for every file of the dataset that declares no depth
    except ValueError as e:
        raise InputError(str(e)) from None
    existing = check_output(out, force)
    if existing is not None:
        asked = {**plan.args, "size": size, "encoding": encoding, "seed": seed, "shard_samples": shard_samples,
                 "max_pixels": max_pixels, "bit_depth": bit_depth}  # fmt: skip
        differ = other_settings(existing, plan.dataset, asked)
        if differ:  # "already packed" only when it is what this run would pack
            raise InputError(
                f"{out} holds a dataset packed with other settings: {'; '.join(differ)}; use --force to rebuild it, "
                "or another --out"
            )
        return Result(out, existing, written=False, count_reasons=plan.count_reasons)
    if size < 8:
        raise InputError(f"--size {size} is too small (at least 8)")
    if shard_samples < 1:
        raise InputError(f"--shard-samples {shard_samples} must be at least 1")
    if max_pixels < 1:
        raise InputError(f"--max-pixels {max_pixels} must be at least 1")
    if not plan.records:
        raise InputError(f"no images found for {plan.dataset}")
    workers = workers or default_workers()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    records = _write_order(plan.records, seed)
    jobs = [(str(r.path), size, encoding, max_pixels, bit_depth) for r in records]
    skipped = list(plan.skipped)
    notes = []
    packed = []
    try:
        writer = PackWriter(tmp, plan.dataset, plan.task, plan.classes, encoding, size, shard_samples)
        bar = tqdm(total=len(jobs), desc=f"prep {plan.dataset}", unit="img", disable=None if progress else True)
        if workers == 1:
            results = map(_convert, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_quiet_worker)
            results = pool.imap(_convert, jobs, chunksize=8)  # ordered: the shards do not depend on workers
        try:
            for record, result in zip(records, results):
                bar.update()
                if isinstance(result, str):
                    skipped.append({"source": record.source, "reason": result})
                    continue
                writer.add(
                    record.split, result.data, result.height, result.width, {"source": record.source, **record.meta}
                )
                packed.append(record.source)
                notes += [{"source": record.source, "note": note} for note in result.notes]
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        if len(writer) == 0:
            first = f"; first: {skipped[0]['source']}: {skipped[0]['reason']}" if skipped else ""
            raise InputError(f"no image of {plan.dataset} could be read ({len(skipped)} skipped{first})")
        reasons = {s["source"]: s["reason"] for s in skipped}
        for split in SPLITS:  # a split the plan filled but whose every file was skipped is not published empty
            members = [r.source for r in records if r.split == split]
            if members and all(source in reasons for source in members):
                first = f"{members[0]}: {reasons[members[0]]}"
                raise InputError(
                    f"the {split} split came out empty: all {len(members)} of its images were skipped ({first})"
                )
        entries, packed_notes = plan.describe_packed(packed) if plan.describe_packed else ({}, [])
        manifest = writer.finish(
            {
                "skipped": sorted(skipped, key=lambda s: s["source"]),
                "notes": sorted(notes, key=lambda n: n["source"]),
                "scan_notes": [*packed_notes, *plan.scan_notes],
                **plan.manifest,
                **entries,
                "prep": {
                    **plan.args,
                    "size": size,
                    "encoding": encoding,
                    "seed": seed,
                    "shard_samples": shard_samples,
                    "max_pixels": max_pixels,
                    "bit_depth": bit_depth,
                },
            }
        )
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Result(out, manifest, written=True, count_reasons=plan.count_reasons)
