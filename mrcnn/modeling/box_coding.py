"""Box regression codes (the paper's tx, ty, tw, th parameterisation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """Encodes boxes as deltas against reference boxes, and decodes them back.

    Args:
        weights: (wx, wy, ww, wh) multipliers of the deltas: (1, 1, 1, 1) for the RPN,
            (10, 10, 5, 5) for the box head, as in Detectron.
        bbox_xform_clip: upper bound of dw, dh before exp(), so huge deltas cannot overflow.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float],
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, gt_boxes: Tensor, proposals: Tensor) -> Tensor:
        """gt_boxes, proposals: float[N, 4] (x1, y1, x2, y2), paired row by row.

        Returns float[N, 4] regression targets.
        """
        wx, wy, ww, wh = self.weights
        ex_w = proposals[:, 2:3] - proposals[:, 0:1]
        ex_h = proposals[:, 3:4] - proposals[:, 1:2]
        ex_x = proposals[:, 0:1] + 0.5 * ex_w
        ex_y = proposals[:, 1:2] + 0.5 * ex_h
        gt_w = gt_boxes[:, 2:3] - gt_boxes[:, 0:1]
        gt_h = gt_boxes[:, 3:4] - gt_boxes[:, 1:2]
        gt_x = gt_boxes[:, 0:1] + 0.5 * gt_w
        gt_y = gt_boxes[:, 1:2] + 0.5 * gt_h
        return torch.cat(
            (
                wx * (gt_x - ex_x) / ex_w,
                wy * (gt_y - ex_y) / ex_h,
                ww * torch.log(gt_w / ex_w),
                wh * torch.log(gt_h / ex_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """deltas: float[N, 4K] (K boxes per reference, e.g. one per class); boxes: float[N, 4].

        Returns float[N, K, 4] decoded boxes (x1, y1, x2, y2).
        """
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * torch.exp(dw) * widths[:, None]
        half_h = 0.5 * torch.exp(dh) * heights[:, None]
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
            dim=2,
        )
