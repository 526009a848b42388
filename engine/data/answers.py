"""The refinement answer log: append-only, one JSON line per event, fsynced before the
caller hears back, so a closed browser or a killed server loses nothing.

Events (`kind`):

* ``answer``: an expert's answer to one anchor: ``answer_id`` (1, 2, ... in log order),
  ``anchor_id``, ``anchor_patch``, ``anchor_label`` (0/1), ``candidates`` (the ten patch
  ids shown), ``same`` (those marked as matching the anchor), ``shifts`` ({patch id: [dx,
  dy]}), ``who``, ``time`` (UTC ISO 8601);
* ``undo``: ``undoes`` (an answer_id), ``who``, ``time``; undoes the latest live answer;
* ``retrain``: ``model_version``, ``answers_used``, ``seconds``, ``f1``, ``time``.

Nothing is ever rewritten: an undo is an event too, and the live answers are the answers
not undone. A line torn by a kill mid-write (no trailing newline) is dropped when the log is
opened again, so the next event starts on a line of its own.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class AnswerLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.events: list[dict] = []
        if self.path.is_file():
            raw = self.path.read_bytes()
            keep = raw if raw.endswith(b"\n") or not raw else raw[:raw.rfind(b"\n") + 1]
            if len(keep) != len(raw):  # a torn last line: drop it, durably
                with open(self.path, "r+b") as f:
                    f.truncate(len(keep))
                    f.flush()
                    os.fsync(f.fileno())
            for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{self.path}: line {n} is not JSON ({e})") from None
                if not isinstance(ev, dict) or ev.get("kind") not in ("answer", "undo", "retrain"):
                    raise ValueError(f"{self.path}: line {n} has no known 'kind'")
                self.events.append(ev)

    @staticmethod
    def now() -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def append(self, event: dict) -> dict:
        ev = {**event, "time": event.get("time") or self.now()}
        line = json.dumps(ev, separators=(",", ":"), sort_keys=True) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.events.append(ev)
        return ev

    def next_answer_id(self) -> int:
        return 1 + max((int(e["answer_id"]) for e in self.events if e["kind"] == "answer"), default=0)

    def live(self) -> list[dict]:
        """The answers not undone, in log order."""
        out: list[dict] = []
        for e in self.events:
            if e["kind"] == "answer":
                out.append(e)
            elif e["kind"] == "undo":
                out = [a for a in out if a["answer_id"] != e["undoes"]]
        return out

    def retrains(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "retrain"]
