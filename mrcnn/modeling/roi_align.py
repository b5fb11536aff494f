"""RoIAlign over FPN levels, with a sparse-matrix kernel for the CPU.

On the CPU, torchvision's `roi_align` is a loop per output bin, and its backward a scatter loop
that dominated small-image training steps. Here RoIAlign over all FPN levels at once is one
sparse matrix S of bilinear weights (4 * s^2 non-zeros per output bin for sampling ratio s,
rows in RoI order) times the channels-last feature maps stacked into one [positions, C] matrix:
the forward is a CSR product, the backward the transposed product in COO form (the faster of
the two for each direction, measured). The arithmetic (sampling points, border rules, averaging)
is torchvision's `aligned=False` RoIAlign; GPUs keep torchvision's kernel.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign as _TVMultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper


def _axis_samples(start: Tensor, bin_size: Tensor, bins: int, sr: int, size: Tensor):
    """Bilinear taps along one axis. start, bin_size: float[R] in feature-map pixels; size:
    int64[R], the map's length along this axis for each RoI.

    Returns low, high int64[R, bins, sr] indices and their weights float[R, bins, sr], zero
    for samples outside [-1, size] (torchvision's rule)."""
    p = torch.arange(bins, device=start.device, dtype=start.dtype)
    i = torch.arange(sr, device=start.device, dtype=start.dtype)
    c = start[:, None, None] + p[None, :, None] * bin_size[:, None, None] \
        + (i[None, None, :] + 0.5) * bin_size[:, None, None] / sr
    size = size[:, None, None]
    valid = ((c >= -1.0) & (c <= size)).to(c.dtype)
    c = c.clamp(min=0)
    low = c.to(torch.int64)
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(c), c - low.to(c.dtype))
    return low, high, (1 - frac) * valid, frac * valid


# torch warns on every new process that builds a CSR tensor; the product used here is tested.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


class _SparseProduct(torch.autograd.Function):
    """out = S @ flat, S [num_rows, P] given row by row: `taps` non-zeros a row, their column
    indices `cols` int64[num_rows * taps] and values `vals`. CSR forward, transposed COO backward.
    flat: float[P, C] -> float[num_rows, C]."""

    @staticmethod
    def forward(ctx, flat: Tensor, cols: Tensor, vals: Tensor, num_rows: int, taps: int) -> Tensor:
        crow = torch.arange(0, num_rows * taps + 1, taps, device=flat.device)
        s = torch.sparse_csr_tensor(crow, cols, vals, (num_rows, flat.shape[0]), check_invariants=False)
        ctx.save_for_backward(cols, vals)
        ctx.shape, ctx.taps = (num_rows, flat.shape[0]), taps
        return s @ flat

    @staticmethod
    def backward(ctx, grad: Tensor):
        cols, vals = ctx.saved_tensors
        num_rows, positions = ctx.shape
        rows = torch.arange(num_rows, device=grad.device).repeat_interleave(ctx.taps)
        st = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (positions, num_rows),
                                     check_invariants=False)  # in range by construction
        return torch.sparse.mm(st, grad.contiguous()), None, None, None, None


def roi_align_levels(features: list[Tensor], scales: list[float], rois: Tensor, levels: Tensor,
                     output_size: tuple[int, int], sampling_ratio: int) -> Tensor:
    """RoIAlign of each RoI on its own FPN level, in one sparse product.

    features: per level float[B, C, H_l, W_l] (channels-last memory makes the flattening free);
    scales: per level, feature-map pixels per image pixel; rois: float[R, 5] (batch index, x1,
    y1, x2, y2) in image pixels; levels: int64[R], each RoI's index into `features`.
    Returns float[R, C, PH, PW] (channels-last memory), rows in the order of `rois`.
    """
    c = features[0].shape[1]
    ph, pw = output_size
    r, sr = rois.shape[0], sampling_ratio
    if r == 0:
        return features[0].new_zeros((0, c, ph, pw))
    device, dtype = rois.device, features[0].dtype
    hs = torch.tensor([f.shape[2] for f in features], device=device)[levels]
    ws = torch.tensor([f.shape[3] for f in features], device=device)[levels]
    areas = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    offsets = torch.tensor([sum(areas[:i]) for i in range(len(areas))], device=device)[levels]
    scale = torch.tensor(scales, device=device, dtype=dtype)[levels]
    rois = rois.detach().to(dtype)
    x1, y1 = rois[:, 1] * scale, rois[:, 2] * scale
    rw = (rois[:, 3] * scale - x1).clamp(min=1.0)
    rh = (rois[:, 4] * scale - y1).clamp(min=1.0)
    ylo, yhi, wy0, wy1 = _axis_samples(y1, rh / ph, ph, sr, hs)
    xlo, xhi, wx0, wx1 = _axis_samples(x1, rw / pw, pw, sr, ws)
    ys = torch.stack([ylo, yhi], -1)[:, :, None, :, :, None, None]  # [R, PH, 1, sr, 2, 1, 1]
    wys = torch.stack([wy0, wy1], -1)[:, :, None, :, :, None, None]
    xs = torch.stack([xlo, xhi], -1)[:, None, :, None, None, :, :]  # [R, 1, PW, 1, 1, sr, 2]
    wxs = torch.stack([wx0, wx1], -1)[:, None, :, None, None, :, :]
    base = (offsets + rois[:, 0].to(torch.int64) * hs * ws)[:, None, None, None, None, None, None]
    cols = (base + ys * ws[:, None, None, None, None, None, None] + xs).reshape(-1)
    vals = (wys * wxs / (sr * sr)).reshape(-1)
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features])  # [sum_l B*H_l*W_l, C]
    out = _SparseProduct.apply(flat, cols, vals, r * ph * pw, 4 * sr * sr)  # [R*PH*PW, C]
    return out.view(r, ph, pw, c).permute(0, 3, 1, 2)


def level_scales(features: list[Tensor], image_shapes: list[tuple[int, int]], canonical_scale: int,
                 canonical_level: int) -> tuple[list[float], LevelMapper]:
    """Each level's scale (feature-map pixels per image pixel, a power of 2 measured against the
    largest image side), and the FPN level mapper over those levels (torchvision's rule)."""
    if not image_shapes:
        raise ValueError("images list should not be empty")
    height = max(h for h, _ in image_shapes)
    scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
    return scales, LevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])),
                               canonical_scale=canonical_scale, canonical_level=canonical_level)


class MultiScaleRoIAlign(_TVMultiScaleRoIAlign):
    """torchvision's FPN level mapping (the paper's eq. 1); the sparse kernel on the CPU."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """x: {name: float[B, C, H_l, W_l]}; boxes: per image float[N_i, 4] in image pixels.

        Returns float[sum N_i, C, S, S] in the order of the concatenated boxes."""
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if feats[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward({k: v.contiguous() for k, v in x.items()}, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = level_scales(feats, image_shapes, self.canonical_scale,
                                                        self.canonical_level)
        levels = self.map_levels(boxes)
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        return roi_align_levels(feats, self.scales, rois, levels, self.output_size, self.sampling_ratio)
