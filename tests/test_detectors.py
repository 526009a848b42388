"""Detector builders, the prediction contract of engine.inference, checkpoints, and the
EfficientNet-Lite0 weight mapping. Tiny inputs (64 px), random weights, C = 3."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from poolscout.engine.core.config import DetectorConfig
from poolscout.engine.models.detectors import (DETECTORS, EFFNET_LITE0_TENSORS, build_detector, effnet_lite0_state_dict,
                              effnet_lite0_weights_path, load_checkpoint, save_checkpoint, set_mc_dropout)
from poolscout.engine.models.inference import SUPPORTED_VIEWS, embed, predict, prepare, sigmoid_to_distribution

S = 64
C = 3
FAMILIES = ["fasterrcnn_effnet_lite0_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_v2",
            "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fcos_resnet18_fpn"]
_MODELS: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True)
def _threads(torch_threads):
    yield


def cfg_for(name: str, **kw) -> DetectorConfig:
    return DetectorConfig(name=name, input_size=S, score_thresh=0.0, **kw)


def model_for(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = build_detector(cfg_for(name), C, load_pretrained=False).eval()
    return _MODELS[name]


def make_batch(n: int = 3, seed: int = 0):
    """Letterboxed-like canvases with known geometry; image i occupies [:ch, :cw]."""
    rng = np.random.default_rng(seed)
    width = np.array([128, 64, 100, 50][:n])
    height = np.array([96, 32, 100, 40][:n])
    scale = S / np.maximum(width, height)
    cw = np.minimum(S, np.maximum(1, np.round(width * scale))).astype(np.int64)
    ch = np.minimum(S, np.maximum(1, np.round(height * scale))).astype(np.int64)
    images = np.zeros((n, S, S, 3), np.uint8)
    for i in range(n):
        images[i, :ch[i], :cw[i]] = rng.integers(0, 256, (ch[i], cw[i], 3))
    meta = dict(image_id=np.arange(10, 10 + n), width=width, height=height, scale=scale, content_w=cw, content_h=ch)
    return images, meta


def sub(meta: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in meta.items()}


def test_registry_has_all_presets():
    assert set(FAMILIES) == set(DETECTORS.names())
    with pytest.raises(KeyError, match="unknown detector"):
        build_detector(DetectorConfig(name="nope"), C)


@pytest.mark.parametrize("name", FAMILIES)
def test_predict_contract(name):
    model = model_for(name)
    images, meta = make_batch()
    max_boxes = 7
    out = predict(model, images, views=("orig", "hflip"), max_boxes=max_boxes, **meta)
    n = len(images)
    assert model.poolscout_family in ("rcnn", "retinanet", "fcos")
    assert out["image_id"].dtype == np.int64 and list(out["image_id"]) == list(meta["image_id"])
    assert out["width"].dtype == np.int32 and out["height"].dtype == np.int32
    assert out["embedding"].shape == (n, model.poolscout_embed_dim) and out["embedding"].dtype == np.float32
    for p in ("", "hflip_"):
        off = out[p + "offsets"]
        assert off.dtype == np.int64 and off.shape == (n + 1,) and off[0] == 0
        assert np.all(np.diff(off) >= 0)
        m = int(off[-1])
        assert m > 0, "score_thresh 0 must give boxes"
        assert np.all(np.diff(off) <= max_boxes)
        assert out[p + "boxes"].shape == (m, 4) and out[p + "boxes"].dtype == np.float32
        assert out[p + "scores"].shape == (m,) and out[p + "scores"].dtype == np.float32
        assert out[p + "labels"].shape == (m,) and out[p + "labels"].dtype == np.int64
        assert out[p + "probs"].shape == (m, C + 1) and out[p + "probs"].dtype == np.float32
        assert out[p + "roi_embedding"].shape == (m, model.poolscout_roi_dim)
        assert out[p + "roi_embedding"].dtype == np.float32
        np.testing.assert_allclose(out[p + "probs"].sum(1), 1.0, atol=1e-5)
        assert np.all(out[p + "probs"] >= 0)
        assert out[p + "labels"].min() >= 1 and out[p + "labels"].max() <= C
        b = out[p + "boxes"]
        assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
        for i in range(n):
            bi = b[off[i]:off[i + 1]]
            assert np.all(bi >= 0)
            assert np.all(bi[:, [0, 2]] <= meta["width"][i] + 1e-3)
            assert np.all(bi[:, [1, 3]] <= meta["height"][i] + 1e-3)
            s = out[p + "scores"][off[i]:off[i + 1]]
            assert np.all(np.diff(s) <= 1e-7), "scores must be sorted per image"
        if model.poolscout_family == "rcnn":
            picked = out[p + "probs"][np.arange(m), out[p + "labels"]]
            np.testing.assert_allclose(out[p + "scores"], picked, atol=1e-6)
        else:
            assert np.all(out[p + "scores"] > 0) and np.all(out[p + "scores"] <= 1)


@pytest.mark.parametrize("name", ["fasterrcnn_effnet_lite0_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                                  "retinanet_resnet50_fpn_v2", "fcos_resnet18_fpn"])
def test_matches_torchvision_postprocess(name):
    """Full-canvas images at scale 1: our eval path gives torchvision's own detections."""
    import copy

    model = copy.deepcopy(model_for(name))
    if model.poolscout_family != "rcnn":
        # torchvision would also report class 0, which we ignore: make it never fire
        k = C + 1
        with torch.no_grad():
            model.head.classification_head.cls_logits.bias[0::k] = -50.0
        model.score_thresh = 0.01
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    ones = np.ones(2)
    meta = dict(image_id=np.arange(2), width=np.full(2, S), height=np.full(2, S), scale=ones,
                content_w=np.full(2, S), content_h=np.full(2, S))
    ours = predict(model, images, max_boxes=20, **meta)
    if model.poolscout_family == "rcnn":
        model.roi_heads.detections_per_img = 20
    else:
        model.detections_per_img = 20
    with torch.inference_mode():
        ref = model(list(prepare(images, "cpu")))
    for i in range(2):
        # we also drop empty boxes (< 0.01 px), which torchvision's one-stage models keep; an
        # empty box overlaps nothing, so NMS is unaffected and only the top-k cut can differ
        rb = ref[i]["boxes"].numpy()
        ok = (rb[:, 2] - rb[:, 0] >= 1e-2) & (rb[:, 3] - rb[:, 1] >= 1e-2)
        if model.poolscout_family == "rcnn":
            assert ok.all()
        n_ref = int(ok.sum())
        a, b = ours["offsets"][i], ours["offsets"][i + 1]
        assert n_ref > 0 and (b - a == n_ref if ok.all() else b - a >= n_ref)
        b = a + n_ref
        np.testing.assert_allclose(ours["boxes"][a:b], rb[ok], atol=1e-3)
        np.testing.assert_allclose(ours["scores"][a:b], ref[i]["scores"].numpy()[ok], atol=1e-6)
        np.testing.assert_array_equal(ours["labels"][a:b], ref[i]["labels"].numpy()[ok])


@pytest.mark.parametrize("name", ["fasterrcnn_effnet_lite0_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet18_fpn"])
def test_boxes_are_in_original_pixels(name):
    """The same canvas read at scale 1 and at scale 0.5 gives boxes exactly 2x larger."""
    model = model_for(name)
    images, meta = make_batch(1)
    m1 = dict(meta, scale=np.array([1.0]), width=meta["content_w"], height=meta["content_h"])
    m2 = dict(meta, scale=np.array([0.5]), width=2 * meta["content_w"], height=2 * meta["content_h"])
    a = predict(model, images, **m1)
    b = predict(model, images, **m2)
    assert len(a["boxes"]) > 0
    np.testing.assert_allclose(b["boxes"], 2 * a["boxes"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(a["labels"], b["labels"])


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_composition_invariance(name):
    model = model_for(name)
    images, meta = make_batch(3)
    full = predict(model, images, views=("orig", "hflip"), **meta)
    for i in range(3):
        one = predict(model, images[i:i + 1], views=("orig", "hflip"), **sub(meta, i))
        for p in ("", "hflip_"):
            a, b = full[p + "offsets"][i], full[p + "offsets"][i + 1]
            assert one[p + "offsets"][-1] == b - a
            # the same boxes, in the same order, with the same labels
            np.testing.assert_array_equal(one[p + "labels"], full[p + "labels"][a:b])
            for f in ("boxes", "scores", "probs", "roi_embedding"):
                # float32 kernels pick other algorithms for a batch of 1 than of 3, so values
                # agree to float32 round-off scaled by the field's magnitude (boxes in pixels
                # up to ~130, embeddings of any scale); a batch mix-up errs by the magnitude.
                ref = full[p + f][a:b]
                tol = 2e-3 * max(1.0, float(np.abs(ref).max())) if ref.size else 0.0
                np.testing.assert_allclose(one[p + f], ref, rtol=0, atol=tol, err_msg=f"{p}{f} image {i}")
        e = full["embedding"][i]
        np.testing.assert_allclose(one["embedding"][0], e, rtol=0, atol=2e-3 * max(1.0, float(np.abs(e).max())))


@pytest.mark.parametrize("name", FAMILIES)
def test_embed_equals_predict_embedding(name):
    model = model_for(name)
    images, meta = make_batch(2)
    e = embed(model, images)
    out = predict(model, images, views=("orig", "hflip"), **meta)
    assert e.shape == (2, model.poolscout_embed_dim) and e.dtype == np.float32
    np.testing.assert_allclose(e, out["embedding"], atol=1e-5)
    only_flip = predict(model, images, views=("hflip",), **meta)
    np.testing.assert_allclose(only_flip["embedding"], e, atol=1e-5)
    assert not np.allclose(e[0], e[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_hflip_view_maps_back(name):
    """hflip of image I == orig predictions of the mirrored image J, mirrored back."""
    model = model_for(name)
    images, meta = make_batch(2)
    flipped = images.copy()
    for i in range(2):
        cw, ch = meta["content_w"][i], meta["content_h"][i]
        flipped[i, :ch, :cw] = images[i, :ch, :cw][:, ::-1]
    h = predict(model, images, views=("hflip",), **meta)
    o = predict(model, flipped, views=("orig",), **meta)
    np.testing.assert_array_equal(h["hflip_offsets"], o["offsets"])
    wb = (meta["content_w"] / meta["scale"])[np.repeat(np.arange(2), np.diff(o["offsets"]))]
    w = meta["width"][np.repeat(np.arange(2), np.diff(o["offsets"]))]
    expect = np.stack([wb - o["boxes"][:, 2], o["boxes"][:, 1], wb - o["boxes"][:, 0], o["boxes"][:, 3]], 1)
    expect[:, 0::2] = np.clip(expect[:, 0::2], 0, w[:, None])
    np.testing.assert_allclose(h["hflip_boxes"], expect, atol=1e-3)
    np.testing.assert_allclose(h["hflip_probs"], o["probs"], atol=1e-5)
    np.testing.assert_array_equal(h["hflip_labels"], o["labels"])
    # and the flip really changes the picture the model sees
    orig = predict(model, images, views=("orig",), **meta)
    assert orig["boxes"].shape != h["hflip_boxes"].shape or not np.allclose(orig["boxes"], h["hflip_boxes"])


def test_symmetric_full_width_image_flip_is_mirror():
    """A left-right symmetric full-canvas image: hflip boxes are the mirrored orig boxes."""
    model = model_for("fasterrcnn_effnet_lite0_fpn")
    rng = np.random.default_rng(3)
    half = rng.integers(0, 256, (S, S // 2, 3), dtype=np.uint8)
    img = np.concatenate([half, half[:, ::-1]], 1)[None]
    meta = dict(image_id=np.array([1]), width=np.array([S]), height=np.array([S]), scale=np.array([1.0]),
                content_w=np.array([S]), content_h=np.array([S]))
    out = predict(model, img, views=("orig", "hflip"), **meta)
    b = out["boxes"]
    mirrored = np.stack([S - b[:, 2], b[:, 1], S - b[:, 0], b[:, 3]], 1)
    np.testing.assert_allclose(out["hflip_boxes"], mirrored, atol=1e-3)
    np.testing.assert_allclose(out["hflip_scores"], out["scores"], atol=1e-6)


@pytest.mark.parametrize("view", ["cutout", "resize", "rotate"])
def test_augmented_views_map_back(view):
    """A view's predictions == orig predictions of that view's canvas, mapped back."""
    from poolscout.engine.models.inference import _view_canvases, view_params
    from poolscout.kernels.consistency import map_view_boxes

    model = model_for("fasterrcnn_effnet_lite0_fpn")
    images, meta = make_batch(3)
    prm = view_params()
    canv, factors = _view_canvases(view, images, meta["image_id"], meta["content_w"], meta["content_h"], prm)
    assert not np.array_equal(canv, images)  # the view changes the pixels
    v = predict(model, images, views=(view,), **meta)
    o = predict(model, canv, views=("orig",), **meta)
    p = f"{view}_"
    np.testing.assert_array_equal(v[p + "offsets"], o["offsets"])
    np.testing.assert_allclose(v[p + "probs"], o["probs"], atol=1e-5)
    img = np.repeat(np.arange(3), np.diff(o["offsets"]))
    canvas_boxes = o["boxes"].astype(np.float64) * meta["scale"][img, None]  # back to canvas pixels
    if view == "resize":
        assert np.allclose(factors, 0.8, atol=0.02)
        expect = canvas_boxes / factors[img][:, [0, 1, 0, 1]]
    elif view == "rotate":
        expect = map_view_boxes(canvas_boxes, o["offsets"], meta["content_w"].astype(float),
                                meta["content_h"].astype(float), "rotate", prm["rotate"])
    else:
        expect = canvas_boxes
    expect = expect / meta["scale"][img, None]
    expect[:, 0::2] = np.clip(expect[:, 0::2], 0, meta["width"][img, None])
    expect[:, 1::2] = np.clip(expect[:, 1::2], 0, meta["height"][img, None])
    np.testing.assert_allclose(v[p + "boxes"], expect, atol=2e-2)


def test_stacked_and_per_view_passes_agree():
    torch.manual_seed(0)
    model = build_detector(cfg_for("fasterrcnn_effnet_lite0_fpn", dropout=0.3), C, load_pretrained=False).eval()
    images, meta = make_batch(3)
    views = ("orig", "hflip", "rotate")
    a = predict(model, images, views=views, stack_views=True, **meta)
    b = predict(model, images, views=views, stack_views=False, **meta)
    for k in a:
        if k.endswith("offsets") or k.endswith("labels"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], atol=1e-3, err_msg=k)


def test_cutout_is_per_image_and_batch_independent():
    from poolscout.engine.models.inference import cutout_holes

    a = cutout_holes(7, 100, 80, 2, 0.2, seed=0)
    assert a.shape == (2, 4) and np.all(a[:, 2] - a[:, 0] == 16) and np.all(a[:, 3] <= 80)
    np.testing.assert_array_equal(a, cutout_holes(7, 100, 80, 2, 0.2, seed=0))
    assert not np.array_equal(a, cutout_holes(8, 100, 80, 2, 0.2, seed=0))
    model = model_for("fasterrcnn_effnet_lite0_fpn")
    images, meta = make_batch(3)
    full = predict(model, images, views=("orig", "cutout"), **meta)
    one = predict(model, images[1:2], views=("orig", "cutout"), **sub(meta, 1))
    a, b = full["cutout_offsets"][1], full["cutout_offsets"][2]
    np.testing.assert_allclose(one["cutout_boxes"], full["cutout_boxes"][a:b], atol=1e-3)


def test_mc_dropout_outputs():
    torch.manual_seed(0)
    model = build_detector(cfg_for("fasterrcnn_effnet_lite0_fpn", dropout=0.3), C, load_pretrained=False).eval()
    images, meta = make_batch(2)
    out = predict(model, images, views=("orig", "hflip"), mc_passes=5, **meta)
    m = int(out["offsets"][-1])
    assert m > 0 and out["mc_probs"].shape == (m, C + 1) and out["mc_entropy"].shape == (m,)
    np.testing.assert_allclose(out["mc_probs"].sum(1), 1.0, atol=1e-5)
    from poolscout.engine.methods.uncertainty import box_entropy
    bald = box_entropy(out["mc_probs"]) - out["mc_entropy"]
    assert bald.min() > -1e-5 and bald.max() > 0
    # deterministic outputs are untouched by the MC passes (dropout is off for them)
    plain = predict(model, images, views=("orig", "hflip"), **meta)
    np.testing.assert_allclose(plain["probs"], out["probs"], atol=1e-6)
    assert "mc_probs" not in plain
    with pytest.raises(ValueError, match="detector.dropout"):
        predict(model_for("fasterrcnn_effnet_lite0_fpn"), images, mc_passes=2, **meta)
    with pytest.raises(ValueError, match="Faster R-CNN"):
        predict(model_for("fcos_resnet18_fpn"), images, mc_passes=2, **meta)


def test_unknown_view_rejected_with_supported_list():
    model = model_for("fcos_resnet18_fpn")
    images, meta = make_batch(1)
    with pytest.raises(ValueError, match="hflip"):
        predict(model, images, views=("orig", "shear"), **meta)
    assert SUPPORTED_VIEWS == ("orig", "hflip", "cutout", "resize", "rotate")


def test_wrong_canvas_size_and_max_boxes():
    model = model_for("fasterrcnn_effnet_lite0_fpn")
    images, meta = make_batch(1)
    with pytest.raises(ValueError, match="input_size"):
        predict(model, np.zeros((1, 32, 32, 3), np.uint8), **meta)
    out = predict(model, images, max_boxes=2, roi_embeddings=False, **meta)
    assert out["offsets"][-1] == 2 and "roi_embedding" not in out


def test_empty_batch():
    model = model_for("fasterrcnn_effnet_lite0_fpn")
    _, meta = make_batch(1)
    out = predict(model, np.zeros((0, S, S, 3), np.uint8), **{k: v[:0] for k, v in meta.items()})
    assert out["offsets"].tolist() == [0] and out["probs"].shape == (0, C + 1)


def test_prepare_layout():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[1, 0, 3, 2] = 255
    t = prepare(x, "cpu")
    assert t.shape == (2, 3, 4, 4) and t.dtype == torch.float32
    assert t[1, 2, 0, 3] == 1.0 and float(t.sum()) == 1.0


def test_sigmoid_to_distribution():
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    p = sigmoid_to_distribution(q)
    np.testing.assert_allclose(p.numpy(), [[1, 0, 0], [0, 1, 0], [0.25 / 1.25, 0.5 / 1.25, 0.5 / 1.25]], atol=1e-6)


@pytest.mark.parametrize("name", ["fasterrcnn_effnet_lite0_fpn", "fcos_resnet18_fpn",
                                  "fasterrcnn_mobilenet_v3_large_fpn"])
def test_checkpoint_round_trip(name, tmp_path):
    model = model_for(name)
    images, meta = make_batch(2)
    before = predict(model, images, views=("orig", "hflip"), **meta)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, cfg_for(name), C, extra={"cycle": 2})
    assert not list(tmp_path.glob(".*.tmp"))
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training and "state_dict" not in ckpt
    assert ckpt["num_classes"] == C and ckpt["extra"] == {"cycle": 2} and ckpt["detector"]["name"] == name
    after = predict(loaded, images, views=("orig", "hflip"), **meta)
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="plain.pt.*not a poolscout"):
        load_checkpoint(plain)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_dropout_for_mc_sampling():
    torch.manual_seed(0)
    model = build_detector(cfg_for("fasterrcnn_effnet_lite0_fpn", dropout=0.5), C, load_pretrained=False).eval()
    images, meta = make_batch(1)
    a = predict(model, images, **meta)
    b = predict(model, images, **meta)
    np.testing.assert_array_equal(a["probs"], b["probs"])  # eval: dropout off
    assert set_mc_dropout(model, True) == 2
    c = predict(model, images, **meta)
    assert not model.training
    assert a["probs"].shape != c["probs"].shape or not np.allclose(a["probs"], c["probs"])
    set_mc_dropout(model, False)
    torch.manual_seed(0)
    r = build_detector(cfg_for("retinanet_resnet50_fpn_v2", dropout=0.3), C, load_pretrained=False)
    assert set_mc_dropout(r, True) == 1
    assert set(r.state_dict()) == set(model_for("retinanet_resnet50_fpn_v2").state_dict())


# --------------------------------------------------------------------------- EfficientNet-Lite0
def test_effnet_weights_mapped_in_order():
    import timm

    src = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = effnet_lite0_state_dict()
    full_keys = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert len(src) == len(mapped) == EFFNET_LITE0_TENSORS == 296
    assert list(mapped) == full_keys
    src_vals = list(src.values())
    mapped_vals = list(mapped.values())
    for i in (0, 1, 6, 100, 200, 294, 295):
        assert torch.equal(mapped_vals[i], src_vals[i]), i
    assert torch.equal(mapped["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.weight"], src["_fc.weight"])


def test_effnet_weights_shape_mismatch_raises(tmp_path):
    src = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    k = list(src)[10]
    src[k] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(src, bad)
    with pytest.raises(ValueError, match="does not fit"):
        effnet_lite0_state_dict(bad)


def test_effnet_preset_loads_packaged_weights_and_freezes():
    src = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = build_detector(DetectorConfig(input_size=S), C)  # backbone_weights="auto"
    body = model.backbone.body
    assert torch.equal(body.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(body.bn1.running_var, src["_bn0.running_var"])
    assert torch.equal(body.blocks[1][0].conv_pw.weight, src["_blocks.1._expand_conv.weight"])
    assert not body.conv_stem.weight.requires_grad
    bns = [m for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 20
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert any(p.requires_grad for p in body.blocks[3].parameters())
    model.train()
    assert all(not m.training for m in bns) and model.rpn.training
    mean0 = body.bn1.running_mean.clone()
    model(list(torch.rand(1, 3, S, S)), [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
                                          "labels": torch.tensor([1])}])
    assert torch.equal(body.bn1.running_mean, mean0)
    fresh = build_detector(DetectorConfig(input_size=S), C, load_pretrained=False)
    assert not torch.equal(fresh.backbone.body.conv_stem.weight, src["_conv_stem.weight"])
    assert set(fresh.state_dict()) == set(model.state_dict())


def test_hub_weights_fail_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="DEFAULT|cannot fetch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_detector(cfg_for("fasterrcnn_mobilenet_v3_large_fpn", backbone_weights="DEFAULT"), C)


def test_local_backbone_weights_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    ref = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = build_detector(cfg_for("fcos_resnet18_fpn", backbone_weights=str(path)), C)
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert not model.backbone.body.conv1.weight.requires_grad  # trainable_backbone_layers=3
    assert model.backbone.body.layer4[0].conv1.weight.requires_grad


@pytest.mark.gpu
def test_predict_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images, meta = make_batch(3)
    for name in ("fasterrcnn_effnet_lite0_fpn", "fcos_resnet18_fpn"):
        torch.manual_seed(0)
        model = build_detector(cfg_for(name), C, load_pretrained=False).eval()
        cpu = predict(model, images, views=("orig", "hflip"), **meta)
        gpu = predict(model, images, views=("orig", "hflip"), device="cuda", **meta)
        assert next(model.parameters()).is_cuda
        np.testing.assert_allclose(gpu["embedding"], cpu["embedding"], atol=1e-3)
        assert gpu["offsets"][-1] > 0
        np.testing.assert_allclose(gpu["probs"].sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(embed(model, images, device="cuda"), gpu["embedding"], atol=1e-4)
