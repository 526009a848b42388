"""Strategy comparison: the driver's task queue and the shared cycle 0 (no Ray needed)."""
from __future__ import annotations

from poolscout.engine.core.run import RunDir
from poolscout.jobs.compare import LongestFirst, loop_rank, share_cycle0


def test_ranks_cycle0_then_scoring_loops_then_model_free():
    assert loop_rank("cycle0", "random") == 0
    assert loop_rank("loop", "entropy") == 1
    assert loop_rank("loop", "coreset") == 1  # embeddings need the model
    assert loop_rank("loop", "random") == 2
    assert loop_rank("loop", "no-such-strategy") == 1  # the loop reports it; not hidden at the end


def test_longest_first_fills_free_slots_in_rank_order():
    q = LongestFirst(2)
    q.add("random-s0", loop_rank("loop", "random"))
    q.add("entropy-s0", loop_rank("loop", "entropy"))
    q.add("c0-s1", loop_rank("cycle0", "random"))
    q.add("random-s1", loop_rank("loop", "random"))
    q.add("entropy-s1", loop_rank("loop", "entropy"))
    assert q.take(running=0) == ["c0-s1", "entropy-s0"]
    assert q.take(running=2) == []  # no free slot
    assert q.take(running=1) == ["entropy-s1"]
    assert q.take(running=0) == ["random-s0", "random-s1"]  # FIFO within a rank
    assert len(q) == 0 and q.take(running=0) == []
    unlimited = LongestFirst(float("inf"))
    for i in range(5):
        unlimited.add(i, 1)
    assert unlimited.take(running=3) == [0, 1, 2, 3, 4]


def _fake_run(root, with_eval=True, later_labels: bool = False) -> RunDir:
    import pyarrow as pa

    from poolscout.engine.core import io

    run = RunDir(root)
    (run.root / "cycles" / "0").mkdir(parents=True)
    for name in ("run.yaml", "manifest.parquet", "seed.json", "loop.json"):
        (run.root / name).write_text(name)
    # a seed set of 2 (cycle 0), a test image, the pool; with later_labels the loop ran on:
    # cycle 0's selection labeled as cycle 1, and cycle 1's as cycle 2
    rows = [(1, "labeled", 0, "seed:random"), (2, "labeled", 0, "seed:random"), (3, "test", -1, ""),
            (4, "pool", -1, ""), (5, "pool", -1, ""), (6, "pool", -1, "")]
    if later_labels:
        rows[3], rows[4] = (4, "labeled", 1, "random"), (5, "labeled", 2, "random")
    io.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(io.LEDGER_SCHEMA.names)},
                            schema=io.LEDGER_SCHEMA), run.ledger, io.LEDGER_SCHEMA)
    for name in ("model.pt", "train.json") + (("eval.json",) if with_eval else ()):
        (run.cycle_dir(0) / name).write_text(name)
    (run.cycle_dir(0) / "scores.parquet").write_text("x")  # strategy-specific: not shared
    return run


def test_share_cycle0_copies_pool_and_model_but_not_the_loop(tmp_path):
    src = _fake_run(tmp_path / "random-s0")
    dst = RunDir(tmp_path / "entropy-s0")
    assert share_cycle0(src, dst)
    assert dst.exists()
    assert (dst.cycle_dir(0) / "model.pt").read_text() == "model.pt"
    assert (dst.cycle_dir(0) / "eval.json").is_file()
    assert not (dst.root / "loop.json").exists()  # dst's loop pins its own strategy
    assert not (dst.cycle_dir(0) / "scores.parquet").exists()
    assert not share_cycle0(src, dst)  # exists: nothing copied again
    assert not list(tmp_path.glob(".*sharing"))


def test_share_cycle0_waits_for_an_evaluated_cycle0(tmp_path):
    src = _fake_run(tmp_path / "random-s0", with_eval=False)
    dst = RunDir(tmp_path / "entropy-s0")
    assert not share_cycle0(src, dst)
    assert not dst.root.exists()


def test_share_cycle0_from_a_loop_that_ran_on_hands_over_cycle0s_ledger(tmp_path):
    """The first run of a group may have finished its whole loop (a benchmark resumed after
    its random loops ran alone): the copy must not inherit that loop's later labels."""
    from poolscout.engine.core import io

    src = _fake_run(tmp_path / "random-s0", later_labels=True)
    dst = RunDir(tmp_path / "entropy-s0")
    assert share_cycle0(src, dst)
    led = io.read_table(dst.ledger).to_pydict()
    by_id = {i: (s, c, b) for i, s, c, b in zip(led["image_id"], led["state"], led["cycle"], led["selected_by"])}
    assert by_id[1] == by_id[2] == ("labeled", 0, "seed:random")  # the seed set stays
    assert by_id[4] == by_id[5] == ("pool", -1, "")  # the later labels go back to the pool
    assert by_id[3] == ("test", -1, "")
    # the source is untouched
    assert io.read_table(src.ledger).to_pydict()["state"][3] == "labeled"
