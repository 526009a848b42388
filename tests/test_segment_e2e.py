"""A tiny synthetic segmentation loop: init with masks -> diffusion model -> rounds of
candidates, selection, oracle, label features, head, mIoU; resume after a kill."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

from poolscout.engine.core import io
from poolscout.engine.core.config import load_config
from poolscout.engine.core.run import RunDir
from poolscout.engine.data import segmentation as S
from poolscout.engine.data.synthetic import generate

CLASSES = ["scratch", "inclusion", "patch", "pit"]
TINY = ["dataset.classes=[scratch,inclusion,patch,pit]", "loop.executor=local", "gsal.resolution=16",
        "gsal.train_batch_size=4", "gsal.checkpoint_every=4", "segment.timesteps=[50,250]",
        "segment.candidates=60", "segment.local_budget=6", "segment.budget=12", "segment.noises=2",
        "segment.head_epochs=5", "segment.eval_max_side=24", "segment.batch_size=4", "detector.input_size=48",
        "segment.threads=1"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    from poolscout.jobs.diffusion import train_diffusion
    from poolscout.jobs.segment import init_segmentation

    root = tmp_path_factory.mktemp("seg_e2e")
    pool = generate(root / "pool", n_images=16, size=48, seed=5, masks=True, clean_fraction=0.2, defect_scale=2.0)
    names = sorted(p.name for p in pool["images"].iterdir())
    (root / "test.txt").write_text("".join(n + "\n" for n in names[-4:]))
    cfg = load_config([], TINY)
    run = RunDir(root / "run")
    s = init_segmentation(run, images=pool["images"], masks=pool["masks"], test=root / "test.txt", cfg=cfg,
                          progress=False)
    assert s["masks"] == 16 and s["test"] == 4 and s["pool"] == 12 and s["rejected"] == 0
    # the same inputs again: nothing redone
    assert init_segmentation(run, images=pool["images"], masks=pool["masks"], test=root / "test.txt", cfg=cfg,
                             progress=False)["masks"] == 16
    train_diffusion(run, run.config([], TINY), steps=4, progress=False, executor="local", log=lambda m: None)
    return run, pool


@pytest.mark.parametrize("strategy", ["two_stage", "random"])
def test_rounds_label_distinct_pixels_and_report_miou(seg_run, strategy, tmp_path):
    from poolscout.jobs.segment import run_segmentation

    base, _ = seg_run
    run = RunDir(tmp_path / "run")
    shutil.copytree(base.root, run.root)
    ov = [*TINY, f"segment.strategy={strategy}"]
    cfg = run.config([], ov)
    logs = []
    res = run_segmentation(run, cfg, rounds=2, progress=False, log=logs.append, overrides=ov)
    ms = res["rounds"]
    assert [m["round"] for m in ms] == [0, 1, 2]
    assert [m["labeled_pixels"] for m in ms] == [12, 24, 36]
    for m in ms:
        assert 0.0 <= m["eval"]["miou"] <= 1.0 and m["eval"]["test_images"] == 4
        assert set(m["eval"]["per_class_iou"]) == {"background", *CLASSES}
    led = S.PixelLedger(run.root).read()
    keys = S.pixel_keys(led["image_id"].to_numpy(), led["x"].to_numpy(), led["y"].to_numpy())
    assert len(np.unique(keys)) == led.num_rows == 36  # a pixel is labeled once
    pool = set(run.ids_in_state("pool").tolist())
    assert set(led["image_id"].to_pylist()) <= pool  # only pool images are labeled, never test ones
    # the oracle's answers are the masks' classes
    masks = io.read_table(run.root / "masks.parquet")
    uri = dict(zip(masks["image_id"].to_pylist(), masks["mask_uri"].to_pylist()))
    from PIL import Image

    for i, x, y, c in zip(*(led[k].to_pylist() for k in ("image_id", "x", "y", "class"))):
        assert np.asarray(Image.open(uri[i]))[y, x] == c
    sel = io.read_table(run.cycle_dir(1) / "pixel_selection.parquet")
    if strategy == "two_stage":
        assert "global herding" in sel["stage"][0].as_py() and "eDALD top 12" in sel["stage"][0].as_py()
        s0 = io.read_table(run.cycle_dir(0) / "pixel_selection.parquet")["stage"][0].as_py()
        assert s0 == "global herding (no head yet)"
        assert np.all(np.diff(sel["score"].to_numpy()) <= 0)  # ranked by eDALD
    assert any("[round 2] evaluate done: mIoU" in m for m in logs)
    # the candidate pass computed only what the strategy reads: random nothing (no UNet pass),
    # two_stage entropy, MI (the noisy passes) and local herding
    from poolscout.jobs.segment import _read_dir

    cand = _read_dir(run.cycle_dir(1) / "candidates")
    ent = pa.compute.list_flatten(cand["entropy"]).to_numpy(zero_copy_only=False)
    mi = pa.compute.list_flatten(cand["mi"]).to_numpy(zero_copy_only=False)
    n_local = len(pa.compute.list_flatten(cand["local_idx"]))
    if strategy == "random":
        assert np.isnan(ent).all() and np.isnan(mi).all() and n_local == 0
    else:
        assert np.isfinite(ent).all() and np.isfinite(mi).all() and n_local > 0
    head = json.loads((run.cycle_dir(2) / "head.json").read_text())
    assert head["pixels"] == 36 and sum(head["class_counts"]) == 36
    if strategy == "two_stage":  # the report: curve, table, overlays with the labels' colours
        from PIL import Image

        from poolscout.engine.evaluation import seg_report as R

        page = R.write_report(run.root, tmp_path / "report")
        text = page.read_text()
        assert "mIoU" in text and text.count("<h3>Round") == 3 and "round_2.png" in text
        assert (tmp_path / "report" / "curve.png").is_file()
        info = R.overlay(run.root, 1, tmp_path / "o.png", max_images=4, thumb=96)
        assert info["pixels"] >= 1 and 1 <= info["images"] <= 4
        im = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
        sel = io.read_table(run.cycle_dir(1) / "pixel_selection.parquet")
        tile = info["tiles"][0]
        mine = sel.filter(pa.compute.equal(sel["image_id"], tile["image_id"]))
        x, y = mine["x"][0].as_py(), mine["y"][0].as_py()
        lab = {(i, a, b): c for i, a, b, c in zip(*(led[n].to_pylist() for n in ("image_id", "x", "y", "class")))}
        cx = int(tile["x0"] + (x + 0.5) * tile["scale"])
        cy = int(tile["y0"] + (y + 0.5) * tile["scale"])
        near = {tuple(p) for p in im[max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3].reshape(-1, 3)}
        assert tuple(R.color(lab[(tile["image_id"], x, y)])) in near  # the dot has its label's colour


def test_a_killed_round_resumes_to_the_same_result(seg_run, tmp_path):
    from poolscout.jobs.segment import run_segmentation

    base, _ = seg_run
    run = RunDir(tmp_path / "run")
    shutil.copytree(base.root, run.root)
    cfg = run.config([], TINY)
    full = run_segmentation(run, cfg, rounds=1, progress=False, log=lambda m: None)["rounds"][-1]
    sel = io.read_table(run.cycle_dir(1) / "pixel_selection.parquet")
    # a kill after labeling round 1: its features, head and metrics are gone, half of the
    # candidate pass too
    k1 = run.cycle_dir(1)
    for p in ("head.pt", "head.json", "metrics.json"):
        (k1 / p).unlink()
    (run.root / "pixel_feats" / "part-00001.parquet").unlink()
    shutil.rmtree(k1 / "eval")
    again = run_segmentation(run, cfg, rounds=1, progress=False, log=lambda m: None)["rounds"][-1]
    assert again["eval"] == full["eval"] and again["labeled_pixels"] == full["labeled_pixels"]
    # a kill in the candidate pass (before selection and labels): redone, the same picks come out
    (k1 / "pixel_selection.parquet").unlink()
    (k1 / "candidates" / "_done").unlink()
    next(iter(sorted((k1 / "candidates").glob("part-*.parquet")))).unlink()
    S.PixelLedger(run.root).part_path(1, "oracle").unlink()
    for p in ("head.pt", "head.json", "metrics.json"):
        (k1 / p).unlink()
    shutil.rmtree(k1 / "eval")
    (run.root / "pixel_feats" / "part-00001.parquet").unlink()
    third = run_segmentation(run, cfg, rounds=1, progress=False, log=lambda m: None)["rounds"][-1]
    assert io.read_table(k1 / "pixel_selection.parquet").equals(sel)
    assert third["eval"] == full["eval"]


def test_human_points_wait_and_import(seg_run, tmp_path):
    from poolscout.jobs.segment import import_points, run_segmentation

    base, pool = seg_run
    run = RunDir(tmp_path / "run")
    shutil.copytree(base.root, run.root)
    ov = [*TINY, "loop.oracle=human"]
    cfg = run.config([], ov)
    res = run_segmentation(run, cfg, rounds=1, progress=False, log=lambda m: None)
    assert res["rounds"] == [] and res["pending"].endswith("pixels_to_label.csv")
    lines = open(res["pending"]).read().splitlines()
    assert lines[0] == "image,x,y,class" and len(lines) == 13
    from poolscout.jobs.segment import segment_status

    st = segment_status(run)
    assert st["pending"] == res["pending"] and st["rounds"][0]["steps"] == ["selection"]
    assert st["labeled_pixels"] == 0 and st["ledger"]["test"] == 4
    # people answer every pick (here: from the masks)
    masks = io.read_table(run.root / "masks.parquet")
    man = io.read_table(run.manifest)
    key_to_id = dict(zip(man["source_key"].to_pylist(), man["image_id"].to_pylist()))
    uri = dict(zip(masks["image_id"].to_pylist(), masks["mask_uri"].to_pylist()))
    from PIL import Image

    out = ["image,x,y,class"]
    for ln in lines[1:]:
        k, x, y, _ = ln.split(",")
        c = int(np.asarray(Image.open(uri[key_to_id[k]]))[int(y), int(x)])
        out.append(f"{k},{x},{y},{['background', *CLASSES][c]}")
    f = tmp_path / "answers.csv"
    f.write_text("\n".join(out) + "\n")
    r = import_points(run, cfg, f, cycle=0)
    assert r["added"] == 12 and r["skipped"] == 0
    assert import_points(run, cfg, f, cycle=0)["resumed"]  # the same file again: nothing twice
    # a label on a test image is refused (it would train on what mIoU measures), naming the file
    test_key = next(k for k, i in key_to_id.items() if i in set(run.ids_in_state("test").tolist()))
    bad = tmp_path / "leak.csv"
    bad.write_text(f"image,x,y,class\n{test_key},1,1,background\n")
    with pytest.raises(ValueError, match=r"leak\.csv: 1 point label\(s\) on 1 test image"):
        import_points(run, cfg, bad, cycle=0)
    res = run_segmentation(run, cfg, rounds=1, progress=False, log=lambda m: None)
    assert [m["round"] for m in res["rounds"]] == [0] and res["pending"].endswith("pixels_to_label.csv")
    # `poolscout status` on a segmentation run: rounds, mIoU, what it waits for
    from click.testing import CliRunner

    from poolscout.jobs.cli import cli

    out = CliRunner().invoke(cli, ["status", str(run.root)])
    assert out.exit_code == 0, out.output
    assert "(segmentation)" in out.output and "labeled  12 pixels" in out.output
    assert "selection, label, features, train, evaluate" in out.output and "waiting  label the pixels" in out.output


@pytest.mark.ray
def test_ray_data_and_ray_train_give_the_local_result(seg_run, tmp_path, ray_session):
    """Round 0 and 1 on Ray (feature passes as Ray Data actors, the head as a Ray Train job in
    round 1) pick the pixels and reach the mIoU of the in-process run."""
    from poolscout.jobs.segment import run_segmentation

    base, _ = seg_run
    runs = {}
    for ex in ("local", "ray"):
        run = RunDir(tmp_path / ex)
        shutil.copytree(base.root, run.root)
        ov = [*TINY, f"loop.executor={ex}"]
        runs[ex] = run
        cfg = run.config([], ov)
        run_segmentation(run, cfg, rounds=0, executor=ex, progress=False, log=lambda m: None, overrides=ov)
        if ex == "ray":  # round 1's head through Ray Train (round 0's ran in-process: one local worker)
            ov = [*ov, "train.backend=ray_train"]
            cfg = run.config([], ov)
        run_segmentation(run, cfg, rounds=1, executor=ex, progress=False, log=lambda m: None, overrides=ov)
    for k in (0, 1):
        a = io.read_table(runs["local"].cycle_dir(k) / "pixel_selection.parquet")
        b = io.read_table(runs["ray"].cycle_dir(k) / "pixel_selection.parquet")
        assert a.select(["image_id", "x", "y"]).equals(b.select(["image_id", "x", "y"]))
        ma = json.loads((runs["local"].cycle_dir(k) / "metrics.json").read_text())
        mb = json.loads((runs["ray"].cycle_dir(k) / "metrics.json").read_text())
        assert ma["eval"] == mb["eval"]
    assert json.loads((runs["ray"].cycle_dir(1) / "head.json").read_text())["executor"] == "ray_train"
