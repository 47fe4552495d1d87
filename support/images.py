"""Reading one image file as 8-bit RGB, safely: a size limit checked from the header
(decompression bombs), every mode PIL opens turned into RGB, and PIL's own global limit lifted
only around our reads."""
import contextlib

import numpy as np
from PIL import Image

@contextlib.contextmanager
def without_pils_pixel_limit():
    """Inside the block, PIL's own decompression-bomb check is off; outside, it is as it was.

    PIL keeps one limit for the whole process (Image.MAX_IMAGE_PIXELS): it warns about larger
    images and refuses those over twice the limit, when it opens a file and when it crops. We
    refuse too-large images ourselves, with our own limit (--max-image-pixels, which may be above
    PIL's), so PIL's check is lifted only around our own reading and cropping, and put back after.
    (Not thread-safe: images are read by DataLoader worker processes or by the main thread.)"""
    pils_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pils_limit


def load_rgb(path, max_pixels=Image.MAX_IMAGE_PIXELS, draft_size=None):
    """Any readable image as 8-bit RGB: grayscale, palette, RGBA (over white), CMYK, 16-bit.

    Decoding happens here, so a truncated file fails here. Images over `max_pixels` are refused
    from their header, before decoding: a decompression bomb would otherwise fill the memory.
    With `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, as long as
    both sides stay >= draft_size: several times faster for large images, and other pixels than a
    full decode (hence a flag)."""
    with without_pils_pixel_limit(), Image.open(path) as image:
        if image.width * image.height > max_pixels:
            size = f"{image.width}x{image.height}"
            raise ValueError(f"{size} pixels is over --max-image-pixels {max_pixels}")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit gray: keep the high byte
            high_byte = np.asarray(image).astype(np.uint32) >> 8  # (dividing, not clipping)
            image = Image.fromarray(high_byte.astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            white = Image.new("RGBA", image.size, "white")
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")


class BadSampleError(Exception):
    """An image or caption that cannot be used."""
