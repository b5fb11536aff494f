"""Anchor boxes over the FPN levels."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors at every position of every feature map, in padded-batch pixel coordinates.

    Args:
        sizes: per level, the anchor sizes (sqrt of area) in pixels, e.g. [[32], [64], ...].
        aspect_ratios: height / width ratios, the same on every level.

    The per-image anchor set is float[sum_l(H_l * W_l * A), 4], level-major, then position
    (row-major), then anchor (ratio-major, then size), matching the RPN head's output order.
    """

    def __init__(self, sizes: list[list[int]], aspect_ratios: list[float]) -> None:
        super().__init__()
        self.cell_anchors = [self._cell_anchors(s, aspect_ratios) for s in sizes]
        self._cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _cell_anchors(scales: list[int], aspect_ratios: list[float]) -> Tensor:
        """float[A, 4] anchors centred on (0, 0), rounded to whole pixels as in Detectron."""
        scales_t = torch.as_tensor(scales, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> int:
        return self.cell_anchors[0].shape[0]

    def forward(self, image_size: tuple[int, int], feature_maps: list[Tensor]) -> Tensor:
        """image_size: (H, W) of the padded batch; feature_maps: per level [B, C, H_l, W_l].

        Returns float[sum_l(H_l * W_l * A), 4], shared by every image of the batch.
        """
        device, dtype = feature_maps[0].device, feature_maps[0].dtype
        grids = tuple(tuple(f.shape[-2:]) for f in feature_maps)
        key = (tuple(image_size), grids, str(device), dtype)
        if key not in self._cache:
            out = []
            for (gh, gw), base in zip(grids, self.cell_anchors):
                sh, sw = image_size[0] // gh, image_size[1] // gw
                ys = torch.arange(gh, device=device, dtype=dtype) * sh
                xs = torch.arange(gw, device=device, dtype=dtype) * sw
                y, x = torch.meshgrid(ys, xs, indexing="ij")
                x, y = x.reshape(-1), y.reshape(-1)
                shifts = torch.stack((x, y, x, y), dim=1)
                out.append((shifts[:, None, :] + base.to(device, dtype)[None, :, :]).reshape(-1, 4))
            if len(self._cache) > 64:  # multi-scale training sees a bounded set of sizes
                self._cache.clear()
            self._cache[key] = torch.cat(out)
        return self._cache[key]
