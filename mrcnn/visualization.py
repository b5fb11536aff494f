"""Pictures of instances: masks, boxes, labels and scores drawn on the image, one colour a class.

Used by training (MLflow overlays, ground truth beside prediction), batch inference overlays
and the notebooks. Small images are upscaled first so that the labels can be read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mrcnn.masks import decode_rle_masks

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128]])


def class_colour(label: int) -> tuple[int, int, int]:
    """The same colour for a class in every picture."""
    return tuple(int(c) for c in _PALETTE[int(label) % len(_PALETTE)])


def _as_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return (image.detach().cpu().clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.uint8)


def _dense_masks(masks: Any, size: tuple[int, int]) -> torch.Tensor | None:
    if masks is None:
        return None
    if isinstance(masks, list):  # RLE dicts
        return decode_rle_masks(masks, size).bool()
    return torch.as_tensor(masks).bool()


def draw_instances(image: torch.Tensor | np.ndarray, instances: dict, names: list[str] | None = None,
                   score_threshold: float = 0.5, alpha: float = 0.45, min_side: int = 384) -> Image.Image:
    """image: float[3, H, W] in [0, 1] or uint8[H, W, 3]; instances: `boxes` float[N, 4],
    `labels` int64[N], optional `scores` float[N] and `masks` (bool[N, H, W] or N RLE dicts).
    names[label - 1] names a label. The picture is upscaled by an integer factor until its
    shorter side is at least `min_side`. Returns an RGB PIL image."""
    pixels = _as_uint8(image)
    h, w = pixels.shape[:2]
    scale = max(1, -(-min_side // max(1, min(h, w))))
    scores = instances.get("scores")
    n = len(instances["labels"])
    keep = [i for i in range(n) if scores is None or float(scores[i]) >= score_threshold]
    masks = _dense_masks(instances.get("masks"), (h, w))
    canvas = pixels.astype(np.float32)
    for i in keep:
        if masks is not None:
            m = masks[i].cpu().numpy()
            canvas[m] = canvas[m] * (1 - alpha) + np.array(class_colour(instances["labels"][i])) * alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if scale > 1:
        out = out.resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(11, min(out.size) // 28))
    for i in keep:
        label = int(instances["labels"][i])
        colour = class_colour(label)
        x1, y1, x2, y2 = (float(v) * scale for v in instances["boxes"][i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(1, scale // 2))
        text = names[label - 1] if names and 0 < label <= len(names) and names[label - 1] else str(label)
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        tx, ty = x1 + 2, max(0.0, y1 - font.size - 4)
        box = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=colour, font=font)
    return out


def draw_predictions(image, prediction: dict, names: list[str] | None = None, score_threshold: float = 0.5,
                     alpha: float = 0.45, min_side: int = 384) -> Image.Image:
    """A model's output (`boxes`, `labels`, `scores`, `masks` bool[N, H, W]) on the image."""
    return draw_instances(image, prediction, names, score_threshold, alpha, min_side)


def draw_side_by_side(image, target: dict, prediction: dict, names: list[str] | None = None,
                      score_threshold: float = 0.5, min_side: int = 384) -> Image.Image:
    """Ground truth (left; `boxes`, `labels`, `masks` as RLE dicts or dense) beside the
    prediction (right), with a caption over each."""
    left = draw_instances(image, target, names, 0.0, min_side=min_side)
    right = draw_instances(image, prediction, names, score_threshold, min_side=min_side)
    font = ImageFont.load_default(size=max(12, left.size[1] // 24))
    bar = font.size + 10
    out = Image.new("RGB", (left.size[0] * 2 + 8, left.size[1] + bar), (255, 255, 255))
    out.paste(left, (0, bar))
    out.paste(right, (left.size[0] + 8, bar))
    draw = ImageDraw.Draw(out)
    draw.text((6, 4), f"ground truth ({len(target['labels'])})", fill=(0, 0, 0), font=font)
    kept = sum(1 for s in prediction.get("scores", []) if float(s) >= score_threshold)
    draw.text((left.size[0] + 14, 4), f"prediction ({kept} with score >= {score_threshold})", fill=(0, 0, 0),
              font=font)
    return out
