"""Failures after init are per cycle, not final: scoring (defect 3), training (defect 7),
and `--retry-rejects` for init's rejects."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from poolscout.engine.core import io
from poolscout.engine.core.config import load_config
from poolscout.engine.core.run import RunDir
from poolscout.engine.data.pool import init_run
from tests.conftest import TINY_SETTINGS
from tests.conftest_data import corrupt_png_pixels

SETTINGS = [*TINY_SETTINGS, "train.torch_threads=1", "score.torch_threads=1", "score.views=[orig]",
            "loop.executor=local", "score.embed_labeled=false"]




@pytest.fixture()
def pool_copy(tmp_path, tiny_pool):
    images = tmp_path / "images"
    shutil.copytree(tiny_pool["images"], images)
    return {"images": images, "annotations": Path(tiny_pool["annotations"])}


def _init(tmp_path, pool, extra=()) -> tuple[RunDir, object]:
    cfg = load_config([], [*SETTINGS, *extra])
    run = RunDir(tmp_path / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.3, cfg=cfg, progress=False)
    return run, cfg


def _counts(run: RunDir) -> dict:
    led = run.read_ledger().to_pydict()
    return {s: led["state"].count(s) for s in ("pool", "labeled", "test", "rejected")}


def test_a_one_off_override_at_scoring_does_not_empty_the_pool(tmp_path, pool_copy, torch_threads):
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select
    from poolscout.jobs.train import train

    run, cfg = _init(tmp_path, pool_copy)
    before = _counts(run)
    train(run, cfg, progress=False)
    broken = load_config([], [*SETTINGS, "dataset.max_pixels=16"])  # every image "too large" now
    s = score(run, broken, progress=False)
    assert s["scored"] == 0 and s["failed"] == before["pool"]
    assert _counts(run) == before  # the ledger did not move
    fails = io.read_table(run.cycle_dir(0) / "rejects.parquet")
    assert fails.num_rows == before["pool"] and set(fails["stage"].to_pylist()) == {"score"}
    with pytest.raises(Exception, match="failed at scoring"):
        select(run, cfg, strategy="entropy", budget=2)
    again = score(run, cfg, progress=False)  # same model, same work list: finished unless forced
    assert again.get("skipped")
    s2 = score(run, cfg, progress=False, force=True)
    assert s2["scored"] == before["pool"] and s2["failed"] == 0
    assert not (run.cycle_dir(0) / "rejects.parquet").exists()
    assert select(run, cfg, strategy="entropy", budget=2)["selected"] == 2


def test_a_labeled_image_with_corrupt_pixels_is_skipped_and_training_goes_on(tmp_path, pool_copy, torch_threads):
    from poolscout.jobs.train import train

    run, cfg = _init(tmp_path, pool_copy)
    man = io.read_table(run.manifest).to_pydict()
    lab = set(run.ids_in_state("labeled").tolist())
    victim = next(u for i, u in zip(man["image_id"], man["uri"]) if i in lab)
    good = Path(victim).read_bytes()
    corrupt_png_pixels(Path(victim), Path(victim))
    s = train(run, cfg, progress=False)
    assert run.model_path(0).is_file()
    fails = io.read_table(run.cycle_dir(0) / "rejects.parquet").to_pydict()
    assert fails["uri"] == [victim] and fails["stage"] == ["train"]
    assert "corrupt" in fails["reason"][0] or "image" in fails["reason"][0]
    assert s["failed_images"] == 1
    assert _counts(run)["labeled"] == len(lab)  # still labeled: the next training tries it again
    Path(victim).write_bytes(good)


def test_retry_rejects_restores_images_fixed_since_init(tmp_path, pool_copy):
    from poolscout.engine.data.rejects import retry_rejects

    names = sorted(p.name for p in pool_copy["images"].iterdir())
    victim = pool_copy["images"] / names[3]
    good = victim.read_bytes()
    victim.write_bytes(good[:20])  # truncated: init rejects it
    run, cfg = _init(tmp_path, pool_copy)
    before = _counts(run)
    assert before["rejected"] == 1
    anns_before = io.read_table(run.annotations).num_rows
    assert retry_rejects(run, cfg, progress=False) == {"retried": 1, "restored": 0, "still_rejected": 1}
    victim.write_bytes(good)  # the file is copied again
    assert retry_rejects(run, cfg, progress=False) == {"retried": 1, "restored": 1, "still_rejected": 0}
    after = _counts(run)
    assert after["rejected"] == 0 and after["pool"] == before["pool"] + 1
    man = io.read_table(run.manifest).to_pydict()
    row = man["source_key"].index(names[3])
    assert man["width"][row] > 0 and man["height"][row] > 0
    iid = man["image_id"][row]
    anns = io.read_table(run.annotations).to_pydict()
    assert anns_before < len(anns["image_id"]) and iid in anns["image_id"]  # its boxes are back
    assert len(set(anns["ann_id"])) == len(anns["ann_id"])
    rej = io.read_table(run.rejects)
    assert iid not in rej["image_id"].to_pylist()
    led = run.read_ledger().num_rows
    assert led == len(man["image_id"]) == sum(after.values())
    assert np.all(np.diff(io.read_table(run.manifest)["image_id"].to_numpy()) > 0)


def test_files_changed_after_init_are_refused_at_scoring(tmp_path, pool_copy, torch_threads):
    """A pool file swapped for a symlink to an image outside the root, and one replaced by an
    image of another size, fail this cycle's scoring with the reason (defect 8)."""
    from PIL import Image

    from poolscout.jobs.score import score
    from poolscout.jobs.train import train

    run, cfg = _init(tmp_path, pool_copy)
    train(run, cfg, progress=False)
    man = io.read_table(run.manifest).to_pydict()
    pool_ids = set(run.ids_in_state("pool").tolist())
    a, b = [u for i, u in zip(man["image_id"], man["uri"]) if i in pool_ids][:2]
    outside = tmp_path / "outside.png"
    shutil.copy(a, outside)
    Path(a).unlink()
    Path(a).symlink_to(outside)
    Image.new("RGB", (40, 30), (90, 90, 90)).save(b)
    s = score(run, cfg, progress=False)
    assert s["failed"] == 2
    fails = io.read_table(run.cycle_dir(0) / "rejects.parquet").to_pydict()
    reasons = dict(zip(fails["uri"], fails["reason"]))
    assert "escapes images root" in reasons[a]
    assert "changed since init" in reasons[b] and "40x30" in reasons[b]
