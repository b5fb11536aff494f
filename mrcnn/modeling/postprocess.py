"""Detections back to input-image coordinates, and masks pasted into the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Float working memory for pasting is bounded by chunking detections (bytes).
_PASTE_BYTES = 64 * 2**20


def resize_boxes(boxes: Tensor, new_size: tuple[int, int], old_size: tuple[int, int]) -> Tensor:
    """boxes: float[N, 4] in an image of `old_size` (h, w) -> the same boxes at `new_size`."""
    rh = torch.tensor(new_size[0], dtype=torch.float32) / torch.tensor(old_size[0], dtype=torch.float32)
    rw = torch.tensor(new_size[1], dtype=torch.float32) / torch.tensor(old_size[1], dtype=torch.float32)
    return boxes * torch.stack([rw, rh, rw, rh]).to(boxes)


def _axis_matrix(lo: Tensor, hi: Tensor, m: int, length: int) -> Tensor:
    """Bilinear resampling of a length-`m` axis onto the integer span [lo, hi] of an image axis,
    as a matrix: lo, hi int64[N] -> float[N, length, m], two non-zeros a row inside the span and
    none outside. The arithmetic is `F.interpolate(bilinear, align_corners=False)` to
    `hi - lo + 1` pixels, the rule torchvision pastes with.
    """
    span = (hi - lo + 1).clamp(min=1)
    pos = torch.arange(length, device=lo.device)[None, :] - lo[:, None]  # [N, length]
    scale = m / span.to(torch.float32)
    src = ((pos.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=m - 1)
    i1 = (i0 + 1).clamp(max=m - 1)
    w1 = src - i0
    inside = ((pos >= 0) & (pos < span[:, None])).to(src.dtype)
    mat = torch.zeros((lo.shape[0], length, m), dtype=src.dtype, device=lo.device)
    mat.scatter_add_(2, i0[..., None], ((1 - w1) * inside)[..., None])
    mat.scatter_add_(2, i1[..., None], (w1 * inside)[..., None])
    return mat


def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int],
                threshold: float = 0.5) -> Tensor:
    """Paste every detection's mask into the image in one batched, separable resampling.

    mask_probs: float[N, M, M] probabilities in the box; boxes: float[N, 4] in the image;
    image_size: (H, W). Returns bool[N, H, W] (probability > threshold).

    Like torchvision: the M x M mask is padded by one zero pixel and the box enlarged to match,
    then rounded to whole pixels. Bilinear resampling is separable, so each mask is resampled by
    two small matrix products, rows [H, M+2] @ mask [M+2, M+2] @ columns [M+2, W], batched over
    the detections, instead of one interpolate per mask.
    """
    n, m = mask_probs.shape[0], mask_probs.shape[-1]
    h, w = image_size
    out = torch.empty((n, h, w), dtype=torch.bool, device=mask_probs.device)
    if n == 0:
        return out
    padded = F.pad(mask_probs.float(), (1, 1, 1, 1))  # [N, M+2, M+2]
    mp = m + 2
    scale = mp / m
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    ib = torch.cat([centre - half, centre + half], dim=1).to(torch.int64)  # truncation, as torch
    chunk = max(1, _PASTE_BYTES // max(1, 4 * h * w))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        b = ib[s:e]
        cols = torch.bmm(padded[s:e], _axis_matrix(b[:, 0], b[:, 2], mp, w).transpose(1, 2))  # [n, mp, W]
        rows = _axis_matrix(b[:, 1], b[:, 3], mp, h)  # [n, H, mp]
        torch.gt(torch.bmm(rows, cols), threshold, out=out[s:e])
    return out
