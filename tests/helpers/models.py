"""Small model configs for fast tests of the model itself."""

from __future__ import annotations

from mrcnn import ModelConfig


def small_config(num_classes: int = 3) -> ModelConfig:
    cfg = ModelConfig(num_classes=num_classes)
    cfg.backbone.name = "resnet18"
    cfg.backbone.trainable_layers = 5
    cfg.backbone.frozen_bn = False  # from scratch: real BN statistics
    cfg.anchors.sizes = [[16], [32], [64], [128], [256]]
    cfg.rpn.pre_nms_top_n_train = cfg.rpn.post_nms_top_n_train = 200
    cfg.rpn.pre_nms_top_n_test = cfg.rpn.post_nms_top_n_test = 100
    cfg.roi_heads.batch_size_per_image = 64
    cfg.roi_heads.representation_size = 256
    cfg.transform.min_size = [128]
    cfg.transform.max_size = 128
    return cfg
