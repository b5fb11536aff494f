"""Model configuration: a dataclass tree with the paper's / torchvision's defaults.

The tree is plain Python so `mrcnn` stays free of Hydra; `workflows` registers the same classes
in Hydra's ConfigStore. `typing.List` / `Optional` are used (not PEP 585/604) because OmegaConf
reads these annotations to type-check overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")
FPN_LEVELS = 5  # P2-P5 from the FPN plus P6 from max-pooling P5, as in the paper


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    # 0..5 trailing ResNet stages that train (torchvision's default 3: layer2..layer4).
    trainable_layers: int = 3
    frozen_bn: bool = True
    # torchvision's COCO_V1 Mask R-CNN weights were trained with FrozenBatchNorm eps 0.
    norm_eps: float = 1e-5
    fpn_channels: int = 256
    # A torchvision ResNet classification state dict (ImageNet weights) loaded into the body.
    pretrained_path: Optional[str] = None
    # NHWC convolutions in the backbone and the RPN and mask heads. Measured per phase on a 2-core
    # CPU (benchmarks/model_vs_torchvision.py setting): R50-FPN 512 training step 3.04 s against
    # 3.51 s contiguous, and the 400-RoI mask head forward 888 ms against 1088 ms; the r18_fpn_small
    # training step is the same either way (0.25 s). Another machine of the kind once measured the
    # convolution backward slower in NHWC: measure before changing it. ResNet stages whose maps
    # are 8 x 8 or smaller at transform.max_size stay NCHW, where that is the faster layout.
    channels_last: bool = True


@dataclass
class AnchorConfig:
    # One tuple of sizes per FPN level (P2..P6), in input pixels.
    sizes: List[List[int]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclass
class RPNConfig:
    pre_nms_top_n_train: int = 2000  # per FPN level
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000  # per image
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0


@dataclass
class RoIHeadsConfig:
    box_roi_size: int = 7
    sampling_ratio: int = 2
    representation_size: int = 1024
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_roi_size: int = 14
    mask_layers: List[int] = field(default_factory=lambda: [256, 256, 256, 256])
    mask_dilation: int = 1
    # The mask predictor's 2x deconvolution makes this 2 * mask_roi_size.
    mask_output_size: int = 28
    mask_threshold: float = 0.5


@dataclass
class TransformConfig:
    # Shorter side; in training one is drawn per image (multi-scale), in eval the last is used.
    min_size: List[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    image_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisible: int = 32


@dataclass
class ModelConfig:
    # Including background: K object classes -> K + 1.
    num_classes: int = 91
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain (resolved) dict; unknown keys are an error naming the key."""
        return _from_dict(cls, data, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the key for values the model cannot be built with."""
        errors = self.errors()
        if errors:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errors))
        return self

    def errors(self) -> list[str]:
        """One message per value the model cannot be built with, each naming its key."""
        errors = []
        b, a, r, h, t = self.backbone, self.anchors, self.rpn, self.roi_heads, self.transform
        if b.name not in BACKBONES:
            errors.append(f"model.backbone.name={b.name!r} is not one of {', '.join(BACKBONES)}")
        if not 0 <= b.trainable_layers <= 5:
            errors.append(f"model.backbone.trainable_layers={b.trainable_layers} must be in 0..5")
        if self.num_classes < 2:
            errors.append(f"model.num_classes={self.num_classes} must count background + >= 1 class")
        if len(a.sizes) != FPN_LEVELS:
            errors.append(
                f"model.anchors.sizes has {len(a.sizes)} levels; the FPN has {FPN_LEVELS} "
                "(P2-P6): give one list of sizes per level"
            )
        if len({len(s) for s in a.sizes}) > 1:
            errors.append("model.anchors.sizes: every level needs the same number of sizes")
        if any(v <= 0 for s in a.sizes for v in s) or any(len(s) == 0 for s in a.sizes):
            errors.append(f"model.anchors.sizes={a.sizes} must be positive and non-empty")
        if not a.aspect_ratios or any(v <= 0 for v in a.aspect_ratios):
            errors.append(f"model.anchors.aspect_ratios={a.aspect_ratios} must be positive")
        positive = {
            "model.backbone.fpn_channels": b.fpn_channels,
            "model.rpn.pre_nms_top_n_train": r.pre_nms_top_n_train,
            "model.rpn.pre_nms_top_n_test": r.pre_nms_top_n_test,
            "model.rpn.post_nms_top_n_train": r.post_nms_top_n_train,
            "model.rpn.post_nms_top_n_test": r.post_nms_top_n_test,
            "model.rpn.batch_size_per_image": r.batch_size_per_image,
            "model.roi_heads.box_roi_size": h.box_roi_size,
            "model.roi_heads.representation_size": h.representation_size,
            "model.roi_heads.batch_size_per_image": h.batch_size_per_image,
            "model.roi_heads.detections_per_img": h.detections_per_img,
            "model.roi_heads.mask_roi_size": h.mask_roi_size,
            "model.transform.max_size": t.max_size,
            "model.transform.size_divisible": t.size_divisible,
        }
        errors += [f"{k}={v} must be > 0" for k, v in positive.items() if v <= 0]
        if not t.min_size or any(v <= 0 for v in t.min_size):
            errors.append(f"model.transform.min_size={t.min_size} must be positive sizes")
        for key, v in {
            "model.rpn.positive_fraction": r.positive_fraction,
            "model.roi_heads.positive_fraction": h.positive_fraction,
            "model.rpn.nms_thresh": r.nms_thresh,
            "model.roi_heads.nms_thresh": h.nms_thresh,
            "model.roi_heads.mask_threshold": h.mask_threshold,
        }.items():
            if not 0.0 <= v <= 1.0:
                errors.append(f"{key}={v} must be in [0, 1]")
        if r.bg_iou_thresh > r.fg_iou_thresh:
            errors.append("model.rpn.bg_iou_thresh must be <= model.rpn.fg_iou_thresh")
        if h.bg_iou_thresh > h.fg_iou_thresh:
            errors.append("model.roi_heads.bg_iou_thresh must be <= model.roi_heads.fg_iou_thresh")
        if h.mask_output_size != 2 * h.mask_roi_size:
            errors.append(
                f"model.roi_heads.mask_output_size={h.mask_output_size} must be 2 * mask_roi_size "
                f"({2 * h.mask_roi_size}): the mask predictor upsamples by 2"
            )
        if len(t.image_mean) != 3 or len(t.image_std) != 3 or any(s <= 0 for s in t.image_std):
            errors.append("model.transform.image_mean/image_std need 3 values, std > 0")
        return errors


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = _DATACLASS_FIELDS.get((cls.__name__, name))
        kwargs[name] = _from_dict(sub, value, f"{path}.{name}") if sub else value
    return cls(**kwargs)


_DATACLASS_FIELDS = {
    ("ModelConfig", "backbone"): BackboneConfig,
    ("ModelConfig", "anchors"): AnchorConfig,
    ("ModelConfig", "rpn"): RPNConfig,
    ("ModelConfig", "roi_heads"): RoIHeadsConfig,
    ("ModelConfig", "transform"): TransformConfig,
}
