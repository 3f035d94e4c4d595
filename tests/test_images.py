"""Every input mode becomes correct 8-bit grey; bad files give a skip reason, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.layouts import REAL_CXR, read_grey
from twinray.prep import build
from twinray.prep.datasets import folder
from twinray.prep.format import PackedDataset
from twinray.prep.images import ImageError, convert_file, resize_short_side

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 8 x 64


def _save(tmp_path, image: Image.Image, name: str):
    path = tmp_path / name
    image.save(path)
    return path


def test_grey_png_is_unchanged(tmp_path):
    np.testing.assert_array_equal(read_grey(_save(tmp_path, Image.fromarray(RAMP), "a.png")), RAMP)


def test_rgb_uses_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1] = 200
    grey = read_grey(_save(tmp_path, Image.fromarray(rgb), "rgb.png"))
    # ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B
    assert grey[0].tolist() == [76, 150, 29]
    assert grey[1].tolist() == [200, 200, 200]


def test_rgba_composites_over_black(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (100, 100, 100, 255)
    rgba[0, 1] = (200, 200, 200, 128)
    grey = read_grey(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    assert grey[0].tolist() == [100, round(200 * 128 / 255)]


def test_palette_image(tmp_path):
    image = Image.fromarray(RAMP).convert("P")
    np.testing.assert_array_equal(read_grey(_save(tmp_path, image, "p.png")), RAMP)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_12_bit_data_in_16_bit_file_scales_by_the_bit_depth_policy(tmp_path, suffix):
    """No declared depth: the dataset's --bit-depth, never a guess from the image's maximum (tests/test_bitdepth.py
    has the declared depths)."""
    values = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16)
    path = tmp_path / f"twelve{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    assert read_grey(path, bit_depth=12).tolist() == [[0, 64, 128, 255]]
    assert read_grey(path).tolist() == [[0, 4, 8, 16]]  # "full", the default: 0..65535


def test_full_16_bit_png(tmp_path):
    values = np.array([[0, 65535, 32768]], dtype=np.uint16)
    path = tmp_path / "full16.png"
    Image.fromarray(values).save(path)
    assert read_grey(path).tolist() == [[0, 255, 128]]


def test_jpeg_and_bmp(tmp_path):
    for name in ("a.jpg", "a.bmp"):
        grey = read_grey(_save(tmp_path, Image.fromarray(RAMP), name))
        assert grey.shape == RAMP.shape and np.abs(grey.astype(int) - RAMP).max() <= 3


def test_resize_keeps_aspect_never_upsamples():
    tall = np.zeros((600, 400), np.uint8)
    assert resize_short_side(tall, 256).shape == (384, 256)
    wide = np.zeros((299, 350), np.uint8)
    assert resize_short_side(wide, 256).shape == (256, 300)
    small = np.zeros((100, 120), np.uint8)
    assert resize_short_side(small, 256) is small


def test_resize_uses_area_interpolation():
    # Area averaging of a 2x2 checkerboard gives flat grey; nearest or bilinear would not.
    board = np.indices((512, 512)).sum(0) % 2 * 255
    assert np.all(resize_short_side(board.astype(np.uint8), 256) == 128)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"this is not an image at all", "not an image"), (None, "file not found")],
)
def test_bad_files_give_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        read_grey(path)


@pytest.mark.parametrize("name", ["t.png", "t.jpg"])
def test_truncated_file_is_rejected(tmp_path, name):
    rng = np.random.default_rng(0)
    good = tmp_path / f"good_{name}"
    Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt|unreadable"):
        read_grey(bad)


def test_real_rgba_radiograph_becomes_grey(tmp_path):
    path = REAL_CXR / "nih-cxr14" / "Pneumonia" / "00000773_001.png"
    assert Image.open(path).mode == "RGBA"
    grey = read_grey(path)
    assert grey.dtype == np.uint8 and grey.shape == (1024, 1024)
    np.testing.assert_array_equal(grey, np.asarray(Image.open(path))[..., 0])  # R=G=B, alpha 255


def test_convert_file_encodes_resized(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.full((400, 300), 90, np.uint8)), "x.png")
    converted = convert_file(path, 150, "png")
    assert (converted.height, converted.width) == (200, 150)
    assert converted.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert converted.notes == []


def test_a_side_too_long_for_the_encoding_is_a_reason(tmp_path):
    # 2 x 70000: never resized (shorter side 2), but JPEG stops at 65500 px and the index at 65535.
    path = _save(tmp_path, Image.fromarray(np.zeros((2, 70_000), np.uint8)), "strip.png")
    with pytest.raises(ImageError, match="70000 x 2 after resizing.*65500 px.*jpeg"):
        convert_file(path, 256, "jpeg")


# ----------------------------------------------------------------------------------------- EXIF orientation

# What each EXIF Orientation (TIFF 6.0 tag 274) asks of the stored array to show it upright, written with numpy alone.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.T,  # transposed
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to view
    7: lambda a: a[::-1, ::-1].T,  # transversed
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to view
}
# 4 x 6, no symmetry: every orientation gives a different array.
PATTERN = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_is_applied(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.tif"
    Image.fromarray(PATTERN).save(path, tiffinfo={274: orientation})
    np.testing.assert_array_equal(read_grey(path), UPRIGHT[orientation](PATTERN))


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_16_bit_tiff_orientation_6(tmp_path, compression):
    """Pillow 13 memory-maps an uncompressed TIFF opened by name and then loses its orientation; we open a file
    object. The 12-bit values scale by 12 bits (--bit-depth 12) as without orientation."""
    values = PATTERN.astype(np.uint16) * 16  # 0..3680: 12-bit
    path = tmp_path / "o6.tif"
    Image.fromarray(values).save(path, tiffinfo={274: 6}, compression=compression)
    expected = np.rint(np.rot90(values, -1).astype(float) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(read_grey(path, bit_depth=12), expected)


def test_jpeg_orientation_6_is_stored_upright(tmp_path):
    """A photo taken with the camera on its side: 16 x 24 stored, a bright block top-left and a grey one
    top-right; shown upright (rotated 90 clockwise) it is 24 x 16 with the bright block top-right."""
    stored = np.zeros((16, 24), np.uint8)
    stored[:8, :8] = 250
    stored[:8, 16:] = 120
    exif = Image.Exif()
    exif[274] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    grey = read_grey(path)
    assert grey.shape == (24, 16)
    assert np.abs(grey.astype(int) - np.rot90(stored, -1)).max() <= 6  # JPEG rounding at block edges
    assert grey[:8, 8:].min() > 240 and grey[16:, 8:].mean() == pytest.approx(120, abs=3)
    assert grey[:, :8].max() < 10


def test_jpeg_stored_through_prep_is_upright(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    exif = Image.Exif()
    exif[274] = 8
    Image.fromarray(np.kron(PATTERN, np.ones((8, 8), np.uint8))).save(src / "p.jpg", exif=exif, quality=100)
    result = build.pack(folder.plan(src.parent, split="100/0/0"), tmp_path / "out", encoding="png", progress=False)
    stored = PackedDataset(result.out).image(0)
    expected = UPRIGHT[8](np.kron(PATTERN, np.ones((8, 8), np.uint8)))
    assert stored.shape == (48, 32) and np.abs(stored.astype(int) - expected).max() <= 4


# ----------------------------------------------------------------------------------------- pixel limit


def _blank_bilevel_png(path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height zeros, written row by row: a 30,000 x 30,000 one is ~ 110 KB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_by_its_header_and_the_rest_packed(tmp_path):
    """The PNG that Pillow refused with DecompressionBombError (30,000 x 30,000 1-bit, 900 MP) is skipped with its
    size; the good files beside it are packed with their pixels."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    _blank_bilevel_png(src / "a" / "bomb.png", 30_000, 30_000)
    assert (src / "a" / "bomb.png").stat().st_size < 200_000
    for k in range(3):
        Image.fromarray(np.full((20, 30), 40 * k + 10, np.uint8)).save(src / "a" / f"good{k}.png")
    result = build.pack(folder.plan(src, split="100/0/0"), tmp_path / "out", encoding="png", progress=False)
    [skip] = result.manifest["skipped"]
    assert skip["source"] == "a/bomb.png"
    assert "30000 x 30000 pixels (900 MP)" in skip["reason"] and "--max-pixels" in skip["reason"]
    data = PackedDataset(result.out)
    values = sorted(int(data.image(i)[0, 0]) for i in range(len(data)))
    assert values == [10, 50, 90]
    assert "packed 3 images" in result.summary and "1 skipped (4 found)" in result.summary


def test_max_pixels_is_checked_before_decoding(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.zeros((30, 40), np.uint8)), "x.png")
    assert read_grey(path, max_pixels=1200).shape == (30, 40)  # exactly at the limit: kept
    with pytest.raises(ImageError, match=r"40 x 30 pixels \(0.0012 MP\) is above the --max-pixels limit of 1199"):
        read_grey(path, max_pixels=1199)


def _dicom(path, pixels: np.ndarray, photometric: str, window=None, bits=12):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_window_is_applied(tmp_path):
    pixels = np.array([[0, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    # Window 1000..2000: below is black, above is white, the centre is mid-grey.
    grey = read_grey(_dicom(tmp_path / "w.dcm", pixels, "MONOCHROME2", window=(1500, 1000)))
    assert grey[0, 0] == 0 and grey[0, 1] == 0
    assert abs(int(grey[0, 2]) - 128) <= 1
    assert grey[0, 3] >= 254 and grey[0, 4] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    plain = read_grey(_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    inverted = read_grey(_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    assert plain.tolist() == [[0, 255]]
    assert inverted.tolist() == [[255, 0]]
