"""DICOM through prep: the display pipeline of PS3.3 C.11 in order (Modality LUT, VOI LUT, presentation, then 8 bits
from the last step's output range), files without preamble or suffix, every compressed transfer syntax, and the
skip reasons. Every test checks packed pixel values against a formula written here, or against a decode that does
not come from prep."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.conftest import REPO
from tests.layouts import read_grey
from twinray.prep import build
from twinray.prep.datasets import folder
from twinray.prep.dicom import looks_like_dicom
from twinray.prep.format import PackedDataset
from twinray.prep.images import ImageError

# A 12-bit ramp: 64 x 64 holds every value 0..4095 once.
RAMP12 = np.arange(4096, dtype=np.uint16).reshape(64, 64)
RAMP12_8BIT = np.rint(RAMP12.astype(np.float64) * 255 / 4095).astype(np.uint8)


def make_dicom(path: Path, pixels: np.ndarray, *, bits: int = 12, signed: bool = False, **elements) -> Path:
    """A single-frame MONOCHROME2 Secondary Capture file, Explicit VR Little Endian, with `elements` set by keyword
    (RescaleIntercept=-1024, WindowCenter=..., PhotometricInterpretation=...)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}
    ds.PixelData = pixels.astype(dtype[ds.BitsAllocated, signed]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def pack_dicoms(tmp_path: Path, files: dict[str, tuple], size: int = 512) -> tuple[dict[str, np.ndarray], dict]:
    """`prep folder` on files made by make_dicom(name, *args): {name: packed image}, and the manifest. PNG members,
    so the values are the packed ones exactly."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True, exist_ok=True)
    for name, (pixels, kwargs) in files.items():
        make_dicom(src / "a" / name, pixels, **kwargs)
    return pack_folder(tmp_path, src, size)


def pack_folder(tmp_path: Path, src: Path, size: int = 512) -> tuple[dict[str, np.ndarray], dict]:
    out = tmp_path / "out"
    result = build.pack(folder.plan(src, split="100/0/0"), out, size=size, encoding="png", workers=1, progress=False)
    data = PackedDataset(out)
    images = {data.metadata(i)["source"].split("/", 1)[1]: data.image(i) for i in range(len(data))}
    return images, result.manifest


# ----------------------------------------------------------------------------------------- display pipeline


def test_rescale_and_window_shifted_to_match_give_the_same_ramp(tmp_path):
    """The seen fault: with Rescale Intercept -1024 and the window shifted by -1024, the ramp packed to 0..191
    (pydicom's window output range was the rescaled stored range, scaled again by 12 bits). Now every variant of the
    same display gives the 0..255 ramp: the window's output range is 0..255 itself (PS3.3 C.11.2.1.2.1)."""
    images, manifest = pack_dicoms(
        tmp_path,
        {
            "plain.dcm": (RAMP12, {"WindowCenter": 2048, "WindowWidth": 4096}),
            "intercept.dcm": (
                RAMP12,
                {"RescaleIntercept": -1024, "RescaleSlope": 1, "WindowCenter": 1024, "WindowWidth": 4096},
            ),
            # several windows (VM 2: alternative views): the first is the default
            "two_windows.dcm": (RAMP12, {"WindowCenter": [2048, 40], "WindowWidth": [4096, 400]}),
            # slope 0.5 halves the modality values: centre 1024.25 and width 2048.5 put them on the same line
            "slope.dcm": (
                RAMP12,
                {"RescaleIntercept": 0, "RescaleSlope": 0.5, "WindowCenter": 1024.25, "WindowWidth": 2048.5},
            ),
        },
    )
    for name in ("plain.dcm", "intercept.dcm", "two_windows.dcm", "slope.dcm"):
        np.testing.assert_array_equal(images[name], RAMP12_8BIT, err_msg=name)
    assert manifest["notes"] == []


def test_without_a_window_the_modality_output_range_is_used(tmp_path):
    """No VOI: the range is the stored range through the rescale line, so an intercept or a signed representation
    changes nothing, and a 12-bit ramp in a 16-bit container still fills 0..255."""
    signed = RAMP12.astype(np.int32) - 2048  # -2048..2047: the whole signed 12-bit range
    images, _ = pack_dicoms(
        tmp_path,
        {
            "plain.dcm": (RAMP12, {}),
            "intercept.dcm": (RAMP12, {"RescaleIntercept": -1024, "RescaleSlope": 1}),
            "signed.dcm": (signed, {"signed": True}),
            "negative_slope.dcm": (RAMP12, {"RescaleIntercept": 4095, "RescaleSlope": -1}),
        },
    )
    np.testing.assert_array_equal(images["plain.dcm"], RAMP12_8BIT)
    np.testing.assert_array_equal(images["intercept.dcm"], RAMP12_8BIT)
    np.testing.assert_array_equal(images["signed.dcm"], RAMP12_8BIT)
    np.testing.assert_array_equal(images["negative_slope.dcm"], 255 - RAMP12_8BIT)


def test_window_cuts_and_scales_by_its_own_range(tmp_path):
    """Window 1000..2000 of a 12-bit ramp: black below, white above, a full 0..255 ramp between (LINEAR)."""
    images, _ = pack_dicoms(tmp_path, {"w.dcm": (RAMP12, {"WindowCenter": 1500, "WindowWidth": 1001})})
    x = RAMP12.astype(np.float64)
    # PS3.3 C.11.2.1.2.1 with c = 1500, w = 1001, y in 0..255
    expected = np.where(x <= 999.5, 0, np.where(x > 1999.5, 255, ((x - 1499.5) / 1000 + 0.5) * 255))
    np.testing.assert_array_equal(images["w.dcm"], np.rint(expected).astype(np.uint8))
    assert images["w.dcm"][RAMP12 == 1000] == 0 and images["w.dcm"][RAMP12 == 2000] == 255


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(tmp_path, function):
    images, _ = pack_dicoms(
        tmp_path, {"f.dcm": (RAMP12, {"WindowCenter": 2000, "WindowWidth": 800, "VOILUTFunction": function})}
    )
    x = RAMP12.astype(np.float64)
    if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
        expected = np.clip(((x - 2000) / 800 + 0.5) * 255, 0, 255)
    else:  # PS3.3 C.11.2.1.3.1
        expected = 255 / (1 + np.exp(-4 * (x - 2000) / 800))
    np.testing.assert_array_equal(images["f.dcm"], np.rint(expected).astype(np.uint8))


@pytest.mark.parametrize("width", [0, 0.5, -10])
def test_an_invalid_window_is_ignored_with_a_note(tmp_path, width):
    """The seen fault: pydicom's ValueError for Window Width 0 stopped the whole run. Width below 1 is invalid for
    LINEAR: the window is ignored, the modality output range used, and the manifest says so for that file."""
    images, manifest = pack_dicoms(
        tmp_path,
        {
            "bad.dcm": (
                RAMP12,
                {"RescaleIntercept": -1024, "RescaleSlope": 1, "WindowCenter": 40, "WindowWidth": width},
            ),
            "good.dcm": (RAMP12, {"WindowCenter": 2048, "WindowWidth": 4096}),
        },
    )
    np.testing.assert_array_equal(images["bad.dcm"], RAMP12_8BIT)  # the range -1024..3071
    np.testing.assert_array_equal(images["good.dcm"], RAMP12_8BIT)
    [note] = manifest["notes"]
    assert note["source"] == "a/bad.dcm"
    assert f"Window Width {width:g} is invalid" in note["note"] and "-1024..3071" in note["note"]
    assert manifest["skipped"] == []


def test_an_empty_window_is_ignored_with_a_note(tmp_path):
    images, manifest = pack_dicoms(tmp_path, {"empty.dcm": (RAMP12, {"WindowCenter": "", "WindowWidth": ""})})
    np.testing.assert_array_equal(images["empty.dcm"], RAMP12_8BIT)
    [note] = manifest["notes"]
    assert note["source"] == "a/empty.dcm" and "unreadable: window ignored" in note["note"]


def _lut_item(table: np.ndarray, first: int, bits: int, vr: str) -> Dataset:
    """A LUT item; its LUT Data as VR US (numbers) or OW (16-bit little-endian words), as files hold either."""
    item = Dataset()
    item.LUTDescriptor = [len(table), first, bits]
    if vr == "US":
        item.add_new(0x00283006, "US", [int(v) for v in table])
    else:
        item.add_new(0x00283006, "OW", np.asarray(table, "<u2").tobytes())
    return item


def test_voi_lut_sequence_scales_from_its_declared_bits(tmp_path):
    """A VOI LUT of 10-bit entries (LUT Descriptor 3000, 1000, 10): inputs below 1000 take the first entry, past the
    last the last; the output 0..1023 is scaled to 0..255 by those 10 bits."""
    table = np.linspace(0, 1023, 3000).round().astype(int)
    images, _ = pack_dicoms(tmp_path, {"voi.dcm": (RAMP12, {"VOILUTSequence": [_lut_item(table, 1000, 10, "US")]})})
    index = np.clip(RAMP12.astype(int) - 1000, 0, 2999)
    expected = np.rint(table[index] * 255 / 1023).astype(np.uint8)
    np.testing.assert_array_equal(images["voi.dcm"], expected)
    assert images["voi.dcm"].min() == 0 and images["voi.dcm"].max() == 255


def test_modality_lut_sequence_then_window(tmp_path):
    """A Modality LUT (stored -> 16-bit values, x * 16) and then a window on the LUT's output."""
    table = np.arange(4096) * 16
    images, _ = pack_dicoms(
        tmp_path,
        {
            "mlut.dcm": (RAMP12, {"ModalityLUTSequence": [_lut_item(table, 0, 16, "OW")]}),
            "mlut_window.dcm": (
                RAMP12,
                {"ModalityLUTSequence": [_lut_item(table, 0, 16, "US")], "WindowCenter": 32768, "WindowWidth": 32769},
            ),
        },
    )
    np.testing.assert_array_equal(
        images["mlut.dcm"], np.rint(RAMP12.astype(np.float64) * 16 * 255 / 65535).astype(np.uint8)
    )
    x = RAMP12.astype(np.float64) * 16
    expected = np.where(x <= 16383.5, 0, np.where(x > 49151.5, 255, ((x - 32767.5) / 32768 + 0.5) * 255))
    np.testing.assert_array_equal(images["mlut_window.dcm"], np.rint(expected).astype(np.uint8))


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    images, _ = pack_dicoms(
        tmp_path,
        {
            "m1.dcm": (
                RAMP12,
                {"PhotometricInterpretation": "MONOCHROME1", "RescaleIntercept": -1024, "RescaleSlope": 1}
                | {"WindowCenter": 1024, "WindowWidth": 4096},
            )
        },
    )
    np.testing.assert_array_equal(images["m1.dcm"], 255 - RAMP12_8BIT)


# ----------------------------------------------------------------------------------------- finding DICOM files


def test_files_without_preamble_are_read(tmp_path):
    """Two kinds seen in the wild: the File Meta group without the 128-byte preamble and `DICM`, and a bare dataset
    with no File Meta at all (its encoding tells the transfer syntax)."""
    full = make_dicom(tmp_path / "full.dcm", RAMP12, WindowCenter=2048, WindowWidth=4096)
    no_preamble = tmp_path / "no_preamble.dcm"
    no_preamble.write_bytes(full.read_bytes()[132:])
    ds = pydicom.dcmread(full)
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00" and no_preamble.read_bytes()[:2] == b"\x02\x00"
    for path in (no_preamble, bare):
        np.testing.assert_array_equal(read_grey(path), RAMP12_8BIT, err_msg=path.name)


def test_dicom_without_suffix_is_recognised_by_content(tmp_path):
    """PACS exports name files IM000001 or by their UID (`1.2.840...`.113: a suffix that is no suffix)."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    make_dicom(src / "a" / "IM000001", RAMP12, WindowCenter=2048, WindowWidth=4096)
    make_dicom(src / "a" / "1.2.826.0.1.3680043.113", RAMP12, PhotometricInterpretation="MONOCHROME1")
    no_preamble = (src / "a" / "IM000001").read_bytes()[132:]
    (src / "a" / "IM000002").write_bytes(no_preamble)
    bare = pydicom.dcmread(src / "a" / "IM000001")
    del bare.file_meta
    bare.preamble = None
    bare.save_as(src / "a" / "IM000003", implicit_vr=True, little_endian=True)  # no File Meta: starts at group 0008
    (src / "a" / "README").write_text("exported by a PACS\n")
    images, manifest = pack_folder(tmp_path, src)
    np.testing.assert_array_equal(images["IM000001"], RAMP12_8BIT)
    np.testing.assert_array_equal(images["IM000002"], RAMP12_8BIT)
    np.testing.assert_array_equal(images["IM000003"], RAMP12_8BIT)
    np.testing.assert_array_equal(images["1.2.826.0.1.3680043.113"], 255 - RAMP12_8BIT)
    assert manifest["skipped"] == [{"source": "a/README", "reason": "not an image file (no suffix)"}]


def test_dicom_sniffing_rejects_other_files():
    png = BytesIO()
    Image.fromarray(RAMP12_8BIT).save(png, "PNG")
    assert not looks_like_dicom(png.getvalue()[:132])
    assert not looks_like_dicom(b"exported by a PACS\n")
    assert not looks_like_dicom(b"\x08\x00")
    assert looks_like_dicom(b"\x00" * 128 + b"DICM")
    assert looks_like_dicom(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")  # explicit VR little endian, group 0008
    assert looks_like_dicom(b"\x00\x08\x00\x05CS\x00\x0aISO_IR 100")  # explicit VR big endian


# ----------------------------------------------------------------------------------------- compressed syntaxes


def _with_syntax(path: Path, syntax, frame: bytes | None = None, **plugin) -> Path:
    """Re-code `path`'s pixel data: through pydicom's encoder (frame None), or as the given encapsulated frame."""
    ds = pydicom.dcmread(path)
    if frame is None:
        ds.compress(syntax, **plugin)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    return path


def jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless stream (ITU-T T.81 Annex H, Process 14, Selection Value 1: predictor Ra, point transform 0)
    of one grey component, written here so that the decoder under test checks an encoder it does not share.

    Differences (modulo 2**16, H.1.2.1) are Huffman coded by SSSS category with one table of 17 five-bit codes
    (code k for category k), each followed by SSSS extra bits (negative values as diff - 1, H.1.2.2; none for 16)."""
    x = pixels.astype(np.int64)
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << (precision - 1)  # H.1.2.1: the first sample of the first line
    prediction[0, 1:] = x[0, :-1]  # first line: Ra
    prediction[1:, 0] = x[:-1, 0]  # first sample of each other line: Rb
    prediction[1:, 1:] = x[1:, :-1]  # Ra
    diffs = (x - prediction) % 65536
    diffs = np.where(diffs >= 32768, diffs - 65536, diffs)
    bits = []
    for d in diffs.ravel().tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits (F.1.2.3)
    data = bytearray()
    for k in range(0, len(stream), 8):
        byte = int(stream[k : k + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing (F.1.2.3)
    rows, columns = pixels.shape
    sof3 = b"\xff\xc3" + struct.pack(">HBHHBBBB", 11, precision, rows, columns, 1, 1, 0x11, 0)
    dht = (
        b"\xff\xc4" + struct.pack(">HB", 2 + 1 + 16 + 17, 0x00) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    )
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 0, 0)
    return b"\xff\xd8" + sof3 + dht + sos + bytes(data) + b"\xff\xd9"


def test_lossless_syntaxes_give_the_uncompressed_pixels(tmp_path):
    """RLE (pydicom's encoder), JPEG 2000 Lossless (OpenJPEG's) and JPEG Lossless SV1 (written above), 12 and 16
    bits: each packs to exactly the uncompressed file's pixels, which are the ramp's formula."""
    rng = np.random.default_rng(0)
    noise16 = rng.integers(0, 65536, (48, 40)).astype(np.uint16)  # large differences: every SSSS category
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    files = {}
    for name, pixels, bits in (("ramp12", RAMP12, 12), ("noise16", noise16, 16)):
        files[f"{name}.dcm"] = make_dicom(src / f"{name}.dcm", pixels, bits=bits)
        for syntax, tag in ((RLELossless, "rle"), (JPEG2000Lossless, "j2k")):
            path = shutil.copy(src / f"{name}.dcm", src / f"{name}_{tag}.dcm")
            _with_syntax(Path(path), syntax, **({"encoding_plugin": "pydicom"} if syntax == RLELossless else {}))
        path = shutil.copy(src / f"{name}.dcm", src / f"{name}_jpegll.dcm")
        _with_syntax(Path(path), JPEGLosslessSV1, frame=jpeg_lossless(pixels, bits))
    images, manifest = pack_folder(tmp_path, src.parent)
    assert manifest["skipped"] == []
    np.testing.assert_array_equal(images["ramp12.dcm"], RAMP12_8BIT)
    np.testing.assert_array_equal(
        images["noise16.dcm"], np.rint(noise16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    )
    for name in ("ramp12", "noise16"):
        for tag in ("rle", "j2k", "jpegll"):
            np.testing.assert_array_equal(images[f"{name}_{tag}.dcm"], images[f"{name}.dcm"], err_msg=f"{name} {tag}")


def test_jpeg_baseline_decodes_as_another_decoder_does(tmp_path):
    """8-bit JPEG Baseline, encoded by Pillow: packed within 1 of Pillow's own decode of the same stream, and close
    to the original."""
    smooth = np.add.outer(np.arange(64), np.arange(48)).astype(np.uint8) * 2
    stream = BytesIO()
    Image.fromarray(smooth).save(stream, "JPEG", quality=90)
    path = make_dicom(tmp_path / "baseline.dcm", smooth, bits=8)
    _with_syntax(path, JPEGBaseline8Bit, frame=stream.getvalue())
    packed = read_grey(path)
    reference = np.asarray(Image.open(BytesIO(stream.getvalue())))
    assert np.abs(packed.astype(int) - reference).max() <= 1
    assert np.abs(packed.astype(int) - smooth).max() <= 4


def test_bundled_jpeg_ls_and_j2k_files_equal_their_uncompressed_original(tmp_path):
    """pydicom's MR_small in three codings (JPEG-LS, JPEG 2000, RLE): all pack as the uncompressed file does, and
    that is its first window (600/1600) on the signed 16-bit values."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    names = ["MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"]
    for name in names:
        shutil.copy(get_testdata_file(name), src / name)
    images, manifest = pack_folder(tmp_path, src.parent)
    assert manifest["skipped"] == []
    ds = pydicom.dcmread(src / "MR_small.dcm")
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600, 1600)
    x = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    expected = np.where(x <= 599.5 - 799.5, 0, np.where(x > 599.5 + 799.5, 255, ((x - 599.5) / 1599 + 0.5) * 255))
    np.testing.assert_array_equal(images["MR_small.dcm"], np.rint(expected).astype(np.uint8))
    for name in names[1:]:
        np.testing.assert_array_equal(images[name], images["MR_small.dcm"], err_msg=name)


def test_bundled_12_bit_jpeg_extended(tmp_path):
    """pydicom's JPGExtended.dcm (JPEG Extended, 12 bits stored, no window): the values pydicom's reference table
    gives for it (arr[420, 140] = 244, arr[230, 120] = 95), scaled by 12 bits."""
    grey = read_grey(shutil.copy(get_testdata_file("JPGExtended.dcm"), tmp_path / "ext.dcm"))
    assert grey.shape == (1024, 256)
    assert grey[420, 140] == round(244 * 255 / 4095) and grey[230, 120] == round(95 * 255 / 4095)


def test_a_missing_decoder_names_the_package(tmp_path):
    """With the decoder packages hidden (as on an install without the extra), a JPEG Lossless file is skipped, and
    the reason says which package to install."""
    path = make_dicom(tmp_path / "ll.dcm", RAMP12)
    _with_syntax(path, JPEGLosslessSV1, frame=jpeg_lossless(RAMP12, 12))
    code = (
        "import sys\n"
        "for name in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle', 'gdcm'): sys.modules[name] = None\n"
        "from twinray.prep.images import ImageError, read_image\n"
        "try:\n    read_image(sys.argv[1])\nexcept ImageError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    reason = out.stdout.strip()
    assert reason.startswith("JPEG Lossless, Non-Hierarchical, First-Order Prediction")
    assert "pip install 'twinray[dicom]'" in reason and "pylibjpeg-libjpeg" in reason


# ----------------------------------------------------------------------------------------- skips


def test_bad_dicoms_are_skipped_by_name_and_the_run_goes_on(tmp_path):
    """Each fault becomes one skip naming the file; the good file is packed. The malformed Number of Frames is the
    kind of error prep does not anticipate: the worker's catch-all names it."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    make_dicom(src / "good.dcm", RAMP12)
    make_dicom(src / "huge.dcm", RAMP12[:2, :3])
    ds = pydicom.dcmread(src / "huge.dcm")
    ds.Rows, ds.Columns = 40_000, 40_000  # the header alone decides: no pixel is decoded
    ds.save_as(src / "huge.dcm")
    frames = pydicom.dcmread(src / "good.dcm")
    frames.NumberOfFrames = 2
    frames.Rows = 32
    frames.save_as(src / "frames.dcm")
    malformed = (src / "frames.dcm").read_bytes().replace(b"IS\x02\x002 ", b"IS\x02\x00x ")
    (src / "malformed.dcm").write_bytes(malformed)
    (src / "report.dcm").write_bytes((src / "good.dcm").read_bytes()[: 132 + 200])
    images, manifest = pack_folder(tmp_path, src.parent)
    assert list(images) == ["good.dcm"]
    np.testing.assert_array_equal(images["good.dcm"], RAMP12_8BIT)
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert "40000 x 40000 pixels (1600 MP) is above the --max-pixels limit" in reasons["a/huge.dcm"]
    assert reasons["a/frames.dcm"] == "DICOM with 2 frames; prep packs single-frame images"
    assert reasons["a/malformed.dcm"].startswith("could not convert (ValueError:")
    assert "no pixel data" in reasons["a/report.dcm"] or "unreadable DICOM" in reasons["a/report.dcm"]
    assert set(reasons) == {"a/huge.dcm", "a/frames.dcm", "a/malformed.dcm", "a/report.dcm"}


def test_rgb_dicom_becomes_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    rgb[1] = 200
    path = make_dicom(tmp_path / "rgb.dcm", rgb.reshape(2, 9), bits=8)
    ds = pydicom.dcmread(path)
    ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, 3, "RGB", 0
    ds.save_as(path)
    assert read_grey(path).tolist() == [[76, 150, 29], [200, 200, 200]]  # ITU-R 601: 0.299 R + 0.587 G + 0.114 B


def test_not_dicom_inside_a_dcm_file_is_a_reason(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"this is a text file, not DICOM")
    with pytest.raises(ImageError, match="DICOM"):
        read_grey(path)
