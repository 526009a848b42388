"""Safe image probing, decoding and letterboxing for untrusted pools.

Every function here treats image files as hostile input:

* only regular files are read: a FIFO, socket, device or directory is refused before it
  is opened, the file is opened non-blocking (so a file swapped for a FIFO in between
  cannot hang a worker) and its type is checked again on the open descriptor; each call
  opens the file exactly once;
* only JPEG (and its multi-picture variant MPO), PNG, BMP, TIFF and WebP are accepted,
  whatever the extension says (GIF is refused too); Pillow is never offered
  another plugin, and its Ghostscript hook (EPS) is switched off for the whole process, so
  no external program can be started by an image;
* with ``root=`` the real path of the opened file (after symlinks) must lie inside the
  real path of the images root, and with ``expect=`` the displayed size must still be the
  one recorded at init: files changed after init are not trusted;
* the pixel count announced in the header is checked against ``max_pixels`` by our own
  header parsers (PNG, JPEG, BMP, GIF, TIFF) *before* Pillow sees the file, so PIL's
  global ``MAX_IMAGE_PIXELS`` is never what protects a run;
* a JPEG without an end-of-image marker (or a PNG without ``IEND``) is reported as
  truncated from the header stage already, cheaply: the last 4 KiB are read, and only when
  the marker is not there (data appended after the image) a forward scan of at most
  32 MiB looks for it; the JPEG marker walk and the TIFF tag data are bounded too, so a
  huge (or sparse) file costs no more than a small one;
* decoding never enables ``ImageFile.LOAD_TRUNCATED_IMAGES``; a short file is an error;
* every failure, whatever Pillow raised, is an :class:`ImageError` whose message is a
  short human reason, which callers store in ``rejects.parquet`` or in the ``error``
  column of a batch.

Geometry follows the EXIF ``Orientation`` tag: :func:`probe` reports the displayed size
and :func:`decode` returns displayed pixels, and :func:`orient_boxes` maps boxes given in
the stored (raw) frame to the displayed frame.
"""
from __future__ import annotations

import contextlib
import math
import os
import stat
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


_SCAN_CHUNK = 1 << 20
_TAIL_WINDOW = 4096  # bytes read from the end of a file to find its end marker
_MAX_END_SCAN = 32 << 20  # forward scan for an end marker gives up after this many bytes
_MAX_JPEG_GARBAGE = 1 << 16  # non-marker and fill bytes tolerated before the image data
_MAX_JPEG_MARKERS = 1 << 14  # marker segments walked before the image data
_MAX_TIFF_TAG_DATA = 64 << 20  # out-of-line tag data of the first IFD that Pillow would read
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}
#: Pillow format names accepted whatever the file is called.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
_ALLOWED_TEXT = "JPEG, PNG, BMP, TIFF, WebP"
_SAME_AS = {"MPO": "JPEG"}  # Pillow's JPEG plugin names a multi-picture (camera) JPEG MPO
# Formats accepted only under their own extension (none: the list is the maximum).
_BY_EXTENSION: dict[str, str] = {}
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
    garbage = markers = 0
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
        while m == b"\xff":  # fill bytes: legal, but not megabytes of them
            garbage += 1
            if garbage > _MAX_JPEG_GARBAGE:
                raise ImageError("corrupt JPEG (no marker where one should be)")
            m = f.read(1)
        if not m:
            return None
        markers += 1
        if markers > _MAX_JPEG_MARKERS:
            raise ImageError("corrupt JPEG (too many marker segments before the image data)")
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
    entries = f.read(12 * n)
    width = height = None
    tag_data = 0
    for i in range(len(entries) // 12):
        tag, typ, count = struct.unpack(endian + "HHI", entries[12 * i: 12 * i + 8])
        val = entries[12 * i + 8: 12 * i + 12]
        nbytes = count * _TIFF_UNIT.get(typ, 0)
        if nbytes > 4:  # stored elsewhere in the file; Pillow reads it when it opens the file
            tag_data += nbytes
            if tag_data > _MAX_TIFF_TAG_DATA:
                raise ImageError(f"TIFF header too large (over {_MAX_TIFF_TAG_DATA >> 20} MiB of tag data)")
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


def _in_tail(f, size: int, start: int, needle: bytes) -> bool:
    """Whether `needle` occurs in the last few KiB of the file (at or after byte `start`)."""
    lo = max(start, size - _TAIL_WINDOW)
    if lo >= size:
        return False
    f.seek(lo)
    return needle in f.read(size - lo)


def _scan_for(f, start: int, size: int, needle: bytes) -> bool | None:
    """Whether `needle` occurs at or after byte `start`, reading at most _MAX_END_SCAN bytes.

    Returns:
        True (found), False (not in the file), None (not in the first _MAX_END_SCAN bytes
        of a larger file: gave up).
    """
    end = min(size, start + _MAX_END_SCAN)
    f.seek(start)
    pos, keep = start, b""
    while pos < end:
        chunk = f.read(min(_SCAN_CHUNK, end - pos))
        if not chunk:
            return False
        if needle in keep + chunk:
            return True
        keep = chunk[-(len(needle) - 1):]
        pos += len(chunk)
    return False if end >= size else None


def _require_end(f, size: int, start: int, tail_marker: bytes, marker: bytes, what: str) -> None:
    """Raise "truncated ..." unless the end marker is in the tail or, bounded, after `start`."""
    if _in_tail(f, size, start, tail_marker):
        return
    found = _scan_for(f, start, size, marker)
    if found is None:
        raise ImageError(f"truncated {what} in the first {_MAX_END_SCAN >> 20} MiB of image data)")
    if not found:
        raise ImageError(f"truncated {what})")


def _webp_header(head: bytes, size: int) -> tuple[int, int] | None:
    """Canvas width and height from a WebP's first chunk (VP8, VP8L or VP8X)."""
    (riff,) = struct.unpack("<I", head[4:8])
    if riff + 8 > size + 1:  # one byte of slack for a missing pad byte
        raise ImageError("truncated WebP (file shorter than its RIFF size)")
    kind = head[12:16]
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and head[20] == 0x2F:
        (bits,) = struct.unpack("<I", head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


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
        _require_end(f, size, 8, _PNG_IEND, b"IEND", "PNG (no IEND chunk")
        return "PNG", w, h
    if head.startswith(b"\xff\xd8"):
        info = _jpeg_header(f)
        if info is None:
            raise ImageError("truncated JPEG (header ends before the image data)")
        w, h, sos = info
        _require_end(f, size, sos, b"\xff\xd9", b"\xff\xd9", "JPEG (no end-of-image marker")
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
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        wh = _webp_header(head, size)
        if wh is not None:
            return "WEBP", wh[0], wh[1]
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


# --------------------------------------------------------------------------- formats
def _disable_external_programs() -> None:
    """Make Pillow's EPS plugin believe Ghostscript is absent, so it never runs `gs`.

    Opening is restricted to :data:`ALLOWED_FORMATS` anyway; this is the second lock, and it
    also covers code elsewhere in the process that opens an EPS with Pillow directly.
    """
    try:
        from PIL import EpsImagePlugin
    except Exception:  # noqa: BLE001  # pragma: no cover - a Pillow build without the plugin
        return
    EpsImagePlugin.gs_binary = False
    EpsImagePlugin.gs_windows_binary = False


_disable_external_programs()


def _allowed(path: Path) -> tuple[str, ...]:
    extra = _BY_EXTENSION.get(path.suffix.lower())
    return ALLOWED_FORMATS + ((extra,) if extra else ())


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if _SAME_AS.get(fmt, fmt) not in allowed:
        raise ImageError(f"format {fmt} is not allowed ({_ALLOWED_TEXT})")


def _sniff(prefix: bytes) -> str | None:
    """The Pillow format whose signature check accepts `prefix` (no plugin opens anything)."""
    Image.init()
    for fmt in list(Image.ID):
        entry = Image.OPEN.get(fmt)
        if not entry or entry[1] is None:
            continue
        try:
            hit = entry[1](prefix)
        except Exception:  # noqa: BLE001, S112 - a signature check that fails is no match
            continue
        if hit and not isinstance(hit, str):  # a str is Pillow's "plugin not built" note
            return fmt
    return None


def _open(f, size: int, path: Path, max_pixels: int) -> tuple[Image.Image, HeaderInfo]:
    """Check format and header ourselves, then let Pillow open (lazily, no pixel decode)."""
    if size == 0:
        raise ImageError("0-byte file")
    allowed = _allowed(path)
    try:
        own = _raw_header(f, size)
    except (struct.error, EOFError) as e:
        raise ImageError(f"unreadable image header ({type(e).__name__}: {e})") from None
    if own is not None:
        _check_format(own[0], allowed)
        _check_pixels(own[1], own[2], max_pixels)
    f.seek(0)
    try:
        im = Image.open(f, formats=list(allowed))
    except UnidentifiedImageError:
        f.seek(0)
        fmt = _sniff(f.read(16))
        if fmt is not None:
            _check_format(fmt, allowed)
        raise ImageError("not an image (cannot identify)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except MemoryError:
        raise ImageError("out of memory while reading the header") from None
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error, ... on hostile input
        raise ImageError(f"unreadable image header ({type(e).__name__}: {e})") from None
    try:
        fmt = str(im.format or (own[0] if own else "?"))
        _check_format(fmt, allowed)  # a second lock: Pillow only had allowed plugins to try
        w, h = im.size
        _check_pixels(w, h, max_pixels)  # formats without our own parser, and a cross-check
        return im, HeaderInfo(w, h, fmt, _orientation(im))
    except BaseException:
        im.close()
        raise


# --------------------------------------------------------------------------- opening
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_NOT_REGULAR = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    for test, kind in _NOT_REGULAR:
        if test(mode):
            raise ImageError(f"not a regular file ({kind})")
    raise ImageError("not a regular file (special file)")


def _os_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "not a regular file (directory)"
    return f"cannot open file ({e.strerror or type(e).__name__})"


def _inside(real: str, real_root: str) -> bool:
    try:
        return os.path.commonpath([real, real_root]) == real_root
    except ValueError:  # different drives, or relative vs absolute
        return False


def _check_opened_inside(fd: int, path: Path, st: os.stat_result, real_root: str) -> None:
    """The file behind `fd` (not whatever `path` names now) must lie under `real_root`."""
    real = None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")  # Linux: the path of the open file itself
    except OSError:
        pass
    if real is None or not os.path.isabs(real):
        real = os.path.realpath(path)  # elsewhere: resolve again and insist it is the same file
        try:
            same = os.path.samestat(os.stat(real), st)
        except OSError:
            same = False
        if not same:
            raise ImageError("path escapes images root")
    elif real.endswith(" (deleted)") and not os.path.exists(real):
        real = real[: -len(" (deleted)")]
    if not _inside(real, real_root):
        raise ImageError("path escapes images root")


@contextlib.contextmanager
def _reading(path: Path, root: str | Path | None = None):
    """Open a regular file once, for reading; yields (binary file, size in bytes).

    The type is checked before opening (so a FIFO or device is never opened) and again on
    the open descriptor (a file can be swapped in between; the non-blocking open cannot hang
    on a FIFO). With `root`, the real path is checked before opening and again, on Linux, for
    the file actually opened. OS errors become ImageError with a plain reason.
    """
    real_root = os.path.realpath(root) if root is not None else None
    try:
        if real_root is not None and not _inside(os.path.realpath(path), real_root):
            raise ImageError("path escapes images root")
        _require_regular(os.stat(path).st_mode)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise ImageError(_os_reason(e)) from None
    try:
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ImageError(_os_reason(e)) from None
        _require_regular(st.st_mode)
        with contextlib.suppress(AttributeError, OSError):
            os.set_blocking(fd, True)  # O_NONBLOCK was only for the open itself
        if real_root is not None:
            _check_opened_inside(fd, path, st, real_root)
        try:
            yield f, st.st_size
        except OSError as e:  # a read error (EIO, a file cut on a network share, ...)
            raise ImageError(f"cannot read file ({e.strerror or e})") from None


def header(path: str | Path, max_pixels: int, *, root: str | Path | None = None) -> HeaderInfo:
    """Raw size, format and EXIF orientation, without decoding pixels.

    Args:
        path: image file.
        max_pixels: the largest width*height accepted.
        root: when given, the real path of the file (symlinks resolved) must lie inside the
            real path of `root` ("path escapes images root" otherwise).

    Returns:
        HeaderInfo (raw width/height, format, orientation).

    Raises:
        ImageError: missing, not a regular file, empty, truncated, unidentifiable, a format
            outside JPEG/PNG/BMP/TIFF/WebP, or too large.
    """
    path = Path(path)
    with _reading(path, root) as (f, size):
        im, info = _open(f, size, path, max_pixels)
        im.close()
        return info


def probe(path: str | Path, max_pixels: int, *, root: str | Path | None = None) -> tuple[int, int]:
    """Displayed (width, height) of an image from its header only.

    Args:
        path: image file.
        max_pixels: the largest width*height accepted (checked before Pillow opens it).
        root: as for :func:`header`.

    Returns:
        (width, height) after EXIF orientation (swapped for 90/270 degree rotations).

    Raises:
        ImageError: with a human reason ("0-byte file", "truncated JPEG ...",
            "not an image (cannot identify)", "decompression bomb: ...",
            "not a regular file (fifo)", "format EPS is not allowed (...)").
    """
    return header(path, max_pixels, root=root).oriented_size

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


def _missing(v) -> bool:
    """None, NaN or pandas.NA: a manifest cell without a value."""
    if v is None or type(v).__name__ == "NAType":
        return True
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def _expected_size(expect) -> tuple[int, int] | None:
    """(width, height) from an `expect` value; None when absent or a missing value (NaN, NA)."""
    if _missing(expect):
        return None
    try:
        w, h = expect
    except (TypeError, ValueError):
        raise ValueError(f"expect must be a (width, height) pair or None, got {expect!r}") from None
    if _missing(w) or _missing(h):
        return None
    try:
        return int(w), int(h)
    except (TypeError, ValueError):
        raise ValueError(f"expect must be a (width, height) pair of integers, got {expect!r}") from None


def _check_expected(size: tuple[int, int], want: tuple[int, int] | None) -> None:
    if want is not None and tuple(size) != want:
        raise ImageError(f"image changed since init: {size[0]}x{size[1]}, manifest says {want[0]}x{want[1]}")


def _pixels(im: Image.Image, info: HeaderInfo) -> np.ndarray:
    """Decode, convert to RGB and EXIF-transpose; every failure becomes an ImageError."""
    fmt = info.format
    try:
        im.load()
        rgb = _to_rgb(im)
        t = _TRANSPOSE.get(info.orientation)
        if t is not None:
            rgb = np.asarray(Image.fromarray(rgb).transpose(t))
        return np.ascontiguousarray(rgb)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except OSError as e:  # Pillow's decoders report in OSError with a human message
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise ImageError(f"truncated {fmt} ({msg})") from None
        raise ImageError(f"corrupt {fmt} data ({msg})") from None
    except Exception as e:  # noqa: BLE001 - SyntaxError, ValueError, zlib.error, KeyError, ...
        raise ImageError(f"corrupt {fmt} data ({type(e).__name__}: {e})") from None


def decode(path: str | Path, max_pixels: int, *, root: str | Path | None = None,
           expect: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image to displayed RGB pixels.

    Args:
        path: image file.
        max_pixels: the largest width*height accepted; checked on the header before any
            pixel is decoded.
        root: when given, the real path of the file (symlinks resolved) must lie inside the
            real path of `root`, the images root ("path escapes images root" otherwise).
        expect: when given, the displayed (width, height), after EXIF orientation, that the
            image had at init (the manifest's width/height); a file whose size differs is
            refused ("image changed since init: 640x480, manifest says 320x240"). Checked on
            the header, before pixels are decoded, and again on the result. None (or a
            missing value such as NaN) skips the check.

    Returns:
        (H, W, 3) uint8 RGB, EXIF-transposed. CMYK, L, LA, P, RGBA, 1 are converted to
        RGB; 16-bit data (I;16*, I with values <= 65535, 16-bit PNG) is scaled by 1/256;
        32-bit integer data beyond 16 bits and float data are min-max scaled.

    Raises:
        ImageError: bad file (see :func:`probe`), truncated or corrupt data ("corrupt PNG
            data (...)"), an undecodable mode, or a file changed since init. Never another
            exception type for a bad file.
        ValueError: `expect` is not a pair (a caller bug).
    """
    path = Path(path)
    want = _expected_size(expect)
    with _reading(path, root) as (f, size):
        im, info = _open(f, size, path, max_pixels)
        with im:
            _check_expected(info.oriented_size, want)
            rgb = _pixels(im, info)
    _check_expected((rgb.shape[1], rgb.shape[0]), want)
    return rgb


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


def load_batch(uris: Sequence[str], size: int, max_pixels: int, *, root: str | Path | None = None,
               expect: Sequence[tuple[int, int] | None] | None = None) -> dict[str, np.ndarray]:
    """Decode and letterbox a batch; a bad file becomes an error row, never an exception.

    Args:
        uris: N image paths.
        size: canvas side S.
        max_pixels: decompression-bomb limit per image.
        root: the images root; every file must resolve inside it (see :func:`decode`).
        expect: None, or N entries, one per uri: the displayed (width, height) recorded at
            init (the manifest's width/height), or None to skip that image's check. An
            (N, 2) integer array works too.

    Returns:
        {"image": (N, S, S, 3) uint8, "scale": (N,) float32 (0 for bad images),
        "content_w": (N,) int32 and "content_h": (N,) int32 (the resized image extent on
        the canvas, 0 for bad images), "error": (N,) object (None or a reason string)}.

    Raises:
        ValueError: `expect` does not have one entry per uri, or an entry is not a pair
            (caller bugs, reported for the whole batch).
    """
    n = len(uris)
    if expect is None:
        wants: list[tuple[int, int] | None] = [None] * n
    else:
        if len(expect) != n:
            raise ValueError(f"expect has {len(expect)} entries for {n} uris")
        wants = [_expected_size(e) for e in expect]
    images = np.zeros((n, size, size, 3), np.uint8)
    scales = np.zeros(n, np.float32)
    cw = np.zeros(n, np.int32)
    ch = np.zeros(n, np.int32)
    errors = np.empty(n, dtype=object)
    for i, uri in enumerate(uris):
        try:
            rgb = decode(uri, max_pixels, root=root, expect=wants[i])
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


__all__ = ["ALLOWED_FORMATS", "ImageError", "HeaderInfo", "header", "probe", "decode", "orient_boxes",
           "letterbox", "load_batch"]
