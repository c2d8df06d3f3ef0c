"""Image conversions shared by the scripts and tests: pipeline output to uint8, and the handwritten-digit demo's
pre- and post-processing (scikit-learn's 8x8 digits <-> the demo's 16x16 grey RGB images)."""

import numpy as np
import torch
import torch.nn.functional as F

# scikit-learn's digits are 8x8 pixels with values 0..16; the demo pipelines draw them at 16x16.
DIGIT_GRID = 8
DIGIT_MAX = 16.0
DIGIT_IMAGE_SIZE = 16


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output (`output_type="np"`, floats in [0, 1]) -> uint8 0..255 (rounded, clipped): the layout that
    evaluation tools (ADM's npz, PNG files) expect."""
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def digits_to_images(pixels: np.ndarray, size: int = DIGIT_IMAGE_SIZE) -> torch.Tensor:
    """Digit pixels `(N, 8, 8)` in [0, 16] -> `(N, 3, size, size)` grey RGB images in [-1, 1] (nearest-neighbour):
    the images the digits demo is trained on."""
    images = torch.from_numpy(np.asarray(pixels)).float()[:, None] * (2.0 / DIGIT_MAX) - 1.0
    images = F.interpolate(images, size=(size, size), mode="nearest")
    return images.repeat(1, 3, 1, 1)


def digits_to_uint8(pixels: np.ndarray, size: int = DIGIT_IMAGE_SIZE) -> np.ndarray:
    """Digit pixels `(N, 8, 8)` in [0, 16] -> uint8 `(N, size, size, 3)` images, as a pipeline's would be saved."""
    images = digits_to_images(pixels, size)
    return to_uint8(((images + 1.0) / 2.0).permute(0, 2, 3, 1).numpy())


def images_to_digits(images) -> torch.Tensor:
    """Images -> `(N, 64)` grey 8x8 pixels in [0, 16] (channel mean, average pooling): what a digit classifier
    trained on scikit-learn's digits reads.

    `images`: a float `(N, 3, H, W)` tensor in [-1, 1] (pipeline `output_type="pt"` before rescaling), a uint8
    `(N, 3, H, W)` tensor, a `(N, H, W, 3)` array (float in [0, 1] or uint8), or a list of PIL images. The result
    stays on the input tensor's device."""
    if isinstance(images, list):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if images.dtype != torch.uint8:
            images = images.float() * 2.0 - 1.0
    if images.dtype == torch.uint8:
        images = images.float() * (2.0 / 255.0) - 1.0
    grey = images.float().clamp(-1, 1).mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, (DIGIT_GRID, DIGIT_GRID))
    return ((small + 1.0) * (DIGIT_MAX / 2.0)).flatten(1)


__all__ = ["digits_to_images", "digits_to_uint8", "images_to_digits", "to_uint8"]
