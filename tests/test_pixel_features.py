"""engine.models.pixel_features: pixel sampling, batch invariance, the head, mIoU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from poolscout.engine.models import pixel_features as F
from poolscout.engine.models.diffusion import build_unet


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    unet = build_unet("cpu-small", resolution=16)
    return F.UNetFeatures(unet, timesteps=(50, 250), seed=3, device="cpu")


def test_pixel_features_equal_upsampled_blocks_read_at_the_pixel(feats):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (20, 28), dtype=np.uint8)  # W 28 x H 20: not the model's 16 x 16
    x = F.image_to_model(img, 16, 1)[None]
    xs, ys = np.array([0, 27, 13, 5]), np.array([0, 19, 9, 17])
    got = feats(x, [F.grid_coords(xs, ys, 28, 20)])[0]
    assert got.shape == (4, feats.dim) and feats.dim == (32 + 32 + 16) * 2
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # reference: every up block upsampled to 20 x 28 (bilinear), read at the pixels, concatenated
    caught = []
    hooks = [b.register_forward_hook(lambda m, a, o: caught.append(o)) for b in feats.unet.up_blocks]
    ref = []
    ab = feats._ab
    with torch.no_grad():
        for t in (50, 250):
            caught.clear()
            xt = ab[t].sqrt() * x + (1 - ab[t]).sqrt() * feats.noise(0)[None]
            feats.unet(xt, torch.tensor([t]))
            for fm in caught:
                up = torch.nn.functional.interpolate(fm, size=(20, 28), mode="bilinear", align_corners=False)
                ref.append(up[0][:, ys, xs].T)
    for h in hooks:
        h.remove()
    ref = torch.nn.functional.normalize(torch.cat(ref, dim=1), dim=1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_features_do_not_depend_on_the_batch_and_noise_is_fixed(feats):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(3)]
    x = torch.stack([F.image_to_model(i, 16, 1) for i in imgs])
    coords = [F.grid_coords(rng.integers(0, 16, n), rng.integers(0, 16, n), 16, 16) for n in (5, 1, 9)]
    together = feats(x, coords)
    alone = [feats(x[i : i + 1], [coords[i]])[0] for i in range(3)]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)
    again = feats(x, coords, k=0)
    other = feats(x, coords, k=2)
    assert np.array_equal(again[0], together[0]) and not np.allclose(other[0], together[0])
    fresh = F.UNetFeatures(feats.unet, timesteps=(50, 250), seed=3, device="cpu")
    np.testing.assert_array_equal(fresh(x, coords, k=2)[2], other[2])  # the noises are fixed per (seed, k)
    with pytest.raises(ValueError, match="timesteps"):
        F.UNetFeatures(feats.unet, timesteps=(1000,))
    with pytest.raises(ValueError, match="up blocks"):
        F.UNetFeatures(feats.unet, blocks=(7,))


def test_head_learns_separable_pixels_deterministically():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 8))
    y = rng.integers(0, 3, 600)
    y[:5] = 2  # class 2 is rare in what follows
    x = (centres[y] + 0.15 * rng.normal(0, 1, (600, 8))).astype(np.float32)
    head, losses = F.train_head(x, y, 3, epochs=30, seed=1)
    assert losses[-1] < losses[0] / 5
    acc = (F.predict_proba(head, x).argmax(1) == y).mean()
    assert acc > 0.97
    head2, losses2 = F.train_head(x, y, 3, epochs=30, seed=1)
    assert losses2 == losses
    with pytest.raises(ValueError, match="labels must lie"):
        F.train_head(x, np.full(600, 3), 3, epochs=1)


def test_class_weights_by_hand():
    y = np.array([0] * 96 + [1] + [2] * 3)  # class 3 unlabeled
    # sqrt: 1/sqrt(96), 1, 1/sqrt(3), scaled so that sum(w * count) = 100
    s = 100 / (96 / np.sqrt(96) + 1 + 3 / np.sqrt(3))
    np.testing.assert_allclose(F.class_weight_vector(y, 4), [s / np.sqrt(96), s, s / np.sqrt(3), 0], rtol=1e-6)
    # inverse: each labeled class carries a third of the loss
    np.testing.assert_allclose(F.class_weight_vector(y, 4, "inverse"), [100 / 3 / 96, 100 / 3, 100 / 9, 0], rtol=1e-6)
    assert F.class_weight_vector(y, 4, "none") is None
    with pytest.raises(ValueError, match="class weights"):
        F.class_weight_vector(y, 4, "balanced")
    # the single rare pixel weighs sqrt(96) ~ 9.8x a background one, not 96x
    w = F.class_weight_vector(y, 4)
    assert w[1] / w[0] == pytest.approx(np.sqrt(96), rel=1e-6)


def test_eval_grid_by_hand():
    from poolscout.engine.models.pixel_stage import eval_grid

    px, py = eval_grid(4, 2)  # one cell per pixel
    assert px.tolist() == [0, 1, 2, 3] * 2 and py.tolist() == [0] * 4 + [1] * 4
    px, py = eval_grid(8, 4, 4)  # 4 x 2 cells of 2 x 2 pixels: their centres
    assert px.tolist() == [1, 3, 5, 7] * 2 and py.tolist() == [1] * 4 + [3] * 4


def test_confusion_and_miou_by_hand():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    conf = F.confusion(pred, gt, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    miou, per = F.iou_from_confusion(conf)
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (3 + 2 - 2) = 2/3, IoU2 = 0 / (0 + 1 - 0) = 0
    assert per == pytest.approx([1 / 3, 2 / 3, 0.0]) and miou == pytest.approx(1 / 3)
    assert F.iou_from_confusion(np.zeros((2, 2)))[1] == [None, None]
