"""bf16 inference against fp32 on the same trained weights: detections matched, their masks, AP.

    python benchmarks/precision_agreement.py CHECKPOINT DATA_ROOT [--split val]
                                             [--out benchmarks/results/precision_agreement.json]

CHECKPOINT: a `checkpoint.pt` written by `mrcnn-train` (for example the default job's, from
`benchmarks/time_to_accuracy.py`); DATA_ROOT: its COCO-format dataset (the shapes default:
OUTPUT_DIR/data/shapes). Every image of the split is predicted in fp32 and in bf16 by the same
model (score threshold 0.05, at most 100 detections, COCO's evaluation settings). Prints the
share of fp32 detections that bf16 also makes (same class, box IoU >= 0.9), overall and for those
scoring 0.5 or more, the mean mask IoU of the matched pairs, and COCO AP (bbox and segm) of both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.ops import box_iou

from mrcnn.checkpoint import load_checkpoint
from mrcnn.data.coco import CategoryMap
from mrcnn.data.images import decode_image
from mrcnn.evaluation.coco_eval import evaluate_coco, to_coco_results
from mrcnn.masks import encode_masks
from mrcnn.segment import predict_images


def matched(reference: dict, other: dict, min_score: float) -> tuple[int, int, list[float]]:
    """(reference detections scoring >= min_score, how many `other` has too, their mask IoUs)."""
    keep = reference["scores"] >= min_score
    boxes, labels, masks = reference["boxes"][keep], reference["labels"][keep], reference["masks"][keep]
    if not len(boxes) or not len(other["boxes"]):
        return len(boxes), 0, []
    iou = box_iou(boxes, other["boxes"]) * (labels[:, None] == other["labels"][None])
    best, j = iou.max(1)
    ious = [((masks[i] & other["masks"][j[i]]).sum() / (masks[i] | other["masks"][j[i]]).sum().clamp(min=1)).item()
            for i in torch.where(best >= 0.9)[0].tolist()]
    return len(boxes), len(ious), ious


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data_root")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/precision_agreement.json"))
    a = p.parse_args()
    model, payload = load_checkpoint(a.checkpoint)
    model = model.set_detection_limits(0.05, 100).eval()
    labels = CategoryMap.from_dict(payload["label_map"])
    root = Path(a.data_root)
    coco = json.loads((root / f"annotations/instances_{a.split}.json").read_text())
    results = {"fp32": {"bbox": [], "segm": []}, "bf16": {"bbox": [], "segm": []}}
    counts = {0.05: [0, 0], 0.5: [0, 0]}
    ious: list[float] = []
    for im in coco["images"]:
        pixels = decode_image((root / im["file_name"]).read_bytes())
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        preds = {precision: predict_images(model.set_precision(precision), [image])[0] for precision in results}
        for precision, pred in preds.items():
            bbox, segm = to_coco_results(im["id"], {**pred, "rles": encode_masks(pred["masks"])}, labels)
            results[precision]["bbox"] += bbox
            results[precision]["segm"] += segm
        for min_score, c in counts.items():
            total, hits, pair_ious = matched(preds["fp32"], preds["bf16"], min_score)
            c[0] += total
            c[1] += hits
            if min_score == 0.05:
                ious += pair_ious
    ap = {precision: evaluate_coco(coco, r) for precision, r in results.items()}
    report = {"images": len(coco["images"]),
              "matched_share": {str(k): c[1] / max(c[0], 1) for k, c in counts.items()},
              "fp32_detections": {str(k): c[0] for k, c in counts.items()},
              "mean_mask_iou": sum(ious) / max(len(ious), 1), "min_mask_iou": min(ious, default=float("nan")),
              "AP": {precision: {t: m["AP"] for t, m in v.items()} for precision, v in ap.items()}}
    print(f"{report['images']} {a.split} images; fp32 detections matched by bf16 (same class, box IoU >= 0.9):")
    for k, c in counts.items():
        print(f"  score >= {k}: {c[1]} of {c[0]} ({100 * c[1] / max(c[0], 1):.1f} %)")
    print(f"mask IoU of the matched pairs: mean {report['mean_mask_iou']:.4f}, lowest {report['min_mask_iou']:.4f}")
    for t in ("bbox", "segm"):
        print(f"{t} AP: fp32 {ap['fp32'][t]['AP']:.4f}, bf16 {ap['bf16'][t]['AP']:.4f}, "
              f"difference {ap['bf16'][t]['AP'] - ap['fp32'][t]['AP']:+.4f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
