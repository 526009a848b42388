"""Shared fixtures: one local Ray per test session, a tiny synthetic pool, a tiny config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POOLSCOUT_SHARED", REPO.parent / "shared"))

TINY_SETTINGS = [
    "detector.input_size=64",
    "detector.anchor_sizes=[8,16,32,64]",
    "detector.fpn_channels=32",
    "detector.rpn_pre_nms_top_n_test=100",
    "detector.rpn_post_nms_top_n_test=50",
    "detector.rpn_pre_nms_top_n_train=100",
    "detector.rpn_post_nms_top_n_train=50",
    "detector.score_thresh=0.0",
    "detector.max_boxes=20",
    "train.epochs=1",
    "train.batch_size=4",
    "train.warmup_iters=2",
    "score.batch_size=4",
    "score.decode_batch_size=8",
]


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for the whole session (start-up costs ~5 s)."""
    from poolscout.jobs.ray_env import connect

    info = connect(num_cpus=2, quiet=True)
    yield info


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """A seeded synthetic pool of 24 images (64 px) with COCO annotations."""
    from poolscout.engine.data.synthetic import generate

    out = tmp_path_factory.mktemp("tiny_pool")
    return generate(out, n_images=24, size=64, seed=3)


@pytest.fixture(scope="session")
def neu_det():
    p = SHARED / "data" / "neu_det"
    if not p.is_dir():
        pytest.skip(f"NEU-DET not found at {p}")
    return p


@pytest.fixture
def torch_threads():
    """Two torch threads for the test, restored afterwards (and the RNG state too)."""
    import torch

    old = torch.get_num_threads()
    state = torch.random.get_rng_state()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)
    torch.random.set_rng_state(state)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored afterwards: small models on a busy 2-core
    machine run many times faster on one thread than on two that spin."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(old)
