"""Signals: one informativeness value per image of a canonical prediction batch.

A signal is a function registered in `SIGNALS` by name with its direction ("high": a
higher value is more informative; "low": a lower value is). Two kinds exist:

* per-box signals (meta `per_box=True`): `fn(batch, *, view) -> (M,)` float64, one value
  per kept box of the view; `compute` reduces them per image with a named reduction.
* image-level signals (`per_box=False`): `fn(batch, *, view, seed, cycle) -> (N,)` float64.
  A signal that needs several views (CALD, HUALE) or MC samples (BALD) is one of these: it
  reads whatever keys of the batch it needs. Only the keyword arguments a function
  declares are passed to it.

Meta `fields` lists the per-box fields a signal reads (so a job loads only those columns).

Spec syntax (used in configs and strategy `by:` keys)::

    [view/]name[:reduce[:k]]

    random                  image-level signal
    entropy:max             max box entropy of the original view
    margin:mean             mean box margin
    entropy:topk_mean:3     mean of the 3 most informative boxes
    hflip/entropy:max       max box entropy of the horizontally flipped view
    entropy                 a per-box signal without reduction means "max"

The result column is `[view_]name[_reduce[_k]]`: "random", "entropy_max",
"entropy_topk_mean_3", "hflip_entropy_max" (the view prefix is omitted for "orig").

Reductions are oriented by the signal's direction: `max` is "the most informative box"
(for margin, direction "low", that is the SMALLEST margin) and `topk_mean` averages the k
most informative boxes (the k smallest margins); `mean` and `sum` are plain. An image with
no boxes gets NaN for a box-reduced signal; `fill_empty` replaces those over the whole
pool (do it after gathering a column, not per shard, since "pool" rules look at all rows).

All arithmetic is float64 and per row / per image, so a value does not depend on how the
pool is cut into batches.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from poolscout.engine.models import predictions as P
from poolscout.engine.core.registry import Registry

SIGNALS: Registry[Callable[..., np.ndarray]] = Registry("signal", plugins="poolscout.engine.methods")
REDUCTIONS = ("max", "mean", "sum", "topk_mean")
DIRECTIONS = ("high", "low")


# --------------------------------------------------------------------------------------
# specs
@dataclass(frozen=True)
class SignalSpec:
    """A parsed signal spec.

    Attributes:
        name: registered signal name.
        reduce: reduction over boxes (per-box signals only), one of REDUCTIONS.
        k: number of boxes for "topk_mean".
        view: the prediction view read ("orig", "hflip", ...).
    """

    name: str
    reduce: str | None = None
    k: int | None = None
    view: str = "orig"

    @property
    def column(self) -> str:
        parts = [self.name]
        if self.reduce is not None:
            parts.append(self.reduce)
        if self.k is not None:
            parts.append(str(self.k))
        col = "_".join(parts)
        return col if self.view == "orig" else f"{self.view}_{col}"

    @property
    def text(self) -> str:
        """The canonical spec text (inverse of `parse_spec`)."""
        s = self.name
        if self.reduce is not None:
            s += f":{self.reduce}"
        if self.k is not None:
            s += f":{self.k}"
        return s if self.view == "orig" else f"{self.view}/{s}"

    def __str__(self) -> str:
        return self.text


def _known_signals() -> str:
    return ", ".join(SIGNALS.names())


def parse_spec(text: str | SignalSpec) -> SignalSpec:
    """Parse `[view/]name[:reduce[:k]]` into a validated `SignalSpec`.

    Raises:
        ValueError: unknown view, signal or reduction (the message lists the known ones),
            a reduction on an image-level signal, a missing or bad k for topk_mean, or k
            given for another reduction.
    """
    if isinstance(text, SignalSpec):
        text = text.text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"bad signal spec {text!r}: expected '[view/]name[:reduce[:k]]'")
    raw = text.strip()
    view = "orig"
    body = raw
    if "/" in raw:
        view, body = raw.split("/", 1)
        if view not in P.VIEWS:
            raise ValueError(f"signal spec {raw!r}: unknown view {view!r}; known: {', '.join(P.VIEWS)}")
    parts = body.split(":")
    name = parts[0]
    if name not in SIGNALS:
        raise ValueError(f"signal spec {raw!r}: unknown signal {name!r}; known: {_known_signals()}")
    if len(parts) > 3:
        raise ValueError(f"signal spec {raw!r}: too many ':' parts (expected name[:reduce[:k]])")
    per_box = SIGNALS.entry(name).meta["per_box"]
    reduce = parts[1] if len(parts) > 1 else None
    k: int | None = None
    if not per_box:
        if reduce is not None:
            raise ValueError(f"signal spec {raw!r}: {name!r} is an image-level signal and takes no reduction")
        return SignalSpec(name, None, None, view)
    if reduce is None or reduce == "":
        reduce = "max"
    if reduce not in REDUCTIONS:
        raise ValueError(f"signal spec {raw!r}: unknown reduction {reduce!r}; known: {', '.join(REDUCTIONS)}")
    if reduce == "topk_mean":
        if len(parts) < 3:
            raise ValueError(f"signal spec {raw!r}: topk_mean needs k, e.g. '{name}:topk_mean:3'")
        try:
            k = int(parts[2])
        except ValueError:
            raise ValueError(f"signal spec {raw!r}: k must be an integer, got {parts[2]!r}") from None
        if k < 1:
            raise ValueError(f"signal spec {raw!r}: k must be >= 1, got {k}")
    elif len(parts) == 3:
        raise ValueError(f"signal spec {raw!r}: only topk_mean takes k")
    return SignalSpec(name, reduce, k, view)


def from_column(column: str) -> SignalSpec:
    """Reverse of `SignalSpec.column`: "hflip_entropy_topk_mean_3" -> its spec.

    Raises:
        ValueError: the column is not the name of any valid spec.
    """
    view, rest = "orig", column
    for v in P.VIEWS[1:]:
        if column.startswith(v + "_"):
            view, rest = v, column[len(v) + 1 :]
            break
    # longest signal name first: a name may contain underscores ("least_confidence")
    for name in sorted(SIGNALS.names(), key=len, reverse=True):
        if rest == name:
            return parse_spec(name if view == "orig" else f"{view}/{name}")
        if rest.startswith(name + "_"):
            tail = rest[len(name) + 1 :]
            for red in REDUCTIONS:
                if tail == red:
                    spec = f"{name}:{red}"
                elif red == "topk_mean" and tail.startswith(red + "_"):
                    spec = f"{name}:{red}:{tail[len(red) + 1:]}"
                else:
                    continue
                spec = spec if view == "orig" else f"{view}/{spec}"
                out = parse_spec(spec)
                if out.column == column:
                    return out
    raise ValueError(f"column {column!r} is not a signal column; known signals: {_known_signals()}")


def direction(spec: SignalSpec | str) -> str:
    """"high" or "low": whether a larger value of the signal means more informative."""
    name = spec.name if isinstance(spec, SignalSpec) else parse_spec(spec).name
    return SIGNALS.entry(name).meta["direction"]


def required_fields(specs: Sequence[SignalSpec | str]) -> dict[str, list[str]]:
    """View -> per-box fields the specs read (so a job loads only those columns)."""
    out: dict[str, list[str]] = {}
    for s in specs:
        s = parse_spec(s)
        need = out.setdefault(s.view, [])
        for f in SIGNALS.entry(s.name).meta.get("fields", ()):
            if f not in need:
                need.append(f)
    return out


def register_signal(name: str, *, direction: str, per_box: bool, fields: tuple[str, ...] = (),
                    views: tuple[str, ...] = (), mc: bool = False, model_free: bool = False,
                    pool_context: Callable[[dict], dict] | None = None, diffusion: bool = False):
    """Decorator: register a signal function (see the module docstring for the two kinds).

    Args:
        views: augmented views the signal reads besides its own (the score job predicts
            them whatever score.views says).
        mc: the signal reads MC-dropout moments (the score job then runs score.mc_passes).
        model_free: the signal reads no prediction (selection then needs no scored pool).
        pool_context: the signal needs statistics of the whole pool (a z-score): fn(batch of
            every scored pool image, `fields` only) -> extra keyword arguments. The scoring
            stream then writes a placeholder and the column is computed when scoring ends.
        diffusion: the signal reads GSAL's diffusion maps (the score job then runs the
            diffusion stage).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"signal {name!r}: direction must be one of {DIRECTIONS}, got {direction!r}")
    bad = [v for v in views if v not in P.VIEWS]
    if bad:
        raise ValueError(f"signal {name!r}: unknown views {bad}; known: {', '.join(P.VIEWS)}")
    return SIGNALS.register(name, direction=direction, per_box=per_box, fields=tuple(fields), views=tuple(views),
                            mc=bool(mc), model_free=bool(model_free), pool_context=pool_context,
                            diffusion=bool(diffusion))


def required_views(specs: Sequence[SignalSpec | str]) -> list[str]:
    """Views the predictions must hold for `specs`, "orig" first."""
    out = ["orig"]
    for s in specs:
        s = parse_spec(s)
        for v in (s.view, *SIGNALS.entry(s.name).meta.get("views", ())):
            if v not in out:
                out.append(v)
    return out


def needs_mc(specs: Sequence[SignalSpec | str]) -> bool:
    """Whether any spec reads MC-dropout moments."""
    return any(SIGNALS.entry(parse_spec(s).name).meta.get("mc", False) for s in specs)


def needs_diffusion(specs: Sequence[SignalSpec | str]) -> bool:
    """Whether any spec reads GSAL's diffusion maps."""
    return any(SIGNALS.entry(parse_spec(s).name).meta.get("diffusion", False) for s in specs)



# --------------------------------------------------------------------------------------
# reductions
def reduce_boxes(values: np.ndarray, offsets: np.ndarray, reduce: str, k: int | None = None,
                 direction: str = "high") -> np.ndarray:
    """Reduce per-box values to one value per image.

    Args:
        values: (M,) per-box values, rows offsets[0]:offsets[-1] used.
        offsets: (N+1,) int64 box offsets per image.
        reduce: "max" (most informative box), "mean", "sum", or "topk_mean" (mean of the
            k most informative boxes; all of them when an image has fewer than k).
        k: for "topk_mean".
        direction: "high" or "low"; for "low", "max" takes the minimum and "topk_mean" the
            k smallest.

    Returns:
        (N,) float64; NaN for images without boxes.
    """
    off = np.asarray(offsets, dtype=np.int64)
    n = len(off) - 1
    v = np.asarray(values, dtype=np.float64)[off[0] : off[-1]]
    cnt = np.diff(off)
    out = np.full(n, np.nan)
    ne = cnt > 0
    if not ne.any():
        return out
    starts = off[:-1][ne] - off[0]
    sign = 1.0 if direction == "high" else -1.0
    if reduce == "max":
        # reduceat over only non-empty starts: each segment then ends exactly where the
        # next non-empty image begins (empty images own no rows)
        out[ne] = sign * np.maximum.reduceat(sign * v, starts)
    elif reduce == "sum":
        out[ne] = np.add.reduceat(v, starts)
    elif reduce == "mean":
        out[ne] = np.add.reduceat(v, starts) / cnt[ne]
    elif reduce == "topk_mean":
        if k is None or k < 1:
            raise ValueError(f"topk_mean needs k >= 1, got {k!r}")
        seg = np.repeat(np.arange(n), cnt)
        order = np.lexsort((-sign * v, seg))  # by image, then most informative first
        rank = np.arange(len(v)) - np.repeat(off[:-1] - off[0], cnt)
        keep = order[rank < k]
        s = np.bincount(seg[keep], weights=v[keep], minlength=n)
        out[ne] = s[ne] / np.minimum(cnt[ne], k)
    else:
        raise ValueError(f"unknown reduction {reduce!r}; known: {', '.join(REDUCTIONS)}")
    return out


def _call(fn: Callable[..., np.ndarray], batch: dict[str, np.ndarray], **ctx) -> np.ndarray:
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(batch, **ctx)
    return fn(batch, **{k: v for k, v in ctx.items() if k in sig.parameters})


def compute_one(batch: dict[str, np.ndarray], spec: SignalSpec | str, *, seed: int = 0,
                cycle: int = 0, context: dict | None = None) -> np.ndarray:
    """One signal column: (N,) float64 (NaN for images without boxes if box-reduced).

    `context` holds extra keyword arguments some signals declare (e.g. `class_quality`
    for dcus); each signal gets only those it declares.
    """
    spec = parse_spec(spec)
    entry = SIGNALS.entry(spec.name)
    n = len(batch["image_id"])
    vals = _call(entry.obj, batch, view=spec.view, seed=seed, cycle=cycle, **(context or {}))
    vals = np.asarray(vals, dtype=np.float64)
    if not entry.meta["per_box"]:
        if vals.shape != (n,):
            raise ValueError(f"signal {spec.name!r} returned shape {vals.shape}, expected ({n},)")
        return vals
    off = batch[P.prefix(spec.view) + "offsets"]
    m = int(off[-1] - off[0])
    if vals.shape != (m,):
        raise ValueError(f"per-box signal {spec.name!r} returned shape {vals.shape}, expected ({m},)")
    return reduce_boxes(vals, off, spec.reduce, spec.k, entry.meta["direction"])


def compute(batch: dict[str, np.ndarray], specs: Sequence[SignalSpec | str], *, seed: int = 0,
            cycle: int = 0, context: dict | None = None) -> dict[str, np.ndarray]:
    """Compute several signals on a canonical batch.

    Args:
        batch: canonical prediction batch (engine.predictions) of N images.
        specs: SignalSpec objects or spec strings.
        seed, cycle: passed to signals that take them (random).
        context: extra keyword arguments for signals that declare them (class_quality).

    Returns:
        column name -> (N,) float64. Box-reduced signals are NaN for images without boxes.
    """
    out: dict[str, np.ndarray] = {}
    per_box_cache: dict[tuple[str, str], np.ndarray] = {}
    n = len(batch["image_id"])
    for s in specs:
        s = parse_spec(s)
        entry = SIGNALS.entry(s.name)
        if entry.meta["per_box"]:  # share the per-box values between reductions
            key = (s.name, s.view)
            if key not in per_box_cache:
                per_box_cache[key] = np.asarray(_call(entry.obj, batch, view=s.view, seed=seed, cycle=cycle,
                                                      **(context or {})), dtype=np.float64)
            off = batch[P.prefix(s.view) + "offsets"]
            out[s.column] = reduce_boxes(per_box_cache[key], off, s.reduce, s.k, entry.meta["direction"])
        else:
            out[s.column] = compute_one(batch, s, seed=seed, cycle=cycle, context=context)
        assert out[s.column].shape == (n,)
    return out


def fill_empty(values: np.ndarray, empty: np.ndarray, rule: str | float, direction: str) -> np.ndarray:
    """Give images without boxes a value, over the whole pool.

    Args:
        values: (N,) float64 signal column (NaN where empty).
        empty: (N,) bool, True for images without boxes.
        rule: "pool_max" (the most informative non-empty value: max for direction "high",
            min for "low"), "pool_min" (the least informative one), or a number.
        direction: the signal's direction.

    Returns:
        (N,) float64 copy with the empty rows filled; 0.0 for a pool_* rule when no row is
        non-empty (or no non-empty value is finite).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    out = np.array(values, dtype=np.float64, copy=True)
    empty = np.asarray(empty, dtype=bool)
    if out.shape != empty.shape:
        raise ValueError(f"values {out.shape} and empty {empty.shape} differ in shape")
    if isinstance(rule, str):
        if rule not in ("pool_max", "pool_min"):
            raise ValueError(f"unknown empty rule {rule!r}; use 'pool_max', 'pool_min' or a number")
        rest = out[~empty]
        rest = rest[np.isfinite(rest)]
        if rest.size == 0:
            fill = 0.0
        else:
            most = rule == "pool_max"
            fill = float(rest.max() if most == (direction == "high") else rest.min())
    else:
        fill = float(rule)
    out[empty] = fill
    return out


__all__ = [
    "SIGNALS", "REDUCTIONS", "SignalSpec", "parse_spec", "from_column", "direction", "compute", "compute_one",
    "fill_empty", "reduce_boxes", "required_fields", "register_signal", "required_views", "needs_mc",
]
