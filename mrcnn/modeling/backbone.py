"""ResNet body + Feature Pyramid Network (P2-P6), with torchvision's parameter names."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mrcnn.config import BackboneConfig

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module, relu: bool) -> Tensor:
    """conv -> norm (-> ReLU) with a fixed normalisation folded into the convolution.

    A frozen (or eval-mode) BatchNorm is a per-channel affine map, so it is applied to the conv
    weights (C_out numbers each) instead of to the activations: two full passes over every
    activation map saved, forward and backward (3x faster for a 1x1 conv on this CPU). Where the
    weights outnumber the outputs (deep stages on small images: a 3x3 512-channel kernel holds
    2.4 M numbers, its output on a 128 px batch of 4, 33 k), the map is scaled instead.
    x: float[B, C_in, H, W] -> float[B, C_out, H', W'].
    """
    fixed = isinstance(bn, FrozenBatchNorm2d) or (
        isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_var is not None)
    if not fixed:
        y = bn(conv(x))
        return F.relu(y, inplace=True) if relu else y
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if conv.weight.numel() <= _output_numel(x, conv):
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        y = F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
    else:
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = torch.addcmul(shift.reshape(1, -1, 1, 1), y, scale.reshape(1, -1, 1, 1))
    return F.relu(y, inplace=True) if relu else y


def _output_numel(x: Tensor, conv: nn.Conv2d) -> int:
    """Elements of conv(x) for x: [B, C_in, H, W] (a string padding counts as unbounded)."""
    if isinstance(conv.padding, str):
        return 1 << 62
    h, w = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
            zip(x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))
    return x.shape[0] * conv.out_channels * h * w


def residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's BasicBlock / Bottleneck forward, through `conv_bn`. x: float[B, C, H, W]."""
    identity = x if block.downsample is None else conv_bn(x, block.downsample[0], block.downsample[1], False)
    out = conv_bn(x, block.conv1, block.bn1, True)
    if isinstance(block, Bottleneck):
        out = conv_bn(out, block.conv2, block.bn2, True)
        out = conv_bn(out, block.conv3, block.bn3, False)
    else:
        out = conv_bn(out, block.conv2, block.bn2, False)
    out += identity
    return F.relu(out, inplace=True)


class ResNetBody(nn.ModuleDict):
    """A torchvision ResNet up to layer4 (no pooling / fc), returning every stage's output.

    Keys follow the classifier's (`conv1`, `bn1`, `layer1`...), so ImageNet weights load as-is.
    """

    def __init__(self, resnet: nn.Module) -> None:
        names = ("conv1", "bn1", "maxpool", *_STAGES)  # ReLUs are applied in conv_bn
        super().__init__(OrderedDict((n, getattr(resnet, n)) for n in names))
        # Memory format of each stage's activations, as its weights (`set_stage_formats`).
        self.formats = dict.fromkeys(_STAGES, torch.contiguous_format)

    def set_stage_formats(self, channels_last: bool, max_input_side: int) -> None:
        """NHWC for the stages whose maps can be larger than 8 x 8 pixels at `max_input_side`,
        NCHW (weights and activations) for the others: on small maps oneDNN's NCHW convolution
        is the faster (a 3x3 512-channel conv on 4 x 4 maps, forward + backward: 4.7 ms NCHW,
        7.3 ms NHWC; 16 x 16 and larger: NHWC as fast or faster)."""
        for i, stage in enumerate(_STAGES):
            side = -(-max_input_side // 2 ** (i + 2))
            fmt = torch.channels_last if channels_last and side > 8 else torch.contiguous_format
            self[stage].to(memory_format=fmt)
            self.formats[stage] = fmt

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """x: float[B, 3, H, W] -> {"0": C2 [B, C, H/4, W/4], ..., "3": C5 [B, 8C, H/32, W/32]}."""
        x = self["maxpool"](conv_bn(x, self["conv1"], self["bn1"], True))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(_STAGES):
            x = x.contiguous(memory_format=self.formats[stage])
            for block in self[stage]:
                x = residual_block(block, x)
            out[str(i)] = x
        return out


class BackboneWithFPN(nn.Module):
    """ResNet body + FPN. Output: {"0".."3", "pool"} maps of `out_channels` at strides 4..64."""

    def __init__(self, body: ResNetBody, in_channels: list[int], out_channels: int,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(x))


def build_backbone(cfg: BackboneConfig, max_input_side: int = 1 << 30) -> BackboneWithFPN:
    """ResNet-FPN as torchvision's `resnet_fpn_backbone`: same freezing, channels and names.
    `max_input_side`: the largest (padded) image side it will see, for the memory formats."""
    norm_layer = (lambda c: FrozenBatchNorm2d(c, eps=cfg.norm_eps)) if cfg.frozen_bn else nn.BatchNorm2d
    resnet = getattr(models, cfg.name)(weights=None, norm_layer=norm_layer)
    if cfg.pretrained_path:
        load_backbone_weights(resnet, cfg.pretrained_path)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        trainable.append("bn1")
    for name, param in resnet.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            param.requires_grad_(False)
    stage2 = resnet.inplanes // 8  # 64 for resnet18/34, 256 for the bottleneck ResNets
    in_channels = [stage2 * 2**i for i in range(4)]
    model = BackboneWithFPN(ResNetBody(resnet), in_channels, cfg.fpn_channels, cfg.channels_last)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.body.set_stage_formats(cfg.channels_last, max_input_side)
    return model


def load_backbone_weights(resnet: nn.Module, path: str) -> None:
    """Load a torchvision ResNet classification state dict (e.g. ImageNet weights) from `path`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"model.backbone.pretrained_path={path!r}: cannot read a state dict ({e}); give a "
            "file saved with torch.save(resnet.state_dict())"
        ) from e
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"model.backbone.pretrained_path={path!r} does not fit the backbone: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
