"""Region Proposal Network: objectness and box deltas per anchor, then proposals by NMS."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from mrcnn.config import RPNConfig
from mrcnn.modeling.anchors import AnchorGenerator
from mrcnn.modeling.box_coding import BoxCoder
from mrcnn.modeling.losses import rpn_loss
from mrcnn.modeling.sampling import BalancedPositiveNegativeSampler, Matcher
from mrcnn.precision import Precision


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A deltas."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        # Nested Sequential: torchvision's key names (conv.0.0.weight).
        self.conv = nn.Sequential(nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level float[B, C, H, W] -> ([B, A, H, W], [B, 4A, H, W]) per level."""
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten_levels(per_level: list[Tensor], c: int) -> Tensor:
    """per level float[B, A*c, H, W] -> float[B, sum_l(H*W*A), c], position-major then anchor."""
    out = []
    for t in per_level:
        b, _, h, w = t.shape
        out.append(t.view(b, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, c))
    return torch.cat(out, dim=1)


class RegionProposalNetwork(nn.Module):
    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, cfg: RPNConfig) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.cfg = cfg
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(cfg.batch_size_per_image, cfg.positive_fraction)
        self.min_size = 1e-3
        self.precision = Precision()  # its head's (the model shares its own)

    def forward(
        self, padded_size: tuple[int, int], image_sizes: list[tuple[int, int]],
        features: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """padded_size: (H, W) of the batch tensor; image_sizes: per image (h, w) before padding;
        features: per level float[B, C, H_l, W_l]; targets: per image `boxes` float[G, 4].

        Returns per image proposals float[P_i, 4] and, in training, the two RPN losses.
        """
        with self.precision.region(features[0].device):
            logits, deltas = self.head(features)
        logits, deltas = self.precision.fp32((logits, deltas))
        anchors = self.anchor_generator(padded_size, features)
        num_per_level = [t.shape[1] * t.shape[2] * t.shape[3] for t in logits]
        objectness = _flatten_levels(logits, 1)[..., 0]  # [B, A_total]
        deltas = _flatten_levels(deltas, 4)  # [B, A_total, 4]
        b = objectness.shape[0]
        proposals = self.box_coder.decode(
            deltas.detach().reshape(-1, 4), anchors.repeat(b, 1)).view(b, -1, 4)
        boxes = self._filter(proposals, objectness.detach(), image_sizes, num_per_level)

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            labels, matched_gt = self._assign(anchors, targets)
            regression_targets = self.box_coder.encode(torch.cat(matched_gt), anchors.repeat(b, 1))
            pos, neg = self.sampler(labels)
            losses["loss_objectness"], losses["loss_rpn_box_reg"] = rpn_loss(
                objectness.flatten(), deltas.reshape(-1, 4), torch.cat(labels), regression_targets,
                torch.cat(pos), torch.cat(neg),
            )
        return boxes, losses

    def _filter(self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]],
                num_per_level: list[int]) -> list[Tensor]:
        """Top-n per level, clip, drop tiny boxes, NMS per level, keep post-NMS top-n per image."""
        training = self.training
        pre_n = self.cfg.pre_nms_top_n_train if training else self.cfg.pre_nms_top_n_test
        post_n = self.cfg.post_nms_top_n_train if training else self.cfg.post_nms_top_n_test
        idx, levels, offset = [], [], 0
        for lvl, ob in enumerate(objectness.split(num_per_level, 1)):
            k = min(pre_n, ob.shape[1])
            idx.append(ob.topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=ob.device))
            offset += ob.shape[1]
        idx = torch.cat(idx, dim=1)
        level = torch.cat(levels)
        batch = torch.arange(objectness.shape[0], device=objectness.device)[:, None]
        scores_all = torch.sigmoid(objectness[batch, idx])
        boxes_all = proposals[batch, idx]
        out = []
        for boxes, scores, size in zip(boxes_all, scores_all, image_sizes):
            boxes = box_ops.clip_boxes_to_image(boxes, size)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[keep] >= self.cfg.score_thresh]
            boxes, scores, lvl = boxes[keep], scores[keep], level[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.cfg.nms_thresh)[:post_n]
            out.append(boxes[keep])
        return out

    def _assign(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: float[A] labels (1 / 0 / -1 ignored) and float[A, 4] matched gt boxes."""
        labels, matched = [], []
        for t in targets:
            gt = t["boxes"]
            if gt.numel() == 0:
                matched.append(torch.zeros_like(anchors))
                labels.append(torch.zeros(anchors.shape[0], device=anchors.device))
                continue
            idx = self.matcher(box_ops.box_iou(gt, anchors))
            matched.append(gt[idx.clamp(min=0)])
            lab = (idx >= 0).to(torch.float32)
            lab[idx == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
        return labels, matched


