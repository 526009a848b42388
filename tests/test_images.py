"""engine.images: probing, decoding, bad files, letterboxing, batches."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from tests.conftest_data import (
    pattern,
    write_bomb_png,
    write_cmyk_jpeg,
    write_empty,
    write_jpeg,
    write_png,
    write_png16,
    write_text_as_image,
    write_truncated_jpeg,
)
from poolscout.engine.data import images
from poolscout.engine.data.images import ImageError, decode, header, letterbox, load_batch, orient_boxes, probe

MAXP = 64_000_000


def test_probe_and_decode_good_jpeg(tmp_path):
    p = write_jpeg(tmp_path / "a.jpg", w=32, h=24)
    assert probe(p, MAXP) == (32, 24)
    img = decode(p, MAXP)
    assert img.shape == (24, 32, 3) and img.dtype == np.uint8
    ref = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(img, ref)


def test_zero_byte_file(tmp_path):
    p = write_empty(tmp_path / "z.jpg")
    with pytest.raises(ImageError, match="^0-byte file$"):
        probe(p, MAXP)
    with pytest.raises(ImageError, match="0-byte"):
        decode(p, MAXP)


def test_truncated_jpeg_rejected_by_probe_and_decode(tmp_path):
    p = write_truncated_jpeg(tmp_path / "t.jpg")
    with pytest.raises(ImageError, match="truncated JPEG"):
        probe(p, MAXP)
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode(p, MAXP)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_inside_header(tmp_path):
    good = write_jpeg(tmp_path / "g.jpg").read_bytes()
    p = tmp_path / "h.jpg"
    p.write_bytes(good[:40])  # cut inside the marker segments
    with pytest.raises(ImageError, match="truncated JPEG"):
        probe(p, MAXP)


def test_jpeg_garbage_header_is_rejected_quickly(tmp_path):
    p = tmp_path / "g.jpg"
    p.write_bytes(b"\xff\xd8" + bytes(300_000))
    with pytest.raises(ImageError, match="corrupt JPEG"):
        probe(p, MAXP)


def test_truncated_png(tmp_path):
    data = write_png(tmp_path / "g.png", w=40, h=30).read_bytes()
    p = tmp_path / "t.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated PNG"):
        probe(p, MAXP)


def test_corrupt_png_data_probes_but_fails_decode(tmp_path):
    """Header and IEND intact, compressed pixels scrambled: init accepts, decode rejects."""
    data = bytearray(write_png(tmp_path / "g.png", w=40, h=30).read_bytes())
    start = data.index(b"IDAT") + 4
    for i in range(start + 2, min(len(data) - 12, start + 400)):
        data[i] ^= 0x5A
    p = tmp_path / "c.png"
    p.write_bytes(bytes(data))
    assert probe(p, MAXP) == (40, 30)
    with pytest.raises(ImageError, match="corrupt PNG data|cannot decode PNG"):
        decode(p, MAXP)
    assert load_batch([str(p)], 16, MAXP)["error"][0].startswith(("corrupt PNG", "cannot decode PNG"))


def test_jpeg_with_trailing_data_after_eoi_is_accepted(tmp_path):
    """Motion photos append data after the JPEG; the EOI is then found by a scan."""
    p = write_jpeg(tmp_path / "m.jpg", w=16, h=16)
    p.write_bytes(p.read_bytes() + b"ftypmp42" + bytes(200))
    assert probe(p, MAXP) == (16, 16)
    assert decode(p, MAXP).shape == (16, 16, 3)


def test_text_named_jpg(tmp_path):
    p = write_text_as_image(tmp_path / "x.jpg")
    with pytest.raises(ImageError, match=r"not an image \(cannot identify\)"):
        probe(p, MAXP)
    with pytest.raises(ImageError, match="not an image"):
        decode(p, MAXP)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        probe(tmp_path / "nope.jpg", MAXP)
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(ImageError, match="directory"):
        decode(tmp_path / "d.jpg", MAXP)


def test_png16_grey_scaled_not_clipped(tmp_path):
    v = (np.arange(6 * 10, dtype=np.uint32).reshape(6, 10) * 1000 + 7).astype(np.uint16)
    p = write_png16(tmp_path / "g16.png", v)
    assert probe(p, MAXP) == (10, 6)
    img = decode(p, MAXP)
    assert img.shape == (6, 10, 3) and img.dtype == np.uint8
    expect = (v >> 8).astype(np.uint8)
    for c in range(3):
        assert np.array_equal(img[:, :, c], expect)
    assert img.max() > 200  # 59007 -> 230: scaled, not clipped to 255 everywhere
    assert len(np.unique(img)) > 10


def test_png16_rgb(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, size=(5, 7, 3)).astype(np.uint16)
    p = write_png16(tmp_path / "rgb16.png", v)
    img = decode(p, MAXP)
    assert np.array_equal(img, (v >> 8).astype(np.uint8))


def test_int32_tiff_beyond_16_bits_is_minmax_scaled(tmp_path):
    a = np.array([[0, 100_000], [200_000, 400_000]], dtype=np.int32)
    p = tmp_path / "i32.tif"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode == "I"
    img = decode(p, MAXP)
    assert img[0, 0, 0] == 0 and img[1, 1, 0] == 255
    assert 50 < img[0, 1, 0] < 80  # 100000/400000*255 ~ 64


def test_cmyk_jpeg_is_converted(tmp_path):
    p = write_cmyk_jpeg(tmp_path / "c.jpg", w=20, h=16, cmyk=(0, 255, 255, 0))
    assert Image.open(p).mode == "CMYK"
    assert probe(p, MAXP) == (20, 16)
    img = decode(p, MAXP)
    assert img.shape == (16, 20, 3)
    r, g, b = img[8, 10].astype(int)
    assert r > 150 and g < 100 and b < 100  # C=0, M=Y=full -> red


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1"])
def test_other_modes_become_rgb(tmp_path, mode):
    p = write_png(tmp_path / f"m_{mode}.png", w=12, h=9, mode=mode)
    img = decode(p, MAXP)
    assert img.shape == (9, 12, 3) and img.dtype == np.uint8
    ref = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(img, ref)


def test_exif_orientation_6_jpeg_swaps_size(tmp_path):
    p = write_jpeg(tmp_path / "r.jpg", w=32, h=24, exif_orientation=6)
    assert header(p, MAXP).orientation == 6
    assert probe(p, MAXP) == (24, 32)
    img = decode(p, MAXP)
    assert img.shape == (32, 24, 3)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    assert np.array_equal(img, ref)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_orientations_match_pillow(tmp_path, orientation):
    im = Image.fromarray(pattern(6, 10, seed=orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "o.png"
    im.save(p, "PNG", exif=exif)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    img = decode(p, MAXP)
    assert np.array_equal(img, ref)
    assert probe(p, MAXP) == (ref.shape[1], ref.shape[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_boxes_matches_pixels(orientation):
    H, W = 20, 30
    raw = np.zeros((H, W), np.uint8)
    x1, y1, x2, y2 = 3, 5, 11, 9  # pixels [x1, x2) x [y1, y2)
    raw[y1:y2, x1:x2] = 255
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(buf)))
    ys, xs = np.nonzero(shown)
    expect = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    got = orient_boxes(np.array([[x1, y1, x2, y2]]), orientation, W, H)
    assert got.shape == (1, 4)
    assert np.allclose(got[0], expect)


def test_orient_boxes_empty():
    assert orient_boxes(np.zeros((0, 4)), 6, 10, 20).shape == (0, 4)


def test_decompression_bomb_rejected_before_pillow(tmp_path, monkeypatch):
    p = write_bomb_png(tmp_path / "bomb.png", 30000, 30000)
    assert p.stat().st_size < 200

    def boom(*a, **k):  # Pillow must not even be asked
        raise AssertionError("Image.open called on a bomb")

    monkeypatch.setattr(images.Image, "open", boom)
    with pytest.raises(ImageError) as e:
        probe(p, 64_000_000)
    assert str(e.value) == "decompression bomb: 30000x30000 = 900000000 px > max_pixels 64000000"
    with pytest.raises(ImageError, match="decompression bomb"):
        decode(p, 64_000_000)


def test_bomb_below_pillow_limit_still_caught(tmp_path):
    """81 Mpx is under PIL's own warning threshold (89 Mpx): only our check stops it."""
    p = write_bomb_png(tmp_path / "b.png", 9000, 9000)
    with pytest.raises(ImageError, match="9000x9000 = 81000000 px > max_pixels 64000000"):
        probe(p, 64_000_000)


def test_max_pixels_boundary(tmp_path):
    p = write_jpeg(tmp_path / "a.jpg", w=32, h=24)
    assert probe(p, 768) == (32, 24)
    with pytest.raises(ImageError, match="decompression bomb"):
        probe(p, 767)


def test_gif_is_not_an_allowed_format(tmp_path):
    p = tmp_path / "x.gif"
    Image.fromarray(pattern(7, 13)).save(p, "GIF")
    with pytest.raises(ImageError, match="format GIF is not allowed"):
        header(p, MAXP)


@pytest.mark.parametrize("fmt,ext", [("BMP", "bmp"), ("TIFF", "tif")])
def test_other_formats_header(tmp_path, fmt, ext):
    p = tmp_path / f"x.{ext}"
    Image.fromarray(pattern(7, 13)).save(p, fmt)
    info = header(p, MAXP)
    assert (info.width, info.height, info.format) == (13, 7, fmt)
    assert decode(p, MAXP).shape == (7, 13, 3)
    with pytest.raises(ImageError, match="13x7 = 91 px > max_pixels 90"):
        probe(p, 90)


def test_letterbox_wide_and_tall():
    wide = pattern(50, 100)
    canvas, scale = letterbox(wide, 64)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    assert scale == pytest.approx(0.64)
    assert canvas[32:].max() == 0  # rows below round(50*0.64)=32 are padding
    assert canvas[:32].max() > 0
    tall = pattern(100, 40)
    canvas, scale = letterbox(tall, 50)
    assert scale == pytest.approx(0.5)
    assert canvas[:, 20:].max() == 0 and canvas[:, :20].max() > 0


def test_letterbox_identity_upscale_and_determinism():
    img = pattern(32, 32)
    canvas, scale = letterbox(img, 32)
    assert scale == 1.0 and np.array_equal(canvas, img)
    up1, s1 = letterbox(pattern(10, 20, 5), 80)
    up2, s2 = letterbox(pattern(10, 20, 5), 80)
    assert s1 == 4.0 and np.array_equal(up1, up2)
    assert up1[40:].max() == 0 and up1[:40].max() > 0
    with pytest.raises(ValueError):
        letterbox(np.zeros((0, 5, 3), np.uint8), 10)


def test_load_batch_mixes_good_and_bad(tmp_path):
    uris = [
        str(write_jpeg(tmp_path / "good.jpg", w=40, h=20)),
        str(write_empty(tmp_path / "empty.jpg")),
        str(write_text_as_image(tmp_path / "text.jpg")),
        str(write_bomb_png(tmp_path / "bomb.png")),
        str(write_truncated_jpeg(tmp_path / "trunc.jpg")),
        str(tmp_path / "missing.jpg"),
        str(write_png16(tmp_path / "p16.png", np.full((30, 15), 40000, np.uint16))),
        str(write_jpeg(tmp_path / "rot.jpg", w=32, h=16, exif_orientation=6)),
    ]
    out = load_batch(uris, 32, MAXP)
    assert out["image"].shape == (8, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["scale"].dtype == np.float32 and out["content_w"].dtype == np.int32
    err = out["error"]
    assert err.dtype == object
    assert err[0] is None and err[6] is None and err[7] is None
    assert err[1] == "0-byte file"
    assert "not an image" in err[2]
    assert err[3].startswith("decompression bomb")
    assert "truncated JPEG" in err[4]
    assert err[5] == "file not found"
    for i in (1, 2, 3, 4, 5):
        assert out["scale"][i] == 0 and out["image"][i].max() == 0
        assert out["content_w"][i] == 0 and out["content_h"][i] == 0
    assert out["scale"][0] == pytest.approx(32 / 40)
    assert (out["content_w"][0], out["content_h"][0]) == (32, 16)
    assert (out["content_w"][6], out["content_h"][6]) == (16, 32)
    assert out["image"][6][:, :16].min() == 40000 >> 8
    # EXIF-rotated 32x16 shows as 16 wide, 32 tall
    assert (out["content_w"][7], out["content_h"][7]) == (16, 32)


def test_load_batch_empty():
    out = load_batch([], 16, MAXP)
    assert out["image"].shape == (0, 16, 16, 3) and out["error"].shape == (0,)
