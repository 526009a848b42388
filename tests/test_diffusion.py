"""GSAL's diffusion model: DDIM reconstructions against hand-derived cases (fake denoisers),
chunking invariance, and a tiny UNet trained, saved, loaded and resumed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from poolscout.engine.methods import gsal as G
from poolscout.engine.models import diffusion as Df


def _images(n=3, c=1, h=8, w=8, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, c, h, w)).astype(np.float32))


def test_start_timestep_and_errors():
    assert Df.start_timestep(0.25, 10) == 250
    assert Df.start_timestep(0.33, 10) == 330
    assert Df.start_timestep(1.0, 10) == 990
    with pytest.raises(ValueError, match="t0"):
        Df.start_timestep(0.0, 10)
    with pytest.raises(ValueError, match="fewer timesteps"):
        Df.start_timestep(0.001, 10)


def test_zero_noise_denoiser_gives_the_scaled_start_noise():
    """e = 0: every step keeps x0 = x_t0 / sqrt(abar_t0), so x_hat_k = x + c eps_k with
    c = sqrt((1 - abar) / abar), and D, V follow by hand."""
    x = _images()
    keys = [5, 6, 7]
    rec = Df.reconstruct(lambda xt, t: torch.zeros_like(xt), x, keys, k=4, seed=3)
    ab = float(Df.ddim_scheduler().alphas_cumprod[250])
    c = np.sqrt((1 - ab) / ab)
    eps = np.stack([[Df._noise((1, 8, 8), 3, key, j).numpy() for j in range(4)] for key in keys])
    np.testing.assert_allclose(rec.numpy(), x.numpy()[:, None] + c * eps, rtol=1e-4, atol=1e-4)
    d, v = G.difficulty_maps(x.numpy(), rec.numpy())
    np.testing.assert_allclose(d, (c * c * eps[:, :, 0] ** 2).mean(1), rtol=1e-3)
    np.testing.assert_allclose(v, (c * c) * eps[:, :, 0].var(1), rtol=1e-3)


def test_oracle_denoiser_reconstructs_exactly():
    x = _images(2, 3)
    ab = Df.ddim_scheduler().alphas_cumprod
    state = {}

    def oracle(xt, t):  # the true noise of x_t for the images being denoised
        a = ab[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * state["x"]) / (1 - a).sqrt()

    outs = []
    for i in range(2):
        state["x"] = x[i : i + 1].repeat(5, 1, 1, 1)
        outs.append(Df.reconstruct(oracle, x[i : i + 1], [i], k=5, batch=5))
    rec = torch.cat(outs)
    np.testing.assert_allclose(rec.numpy(), x.numpy()[:, None].repeat(5, 1), atol=1e-4)
    d, v = G.difficulty_maps(x.numpy(), rec.numpy())
    assert d.max() < 1e-7 and v.max() < 1e-7


def test_reconstruction_does_not_depend_on_batching():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    den = lambda xt, t: net(xt) * (t.float().view(-1, 1, 1, 1) / 1000.0)  # noqa: E731
    x = _images(5)
    keys = [11, 12, 13, 14, 15]
    full = Df.reconstruct(den, x, keys, k=3, batch=15)
    small = Df.reconstruct(den, x, keys, k=3, batch=2)
    part = Df.reconstruct(den, x[3:], keys[3:], k=3, batch=4)
    np.testing.assert_allclose(full.numpy(), small.numpy(), atol=1e-6)
    np.testing.assert_allclose(full[3:].numpy(), part.numpy(), atol=1e-6)
    # other seeds, other reconstructions
    assert not torch.allclose(full, Df.reconstruct(den, x, keys, k=3, seed=1))


def test_tiny_unet_trains_saves_loads_and_resumes(tmp_path):
    x = _images(8, 1, 16, 16)
    batches = [x[:4], x[4:], x[2:6]]

    def fresh():
        torch.manual_seed(0)
        m = Df.build_unet("cpu-small", channels=1, resolution=16)
        ema = Df.build_unet("cpu-small", channels=1, resolution=16)
        ema.load_state_dict(m.state_dict())
        return m, ema, torch.optim.AdamW(m.parameters(), lr=1e-3)

    m, ema, opt = fresh()
    assert 1e5 < Df.parameter_count(m) < 1e6
    st = Df.train_steps(m, ema, opt, batches, state=Df.TrainState(), steps=4, ema_decay=0.9)
    assert st.step == 4 and len(st.losses) == 4 and all(np.isfinite(st.losses))
    # 2 steps, save, load, 2 more = 4 straight
    m2, ema2, opt2 = fresh()
    st2 = Df.train_steps(m2, ema2, opt2, batches, state=Df.TrainState(), steps=2, ema_decay=0.9)
    Df.save_model(ema2, tmp_path / "dm", model=m2, opt=opt2, state=st2, meta={"preset": "cpu-small"})
    m3, _, opt3 = fresh()
    ema3 = Df.load_model(tmp_path / "dm")
    st3 = Df.load_training(tmp_path / "dm", m3, opt3)
    assert st3.step == 2
    Df.train_steps(m3, ema3, opt3, batches, state=st3, steps=4, ema_decay=0.9)
    for a, b in zip(m.parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(ema.parameters(), ema3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the loaded EMA model reconstructs through the same interface
    rec = Df.reconstruct(Df.unet_denoiser(ema3.eval()), x[:2], [0, 1], k=2, steps=2)
    assert rec.shape == (2, 2, 1, 16, 16) and torch.isfinite(rec).all()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Df.load_model(tmp_path)
    with pytest.raises(ValueError, match="multiple of 4"):
        Df.build_unet("cpu-small", resolution=18)
    with pytest.raises(ValueError, match="preset"):
        Df.build_unet("huge")


def test_map_cache_round_trip(tmp_path):
    c = Df.MapCache(tmp_path / "maps")
    found, maps = c.get(np.array([1, 2]), 4)
    assert not found.any() and maps.shape == (0, 2, 4, 4)
    m = np.random.default_rng(0).random((3, 2, 4, 4)).astype(np.float32)
    c.put(np.array([5, 6, 7]), m)
    (tmp_path / "maps" / "part-broken.arrow").write_bytes(b"not arrow")  # a torn part is skipped
    fresh = Df.MapCache(tmp_path / "maps")
    found, got = fresh.get(np.array([7, 9, 5]), 4)
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(got, m[[2, 0]])
    found8, _ = fresh.get(np.array([5]), 8)  # another resolution: missing
    assert not found8.any()
