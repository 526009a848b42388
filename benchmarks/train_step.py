"""What a CPU training step of the demo detector costs, and what the two speed choices buy.

    python benchmarks/train_step.py [--steps 12] [--rounds 5]

1. RoI Align forward + backward, torchvision's kernel against `engine.models.roi_pool`'s
   GEMM form, on the FPN map sizes of 128-320 px images (64 channels, 2 images, 1 thread).
2. One SGD step of the demo's detector (configs/demo.yaml: EfficientNet-Lite0 Faster R-CNN,
   128 px, batches of 2, 1 thread) with torchvision's RoI Align and the whole backbone
   trained, with the GEMM RoI Align, and with the GEMM RoI Align and
   `trainable_backbone_layers: 2` (the demo's setting).

Variants are timed interleaved in one process (process CPU time, the median over rounds), so
a busy machine slows them alike. Writes benchmarks/results/train_step.json and .png.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _median_ms(fn, reps: int, rounds: int) -> float:
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        out.append((time.process_time() - t0) / reps * 1000)
    return statistics.median(out)


def roi_align_times(rounds: int) -> list[dict]:
    from torchvision.ops import roi_align

    from poolscout.engine.models.roi_pool import roi_align_gemm

    gen = torch.Generator().manual_seed(0)
    rows = []
    for side, k in ((4, 32), (8, 64), (16, 128), (20, 128), (32, 256), (40, 256)):
        x = torch.randn(2, 64, side, side, generator=gen, requires_grad=True)
        extent = side * 8.0
        xy = torch.rand(k, 2, generator=gen) * extent * 0.8
        rois = torch.cat([torch.randint(0, 2, (k, 1), generator=gen).float(), xy,
                          xy + torch.rand(k, 2, generator=gen) * extent * 0.4 + 1], 1)
        row = {"map": f"{side}x{side}", "rois": k}
        for name, f in (("torchvision_ms", lambda: roi_align(x, rois, (7, 7), 1 / 8, 2)),
                        ("gemm_ms", lambda: roi_align_gemm(x, rois, 7, 1 / 8, 2))):
            row[name] = round(_median_ms(lambda: f().sum().backward(), 5, rounds), 2)
        row["speedup"] = round(row["torchvision_ms"] / row["gemm_ms"], 2)
        rows.append(row)
        print(row)
    return rows


def train_step_times(steps: int, rounds: int) -> dict:
    from torchvision.ops import MultiScaleRoIAlign

    from poolscout.engine.core.config import configs_dir, load_config
    from poolscout.engine.models.detectors import build_detector

    variants = {}
    for name, overrides, gemm in (("torchvision roi_align, backbone trained", ["detector.trainable_backbone_layers=5"],
                                   False),
                                  ("gemm roi_align, backbone trained", ["detector.trainable_backbone_layers=5"], True),
                                  ("gemm roi_align, trainable_backbone_layers 2 (demo)", [], True)):
        cfg = load_config([str(configs_dir() / "demo.yaml")], overrides)
        torch.manual_seed(0)
        model = build_detector(cfg.detector, 4, load_pretrained=True)
        if not gemm:
            p = model.roi_heads.box_roi_pool
            model.roi_heads.box_roi_pool = MultiScaleRoIAlign(p.featmap_names, p.output_size, p.sampling_ratio)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
        variants[name] = (model, opt, cfg.detector.input_size, cfg.train.batch_size)
    rng = np.random.default_rng(0)

    def step(model, opt, size, bs):
        images = [torch.rand(3, size, size) for _ in range(bs)]
        targets = []
        for _ in range(bs):
            x, y = rng.uniform(0, size * 0.7, 2)
            w, h = rng.uniform(8, size * 0.3, 2)
            targets.append({"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
                            "labels": torch.tensor([1])})
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):
        for name, (model, opt, size, bs) in variants.items():
            t0 = time.process_time()
            for _ in range(steps):
                step(model, opt, size, bs)
            if r:  # the first round warms up
                times[name].append((time.process_time() - t0) / (steps * bs) * 1000)
    out = {k: round(statistics.median(v), 1) for k, v in times.items()}
    print(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    roi = roi_align_times(args.rounds)
    step = train_step_times(args.steps, args.rounds)
    res = {"roi_align_fwd_bwd": roi, "train_ms_per_image_step": step, "threads": 1,
           "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['map']}\n{r['rois']} RoIs" for r in roi]
    xs = np.arange(len(roi))
    a.bar(xs - 0.2, [r["torchvision_ms"] for r in roi], 0.4, label="torchvision roi_align")
    a.bar(xs + 0.2, [r["gemm_ms"] for r in roi], 0.4, label="GEMM (engine.models.roi_pool)")
    a.set_xticks(xs, labels, fontsize=8)
    a.set_ylabel("ms, forward + backward (1 thread)")
    a.set_title("RoI Align, 64 channels, 2 images")
    a.legend()
    names = list(step)
    b.barh(range(len(names)), [step[n] for n in names], color=["#999", "#4c72b0", "#55a868"])
    b.set_yticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    b.invert_yaxis()
    b.set_xlabel("ms per image-step (demo detector, 128 px, batch 2, 1 thread)")
    for i, n in enumerate(names):
        b.text(step[n], i, f" {step[n]:.0f}", va="center")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"-> {out}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
