"""Any X-ray file -> one resized 8-bit grey image, or an ImageError whose text is the skip reason.

Raster files go through Pillow (EXIF orientation applied), DICOM files through prep/dicom.py. A file is DICOM by its
suffix or by its content, so PACS exports without a suffix are read too."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from twinray.prep.format import encode_image

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES
# Detectors store 10, 12, 14 or 16 bits in a 16-bit container; we scale by the depth actually used.
BIT_DEPTHS = (8, 10, 12, 14, 16)

# Files with more pixels are skipped before decoding (`prep --max-pixels`). 100 MP is four times the largest
# radiographs (mammograms ~ 24 MP, stitched full-spine or long-leg ~ 30 MP) and keeps a worker's float64 working copy
# under 1 GB; Pillow's own bomb guard (89.5 MP warning, 179 MP error) is replaced by this check.
DEFAULT_MAX_PIXELS = 100_000_000
# The largest side a stored image may have: index.npy keeps sizes as uint16, libjpeg writes at most 65500.
MAX_SIDE = {"jpeg": 65_500, "png": 65_535, "npy": 65_535}


class ImageError(Exception):
    """The file cannot become a training image; str(error) is the reason recorded in `skipped`."""


@dataclass
class Converted:
    """One file ready for a shard: member bytes, stored size, and notes for the manifest (may be empty)."""

    data: bytes
    height: int
    width: int
    notes: list[str] = field(default_factory=list)


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Raises ImageError naming the size when width x height is above `max_pixels` (read from the header, before
    any pixel is decoded)."""
    if width * height > max_pixels:
        raise ImageError(
            f"{width} x {height} pixels ({width * height / 1e6:g} MP) is above the --max-pixels limit of "
            f"{max_pixels} ({max_pixels / 1e6:g} MP)"
        )


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


@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's module-wide bomb guard off while a file is opened: `check_pixel_count` takes its place, with the
    --max-pixels limit and a reason that names the size."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_raster(path: Path, max_pixels: int) -> np.ndarray:
    try:
        # From a file object, not a name: Pillow's memory-mapped path (names only) loses the orientation of
        # uncompressed TIFFs (Pillow 13 applies it at load, wrongly there).
        with open(path, "rb") as f, _own_pixel_limit():
            image = Image.open(f)  # lazy: the header only
            check_pixel_count(*image.size, max_pixels)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # EXIF Orientation (JPEG, TIFF, PNG, WebP): stored upright
            return pil_to_grey(image)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncated" in text or "broken" in text.lower():
            raise ImageError(f"truncated or corrupt image ({text})") from None
        raise ImageError(f"unreadable image ({text})") from None


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """One file -> (uint8 HxW grey, notes for the manifest). DICOM by suffix (.dcm, .dicom) or content, else Pillow.
    Raises ImageError with the skip reason."""
    from twinray.prep import dicom

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as e:
        raise ImageError(f"cannot stat ({e.strerror})") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    if path.suffix.lower() in DICOM_SUFFIXES or dicom.is_dicom_file(path):
        return dicom.read(path, max_pixels)
    return _read_raster(path, max_pixels), []


def read_grey(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`read_image` without the notes: uint8 HxW grey."""
    return read_image(path, max_pixels)[0]


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side -> `size` with area interpolation, aspect kept; never upsamples."""
    h, w = image.shape
    short = min(h, w)
    if short <= size:
        return image
    scale = size / short
    new_h, new_w = (size, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), size)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def convert_file(path: str | Path, size: int, encoding: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Converted:
    """Read, make grey, resize and encode one file. Raises ImageError with the skip reason."""
    grey, notes = read_image(path, max_pixels)
    image = resize_short_side(grey, size)
    height, width = image.shape
    if max(height, width) > MAX_SIDE[encoding]:
        raise ImageError(
            f"{width} x {height} after resizing: a side above {MAX_SIDE[encoding]} px cannot be stored as {encoding}"
        )
    return Converted(encode_image(image, encoding), height, width, notes)
