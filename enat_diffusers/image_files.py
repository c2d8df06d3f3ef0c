"""Reading image files a user hands over (app uploads, script arguments): size limits checked on the file header
before anything is decoded, decoding failures as one sentence naming the input, and the pixel formats that a plain
`convert("RGB")` gets wrong (16-bit and float images) brought to 8 bits by their value range."""

from pathlib import Path

import numpy as np
from PIL import Image

# Largest image accepted (width x height), checked on the header before decoding: 4096x4096, 64 MiB as RGBA.
# An ENAT model works at 256 or 512 pixels (the demos at 16), so a larger upload is only scaled down.
MAX_IMAGE_PIXELS = 4096 * 4096
# Largest image file accepted, in bytes (also the app's upload limit, Gradio's `max_file_size`).
MAX_IMAGE_FILE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_FILE_SIZE = "32mb"  # the same limit in Gradio's notation


class ImageFileError(ValueError):
    """An image file that cannot be used; the message is one sentence naming the input."""


def check_image_file(path: str | Path, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """`(width, height)` of the image file at `path`, read from its header only; refuses a missing, empty, too
    large or unreadable file (and one of more than `max_pixels` pixels) with an `ImageFileError` naming `name`."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{name}: {str(path)!r} does not exist or is not a file.")
    size = path.stat().st_size
    if size == 0:
        raise ImageFileError(f"{name}: {path.name!r} is empty (0 bytes), not an image.")
    if size > MAX_IMAGE_FILE_BYTES:
        raise ImageFileError(
            f"{name}: {path.name!r} has {size / 2**20:.1f} MiB; image files up to "
            f"{MAX_IMAGE_FILE_BYTES // 2**20} MiB are accepted."
        )
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:
        raise ImageFileError(
            f"{name}: {path.name!r} declares more pixels than Pillow opens (a decompression bomb); images up to "
            f"{max_pixels:,} pixels are accepted."
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise ImageFileError(f"{name}: {path.name!r} is not an image file (PNG, JPEG, WebP, ...).") from None
    if width * height > max_pixels:
        raise ImageFileError(
            f"{name}: {path.name!r} is {width}x{height} pixels; images up to {max_pixels:,} pixels "
            f"({int(max_pixels**0.5)}x{int(max_pixels**0.5)}) are accepted. Scale it down first."
        )
    return width, height


def open_image_file(path: str | Path, name: str, max_pixels: int = MAX_IMAGE_PIXELS, keep_alpha: bool = False):
    """The image at `path` as an 8-bit PIL image (RGB, or RGBA with `keep_alpha` when the file has transparency),
    checked by `check_image_file` before decoding; a file that fails to decode is refused naming `name`."""
    check_image_file(path, name, max_pixels)
    try:
        with Image.open(path) as image:
            image.load()
            return to_8bit(image, name, keep_alpha=keep_alpha)
    except ImageFileError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageFileError(
            f"{name}: {Path(path).name!r} could not be decoded ({error}); it is damaged or not an image."
        ) from None


def to_8bit(image: Image.Image, name: str, keep_alpha: bool = False) -> Image.Image:
    """
    `image` as 8-bit RGB (RGBA with `keep_alpha` when it has an alpha band). PIL's own conversion clips 16-bit and
    32-bit values at 255 (a 16-bit PNG turns near-white); here they are scaled by their format's range instead:
    16-bit integers (`I;16*`, or `I` with values above 255) by 1/257, floats (`F`) read as 0..1 when all values are
    in [0, 1] and as 0..255 otherwise. NaN or infinite values, and values outside those ranges, are refused.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageFileError(f"{name}: the image has NaN or infinite pixel values.")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F":
            scale = 255.0 if high <= 1.0 else 1.0
        else:
            scale = 1.0 if (high <= 255 and not image.mode.startswith("I;16")) else 1 / 257
        scaled = values * scale
        if low < 0 or scaled.max(initial=0) > 255 + 1e-6:
            raise ImageFileError(
                f"{name}: pixel values from {low:g} to {high:g} fit no image range (0..1, 0..255 or 0..65535)."
            )
        image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if keep_alpha and has_alpha:
        return image.convert("RGBA")
    return image.convert("RGB")
