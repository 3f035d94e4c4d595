"""Convert chest X-ray collections into twinray's packed format (see docs/format.md)."""
