"""torchvision's Mask R-CNN as the oracle: the same random weights loaded into ours and theirs."""

from __future__ import annotations

import torch
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from mrcnn import MaskRCNN, ModelConfig, build_model
from mrcnn.checkpoint import load_torchvision_weights


def perturb_(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Make random-init weights give non-degenerate detections: varied BN statistics, FPN
    outputs of order 1, confident but varied class scores, moderate box deltas."""
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif "fpn.layer_blocks" in k and k.endswith("weight"):
            v.mul_(0.03)
        elif "box_predictor.cls_score" in k:
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
        elif "box_predictor.bbox_pred" in k or "rpn.head.bbox_pred" in k:
            v.copy_(torch.randn(v.shape, generator=g) * 0.01)
        elif "rpn.head.cls_logits" in k:
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return state


def make_pair(backbone: str = "resnet50", num_classes: int = 5, min_size: int = 320,
              max_size: int = 512, seed: int = 0, channels_last: bool = True,
              **overrides) -> tuple[TVMaskRCNN, MaskRCNN]:
    """torchvision's Mask R-CNN (frozen BN, 3 trainable stages) and ours with its weights."""
    torch.manual_seed(seed)
    tv_backbone = resnet_fpn_backbone(backbone_name=backbone, weights=None,
                                      norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    tv = TVMaskRCNN(tv_backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                    **overrides)
    state = perturb_(tv.state_dict(), seed)
    tv.load_state_dict(state)
    cfg = ModelConfig(num_classes=num_classes)
    cfg.backbone.name = backbone
    cfg.transform.min_size = [min_size]
    cfg.transform.max_size = max_size
    cfg.backbone.channels_last = channels_last
    for key, value in overrides.items():
        section, name = _OVERRIDE_KEYS[key]
        setattr(getattr(cfg, section), name, value)
    ours = build_model(cfg)
    load_torchvision_weights(ours, state)
    return tv, ours


# torchvision MaskRCNN keyword -> (ModelConfig section, field)
_OVERRIDE_KEYS = {
    "rpn_pre_nms_top_n_train": ("rpn", "pre_nms_top_n_train"),
    "rpn_post_nms_top_n_train": ("rpn", "post_nms_top_n_train"),
    "rpn_batch_size_per_image": ("rpn", "batch_size_per_image"),
    "box_batch_size_per_image": ("roi_heads", "batch_size_per_image"),
    "box_score_thresh": ("roi_heads", "score_thresh"),
}
