"""`poolscout refine RUN`: active similarity refinement of defect masks (methods.md section 9).

A `RefineSession` holds one run's refinement state, all of it rebuilt on open from three
things in ``RUN/refine/``: ``session.json`` (the settings, fixed at the first open),
``answers.jsonl`` (engine.data.answers: every answer, undo and retrain, append-only) and
``models/v<N>.pt`` (the patch model after each retrain, state dicts loaded with
weights_only=True). Centres, initial masks and held-out patches are drawn from the seed, and
the live answers are replayed onto them, so a killed server or a closed browser resumes
where it was.

Truth, where the run has it: a segmentation run's masks (any class > 0 is a defect), or a
detection run's boxes filled (the ROI: NEU-DET's only truth). It drives the simulated
expert of the benchmarks and the held-out F1; a run without it can still be refined by a
person, with F1 left out.

Initial masks (`init`): ``roi`` (the annotation boxes filled; for a segmentation run, the
boxes around its masks' components), ``segmentation`` (PNG masks from `init_masks`, found
like the run's masks: the image's source key with .png; value > 0 is a defect) or
``random`` (uniform noise). Retraining runs in this process (`executor="local"`) or as a
Ray Train job (`executor="ray"`, one worker).
"""
from __future__ import annotations

import io as _io
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from poolscout.engine.core import io
from poolscout.engine.core.run import RunDir
from poolscout.engine.data.answers import AnswerLog
from poolscout.engine.methods import refine as R

SETTINGS = ("init", "mode", "anchors", "patch", "per_image", "retrain_every", "relabel", "steps", "seed",
            "eval_per_image", "eval_images", "max_images", "init_masks", "width", "dim")


class RefineError(ValueError):
    """A request the session refuses; `status` is the HTTP status the web page answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = int(status)


def _boxes_by_image(run: RunDir, image_ids: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """The run's annotated boxes (x1, y1, x2, y2) grouped by image id, optionally only those images'."""
    ann = io.read_table(run.annotations, columns=["image_id", "x1", "y1", "x2", "y2"])
    if image_ids is not None:
        ann = ann.filter(pc.is_in(ann["image_id"], pa.array(np.asarray(image_ids, np.int64))))
    iid = ann["image_id"].to_numpy()
    xyxy = np.stack([ann[c].to_numpy().astype(np.float64) for c in ("x1", "y1", "x2", "y2")], 1) \
        if ann.num_rows else np.zeros((0, 4))
    order = np.argsort(iid, kind="stable")
    iid, xyxy = iid[order], xyxy[order]
    starts = np.flatnonzero(np.r_[True, iid[1:] != iid[:-1]]) if len(iid) else np.zeros(0, np.int64)
    return {int(iid[a]): xyxy[a:b] for a, b in zip(starts, np.r_[starts[1:], len(iid)].astype(np.int64))}


def _values_at_centres(masks: dict[int, np.ndarray], owner: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each patch's mask value at its centre (one gather per image)."""
    out = np.zeros(len(owner), np.int64)
    for i in np.unique(owner):
        rows = np.flatnonzero(owner == i)
        c = centres[rows]
        out[rows] = masks[int(i)][c[:, 1], c[:, 0]]
    return out


def _load_truth(run: RunDir, image_ids: np.ndarray, sizes: dict) -> dict[int, np.ndarray] | None:
    """0/1 truth masks by image id, or None when the run has neither masks nor boxes."""
    masks = run.root / "masks.parquet"
    if masks.is_file():
        from poolscout.engine.data.segmentation import MaskStore

        seg = json.loads((run.root / "segment.json").read_text())["inputs"]
        store = MaskStore(io.read_table(masks), fmt=seg["format"], num_classes=len(seg["classes"]),
                          threshold=int(seg["threshold"]), cache=1)
        out = {}
        for i in image_ids:
            if int(i) in store:
                m = store.get(int(i))
                out[int(i)] = ((m > 0) & (m != 255)).astype(np.uint8)
        return out
    if run.annotations.is_file():
        ann = io.read_table(run.annotations)
        if ann.num_rows == 0:
            return None
        by = _boxes_by_image(run, image_ids)
        return {int(i): R.roi_mask((sizes[int(i)][1], sizes[int(i)][0]), by.get(int(i), np.zeros((0, 4))))
                for i in image_ids}
    return None


class RefineSession:
    """One run's refinement: the web page's and the benchmark's only way in.

    Args:
        run: a run directory (segmentation or detection).
        init / mode / anchors / relabel: see engine.methods.refine (INIT_KINDS, MODES, ANCHORS, RELABEL).
        patch: patch side in px. per_image: patch centres per pool image (half defect, half
            background by the initial mask). eval_per_image: held-out patches per test image.
        retrain_every: answers between retrains (the page shows it; `simulate` retrains then).
        steps: training steps per retrain (batches of 128). seed: every random draw.
        max_images: use at most this many pool images (0: all), the first by image id;
            eval_images likewise for the held-out (test) images.
        name: several sessions on one run (benchmarks): RUN/refine-<name>/ instead of RUN/refine/.
        init_masks: folder of PNG masks for init="segmentation".
        executor: "local" or "ray" (Ray Train) for retraining.
        threads: torch threads in this process (None: leave torch's default).
    The settings are written at the first open; a later open with other settings raises
    RefineError unless `restart` (which moves the old refine folder aside).
    """

    def __init__(self, run: RunDir | str | Path, *, init: str = "roi", mode: str = "c", anchors: str = "entropy",
                 patch: int = 32, per_image: int = 32, retrain_every: int = 50, relabel: str = "centre",
                 steps: int = 150, seed: int = 0, eval_per_image: int = 128, eval_images: int = 0,
                 max_images: int = 0, init_masks: str | None = None, width: int = 16, dim: int = 32,
                 executor: str = "local", threads: int | None = None, restart: bool = False, name: str | None = None,
                 log: Callable[[str], None] = lambda m: None):
        self.run = run if isinstance(run, RunDir) else RunDir(Path(run))
        self.run.require()
        for key, value, allowed in (("init", init, R.INIT_KINDS), ("mode", mode, R.MODES),
                                     ("anchors", anchors, R.ANCHORS), ("relabel", relabel, R.RELABEL),
                                     ("executor", executor, ("local", "ray"))):
            if value not in allowed:
                raise RefineError(f"refine: {key} must be one of {', '.join(allowed)}, got {value!r}")
        if init == "segmentation" and not init_masks:
            raise RefineError("refine: init 'segmentation' needs init_masks, a folder of PNG masks")
        if patch < 8 or patch % 2:
            raise RefineError(f"refine: patch must be an even size >= 8 px, got {patch}")
        self.settings = {"init": init, "mode": mode, "anchors": anchors, "patch": int(patch),
                         "per_image": int(per_image), "retrain_every": int(retrain_every), "relabel": relabel,
                         "steps": int(steps), "seed": int(seed), "eval_per_image": int(eval_per_image),
                         "eval_images": int(eval_images), "max_images": int(max_images),
                         "init_masks": str(Path(init_masks).resolve()) if init_masks else None,
                         "width": int(width), "dim": int(dim)}
        self.executor, self.log = executor, log
        if threads:
            torch.set_num_threads(int(threads))
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name in (".", ".."):
            raise RefineError(f"refine: a session name is 1-64 letters, digits, '_', '.', '-'; got {name!r}")
        self.dir = self.run.root / ("refine" if name is None else f"refine-{name}")
        meta = self.dir / "session.json"
        if meta.is_file():
            old = json.loads(meta.read_text())
            if old != self.settings:
                if not restart:
                    diff = ", ".join(f"{k}: {old.get(k)!r} -> {self.settings[k]!r}" for k in SETTINGS
                                     if old.get(k) != self.settings.get(k))
                    raise RefineError(f"refine: {meta} holds a session with other settings ({diff}); "
                                      f"use the same settings, or --restart to set the old answers aside", 409)
                aside = self.dir.with_name(f"{self.dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(self.dir), aside)
                log(f"refine: the earlier session moved to {aside}")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "models").mkdir(exist_ok=True)
        io.atomic_write_json(meta, self.settings)
        self.answers_log = AnswerLog(self.dir / "answers.jsonl")
        self._build()

    # ------------------------------------------------------------------ setup
    def _images(self, state: str) -> list[tuple[int, str, int, int]]:
        man = io.read_table(self.run.manifest, columns=["image_id", "uri", "width", "height"]).sort_by("image_id")
        ids = set(int(i) for i in self.run.ids_in_state(state))
        return [(int(i), u, int(w), int(h)) for i, u, w, h in zip(*(man[c].to_pylist() for c in man.column_names))
                if int(i) in ids]

    def _decode(self, uri: str, w: int, h: int) -> np.ndarray:
        from poolscout.engine.data.images import decode

        if not hasattr(self, "_decode_args"):  # the run's config, read once
            self._decode_args = (int(self.run.config().dataset.max_pixels), self.run.fingerprint().get("images_root"))
        max_pixels, root = self._decode_args
        return decode(uri, max_pixels, root=root, expect=(w, h))

    def _initial_mask(self, iid: int, source_key: str, shape: tuple[int, int], rng) -> np.ndarray:
        s = self.settings
        if s["init"] == "random":
            return R.random_mask(shape, rng)
        if s["init"] == "segmentation":
            from poolscout.engine.data.segmentation import _inside, mask_path_for

            p = mask_path_for(source_key, s["init_masks"])
            if not _inside(p, Path(s["init_masks"])) or not p.is_file():
                raise RefineError(f"refine: no initial mask {p} for image {iid} ({source_key})", 400)
            m = np.asarray(Image.open(p).convert("L"))
            if m.shape != shape:
                raise RefineError(f"refine: initial mask {p} is {m.shape[1]}x{m.shape[0]}, its image "
                                  f"{shape[1]}x{shape[0]}", 400)
            return (m > 0).astype(np.uint8)
        # roi: the annotation boxes, or the boxes around the truth's components
        if self.truth is not None and iid in self.truth:
            if self._boxes is not None:
                return R.roi_mask(shape, self._boxes.get(iid, np.zeros((0, 4))))
            return R.roi_mask(shape, R.mask_boxes(self.truth[iid]))
        raise RefineError(f"refine: init 'roi' needs boxes or masks, and image {iid} has neither", 400)

    def _build(self) -> None:
        s = self.settings
        pool = self._images("pool") + self._images("labeled")
        pool.sort()
        if s["max_images"]:
            pool = pool[:s["max_images"]]
        if not pool:
            raise RefineError(f"refine: {self.run.root} has no pool images", 400)
        test = self._images("test")
        if s["eval_images"]:
            test = test[:s["eval_images"]]
        sizes = {i: (w, h) for i, _, w, h in pool + test}
        ids = np.array([i for i, *_ in pool + test], np.int64)
        self.truth = _load_truth(self.run, ids, sizes)
        self._boxes = None
        if not (self.run.root / "masks.parquet").is_file() and self.run.annotations.is_file():
            self._boxes = _boxes_by_image(self.run)
        man = io.read_table(self.run.manifest, columns=["image_id", "source_key"])
        keys = dict(zip(man["image_id"].to_pylist(), man["source_key"].to_pylist()))
        self.image_ids = [i for i, *_ in pool]
        self.images: dict[int, np.ndarray] = {}
        self.init_masks: dict[int, np.ndarray] = {}
        cent, owner = [], []
        size = s["patch"]
        for i, uri, w, h in pool:
            img = self._decode(uri, w, h)
            self.images[i] = img
            rng = np.random.default_rng([s["seed"], i])
            m = self._initial_mask(i, keys[i], (h, w), rng)
            self.init_masks[i] = m
            c = R.sample_centres(m, s["per_image"], rng)
            cent.append(c), owner.append(np.full(len(c), i, np.int64))
        self.centres = np.concatenate(cent).astype(np.int32)
        self.owner = np.concatenate(owner)
        self.patches = np.concatenate([R.extract_patches(self.images[i], self.centres[self.owner == i], size)
                                       for i in self.image_ids])
        # held-out patches: test images with truth, balanced by the truth
        self.eval_patches, self.eval_labels = None, None
        if self.truth is not None and s["eval_per_image"] > 0:
            xs, ys = [], []
            for i, uri, w, h in test:
                if i not in self.truth:
                    continue
                rng = np.random.default_rng([s["seed"], i, 1])
                c = R.sample_centres(self.truth[i], s["eval_per_image"], rng)
                img = self._decode(uri, w, h)
                xs.append(R.extract_patches(img, c, size))
                ys.append(self.truth[i][c[:, 1], c[:, 0]])
            if xs:
                self.eval_patches, self.eval_labels = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
        self._replay()
        self.model = R.PatchNet(s["width"], s["dim"])
        retrains = [e for e in self.answers_log.retrains() if (self.dir / "models" / f"v{e['model_version']}.pt").is_file()]
        v0 = self.dir / "models" / "v0.pt"
        if retrains:
            self.model_version = int(retrains[-1]["model_version"])
            self._load(self.dir / "models" / f"v{self.model_version}.pt")
        elif v0.is_file():
            self.model_version = 0
            self._load(v0)
        else:
            self.model_version = 0
            self.log(f"refine: training the first patch model on {len(self.patches)} patches of the initial masks")
            self._fit(initial=True)
            self._save(v0)
        self.f1 = (retrains[-1].get("f1") if retrains else None)
        if self.f1 is None:
            self.f1 = self.evaluate().get("f1") if self.eval_patches is not None else None
        self._embed()
        self._anchor: dict | None = None

    # ------------------------------------------------------------------ state from answers
    def _replay(self) -> None:
        """Masks, refined set and answered patches from the live answers."""
        self.masks = {i: m.copy() for i, m in self.init_masks.items()}
        self.refined: list[tuple[int, int, int, int]] = []  # (image_id, x, y, label)
        self.answered: dict[int, int] = {}  # patch index -> label given
        self.since_retrain = 0
        live = self.answers_log.live()
        for a in live:
            self._apply(a)
        self.since_retrain = max(0, len(live) - max((int(e["answers_used"]) for e in self.answers_log.retrains()),
                                                    default=0))
        self._index = None

    def _points(self, a: dict) -> list[tuple[int, int, tuple[int, int]]]:
        """(patch, label, labeled pixel) of an answer: the anchor, then each candidate
        (the anchor's label if marked same, else the other), at its shifted centre."""
        lab = int(a["anchor_label"])
        ap = int(a["anchor_patch"])
        out = [(ap, lab, tuple(int(v) for v in self.centres[ap]))]
        same = set(int(p) for p in a["same"])
        shifts = {int(k): v for k, v in (a.get("shifts") or {}).items()}
        for p in a["candidates"]:
            p = int(p)
            x, y = (int(v) for v in self.centres[p])
            dx, dy = shifts.get(p, (0, 0))
            out.append((p, lab if p in same else 1 - lab, (x + int(dx), y + int(dy))))
        return out

    def labels(self) -> np.ndarray:
        """The current label of every pool patch: the answer given for it, else its mask's
        value at its centre."""
        lab = _values_at_centres(self.masks, self.owner, self.centres)
        for p, v in self.answered.items():
            lab[p] = v
        return lab

    # ------------------------------------------------------------------ model
    def _save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.model.state_dict(), tmp)
        io.commit_file(tmp, path)

    def _load(self, path: Path) -> None:
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval()

    def _training_set(self, initial: bool) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        mode = self.settings["mode"]
        refined = None
        if not initial and mode in ("b", "c") and self.refined:
            size = self.settings["patch"]
            by: dict[int, list] = {}
            for iid, x, y, lab in self.refined:
                by.setdefault(iid, []).append((x, y, lab))
            xs, ys = [], []
            for iid, pts in by.items():
                c = np.array([(x, y) for x, y, _ in pts], np.int32)
                xs.append(R.extract_patches(self.images[iid], c, size)), ys.append([lab for *_, lab in pts])
            refined = (np.concatenate(xs), np.concatenate(ys).astype(np.int64))
        if not initial and mode == "b" and refined is not None:
            return self.patches[:0], np.zeros(0, np.int64), refined  # observed patches only
        return self.patches, _values_at_centres(self.masks, self.owner, self.centres), refined

    def _fit(self, initial: bool = False) -> dict:
        s = self.settings
        ts = R.TrainSettings(steps=s["steps"], seed=s["seed"] + self.model_version)
        x, y, refined = self._training_set(initial)
        t0 = time.time()
        if self.executor == "ray":
            history = _fit_ray(self.model, x, y, refined, ts, self.run)
        else:
            history = R.fit_patches(self.model, x, y, ts, refined=refined)
        return {"seconds": time.time() - t0, "loss": history[-1]["loss"] if history else None}

    def _embed(self) -> None:
        self.emb, self.p_defect = R.embed(self.model, self.patches)
        self._index = None

    def evaluate(self) -> dict:
        """Patch-level precision / recall / F1 of the defect head on the held-out patches
        ({} when the run has no truth for its test images)."""
        if self.eval_patches is None:
            return {}
        _, p = R.embed(self.model, self.eval_patches)
        return R.patch_f1(p > 0.5, self.eval_labels)

    # ------------------------------------------------------------------ the web page's calls
    def state(self) -> dict:
        return {"answers": len(self.answers_log.live()), "since_retrain": int(self.since_retrain),
                "retrain_every": self.settings["retrain_every"], "model_version": int(self.model_version),
                "mode": self.settings["mode"], "anchors": self.settings["anchors"], "patch": self.settings["patch"],
                "f1": self.f1, "images": [str(i) for i in self.image_ids], "patches": int(len(self.patches))}

    def _patch_info(self, p: int, kind: str | None = None, labels: np.ndarray | None = None) -> dict:
        x, y = (int(v) for v in self.centres[p])
        # image ids are 64-bit: strings, which JavaScript keeps exact
        d = {"patch_id": int(p), "image_id": str(int(self.owner[p])), "x": x, "y": y,
             "label": int(labels[p]), "p_defect": round(float(self.p_defect[p]), 4)}
        if kind:
            d["kind"] = kind
        return d

    def next_anchor(self) -> dict:
        if self._anchor is not None:
            return self._anchor
        labels = self.labels()
        if self._index is None:
            self._index = R.CandidateIndex(self.emb, labels)
        eligible = np.ones(len(self.patches), bool)
        eligible[list(self.answered)] = False
        rng = np.random.default_rng([self.settings["seed"], len(self.answers_log.events)])
        try:
            a = R.choose_anchor(self.p_defect, eligible, self.settings["anchors"], rng)
        except LookupError:
            raise RefineError("refine: every patch has been answered", 409) from None
        pos, neg = self._index.candidates(a, 5, exclude=list(self.answered))
        n = len(self.answers_log.events)
        self._anchor = {"anchor_id": f"{self.model_version}.{n}.{a}", "patch": self.settings["patch"],
                        "anchor": self._patch_info(a, labels=labels),
                        "candidates": [self._patch_info(p, "positive", labels) for p in pos]
                        + [self._patch_info(p, "negative", labels) for p in neg]}
        return self._anchor

    def answer(self, anchor_id: str, *, anchor_label: int, same: Sequence[int] = (),
               shifts: dict[int, tuple[int, int]] | None = None, who: str = "web") -> dict:
        cur = self._anchor
        if cur is None or anchor_id != cur["anchor_id"]:
            raise RefineError(f"refine: anchor {anchor_id!r} is not the current one"
                              + (f" ({cur['anchor_id']})" if cur else "") + "; load the next anchor", 409)
        if anchor_label not in (0, 1) or isinstance(anchor_label, bool):
            raise RefineError(f"refine: anchor_label must be 0 or 1, got {anchor_label!r}")
        cands = [c["patch_id"] for c in cur["candidates"]]
        same = [int(p) for p in same]
        shifts = {int(k): (int(v[0]), int(v[1])) for k, v in (shifts or {}).items()}
        for p in list(same) + list(shifts):
            if p not in cands:
                raise RefineError(f"refine: patch {p} is not a candidate of anchor {anchor_id}")
        half = self.settings["patch"] // 2
        for p, (dx, dy) in shifts.items():
            h, w = self.images[int(self.owner[p])].shape[:2]
            x, y = (int(v) for v in self.centres[p])
            if abs(dx) > half or abs(dy) > half:
                raise RefineError(f"refine: a shift of patch {p} by ({dx}, {dy}) leaves its window "
                                  f"(at most {half} px each way)")
            if not (0 <= x + dx < w and 0 <= y + dy < h):
                raise RefineError(f"refine: shifting patch {p} by ({dx}, {dy}) moves its centre outside "
                                  f"the {w}x{h} image")
        if not isinstance(who, str) or not who or len(who) > 64:
            raise RefineError("refine: 'who' must be a name of 1 to 64 characters")
        ev = self.answers_log.append({
            "kind": "answer", "answer_id": self.answers_log.next_answer_id(), "anchor_id": anchor_id,
            "anchor_patch": cur["anchor"]["patch_id"], "anchor_label": int(anchor_label), "candidates": cands,
            "same": sorted(set(same)), "shifts": {str(k): list(v) for k, v in sorted(shifts.items())},
            "who": who, "model_version": int(self.model_version)})
        self._apply(ev)
        self._anchor = None
        return {"answer_id": ev["answer_id"], "answers": len(self.answers_log.live()),
                "since_retrain": int(self.since_retrain)}

    def _apply(self, ev: dict) -> None:
        s = self.settings
        for pid, label, (x, y) in self._points(ev):
            self.answered[pid] = label
            if s["mode"] in ("a", "c"):
                R.relabel(self.masks[int(self.owner[pid])], x, y, label, scope=s["relabel"], size=s["patch"])
            if s["mode"] in ("b", "c"):
                self.refined.append((int(self.owner[pid]), x, y, label))
        self.since_retrain += 1
        self._index = None

    def undo(self, who: str = "web") -> dict:
        live = self.answers_log.live()
        used = max((int(e["answers_used"]) for e in self.answers_log.retrains()), default=0)
        if not live:
            raise RefineError("refine: there is no answer to undo", 409)
        if len(live) <= used:
            raise RefineError("refine: the last answer went into a retrained model and cannot be undone", 409)
        last = live[-1]
        self.answers_log.append({"kind": "undo", "undoes": int(last["answer_id"]), "who": who})
        self._replay()
        self._anchor = None
        return {"undone": int(last["answer_id"]), "answers": len(self.answers_log.live())}

    def retrain(self) -> dict:
        live = len(self.answers_log.live())
        t = self._fit()
        self.model_version += 1
        self._save(self.dir / "models" / f"v{self.model_version}.pt")
        ev = self.evaluate()
        self.f1 = ev.get("f1")
        self.answers_log.append({"kind": "retrain", "model_version": self.model_version, "answers_used": live,
                                 "seconds": round(t["seconds"], 2), "f1": self.f1,
                                 "precision": ev.get("precision"), "recall": ev.get("recall")})
        self.since_retrain = 0
        self._embed()
        self._anchor = None
        return {"model_version": self.model_version, "seconds": round(t["seconds"], 2), "f1": self.f1,
                "precision": ev.get("precision"), "recall": ev.get("recall"), "answers_used": live}

    def answers(self) -> list[dict]:
        return [{k: a.get(k) for k in ("answer_id", "anchor_patch", "anchor_label", "candidates", "same",
                                        "shifts", "who", "time")} for a in self.answers_log.live()]

    # ------------------------------------------------------------------ pictures
    def _png(self, arr: np.ndarray) -> bytes:
        buf = _io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        return buf.getvalue()

    def patch_png(self, patch_id: int, dx: int = 0, dy: int = 0) -> bytes:
        if not 0 <= int(patch_id) < len(self.patches):
            raise RefineError(f"refine: no patch {patch_id}", 404)
        img = self.images[int(self.owner[patch_id])]
        h, w = img.shape[:2]
        x, y = (int(v) for v in self.centres[patch_id])
        if not (0 <= x + dx < w and 0 <= y + dy < h):
            raise RefineError(f"refine: a shift by ({dx}, {dy}) moves patch {patch_id} outside its image")
        return self._png(R.extract_patches(img, np.array([[x + dx, y + dy]]), self.settings["patch"])[0].squeeze())

    def image_png(self, image_id: int | str, overlay: str = "mask") -> bytes:
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise RefineError(f"refine: {image_id!r} is not an image id", 404) from None
        if image_id not in self.images:
            raise RefineError(f"refine: no image {image_id} in this session", 404)
        if overlay not in ("mask", "pred", "none"):
            raise RefineError(f"refine: overlay must be mask, pred or none, got {overlay!r}")
        img = self.images[int(image_id)]
        rgb = np.repeat(img[:, :, None], 3, 2) if img.ndim == 2 else img[:, :, :3]
        rgb = rgb.astype(np.float32)
        if overlay != "none":
            m = (self.masks[int(image_id)] > 0 if overlay == "mask"
                 else R.dense_prediction(self.model, img, size=self.settings["patch"]) > 0.5)
            tint = np.array([255, 40, 40] if overlay == "mask" else [40, 200, 255], np.float32)
            rgb[m] = 0.55 * rgb[m] + 0.45 * tint
        return self._png(rgb.clip(0, 255).astype(np.uint8))

    # ------------------------------------------------------------------ the simulated expert
    def simulate(self, answers: int, *, shift: bool = False, retrain: bool = True,
                 on_retrain: Callable[[dict], None] | None = None) -> list[dict]:
        """Answer `answers` anchors from the truth (engine.methods.refine.simulated_answer),
        retraining every `retrain_every` answers; returns the retrain results."""
        if self.truth is None:
            raise RefineError("refine: the simulated expert needs truth (masks or boxes) in the run")
        out = []
        for _ in range(int(answers)):
            a = self.next_anchor()
            an = a["anchor"]
            cs = [(self.truth[int(c["image_id"])], (c["x"], c["y"])) for c in a["candidates"]]
            lab, same, shifts = R.simulated_answer(self.truth[int(an["image_id"])], (an["x"], an["y"]), cs, shift=shift,
                                                   size=self.settings["patch"])
            ids = [c["patch_id"] for c in a["candidates"]]
            self.answer(a["anchor_id"], anchor_label=lab, same=[p for p, s in zip(ids, same) if s],
                        shifts={ids[i]: v for i, v in shifts.items()}, who="simulated")
            if retrain and self.since_retrain >= self.settings["retrain_every"]:
                r = self.retrain()
                out.append(r)
                if on_retrain is not None:
                    on_retrain(r)
        return out


# --------------------------------------------------------------------------- Ray Train
def _ray_worker(config: dict) -> None:
    """One Ray Train worker: engine.methods.refine.fit_patches from the given weights."""
    import ray.train

    from poolscout.engine.methods import refine as R

    torch.set_num_threads(int(config.get("threads") or 1))
    model = R.PatchNet(config["width"], config["dim"])
    model.load_state_dict(config["state"])
    history = R.fit_patches(model, config["x"], config["y"], R.TrainSettings(**config["ts"]),
                            refined=config["refined"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "model.pt")
        (Path(tmp) / "history.json").write_text(json.dumps(history))
        ray.train.report({"loss": history[-1]["loss"] if history else float("nan")},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _fit_ray(model: R.PatchNet, x, y, refined, ts: R.TrainSettings, run: RunDir) -> list[dict]:
    """Retrain as a Ray Train job (one worker, one CPU) and load its weights into `model`."""
    from dataclasses import asdict

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from poolscout.jobs.ray_env import connect

    connect()
    storage = run.root / "refine" / "ray_train"
    config = {"x": x, "y": y, "refined": refined, "ts": asdict(ts), "width": model.width, "dim": model.dim,
              "state": {k: v.clone() for k, v in model.state_dict().items()}, "threads": 1}
    trainer = TorchTrainer(_ray_worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"refine_{int(time.time() * 1000)}", storage_path=str(storage)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"refine: the Ray Train job reported no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True))
        history = json.loads((Path(d) / "history.json").read_text())
    shutil.rmtree(storage, ignore_errors=True)
    model.eval()
    return history


# --------------------------------------------------------------------------- a tiny session
def demo_session(root: str | Path, *, n_images: int = 20, size: int = 64, test_images: int = 4, **kw) -> RefineSession:
    """A small synthetic segmentation run (engine.data.synthetic with masks) and a session
    on it: for the tests and for trying the page without data. Settings default small."""
    from poolscout.engine.core.config import load_config
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.segment import init_segmentation

    root = Path(root)
    run = RunDir(root / "run")
    if not run.exists():
        pool = generate(root / "pool", n_images=n_images, size=size, seed=3, masks=True, clean_fraction=0.1,
                        defect_scale=2.0)
        names = sorted(p.name for p in pool["images"].iterdir())
        (root / "test.txt").write_text("".join(n + "\n" for n in names[-test_images:]))
        cfg = load_config([], ["dataset.classes=[scratch,inclusion,patch,pit]"])
        init_segmentation(run, images=pool["images"], masks=pool["masks"], test=root / "test.txt", cfg=cfg,
                          progress=False)
    opts = {"patch": 16, "per_image": 16, "steps": 20, "retrain_every": 5, "eval_per_image": 32, "width": 8,
            "dim": 16, **kw}
    return RefineSession(run, **opts)
