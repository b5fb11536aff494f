"""`mrcnn-shapes`: write the synthetic shapes dataset in COCO format."""

from __future__ import annotations

import argparse

from mrcnn.data.shapes import write_shapes_dataset
from workflows.config import ShapesGenConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mrcnn-shapes", description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    d = ShapesGenConfig()
    p.add_argument("--train", type=int, default=d.train, help="training images")
    p.add_argument("--val", type=int, default=d.val, help="validation images")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    for name in ("train", "val", "size"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0")
    out = write_shapes_dataset(a.out, a.train, a.val, a.size, a.seed)
    print(f"wrote {a.train} train + {a.val} val images and annotations/instances_{{train,val}}.json to {out}")


if __name__ == "__main__":
    main()
