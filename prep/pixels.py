"""What prep/images.py (raster files) and prep/dicom.py (DICOM files) share: the error whose text is a file's skip
reason, the pixel-count guard read from a header, and the scale of integer samples to 8 bits."""

from __future__ import annotations

import numpy as np


class ImageError(Exception):
    """The file cannot become a training image; str(error) is the reason recorded in `skipped`."""


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Raises ImageError naming the size when width x height is above `max_pixels` (read from the header, before
    any pixel is decoded)."""
    if width * height > max_pixels:
        raise ImageError(
            f"{width} x {height} pixels ({width * height / 1e6:g} MP) is above the --max-pixels limit of "
            f"{max_pixels} ({max_pixels / 1e6:g} MP)"
        )


def scale_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
