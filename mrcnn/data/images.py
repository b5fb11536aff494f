"""Image bytes -> RGB arrays, whatever the file's mode or EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


class ImageDecodeError(ValueError):
    pass


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8[H, W, 3] RGB.

    EXIF orientation is applied (H, W are as displayed); grayscale, palette, RGBA (composited
    on black, as the alpha is not an object mask), 16-bit and CMYK images become RGB.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 255.0 / max(1.0, float(arr.max()))
                im = Image.fromarray((arr * scale).clip(0, 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageDecodeError(f"cannot decode image {name}: {e}") from e
