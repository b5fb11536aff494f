"""An image store as real ones are: many formats and modes, odd names, nested folders, broken
files. `make_store` returns what each file must become: its displayed size, or an error."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data is a few bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def make_store(root: Path, shapes: Path, n_shapes: int = 4) -> dict[str, dict]:
    """Files under `root`; returns {relative path: {"size": (w, h)} or {"error": substring}}."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    for src in sorted((shapes / "val").glob("*.jpg"))[:n_shapes]:  # matched by name in COCO results
        shutil.copy(src, root / src.name)
        w, h = Image.open(src).size
        expect[src.name] = {"size": (w, h)}

    def save(rel: str, image: Image.Image, size: tuple[int, int] | None = None, **kw) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kw)
        expect[rel] = {"size": size or image.size}

    rgb = Image.fromarray(pixels)
    save("nested/deeper/gray.png", rgb.convert("L"))
    save("nested/rgba.png", rgb.convert("RGBA"))
    save("nested/palette.png", rgb.convert("P"))
    save("sixteen bit.png", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), format="PNG")
    save("cmyk.jpg", rgb.convert("CMYK"), format="JPEG")
    save("plain.bmp", rgb)
    save("scan.tiff", rgb)
    save("photo.webp", rgb)
    save("UPPER.JPG", rgb, format="JPEG")
    save("été à la mer.jpg", rgb)  # non-ASCII and spaces
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 64x48 stored, 48x64 shown
    save("rotated.jpg", rgb, size=(48, 64), exif=exif.tobytes())

    (root / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = {"error": "empty"}
    whole = io.BytesIO()
    rgb.save(whole, format="JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 3])
    expect["truncated.jpg"] = {"error": "truncated.jpg"}
    (root / "notes.png").write_text("this is not an image\n")
    expect["notes.png"] = {"error": "notes.png"}
    (root / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    expect["bomb.png"] = {"error": "pixels"}
    (root / "readme.txt").write_text("not listed: not an image extension\n")
    return expect
