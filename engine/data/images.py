"""Safe image probing, decoding and letterboxing for untrusted pools.

Every function here treats image files as hostile input:

* the pixel count announced in the header is checked against ``max_pixels`` by our own
  header parsers (PNG, JPEG, BMP, GIF, TIFF) *before* Pillow sees the file, so PIL's
  global ``MAX_IMAGE_PIXELS`` is never what protects a run;
* a JPEG without an end-of-image marker (or a PNG without ``IEND``) is reported as
  truncated from the header stage already, cheaply (tail read, rarely a scan);
* decoding never enables ``ImageFile.LOAD_TRUNCATED_IMAGES``; a short file is an error;
* every failure is an :class:`ImageError` whose message is a short human reason, which
  callers store in ``rejects.parquet`` or in the ``error`` column of a batch.

Geometry follows the EXIF ``Orientation`` tag: :func:`probe` reports the displayed size
and :func:`decode` returns displayed pixels, and :func:`orient_boxes` maps boxes given in
the stored (raw) frame to the displayed frame.
"""
from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image cannot be used; ``str(e)`` is a short human reason ("0-byte file")."""


class HeaderInfo(NamedTuple):
    """What the header says about a file, before any pixel is decoded.

    Attributes:
        width: stored (raw) width in pixels, before EXIF orientation.
        height: stored (raw) height in pixels.
        format: Pillow format name ("JPEG", "PNG", ...).
        orientation: EXIF orientation 1..8 (1 = as stored).
    """

    width: int
    height: int
    format: str
    orientation: int

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) as displayed, i.e. swapped for orientations 5..8."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


_TAIL_SCAN_CHUNK = 1 << 20
_MAX_JPEG_GARBAGE = 1 << 16
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# EXIF orientation -> the Pillow transpose that shows the image upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# --------------------------------------------------------------------------- headers
def _jpeg_header(f) -> tuple[int, int, int] | None:
    """Walk JPEG markers up to the first SOS.

    Returns:
        (width, height, sos_offset); width/height are 0 when no SOF was seen before SOS
        (the caller lets Pillow decide); None when the marker stream ends early.
    """
    f.seek(2)
    width = height = 0
    garbage = 0
    while True:
        b = f.read(1)
        if not b:
            return None
        if b != b"\xff":
            garbage += 1  # tolerate a little garbage between segments, as decoders do
            if garbage > _MAX_JPEG_GARBAGE:
                raise ImageError("corrupt JPEG (no marker where one should be)")
            continue
        m = f.read(1)
        while m == b"\xff":  # fill bytes
            m = f.read(1)
        if not m:
            return None
        marker = m[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7 or marker == 0x00:
            continue  # standalone markers carry no length
        if marker == 0xD9:
            return None  # EOI before any image data
        raw = f.read(2)
        if len(raw) < 2:
            return None
        seg_len = struct.unpack(">H", raw)[0]
        if seg_len < 2:
            return None
        if marker == 0xDA:
            return width, height, f.tell()
        if marker in _JPEG_SOF and seg_len >= 7:
            body = f.read(5)
            if len(body) < 5:
                return None
            height, width = struct.unpack(">xHH", body)
            f.seek(seg_len - 2 - 5, os.SEEK_CUR)
        else:
            f.seek(seg_len - 2, os.SEEK_CUR)


def _tiff_header(f, head: bytes) -> tuple[int, int] | None:
    """Width and height from the first IFD of a classic (not Big) TIFF."""
    endian = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", head[4:8])
    f.seek(ifd)
    raw = f.read(2)
    if len(raw) < 2:
        return None
    (n,) = struct.unpack(endian + "H", raw)
    entries = f.read(12 * min(n, 4096))
    width = height = None
    for i in range(len(entries) // 12):
        tag, typ, count = struct.unpack(endian + "HHI", entries[12 * i: 12 * i + 8])
        val = entries[12 * i + 8: 12 * i + 12]
        if tag not in (256, 257) or count != 1:
            continue
        if typ == 3:
            v = struct.unpack(endian + "H", val[:2])[0]
        elif typ == 4:
            v = struct.unpack(endian + "I", val)[0]
        else:
            continue
        if tag == 256:
            width = v
        else:
            height = v
    if width is None or height is None:
        return None
    return width, height


def _ends_with(f, size: int, marker: bytes, pad: bytes = b"\x00\r\n\t ") -> bool:
    """Whether the file ends with `marker`, ignoring a little trailing padding."""
    n = min(size, 64)
    f.seek(size - n)
    return f.read(n).rstrip(pad).endswith(marker)


def _contains_after(f, start: int, needle: bytes) -> bool:
    """Whether `needle` occurs in the file at or after byte `start` (chunked scan)."""
    f.seek(start)
    prev = b""
    while True:
        chunk = f.read(_TAIL_SCAN_CHUNK)
        if not chunk:
            return False
        if needle in prev[-(len(needle) - 1):] + chunk:
            return True
        prev = chunk


def _raw_header(f, size: int) -> tuple[str, int, int] | None:
    """Format, width, height from our own parsers; None for formats we leave to Pillow.

    Raises:
        ImageError: a recognised format that is visibly truncated.
    """
    f.seek(0)
    head = f.read(32)
    if head.startswith(_PNG_SIG):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ImageError("truncated PNG (no IHDR chunk)")
        w, h = struct.unpack(">II", head[16:24])
        if not _ends_with(f, size, _PNG_IEND) and not _contains_after(f, 8, b"IEND"):
            raise ImageError("truncated PNG (no IEND chunk)")
        return "PNG", w, h
    if head.startswith(b"\xff\xd8"):
        info = _jpeg_header(f)
        if info is None:
            raise ImageError("truncated JPEG (header ends before the image data)")
        w, h, sos = info
        if not _ends_with(f, size, b"\xff\xd9") and not _contains_after(f, sos, b"\xff\xd9"):
            raise ImageError("truncated JPEG (no end-of-image marker)")
        if w == 0 or h == 0:
            return None  # height defined later by a DNL marker: let Pillow report it
        return "JPEG", w, h
    if head.startswith(b"BM") and len(head) >= 26:
        (hdr,) = struct.unpack("<I", head[14:18])
        if hdr == 12:
            w, h = struct.unpack("<HH", head[18:22])
        else:
            w, h = struct.unpack("<ii", head[18:26])
        return "BMP", abs(w), abs(h)
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        w, h = struct.unpack("<HH", head[6:10])
        return "GIF", w, h
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        wh = _tiff_header(f, head)
        if wh is not None:
            return "TIFF", wh[0], wh[1]
    return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    n = int(width) * int(height)
    if n > max_pixels:
        raise ImageError(f"decompression bomb: {width}x{height} = {n} px > max_pixels {max_pixels}")
    if width <= 0 or height <= 0:
        raise ImageError(f"empty image: header size {width}x{height}")


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 read without decoding pixels (1 when absent or broken)."""
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")  # only an eXIf chunk before IDAT: no pixel decode
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw if raw.startswith(b"Exif") else b"Exif\x00\x00" + raw)
        else:
            exif = im.getexif()
        o = int(exif.get(0x0112, 1))
    except Exception:  # a broken EXIF block must not reject an otherwise good image
        return 1
    return o if 1 <= o <= 8 else 1


def _open(f, path: Path, max_pixels: int) -> tuple[Image.Image, HeaderInfo]:
    """Check the header ourselves, then let Pillow open (lazily, no pixel decode)."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise ImageError("0-byte file")
    own = _raw_header(f, size)
    if own is not None:
        _check_pixels(own[1], own[2], max_pixels)
    f.seek(0)
    try:
        im = Image.open(f)
    except UnidentifiedImageError:
        raise ImageError("not an image (cannot identify)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise ImageError(f"unreadable image header ({type(e).__name__}: {e})") from None
    w, h = im.size
    _check_pixels(w, h, max_pixels)  # formats without our own parser, and a cross-check
    return im, HeaderInfo(w, h, str(im.format or (own[0] if own else "?")), _orientation(im))


@contextlib.contextmanager
def _reading(path: Path):
    """Open a file for reading; OS errors become ImageError with a plain reason."""
    try:
        with open(path, "rb") as f:
            yield f
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except PermissionError:
        raise ImageError("permission denied") from None


def header(path: str | Path, max_pixels: int) -> HeaderInfo:
    """Raw size, format and EXIF orientation, without decoding pixels.

    Args:
        path: image file.
        max_pixels: the largest width*height accepted.

    Returns:
        HeaderInfo (raw width/height, format, orientation).

    Raises:
        ImageError: missing, empty, truncated, unidentifiable or too large.
    """
    path = Path(path)
    with _reading(path) as f:
        im, info = _open(f, path, max_pixels)
        im.close()
        return info


def probe(path: str | Path, max_pixels: int) -> tuple[int, int]:
    """Displayed (width, height) of an image from its header only.

    Args:
        path: image file.
        max_pixels: the largest width*height accepted (checked before Pillow opens it).

    Returns:
        (width, height) after EXIF orientation (swapped for 90/270 degree rotations).

    Raises:
        ImageError: with a human reason ("0-byte file", "truncated JPEG ...",
            "not an image (cannot identify)", "decompression bomb: ...").
    """
    return header(path, max_pixels).oriented_size


# --------------------------------------------------------------------------- decoding
def _to_rgb(im: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> (H, W, 3) uint8 RGB."""
    mode = im.mode
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint16)
        g = (a >> 8).astype(np.uint8)
    elif mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            g = (a >> 8).astype(np.uint8)  # 16-bit data stored in 32-bit ints
        else:
            g = _minmax_u8(a.astype(np.float64))
    elif mode == "F":
        g = _minmax_u8(np.asarray(im, dtype=np.float64))
    else:
        try:
            rgb = im.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"unsupported image mode {mode!r} ({e})") from None
        return np.asarray(rgb, dtype=np.uint8).reshape(rgb.height, rgb.width, 3)
    return np.repeat(g[:, :, None], 3, axis=2)


def _minmax_u8(a: np.ndarray) -> np.ndarray:
    """Scale the finite range of `a` (H, W) to 0..255 uint8 (NaN -> 0)."""
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    out = np.zeros(a.shape, np.float64)
    if hi > lo:
        out[finite] = (a[finite] - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def decode(path: str | Path, max_pixels: int) -> np.ndarray:
    """Decode an image to displayed RGB pixels.

    Args:
        path: image file.
        max_pixels: the largest width*height accepted; checked on the header before any
            pixel is decoded.

    Returns:
        (H, W, 3) uint8 RGB, EXIF-transposed. CMYK, L, LA, P, RGBA, 1 are converted to
        RGB; 16-bit data (I;16*, I with values <= 65535, 16-bit PNG) is scaled by 1/256;
        32-bit integer data beyond 16 bits and float data are min-max scaled.

    Raises:
        ImageError: bad file (see :func:`probe`), truncated data, or an undecodable mode.
    """
    path = Path(path)
    with _reading(path) as f:
        im, info = _open(f, path, max_pixels)
        with im:
            try:
                im.load()
            except OSError as e:
                msg = str(e)
                if "truncated" in msg:
                    raise ImageError(f"truncated {info.format}") from None
                if "broken data stream" in msg:
                    raise ImageError(f"corrupt {info.format} data (broken data stream)") from None
                raise ImageError(f"cannot decode {info.format}: {msg}") from None
            except (SyntaxError, ValueError, struct.error, EOFError, IndexError) as e:
                raise ImageError(f"cannot decode {info.format}: {type(e).__name__}: {e}") from None
            except Image.DecompressionBombError as e:
                raise ImageError(f"decompression bomb: {e}") from None
            rgb = _to_rgb(im)
    t = _TRANSPOSE.get(info.orientation)
    if t is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(t))
    return np.ascontiguousarray(rgb)


def orient_boxes(boxes: np.ndarray, orientation: int, raw_width: int, raw_height: int) -> np.ndarray:
    """Map boxes from the stored (raw) pixel frame to the EXIF-displayed frame.

    Args:
        boxes: (N, 4) x1, y1, x2, y2 in raw pixel coordinates.
        orientation: EXIF orientation 1..8.
        raw_width: stored image width W.
        raw_height: stored image height H.

    Returns:
        (N, 4) float64 x1, y1, x2, y2 in the displayed frame (x1 <= x2, y1 <= y2 when the
        input boxes were ordered).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    W, H = float(raw_width), float(raw_height)
    if orientation == 2:
        out = (W - x2, y1, W - x1, y2)
    elif orientation == 3:
        out = (W - x2, H - y2, W - x1, H - y1)
    elif orientation == 4:
        out = (x1, H - y2, x2, H - y1)
    elif orientation == 5:  # transpose: (x, y) -> (y, x)
        out = (y1, x1, y2, x2)
    elif orientation == 6:  # 90 deg clockwise: (x, y) -> (H - y, x)
        out = (H - y2, x1, H - y1, x2)
    elif orientation == 7:  # transverse: (x, y) -> (H - y, W - x)
        out = (H - y2, W - x2, H - y1, W - x1)
    elif orientation == 8:  # 90 deg counter-clockwise: (x, y) -> (y, W - x)
        out = (y1, W - x2, y2, W - x1)
    else:
        out = (x1, y1, x2, y2)
    return np.stack(out, axis=1) if len(b) else b.copy()


# --------------------------------------------------------------------------- batching
def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio and paste top-left on a black square canvas.

    Args:
        img: (H, W, 3) uint8 image with H, W >= 1.
        size: canvas side S.

    Returns:
        (canvas, scale): canvas (S, S, 3) uint8 with the resized image in
        [:round(H*scale), :round(W*scale)] and zeros elsewhere; scale = S / max(H, W),
        so a box in the image maps to the canvas by multiplying by scale.

    Raises:
        ValueError: empty image or non-positive size.
    """
    if size <= 0:
        raise ValueError(f"letterbox size must be positive, got {size}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"letterbox expects a non-empty (H, W, 3) image, got {img.shape}")
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nw = min(size, max(1, int(round(w * scale))))
    nh = min(size, max(1, int(round(h * scale))))
    src = np.ascontiguousarray(img, dtype=np.uint8)
    if (nw, nh) != (w, h):
        src = np.asarray(Image.fromarray(src).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:nh, :nw] = src
    return canvas, float(scale)


def load_batch(uris: Sequence[str], size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Decode and letterbox a batch; a bad file becomes an error row, never an exception.

    Args:
        uris: N image paths.
        size: canvas side S.
        max_pixels: decompression-bomb limit per image.

    Returns:
        {"image": (N, S, S, 3) uint8, "scale": (N,) float32 (0 for bad images),
        "content_w": (N,) int32 and "content_h": (N,) int32 (the resized image extent on
        the canvas, 0 for bad images), "error": (N,) object (None or a reason string)}.
    """
    n = len(uris)
    images = np.zeros((n, size, size, 3), np.uint8)
    scales = np.zeros(n, np.float32)
    cw = np.zeros(n, np.int32)
    ch = np.zeros(n, np.int32)
    errors = np.empty(n, dtype=object)
    for i, uri in enumerate(uris):
        try:
            rgb = decode(uri, max_pixels)
            canvas, scale = letterbox(rgb, size)
        except ImageError as e:
            errors[i] = str(e)
            continue
        except MemoryError:
            errors[i] = "out of memory while decoding"
            continue
        except Exception as e:  # any decoder bug on hostile input is a bad image, not a crash
            errors[i] = f"cannot decode ({type(e).__name__}: {e})"
            continue
        h, w = rgb.shape[:2]
        images[i] = canvas
        scales[i] = scale
        cw[i] = min(size, max(1, int(round(w * scale))))  # as letterbox pasted it
        ch[i] = min(size, max(1, int(round(h * scale))))
    return {"image": images, "scale": scales, "content_w": cw, "content_h": ch, "error": errors}


__all__ = ["ImageError", "HeaderInfo", "header", "probe", "decode", "orient_boxes", "letterbox", "load_batch"]
