"""Image bytes -> RGB arrays, whatever the file's mode or EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    pass


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8[H, W, 3] RGB.

    EXIF orientation is applied (H, W are as displayed); grayscale, palette, RGBA (composited
    on black, as the alpha is not an object mask), 16-bit and CMYK images become RGB. An image
    whose header claims more than `max_pixels` pixels is refused before it is decoded.
    """
    if not data:
        raise ImageDecodeError(f"cannot decode image {name}: the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageDecodeError(
                    f"image {name} claims {im.width}x{im.height} = {im.width * im.height:,} pixels, more than "
                    f"the limit of {max_pixels:,}; raise the pixel limit to decode it")
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
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image {name} claims more pixels than PIL will decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"cannot decode image {name}: not an image format PIL can read") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageDecodeError(f"cannot decode image {name}: {e}") from e
