"""HUALE training losses (engine.losses), the Faster R-CNN ROI heads that use them
(engine.roi_heads) and their wiring into the builders and train_epochs. Hand-computed
values; tiny detectors (64 px, random weights, C = 2)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from poolscout.engine.core.config import DetectorConfig, TrainConfig
from poolscout.engine.models.detectors import build_detector, load_checkpoint, save_checkpoint
from poolscout.engine.models.losses import aware_regression_loss, class_quality_update, eiou_loss, emphasis_factors, paired_iou_giou
from poolscout.engine.models.roi_heads import PoolscoutRoIHeads, UncertainBoxPredictor, configure_detector_losses
from poolscout.engine.models.training import collate, train_epochs

S = 64
C = 2


@pytest.fixture(autouse=True)
def _threads(torch_threads):
    yield


# --------------------------------------------------------------------------- pure losses
def test_eiou_identical_boxes_is_zero():
    # GIoU = 1 -> (1 + 1)^0.8 * (1 - 1) = 0
    b = torch.tensor([[1.0, 2.0, 5.0, 7.0], [0.0, 0.0, 10.0, 3.0]])
    out = eiou_loss(b, b.clone())
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.zeros(2), atol=1e-6, rtol=0)


def test_eiou_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [1.0, 0.0, 3.0, 2.0]], dtype=torch.float64)
    # pair 0: inter [1,2]x[1,2] = 1, union 4 + 4 - 1 = 7, IoU 1/7, hull [0,3]x[0,3] = 9,
    #         GIoU = 1/7 - (9 - 7)/9 = -5/63, loss = (58/63)^0.8 * 68/63 = 1.010273...
    # pair 1: disjoint, inter 0, union 2, hull [0,3]x[0,1] = 3, GIoU = 0 - 1/3 = -1/3,
    #         loss = (2/3)^0.8 * 4/3 = 0.962266...
    # pair 2: inter [1,2]x[0,2] = 2, union 6, IoU 1/3, hull [0,3]x[0,2] = 6, GIoU = 1/3,
    #         loss = (4/3)^0.8 * 2/3 = 0.834575...
    want = [(58 / 63) ** 0.8 * 68 / 63, (2 / 3) ** 0.8 * 4 / 3, (4 / 3) ** 0.8 * 2 / 3]
    assert want[0] == pytest.approx(1.010273, abs=1e-6)
    out = eiou_loss(pred, gt, gamma=0.8)
    torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    iou, giou = paired_iou_giou(pred, gt)
    torch.testing.assert_close(iou, torch.tensor([1 / 7, 0.0, 1 / 3], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(giou, torch.tensor([-5 / 63, -1 / 3, 1 / 3], dtype=torch.float64), rtol=1e-6, atol=0)
    # gamma 0: plain 1 - GIoU
    torch.testing.assert_close(eiou_loss(pred, gt, gamma=0.0), 1 - giou)


def test_eiou_degenerate_boxes_finite():
    # zero-area and inverted boxes, far apart (GIoU -> -1, 1 + GIoU -> 0): finite value and gradient
    pred = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
                        requires_grad=True)
    gt = torch.tensor([[5.0, 5.0, 5.0, 5.0], [100.0, 100.0, 100.0, 100.0], [0.0, 0.0, 2.0, 2.0],
                       [1000.0, 1000.0, 1001.0, 1001.0]])
    out = eiou_loss(pred, gt)
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 2 ** 0.8 * 2 + 1e-6).all()
    out.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_eiou_gradcheck():
    pred = torch.tensor([[0.1, 0.2, 2.3, 2.1], [0.5, 0.4, 1.7, 3.3], [4.0, 4.2, 5.1, 6.0]],
                        dtype=torch.float64, requires_grad=True)
    gt = torch.tensor([[1.0, 0.9, 3.2, 2.8], [0.2, 0.1, 1.9, 2.6], [0.3, 0.5, 1.4, 1.3]],
                      dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: eiou_loss(a, b, gamma=0.8), (pred, gt))


def test_aware_loss_hand_computed():
    # beta = 1/9, target 0; per coordinate smoothL1 * exp(-a) / 2 + a / 2:
    #   d = 0,    a = 0:     0
    #   d = 0.05, a = 0:     0.5 * 0.05^2 * 9 = 0.01125 -> 0.01125 / 2 = 0.005625
    #   d = 0.5,  a = ln 2:  0.5 - 1/18 = 4/9 -> 4/9 * 0.5 / 2 + 0.5 ln 2 = 1/9 + 0.5 ln 2
    #   d = -1,   a = -ln 2: 1 - 1/18 = 17/18 -> 17/18 * 2 / 2 - 0.5 ln 2 = 17/18 - 0.5 ln 2
    #   sum = 0.005625 + 1/9 + 17/18 = 1.0611806 (the ln 2 terms cancel)
    # second row: d = 0.1 (< beta), a = -1: 0.5 * 0.01 * 9 = 0.045 -> 0.045 * e / 2 - 0.5, x4
    ln2 = math.log(2.0)
    pred = torch.tensor([[0.0, 0.05, 0.5, -1.0], [0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    target = torch.zeros(2, 4, dtype=torch.float64)
    log_var = torch.tensor([[0.0, 0.0, ln2, -ln2], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    want = [0.005625 + 1 / 9 + 17 / 18, 4 * (0.045 * math.e / 2 - 0.5)]
    out = aware_regression_loss(pred, target, log_var, beta=1 / 9)
    torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # sigma^2 = 1: half the smooth L1
    sl1 = torch.nn.functional.smooth_l1_loss(pred, target, beta=1 / 9, reduction="none").sum(1)
    torch.testing.assert_close(aware_regression_loss(pred, target, torch.zeros_like(pred)), sl1 / 2)


def test_aware_loss_gradcheck():
    # coordinates kept away from the smooth-L1 kink |d - t| = 1/9
    pred = torch.tensor([[0.02, -0.5, 0.3, 1.2], [0.0, 0.05, -0.04, 0.7]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.0, 0.1, -0.1, 0.2], [0.3, 0.0, 0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    log_var = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-0.3, 0.1, 1.5, -2.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: aware_regression_loss(a, b, c), (pred, target, log_var))


def test_emphasis_factors():
    p_gt = torch.tensor([0.9, 0.2, 1.0], requires_grad=True)
    iou = torch.tensor([0.75, 0.0], requires_grad=True)
    b_cls, b_loc = emphasis_factors(p_gt, iou)
    torch.testing.assert_close(b_cls, torch.tensor([0.1, 0.8, 0.0]))
    torch.testing.assert_close(b_loc, torch.tensor([0.25, 1.0]))
    assert not b_cls.requires_grad and not b_loc.requires_grad


def test_class_quality_ema_two_steps():
    quality = torch.zeros(3)
    seen = torch.zeros(3, dtype=torch.bool)
    # step 1 (q = p^0.6 IoU^0.4; (1/32)^0.6 = 1/8, (1/32)^0.4 = 1/4):
    #   class 1: p = 1, IoU = 1/32 -> q = 0.25; p = 1/32, IoU = 1 -> q = 0.125; mean 0.1875
    #   class 2: p = 1, IoU = 1 -> q = 1; label 0 (background) and -1 (ignored) are skipped
    #   first observations: Q = [0.1875, 1, 0], seen = [T, T, F]
    class_quality_update(quality, seen, torch.tensor([1, 1, 2, 0, -1]),
                         torch.tensor([1.0, 1 / 32, 1.0, 0.99, 0.5]), torch.tensor([1 / 32, 1.0, 1.0, 0.3, 0.5]), 0.9)
    torch.testing.assert_close(quality, torch.tensor([0.1875, 1.0, 0.0]))
    assert seen.tolist() == [True, True, False]
    # step 2: class 1 q = 1 -> 0.9 * 0.1875 + 0.1 * 1 = 0.26875; class 3 first: q = 1 * (1/32)^0.4 = 0.25;
    #   class 2 absent: stays 1
    class_quality_update(quality, seen, torch.tensor([1, 3]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1 / 32]),
                         0.9)
    torch.testing.assert_close(quality, torch.tensor([0.26875, 1.0, 0.25]))
    assert seen.tolist() == [True, True, True]
    # float "seen" buffers work too; nothing positive: no change; a label above C: error
    fseen = torch.zeros(3)
    q2 = torch.zeros(3)
    class_quality_update(q2, fseen, torch.tensor([0, 0]), torch.ones(2), torch.ones(2), 0.9)
    assert q2.tolist() == [0, 0, 0] and fseen.tolist() == [0, 0, 0]
    class_quality_update(q2, fseen, torch.tensor([2]), torch.ones(1), torch.ones(1), 0.9)
    assert q2.tolist() == [0, 1, 0] and fseen.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="label 4"):
        class_quality_update(q2, fseen, torch.tensor([4]), torch.ones(1), torch.ones(1), 0.9)


# --------------------------------------------------------------------------- predictor and ROI heads
def test_uncertain_predictor():
    torch.manual_seed(0)
    p = UncertainBoxPredictor(16, 3)
    x = torch.randn(5, 16)
    logits, deltas = p(x)
    l2, d2, log_var = p.forward_with_var(x)
    assert logits.shape == (5, 3) and deltas.shape == (5, 12) and log_var.shape == (5, 12)
    assert torch.equal(logits, l2) and torch.equal(deltas, d2) and torch.equal(log_var, torch.zeros(5, 12))
    assert set(p.state_dict()) == {"cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias",
                                   "bbox_log_var.weight", "bbox_log_var.bias"}
    with torch.no_grad():
        p.bbox_log_var.bias.fill_(50.0)
    assert p.forward_with_var(x.reshape(5, 16, 1, 1))[2].max() == 10.0


def tiny_cfg(**kw) -> DetectorConfig:
    return DetectorConfig(name="fasterrcnn_effnet_lite0_fpn", input_size=S, backbone_weights=None, fpn_channels=32,
                          anchor_sizes=(8, 16, 32, 64), rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                          rpn_batch_size_per_image=32, box_batch_size_per_image=32, **kw)


def tiny_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_detector(tiny_cfg(**kw), C, load_pretrained=False)


def tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, S, S, generator=g) for _ in range(3)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0], [30.0, 20.0, 60.0, 52.0]]),
                "labels": torch.tensor([1, 2]), "image_id": 1},
               {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1]), "image_id": 2},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 3}]  # negative
    return images, targets


def torchvision_heads(rh: PoolscoutRoIHeads) -> RoIHeads:
    """A plain torchvision RoIHeads sharing rh's modules and settings."""
    tv = RoIHeads(rh.box_roi_pool, rh.box_head, rh.box_predictor, 0.5, 0.5, 512, 0.25, None,
                  rh.score_thresh, rh.nms_thresh, rh.detections_per_img)
    tv.proposal_matcher, tv.fg_bg_sampler, tv.box_coder = rh.proposal_matcher, rh.fg_bg_sampler, rh.box_coder
    return tv


def test_builders_install_poolscout_heads_and_keep_keys():
    model = tiny_model()
    rh = model.roi_heads
    assert isinstance(rh, PoolscoutRoIHeads) and type(rh.box_predictor).__name__ == "FastRCNNPredictor"
    assert model.poolscout_loss_weights == {}
    assert rh.class_quality.shape == (C,) and rh.class_quality.dtype == torch.float32
    assert rh.class_quality_seen.shape == (C,) and not rh.class_quality_seen.any()
    keys = set(model.state_dict())
    own = {k for k in keys if k.startswith("roi_heads.") and not k.startswith(("roi_heads.box_head.",
                                                                                "roi_heads.box_predictor."))}
    assert own == {"roi_heads.class_quality", "roi_heads.class_quality_seen"}
    var = tiny_model(box_var_head=True)
    assert isinstance(var.roi_heads.box_predictor, UncertainBoxPredictor)
    assert set(var.state_dict()) - keys == {"roi_heads.box_predictor.bbox_log_var.weight",
                                            "roi_heads.box_predictor.bbox_log_var.bias"}
    # the var head does not change the initial values of the other tensors
    sd, vsd = model.state_dict(), var.state_dict()
    assert all(torch.equal(sd[k], vsd[k]) for k in keys)
    with pytest.raises(ValueError, match="box_var_head"):
        build_detector(DetectorConfig(name="fcos_resnet18_fpn", input_size=S, box_var_head=True), C)


def test_switches_off_equal_torchvision_losses():
    model = tiny_model()
    model.train()
    images, targets = tiny_batch()
    configure_detector_losses(model, TrainConfig())
    torch.manual_seed(123)
    ours = model(images, targets)
    rh = model.roi_heads
    assert rh.class_quality_seen.tolist() == [True, True] and (rh.class_quality > 0).all()
    model.roi_heads = torchvision_heads(rh)
    torch.manual_seed(123)
    theirs = model(images, targets)
    assert set(ours) == set(theirs) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), (k, ours[k], theirs[k])
    # gradients too
    g_ours = torch.autograd.grad(sum(ours.values()), list(rh.box_predictor.parameters()))
    g_theirs = torch.autograd.grad(sum(theirs.values()), list(rh.box_predictor.parameters()))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # eval: the parent's forward
    model.eval()
    with torch.no_grad():
        tv_out = model(images)
        model.roi_heads = rh
        model.eval()
        our_out = model(images)
    for a, b in zip(our_out, tv_out):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_box_losses_hand_computed():
    # 3 sampled ROIs, K = 3 (bg, 1, 2), zero deltas (decoded box = proposal), log_var 0 (sigma^2 = 1)
    rh = tiny_model(box_var_head=True).roi_heads.train()
    ln = math.log
    logits = torch.tensor([[0.0, ln(3), 0.0], [0.0, 0.0, 0.0], [ln(2), 0.0, ln(2)]])
    # softmax rows: [1/5, 3/5, 1/5], [1/3]*3, [2/5, 1/5, 2/5]; labels 1, 0, 2 ->
    #   p_gt = 0.6, 1/3, 0.4; CE = -ln 0.6, ln 3, -ln 0.4
    labels = torch.tensor([1, 0, 2])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 40.0, 40.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0], [20.0, 20.0, 40.0, 30.0]])
    # ROI 0: pred = GT -> IoU 1, GIoU 1, EIoU 0, targets 0, smooth L1 0.
    # ROI 2: pred [20,20,40,40] vs GT [20,20,40,30]: inter 200 = union 400 / 2, hull 400 ->
    #   IoU = GIoU = 0.5, EIoU = 1.5^0.8 * 0.5. Targets (weights 10, 10, 5, 5): centres (30, 30)
    #   -> (30, 25), sizes 20x20 -> 20x10: (0, 10 * -5/20, 0, 5 ln 0.5) = (0, -2.5, 0, -3.4657);
    #   smooth L1 (beta 1/9, |x| - 1/18) summed: 2.5 - 1/18 + 5 ln 2 - 1/18 = 5.854627
    targets = rh.box_coder.encode_single(gt, proposals)
    torch.testing.assert_close(targets[2], torch.tensor([0.0, -2.5, 0.0, 5 * ln(0.5)]))
    deltas = torch.zeros(3, 12)
    log_var = torch.zeros(3, 12)
    sl1_2 = 2.5 - 1 / 18 + 5 * ln(2) - 1 / 18
    eiou_2 = 1.5 ** 0.8 * 0.5
    ce = [-ln(0.6), ln(3), -ln(0.4)]

    rh.configure_losses(TrainConfig())  # torchvision's losses
    out = rh.box_losses(logits, deltas, None, proposals, labels, targets, gt)
    assert set(out) == {"loss_classifier", "loss_box_reg"}
    assert float(out["loss_classifier"]) == pytest.approx(sum(ce) / 3, rel=1e-5)
    assert float(out["loss_box_reg"]) == pytest.approx(sl1_2 / 3, rel=1e-5)
    # first observations: Q_1 = 0.6^0.6 * 1^0.4, Q_2 = 0.4^0.6 * 0.5^0.4
    torch.testing.assert_close(rh.class_quality, torch.tensor([0.6 ** 0.6, 0.4 ** 0.6 * 0.5 ** 0.4]))

    # emphasis: weights 1 + (1 - p_gt) = 1.4, 5/3, 1.6 and 1 + (1 - IoU) = 1 (ROI 0), 1.5 (ROI 2)
    rh.configure_losses(TrainConfig(emphasis_loss=True))
    out = rh.box_losses(logits, deltas, None, proposals, labels, targets, gt)
    want_cls = (1.4 * ce[0] + 5 / 3 * ce[1] + 1.6 * ce[2]) / 3
    assert float(out["loss_classifier"]) == pytest.approx(want_cls, rel=1e-5)
    assert float(out["loss_box_reg"]) == pytest.approx(1.5 * sl1_2 / 3, rel=1e-5)

    # all on, lambda 0.4: box = 0.4 * 1.5 * EIoU_2 / 3; aware = 0.6 * (0.5 * smoothL1_2 + 0) / 3
    rh.configure_losses(TrainConfig(emphasis_loss=True, eiou_loss=True, aware_loss=True, loss_lambda=0.4))
    out = rh.box_losses(logits, deltas, log_var, proposals, labels, targets, gt)
    assert float(out["loss_classifier"]) == pytest.approx(want_cls, rel=1e-5)
    assert float(out["loss_box_reg"]) == pytest.approx(0.4 * 1.5 * eiou_2 / 3, rel=1e-5)
    assert float(out["loss_aware"]) == pytest.approx(0.6 * 0.5 * sl1_2 / 3, rel=1e-5)
    # EIoU weighted 10, no emphasis, no lambda: box = 10 * EIoU_2 / 3
    rh.configure_losses(TrainConfig(eiou_loss=True, eiou_weight=10.0))
    out = rh.box_losses(logits, deltas, None, proposals, labels, targets, gt)
    assert float(out["loss_box_reg"]) == pytest.approx(10 * eiou_2 / 3, rel=1e-5)
    # second observation, momentum 0.9, same q: unchanged
    torch.testing.assert_close(rh.class_quality, torch.tensor([0.6 ** 0.6, 0.4 ** 0.6 * 0.5 ** 0.4]))

    # var head present but aware loss off: no loss_aware, the var head still gets a (zero) gradient
    rh.configure_losses(TrainConfig())
    lv = log_var.clone().requires_grad_(True)
    out = rh.box_losses(logits, deltas, lv, proposals, labels, targets, gt)
    assert "loss_aware" not in out and float(out["loss_box_reg"].detach()) == pytest.approx(sl1_2 / 3, rel=1e-5)
    sum(out.values()).backward()
    assert lv.grad is not None and not lv.grad.any()


def test_every_switch_on_trains(tmp_path):
    model = tiny_model(box_var_head=True)
    images, targets = tiny_batch()
    batches = list(zip(images, targets))
    loader = torch.utils.data.DataLoader(batches, batch_size=3, collate_fn=collate)
    cfg = TrainConfig(epochs=1, warmup_iters=1, emphasis_loss=True, eiou_loss=True, eiou_gamma=0.8, aware_loss=True,
                      loss_lambda=0.5, quality_momentum=0.8)
    torch.manual_seed(0)
    hist = train_epochs(model, loader, cfg, progress=False, log=lambda s: None)
    h = hist[0]
    assert {"loss_classifier", "loss_box_reg", "loss_aware", "loss_objectness", "loss_rpn_box_reg"} <= set(h)
    assert all(math.isfinite(h[k]) for k in h if k.startswith("loss"))
    assert sum(v for k, v in h.items() if k.startswith("loss_")) == pytest.approx(h["loss"], rel=1e-5)
    rh = model.roi_heads
    assert rh.emphasis_loss and rh.eiou_loss and rh.aware_loss and rh.loss_lambda == 0.5
    assert rh.quality_momentum == 0.8
    assert (rh.class_quality > 0).all() and rh.class_quality_seen.all()  # classes 1 and 2 are in the batch
    assert rh.box_predictor.bbox_log_var.weight.abs().sum() > 0  # the var head was trained
    # the buffers travel with checkpoints
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, tiny_cfg(box_var_head=True), C)
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.roi_heads.class_quality, rh.class_quality)
    assert torch.equal(loaded.roi_heads.class_quality_seen, rh.class_quality_seen)
    assert isinstance(loaded.roi_heads.box_predictor, UncertainBoxPredictor)
    # a checkpoint written before the buffers existed still loads (quality from zero, with a warning)
    obj = torch.load(path, weights_only=True)
    for k in ("roi_heads.class_quality", "roi_heads.class_quality_seen"):
        del obj["state_dict"][k]
    torch.save(obj, path)
    with pytest.warns(UserWarning, match="class-quality"):
        old, _ = load_checkpoint(path)
    assert not old.roi_heads.class_quality_seen.any()
    # anything else missing is still an error
    del obj["state_dict"]["roi_heads.box_predictor.bbox_log_var.bias"]
    torch.save(obj, path)
    with pytest.raises(RuntimeError, match="bbox_log_var"):
        load_checkpoint(path)


def test_lambda_weights_rpn_box_and_aware():
    base = tiny_model(box_var_head=True)
    images, targets = tiny_batch(1)
    loader = torch.utils.data.DataLoader(list(zip(images, targets)), batch_size=3, collate_fn=collate)
    hists = {}
    for lam in (None, 0.25):
        model = copy.deepcopy(base)
        cfg = TrainConfig(epochs=1, warmup_iters=1, aware_loss=True, loss_lambda=lam)
        torch.manual_seed(7)  # same RPN / ROI sampling draws; one iteration = losses of the same weights
        hists[lam] = train_epochs(model, loader, cfg, progress=False, log=lambda s: None)[0]
        if lam is not None:
            assert model.poolscout_loss_weights == {"loss_objectness": 0.75, "loss_rpn_box_reg": 0.75}
    plain, weighted = hists[None], hists[0.25]
    for k, factor in (("loss_objectness", 0.75), ("loss_rpn_box_reg", 0.75), ("loss_box_reg", 0.25),
                      ("loss_aware", 0.75), ("loss_classifier", 1.0)):
        assert plain[k] > 0
        assert weighted[k] == pytest.approx(factor * plain[k], rel=1e-5), k
    want = sum(weighted[k] for k in ("loss_objectness", "loss_rpn_box_reg", "loss_box_reg", "loss_aware",
                                     "loss_classifier"))
    assert weighted["loss"] == pytest.approx(want, rel=1e-5)


def test_config_errors_name_the_keys():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"train\.aware_loss.*detector\.box_var_head"):
        configure_detector_losses(model, TrainConfig(aware_loss=True))
    with pytest.raises(ValueError, match="loss_lambda"):
        configure_detector_losses(model, TrainConfig(loss_lambda=1.5))
    with pytest.raises(ValueError, match="train.eiou_weight"):
        configure_detector_losses(model, TrainConfig(eiou_loss=True, eiou_weight=0.0))

    class OneStage(torch.nn.Module):
        poolscout_family = "fcos"

    with pytest.raises(ValueError, match="train.eiou_loss.*Faster R-CNN"):
        configure_detector_losses(OneStage(), TrainConfig(eiou_loss=True))
    assert configure_detector_losses(OneStage(), TrainConfig()) == {}


@pytest.mark.gpu
def test_every_switch_on_trains_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model(box_var_head=True)
    images, targets = tiny_batch()
    loader = torch.utils.data.DataLoader(list(zip(images, targets)), batch_size=3, collate_fn=collate)
    cfg = TrainConfig(epochs=1, warmup_iters=1, emphasis_loss=True, eiou_loss=True, aware_loss=True, loss_lambda=0.5)
    hist = train_epochs(model, loader, cfg, device="cuda", progress=False, log=lambda s: None)
    assert all(math.isfinite(v) for k, v in hist[0].items() if k.startswith("loss"))
    assert model.roi_heads.class_quality.is_cuda and (model.roi_heads.class_quality > 0).all()
