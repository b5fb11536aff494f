"""Weights in and out: torchvision's Mask R-CNN state dicts, and our own checkpoints.

Everything is read with `torch.load(weights_only=True)`: tensors and plain containers only,
never pickled modules.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.config import ModelConfig

# torchvision < 0.13 names -> current names (the remapping torchvision does on load).
_LEGACY_KEYS = [
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
    (re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$"), None),
]


class UnsafeWeightsError(ValueError):
    """A weights file that is not plain tensors and containers (e.g. a pickle with code)."""


def load_weights_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)` with errors that name the file: a missing file, a file
    that is not a torch save, and a pickle that would run code (refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeWeightsError(
            f"{path} was refused: it holds objects other than tensors and plain containers "
            f"(only state dicts are loaded, never pickled code): {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"{path}: not a readable torch weights file ({e})") from e


def _read_state_dict(source: dict[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return dict(source)
    state = load_weights_file(source)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return dict(state)


def remap_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the older torchvision keys (FPN blocks, RPN conv, mask_fcnN) to the current ones."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _LEGACY_KEYS:
            m = pattern.match(key)
            if m and repl is None:  # mask_fcn{k} -> {k-1}.0
                key = f"{m.group(1)}.{int(m.group(2)) - 1}.0.{m.group(3)}"
            elif m:
                key = pattern.sub(repl, key)
        out[key] = value
    return out


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def load_torchvision_weights(
    model: nn.Module,
    state_dict_or_path: dict[str, torch.Tensor] | str | os.PathLike,
    frozen_bn_eps: float | None = None,
    strict: bool = True,
) -> None:
    """Load a state dict of torchvision's `maskrcnn_resnet50_fpn` (or a path to one) into ours.

    Older key names are remapped. torchvision's COCO_V1 weights were trained with
    FrozenBatchNorm eps 0: pass `frozen_bn_eps=0.0` for them (torchvision does the same with
    `overwrite_eps`); None keeps the model's eps. With `strict=False`, heads whose shape differs
    (another number of classes) are skipped, for fine-tuning.
    """
    state = remap_torchvision_keys(_read_state_dict(state_dict_or_path))
    if not strict:
        state = matching_tensors(model, state)
    result = model.load_state_dict(state, strict=strict)
    if frozen_bn_eps is not None:
        set_frozen_bn_eps(model, frozen_bn_eps)
        if hasattr(model, "cfg"):
            model.cfg.backbone.norm_eps = frozen_bn_eps
    return result


def matching_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `state` that `model` has under the same name and shape: what carries over
    to a model with another number of classes (its class-dependent predictors start fresh)."""
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}


def save_checkpoint(path: str | os.PathLike | BinaryIO, model: nn.Module, **extra: Any) -> None:
    """Save weights + the model config (+ plain extras: optimizer state, step, label map...) to a
    file path, written beside it and renamed, or to a writable stream (whose owner makes it whole)."""
    module = getattr(model, "module", model)  # unwrap DDP
    payload = {"model": module.state_dict(), "model_config": module.cfg.to_dict(), **extra}
    if not isinstance(path, (str, os.PathLike)):
        torch.save(payload, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step a checkpoint file by `save_checkpoint` was saved at; None when the file
    is missing, cut short (a copy stopped half-way) or not such a checkpoint. Reads the archive's
    index and the small entries only: the tensors are mapped, not read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is "not a complete checkpoint"
        return None
    step = payload.get("step") if isinstance(payload, dict) and "model" in payload else None
    return int(step) if step is not None else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the model from a checkpoint by `save_checkpoint`; returns (model, payload)."""
    payload = load_weights_file(path, map_location)
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint "
                         "(needs 'model' and 'model_config'); for torchvision weights use "
                         "load_torchvision_weights")
    return build_from_state(payload["model_config"], payload["model"]), payload


def build_from_state(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Our model rebuilt from its config dict and a state dict (no pretrained backbone load)."""
    from mrcnn.modeling.mask_rcnn import build_model

    cfg = ModelConfig.from_dict(model_config)
    cfg.backbone.pretrained_path = None  # the state dict holds the weights
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    return model


# A logged model's files: the weights as a plain state dict, the config and label map as JSON.
MODEL_FILES = ("weights.pt", "model_config.json", "label_map.json")


def write_model_files(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                      label_map: dict[str, Any]) -> Path:
    """`folder`/weights.pt, model_config.json and label_map.json (see `read_model_files`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "weights.pt")
    (folder / "model_config.json").write_text(json.dumps(model_config, indent=2))
    (folder / "label_map.json").write_text(json.dumps(label_map, indent=2))
    return folder


def read_model_files(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The model rebuilt from a folder of `MODEL_FILES` (weights read with weights_only), and
    its label map dict."""
    folder = Path(folder)
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a logged mrcnn model: {name} is missing")
    model = build_from_state(json.loads((folder / "model_config.json").read_text()),
                             load_weights_file(folder / "weights.pt"))
    return model, json.loads((folder / "label_map.json").read_text())
