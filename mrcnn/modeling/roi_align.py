"""RoIAlign over FPN levels, with a sparse-matrix kernel for the CPU.

On the CPU, torchvision's `roi_align` backward is a scatter loop that dominated small-image
training steps. Here RoIAlign is written as a sparse matrix S of bilinear weights (4 * s^2
non-zeros per output bin for sampling ratio s) times the channels-last feature map, so the
backward is the transposed sparse product. The arithmetic (sampling points, border rules,
averaging) is torchvision's `aligned=False` RoIAlign; GPUs keep torchvision's kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign as _TVMultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _axis_samples(start: Tensor, bin_size: Tensor, bins: int, sr: int, size: int):
    """Bilinear taps along one axis. start, bin_size: float[R] in feature-map pixels.

    Returns low, high int64[R, bins, sr] indices and their weights float[R, bins, sr], zero
    for samples outside [-1, size] (torchvision's rule)."""
    p = torch.arange(bins, device=start.device, dtype=start.dtype)
    i = torch.arange(sr, device=start.device, dtype=start.dtype)
    c = start[:, None, None] + p[None, :, None] * bin_size[:, None, None] \
        + (i[None, None, :] + 0.5) * bin_size[:, None, None] / sr
    valid = ((c >= -1.0) & (c <= size)).to(c.dtype)
    c = c.clamp(min=0)
    low = c.to(torch.int64)
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(c), c - low.to(c.dtype))
    return low, high, (1 - frac) * valid, frac * valid


def roi_align_sparse(features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                     sampling_ratio: int) -> Tensor:
    """features: float[B, C, H, W] (channels-last memory makes the flattening free);
    rois: float[R, 5] (batch index, x1, y1, x2, y2) in image pixels. Returns float[R, C, PH, PW]."""
    b, c, h, w = features.shape
    ph, pw = output_size
    r, sr = rois.shape[0], sampling_ratio
    if r == 0:
        return features.new_zeros((0, c, ph, pw))
    rois = rois.detach().to(features.dtype)
    x1, y1 = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    rw = (rois[:, 3] * spatial_scale - x1).clamp(min=1.0)
    rh = (rois[:, 4] * spatial_scale - y1).clamp(min=1.0)
    ylo, yhi, wy0, wy1 = _axis_samples(y1, rh / ph, ph, sr, h)
    xlo, xhi, wx0, wx1 = _axis_samples(x1, rw / pw, pw, sr, w)
    ys = torch.stack([ylo, yhi], -1)[:, :, None, :, :, None, None]  # [R, PH, 1, sr, 2, 1, 1]
    wys = torch.stack([wy0, wy1], -1)[:, :, None, :, :, None, None]
    xs = torch.stack([xlo, xhi], -1)[:, None, :, None, None, :, :]  # [R, 1, PW, 1, 1, sr, 2]
    wxs = torch.stack([wx0, wx1], -1)[:, None, :, None, None, :, :]
    base = (rois[:, 0].to(torch.int64) * (h * w))[:, None, None, None, None, None, None]
    cols = (base + ys * w + xs).reshape(-1)
    vals = (wys * wxs / (sr * sr)).reshape(-1)
    taps = 4 * sr * sr
    rows = torch.arange(r * ph * pw, device=features.device).repeat_interleave(taps)
    weights = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (r * ph * pw, b * h * w),
                                      check_invariants=False)  # built in range by construction
    flat = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
    out = torch.sparse.mm(weights, flat)  # [R*PH*PW, C]
    return out.view(r, ph, pw, c).permute(0, 3, 1, 2)


class MultiScaleRoIAlign(_TVMultiScaleRoIAlign):
    """torchvision's FPN level mapping (the paper's eq. 1); the sparse kernel on the CPU."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """x: {name: float[B, C, H_l, W_l]}; boxes: per image float[N_i, 4] in image pixels.

        Returns float[sum N_i, C, S, S] in the order of the concatenated boxes."""
        feats = _filter_input(x, self.featmap_names)
        if feats[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward({k: v.contiguous() for k, v in x.items()}, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        # Every RoI maps to one level, so every row is written. Channels-last, as the kernel
        # produces it and as the mask head's convolutions run fastest.
        result = torch.empty((rois.shape[0], feats[0].shape[1], *self.output_size), dtype=feats[0].dtype,
                             device=feats[0].device, memory_format=torch.channels_last)
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                result[idx] = roi_align_sparse(feat, rois[idx], self.output_size, scale, self.sampling_ratio)
        return result
