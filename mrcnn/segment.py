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


def decode_or_error(data: bytes | None, name: str, max_pixels: int | None = None
                    ) -> tuple[np.ndarray | None, str | None]:
    """(uint8[H, W, 3] image, None), or (None, the message of the error row it becomes)."""
    if data is None:
        return None, f"no image bytes for {name}"
    try:
        return decode_image(data, name, max_pixels=max_pixels), None
    except (ImageDecodeError, ValueError) as e:
        return None, str(e) or type(e).__name__


def segment_decoded(model: torch.nn.Module, decoded: list[tuple[np.ndarray | None, str | None]],
                    labels: CategoryMap, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """decoded: (image, None) or (None, error message) each, as `decode_or_error` gives -> one row
    each: an error row for each error, the images predicted together."""
    rows: list[dict[str, Any] | None] = [error_row(error) if error else None for _, error in decoded]
    good = [i for i, (_, error) in enumerate(decoded) if error is None]
    for i, row in zip(good, segment_images(model, [decoded[i][0] for i in good], labels, device)):
        rows[i] = row
    return rows


def segment_encoded(model: torch.nn.Module, items: list[tuple[bytes | None, str]], labels: CategoryMap,
                    device: torch.device | str = "cpu", max_pixels: int | None = None) -> list[dict[str, Any]]:
    """items: (encoded image bytes, name for messages) -> one row each; an image that cannot be
    decoded (or is missing: None) gets an error row, the others are predicted together."""
    return segment_decoded(model, [decode_or_error(data, name, max_pixels) for data, name in items], labels, device)
