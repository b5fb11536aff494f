"""Input transform: validate, normalise, resize (shorter side), pad into one batch tensor."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.config import TransformConfig
from mrcnn.masks import decode_rle_masks


class ImageTransform(nn.Module):
    def __init__(self, cfg: TransformConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """images: per image float[3, H_i, W_i] in [0, 1]; targets: per image `boxes` float[G, 4]
        (input pixels), `labels` int64[G], `masks` uint8[G, H_i, W_i] or a list of COCO RLE dicts.

        Returns the padded batch float[B, 3, H, W] (H, W multiples of `size_divisible`), each
        image's (h, w) inside it, and targets rescaled to it (RLE decoded here, as late as possible).
        """
        out_images, out_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            target = None if targets is None else dict(targets[i])
            h, w = image.shape[-2:]
            if self.training:
                # One uniform draw per image, as torchvision, so seeded runs sample the same sizes.
                k = int(torch.empty(1).uniform_(0.0, float(len(self.cfg.min_size))).item())
                size = self.cfg.min_size[k]
            else:
                size = self.cfg.min_size[-1]
            # From the Python floats in the image's dtype (a float32 buffer would round them).
            mean = torch.as_tensor(self.cfg.image_mean, dtype=image.dtype, device=image.device)
            std = torch.as_tensor(self.cfg.image_std, dtype=image.dtype, device=image.device)
            image = (image - mean[:, None, None]) / std[:, None, None]
            image, scale = _resize(image, size, self.cfg.max_size)
            out_images.append(image)
            if target is not None:
                nh, nw = image.shape[-2:]
                ratios = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32,
                                      device=image.device)
                target["boxes"] = target["boxes"] * ratios
                if "masks" in target:
                    masks = target["masks"]
                    if not isinstance(masks, Tensor):
                        masks = decode_rle_masks(masks, (h, w)).to(image.device)
                    if masks.shape[0]:
                        masks = F.interpolate(masks[:, None].float(), scale_factor=scale,
                                              recompute_scale_factor=True)[:, 0].byte()
                    else:
                        masks = masks.new_zeros((0, nh, nw), dtype=torch.uint8)
                    target["masks"] = masks
                out_targets.append(target)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in out_images]
        return self._batch(out_images), sizes, out_targets

    @property
    def max_batch_side(self) -> int:
        """The longest side a batch can have: `max_size`, padded."""
        return self._padded(self.cfg.max_size)

    def _padded(self, side: int) -> int:
        d = self.cfg.size_divisible
        return int(math.ceil(side / d) * d)

    def _batch(self, images: list[Tensor]) -> Tensor:
        h = self._padded(max(im.shape[-2] for im in images))
        w = self._padded(max(im.shape[-1] for im in images))
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for im, slot in zip(images, batch):
            slot[:, : im.shape[1], : im.shape[2]].copy_(im)
        return batch


def _resize(image: Tensor, min_size: int, max_size: int) -> tuple[Tensor, float]:
    """Scale so the shorter side is `min_size` unless the longer would pass `max_size`.

    The scale is a Python float as in torchvision's eager path, so sizes agree to the pixel.
    """
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                          recompute_scale_factor=True, align_corners=False)[0]
    return image, scale
