"""Fine-tuning a registered model on another COCO-format dataset against training from scratch.

    python benchmarks/fine_tune.py [--parent-epochs 10] [--epochs 3] [--out benchmarks/results/fine_tune.json]

1. `mrcnn-train` on the shapes dataset (the parent), registered as `shapes@champion`.
2. Another COCO-format dataset: shapes drawn with another seed, without the triangle category
   (2 categories instead of 3, so the class predictors cannot carry over).
3. The same schedule on it twice, side by side: from `trainer.init_weights=models:/shapes@champion`
   and from scratch. Prints the mask AP (and box AP) after each epoch of both, the steps run and
   the machine's fp32 matrix-product rate; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops, train_job  # noqa: E402

from mrcnn.data.shapes import write_shapes_dataset  # noqa: E402


def without_category(root: Path, category_id: int) -> Path:
    for split in ("train", "val"):
        p = root / f"annotations/instances_{split}.json"
        d = json.loads(p.read_text())
        d["categories"] = [c for c in d["categories"] if c["id"] != category_id]
        d["annotations"] = [a for a in d["annotations"] if a["category_id"] != category_id]
        p.write_text(json.dumps(d))
    return root


def curve(client, run: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run, key), key=lambda m: m.step)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=128, help="training images of the second dataset")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/fine_tune.json"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-finetune-"))
    gflops = matmul_gflops()
    # One output folder: one MLflow store holds the parent's registered version and both runs.
    parent_client, _, _ = train_job(work, [f"trainer.epochs={a.parent_epochs}", "tracking.registered_model=shapes",
                                           "run_name=parent"])
    parent_client.set_registered_model_alias("shapes", "champion", "1")
    other = without_category(write_shapes_dataset(work / "other", train=a.images, val=64, size=128, seed=7), 3)
    schedule = [f"data.root={other}", "data.generate=null", f"trainer.epochs={a.epochs}",
                "trainer.eval_every_epochs=1"]
    results = {}
    for name, extra in (("fine-tuned", ["trainer.init_weights=models:/shapes@champion"]), ("from scratch", [])):
        client, run, wall = train_job(work, [*schedule, *extra, f"run_name={name.replace(' ', '-')}"])
        results[name] = {"segm_AP": curve(client, run, "val/segm_AP"), "bbox_AP": curve(client, run, "val/bbox_AP"),
                         "wall_minutes": wall / 60}
    print(f"\nfp32 matmul {gflops:.0f} GFLOP/s; parent: {a.parent_epochs} epochs of shapes; second dataset: "
          f"{a.images} images, 2 categories, {a.epochs} epochs")
    print(f"{'step':>6} {'fine-tuned mask AP':>19} {'from scratch mask AP':>21}")
    for (step, tuned), (_, scratch) in zip(results["fine-tuned"]["segm_AP"], results["from scratch"]["segm_AP"]):
        print(f"{step:>6} {tuned:>19.3f} {scratch:>21.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"matmul_gflops": gflops, "args": vars(a), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
