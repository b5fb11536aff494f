"""Ours against torchvision's Mask R-CNN: same weights, same inputs, alternated in one process.

    python benchmarks/model_vs_torchvision.py [--repeats 3] [--out benchmarks/results/model.json]
                                              [--default-allocator]

Prints a table of median seconds per train step / inference batch, the ratio torchvision /
ours (> 1: ours is faster) and, for inference, each model's effective FLOP rate as a share of
the machine's fp32 matrix-product rate measured in the same run: the work is torchvision's
inference of the batch counted by `torch.utils.flop_counter.FlopCounterMode` (our sparse RoIAlign
would be counted as a dense product), over each model's median time. Writes the numbers as JSON.
Both models run under the allocator policy of the jobs (`workflows.runtime.allocator`), unless
`--default-allocator` leaves glibc's as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_gflops  # noqa: E402

from tests.helpers.oracle import make_pair  # noqa: E402
from workflows.runtime.allocator import reuse_large_blocks  # noqa: E402

CASES = {
    # name: (backbone, image size, batch, torchvision MaskRCNN overrides)
    "r50_fpn_512_b2": ("resnet50", 512, 2, {}),
    "r18_fpn_128_b4_small_heads": ("resnet18", 128, 4, {
        "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 300,
        "box_batch_size_per_image": 64}),
}


def _targets(batch: int, size: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + size * 0.1
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        masks = torch.zeros(4, size, size, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        out.append({"boxes": boxes, "labels": torch.randint(1, 5, (4,), generator=g), "masks": masks})
    return out


def _time(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _train_step(model, opt, images, targets) -> None:
    model.train()
    loss = sum(model(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()


def _infer(model, images) -> None:
    model.eval()
    with torch.no_grad():
        model(images)


def _inference_flops(model, images) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def run(repeats: int, gflops: float) -> dict:
    results = {}
    for name, (backbone, size, batch, overrides) in CASES.items():
        g = torch.Generator().manual_seed(0)
        tv, ours = make_pair(backbone, min_size=size, max_size=size, **overrides)
        images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
        targets = _targets(batch, size, g)
        models = {"torchvision": tv, "ours": ours}
        opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                for k, m in models.items()}
        times = {(k, phase): [] for k in models for phase in ("train_step", "inference")}
        for key, m in models.items():  # warm-up
            _train_step(m, opts[key], images, targets)
            _infer(m, images)
        flops = _inference_flops(tv, images)
        for _ in range(repeats):
            for key, m in models.items():  # alternate, so drift hits both alike
                times[(key, "train_step")].append(_time(_train_step, m, opts[key], images, targets))
                times[(key, "inference")].append(_time(_infer, m, images))
        for phase in ("train_step", "inference"):
            tv_s = statistics.median(times[("torchvision", phase)])
            our_s = statistics.median(times[("ours", phase)])
            results[f"{name}/{phase}"] = {"torchvision_s": tv_s, "ours_s": our_s,
                                          "speedup": tv_s / our_s}
        inference = results[f"{name}/inference"]
        inference["gflop"] = flops / 1e9
        for key in models:
            inference[f"{key}_matmul_share"] = flops / inference[f"{key}_s"] / 1e9 / gflops
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/model_vs_torchvision.json")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator policy as it is (the jobs change it)")
    args = parser.parse_args()
    allocator = "C library default" if args.default_allocator or not reuse_large_blocks() else "large blocks reused"
    gflops = matmul_gflops()
    results = run(args.repeats, gflops)
    print(f"machine: fp32 matmul {gflops:.0f} GFLOP/s, torch threads {torch.get_num_threads()}, "
          f"allocator: {allocator}")
    print(f"{'case':44s} {'torchvision s':>14s} {'ours s':>10s} {'speedup':>8s} {'GFLOP':>7s} "
          f"{'FLOP rate / matmul: tv':>23s} {'ours':>6s}")
    for k, r in results.items():
        line = f"{k:44s} {r['torchvision_s']:14.3f} {r['ours_s']:10.3f} {r['speedup']:8.2f}"
        if "gflop" in r:
            line += (f" {r['gflop']:7.0f} {100 * r['torchvision_matmul_share']:22.0f}% "
                     f"{100 * r['ours_matmul_share']:5.0f}%")
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cpu", "repeats": args.repeats, "matmul_gflops": gflops, "allocator": allocator}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
