"""Mask R-CNN in plain PyTorch: ResNet-FPN, RPN, RoIAlign, box and mask heads."""

from mrcnn.config import ModelConfig
from mrcnn.modeling.mask_rcnn import MaskRCNN, build_model

__all__ = ["MaskRCNN", "ModelConfig", "build_model"]
