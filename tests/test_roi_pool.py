"""The GEMM RoI Align against torchvision's kernel: same values, same gradients."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from poolscout.engine.core.config import DetectorConfig
from poolscout.engine.models.detectors import EFFNET_STAGES, build_detector
from poolscout.engine.models.roi_pool import (GEMM_MAX_PIXELS, GemmMultiScaleRoIAlign, roi_align_auto, roi_align_gemm,
                                              use_gemm_roi_align)


def _rois(gen: torch.Generator, k: int, n: int, extent: float) -> torch.Tensor:
    """Boxes of every kind: inside, straddling and beyond the image, sub-pixel, degenerate."""
    xy = torch.rand(k, 2, generator=gen) * extent * 1.2 - 0.1 * extent
    wh = torch.rand(k, 2, generator=gen) * extent * 0.5
    wh[: k // 8] *= 0.01  # thinner than a feature pixel
    wh[k // 8: k // 6] = 0.0  # x1 == x2
    b = torch.randint(0, n, (k, 1), generator=gen).float()
    return torch.cat([b, xy, xy + wh], 1)


@pytest.mark.parametrize("shape,scale,out,ratio", [
    ((2, 8, 16, 16), 1 / 8, 7, 2),
    ((3, 5, 7, 12), 1 / 4, 7, 2),  # not square, odd sizes
    ((1, 4, 4, 4), 1 / 32, 5, 3),
    ((2, 6, 1, 9), 1 / 16, 3, 1),  # a single row
])
def test_matches_torchvision_values_and_gradients(shape, scale, out, ratio):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    extent = max(shape[-2:]) / scale
    rois = _rois(gen, 48, shape[0], extent).double()
    ref = roi_align(x, rois, (out, out), scale, ratio)
    got = roi_align_gemm(x, rois, out, scale, ratio)
    assert got.shape == ref.shape == (48, shape[1], out, out)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    g_got, = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-10)


def test_images_without_rois_and_no_rois_at_all():
    x = torch.randn(3, 4, 8, 8)
    rois = torch.tensor([[1.0, 2.0, 2.0, 30.0, 20.0]])  # only image 1
    torch.testing.assert_close(roi_align_gemm(x, rois, 7, 0.25, 2), roi_align(x, rois, 7, 0.25, 2))
    assert roi_align_gemm(x, rois[:0], 7, 0.25, 2).shape == (0, 4, 7, 7)


def test_auto_falls_back_where_gemm_does_not_pay_or_apply():
    side = int(GEMM_MAX_PIXELS ** 0.5) + 8  # a map above the threshold
    x = torch.randn(1, 2, side, side)
    rois = torch.tensor([[0.0, 3.0, 4.0, 60.0, 50.0]])
    torch.testing.assert_close(roi_align_auto(x, rois, (7, 7), 0.5, 2), roi_align(x, rois, (7, 7), 0.5, 2))
    small = torch.randn(1, 2, 8, 8)
    # adaptive sampling (ratio 0) and non-square outputs are torchvision's
    torch.testing.assert_close(roi_align_auto(small, rois, (7, 7), 0.125, 0), roi_align(small, rois, (7, 7), 0.125, 0))
    torch.testing.assert_close(roi_align_auto(small, rois, (5, 7), 0.125, 2), roi_align(small, rois, (5, 7), 0.125, 2))
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_gemm(small, rois, 7, 0.125, 0)


def test_multiscale_pooler_matches_torchvision():
    gen = torch.Generator().manual_seed(3)
    feats = OrderedDict((str(i), torch.randn(2, 8, 32 // 2 ** i, 32 // 2 ** i, generator=gen)) for i in range(3))
    feats["pool"] = torch.randn(2, 8, 2, 2, generator=gen)
    boxes = [_rois(gen, 40, 1, 256)[:, 1:].clamp(0, 256) for _ in range(2)]
    shapes = [(256, 256), (256, 256)]
    ref = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)(feats, boxes, shapes)
    got = GemmMultiScaleRoIAlign(["0", "1", "2"], 7, 2)(feats, boxes, shapes)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    one_ref = MultiScaleRoIAlign(["1"], 7, 2)(feats, boxes, shapes)
    torch.testing.assert_close(GemmMultiScaleRoIAlign(["1"], 7, 2)(feats, boxes, shapes), one_ref, rtol=1e-5, atol=1e-5)


def test_detectors_use_it_and_checkpoints_do_not_change():
    model = build_detector(DetectorConfig(input_size=64), 2, load_pretrained=False)
    assert type(model.roi_heads.box_roi_pool) is GemmMultiScaleRoIAlign
    assert not use_gemm_roi_align(model)  # already swapped: nothing to do
    assert not any(k.startswith("roi_heads.box_roi_pool") for k in model.state_dict())


def test_effnet_trainable_backbone_layers_freeze_by_stride():
    def trainable(n):
        body = build_detector(DetectorConfig(input_size=64, trainable_backbone_layers=n), 2,
                              load_pretrained=False).backbone.body
        return {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks") else "")
                for name, p in body.named_parameters() if p.requires_grad}

    default = trainable(None)  # all but the stem
    assert "conv_stem" not in default and {f"blocks.{i}" for i in range(7)} <= default
    assert trainable(5) == default
    assert trainable(3) == {"blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6"}
    assert trainable(1) == {"blocks.5", "blocks.6"}
    assert trainable(0) == set()
    assert len(EFFNET_STAGES) == 5
