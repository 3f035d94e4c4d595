"""Every input mode becomes correct 8-bit grey; bad files give a skip reason, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from twinray.prep.images import ImageError, bit_depth, convert_file, read_grey, resize_short_side

from tests.layouts import REAL_CXR

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
def test_12_bit_data_in_16_bit_file_scales_by_12_bits(tmp_path, suffix):
    values = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16)
    path = tmp_path / f"twelve{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    assert read_grey(path).tolist() == [[0, 64, 128, 255]]


def test_full_16_bit_png(tmp_path):
    values = np.array([[0, 65535, 32768]], dtype=np.uint16)
    path = tmp_path / "full16.png"
    Image.fromarray(values).save(path)
    assert read_grey(path).tolist() == [[0, 255, 128]]


def test_bit_depth_rounds_up_to_detector_depths():
    assert bit_depth(np.array([200])) == 8
    assert bit_depth(np.array([900])) == 10
    assert bit_depth(np.array([3000])) == 12
    assert bit_depth(np.array([40000])) == 16
    assert bit_depth(np.array([5]), stored_bits=12) == 12


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
    data, height, width = convert_file(path, 150, "png")
    assert (height, width) == (200, 150)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


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
