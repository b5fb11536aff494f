"""RoI heads: RoIAlign, the box head (class + per-class box) and the per-class FCN mask head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from mrcnn.config import RoIHeadsConfig
from mrcnn.modeling.box_coding import BoxCoder
from mrcnn.modeling.losses import fastrcnn_loss, maskrcnn_loss
from mrcnn.modeling.roi_align import MultiScaleRoIAlign
from mrcnn.modeling.sampling import BalancedPositiveNegativeSampler, Matcher
from mrcnn.precision import Precision

FEATURE_NAMES = ["0", "1", "2", "3"]  # RoIs pool from P2-P5; P6 serves the RPN only


class TwoMLPHead(nn.Module):
    """fc6 + fc7 with ReLU: float[R, C, S, S] pooled features -> float[R, representation]."""

    def __init__(self, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)), inplace=True)), inplace=True)


class FastRCNNPredictor(nn.Module):
    """float[R, D] -> class logits float[R, K+1] and per-class deltas float[R, 4(K+1)]."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def _kaiming(layers: nn.Module) -> None:
    for m in layers.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class MaskHead(nn.Sequential):
    """The FCN: 3x3 conv + ReLU layers over float[R, C, 14, 14] pooled features.

    Nested Sequentials give torchvision's key names (`0.0.weight`, `1.0.weight`, ...).
    """

    def __init__(self, in_channels: int, layers: list[int], dilation: int) -> None:
        blocks, c = [], in_channels
        for out in layers:
            blocks.append(nn.Sequential(
                nn.Conv2d(c, out, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)))
            c = out
        super().__init__(*blocks)
        _kaiming(self)


class MaskPredictor(nn.Module):
    """2x deconvolution + ReLU, then a 1x1 conv: float[R, C, M, M] -> logits float[R, K+1, 2M, 2M]."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1)
        _kaiming(self)

    def forward(self, x: Tensor) -> Tensor:
        up = self.conv5_mask
        if torch.is_grad_enabled() and up.bias.requires_grad:
            # oneDNN's bias gradient of a transposed convolution costs more than the rest of its
            # backward (R18 mask head, 27 RoIs, channels_last: 45 -> 34 ms forward + backward)
            # while autograd's sum for a separate add is 0.6 ms.
            y = F.conv_transpose2d(x, up.weight, None, up.stride, up.padding, up.output_padding, up.groups,
                                   up.dilation).add_(up.bias[:, None, None])
        else:
            y = up(x)
        return self.mask_fcn_logits(F.relu(y, inplace=True))


class RoIHeads(nn.Module):
    def __init__(self, cfg: RoIHeadsConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.box_roi_size
        self.box_roi_pool = MultiScaleRoIAlign(FEATURE_NAMES, s, cfg.sampling_ratio)
        self.box_head = TwoMLPHead(in_channels * s * s, cfg.representation_size)
        self.box_predictor = FastRCNNPredictor(cfg.representation_size, num_classes)
        self.mask_roi_pool = MultiScaleRoIAlign(FEATURE_NAMES, cfg.mask_roi_size, cfg.sampling_ratio)
        self.mask_head = MaskHead(in_channels, cfg.mask_layers, cfg.mask_dilation)
        # torchvision: 256 for its 256-channel FCN; narrower heads keep the deconvolution as wide.
        self.mask_predictor = MaskPredictor(cfg.mask_layers[-1], cfg.mask_layers[-1], num_classes)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(cfg.batch_size_per_image, cfg.positive_fraction)
        self.precision = Precision()  # its heads' (the model shares its own)

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor],
        image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """features: {"0".."3": float[B, C, H_l, W_l]}; proposals: per image float[P_i, 4];
        image_sizes: per image (h, w) at network scale; targets: per image `boxes` float[G, 4],
        `labels` int64[G], `masks` uint8[G, H, W] (network scale).

        Training returns ([], losses). Eval returns per image `boxes` float[N, 4], `labels`
        int64[N], `scores` float[N], `mask_probs` float[N, M, M] (mask of the predicted class).
        """
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, matched_idxs, labels, regression_targets = self._sample(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        with self.precision.region(pooled.device):
            class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        class_logits, box_regression = self.precision.fp32((class_logits, box_regression))

        if self.training:
            labels_cat = torch.cat(labels)
            loss_classifier, loss_box_reg = fastrcnn_loss(
                class_logits, box_regression, labels_cat, torch.cat(regression_targets))
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_props = [p[i] for p, i in zip(proposals, pos)]
            mask_logits = self._mask_logits(features, mask_props, image_sizes)
            loss_mask = maskrcnn_loss(
                mask_logits, mask_props, [t["masks"] for t in targets],
                [t["labels"] for t in targets], [m[i] for m, i in zip(matched_idxs, pos)])
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                        "loss_mask": loss_mask}

        results = self._detections(class_logits, box_regression, proposals, image_sizes)
        mask_logits = self._mask_logits(features, [r["boxes"] for r in results], image_sizes)
        labels_cat = torch.cat([r["labels"] for r in results])
        # Sigmoid of the predicted class's channel only, not of all K+1.
        probs = mask_logits[torch.arange(labels_cat.shape[0], device=labels_cat.device), labels_cat]
        for r, p in zip(results, probs.sigmoid().split([len(r["labels"]) for r in results])):
            r["mask_probs"] = p
        return results, {}

    def _mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> Tensor:
        pooled = self.mask_roi_pool(features, boxes, image_sizes)
        with self.precision.region(pooled.device):
            logits = self.mask_predictor(self.mask_head(pooled))
        return self.precision.fp32(logits)

    def _sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Add the gt boxes to the proposals, match them (IoU 0.5), sample 512 a image (25 % fg).

        Returns per image: sampled RoIs float[S, 4], matched gt index int64[S], labels int64[S]
        (0 background), regression targets float[S, 4].
        """
        dtype = proposals[0].dtype
        out_props, out_idx, out_labels, out_targets = [], [], [], []
        all_props, all_idx, all_labels = [], [], []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].to(dtype)
            props = torch.cat([props, gt])
            if gt.numel() == 0:
                idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                labels = torch.zeros_like(idx)
            else:
                matches = self.matcher(box_ops.box_iou(gt, props))
                idx = matches.clamp(min=0)
                labels = t["labels"][idx].to(torch.int64)
                labels[matches == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1
            all_props.append(props)
            all_idx.append(idx)
            all_labels.append(labels)
        pos, neg = self.sampler(all_labels)
        for props, idx, labels, p, n, t in zip(all_props, all_idx, all_labels, pos, neg, targets):
            keep = torch.where(p | n)[0]
            props, idx, labels = props[keep], idx[keep], labels[keep]
            gt = t["boxes"].to(dtype)
            if gt.numel() == 0:
                gt = torch.zeros((1, 4), dtype=dtype, device=props.device)
            out_props.append(props)
            out_idx.append(idx)
            out_labels.append(labels)
            out_targets.append(self.box_coder.encode(gt[idx], props))
        return out_props, out_idx, out_labels, out_targets

    def _detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per-class boxes, score threshold, class-wise NMS, top detections_per_img."""
        cfg = self.cfg
        num_classes = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, torch.cat(proposals))
        scores_all = F.softmax(class_logits, -1)
        results = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = box_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
            labels = torch.arange(num_classes, device=boxes.device).expand_as(scores)[:, 1:].reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > cfg.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
