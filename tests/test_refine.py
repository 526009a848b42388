"""Active similarity refinement (methods.md section 9): hand-made reference cases for the
triplet mining, the masks, patches, candidates, simulated expert and F1; the answer log's
durability; and a small session's answer / undo / retrain / reopen cycle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from poolscout.engine.data.answers import AnswerLog
from poolscout.engine.methods import refine as R


# --------------------------------------------------------------------------- triplet loss
def test_triplet_loss_batch_hard_positive_semi_hard_negative_by_hand():
    # 1-D embeddings (as 2-D points on a line): anchor 0 at 0.0
    emb = torch.tensor([[0.0, 0], [0.1, 0], [0.3, 0], [0.35, 0], [0.6, 0], [0.05, 0]])
    lab = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, n = R.triplet_loss(emb, lab, margin=0.2)
    assert n == 6
    # anchor 0: farthest positive 0.3 (idx 2); semi-hard negatives need 0.3 < d < 0.5: idx 3
    # (0.35); loss 0.09 - 0.1225 + 0.2
    a0 = 0.3 ** 2 - 0.35 ** 2 + 0.2
    # anchor 1 (0.1): farthest positive 0.2 (idx 2, at 0.3); semi-hard 0.2 < d < 0.4: idx 3 (0.25)
    a1 = 0.2 ** 2 - 0.25 ** 2 + 0.2
    # anchor 2 (0.3): farthest positive 0.3 (idx 0); semi-hard 0.3 < d < 0.5: idx 4 (0.3 exactly is
    # not >) -> none... idx 3 at 0.05, idx 4 at 0.3, idx 5 at 0.25: no semi-hard -> hardest (idx 3)
    a2 = 0.3 ** 2 - 0.05 ** 2 + 0.2
    # anchor 3 (0.35, label 1): positives 0.6 (0.25), 0.05 (0.3) -> farthest 0.3; semi-hard
    # 0.3 < d < 0.5 among label 0 (0.35, 0.25, 0.05): idx 0 at 0.35
    a3 = 0.3 ** 2 - 0.35 ** 2 + 0.2
    # anchor 4 (0.6): farthest positive idx 5 at 0.55; semi-hard 0.55 < d < 0.75: idx 0 at 0.6
    a4 = 0.55 ** 2 - 0.6 ** 2 + 0.2
    # anchor 5 (0.05): farthest positive idx 4 at 0.55; semi-hard 0.55 < d < 0.75: none
    # (0.05, 0.05, 0.25) -> hardest: idx 0 or 1 at 0.05
    a5 = 0.55 ** 2 - 0.05 ** 2 + 0.2
    want = np.mean([max(0, v) for v in (a0, a1, a2, a3, a4, a5)])
    assert float(loss) == pytest.approx(want, abs=1e-5)


def test_triplet_loss_skips_anchors_without_a_positive_or_negative():
    emb = torch.tensor([[0.0, 0], [1.0, 0], [0.5, 0]])
    loss, n = R.triplet_loss(emb, torch.tensor([0, 1, 1]))
    assert n == 2  # anchor 0 has no positive
    loss, n = R.triplet_loss(emb, torch.tensor([1, 1, 1]))
    assert n == 0 and float(loss) == 0.0


# --------------------------------------------------------------------------- masks and patches
def test_roi_mask_and_mask_boxes_round_trip():
    m = R.roi_mask((10, 12), np.array([[1, 2, 4, 5], [8, 0, 12, 3]]))
    assert m.sum() == 3 * 3 + 4 * 3 and m[2, 1] == 1 and m[5, 1] == 0 and m[0, 11] == 1
    boxes = R.mask_boxes(m)
    assert sorted(map(tuple, boxes.astype(int))) == [(1, 2, 4, 5), (8, 0, 12, 3)]
    # 8-connectivity: a diagonal line is one component
    d = np.eye(5, dtype=np.uint8)
    assert R.components(d)[1] == 1 and R.mask_boxes(d).tolist() == [[0, 0, 5, 5]]


def test_dilate_and_degrade_are_deterministic():
    m = np.zeros((9, 9), np.uint8)
    m[4, 4] = 1
    assert R.dilate(m, 1).sum() == 9 and R.dilate(m, 2).sum() == 25
    a = R.degrade_mask(m, np.random.default_rng(1), drop=0.0, grow=1, false_blobs=0)
    assert a.sum() == 9
    b1 = R.degrade_mask(m, np.random.default_rng(2))
    b2 = R.degrade_mask(m, np.random.default_rng(2))
    assert np.array_equal(b1, b2)


def test_sample_centres_balances_defect_and_background():
    m = np.zeros((20, 20), np.uint8)
    m[5:7, 5:15] = 1  # 20 defect pixels
    c = R.sample_centres(m, 16, np.random.default_rng(0))
    lab = m[c[:, 1], c[:, 0]]
    assert len(c) == 16 and lab.sum() == 8 and len({tuple(p) for p in c}) == 16
    # fewer defect pixels than half: all of them, the rest background
    m2 = np.zeros((20, 20), np.uint8)
    m2[0, :3] = 1
    lab2 = m2[tuple(R.sample_centres(m2, 16, np.random.default_rng(0))[:, ::-1].T)]
    assert lab2.sum() == 3 and len(lab2) == 16
    # an empty mask: background only
    assert len(R.sample_centres(np.zeros((4, 4), np.uint8), 6, np.random.default_rng(0))) == 6


def test_extract_patches_centres_and_reflects():
    img = np.arange(100, dtype=np.uint8).reshape(10, 10)
    p = R.extract_patches(img, np.array([[5, 4]]), size=4)
    # rows 4-2 .. 4+1, columns 5-2 .. 5+1
    assert p.shape == (1, 4, 4, 1) and np.array_equal(p[0, :, :, 0], img[2:6, 3:7])
    edge = R.extract_patches(img, np.array([[0, 0]]), size=4)[0, :, :, 0]
    assert edge[2, 2] == img[0, 0] and edge[2, 1] == img[0, 1]  # reflected left of column 0
    with pytest.raises(IndexError, match="outside"):
        R.extract_patches(img, np.array([[10, 0]]), size=4)


# --------------------------------------------------------------------------- acquisition
def test_choose_anchor_entropy_and_random():
    p = np.array([0.1, 0.45, 0.55, 0.9, 0.5])
    elig = np.array([True, True, True, True, False])
    assert R.choose_anchor(p, elig, "entropy", np.random.default_rng(0)) == 1  # 0.45 ties 0.55: lowest index
    picks = {R.choose_anchor(p, elig, "random", np.random.default_rng(s)) for s in range(30)}
    assert picks == {0, 1, 2, 3}
    with pytest.raises(LookupError):
        R.choose_anchor(p, np.zeros(5, bool), "entropy", np.random.default_rng(0))


def test_candidates_are_farthest_positives_and_nearest_negatives():
    ang = np.deg2rad([0, 10, 20, 90, 170, 5, 15, 100, 179])
    emb = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    lab = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
    ix = R.CandidateIndex(emb, lab)
    pos, neg = ix.candidates(0, k=2)
    assert pos == [4, 3]  # 170 and 90 degrees away from the anchor at 0
    assert neg == [5, 6]  # 5 and 15 degrees
    pos, neg = ix.candidates(0, k=2, exclude=[4, 5])
    assert pos == [3, 2] and neg == [6, 7]
    # brute force over all pairs agrees on a random case
    rng = np.random.default_rng(0)
    e = rng.normal(size=(200, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    lab = rng.integers(0, 2, 200)
    pos, neg = R.CandidateIndex(e, lab).candidates(7, k=5)
    d = np.linalg.norm(e - e[7], axis=1)
    same = np.flatnonzero((lab == lab[7]) & (np.arange(200) != 7))
    other = np.flatnonzero(lab != lab[7])
    assert pos == list(same[np.argsort(-d[same])][:5]) and neg == list(other[np.argsort(d[other])][:5])


def test_simulated_answer_and_shift():
    t = np.zeros((20, 20), np.uint8)
    t[10, 5:15] = 1
    lab, same, shifts = R.simulated_answer(t, (6, 10), [(t, (8, 10)), (t, (8, 2)), (t, (9, 12))], shift=False)
    assert lab == 1 and same == [True, False, False] and shifts == {}
    lab, same, shifts = R.simulated_answer(t, (6, 10), [(t, (8, 10)), (t, (8, 2)), (t, (9, 12))], shift=True,
                                           size=8)
    # (9, 12) has the line 2 rows up inside its window: shifted onto (9, 10)
    assert same == [True, False, True] and shifts == {2: (0, -2)}


def test_relabel_centre_and_patch():
    m = np.zeros((10, 10), np.uint8)
    R.relabel(m, 3, 4, 1)
    assert m.sum() == 1 and m[4, 3] == 1
    R.relabel(m, 5, 5, 1, scope="patch", size=4)
    assert m[3:7, 3:7].all() and m.sum() == 16
    with pytest.raises(ValueError):
        R.relabel(m, 0, 0, 1, scope="disk")


def test_patch_f1_by_hand():
    r = R.patch_f1(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 0, 1]))
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert R.patch_f1(np.zeros(3), np.zeros(3))["f1"] == 0.0


def test_fit_patches_learns_a_separable_toy_set(one_thread):
    rng = np.random.default_rng(0)
    bright = rng.integers(150, 255, size=(64, 8, 8, 1)).astype(np.uint8)
    dark = rng.integers(0, 100, size=(64, 8, 8, 1)).astype(np.uint8)
    x = np.concatenate([bright, dark])
    y = np.array([1] * 64 + [0] * 64)
    torch.manual_seed(0)
    model = R.PatchNet(width=4, dim=8)
    hist = R.fit_patches(model, x, y, R.TrainSettings(steps=30, batch=32, lr=3e-3))
    _, p = R.embed(model, x)
    assert R.patch_f1(p > 0.5, y)["f1"] > 0.95
    assert hist[-1]["bce"] < hist[0]["bce"]
    # the refined set alone (mode b) trains too
    model2 = R.PatchNet(width=4, dim=8)
    R.fit_patches(model2, x[:0], y[:0], R.TrainSettings(steps=30, batch=32, lr=3e-3), refined=(x, y))
    assert R.patch_f1(R.embed(model2, x)[1] > 0.5, y)["f1"] > 0.95
    with pytest.raises(ValueError, match="nothing to train"):
        R.fit_patches(model2, x[:0], y[:0], R.TrainSettings(steps=1))


# --------------------------------------------------------------------------- answer log
def test_answer_log_is_append_only_and_drops_a_torn_line(tmp_path):
    p = tmp_path / "answers.jsonl"
    log = AnswerLog(p)
    log.append({"kind": "answer", "answer_id": log.next_answer_id(), "anchor_patch": 1})
    log.append({"kind": "answer", "answer_id": log.next_answer_id(), "anchor_patch": 2})
    log.append({"kind": "undo", "undoes": 2})
    assert [a["answer_id"] for a in log.live()] == [1]
    before = p.read_bytes()
    with open(p, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"kind": "answer", "answ')
    log2 = AnswerLog(p)
    assert p.read_bytes() == before and [a["answer_id"] for a in log2.live()] == [1]
    assert log2.next_answer_id() == 3  # ids are never reused, undone or not
    log2.append({"kind": "answer", "answer_id": 3, "anchor_patch": 5})
    lines = p.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["answer_id"] == 3 and "time" in json.loads(lines[-1])
    p.write_text(p.read_text() + "not json\n")
    with pytest.raises(ValueError, match="line 5"):
        AnswerLog(p)


# --------------------------------------------------------------------------- a session
@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    from poolscout.jobs.refine import demo_session

    import shutil

    root = tmp_path_factory.mktemp("refine")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = demo_session(root)  # builds the run (and a session, set aside: each test opens its own)
    finally:
        torch.set_num_threads(old)
    shutil.rmtree(s.dir)
    return root


def test_session_answer_undo_retrain_and_reopen(session_dir, tmp_path, one_thread):
    import shutil

    from poolscout.jobs.refine import RefineError, demo_session

    shutil.copytree(session_dir, tmp_path / "s")
    s = demo_session(tmp_path / "s", mode="a", relabel="centre")
    st = s.state()
    assert st["answers"] == 0 and st["model_version"] == 0 and st["patches"] == 16 * 16
    a = s.next_anchor()
    assert s.next_anchor() is a  # the same anchor until answered
    cands = [c["patch_id"] for c in a["candidates"]]
    assert len(cands) == 10 and a["anchor"]["patch_id"] not in cands
    assert [c["kind"] for c in a["candidates"]] == ["positive"] * 5 + ["negative"] * 5
    # refused requests change nothing
    with pytest.raises(RefineError) as e:
        s.answer("0.0.999", anchor_label=1, same=[])
    assert e.value.status == 409
    with pytest.raises(RefineError, match="not a candidate"):
        s.answer(a["anchor_id"], anchor_label=1, same=[a["anchor"]["patch_id"]])
    with pytest.raises(RefineError, match="outside|window"):
        s.answer(a["anchor_id"], anchor_label=1, same=[], shifts={cands[0]: (10_000, 0)})
    with pytest.raises(RefineError) as e:
        s.undo()
    assert e.value.status == 409
    assert s.state()["answers"] == 0
    # an answer: the anchor a defect, the first two candidates the same, one shifted
    c0 = a["candidates"][0]
    img = s.images[int(c0["image_id"])]
    dx = 1 if c0["x"] + 1 < img.shape[1] else -1
    r = s.answer(a["anchor_id"], anchor_label=1, same=cands[:2], shifts={cands[0]: (dx, 0)}, who="tester")
    assert r["answers"] == 1 and r["since_retrain"] == 1
    # mode a relabels the centre pixels: the anchor's to 1, the shifted candidate's shifted pixel
    an = a["anchor"]
    assert s.masks[int(an["image_id"])][an["y"], an["x"]] == 1
    assert s.masks[int(c0["image_id"])][c0["y"], c0["x"] + dx] == 1
    neg = a["candidates"][-1]
    assert s.masks[int(neg["image_id"])][neg["y"], neg["x"]] == 0
    assert s.labels()[cands[0]] == 1 and s.labels()[cands[-1]] == 0
    # a second answer, then undo it: the log keeps both and the undo
    b = s.next_anchor()
    assert b["anchor"]["patch_id"] not in [an["patch_id"], *cands]  # answered patches are not asked again
    s.answer(b["anchor_id"], anchor_label=0, same=[c["patch_id"] for c in b["candidates"]])
    assert s.undo()["answers"] == 1
    kinds = [json.loads(x)["kind"] for x in (s.dir / "answers.jsonl").read_text().splitlines()]
    assert kinds == ["answer", "answer", "undo"]
    # reopen: the same state from the log
    s2 = demo_session(tmp_path / "s", mode="a", relabel="centre")
    assert s2.answers() == s.answers() and len(s2.answers()) == 1
    assert s2.answers()[0]["shifts"] == {str(cands[0]): [dx, 0]} and s2.answers()[0]["who"] == "tester"
    assert all(np.array_equal(s2.masks[i], s.masks[i]) for i in s.masks)
    # retrain: a new model version on disk, logged; the retrained answer can no longer be undone
    r = s2.retrain()
    assert r["model_version"] == 1 and (s2.dir / "models" / "v1.pt").is_file() and r["answers_used"] == 1
    assert s2.state()["since_retrain"] == 0
    with pytest.raises(RefineError, match="retrained"):
        s2.undo()
    s3 = demo_session(tmp_path / "s", mode="a", relabel="centre")
    assert s3.state()["model_version"] == 1
    assert all(torch.equal(a_, b_) for a_, b_ in zip(s3.model.state_dict().values(), s2.model.state_dict().values()))
    # `poolscout status` lists the session
    from poolscout.jobs.segment import segment_status

    r = segment_status(s3.run)["refine"]
    assert len(r) == 1 and (r[0]["answers"], r[0]["model_version"], r[0]["mode"]) == (1, 1, "a")
    # other settings on the same folder: refused, naming the difference
    with pytest.raises(RefineError, match="mode"):
        demo_session(tmp_path / "s", mode="b")


def test_session_pictures_and_bad_ids(session_dir, tmp_path, one_thread):
    import shutil

    from poolscout.jobs.refine import RefineError, demo_session

    shutil.copytree(session_dir, tmp_path / "s")
    s = demo_session(tmp_path / "s")
    png = s.patch_png(0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for ov in ("mask", "pred", "none"):
        assert s.image_png(s.state()["images"][0], ov)[:4] == b"\x89PNG"
    for call, status in ((lambda: s.patch_png(10 ** 6), 404), (lambda: s.image_png("12"), 404),
                         (lambda: s.image_png(s.image_ids[0], "<b>"), 400), (lambda: s.patch_png(0, 10 ** 4), 400)):
        with pytest.raises(RefineError) as e:
            call()
        assert e.value.status == status


@pytest.mark.parametrize("mode", ["a", "b", "c"])
def test_simulated_rounds_in_each_mode(session_dir, tmp_path, mode, one_thread):
    import shutil

    from poolscout.jobs.refine import demo_session

    shutil.copytree(session_dir, tmp_path / "s")
    s = demo_session(tmp_path / "s", mode=mode, anchors="random")
    out = s.simulate(10, shift=True)
    assert [r["model_version"] for r in out] == [1, 2]
    assert all(r["f1"] is not None and 0 <= r["f1"] <= 1 for r in out)
    assert len(s.answers()) == 10 and all(a["who"] == "simulated" for a in s.answers())
    if mode in ("b", "c"):
        assert len(s.refined) == 10 * 11  # the anchor and ten candidates each time
    else:
        assert s.refined == []
    # the simulated expert answered from the truth: every labeled anchor agrees with it
    lab = s.labels()
    for a in s.answers():
        p = a["anchor_patch"]
        x, y = s.centres[p]
        assert lab[p] == s.truth[int(s.owner[p])][y, x]


@pytest.mark.ray
def test_retrain_as_a_ray_train_job(session_dir, tmp_path, ray_session, one_thread):
    """--ray-train: the same retraining as a Ray Train job (one worker); its weights come back."""
    import shutil

    from poolscout.jobs.refine import demo_session

    shutil.copytree(session_dir, tmp_path / "s")
    s = demo_session(tmp_path / "s", executor="ray")
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.simulate(3, retrain=False)
    r = s.retrain()
    assert r["model_version"] == 1 and (s.dir / "models" / "v1.pt").is_file()
    after = s.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].dtype.is_floating_point)
    assert not (s.dir / "ray_train").exists()  # Ray Train's storage is cleaned up


def test_cli_refine_simulate_and_errors(session_dir, tmp_path, one_thread):
    import shutil

    from click.testing import CliRunner

    from poolscout.jobs.cli import cli

    shutil.copytree(session_dir, tmp_path / "s")
    run = str(tmp_path / "s" / "run")
    args = ["refine", run, "--patch", "16", "--per-image", "8", "--steps", "5", "--retrain-every", "4"]
    out = CliRunner().invoke(cli, [*args, "--simulate", "4"])
    assert out.exit_code == 0, out.output
    assert "refine: 128 patches of 16 images, model v0, 0 answers so far" in out.output
    assert "v1: 4 answers, F1" in out.output and '"answers": 4' in out.output
    # the same folder with another mode: one line naming what differs, exit code 2
    out = CliRunner().invoke(cli, [*args, "--mode", "a", "--simulate", "1"])
    assert out.exit_code == 2 and "mode: 'c' -> 'a'" in out.output and "--restart" in out.output
    out = CliRunner().invoke(cli, [*args, "--init", "segmentation", "--simulate", "1"])
    assert out.exit_code == 2 and "init_masks" in out.output


def test_boxes_by_image_and_centre_values_match_a_plain_loop(tmp_path, tiny_pool):
    """A detection run: boxes grouped per image (one pass over the table) equal a row-by-row
    grouping, and the truth masks are those boxes filled; mask values at patch centres
    (one gather per image) equal a per-patch lookup."""
    from poolscout.engine.core import io
    from poolscout.engine.core.config import load_config
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.methods import refine as R
    from poolscout.jobs.refine import _boxes_by_image, _load_truth, _values_at_centres

    run = RunDir(tmp_path / "run")
    init_run(run, images=tiny_pool["images"], annotations=tiny_pool["annotations"], cfg=load_config(), progress=False)
    ann = io.read_table(run.annotations).to_pydict()
    plain: dict = {}
    for i, *box in zip(ann["image_id"], ann["x1"], ann["y1"], ann["x2"], ann["y2"]):
        plain.setdefault(int(i), []).append(box)
    got = _boxes_by_image(run)
    assert set(got) == set(plain) and len(plain) >= 10
    for i, boxes in plain.items():
        assert sorted(map(tuple, got[i].tolist())) == sorted(map(tuple, np.asarray(boxes, np.float64).tolist()))
    some = np.array(sorted(plain)[:5], np.int64)
    assert set(_boxes_by_image(run, some)) == set(some.tolist())
    sizes = {int(i): (64, 64) for i in some}
    truth = _load_truth(run, some, sizes)
    for i in some:
        assert np.array_equal(truth[int(i)], R.roi_mask((64, 64), np.asarray(plain[int(i)], np.float64)))
    rng = np.random.default_rng(0)
    owner = rng.choice(some, 200)
    centres = rng.integers(0, 64, (200, 2)).astype(np.int32)
    want = np.array([truth[int(i)][y, x] for i, (x, y) in zip(owner, centres)], np.int64)
    assert np.array_equal(_values_at_centres(truth, owner, centres), want) and 0 < want.sum() < len(want)
