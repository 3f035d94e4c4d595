"""Any X-ray file -> one resized 8-bit grey image, or an ImageError whose text is the skip reason."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from twinray.prep.format import encode_image

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES
# Detectors store 10, 12, 14 or 16 bits in a 16-bit container; we scale by the depth actually used.
BIT_DEPTHS = (8, 10, 12, 14, 16)

# Guard against decompression bombs without refusing real 4k x 4k radiographs.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class ImageError(Exception):
    """The file cannot become a training image; str(error) is the reason recorded in `skipped`."""


def bit_depth(values: np.ndarray, stored_bits: int | None = None) -> int:
    """The real bit depth: DICOM's BitsStored when known, else the smallest of BIT_DEPTHS that holds the max."""
    if stored_bits:
        return int(stored_bits)
    peak = int(values.max()) if values.size else 0
    return next((b for b in BIT_DEPTHS if peak < (1 << b)), 16)


def scale_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def pil_to_grey(image: Image.Image) -> np.ndarray:
    """Every PIL mode -> uint8 HxW. Colour uses ITU-R 601 luma; alpha composites over black (X-ray background)."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit PNG/TIFF) and I (32-bit int)
        values = np.clip(np.asarray(image).astype(np.int64), 0, None)
        return scale_to_uint8(values, bit_depth(values))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise ImageError("float image holds NaN or infinity")
        if hi <= 1.0 and lo >= 0.0:  # already in [0, 1]
            return scale_to_uint8(values * 255.0, 8)
        return scale_to_uint8((values - lo) / max(hi - lo, 1e-12) * 255.0, 8)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("LA", "RGBA", "PA"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float64) / 255.0
        grey = np.asarray(image.convert("RGB").convert("L"), dtype=np.float64)
        return np.rint(grey * alpha).astype(np.uint8)
    return np.asarray(image.convert("RGB").convert("L"), dtype=np.uint8).copy()


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_grey(image)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncated" in text or "broken" in text.lower():
            raise ImageError(f"truncated or corrupt image ({text})") from None
        raise ImageError(f"unreadable image ({text})") from None


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise ImageError("DICOM needs the 'dicom' extra: pip install 'twinray[dicom]'") from None
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(path)
        values = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if values.ndim != 2:
        raise ImageError(f"DICOM pixel data has shape {values.shape}; expected one grey 2-D frame")
    values = apply_modality_lut(values, ds)
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if has_voi:
        # The VOI LUT or window maps into [0, 2**BitsStored - 1]: scale from that range, not min-max.
        bits = int(ds.get("BitsStored", 16))
        floor = -(1 << (bits - 1)) if ds.get("PixelRepresentation", 0) == 1 else 0
        grey = scale_to_uint8(apply_voi_lut(values, ds).astype(np.float64) - floor, bits)
    else:
        values = values.astype(np.float64)
        lo, hi = values.min(), values.max()
        grey = scale_to_uint8((values - lo) / max(hi - lo, 1e-12) * 255.0, 8)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1 shows low values as white
    return grey


def read_grey(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as e:
        raise ImageError(f"cannot stat ({e.strerror})") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path)
    return _read_raster(path)


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side -> `size` with area interpolation, aspect kept; never upsamples."""
    h, w = image.shape
    short = min(h, w)
    if short <= size:
        return image
    scale = size / short
    new_h, new_w = (size, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), size)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def convert_file(path: str | Path, size: int, encoding: str) -> tuple[bytes, int, int]:
    """Read, make grey, resize and encode one file: (member bytes, height, width)."""
    image = resize_short_side(read_grey(path), size)
    return encode_image(image, encoding), image.shape[0], image.shape[1]
