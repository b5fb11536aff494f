"""Segmenting images into rows: what `mrcnn-infer` writes for each image and what a served model
returns, one dict per image.

    row = {"width": W, "height": H, "boxes": [[x1, y1, x2, y2], ...], "scores": [...],
           "labels": [category ids], "category_names": [...], "masks": [COCO RLE, ...],
           "error": None}

A row whose image could not be read or decoded holds only the `error` message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mrcnn.data.coco import CategoryMap
from mrcnn.data.images import ImageDecodeError, decode_image
from mrcnn.masks import encode_masks

ROW_FIELDS = ("width", "height", "boxes", "scores", "labels", "category_names", "masks", "error")


def detection_row(prediction: dict[str, torch.Tensor], labels: CategoryMap, height: int, width: int) -> dict[str, Any]:
    """One image's prediction (`boxes` float[N, 4], `labels` int64[N] in 1..K, `scores` float[N],
    `masks` bool[N, H, W]) -> its row, labels mapped back to the dataset's category ids."""
    classes = [int(k) for k in prediction["labels"]]
    return {"width": int(width), "height": int(height), "boxes": prediction["boxes"].tolist(),
            "scores": prediction["scores"].tolist(), "labels": [labels.category_id(k) for k in classes],
            "category_names": [labels.names[k - 1] for k in classes],
            "masks": encode_masks(prediction["masks"]), "error": None}


def error_row(message: str) -> dict[str, Any]:
    return {**dict.fromkeys(ROW_FIELDS), "error": message}


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """images: float[3, H, W] in [0, 1] on the model's device -> per image `boxes` float[N, 4],
    `labels` int64[N], `scores` float[N], `masks` bool[N, H, W], on the CPU (eval mode, the
    model's mode restored)."""
    was_training = model.training
    model.eval()
    try:
        preds = model(images)
    finally:
        model.train(was_training)
    return [{k: v.cpu() for k, v in p.items()} for p in preds]


def segment_images(model: torch.nn.Module, images: list[np.ndarray], labels: CategoryMap,
                   device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """images: uint8[H, W, 3] RGB -> one row each, predicted in one call."""
    if not images:
        return []
    tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(device).float() / 255
               for im in images]
    return [detection_row(p, labels, im.shape[0], im.shape[1])
            for p, im in zip(predict_images(model, tensors), images)]


def segment_encoded(model: torch.nn.Module, items: list[tuple[bytes | None, str]], labels: CategoryMap,
                    device: torch.device | str = "cpu", max_pixels: int | None = None) -> list[dict[str, Any]]:
    """items: (encoded image bytes, name for messages) -> one row each; an image that cannot be
    decoded (or is missing: None) gets an error row, the others are predicted together."""
    rows: list[dict[str, Any] | None] = [None] * len(items)
    good, images = [], []
    for i, (data, name) in enumerate(items):
        if data is None:
            rows[i] = error_row(f"no image bytes for {name}")
            continue
        try:
            images.append(decode_image(data, name, max_pixels=max_pixels))
            good.append(i)
        except ImageDecodeError as e:
            rows[i] = error_row(str(e))
    for i, row in zip(good, segment_images(model, images, labels, device)):
        rows[i] = row
    return rows
