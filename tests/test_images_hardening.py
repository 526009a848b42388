"""engine.images against hostile pools: special files, symlink escapes, files changed
after init, formats outside the allow-list, huge sparse files and corrupt pixel data."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, features
from poolscout.engine.data.images import ImageError, decode, header, load_batch, probe

from tests.conftest_data import pattern, write_jpeg, write_png

MAXP = 64_000_000
ALLOWED = "(JPEG, PNG, BMP, TIFF, WebP)"


def _in_thread(fn, *args, timeout: float = 5.0, **kwargs):
    """Run fn in a daemon thread; (still_running, {"value"|"error": ...})."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return t.is_alive(), box


def _unblock_fifo(path) -> None:
    """Let a reader stuck in open() on a FIFO go (it then reads EOF)."""
    for _ in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
            continue
        os.close(fd)
        return


def _expect_refused(fn, path, reason: str, **kwargs) -> None:
    hung, box = _in_thread(fn, path, MAXP, **kwargs)
    if hung:
        _unblock_fifo(path)
        pytest.fail(f"{fn.__name__}({path}) blocked on a special file")
    assert isinstance(box.get("error"), ImageError), box
    assert str(box["error"]) == reason


# ------------------------------------------------------------------ (1) special files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_named_png_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    for fn in (header, probe, decode):
        _expect_refused(fn, fifo, "not a regular file (fifo)")
    hung, box = _in_thread(load_batch, [str(fifo)], 16, MAXP)
    if hung:
        _unblock_fifo(fifo)
        pytest.fail("load_batch blocked on a FIFO")
    assert box["value"]["error"][0] == "not a regular file (fifo)"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_symlink_to_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "x.jpg").symlink_to(tmp_path / "pipe")
    _expect_refused(header, tmp_path / "x.jpg", "not a regular file (fifo)")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")
def test_socket_named_png_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative name: AF_UNIX paths are limited to ~100 bytes
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind("s.png")
        _expect_refused(header, tmp_path / "s.png", "not a regular file (socket)")
        _expect_refused(decode, tmp_path / "s.png", "not a regular file (socket)")
    finally:
        s.close()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_behind_symlink_is_refused(tmp_path):
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    _expect_refused(header, tmp_path / "z.jpg", "not a regular file (character device)")
    _expect_refused(decode, tmp_path / "z.jpg", "not a regular file (character device)")


def test_directory_is_not_a_regular_file(tmp_path):
    (tmp_path / "d.png").mkdir()
    _expect_refused(header, tmp_path / "d.png", "not a regular file (directory)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_file_swapped_for_fifo_between_check_and_open(tmp_path, monkeypatch):
    """The type is checked again on the open descriptor, and opening never blocks."""
    p = write_png(tmp_path / "x.png", w=8, h=8)
    real_stat = os.stat
    swapped = []

    def stat_then_swap(path, *a, **k):
        st = real_stat(path, *a, **k)
        if not swapped and os.fspath(path) == os.fspath(p):
            swapped.append(True)
            os.remove(p)
            os.mkfifo(p)
        return st

    monkeypatch.setattr(os, "stat", stat_then_swap)
    _expect_refused(decode, p, "not a regular file (fifo)")
    assert swapped


# ------------------------------------------------------------------ (8) changed after init
def _outside_png(tmp_path, w=12, h=10):
    return write_png(tmp_path / "outside" / "secret.png", w=w, h=h)


def test_symlink_swapped_in_after_init_escapes_root(tmp_path):
    root = tmp_path / "images"
    p = write_png(root / "a.png", w=12, h=10)
    assert decode(p, MAXP, root=root).shape == (10, 12, 3)
    secret = _outside_png(tmp_path)
    p.unlink()
    p.symlink_to(secret)
    with pytest.raises(ImageError, match="^path escapes images root$"):
        decode(p, MAXP, root=root)
    out = load_batch([str(p)], 16, MAXP, root=root)
    assert out["error"][0] == "path escapes images root"
    assert out["image"][0].max() == 0
    # without root the old behaviour (follow the link) is unchanged
    assert decode(p, MAXP).shape == (10, 12, 3)


def test_dotdot_path_escapes_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _outside_png(tmp_path)
    with pytest.raises(ImageError, match="^path escapes images root$"):
        decode(root / ".." / "outside" / "secret.png", MAXP, root=root)
    with pytest.raises(ImageError, match="^path escapes images root$"):
        header(root / ".." / "outside" / "secret.png", MAXP, root=root)


def test_symlinks_inside_root_and_symlinked_root_are_fine(tmp_path):
    real_root = tmp_path / "real"
    p = write_png(real_root / "sub" / "a.png", w=6, h=4)
    (real_root / "b.png").symlink_to(p)
    link_root = tmp_path / "link"
    link_root.symlink_to(real_root)
    assert decode(real_root / "b.png", MAXP, root=real_root).shape == (4, 6, 3)
    assert decode(link_root / "sub" / "a.png", MAXP, root=link_root).shape == (4, 6, 3)
    assert decode(str(link_root / "b.png"), MAXP, root=str(real_root)).shape == (4, 6, 3)
    # a sibling folder whose name merely starts with the root's name is outside
    write_png(tmp_path / "real2" / "c.png", w=6, h=4)
    with pytest.raises(ImageError, match="escapes"):
        decode(tmp_path / "real2" / "c.png", MAXP, root=real_root)


def test_file_replaced_by_one_of_another_size(tmp_path):
    p = write_png(tmp_path / "a.png", w=32, h=24)
    assert decode(p, MAXP, expect=(32, 24)).shape == (24, 32, 3)
    write_png(p, w=40, h=30)
    with pytest.raises(ImageError) as e:
        decode(p, MAXP, expect=(32, 24))
    assert str(e.value) == "image changed since init: 40x30, manifest says 32x24"


def test_expect_is_the_displayed_size(tmp_path):
    p = write_jpeg(tmp_path / "r.jpg", w=32, h=24, exif_orientation=6)
    assert decode(p, MAXP, expect=(24, 32)).shape == (32, 24, 3)
    with pytest.raises(ImageError, match=r"^image changed since init: 24x32, manifest says 32x24$"):
        decode(p, MAXP, expect=(32, 24))


def test_load_batch_expect_per_image(tmp_path):
    a = write_png(tmp_path / "a.png", w=20, h=10)
    b = write_png(tmp_path / "b.png", w=20, h=10)
    c = write_png(tmp_path / "c.png", w=8, h=8)
    write_png(b, w=10, h=20)  # changed after init
    uris = [str(a), str(b), str(c)]
    out = load_batch(uris, 16, MAXP, expect=[(20, 10), (20, 10), None])
    assert list(out["error"]) == [None, "image changed since init: 10x20, manifest says 20x10", None]
    assert out["scale"][1] == 0 and out["image"][1].max() == 0
    assert out["scale"][0] > 0 and out["scale"][2] > 0
    arr = np.array([[20, 10], [10, 20], [8, 8]], np.int32)  # manifest columns as an array
    assert all(e is None for e in load_batch(uris, 16, MAXP, expect=arr)["error"])
    with pytest.raises(ValueError, match="expect"):
        load_batch(uris, 16, MAXP, expect=[(20, 10)])


# ------------------------------------------------------------------ (9) format allow-list
_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
        b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture
def no_subprocess(monkeypatch):
    """Record (and refuse) every attempt to start an external program."""
    calls: list = []

    def refuse(*a, **k):
        calls.append(a[:1])
        raise OSError("external programs are not allowed in this test")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(os, "system", refuse)
    return calls


def test_eps_named_png_is_refused_and_never_runs_ghostscript(tmp_path, no_subprocess):
    p = tmp_path / "evil.png"
    p.write_bytes(_EPS)
    reason = f"format EPS is not allowed {ALLOWED}"
    for fn in (header, probe, decode):
        with pytest.raises(ImageError) as e:
            fn(p, MAXP)
        assert str(e.value) == reason
    assert load_batch([str(p)], 16, MAXP)["error"][0] == reason
    assert no_subprocess == []


def test_pillow_ghostscript_is_disabled(tmp_path, no_subprocess):
    """Even a direct Pillow load of an EPS (outside this module) starts no program."""
    p = tmp_path / "x.eps"
    p.write_bytes(_EPS)
    with pytest.raises(OSError):
        Image.open(p).load()
    assert no_subprocess == []


def test_gif_named_png_is_refused(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(pattern(7, 13)).save(p, "GIF")
    with pytest.raises(ImageError) as e:
        header(p, MAXP)
    assert str(e.value) == f"format GIF is not allowed {ALLOWED}"
    with pytest.raises(ImageError, match="^format GIF is not allowed"):
        decode(p, MAXP)


@pytest.mark.parametrize("fmt,ext", [("PPM", "jpg"), ("TGA", "png"), ("ICO", "bmp"), ("PCX", "tif")])
def test_other_pillow_formats_behind_image_extensions_are_refused(tmp_path, fmt, ext):
    p = tmp_path / f"x.{ext}"
    buf = io.BytesIO()
    Image.fromarray(pattern(16, 16)).save(buf, fmt)
    p.write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match="is not allowed|not an image"):
        header(p, MAXP)
    with pytest.raises(ImageError, match="is not allowed|not an image"):
        decode(p, MAXP)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_is_allowed_and_bomb_checked_before_pillow(tmp_path):
    p = tmp_path / "w.webp"
    Image.fromarray(pattern(10, 14)).save(p, "WEBP", lossless=True)
    info = header(p, MAXP)
    assert (info.width, info.height, info.format) == (14, 10, "WEBP")
    assert decode(p, MAXP).shape == (10, 14, 3)
    with pytest.raises(ImageError, match=r"^decompression bomb: 14x10 = 140 px > max_pixels 139$"):
        header(p, 139)
    q = tmp_path / "l.webp"
    Image.fromarray(pattern(10, 14)).save(q, "WEBP", quality=80)
    assert decode(q, MAXP).shape == (10, 14, 3)


def test_mpo_camera_file_counts_as_jpeg(tmp_path):
    p = tmp_path / "stereo.jpg"
    a, b = Image.fromarray(pattern(12, 16, 1)), Image.fromarray(pattern(12, 16, 2))
    a.save(p, "MPO", save_all=True, append_images=[b])
    assert Image.open(p).format == "MPO"
    assert header(p, MAXP).format in ("JPEG", "MPO")
    assert decode(p, MAXP).shape == (12, 16, 3)


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif")])
def test_allowed_formats_still_decode(tmp_path, fmt, ext):
    p = tmp_path / f"ok.{ext}"
    Image.fromarray(pattern(9, 11)).save(p, fmt)
    assert header(p, MAXP).format == fmt
    assert decode(p, MAXP).shape == (9, 11, 3)


# ------------------------------------------------------------------ (16) bounded work per file
def _jpeg_head_bytes() -> bytes:
    """A real JPEG cut shortly after its start-of-scan header."""
    buf = io.BytesIO()
    Image.fromarray(pattern(48, 64)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: data.index(b"\xff\xda") + 200]


def _sparse(path, head: bytes, size: int = 2 * 1024**3):
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _timed_reject(path):
    t0 = time.process_time()
    w0 = time.monotonic()
    with pytest.raises(ImageError) as e:
        header(path, MAXP)
    return str(e.value), time.process_time() - t0, time.monotonic() - w0


def test_sparse_2gb_jpeg_is_rejected_quickly(tmp_path):
    p = _sparse(tmp_path / "huge.jpg", _jpeg_head_bytes())
    try:
        reason, cpu, wall = _timed_reject(p)
    finally:
        p.unlink()
    assert reason.startswith("truncated JPEG"), reason
    assert cpu < 2.0 and wall < 10.0, (cpu, wall)


def test_sparse_2gb_png_is_rejected_quickly(tmp_path):
    data = write_png(tmp_path / "g.png", w=64, h=48).read_bytes()
    p = _sparse(tmp_path / "huge.png", data[: data.index(b"IDAT") + 100])
    try:
        reason, cpu, wall = _timed_reject(p)
    finally:
        p.unlink()
    assert reason.startswith("truncated PNG"), reason
    assert cpu < 2.0 and wall < 10.0, (cpu, wall)


@pytest.mark.parametrize("filler", [b"\xff", b"\xff\x01", b"\xff\xe1\x00\x02"])
def test_jpeg_marker_walk_is_bounded(tmp_path, filler):
    """Fill bytes, standalone markers or empty segments repeated over megabytes."""
    p = tmp_path / "f.jpg"
    p.write_bytes(b"\xff\xd8" + filler * (12_000_000 // len(filler)))
    reason, cpu, _ = _timed_reject(p)
    assert reason.startswith(("corrupt JPEG", "truncated JPEG")), reason
    assert cpu < 1.0, cpu


def test_motion_photo_trailer_still_found_within_bound(tmp_path):
    """A JPEG followed by megabytes of video: EOI found by the bounded forward scan."""
    p = write_jpeg(tmp_path / "m.jpg", w=64, h=48)
    p.write_bytes(p.read_bytes() + b"ftypmp42" + os.urandom(3_000_000).replace(b"\xff", b"\x00"))
    assert probe(p, MAXP) == (64, 48)
    assert decode(p, MAXP).shape == (48, 64, 3)


# ------------------------------------------------------------------ (7) corrupt pixel data
def _corrupt_png(tmp_path, seed: int):
    data = bytearray(write_png(tmp_path / "g.png", w=64, h=48).read_bytes())
    start = data.index(b"IDAT") + 4
    rng = np.random.default_rng(seed)
    for i in rng.integers(start + 2, start + 300, size=6):
        data[i] ^= int(rng.integers(1, 256))
    p = tmp_path / f"c{seed}.png"
    p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("seed", range(12))
def test_corrupt_idat_is_a_corrupt_data_image_error(tmp_path, seed):
    p = _corrupt_png(tmp_path, seed)
    assert probe(p, MAXP) == (64, 48)  # the header is fine
    try:
        decode(p, MAXP)
    except ImageError as e:
        assert str(e).startswith(("corrupt PNG data (", "truncated PNG")), str(e)
    err = load_batch([str(p)], 16, MAXP)["error"][0]
    assert err is None or err.startswith(("corrupt PNG data (", "truncated PNG")), err


@pytest.mark.parametrize("exc", [zlib.error("Error -3 while decompressing data: invalid distance"),
                                 SyntaxError("broken PNG file"), ValueError("bad"), KeyError("mode"),
                                 RuntimeError("decoder bug"), OSError("decoder error -2")])
def test_any_load_failure_becomes_image_error(tmp_path, monkeypatch, exc):
    p = write_png(tmp_path / "a.png", w=8, h=8)

    def fail(self, *a, **k):
        raise exc

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail)
    with pytest.raises(ImageError) as e:
        decode(p, MAXP)
    assert str(e.value).startswith("corrupt PNG data (")
    assert load_batch([str(p)], 8, MAXP)["error"][0] == str(e.value)


def test_out_of_memory_while_decoding_is_an_image_error(tmp_path, monkeypatch):
    p = write_png(tmp_path / "a.png", w=8, h=8)

    def fail(self, *a, **k):
        raise MemoryError()

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail)
    with pytest.raises(ImageError, match="^out of memory while decoding$"):
        decode(p, MAXP)


# ------------------------------------------------------------------ one open per call
@pytest.mark.parametrize("fn", [header, decode])
def test_file_opened_once_per_call(tmp_path, monkeypatch, fn):
    p = write_png(tmp_path / "a.png", w=8, h=8)
    opened: list = []
    real_open = os.open

    def counting_open(path, *a, **k):
        opened.append(os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", counting_open)
    fn(p, MAXP, root=tmp_path)
    assert opened.count(os.fspath(p)) == 1
