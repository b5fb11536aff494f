"""Prediction overlays: masks, boxes and labels drawn on the image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128]])


def draw_predictions(image: torch.Tensor | np.ndarray, prediction: dict, names: list[str] | None = None,
                     score_threshold: float = 0.5, alpha: float = 0.45) -> Image.Image:
    """image: float[3, H, W] in [0, 1] or uint8[H, W, 3]; prediction: `boxes` float[N, 4],
    `labels` int64[N], `scores` float[N], `masks` bool[N, H, W]. names[label - 1] is the label's
    name. Returns an RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().cpu().clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    canvas = image.astype(np.float32).copy()
    keep = [i for i, s in enumerate(prediction["scores"].tolist()) if s >= score_threshold]
    masks = prediction.get("masks")
    for i in keep:
        colour = _PALETTE[int(prediction["labels"][i]) % len(_PALETTE)]
        if masks is not None:
            m = masks[i].cpu().numpy().astype(bool)
            canvas[m] = canvas[m] * (1 - alpha) + colour * alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i in keep:
        colour = tuple(int(c) for c in _PALETTE[int(prediction["labels"][i]) % len(_PALETTE)])
        x1, y1, x2, y2 = prediction["boxes"][i].tolist()
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=1)
        label = int(prediction["labels"][i])
        text = names[label - 1] if names and 0 < label <= len(names) else str(label)
        draw.text((x1 + 2, y1 + 1), f"{text} {float(prediction['scores'][i]):.2f}", fill=colour)
    return out
