"""Helpers that write small good and bad image files for the pool/image tests.

Plain functions (not fixtures): import them with ``from tests.conftest_data import ...``.
Every helper writes into the path it is given and returns that path.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic (h, w, 3) uint8 test pattern (gradient + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=2)
    return np.clip(base + rng.integers(-10, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, w: int = 32, h: int = 24, seed: int = 0, exif_orientation: int | None = None,
               quality: int = 90) -> Path:
    """An RGB JPEG, optionally with an EXIF Orientation tag."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pattern(h, w, seed))
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    im.save(path, "JPEG", quality=quality, **kw)
    return path


def write_png(path: Path, w: int = 32, h: int = 24, seed: int = 0, mode: str = "RGB") -> Path:
    """An 8-bit PNG in the given Pillow mode (RGB, L, LA, P, RGBA)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pattern(h, w, seed))
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, "PNG")
    return path


def write_cmyk_jpeg(path: Path, w: int = 20, h: int = 16, cmyk=(0, 255, 255, 0)) -> Path:
    """A CMYK JPEG filled with one CMYK colour (default: pure red ink mix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (w, h), tuple(cmyk)).save(path, "JPEG", quality=95)
    return path


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None) -> bytes:
    """A PNG built by hand: IHDR as given, IDAT = zlib(raw scanlines) (or tiny), IEND.

    Args:
        width, height: what IHDR announces.
        bit_depth: 8 or 16.
        color_type: 0 grey, 2 RGB.
        raw: filtered scanline bytes (filter byte 0 + samples per row); None writes a
            tiny IDAT that does not match the header (for decompression-bomb tests).
    """
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw if raw is not None else b"\x00" * 16)
    return sig + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG from a (H, W) grey or (H, W, 3) RGB uint16 array (big-endian samples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    v = np.asarray(values, dtype=">u2")
    h, w = v.shape[:2]
    ct = 2 if v.ndim == 3 else 0
    rows = v.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))
    path.write_bytes(png_bytes(w, h, 16, ct, raw))
    return path


def write_bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid-looking PNG whose IHDR announces width x height pixels with a tiny body."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(width, height, 8, 2, None))
    return path


def write_truncated_jpeg(path: Path, w: int = 64, h: int = 48, keep: float = 0.5) -> Path:
    """A real JPEG cut after `keep` of its bytes (no end-of-image marker)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(pattern(h, w, 3)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_text_as_image(path: Path, text: str = "hello, I am not a JPEG\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_empty(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def corrupt_png_pixels(src: Path, dst: Path) -> None:
    """A PNG whose header probes fine but whose pixel data cannot be decoded."""
    data = bytearray(src.read_bytes())
    start = data.index(b"IDAT") + 4
    for i in range(start + 2, min(len(data) - 12, start + 400)):
        data[i] ^= 0x5A
    dst.write_bytes(bytes(data))
