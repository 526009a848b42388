"""RoI Align on CPU as two small matrix products, for the feature maps of small images.

Torchvision's CPU `roi_align` visits every sample of every bin of every channel in scalar
code, and its backward scatters them one by one: on the CPU preset (128-160 px images,
FPN maps of 16 x 16 and smaller) it was a quarter of a training step. RoI Align is linear
in the features and separable in x and y, so for ROI k and channel c

    out[k, c] = Wy_k @ F[b_k, c] @ Wx_k^T

where Wx_k (P x W) holds, for each output column, the mean over its `sampling_ratio`
samples of the bilinear weights on the pixel columns, and Wy_k (P x H) the same for rows.
Forward and backward are then dense GEMMs; the cost grows with H * W instead of with the
number of samples, so large maps (H * W above `GEMM_MAX_PIXELS`) and GPUs keep
torchvision's kernel. The sampling follows torchvision's `roi_align(aligned=False)`
exactly: bin size max(roi, 1) / P, samples at (i + 0.5) / sampling_ratio of a bin,
coordinates clamped to the map, samples beyond [-1, size] count as zero.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import poolers as _poolers

# Above this many pixels per map the GEMM does more work than torchvision's sample loop
# (measured on 1 thread, forward + backward: 4x faster at 16 x 16, 2.4x at 32 x 32).
GEMM_MAX_PIXELS = 1024


def _axis_weights(start: Tensor, length: Tensor, size: int, out: int, ratio: int) -> Tensor:
    """(K, out, size): per output bin, the mean bilinear weight of its samples on each pixel."""
    k = start.shape[0]
    t = (torch.arange(out * ratio, dtype=start.dtype, device=start.device) + 0.5) / ratio
    p = start[:, None] + t[None, :] * (length / out)[:, None]  # (K, out * ratio) sample coordinates
    valid = ((p >= -1.0) & (p <= size)).to(start.dtype)
    p = p.clamp(0, size - 1)
    lo = p.floor().clamp(max=max(size - 2, 0))
    frac = p - lo
    i0 = lo.long()
    i1 = (i0 + 1).clamp(max=size - 1)
    w = torch.zeros(k, out * ratio, size, dtype=start.dtype, device=start.device)
    w.scatter_add_(2, i0[..., None], ((1 - frac) * valid)[..., None])
    w.scatter_add_(2, i1[..., None], (frac * valid)[..., None])
    return w.reshape(k, out, ratio, size).mean(2)


def roi_align_gemm(x: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int) -> Tensor:
    """torchvision's `roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned=False)`
    computed as separable matrix products (differentiable in `x`).

    Args:
        x: (N, C, H, W) features.
        rois: (K, 5) rows (batch index, x1, y1, x2, y2) in image pixels.
        output_size: P (square output).
        spatial_scale: feature pixels per image pixel.
        sampling_ratio: samples per bin along each axis (> 0).

    Returns:
        (K, C, P, P).
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_gemm needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    n, c, h, w = x.shape
    k = rois.shape[0]
    p = int(output_size)
    out = x.new_zeros((k, c, p, p))
    if k == 0:
        return out
    r = rois[:, 1:].to(x.dtype) * spatial_scale
    wx = _axis_weights(r[:, 0], (r[:, 2] - r[:, 0]).clamp(min=1.0), w, p, sampling_ratio)  # (K, P, W)
    wy = _axis_weights(r[:, 1], (r[:, 3] - r[:, 1]).clamp(min=1.0), h, p, sampling_ratio)  # (K, P, H)
    batch = rois[:, 0].long()
    for b in range(n):
        idx = (batch == b).nonzero().flatten()
        m = idx.numel()
        if m == 0:
            continue
        rows = wy[idx].reshape(m * p, h) @ x[b].transpose(0, 1).reshape(h, c * w)  # (m*P, C*W): rows pooled
        pooled = torch.bmm(rows.reshape(m, p * c, w), wx[idx].transpose(1, 2))  # (m, P*C, P): columns pooled
        out = out.index_copy(0, idx, pooled.reshape(m, p, c, p).transpose(1, 2))
    return out


def roi_align_auto(x: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int) -> Tensor:
    """`roi_align_gemm` for small CPU maps, torchvision's `roi_align` otherwise."""
    size = output_size if isinstance(output_size, int) else tuple(output_size)
    square = isinstance(size, int) or (len(size) == 2 and size[0] == size[1])
    if (x.device.type == "cpu" and square and sampling_ratio > 0 and x.shape[-2] * x.shape[-1] <= GEMM_MAX_PIXELS
            and not torch.jit.is_scripting()):
        return roi_align_gemm(x, rois, size if isinstance(size, int) else size[0], spatial_scale, sampling_ratio)
    return roi_align(x, rois, output_size=size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)


class GemmMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same level mapping, same output) with `roi_align_auto`
    per level. No parameters or buffers: checkpoints are interchangeable."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = _poolers._filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _poolers._setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _poolers._convert_to_roi_format(boxes)
        if len(feats) == 1:
            return roi_align_auto(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        result = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                result[idx] = roi_align_auto(feat, rois[idx], self.output_size, scale,
                                             self.sampling_ratio).to(result.dtype)
        return result


def use_gemm_roi_align(model: torch.nn.Module) -> bool:
    """Swap a Faster R-CNN's box RoI pooler for `GemmMultiScaleRoIAlign` (same settings).

    Returns True when a pooler was swapped.
    """
    heads = getattr(model, "roi_heads", None)
    pool = getattr(heads, "box_roi_pool", None)
    if type(pool) is not MultiScaleRoIAlign:
        return False
    new = GemmMultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio,
                                 canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)
    heads.box_roi_pool = new
    return True


__all__ = ["GEMM_MAX_PIXELS", "GemmMultiScaleRoIAlign", "roi_align_auto", "roi_align_gemm", "use_gemm_roi_align"]
