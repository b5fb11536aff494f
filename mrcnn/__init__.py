"""Mask R-CNN in plain PyTorch: ResNet-FPN, RPN, RoIAlign, box and mask heads."""

from __future__ import annotations

import importlib
from typing import Any

from mrcnn.config import ModelConfig

__all__ = ["MaskRCNN", "ModelConfig", "build_model"]


def __getattr__(name: str) -> Any:
    # The model (torch, torchvision) is imported on first use: the data modules (`mrcnn.data`,
    # `mrcnn.masks`) stay numpy-only, so processes that only decode images (Ray Data tasks,
    # split coordinators) start without importing torch.
    if name in ("MaskRCNN", "build_model"):
        return getattr(importlib.import_module("mrcnn.modeling.mask_rcnn"), name)
    raise AttributeError(f"module 'mrcnn' has no attribute {name!r}")
