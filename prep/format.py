"""The packed dataset format: the writer and the reader side by side (docs/format.md explains it).

A packed dataset is one directory:

    manifest.json            what is inside, written last (a directory without it is not a dataset)
    index.npy                one structured row per sample: shard, byte offsets and lengths, size, labels
    {split}-{NNNNN}.tar      WebDataset shards: {key}.{jpg|png|npy} then {key}.json per sample
    {split}-{NNNNN}.idx      DALI's webdataset index for each shard (what DALI's wds2idx writes)

The index lets a loader read any image as a zero-copy slice of a memory-mapped shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from twinray.cli import InputError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# "none": an unlabeled dataset (prep images); its index holds `label` = LABEL_NONE for every row
TASKS = ("multiclass", "multilabel", "none")
# prep encoding name -> member extension (the extensions DALI and webdataset key on)
ENCODINGS = {"jpeg": "jpg", "png": "png", "npy": "npy"}
# How each encoding's bytes begin. Checked on every read: GPU decoders (nvJPEG, DALI) fail badly on damaged bytes.
SIGNATURES = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "npy": b"\x93NUMPY"}
JPEG_QUALITY = 95
# index.npy codes of a multilabel label (CheXpert's): positive, negative, uncertain, and blank in the source (JSON
# null). train/labels.py turns them into training targets.
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
LABEL_MISSING = -128
# index.npy `label` of every row of an unlabeled dataset (task "none"); also no class in a multiclass batch
LABEL_NONE = -1
MANIFEST = "manifest.json"
INDEX = "index.npy"
DALI_INDEX_VERSION = "v1.2"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.tar"


def index_dtype(task: str, num_classes: int) -> np.dtype:
    """One row per sample. Offsets point at member data, not at tar headers."""
    fields = [
        ("split", "u1"),  # position in SPLITS
        ("shard", "<u4"),  # position in manifest["shards"]
        ("offset", "<u8"),  # image member data
        ("length", "<u4"),
        ("meta_offset", "<u8"),  # JSON member data
        ("meta_length", "<u4"),
        ("height", "<u2"),
        ("width", "<u2"),
    ]
    if task != "multilabel":  # multiclass, or "none" (every row LABEL_NONE)
        fields.append(("label", "<i2"))
    else:
        fields.append(("labels", "i1", (num_classes,)))
    return np.dtype(fields)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dump_json(obj) -> bytes:
    """Stable JSON bytes: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ----------------------------------------------------------------------------------------------- writer


def _member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and mtime so that shards are byte-identical run to run.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ShardWriter:
    """One tar shard plus the lines of its DALI index."""

    def __init__(self, path: Path, position: int):
        self.path = path
        self.position = position  # where it sits in manifest["shards"]
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.dali_lines: list[str] = []
        self.count = 0

    def _add(self, name: str, data: bytes) -> int:
        info = _member(name, len(data))
        header = len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
        data_offset = self.tar.offset + header
        self.tar.addfile(info, io.BytesIO(data))
        return data_offset

    def add(self, key: str, ext: str, image: bytes, meta: bytes) -> tuple[int, int]:
        image_offset = self._add(f"{key}.{ext}", image)
        meta_offset = self._add(f"{key}.json", meta)
        self.dali_lines.append(
            f"{ext} {image_offset} {len(image)} {key}.{ext} json {meta_offset} {len(meta)} {key}.json"
        )
        self.count += 1
        return image_offset, meta_offset

    def close(self) -> str:
        self.tar.close()
        idx = self.path.with_suffix(".idx")
        idx.write_text(f"{DALI_INDEX_VERSION} {self.count}\n" + "\n".join(self.dali_lines) + "\n")
        return sha256_file(self.path)


@dataclass
class PackWriter:
    """Writes samples into shards of `shard_samples` each; `finish` writes the index and manifest last."""

    out_dir: Path
    dataset: str
    task: str
    classes: list[str]
    encoding: str = "jpeg"
    size: int = 256
    shard_samples: int = 1024
    _open: dict[str, _ShardWriter] = field(default_factory=dict)
    _shard_numbers: dict[str, int] = field(default_factory=dict)
    _shards: dict[str, str] = field(default_factory=dict)
    _rows: list[tuple] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard_order: list[str] = []

    def _shard_for(self, split: str) -> _ShardWriter:
        writer = self._open.get(split)
        if writer is not None and writer.count >= self.shard_samples:
            self._shards[writer.path.name] = writer.close()
            writer = None
        if writer is None:
            number = self._shard_numbers.get(split, 0)
            self._shard_numbers[split] = number + 1
            writer = _ShardWriter(self.out_dir / shard_name(split, number), len(self._shard_order))
            self._shard_order.append(writer.path.name)
            self._open[split] = writer
        return writer

    def add(self, split: str, image: bytes, height: int, width: int, meta: dict) -> None:
        """`meta` is the sample JSON; it must hold `label` (multiclass) or `labels` (multilabel); an unlabeled
        dataset's (task "none") holds neither, and its index row gets LABEL_NONE."""
        if split not in SPLITS:
            raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        shard = self._shard_for(split)
        key = f"{split}-{self._counts[split]:07d}"
        meta = {**meta, "split": split}
        meta_bytes = dump_json(meta)
        image_offset, meta_offset = shard.add(key, ENCODINGS[self.encoding], image, meta_bytes)
        if self.task == "multiclass":
            label = meta["label"]
        elif self.task == "none":
            label = LABEL_NONE
        else:
            label = [LABEL_MISSING if meta["labels"][c] is None else meta["labels"][c] for c in self.classes]
        self._rows.append(
            (
                SPLITS.index(split),
                shard.position,
                image_offset,
                len(image),
                meta_offset,
                len(meta_bytes),
                height,
                width,
                label,
            )
        )
        self._counts[split] += 1

    def __len__(self) -> int:
        return len(self._rows)

    def finish(self, extra: dict) -> dict:
        for writer in self._open.values():
            self._shards[writer.path.name] = writer.close()
        self._open.clear()
        # Shards are listed split by split (train, val, test), whatever order they were opened in.
        order = sorted(self._shard_order, key=lambda name: (SPLITS.index(name.split("-")[0]), name))
        renumber = np.array([order.index(name) for name in self._shard_order])
        self._shard_order = order
        index = np.array(self._rows, dtype=index_dtype(self.task, len(self.classes)))
        index["shard"] = renumber[index["shard"]]
        np.save(self.out_dir / INDEX, index, allow_pickle=False)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "task": self.task,
            "classes": list(self.classes),
            "splits": dict(self._counts),
            "image": {"size": self.size, "encoding": self.encoding, "channels": 1, "dtype": "uint8"},
            "shard_samples": self.shard_samples,
            "shards": {name: self._shards[name] for name in self._shard_order},
            "index": {"file": INDEX, "sha256": sha256_file(self.out_dir / INDEX)},
            **extra,
        }
        # Written last: its presence is what marks the directory complete.
        (self.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return manifest


# ----------------------------------------------------------------------------------------------- reader


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """uint8 HxW grey -> bytes in the member encoding."""
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return buf.getvalue()
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if encoding == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
    ok, data = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", image, params)
    if not ok:
        raise InputError(f"could not encode an image of shape {image.shape} as {encoding}")
    return data.tobytes()


def decode_image(data, encoding: str) -> np.ndarray:
    """Member bytes -> uint8 HxW grey. Raises ValueError on bytes that do not decode."""
    if encoding == "npy":
        array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 2:
            raise ValueError(f"npy member holds {array.dtype} {array.shape}, not uint8 HxW")
        return array
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # empty bytes, for one
        image = None
    if image is None or image.ndim != 2:
        raise ValueError(f"{encoding} member does not decode to a grey image")
    return image


class PackedDataset:
    """Random access to a packed directory. Image bytes are zero-copy slices of memory-mapped shards.

    `root` is a local directory. A dataset at a URL (`s3://bucket/packed/covid`, `gs://`, `az://`, `file://`) is
    opened through prep/open_dataset.py, which resolves it to the shard cache's local copy (prep/shard_cache.py) and
    passes that copy's `remote`, which fetches its shards as they are needed (None for an ordinary directory), and
    the `location` as given (a URL names the store, not the cache; `root` when None). Raises InputError in one line
    for a directory that does not hold a packed dataset."""

    def __init__(self, root: str | Path, remote=None, location: str | None = None):
        self.location = str(root) if location is None else location
        self.root = Path(root)
        self.remote = remote
        manifest_path = self.root / MANIFEST
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such directory")
        if not manifest_path.is_file():
            raise InputError(f"{self.root}: not a packed dataset (no {MANIFEST}; an interrupted prep leaves none)")
        raw = manifest_path.read_bytes()
        # What identifies the data by content: the manifest lists every shard's and the index's sha256, so a dataset
        # re-packed at the same path has another digest (train/state.py compares it on resume).
        self.digest: str = hashlib.sha256(raw).hexdigest()
        try:
            self.manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{manifest_path}: not valid JSON ({e})") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"{manifest_path}: format_version {version!r}, this twinray reads {FORMAT_VERSION}")
        self.task: str = self.manifest["task"]
        self.classes: list[str] = self.manifest["classes"]
        self.encoding: str = self.manifest["image"]["encoding"]
        self.shard_names: list[str] = list(self.manifest["shards"])
        try:
            self.index = np.load(self.root / INDEX, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{self.root / INDEX}: unreadable index ({e})") from None
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.index)

    def indices(self, split: str) -> np.ndarray:
        """Row numbers of one split, in shard order."""
        if split not in SPLITS:
            raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if self.remote is not None:  # a URL dataset: its shards start downloading in the background
            self.remote.want(split)
        return np.flatnonzero(self.index["split"] == SPLITS.index(split))

    def _shard(self, number: int) -> mmap.mmap:
        m = self._maps.get(number)
        if m is None:
            name = self.shard_names[number]
            path = self.root / name if self.remote is None else self.remote.ensure(name)
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[number] = m
        return m

    def shard_bytes(self, name: str) -> int:
        """A shard's size in bytes, without fetching it for a URL dataset."""
        return self.remote.shard_bytes(name) if self.remote is not None else (self.root / name).stat().st_size

    def image_bytes(self, i: int) -> memoryview:
        row = self.index[i]
        start, end = int(row["offset"]), int(row["offset"]) + int(row["length"])
        shard = self._shard(int(row["shard"]))
        if end > len(shard):  # a shard cut short (a partial copy, a full disk): the index points past its end
            raise self._damaged(i, f" ends at byte {end}, past the shard's {len(shard)}; it is cut short")
        signature = SIGNATURES[self.encoding]
        if shard[start : start + len(signature)] != signature:  # DALI's decoder crashes the process on such bytes
            raise self._damaged(i, f" does not start as {self.encoding} bytes do; the shard is damaged")
        return memoryview(shard)[start:end]

    def image(self, i: int) -> np.ndarray:
        try:
            return decode_image(self.image_bytes(i), self.encoding)
        except ValueError as e:
            raise self._damaged(i, f": {e}") from None

    def _damaged(self, i: int, what: str) -> InputError:
        """One line naming row i's shard and what is wrong (`what` follows "row i"); built only on failure, as reads
        are a hot path."""
        shard = self.root / self.shard_names[int(self.index[i]["shard"])]
        return InputError(f"{shard}: row {i}{what} (`python -m prep verify {self.root}` checks them all)")

    def metadata(self, i: int) -> dict:
        row = self.index[i]
        start = int(row["meta_offset"])
        return json.loads(self._shard(int(row["shard"]))[start : start + int(row["meta_length"])])

    def labels(self, rows: np.ndarray | None = None) -> np.ndarray:
        """int labels (multiclass; LABEL_NONE for every row of an unlabeled dataset, task "none") or int8 codes
        with LABEL_MISSING (multilabel), for `rows` or all."""
        field_name = "labels" if self.task == "multilabel" else "label"
        column = self.index[field_name]
        return np.asarray(column if rows is None else column[rows])

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


# ----------------------------------------------------------------------------------------------- verify


def _read_dali_index(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    head = lines[0].split()
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or int(head[1]) != len(lines) - 1:
        raise ValueError("bad header line")
    return [line.split() for line in lines[1:]]


def verify(root: str | Path | PackedDataset) -> Iterator[str]:
    """Checks everything and yields progress lines; raises InputError naming the first problem found. `root`: a
    local directory, or a dataset already open (a URL's, from prep/open_dataset.py)."""
    data = root if isinstance(root, PackedDataset) else PackedDataset(root)
    root = data.root
    expected = data.manifest["shards"]
    if data.remote is not None:  # a URL: every shard is fetched (and checked against its sha256) first
        data.remote.fetch_all()
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            raise InputError(f"{path}: shard listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise InputError(f"{path}: sha256 does not match the manifest (the shard changed or is corrupt)")
    if sha256_file(root / INDEX) != data.manifest["index"]["sha256"]:
        raise InputError(f"{root / INDEX}: sha256 does not match the manifest")
    yield f"{len(expected)} shards and the index match their sha256"

    ext = ENCODINGS[data.encoding]
    for number, name in enumerate(data.shard_names):
        rows = np.flatnonzero(data.index["shard"] == number)
        with tarfile.open(root / name) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
        if len(members) != 2 * len(rows):
            raise InputError(f"{root / name}: {len(members)} members, the index expects {2 * len(rows)}")
        try:
            dali = _read_dali_index((root / name).with_suffix(".idx"))
        except (OSError, ValueError, IndexError) as e:
            raise InputError(f"{(root / name).with_suffix('.idx')}: unreadable DALI index ({e})") from None
        if len(dali) != len(rows):
            raise InputError(f"{(root / name).with_suffix('.idx')}: {len(dali)} samples, the shard holds {len(rows)}")
        for j, i in enumerate(rows):
            image_member, meta_member = members[2 * j], members[2 * j + 1]
            row = data.index[i]
            where = f"{root / name}: sample {image_member.name}"
            if (
                not image_member.name.endswith("." + ext)
                or image_member.offset_data != row["offset"]
                or image_member.size != row["length"]
                or meta_member.offset_data != row["meta_offset"]
                or meta_member.size != row["meta_length"]
            ):
                raise InputError(f"{where}: index row {i} does not match the tar members")
            if dali[j][:3] != [ext, str(row["offset"]), str(row["length"])]:
                raise InputError(f"{where}: DALI index line {j + 1} does not match the tar member")
            try:
                image = data.image(i)
            except ValueError as e:
                raise InputError(f"{where}: image does not decode ({e})") from None
            if image.shape != (row["height"], row["width"]):
                raise InputError(f"{where}: decodes to {image.shape}, the index says {(row['height'], row['width'])}")
            meta = data.metadata(i)
            if meta.get("split") != SPLITS[row["split"]]:
                raise InputError(f"{where}: JSON split {meta.get('split')!r} disagrees with the index")
            if data.task == "none":
                if "label" in meta or row["label"] != LABEL_NONE:
                    raise InputError(f"{where}: an unlabeled dataset's sample has a label")
            elif data.task == "multiclass":
                if meta.get("label") != row["label"]:
                    raise InputError(f"{where}: JSON label {meta.get('label')!r} disagrees with the index")
            else:
                codes = [LABEL_MISSING if meta["labels"][c] is None else meta["labels"][c] for c in data.classes]
                if codes != row["labels"].tolist():
                    raise InputError(f"{where}: JSON labels disagree with the index")
        yield f"{name}: {len(rows)} samples decode and match the index"

    counts = {s: int((data.index["split"] == k).sum()) for k, s in enumerate(SPLITS)}
    if counts != data.manifest["splits"]:
        raise InputError(f"{root / MANIFEST}: split counts {data.manifest['splits']} but the index holds {counts}")
    data.close()
