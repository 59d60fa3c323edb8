"""The RGB picture an image file shows, whatever its mode: what packing, training and editing read.

PIL's ``convert("RGB")`` alone gets three common cases wrong: a photo with an EXIF orientation (phones) comes out
on its side, a 16-bit greyscale PNG comes out white (values above 255 are clipped, not scaled), and transparent
pixels take whatever colour they hold underneath (often black). ``to_rgb`` handles all three.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright (EXIF orientation applied), 8 bits per channel, alpha composited onto white, in RGB."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit greyscale (PIL opens some as 32-bit "I")
        values = np.asarray(img, dtype=np.float64)
        step = 1 if img.mode == "I" and values.max() <= 255 else 257  # 65535 / 257 = 255
        img = Image.fromarray(np.clip(np.round(values / step), 0, 255).astype(np.uint8))
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return img.convert("RGB")
