"""The packed format: what the writer is given, the reader, tarfile, webdataset and DALI all read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from twinray.cli import InputError
from twinray.pipelines.base import LoaderSettings
from twinray.pipelines.native import NativeLoader
from twinray.prep.format import (
    INDEX,
    LABEL_MISSING,
    MANIFEST,
    PackedDataset,
    PackWriter,
    decode_image,
    encode_image,
    verify,
)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (int(rng.integers(20, 40)), int(rng.integers(20, 40))), dtype=np.uint8) for _ in range(n)
    ]


def _write(out: Path, encoding: str, images, splits, task="multiclass", shard_samples=3) -> dict:
    classes = ["a", "b", "c"]
    writer = PackWriter(out, "unit", task, classes, encoding, 40, shard_samples)
    for k, (image, split) in enumerate(zip(images, splits)):
        if task == "multiclass":
            meta = {"label": k % 3, "source": f"img{k}.png"}
        else:
            meta = {"labels": {"a": 1, "b": None, "c": -1 if k % 2 else 0}, "source": f"img{k}.png"}
        writer.add(split, encode_image(image, encoding), *image.shape, meta)
    return writer.finish({"skipped": []})


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_lossless_round_trip_through_reader_and_tarfile(tmp_path, encoding):
    images = _images(8)
    splits = ["train", "train", "val", "train", "test", "train", "val", "train"]
    manifest = _write(tmp_path, encoding, images, splits)
    data = PackedDataset(tmp_path)
    assert manifest["splits"] == {"train": 5, "val": 2, "test": 1}
    assert list(manifest["shards"]) == ["train-00000.tar", "train-00001.tar", "val-00000.tar", "test-00000.tar"]
    ext = {"png": "png", "npy": "npy"}[encoding]
    # Rows follow the order samples were added; each split keeps its own order.
    for split in ("train", "val", "test"):
        expected = [img for img, s in zip(images, splits) if s == split]
        rows = data.indices(split)
        assert len(rows) == len(expected)
        for row, image in zip(rows, expected):
            np.testing.assert_array_equal(data.image(row), image)
            assert data.metadata(row)["split"] == split
            # The zero-copy slice is exactly what tarfile reads for the member.
            shard = data.shard_names[data.index[row]["shard"]]
            key = f"{split}-{list(rows).index(row):07d}"
            with tarfile.open(tmp_path / shard) as tar:
                assert tar.extractfile(f"{key}.{ext}").read() == bytes(data.image_bytes(row))
                assert json.loads(tar.extractfile(f"{key}.json").read()) == data.metadata(row)
    assert list(verify(tmp_path))


def test_jpeg_round_trip_is_close(tmp_path):
    rng = np.random.default_rng(3)
    smooth = [np.clip(np.cumsum(rng.normal(0, 2, (48, 40)), axis=1) + 128, 0, 255).astype(np.uint8) for _ in range(3)]
    _write(tmp_path, "jpeg", smooth, ["train"] * 3)
    data = PackedDataset(tmp_path)
    for row, image in zip(data.indices("train"), smooth):
        decoded = data.image(row)
        assert decoded.shape == image.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - image).mean() < 2.0  # quality 95


def test_multilabel_codes_keep_uncertain_and_missing(tmp_path):
    _write(tmp_path, "png", _images(4), ["train"] * 4, task="multilabel")
    data = PackedDataset(tmp_path)
    codes = data.labels()
    assert codes.dtype == np.int8 and codes.shape == (4, 3)
    assert codes[:, 0].tolist() == [1, 1, 1, 1]
    assert codes[:, 1].tolist() == [LABEL_MISSING] * 4
    assert codes[:, 2].tolist() == [0, -1, 0, -1]
    assert data.metadata(0)["labels"] == {"a": 1, "b": None, "c": 0}


def test_same_input_gives_byte_identical_output(tmp_path):
    images = _images(7)
    splits = ["train", "val", "train", "test", "train", "train", "val"]
    _write(tmp_path / "a", "jpeg", images, splits)
    _write(tmp_path / "b", "jpeg", images, splits)
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_index_loads_without_pickle(tmp_path):
    _write(tmp_path, "png", _images(3), ["train"] * 3, task="multilabel")
    index = np.load(tmp_path / INDEX, allow_pickle=False)
    assert index.dtype.names[:4] == ("split", "shard", "offset", "length")


def test_dali_index_matches_dalis_own_wds2idx(tmp_path):
    _write(tmp_path, "jpeg", _images(5), ["train"] * 5, shard_samples=5)
    wds2idx = shutil.which("wds2idx", path=str(Path(sys.executable).parent))
    assert wds2idx, "DALI's wds2idx tool is missing: is nvidia-dali installed?"
    subprocess.run(
        [wds2idx, str(tmp_path / "train-00000.tar"), str(tmp_path / "dali.idx")], check=True, capture_output=True
    )
    assert (tmp_path / "train-00000.idx").read_text() == (tmp_path / "dali.idx").read_text()


def test_webdataset_library_reads_shards_unchanged(tmp_path):
    import webdataset as wds

    images = _images(5)
    _write(tmp_path, "png", images, ["train"] * 5, shard_samples=2)
    urls = [str(tmp_path / f"train-{k:05d}.tar") for k in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"train-{k:07d}" for k in range(5)]
    for s, image in zip(samples, images):
        np.testing.assert_array_equal(decode_image(s["png"], "png"), image)
        assert json.loads(s["json"])["source"].startswith("img")


def test_dali_webdataset_reader_reads_shards_on_cpu(tmp_path):
    from nvidia.dali import fn, pipeline_def

    images = _images(6)
    _write(tmp_path, "png", images, ["train"] * 6, shard_samples=4)
    shards = sorted(str(p) for p in tmp_path.glob("train-*.tar"))

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def read():
        image, meta = fn.readers.webdataset(
            paths=shards,
            index_paths=[s[:-4] + ".idx" for s in shards],
            ext=["png", "json"],
            missing_component_behavior="error",
        )
        return fn.decoders.image(image, device="cpu", output_type=0), meta  # 0 = DALIImageType.GRAY

    pipe = read()
    pipe.build()
    decoded, metas = pipe.run()
    for k, image in enumerate(images):
        np.testing.assert_array_equal(np.asarray(decoded.at(k))[..., 0], image)
        assert json.loads(bytes(np.asarray(metas.at(k))))["source"] == f"img{k}.png"


def test_reader_refuses_a_directory_without_manifest(tmp_path):
    _write(tmp_path, "png", _images(2), ["train"] * 2)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(InputError, match="not a packed dataset"):
        PackedDataset(tmp_path)


def test_verify_names_a_corrupt_shard(tmp_path):
    _write(tmp_path, "png", _images(4), ["train"] * 4, shard_samples=2)
    shard = tmp_path / "train-00001.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="train-00001.tar: sha256"):
        list(verify(tmp_path))


def test_a_shard_cut_short_names_the_shard_and_row(tmp_path):
    _write(tmp_path, "png", _images(4), ["train"] * 4, shard_samples=2)
    shard = tmp_path / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:600])  # a partial copy: rows 2 and 3 lie past the end
    data = PackedDataset(tmp_path)
    assert data.image(1).shape == _images(4)[1].shape  # the other shard still reads
    with pytest.raises(InputError, match=r"train-00001.tar: row 3 ends at byte \d+, past the shard's 600; .*verify"):
        data.image(3)
    loader = NativeLoader(tmp_path, LoaderSettings(batch_size=4, recipe="base", size=16, workers=1))
    with pytest.raises(InputError, match="train-00001.tar: row [23] ends at byte"):
        list(loader)


def _damage(root: Path, row: int, start: int, stop: int) -> None:
    """Zeroes bytes [start, stop) of one row's image member, in place."""
    data = PackedDataset(root)
    offset, shard = int(data.index[row]["offset"]), root / data.shard_names[int(data.index[row]["shard"])]
    data.close()
    raw = bytearray(shard.read_bytes())
    raw[offset + start : offset + stop] = bytes(stop - start)
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("encoding", ["png", "jpeg", "npy"])
def test_a_member_without_its_signature_names_the_shard_and_row(encoding, tmp_path):
    """Checked on every read, before any decoder (DALI's crashes the process on such bytes)."""
    _write(tmp_path, encoding, _images(3), ["train"] * 3)
    _damage(tmp_path, 1, 0, 2)
    data = PackedDataset(tmp_path)
    with pytest.raises(InputError, match=f"train-00000.tar: row 1 does not start as {encoding} bytes do; .*verify"):
        data.image_bytes(1)
    assert data.image(2).shape == _images(3)[2].shape


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_member_that_does_not_decode_names_the_shard_and_row(encoding, tmp_path):
    _write(tmp_path, encoding, _images(3), ["train"] * 3)
    _damage(tmp_path, 1, 8, 300)  # the signature stays; the headers after it are gone
    with pytest.raises(InputError, match=f"train-00000.tar: row 1: {encoding} member does not decode"):
        PackedDataset(tmp_path).image(1)
