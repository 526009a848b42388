"""`poolscout run / import / status / report / demo` end to end on tiny data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import TINY_SETTINGS
from tests.test_loop import _init


def _cli(*args):
    from poolscout.jobs.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _answers(run, ids, path: Path) -> Path:
    """A COCO answer file for `ids`, boxes taken from the run's GT."""
    from poolscout.engine.core import io

    man = io.read_table(run.manifest).to_pydict()
    row = {i: k for k, i in enumerate(man["image_id"])}
    ann = io.read_table(run.annotations).to_pydict()
    images, anns = [], []
    for n, i in enumerate(ids):
        k = row[int(i)]
        images.append({"id": n + 1, "file_name": man["source_key"][k], "width": man["width"][k],
                       "height": man["height"][k]})
        for j, a in enumerate(ann["image_id"]):
            if a == int(i):
                x1, y1, x2, y2 = (ann[c][j] for c in ("x1", "y1", "x2", "y2"))
                anns.append({"id": len(anns) + 1, "image_id": n + 1, "category_id": ann["category_id"][j],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1)})
    cats = run.read_categories()
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_human_oracle_pauses_then_resumes_after_import(tmp_path, tiny_pool, torch_threads):
    from poolscout.engine.core import io
    from poolscout.engine.core.run import RunDir

    # a seed set given at init (the human oracle does not pick one)
    names = sorted(p.name for p in Path(tiny_pool["images"]).iterdir())
    seed = tmp_path / "seed.txt"
    seed.write_text("".join(n + "\n" for n in names[:6]))
    run = _init(tmp_path, tiny_pool, "human", ["loop.oracle=human", "loop.cycles=1"], labeled=seed)
    res = _cli("run", run.root, "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "waiting_for_labels"
    st = _cli("status", run.root)
    assert "waiting" in st.stdout and "0 of 4" in st.stdout
    assert (run.export_dir(0) / "coco.json").is_file()  # the batch went out to annotators
    sel = io.read_table(run.selection_path(0))["image_id"].to_numpy()

    part = _answers(run, sel[:2], tmp_path / "part.json")
    r = _cli("import", run.root, "--labels", part)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["imported"] == 2 and json.loads(r.stdout)["missing"] == 2
    r = _cli("import", run.root, "--labels", part)  # idempotent
    assert json.loads(r.stdout)["imported"] == 0 and json.loads(r.stdout)["unchanged"] == 2
    res = _cli("run", run.root, "--quiet")
    assert json.loads(res.stdout)["status"] == "waiting_for_labels"

    # a conflicting answer for an already answered image names it
    bad = json.loads(part.read_text())
    bad["annotations"][0]["bbox"][0] += 3.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = _cli("import", run.root, "--labels", tmp_path / "bad.json")
    assert r.exit_code == 2 and bad["images"][0]["file_name"].split("/")[-1].split(".")[0] in r.stderr

    full = _answers(run, sel, tmp_path / "full.json")
    r = _cli("import", run.root, "--labels", full)
    assert json.loads(r.stdout)["imported"] == 2 and json.loads(r.stdout)["missing"] == 0
    res = _cli("run", run.root, "--quiet")
    assert json.loads(res.stdout)["status"] == "done", res.output
    led = RunDir(run.root).read_ledger().to_pydict()
    lab = [i for i, s, c in zip(led["image_id"], led["state"], led["cycle"]) if s == "labeled" and c == 1]
    assert sorted(lab) == sorted(sel.tolist())
    st = json.loads(_cli("status", run.root, "--json").stdout)
    assert st["status"] == "done" and st["cycles"][1]["labeled_images"] == 10


@pytest.mark.ray
def test_demo_end_to_end_tiny(tmp_path, ray_session):
    sets = [a for s in TINY_SETTINGS for a in ("--set", s)]
    out = tmp_path / "demo"
    res = _cli("demo", "--out", out, "--images", 40, "--size", 64, "--cycles", 1, "--budget", 4,
               "--seed-size", 6, "--seeds", "0,1", "--quiet", *sets)
    assert res.exit_code == 0, res.output
    index = out / "report" / "index.html"
    html = index.read_text()
    runs = {(s, k): out / "runs" / f"{s}-s{k}" for s in ("random", "entropy") for k in (0, 1)}
    for (strat, seed), run in runs.items():
        loop = json.loads((run / "loop.json").read_text())
        assert loop["status"] == "done" and loop["strategy"] == strat and loop["seed"] == seed
        assert (run / "cycles" / "1" / "metrics.json").is_file()
        assert strat in html
    assert "Cycle 0" in html and "Cycle 1" in html
    assert (out / "report" / "curves.png").stat().st_size > 10_000
    # each seed's cycle 0 was trained once and shared: same seed set, byte-identical model
    for seed in (0, 1):
        a, b = runs[("random", seed)], runs[("entropy", seed)]
        assert (a / "cycles/0/model.pt").read_bytes() == (b / "cycles/0/model.pt").read_bytes()
        assert (a / "seed.json").read_text() == (b / "seed.json").read_text()
    assert (runs[("random", 0)] / "cycles/0/model.pt").read_bytes() != \
        (runs[("random", 1)] / "cycles/0/model.pt").read_bytes()
    # entropy scored the pool; random did not need to
    assert (runs[("entropy", 0)] / "cycles" / "0" / "scores.parquet").is_file()
    assert not (runs[("random", 0)] / "cycles" / "0" / "scores.parquet").exists()
    # the last line is the verdict, also in demo.json with the final mAP50 of every loop
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: ") and "random mAP50" in last and "entropy mAP50" in last
    summary = json.loads((out / "demo.json").read_text())
    assert summary["verdict"] == last and set(summary["final_map50"]) == {"random", "entropy"}
    assert set(summary["final_map50"]["entropy"]) == {"0", "1"}
    # report for several runs from the CLI as well
    r = _cli("report", runs[("random", 0)], runs[("entropy", 0)], "--out", tmp_path / "rep", "--quiet")
    assert r.exit_code == 0 and (tmp_path / "rep" / "index.html").is_file()
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert {r["strategy"] for r in summary["runs"]} == {"random", "entropy"}


def test_run_command_errors(tmp_path, tiny_pool):
    run = _init(tmp_path, tiny_pool, "e")
    r = _cli("run", run.root, "--strategy", "no_such_strategy", "--quiet")
    assert r.exit_code == 2 and "no_such_strategy" in r.stderr
    r = _cli("status", tmp_path / "nothing_here")
    assert r.exit_code != 0
    r = _cli("report", run.root, "--out", tmp_path / "rep")
    assert r.exit_code == 2 and "metrics" in r.stderr
    assert np.all(run.ids_in_state("labeled").size == 0)
