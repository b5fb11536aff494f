"""Training augmentation on decoded images with RLE masks (numpy: it runs where images are
decoded), and records -> model targets (torch: it runs on the training worker)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mrcnn.masks import decode_rle_array, encode_masks

if TYPE_CHECKING:
    import torch


def horizontal_flip(image: np.ndarray, anns: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict]]:
    """image: uint8[H, W, 3]; anns with `bbox` [x1, y1, x2, y2] and `rle`. Returns flipped copies."""
    h, w = image.shape[:2]
    out = []
    if anns:
        masks = decode_rle_array([a["rle"] for a in anns], (h, w))[:, :, ::-1]
        for a, rle in zip(anns, encode_masks(masks)):
            x1, y1, x2, y2 = a["bbox"]
            out.append({**a, "bbox": [w - x2, y1, w - x1, y2], "rle": rle})
    return np.ascontiguousarray(image[:, ::-1]), out


def resize_shorter_side(
    image: np.ndarray, anns: list[dict[str, Any]], size: int, max_size: int
) -> tuple[np.ndarray, list[dict]]:
    """Resize so the shorter side is `size` (the longer at most `max_size`); masks nearest."""
    h, w = image.shape[:2]
    scale = min(size / min(h, w), max_size / max(h, w))
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    if (nh, nw) == (h, w):
        return image, anns
    resized = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = []
    if anns:
        masks = decode_rle_array([a["rle"] for a in anns], (h, w))
        # Nearest neighbour as torch's interpolate(mode="nearest"): source = floor(dest * in / out).
        rows = np.minimum((np.arange(nh) * (h / nh)).astype(np.int64), h - 1)
        cols = np.minimum((np.arange(nw) * (w / nw)).astype(np.int64), w - 1)
        masks = masks[:, rows[:, None], cols[None, :]]
        sx, sy = nw / w, nh / h
        for a, rle in zip(anns, encode_masks(masks)):
            x1, y1, x2, y2 = a["bbox"]
            out.append({**a, "bbox": [x1 * sx, y1 * sy, x2 * sx, y2 * sy], "rle": rle})
    return resized, out


def to_model_inputs(image: np.ndarray, anns: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
    """uint8[3, H, W] or [H, W, 3] + annotations -> float[3, H, W] in [0, 1] and a target with
    `boxes` float[N, 4], `labels` int64[N], `masks` (N RLE dicts). Crowd regions are dropped,
    as in torchvision's references: they are neither instances nor background to learn."""
    import torch

    t = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # Arrow buffers are read-only
    if t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    anns = [a for a in anns if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    idx = torch.where(keep)[0].tolist()
    return t.float().div_(255), {
        "boxes": boxes[keep],
        "labels": torch.tensor([anns[i]["label"] for i in idx], dtype=torch.int64),
        "masks": [anns[i]["rle"] for i in idx],
    }
