"""Compute precision: which parts of the model run in bf16 or fp16, and which stay fp32.

    model.set_precision("bf16")     # "fp32" (default), "bf16" (CUDA, CPUs with bf16 instructions),
                                    # "fp16" (CUDA; train with a gradient scaler)

Under bf16 or fp16 the convolutions and linear layers run under `torch.autocast` in four
regions: the backbone with its FPN, the RPN head, the box head and predictor, the mask head and
predictor. What each region produces is turned back to fp32 as it leaves, so everything whose
precision moves the result stays fp32: anchors, box decoding and clipping, score ranking and
NMS, RoIAlign's sampling (its CPU kernel, a sparse product, has no bf16 kernel), the losses and
mask pasting. bf16 keeps 8 bits of mantissa: a box coordinate of 800 px decoded in bf16 would
move by up to 3 px, a region's output turned back to fp32 does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unsupported(precision: str, device: torch.device | str) -> str | None:
    """Why `precision` cannot run on `device` (None when it can)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        return f"{precision!r} is not one of {', '.join(PRECISIONS)}"
    if precision == "fp16" and device.type != "cuda":
        return "fp16 needs a CUDA GPU (on CPUs, bf16 is the low precision that runs fast)"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        return "this CPU has no bf16 instructions (AVX512-BF16 or AMX): use fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 (it needs compute capability 8.0 or later): use fp16"
    return None


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Precision:
    """A model's compute precision, shared by its parts (a plain attribute: not in the state dict)."""

    def __init__(self, name: str = "fp32") -> None:
        self.name = name

    @property
    def low(self) -> bool:
        return self.name != "fp32"

    @contextlib.contextmanager
    def region(self, device: torch.device) -> Iterator[None]:
        """The model's heavy layers inside: under autocast in bf16 or fp16, as they are in fp32."""
        if not self.low:
            yield
            return
        why = unsupported(self.name, device)
        if why:
            raise ValueError(f"precision {self.name}: {why}")
        with torch.autocast(torch.device(device).type, dtype=DTYPES[self.name]):
            yield

    def fp32(self, value: Any) -> Any:
        """A region's output back in fp32 (tensors, or lists, tuples and dicts of them)."""
        if not self.low:
            return value
        if isinstance(value, torch.Tensor):
            return value.float() if value.is_floating_point() else value
        if isinstance(value, dict):
            return type(value)((k, self.fp32(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self.fp32(v) for v in value)
        return value
