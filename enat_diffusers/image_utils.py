"""Image conversions shared by the scripts and tests: pipeline output to uint8, and the handwritten-digit demo's
pre- and post-processing (scikit-learn's 8x8 digits <-> the demo's 16x16 grey RGB images)."""

import numpy as np
import PIL.Image
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


# ------------------------------------------------------------------------------------------------------------------
# Editing inputs: images and masks in diffusers' conventions, as float pixels in [0, 1], checked before any model runs

IMAGE_INPUT_TYPES = (
    "a PIL image, a float numpy array (H, W, C) / (N, H, W, C) in [0, 1], a float torch tensor (C, H, W) / "
    "(N, C, H, W) in [0, 1], or a list of them"
)
MASK_INPUT_TYPES = (
    "a PIL image, a numpy array or torch tensor (H, W) / (N, H, W) / (N, 1, H, W) with 1 = regenerate, or a list of "
    "them"
)
# PIL modes of 16-bit (and 32-bit integer) images, e.g. 16-bit PNGs: full scale is 65535, not 255.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_WIDE_INTEGER_SCALE = 65535.0


def _pil_to_array(item, *, name: str, is_mask: bool) -> np.ndarray:
    """A PIL image -> float32 `(H, W, C)` in [0, 1] (`C` = 3 for images, 1 for masks), reading 16-bit images at
    their full scale, float ("F") images as they are, and a mask drawn only in its alpha channel by that channel."""
    mode = item.mode
    if mode in _WIDE_INTEGER_MODES:
        array = np.asarray(item, dtype=np.float64) / _WIDE_INTEGER_SCALE
        array = np.clip(array, 0.0, 1.0).astype(np.float32)[..., None]
    elif mode == "F":
        array = np.asarray(item, dtype=np.float32)[..., None]
        _check_float_values(array, name=f"`{name}` (a mode 'F' PIL image)")
    elif is_mask:
        with_alpha = item.convert("RGBA") if (mode in ("RGBA", "LA", "PA") or "transparency" in item.info) else None
        if with_alpha is not None:
            rgba = np.asarray(with_alpha)
            colour, alpha = rgba[..., :3], rgba[..., 3]
            if colour.min() == colour.max() and alpha.min() != alpha.max():
                # Painted only in alpha (the colour is one flat value): the alpha channel is the mask.
                return (alpha.astype(np.float32) / 255.0)[..., None]
        array = np.asarray(item.convert("L")).astype(np.float32)[..., None] / 255.0
    else:
        return np.asarray(item.convert("RGB")).astype(np.float32) / 255.0
    if not is_mask:
        array = np.repeat(array, 3, axis=-1)
    return array


def _check_float_values(array, *, name: str) -> None:
    """Float pixels must be finite and in [0, 1] (diffusers' convention); 0..255 floats are refused, not clipped."""
    values = torch.as_tensor(array)
    if values.numel() == 0:
        return
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} holds NaN or infinite values; pixels must be finite numbers in [0, 1]")
    low, high = values.min().item(), values.max().item()
    if low < 0 or high > 1:
        hint = " (it looks like 0..255: divide by 255)" if high > 1 and high <= 255 and low >= 0 else ""
        raise ValueError(f"{name} must hold values in [0, 1], got values in [{low:g}, {high:g}]{hint}")


def editing_inputs_as_pixels(image, *, name: str = "image", is_mask: bool = False) -> list[torch.Tensor]:
    """
    The images of `image` (diffusers' input conventions: PIL images, float arrays/tensors in [0, 1], lists of them;
    masks also bool) as float32 tensors `(C, H, W)` in [0, 1], `C` = 3 for images and 1 for masks, each at its own
    size. Everything is checked here, with a sentence naming `name`: types, layouts, NaN, values outside [0, 1]
    (0..255 floats included). 16-bit PIL images are read at their full scale; a mask painted only in the alpha
    channel of an RGBA image is read from that channel.
    """
    items = image if isinstance(image, (list, tuple)) else [image]
    accepted = MASK_INPUT_TYPES if is_mask else IMAGE_INPUT_TYPES
    if image is None:
        raise ValueError(f"`{name}` is required: {accepted}")
    if not items:
        raise ValueError(f"`{name}` is an empty list; pass {accepted}")
    pixels: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            pixels.append(torch.from_numpy(_pil_to_array(item, name=name, is_mask=is_mask)).permute(2, 0, 1))
            continue
        if not isinstance(item, (np.ndarray, torch.Tensor)):
            raise TypeError(f"`{name}` must be {accepted}, got {type(item).__name__}")
        is_bool = item.dtype in (np.bool_, torch.bool)
        is_float = (
            item.is_floating_point() if isinstance(item, torch.Tensor) else np.issubdtype(item.dtype, np.floating)
        )
        if not (is_float or (is_mask and is_bool)):
            raise TypeError(
                f"`{name}` arrays must hold floats in [0, 1]{' (or bools)' if is_mask else ''}, got {item.dtype}; "
                "pass a PIL image for 8-bit pixels"
            )
        channels_first = isinstance(item, torch.Tensor)
        tensor = item.detach().cpu() if channels_first else torch.from_numpy(np.ascontiguousarray(item))
        tensor = tensor.float() if is_bool else tensor
        shape = tuple(tensor.shape)
        if is_mask:
            if len(shape) == 2:
                batch = tensor[None, None]
            elif len(shape) == 3 and not channels_first and shape[-1] == 1:
                batch = tensor.permute(2, 0, 1)[None]
            elif len(shape) == 3:
                batch = tensor[:, None]
            elif len(shape) == 4 and (shape[1] == 1 if channels_first else shape[-1] == 1):
                batch = tensor if channels_first else tensor.permute(0, 3, 1, 2)
            else:
                raise ValueError(f"`{name}` must be {accepted}; got an array of shape {shape}")
        else:
            if len(shape) not in (3, 4) or shape[-3 if channels_first else -1] not in (1, 3):
                layout = "(C, H, W) or (N, C, H, W)" if channels_first else "(H, W, C) or (N, H, W, C)"
                raise ValueError(
                    f"`{name}` {type(item).__name__} must have shape {layout} with 1 or 3 channels, got {shape}"
                )
            batch = tensor if len(shape) == 4 else tensor[None]
            if not channels_first:
                batch = batch.permute(0, 3, 1, 2)
            if batch.shape[1] == 1:  # greyscale
                batch = batch.expand(-1, 3, -1, -1)
        if not is_bool:
            _check_float_values(batch, name=f"`{name}`")
        pixels += list(batch.float())
    if not pixels:
        raise ValueError(f"`{name}` holds no images")
    return pixels


def resize_pixels(pixels: torch.Tensor, size: int, *, is_mask: bool = False) -> torch.Tensor:
    """`(C, H, W)` pixels in [0, 1] resized to `size x size`: images with antialiased bicubic resampling (clamped to
    [0, 1]), masks by area averaging (the fraction of each new pixel that was masked); unchanged at that size."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    if is_mask:
        return F.interpolate(pixels[None], size=(size, size), mode="area")[0]
    resized = F.interpolate(pixels[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0].clamp(0.0, 1.0)


__all__ = [
    "IMAGE_INPUT_TYPES",
    "MASK_INPUT_TYPES",
    "digits_to_images",
    "digits_to_uint8",
    "editing_inputs_as_pixels",
    "images_to_digits",
    "resize_pixels",
    "to_uint8",
]
