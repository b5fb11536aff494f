"""The model learns: it overfits a tiny synthetic batch."""

from __future__ import annotations

import pytest
import torch

from mrcnn import build_model
from tests.helpers.models import small_config


def _scene(seed: int, size: int = 128):
    """An image with a filled disc and a filled square of distinct colours, and its targets."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g) * 0.2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cx, cy, r = 40 + seed * 5, 45, 22
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
    square = (xx >= 70) & (xx < 115) & (yy >= 60 - seed * 4) & (yy < 105 - seed * 4)
    image[:, disc] = torch.tensor([0.9, 0.2, 0.2])[:, None]
    image[:, square] = torch.tensor([0.2, 0.3, 0.9])[:, None]
    masks = torch.stack([disc, square]).to(torch.uint8)
    boxes = []
    for m in masks:
        ys, xs = torch.where(m > 0)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return image, {"boxes": torch.tensor(boxes, dtype=torch.float32),
                   "labels": torch.tensor([1, 2]), "masks": masks}


def bf16_or_skip(precision: str) -> None:
    from mrcnn.precision import unsupported

    why = unsupported(precision, "cpu")
    if why:
        pytest.skip(why)


@pytest.mark.slow  # 80 training steps at 128 px: about 2 minutes on 2 slow cores in fp32
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overfits_a_tiny_batch(precision):
    """In fp32, and in bf16 (the autocast path GPU training takes too): the same steps from the
    same start bring the loss down as far and segment the shapes."""
    bf16_or_skip(precision)
    torch.manual_seed(0)
    model = build_model(small_config()).set_precision(precision)
    scenes = [_scene(0), _scene(1)]
    images = [s[0] for s in scenes]
    targets = [s[1] for s in scenes]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    first = None
    for _ in range(80):
        losses = model(images, targets)
        loss = sum(losses.values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    assert loss.item() < 0.2 * first, (first, loss.item(), {k: v.item() for k, v in losses.items()})

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, target in zip(detections, targets):
        for label, gt_mask in zip(target["labels"], target["masks"].bool()):
            hits = torch.where(det["labels"] == label)[0]
            assert len(hits), f"class {label} not detected"
            best = det["masks"][hits[0]]  # highest-scoring detection of that class
            iou = (best & gt_mask).sum() / (best | gt_mask).sum()
            # Measured after 80 steps: 0.91-0.995 here (seeds 0 and 1, 1 and 2 threads), 0.72 on
            # another machine of this kind; an untrained mask head scores near 0. The loss ratio
            # above measured 0.017-0.03 in fp32, 0.031 in bf16.
            assert iou >= 0.5, iou
    if precision == "fp32":  # the trained model predicts in bf16 what it predicts in fp32
        bf16_or_skip("bf16")
        with torch.no_grad():
            low = model.set_precision("bf16")(images)
        matched, mask_ious = agreement(detections, low)
        # Measured: every detection matched, mask IoU 0.99 (and on 8 unseen scenes 94-97 %, 0.99).
        assert matched == 1.0 and min(mask_ious) >= 0.95, (matched, mask_ious)


def agreement(reference: list[dict], other: list[dict]) -> tuple[float, list[float]]:
    """The share of `reference`'s detections that `other` has too (same class, box IoU >= 0.9),
    and the mask IoU of each such pair."""
    from torchvision.ops import box_iou

    total, ious = 0, []
    for p, q in zip(reference, other):
        total += len(p["boxes"])
        if not len(p["boxes"]) or not len(q["boxes"]):
            continue
        iou = box_iou(p["boxes"], q["boxes"]) * (p["labels"][:, None] == q["labels"][None])
        best, j = iou.max(1)
        for i in torch.where(best >= 0.9)[0].tolist():
            a, b = p["masks"][i], q["masks"][j[i]]
            ious.append(((a & b).sum() / (a | b).sum().clamp(min=1)).item())
    return len(ious) / max(total, 1), ious
