"""Instance masks as COCO run-length encodings (pycocotools), and back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # numpy-only at import: decoding processes need no torch
    from torch import Tensor


def to_compressed_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, uncompressed RLE or compressed RLE) -> compressed RLE with
    `counts` as str (JSON- and Arrow-friendly)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
    else:
        raise ValueError(f"unsupported segmentation {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _pyco(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_rle_array(rles: list[dict[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """Compressed (or uncompressed) RLE dicts -> uint8[G, H, W] with H, W = size."""
    h, w = int(size[0]), int(size[1])
    if not rles:
        return np.zeros((0, h, w), dtype=np.uint8)
    for rle in rles:
        if tuple(rle["size"]) != (h, w):
            raise ValueError(f"RLE mask of size {rle['size']} does not match its image ({h}, {w})")
    dense = mask_utils.decode([_pyco(r) for r in rles])  # [H, W, G], Fortran order
    return np.ascontiguousarray(dense.transpose(2, 0, 1))


def decode_rle_masks(rles: list[dict[str, Any]], size: tuple[int, int]) -> Tensor:
    """`decode_rle_array` as a tensor: uint8[G, H, W]."""
    import torch

    return torch.from_numpy(decode_rle_array(rles, size))


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """bool/uint8[N, H, W] -> N compressed RLE dicts with str counts."""
    arr = masks.cpu().numpy() if hasattr(masks, "cpu") else np.asarray(masks)
    if arr.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]
