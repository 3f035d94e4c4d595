"""A DICOM file -> 8-bit grey, by the standard's grayscale display pipeline, or an ImageError naming the reason.

The order is DICOM PS3.4 N.2.1.1 (the grayscale transformations), each step defined in PS3.3 C.11:

    stored values -> Modality LUT (C.11.1) -> VOI LUT (C.11.2) -> presentation (MONOCHROME1 inverted) -> 8 bits

Every step carries the output range it can produce, and the final scaling to 0..255 uses the range of the last step
applied: the window's own output range, a LUT's declared bit depth, or (no VOI) the modality output range of the
stored bit depth. Scaling by the stored bit depth after a rescale or window would squeeze or clip the image.

pydicom reads the file (`force=True`: files without the 128-byte preamble and `DICM` are still read) and decodes the
pixel data through its plugins; the `dicom` extra installs the decoders (docs/format.md says which and why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twinray.prep.pixels import ImageError, check_pixel_count, scale_to_uint8

# Value Representations of PS3.5 6.2: the two bytes after the first tag of an explicit-VR file.
_VRS = set(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3

# The packages (beside pydicom) that decode each compressed transfer syntax; all come with `twinray[dicom]`.
_LIBJPEG = "pylibjpeg and pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg and pylibjpeg-openjpeg"
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended (Process 2 and 4), 12-bit
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless, first-order prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80": _LIBJPEG,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg and pylibjpeg-rle",  # RLE Lossless (pydicom also decodes it alone)
}


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file's first 132 bytes are DICOM's: `DICM` after the 128-byte preamble (PS3.10 7.1), or, for files
    written without preamble (as some PACS exports are), a first tag in group 0x0002 (File Meta, explicit VR little
    endian) or 0x0008 (Identifying, little endian explicit or implicit VR, or big endian explicit VR)."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group_le, group_be = int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big")
    explicit = head[4:6] in _VRS
    if group_le == 0x0002:
        return explicit
    if group_le == 0x0008:
        length = int.from_bytes(head[4:8], "little")  # implicit VR: a 32-bit even value length
        return explicit or (length % 2 == 0 and length < 1 << 16)
    return group_be == 0x0008 and explicit


def is_dicom_file(path: Path) -> bool:
    """`looks_like_dicom` on the file's head; False when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return looks_like_dicom(f.read(132))
    except OSError:
        return False


def read(path: Path, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    """One DICOM file -> (uint8 HxW grey, notes). Notes say where the pipeline departed from the file's own
    instructions (an invalid window ignored, say); they go to the manifest. Raises ImageError with the reason."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise ImageError("DICOM needs the 'dicom' extra: pip install 'twinray[dicom]'") from None
    ds = _open(path)
    _check_frame(ds, max_pixels)
    values = _decode(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
        # pydicom returns colour as RGB; ITU-R 601 luma as for other colour images (docs/format.md).
        luma = values[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return scale(luma, 0.0, float((1 << _bits_stored(ds)) - 1)), []
    notes: list[str] = []
    values, lo, hi = modality_lut(values, ds, notes)
    values, lo, hi = voi_lut(values, lo, hi, ds, notes)
    grey = scale(values, lo, hi)
    if photometric == "MONOCHROME1":  # PS3.3 C.7.6.3.1.2: the minimum value is displayed white
        grey = 255 - grey
    return grey, notes


def _open(path: Path):
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True)  # force: no preamble and no `DICM` is still DICOM
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        what = "float pixel data" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else "no pixel data"
        raise ImageError(f"DICOM with {what} (0x7FE0 group), not an image prep can pack")
    if "TransferSyntaxUID" not in ds.file_meta:  # a dataset written without File Meta: the reading tells its syntax
        if ds["PixelData"].is_undefined_length:
            raise ImageError("DICOM with compressed pixel data but no Transfer Syntax UID to say how it is coded")
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _check_frame(ds, max_pixels: int) -> None:
    """The header's size checks, before any pixel is decoded."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageError("DICOM without a valid Rows/Columns") from None
    check_pixel_count(columns, rows, max_pixels)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(f"DICOM with {frames} frames; prep packs single-frame images")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        raise ImageError("PALETTE COLOR DICOM is not supported; prep packs grey and RGB images")


def _decode(ds) -> np.ndarray:
    from pydicom.pixels.decoders.base import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(f"DICOM transfer syntax {syntax} ({syntax.name}) has no decoder in pydicom") from None
    if not decoder.is_available:
        packages = DECODER_PACKAGES.get(str(syntax), "a decoder plugin for pydicom")
        raise ImageError(
            f"{syntax.name} pixel data needs a decoder: pip install 'twinray[dicom]' (it brings {packages})"
        )
    try:
        values = ds.pixel_array
    except Exception as e:
        text = " ".join(str(e).split())  # pydicom lists each plugin's failure on its own line
        raise ImageError(f"DICOM pixel data does not decode ({syntax.name}: {text})") from None
    if values.ndim != 2 and not (values.ndim == 3 and values.shape[-1] == 3):
        raise ImageError(f"DICOM pixel data has shape {values.shape}; expected one grey or RGB frame")
    return values


def _bits_stored(ds) -> int:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if not 1 <= bits <= 32:
        raise ImageError(f"DICOM Bits Stored {bits} is outside 1..32")
    return bits


def _first(value) -> float:
    """Window Center/Width may hold several values (VM 1-n, alternative views): the first is the default view."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values over the range [lo, hi] -> uint8 0..255 (rounded, clipped)."""
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    return scale_to_uint8((values.astype(np.float64) - lo) * (255.0 / (hi - lo)), 8)


def modality_lut(values: np.ndarray, ds, notes: list[str]) -> tuple[np.ndarray, float, float]:
    """PS3.3 C.11.1, the Modality LUT: stored values -> modality values (Hounsfield units, optical density, ...),
    with the range the transform can output.

    A Modality LUT Sequence maps by its table; its range is 0..2**bits - 1 for the bits its LUT Descriptor declares.
    Otherwise Rescale Slope and Intercept map linearly (absent: 1 and 0), and the range is the stored range
    (Bits Stored, Pixel Representation) through the same line. Returns float64 values, lo, hi."""
    bits = _bits_stored(ds)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    stored_lo, stored_hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        out, lut_bits = lut(values, sequence[0], ds, "Modality LUT", notes)
        return out, 0.0, float((1 << lut_bits) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if slope is None or slope == "" else float(slope)
    intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
    if slope == 0:
        notes.append("Rescale Slope 0 would make every pixel equal: rescale ignored")
        slope, intercept = 1.0, 0.0
    out = values.astype(np.float64) * slope + intercept
    ends = sorted((stored_lo * slope + intercept, stored_hi * slope + intercept))
    return out, ends[0], ends[1]


def voi_lut(values: np.ndarray, lo: float, hi: float, ds, notes: list[str]) -> tuple[np.ndarray, float, float]:
    """PS3.3 C.11.2, the VOI LUT: modality values -> values of interest, with their output range.

    The first VOI LUT Sequence item if there is one (range from its declared bits), else the first Window Center and
    Width through the VOI LUT Function (`window`, range 0..255). A window whose width is invalid for its function is
    ignored, with a note, and so is a VOI LUT Function the standard does not define: the values then keep the
    modality range [lo, hi]."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        out, lut_bits = lut(values, sequence[0], ds, "VOI LUT", notes)
        return out, 0.0, float((1 << lut_bits) - 1)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return values, lo, hi
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):  # empty or not a number
        notes.append(
            f"Window Center/Width {ds.WindowCenter!r}/{ds.WindowWidth!r} unreadable: window ignored, scaled from the "
            f"modality output range {lo:g}..{hi:g}"
        )
        return values, lo, hi
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        notes.append(f"VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID: treated as LINEAR")
        function = "LINEAR"
    valid = width >= 1 if function == "LINEAR" else width > 0  # NaN is neither
    if not (valid and np.isfinite(width) and np.isfinite(center)):
        need = "at least 1" if function == "LINEAR" else "above 0"
        notes.append(
            f"Window Width {width:g} is invalid ({function} needs {need}, PS3.3 C.11.2.1.2): window ignored, "
            f"scaled from the modality output range {lo:g}..{hi:g}"
        )
        return values, lo, hi
    return window(values, center, width, function), 0.0, 255.0


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window Center c and Width w -> float64 values in [0, 255] (y_min 0, y_max 255).

    LINEAR (PS3.3 C.11.2.1.2.1, w >= 1): x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 255; else
        ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.
    LINEAR_EXACT (C.11.2.1.3.2, w > 0): x <= c - w/2 -> 0; x > c + w/2 -> 255; else ((x - c) / w + 0.5) * 255.
    SIGMOID (C.11.2.1.3.1, w > 0): 255 / (1 + exp(-4 (x - c) / w))."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        c, w = center, width
    else:
        c, w = center - 0.5, width - 1.0
    low, high = c - w / 2, c + w / 2
    ramp = np.clip(((x - c) / max(w, 1e-12) + 0.5) * 255.0, 0.0, 255.0)  # w = 0 (LINEAR width 1): no ramp band
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, ramp))


def lut(values: np.ndarray, item, ds, name: str, notes: list[str]) -> tuple[np.ndarray, int]:
    """One LUT item (PS3.3 C.11.1.1.1 and C.11.2.1.1) applied to `values` -> (float64 output, declared bits).

    LUT Descriptor = (entries, first input value mapped, bits per entry); 0 entries means 65536. Inputs below the
    first mapped value take the first entry, inputs past the last take the last entry. Where the table holds values
    beyond its declared bits, the bits that hold them are used instead, with a note."""
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError):
        raise ImageError(f"DICOM {name} without a valid LUT Descriptor (entries, first value, bits)") from None
    entries = entries or 1 << 16
    table = _lut_data(item, ds)
    if table.size < entries:
        raise ImageError(f"DICOM {name} holds {table.size} entries, its LUT Descriptor declares {entries}")
    if not 1 <= bits <= 16:
        raise ImageError(f"DICOM {name} declares {bits} bits per entry, outside 1..16")
    table = table[:entries]
    peak = int(table.max())
    if peak >= 1 << bits:
        needed = peak.bit_length()
        notes.append(f"{name} entries reach {peak}, beyond its declared {bits} bits: scaled from {needed} bits")
        bits = needed
    index = np.clip(np.rint(values.astype(np.float64)) - first, 0, entries - 1).astype(np.intp)
    return table[index].astype(np.float64), bits


def _lut_data(item, ds) -> np.ndarray:
    """LUT Data as unsigned ints: VR US gives numbers, VR OW raw 16-bit words in the dataset's byte order."""
    data = item.get("LUTData")
    if data is None:
        raise ImageError("DICOM LUT without LUT Data")
    if isinstance(data, bytes | bytearray):
        little = ds.original_encoding[1] is not False
        return np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.int64)
    return np.atleast_1d(np.asarray(data, dtype=np.int64))
