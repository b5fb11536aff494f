"""Mask R-CNN: backbone -> RPN -> RoI heads, with input transform and output pasting."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from mrcnn.config import ModelConfig
from mrcnn.modeling.anchors import AnchorGenerator
from mrcnn.modeling.backbone import build_backbone
from mrcnn.modeling.postprocess import paste_masks, resize_boxes
from mrcnn.modeling.roi_heads import RoIHeads
from mrcnn.modeling.rpn import RegionProposalNetwork, RPNHead
from mrcnn.modeling.transform import ImageTransform
from mrcnn.precision import PRECISIONS, Precision


class MaskRCNN(nn.Module):
    """Mask R-CNN (He et al., 2017) with a ResNet-FPN backbone.

    Parameter names match torchvision's `maskrcnn_resnet50_fpn`, so its state dicts load.

    `model(images, targets)` in training mode returns the five losses; `model(images)` in eval
    mode returns per image `boxes` float[N, 4], `labels` int64[N], `scores` float[N] and `masks`
    bool[N, H, W] at the input image's size.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        # The model's own copy: detection limits change here, never in the caller's config.
        self.cfg = copy.deepcopy(cfg)
        cfg = self.cfg
        self.transform = ImageTransform(cfg.transform)
        self.backbone = build_backbone(cfg.backbone, max_input_side=self.transform.max_batch_side)
        anchors = AnchorGenerator(cfg.anchors.sizes, cfg.anchors.aspect_ratios)
        c = self.backbone.out_channels
        self.rpn = RegionProposalNetwork(anchors, RPNHead(c, anchors.num_anchors_per_location()), cfg.rpn)
        self.roi_heads = RoIHeads(cfg.roi_heads, c, cfg.num_classes)
        # The compute precision (`set_precision`), shared with the RPN and the RoI heads.
        self.precision = self.rpn.precision = self.roi_heads.precision = Precision()
        if cfg.backbone.channels_last:  # the RPN and mask heads' convolutions too (the backbone is already)
            self.rpn.to(memory_format=torch.channels_last)
            self.roi_heads.to(memory_format=torch.channels_last)

    def set_detection_limits(self, score_threshold: float, max_detections: int) -> MaskRCNN:
        """Detections kept at inference: score above `score_threshold`, at most `max_detections`
        per image (masks are computed only for those)."""
        self.cfg.roi_heads.score_thresh = float(score_threshold)
        self.cfg.roi_heads.detections_per_img = int(max_detections)
        return self

    def set_precision(self, precision: str) -> MaskRCNN:
        """Where the model computes in bf16 or fp16 (`mrcnn.precision`): "fp32", "bf16" or "fp16"."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.precision.name = precision
        return self

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Any]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """images: list of float[3, H_i, W_i] in [0, 1], any sizes.

        targets (training): per image `boxes` float[G, 4] (x1, y1, x2, y2 pixels), `labels`
        int64[G] in 1..num_classes-1, `masks` uint8[G, H_i, W_i] or a list of G COCO RLE dicts.
        G = 0 is legal (an image of background only).
        """
        self._check_inputs(images, targets)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, sizes, targets = self.transform(images, targets if self.training else None)
        with self.precision.region(batch.device):
            features = self.backbone(batch)
        features = self.precision.fp32(features)
        proposals, rpn_losses = self.rpn(tuple(batch.shape[-2:]), sizes, list(features.values()), targets)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        threshold = self.cfg.roi_heads.mask_threshold
        for det, size, orig in zip(detections, sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], orig, size)
            det["masks"] = paste_masks(det.pop("mask_probs"), det["boxes"], orig, threshold)
        return detections

    def _check_inputs(self, images: list[Tensor], targets: list[dict[str, Any]] | None) -> None:
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of float[3, H, W] tensors")
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3:
                shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"images[{i}] must be float[3, H, W] (RGB, channels first), got {shape}")
            if not im.is_floating_point():
                raise ValueError(f"images[{i}] has dtype {im.dtype}; convert to float in [0, 1] "
                                 "(e.g. uint8 / 255)")
            if im.shape[1] < 1 or im.shape[2] < 1:
                raise ValueError(f"images[{i}] is empty: {tuple(im.shape)}")
        if not self.training:
            return
        if targets is None:
            raise ValueError("training mode needs targets: one dict of boxes, labels, masks per image")
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        num_classes = self.cfg.num_classes
        for i, t in enumerate(targets):
            for key in ("boxes", "labels", "masks"):
                if key not in t:
                    raise ValueError(f"targets[{i}] has no {key!r}")
            boxes = t["boxes"]
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4 \
                    or not boxes.is_floating_point():
                raise ValueError(f"targets[{i}]['boxes'] must be float[N, 4], got "
                                 f"{getattr(boxes, 'shape', type(boxes).__name__)}")
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if degenerate.any():
                j = int(torch.where(degenerate)[0][0])
                raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no positive "
                                 "width and height; drop or fix such boxes before training")
            labels = t["labels"]
            if labels.shape != boxes.shape[:1]:
                raise ValueError(f"targets[{i}]: {boxes.shape[0]} boxes but labels of shape "
                                 f"{tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 1 or labels.max() >= num_classes):
                raise ValueError(f"targets[{i}]['labels'] must be in 1..{num_classes - 1} "
                                 f"(0 is background), got {labels.tolist()}")
            n_masks = t["masks"].shape[0] if isinstance(t["masks"], Tensor) else len(t["masks"])
            if n_masks != boxes.shape[0]:
                raise ValueError(f"targets[{i}]: {boxes.shape[0]} boxes but {n_masks} masks")


def build_model(cfg: ModelConfig | dict[str, Any] | None = None) -> MaskRCNN:
    """Build Mask R-CNN from a ModelConfig (or its dict form); defaults are torchvision's R50-FPN."""
    if cfg is None:
        cfg = ModelConfig()
    elif isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return MaskRCNN(cfg)
