"""Any X-ray file -> one resized 8-bit grey image, or an ImageError whose text is the skip reason.

Raster files go through Pillow (EXIF orientation applied), DICOM files through prep/dicom.py. A file is DICOM by its
suffix or by its content, so PACS exports without a suffix are read too.

A raster file with more than 8 bits a sample is scaled by the range the file declares (PNG sBIT, TIFF
SMinSampleValue/SMaxSampleValue), else by the dataset's `--bit-depth` policy; never by its own pixel values."""

from __future__ import annotations

import contextlib
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from twinray.prep import dicom
from twinray.prep.format import encode_image
from twinray.prep.pixels import ImageError, check_pixel_count, scale_to_uint8

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES
# Detectors store 10, 12, 14 or 16 bits in a 16-bit container. A file that does not declare its depth is scaled by
# one policy for the whole dataset (`prep --bit-depth`): "full", the container's whole range (16-bit: 0..65535), the
# one choice that never depends on content, or N bits (0..2**N - 1, brighter values clipped to white).
DEFAULT_BIT_DEPTH = "full"
POLICY_BITS = range(8, 17)

# Files with more pixels are skipped before decoding (`prep --max-pixels`). 100 MP is four times the largest
# radiographs (mammograms ~ 24 MP, stitched full-spine or long-leg ~ 30 MP) and keeps a worker's float64 working copy
# under 1 GB; Pillow's own bomb guard (89.5 MP warning, 179 MP error) is replaced by this check.
DEFAULT_MAX_PIXELS = 100_000_000
# The largest side a stored image may have: index.npy keeps sizes as uint16, libjpeg writes at most 65500.
MAX_SIDE = {"jpeg": 65_500, "png": 65_535, "npy": 65_535}


@dataclass
class Converted:
    """One file ready for a shard: member bytes, stored size, and notes for the manifest (may be empty)."""

    data: bytes
    height: int
    width: int
    notes: list[str] = field(default_factory=list)


def parse_bit_depth(value: str | int) -> str | int:
    """A `--bit-depth` value -> "full" or an int in 8..16. Raises ValueError naming the value otherwise."""
    text = str(value).strip().lower()
    if text == "full":
        return "full"
    if text.isdigit() and int(text) in POLICY_BITS:
        return int(text)
    raise ValueError(f"--bit-depth {value!r} is not 'full' or a whole number of bits from 8 to 16")


def container_bits(image: Image.Image) -> int:
    """Bits a sample of an integer image takes in its file: TIFF BitsPerSample, else 16 for the I;16 modes and 32
    for mode I. (A PNG's own IHDR depth is read by `png_depths`.)"""
    bits = getattr(image, "tag_v2", {}).get(258) if image.format == "TIFF" else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if isinstance(bits, int) and 8 < bits <= 32:
        return bits
    return 16 if image.mode.startswith("I;16") else 32


def png_depths(f) -> tuple[int | None, int | None]:
    """(IHDR bit depth, significant bits of the grey sample from the sBIT chunk or None) of the PNG open as binary
    file `f`, from its chunks before the image data (PNG 1.2, 4.1.1 and 4.2.6). Pillow has checked their CRCs."""
    f.seek(8)  # the signature
    depth = sbit = None
    while len(head := f.read(8)) == 8:
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"IHDR" and length >= 9:
            depth = f.read(9)[8]
            f.seek(length - 9 + 4, 1)
        elif kind == b"sBIT" and length >= 1:
            sbit = f.read(1)[0]  # grey: 1 byte; grey + alpha: grey first
            f.seek(length - 1 + 4, 1)
        else:
            f.seek(length + 4, 1)  # data and CRC
    return depth, sbit


def _first_number(value) -> float | None:
    if isinstance(value, tuple):
        value = value[0] if value else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def scaled_up(values: np.ndarray, sbit: int, bits: int) -> bool:
    """Whether every value is an `sbit`-bit sample scaled up to `bits` bits in one of the ways PNG 1.2 (section
    12.4) names: a left shift, left bit replication, or linear scaling. A raw `sbit`-bit image with a few values
    above 2**sbit - 1 (a hot or corrupt pixel) is not, and keeps its declared depth (those values are clipped)."""
    v = values.astype(np.int64) >> (bits - sbit)
    shifted = v << (bits - sbit)
    replicated = np.zeros_like(v)
    for k in range(-(-bits // sbit)):  # the sample's bits repeated from the top until the low bits are filled
        shift = bits - sbit * (k + 1)
        replicated |= v << shift if shift >= 0 else v >> -shift
    linear = np.round(v * ((1 << bits) - 1) / ((1 << sbit) - 1)).astype(np.int64)
    return any(np.array_equal(values, form) for form in (shifted, replicated, linear))


def sample_range(image: Image.Image, f, policy: str | int, notes: list[str]) -> tuple[float, float, str]:
    """(lo, hi, what) for a loaded integer image of more than 8 bits a sample: the values that become 0 and 255, and
    in words where they come from (for notes). `f` is the image's open binary file, `policy` "full" or 8..16.

    1. PNG sBIT (PNG 1.2, 4.2.6): the PNG standard stores an N-bit image scaled up to the full 16-bit range and
       records N in sBIT (9.1); such a file (every value a scaled-up N-bit sample: `scaled_up`) is scaled by 0..65535.
       Many writers instead store the raw N-bit values with an sBIT of N: those are scaled by 0..2**N - 1, and a
       value above it (a hot pixel) is clipped with a note, never taken as a sign of another scale.
    2. TIFF SMinSampleValue/SMaxSampleValue (tags 340/341, TIFF 6.0 section 19): the declared sample range.
       MaxSampleValue (281) is for statistics only (TIFF 6.0, section 8) and does not set the scale; a note says so.
    3. Else the dataset's policy: "full" is 0..2**bits - 1 of the container, N is 0..2**N - 1.

    A declaration outside the container's range is ignored, with a note."""
    bits = container_bits(image)
    if image.format == "PNG":
        depth, sbit = png_depths(f)
        bits = depth if depth and depth > 8 else bits
        if sbit is not None:
            if not 1 <= sbit <= bits:
                notes.append(f"PNG sBIT {sbit} is outside 1..{bits}: ignored")
            else:
                values = np.asarray(image)
                if int(values.max(initial=0)) >= 1 << sbit and scaled_up(values, sbit, bits):
                    return 0, (1 << bits) - 1, f"the full {bits}-bit range (sBIT {sbit}, values scaled up as PNG asks)"
                return 0, (1 << sbit) - 1, f"the {sbit} significant bits its PNG sBIT chunk declares"
    full = (1 << bits) - 1
    if image.format == "TIFF":
        tags = image.tag_v2
        lo, hi = _first_number(tags.get(340)), _first_number(tags.get(341))
        if hi is not None:
            lo = 0.0 if lo is None else lo
            if -(1 << bits) <= lo < hi <= full:
                return lo, hi, f"the range {lo:g}..{hi:g} its TIFF SMinSampleValue/SMaxSampleValue declare"
            notes.append(
                f"TIFF SMinSampleValue/SMaxSampleValue {lo:g}..{hi:g} is not a range within 0..{full}: ignored"
            )
        stat = _first_number(tags.get(281))
        if stat is not None and stat < full:
            notes.append(
                f"TIFF MaxSampleValue {stat:g} is statistics only (TIFF 6.0), not a depth: scaled by --bit-depth "
                f"{policy}"
            )
    if policy == "full":
        return 0, full, f"the full {bits}-bit range (--bit-depth full)"
    return 0, (1 << policy) - 1, f"--bit-depth {policy}"


def scale_range(values: np.ndarray, lo: float, hi: float, what: str, notes: list[str]) -> np.ndarray:
    """Values over [lo, hi] -> uint8 0..255, rounded; values outside are clipped, counted in a note naming `what`."""
    above, below = int((values > hi).sum()), int((values < lo).sum())
    if above:
        notes.append(f"{above} pixel{'s' * (above != 1)} above {hi:g}, the top of {what}, clipped to white")
    if below:
        notes.append(f"{below} pixel{'s' * (below != 1)} below {lo:g}, the bottom of {what}, clipped to black")
    return scale_to_uint8((values.astype(np.float64) - lo) * (255.0 / (hi - lo)), 8)


def pil_to_grey(image: Image.Image, levels: tuple[float, float] | None = None) -> np.ndarray:
    """Every PIL mode -> uint8 HxW. Colour uses ITU-R 601 luma; alpha composites over black (X-ray background).
    Integer modes of more than 8 bits (I;16*, I) scale `levels` (lo, hi) to 0..255, by default the container's full
    range; `read_image` passes the range from `sample_range`."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit PNG/TIFF) and I (32-bit int)
        lo, hi = levels or (0, (1 << container_bits(image)) - 1)
        return scale_range(np.asarray(image).astype(np.int64), lo, hi, "the range", [])
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


def check_single_page(image: Image.Image) -> None:
    """Raises ImageError for a file of several pages or frames (multi-page TIFF, animated PNG): prep packs one image
    per file, as for multi-frame DICOM, rather than keep page 1 and drop the rest unsaid."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        what = "pages" if image.format == "TIFF" else "frames"
        raise ImageError(
            f"{image.format} with {frames} {what}; prep packs single-page images (save each page as its own file)"
        )


def _read_raster(path: Path, max_pixels: int, bit_depth: str | int) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    try:
        # From a file object, not a name: Pillow's memory-mapped path (names only) loses the orientation of
        # uncompressed TIFFs (Pillow 13 applies it at load, wrongly there).
        with open(path, "rb") as f, _own_pixel_limit():
            image = Image.open(f)  # lazy: the header only
            check_pixel_count(*image.size, max_pixels)
            check_single_page(image)
            image.load()
            deep = image.mode.startswith("I")
            if deep:  # the declared range, from the tags as stored, before the orientation is applied
                lo, hi, what = sample_range(image, f, bit_depth, notes)
            ImageOps.exif_transpose(image, in_place=True)  # EXIF Orientation (JPEG, TIFF, PNG, WebP): stored upright
            if not deep:
                return pil_to_grey(image), notes
            return scale_range(np.asarray(image).astype(np.int64), lo, hi, what, notes), notes
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncated" in text or "broken" in text.lower():
            raise ImageError(f"truncated or corrupt image ({text})") from None
        raise ImageError(f"unreadable image ({text})") from None


def read_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, bit_depth: str | int = DEFAULT_BIT_DEPTH
) -> tuple[np.ndarray, list[str]]:
    """One file -> (uint8 HxW grey, notes for the manifest). DICOM by suffix (.dcm, .dicom) or content, else Pillow.
    `bit_depth` ("full" or 8..16) scales raster files of more than 8 bits that declare no depth of their own (DICOM
    always declares Bits Stored). Raises ImageError with the skip reason."""
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
    return _read_raster(path, max_pixels, bit_depth)


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side -> `size` with area interpolation, aspect kept; never upsamples."""
    h, w = image.shape
    short = min(h, w)
    if short <= size:
        return image
    scale = size / short
    new_h, new_w = (size, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), size)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def convert_file(
    path: str | Path,
    size: int,
    encoding: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    bit_depth: str | int = DEFAULT_BIT_DEPTH,
) -> Converted:
    """Read, make grey, resize and encode one file. Raises ImageError with the skip reason."""
    grey, notes = read_image(path, max_pixels, bit_depth)
    image = resize_short_side(grey, size)
    height, width = image.shape
    if max(height, width) > MAX_SIDE[encoding]:
        raise ImageError(
            f"{width} x {height} after resizing: a side above {MAX_SIDE[encoding]} px cannot be stored as {encoding}"
        )
    return Converted(encode_image(image, encoding), height, width, notes)
