"""16-bit PNG and TIFF are scaled by the depth the file declares, else by one --bit-depth for the whole dataset, never
by a guess from an image's own maximum; a multi-page TIFF is skipped by name. Every check reads packed pixels."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.layouts import read_grey
from twinray.cli import InputError
from twinray.prep import build
from twinray.prep.cli import main
from twinray.prep.datasets import folder
from twinray.prep.format import PackedDataset
from twinray.prep.images import read_image

# A 12-bit detector's values: 1000 packs to 1000 / 4095 * 255 = 62.3 -> 62 on the 12-bit scale, and to
# 1000 / 65535 * 255 = 3.9 -> 4 on the full 16-bit scale.
RAW = np.array([[0, 1000, 2048, 4095]], np.uint16)


def _png(path, values: np.ndarray, sbit: int | None = None):
    """A 16-bit grey PNG written by Pillow; with `sbit`, an sBIT chunk (PNG 1.2, 4.2.6) inserted after IHDR, its CRC
    computed here."""
    Image.fromarray(values).save(path)
    data = path.read_bytes()
    if sbit is not None:
        assert data[12:16] == b"IHDR" and data[24] == 16  # the signature, IHDR's length and type; bit depth 16
        end = 8 + 8 + 13 + 4  # signature, IHDR length and type, IHDR data, CRC
        chunk = struct.pack(">I", 1) + b"sBIT" + bytes([sbit]) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([sbit])))
        path.write_bytes(data[:end] + chunk + data[end:])
    return path


def _tiff(path, values: np.ndarray, tags: dict | None = None):
    Image.fromarray(values).save(path, tiffinfo=tags or {})
    return path


def test_png_without_sbit_uses_the_full_range_by_default(tmp_path):
    """The image that stops at 1000 is not taken for 10-bit (which made it 4x too bright): the full range."""
    path = _png(tmp_path / "a.png", np.array([[0, 1000, 4095, 65535]], np.uint16))
    assert read_grey(path).tolist() == [[0, 4, 16, 255]]
    assert read_grey(path, bit_depth="full").tolist() == [[0, 4, 16, 255]]
    assert read_grey(path, bit_depth=12).tolist() == [[0, 62, 255, 255]]


def test_png_sbit_12_raw_values_scale_by_12_bits(tmp_path):
    path = _png(tmp_path / "s.png", RAW, sbit=12)
    assert path.read_bytes()[33:46] == b"\x00\x00\x00\x01sBIT\x0c" + struct.pack(">I", zlib.crc32(b"sBIT\x0c"))[:4]
    grey, notes = read_image(path)
    assert grey.tolist() == [[0, 62, 128, 255]] and notes == []
    assert read_grey(path, bit_depth=10).tolist() == [[0, 62, 128, 255]]  # the file's own depth beats the policy


def test_png_sbit_with_values_scaled_up_as_the_png_standard_asks(tmp_path):
    """PNG 1.2, 9.1: an encoder scales 12-bit samples up to 16 bits (here by left bit replication) and sBIT records
    the 12. Such a file packs to the same pixels as the raw 12-bit values."""
    raw = RAW.astype(np.uint32)
    replicated = ((raw << 4) | (raw >> 8)).astype(np.uint16)
    assert replicated.tolist() == [[0, 16003, 32776, 65535]]
    path = _png(tmp_path / "up.png", replicated, sbit=12)
    assert read_grey(path).tolist() == [[0, 62, 128, 255]]


def test_png_sbit_scaled_up_by_a_left_shift_or_linearly(tmp_path):
    raw = RAW.astype(np.float64)
    for form in ((RAW.astype(np.uint32) << 4).astype(np.uint16), np.round(raw * 65535 / 4095).astype(np.uint16)):
        assert read_grey(_png(tmp_path / "up.png", form, sbit=12)).tolist() == [[0, 62, 128, 255]]


def test_png_sbit_raw_values_with_one_corrupt_pixel_keep_their_declared_depth(tmp_path):
    """A raw 12-bit image with sBIT 12 and one value above 4095 is not taken for a scaled-up one (which would make
    it 16x darker): its pixels keep the 12-bit scale, and the value above is clipped with a note."""
    grey, notes = read_image(_png(tmp_path / "odd.png", np.array([[0, 1000, 2048, 4099]], np.uint16), sbit=12))
    assert grey.tolist() == [[0, 62, 128, 255]]
    assert notes == [
        "1 pixel above 4095, the top of the 12 significant bits its PNG sBIT chunk declares, clipped to white"
    ]


def test_one_detector_one_scale_whatever_each_image_holds(tmp_path):
    """Two images of one 12-bit detector: one stops at 1000, the other has a hot pixel at 4095. The raw value 1000
    packs to the same grey in both, with sBIT and under each policy."""
    quiet = np.array([[0, 500, 1000, 1000]], np.uint16)
    hot = np.array([[0, 500, 1000, 4095]], np.uint16)
    for sbit, policy, expected in ((12, "full", 62), (None, "full", 4), (None, 12, 62)):
        a = read_grey(_png(tmp_path / "quiet.png", quiet, sbit), bit_depth=policy)
        b = read_grey(_png(tmp_path / "hot.png", hot, sbit), bit_depth=policy)
        assert a[0, 2] == b[0, 2] == expected, (sbit, policy)
        assert a[0, 1] == b[0, 1]


def test_values_above_the_policy_depth_are_clipped_with_a_note(tmp_path):
    path = _png(tmp_path / "over.png", np.array([[0, 1000, 5000, 6000]], np.uint16))
    grey, notes = read_image(path, bit_depth=12)
    assert grey.tolist() == [[0, 62, 255, 255]]
    assert notes == ["2 pixels above 4095, the top of --bit-depth 12, clipped to white"]


@pytest.mark.parametrize("sbit", [0, 17])
def test_an_impossible_sbit_is_ignored_with_a_note(tmp_path, sbit):
    grey, notes = read_image(_png(tmp_path / "bad.png", RAW, sbit), bit_depth=12)
    assert grey.tolist() == [[0, 62, 128, 255]]  # the policy's 12 bits
    assert notes == [f"PNG sBIT {sbit} is outside 1..16: ignored"]


def test_8_bit_png_with_sbit_is_unchanged(tmp_path):
    """An 8-bit file is stored as it is, whatever sBIT says (PNG has already scaled it to 8 bits)."""
    values = np.array([[0, 37, 200, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "e.png")
    data = (tmp_path / "e.png").read_bytes()
    chunk = struct.pack(">I", 1) + b"sBIT\x05" + struct.pack(">I", zlib.crc32(b"sBIT\x05"))
    (tmp_path / "e.png").write_bytes(data[:33] + chunk + data[33:])
    grey, notes = read_image(tmp_path / "e.png", bit_depth=12)
    assert grey.dtype == np.uint8 and grey.tolist() == [[0, 37, 200, 255]] and notes == []


def test_tiff_smaxsamplevalue_sets_the_range(tmp_path):
    """TIFF 6.0 section 19: SMinSampleValue/SMaxSampleValue (340/341) declare the sample range."""
    assert read_grey(_tiff(tmp_path / "t.tif", RAW, {341: 4095})).tolist() == [[0, 62, 128, 255]]
    assert read_grey(_tiff(tmp_path / "r.tif", RAW, {340: 1000, 341: 2048})).tolist() == [[0, 0, 255, 255]]


def test_tiff_without_range_tags_uses_the_policy(tmp_path):
    path = _tiff(tmp_path / "plain.tif", RAW)
    assert read_grey(path).tolist() == [[0, 4, 8, 16]]
    assert read_grey(path, bit_depth=12).tolist() == [[0, 62, 128, 255]]


def test_tiff_maxsamplevalue_is_statistics_not_a_depth(tmp_path):
    """TIFF 6.0: MaxSampleValue (281) must not change how an image looks; a note tells the user what was done."""
    grey, notes = read_image(_tiff(tmp_path / "m.tif", RAW, {281: 4095}))
    assert grey.tolist() == [[0, 4, 8, 16]]
    assert notes == ["TIFF MaxSampleValue 4095 is statistics only (TIFF 6.0), not a depth: scaled by --bit-depth full"]


def _folder(tmp_path):
    """One class folder: two 16-bit PNGs of one detector (no sBIT), one 8-bit PNG and one two-page TIFF."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    _png(src / "quiet.png", np.full((8, 8), 1000, np.uint16))
    hot = np.full((8, 8), 1000, np.uint16)
    hot[0, 0] = 4095
    _png(src / "hot.png", hot)
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(src / "eight.png")
    pages = [Image.fromarray(np.full((8, 8), v, np.uint16)) for v in (1000, 2000)]
    pages[0].save(src / "scan.tif", save_all=True, append_images=pages[1:])
    assert Image.open(src / "scan.tif").n_frames == 2
    return src.parent


@pytest.mark.parametrize("policy, grey", [(None, 4), ("12", 62)])
def test_prep_packs_one_scale_records_the_policy_and_skips_the_multi_page_tiff(tmp_path, policy, grey, capsys):
    out = tmp_path / "out"
    argv = ["folder", "--src", str(_folder(tmp_path)), "--out", str(out), "--encoding", "png"]
    argv += ["--split", "100/0/0", "--workers", "1"] + (["--bit-depth", policy] if policy else [])
    assert main(argv) == 0
    assert "packed 3 images" in capsys.readouterr().out.splitlines()[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prep"]["bit_depth"] == ("full" if policy is None else 12)
    assert manifest["skipped"] == [
        {
            "source": "a/scan.tif",
            "reason": "TIFF with 2 pages; prep packs single-page images (save each page as its own file)",
        }
    ]
    data = PackedDataset(out)
    by_source = {data.metadata(i)["source"]: data.image(i) for i in range(len(data))}
    assert sorted(by_source) == ["a/eight.png", "a/hot.png", "a/quiet.png"]  # found 4 = packed 3 + skipped 1
    assert np.all(by_source["a/eight.png"] == 77)
    assert np.all(by_source["a/quiet.png"] == grey)
    assert by_source["a/hot.png"][0, 0] == (16 if policy is None else 255)
    assert np.all(by_source["a/hot.png"].ravel()[1:] == grey)  # same raw value, same grey as in quiet.png
    assert manifest["notes"] == []


def test_an_animated_png_is_skipped_by_its_frames(tmp_path):
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 20, 30)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    from twinray.prep.images import ImageError

    with pytest.raises(ImageError, match=r"^PNG with 3 frames; prep packs single-page images"):
        read_grey(tmp_path / "anim.png")


@pytest.mark.parametrize("value", ["11x", "17", "7", "auto"])
def test_a_bad_bit_depth_is_one_line_and_exit_2(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["folder", "--src", str(tmp_path), "--out", str(tmp_path / "out"), "--bit-depth", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"argument --bit-depth: '{value}' is not 'full' or a whole number of bits from 8 to 16" in err
    assert not (tmp_path / "out").exists()


def test_pack_refuses_a_bad_bit_depth(tmp_path):
    src = _folder(tmp_path)
    with pytest.raises(InputError, match=r"--bit-depth 'twelve' is not 'full'"):
        build.pack(folder.plan(src, split="100/0/0"), tmp_path / "out", bit_depth="twelve", progress=False)
