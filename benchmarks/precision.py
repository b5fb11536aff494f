"""bf16 against fp32 on this machine's CPUs: R50-FPN inference and training step, ours and
torchvision's, side by side in one process, with both matrix-product rates.

    python benchmarks/precision.py [--repeats 3] [--size 512] [--batch 2]
                                   [--out benchmarks/results/precision.json]

The same random weights in both models (`tests/helpers/oracle.py`, as in
`benchmarks/model_vs_torchvision.py`), the same images; runs alternate so drift hits all alike.
Ours in bf16 is `model.set_precision("bf16")` (its convolutions and linear layers under autocast,
the rest fp32: `mrcnn/precision.py`); torchvision's is its forward under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as its reference scripts' `--amp` does. Prints the
median seconds and each time's speed-up over ours in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_gflops  # noqa: E402
from model_vs_torchvision import _targets  # noqa: E402

from mrcnn.precision import cpu_has_bf16  # noqa: E402
from tests.helpers.oracle import make_pair  # noqa: E402
from workflows.runtime.allocator import reuse_large_blocks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/precision.json"))
    a = p.parse_args()
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no bf16 instructions: nothing to compare")
    reuse_large_blocks()
    rates = {"fp32": matmul_gflops(), "bf16": matmul_gflops(dtype=torch.bfloat16)}
    g = torch.Generator().manual_seed(0)
    tv, ours = make_pair("resnet50", min_size=a.size, max_size=a.size)
    images = [torch.rand(3, a.size, a.size, generator=g) for _ in range(a.batch)]
    targets = _targets(a.batch, a.size, g)

    def autocast(on: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    variants = {  # name: (model, our precision, torchvision's autocast)
        "ours fp32": (ours, "fp32", False), "ours bf16": (ours, "bf16", False),
        "torchvision fp32": (tv, None, False), "torchvision autocast bf16": (tv, None, True)}
    opts = {id(m): torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=1e-5) for m in (tv, ours)}

    def infer(model, precision, cast) -> None:
        if precision:
            model.set_precision(precision)
        model.eval()
        with torch.no_grad(), autocast(cast):
            model(images)

    def train(model, precision, cast) -> None:
        if precision:
            model.set_precision(precision)
        model.train()
        with autocast(cast):
            loss = sum(model(images, targets).values())
        opts[id(model)].zero_grad()
        loss.backward()
        opts[id(model)].step()

    times = {(v, phase): [] for v in variants for phase in ("inference", "train_step")}
    for phase, fn in (("inference", infer), ("train_step", train)):
        for v in variants.values():  # warm-up
            fn(*v)
        for _ in range(a.repeats):
            for name, v in variants.items():
                t = time.perf_counter()
                fn(*v)
                times[(name, phase)].append(time.perf_counter() - t)
    print(f"matrix-product rate ({torch.get_num_threads()} threads): fp32 {rates['fp32']:.0f} GFLOP/s, "
          f"bf16 {rates['bf16']:.0f} GFLOP/s ({rates['bf16'] / rates['fp32']:.1f}x)")
    print(f"R50-FPN, {a.batch} images of {a.size} px, median of {a.repeats}")
    print(f"{'phase':12s} {'variant':28s} {'s':>8s} {'speed-up vs ours fp32':>22s}")
    results = {}
    for phase in ("inference", "train_step"):
        base = statistics.median(times[("ours fp32", phase)])
        for name in variants:
            s = statistics.median(times[(name, phase)])
            results[f"{phase}/{name}"] = {"seconds": s, "speedup_vs_ours_fp32": base / s}
            print(f"{phase:12s} {name:28s} {s:8.2f} {base / s:21.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "matmul_gflops": rates, "threads": torch.get_num_threads(),
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
