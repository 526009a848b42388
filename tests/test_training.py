"""Training loop, dataset geometry and augmentation on tiny synthetic images (96 px)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from poolscout.engine.core.config import DetectorConfig, TrainConfig
from poolscout.engine.models.detectors import build_detector
from poolscout.engine.models.training import (DetectionDataset, collate, labeled_items, lr_factor, make_optimizer, seed_everything,
                             train_epochs)

S = 96
MAX_PIXELS = 10_000_000


@pytest.fixture(autouse=True)
def _threads(torch_threads):
    yield


def write_images(tmp_path, specs):
    """specs: list of (width, height, [(x1, y1, x2, y2, label), ...]); bright boxes on grey."""
    items, boxes, labels = [], {}, {}
    for i, (w, h, objs) in enumerate(specs):
        img = np.full((h, w, 3), 110, np.uint8)
        for k, (x1, y1, x2, y2, lab) in enumerate(objs):
            img[y1:y2, x1:x2] = (240, 60 + 80 * k, 30) if lab == 1 else (30, 200, 240)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(path)
        iid = 100 + i
        items.append({"image_id": iid, "uri": str(path), "width": w, "height": h})
        if objs:
            boxes[iid] = np.array([o[:4] for o in objs], np.float32)
            labels[iid] = np.array([o[4] for o in objs], np.int64)
    return items, boxes, labels


SPECS = [
    (128, 96, [(10, 20, 50, 70, 1), (80, 10, 120, 40, 2)]),
    (96, 128, [(20, 30, 70, 90, 2)]),
    (64, 64, []),  # a negative
]


def effnet(num_classes=2, **kw):
    return build_detector(DetectorConfig(input_size=S, rpn_batch_size_per_image=64, box_batch_size_per_image=64, **kw),
                          num_classes)


def loader_for(ds, batch_size=2, shuffle=False):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=0)


def test_dataset_geometry_and_negatives(tmp_path):
    items, boxes, labels = write_images(tmp_path, SPECS)
    ds = DetectionDataset(items, boxes, labels, S, MAX_PIXELS)
    img, t = ds[0]
    assert img.shape == (3, S, S) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    scale = S / 128
    np.testing.assert_allclose(t["boxes"].numpy(), boxes[100] * scale, atol=1e-4)
    assert t["labels"].tolist() == [1, 2] and t["image_id"] == 100
    x1, y1, x2, y2 = (boxes[100][0] * scale).round().astype(int)
    assert img[0, y1 + 2:y2 - 2, x1 + 2:x2 - 2].min() > 0.8  # the red box is where the target says
    assert float(img[:, int(96 * scale) + 1:, :].abs().max()) == 0.0  # letterbox padding below the content
    img, t = ds[2]
    assert t["boxes"].shape == (0, 4) and t["labels"].dtype == torch.int64


def test_hflip_flips_content_and_boxes(tmp_path):
    items, boxes, labels = write_images(tmp_path, SPECS)
    plain = DetectionDataset(items, boxes, labels, S, MAX_PIXELS, hflip_prob=0.0)
    flip = DetectionDataset(items, boxes, labels, S, MAX_PIXELS, hflip_prob=1.0)
    for i in (0, 1):
        a, ta = plain[i]
        b, tb = flip[i]
        w, h = items[i]["width"], items[i]["height"]
        scale = S / max(w, h)
        cw, ch = round(w * scale), round(h * scale)
        torch.testing.assert_close(b[:, :ch, :cw], a[:, :ch, :cw].flip(-1))
        torch.testing.assert_close(b[:, :, cw:], a[:, :, cw:])  # padding untouched
        ba = ta["boxes"].numpy()
        expect = np.stack([cw - ba[:, 2], ba[:, 1], cw - ba[:, 0], ba[:, 3]], 1)
        np.testing.assert_allclose(tb["boxes"].numpy(), expect, atol=1e-4)
        assert torch.equal(tb["labels"], ta["labels"])
        x1, y1, x2, y2 = tb["boxes"][0].round().int().tolist()
        u1, v1, u2, v2 = ta["boxes"][0].round().int().tolist()
        moved = b[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2].mean((1, 2))
        torch.testing.assert_close(moved, a[:, v1 + 2:v2 - 2, u1 + 2:u2 - 2].mean((1, 2)), atol=0.02, rtol=0)
        assert (moved - 110 / 255).abs().max() > 0.3  # the object (not grey) moved with its box


def test_flip_draws_are_seeded_per_epoch(tmp_path):
    items, boxes, labels = write_images(tmp_path, SPECS)
    ds = DetectionDataset(items * 10, boxes, labels, S, MAX_PIXELS, hflip_prob=0.5, seed=7)
    e0 = [ds.flips(i) for i in range(30)]
    assert e0 == [ds.flips(i) for i in range(30)]
    ds.set_epoch(1)
    e1 = [ds.flips(i) for i in range(30)]
    assert e0 != e1 and 5 < sum(e0) < 25
    other = DetectionDataset(items * 10, boxes, labels, S, MAX_PIXELS, hflip_prob=0.5, seed=8)
    assert [other.flips(i) for i in range(30)] != e0


def test_labeled_items_from_tables():
    man = pa.table({"image_id": pa.array([1, 2, 3], pa.int64()), "uri": ["a.png", "b.png", "c.png"],
                    "width": pa.array([10, 20, 30], pa.int32()), "height": pa.array([5, 6, 7], pa.int32())})
    ann = pa.table({"image_id": pa.array([3, 1, 3], pa.int64()), "ann_id": pa.array([0, 1, 2], pa.int64()),
                    "category_id": pa.array([2, 1, 1], pa.int32()),
                    "x1": pa.array([0, 1, 2], pa.float32()), "y1": pa.array([0, 1, 2], pa.float32()),
                    "x2": pa.array([4, 5, 6], pa.float32()), "y2": pa.array([3, 4, 5], pa.float32())})
    items, boxes, labels = labeled_items(man, ann, np.array([3, 2]))
    assert [it["image_id"] for it in items] == [3, 2] and items[0]["uri"] == "c.png" and items[1]["width"] == 20
    assert set(boxes) == {3} and boxes[3].dtype == np.float32
    np.testing.assert_array_equal(boxes[3], [[0, 0, 4, 3], [2, 2, 6, 5]])
    assert labels[3].tolist() == [2, 1] and labels[3].dtype == np.int64
    with pytest.raises(KeyError, match="99"):
        labeled_items(man, ann, np.array([99]))


def test_lr_schedule_and_optimizer_groups():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    f = [lr_factor(i, 100, 10) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(f, f[1:]))
    model = effnet()
    opt = make_optimizer(model, TrainConfig(weight_decay=1e-4))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay"]["weight_decay"] == 1e-4 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in by_name["decay"]["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.backbone.body.conv_stem.weight) not in ids
    assert id(model.rpn.head.conv[0][0].weight) in ids


def test_short_training_run(tmp_path):
    seed_everything(0)
    items, boxes, labels = write_images(tmp_path, SPECS)
    ds = DetectionDataset(items, boxes, labels, S, MAX_PIXELS, hflip_prob=0.5)
    model = effnet()
    stem = model.backbone.body.conv_stem.weight.detach().clone()
    bn_mean = model.backbone.body.blocks[2][0].bn1.running_mean.clone()
    head = model.roi_heads.box_head.fc6.weight.detach().clone()
    seen = []
    cfg = TrainConfig(epochs=2, batch_size=2, lr=0.01, warmup_iters=2)
    hist = train_epochs(model, loader_for(ds), cfg, progress=False, log=lambda s: None, on_epoch=seen.append)
    assert [h["epoch"] for h in hist] == [0, 1] and seen == hist
    for h in hist:
        assert math.isfinite(h["loss"]) and h["images"] == 3 and h["seconds"] > 0
        assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(h)
        parts = sum(v for k, v in h.items() if k.startswith("loss_"))
        assert parts == pytest.approx(h["loss"], rel=1e-5)
    assert not torch.equal(model.roi_heads.box_head.fc6.weight, head)
    assert torch.equal(model.backbone.body.conv_stem.weight, stem)
    assert torch.equal(model.backbone.body.blocks[2][0].bn1.running_mean, bn_mean)
    # resume continues the same schedule: epoch 2 only
    more = train_epochs(model, loader_for(ds), TrainConfig(epochs=3, batch_size=2, warmup_iters=2),
                        start_epoch=2, progress=False, log=lambda s: None)
    assert [h["epoch"] for h in more] == [2]


def test_negative_only_batch_trains(tmp_path):
    items, boxes, labels = write_images(tmp_path, SPECS)
    ds = DetectionDataset(items[2:], boxes, labels, S, MAX_PIXELS)
    model = effnet()
    hist = train_epochs(model, loader_for(ds, 1), TrainConfig(epochs=1, warmup_iters=1), progress=False,
                        log=lambda s: None)
    assert math.isfinite(hist[0]["loss"]) and hist[0]["loss_box_reg"] == 0.0


def test_non_finite_loss_names_images():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss_x": self.w * float("nan")}

    batch = [(torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                     "image_id": 42})]
    with pytest.raises(FloatingPointError, match="42"):
        train_epochs(Bad(), loader_for(batch, 1), TrainConfig(epochs=1), progress=False, log=lambda s: None)


def test_overfits_two_images(tmp_path):
    seed_everything(0)
    items, boxes, labels = write_images(tmp_path, SPECS[:2])
    ds = DetectionDataset(items, boxes, labels, S, MAX_PIXELS)
    model = effnet()
    cfg = TrainConfig(epochs=20, batch_size=2, lr=0.02, warmup_iters=3)
    hist = train_epochs(model, loader_for(ds), cfg, progress=False, log=lambda s: None)
    losses = [h["loss"] for h in hist]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.6 * first, losses


@pytest.mark.parametrize("warm_epochs,warm_lr,expect", [(0, 0.0, (3, 0.02)), (1, 0.0, (1, 0.02)),
                                                         (0, 0.005, (3, 0.005)), (2, 0.004, (2, 0.004))])
def test_warm_start_uses_warm_epochs_and_warm_lr(tmp_path, monkeypatch, warm_epochs, warm_lr, expect):
    import dataclasses

    from poolscout.engine.core import io
    from poolscout.engine.models import training
    from poolscout.engine.models.detectors import save_checkpoint

    items, boxes, labels = write_images(tmp_path, SPECS)
    io.write_table(pa.table({"image_id": [i["image_id"] for i in items], "uri": [i["uri"] for i in items],
                             "width": pa.array([i["width"] for i in items], pa.int32()),
                             "height": pa.array([i["height"] for i in items], pa.int32()),
                             "source_key": [f"img{k}.png" for k in range(len(items))]}),
                   tmp_path / "manifest.parquet", io.MANIFEST_SCHEMA)
    ids = [i for i in boxes for _ in boxes[i]]
    xyxy = np.concatenate([boxes[i] for i in boxes])
    io.write_table(pa.table({"image_id": pa.array(ids, pa.int64()), "ann_id": pa.array(range(len(ids)), pa.int64()),
                             "category_id": pa.array(np.concatenate([labels[i] for i in boxes]), pa.int32()),
                             **{c: pa.array(xyxy[:, j], pa.float32()) for j, c in enumerate(("x1", "y1", "x2", "y2"))}}),
                   tmp_path / "annotations.parquet", io.ANNOTATIONS_SCHEMA)
    dcfg = DetectorConfig(input_size=S, backbone_weights=None)
    save_checkpoint(tmp_path / "prev.pt", build_detector(dcfg, 2, load_pretrained=False), dcfg, 2)
    seen = {}

    def fake_train(model, loader, cfg, device, **kw):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(training, "train_epochs", fake_train)
    tcfg = TrainConfig(epochs=3, lr=0.02, warm_epochs=warm_epochs, warm_lr=warm_lr)
    spec = {"train": dataclasses.asdict(tcfg), "detector": dataclasses.asdict(dcfg), "seed": 0,
            "manifest": str(tmp_path / "manifest.parquet"), "annotations": str(tmp_path / "annotations.parquet"),
            "labeled_ids": [i["image_id"] for i in items], "num_classes": 2, "max_pixels": MAX_PIXELS}
    training.fit_detector({**spec, "warm_start": str(tmp_path / "prev.pt")}, progress=False, log=lambda s: None)
    assert (seen["cfg"].epochs, seen["cfg"].lr) == expect
    training.fit_detector({**spec, "warm_start": None}, progress=False, log=lambda s: None)
    assert (seen["cfg"].epochs, seen["cfg"].lr) == (3, 0.02)  # a cold start ignores both
