"""enat_diffusers.image_utils: the one uint8 conversion and the digits demo's pre/post-processing."""

import numpy as np
import torch
from PIL import Image

from enat_diffusers.image_utils import digits_to_images, digits_to_uint8, images_to_digits, to_uint8


def test_to_uint8_rounds_and_clips():
    images = np.array([-0.2, 0.0, 0.6 / 255, 0.499, 1.0, 1.3], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(images), [0, 0, 1, 127, 255, 255])
    assert to_uint8(images).dtype == np.uint8


def test_digit_pixels_survive_every_image_form():
    pixels = np.random.default_rng(0).integers(0, 17, size=(5, 8, 8)).astype(np.float64)
    flat = pixels.reshape(5, -1)
    tensor = digits_to_images(pixels)
    assert tensor.shape == (5, 3, 16, 16) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_allclose(images_to_digits(tensor).numpy(), flat, atol=1e-5)
    uint8 = digits_to_uint8(pixels)
    assert uint8.dtype == np.uint8 and uint8.shape == (5, 16, 16, 3)
    # uint8 images keep the pixels up to the 1/255 quantisation: at most 16 / 255 / 2 off
    for form in (uint8, torch.from_numpy(uint8).permute(0, 3, 1, 2), [Image.fromarray(image) for image in uint8]):
        np.testing.assert_allclose(images_to_digits(form).numpy(), flat, atol=8 / 255 + 1e-5)
    np.testing.assert_allclose(images_to_digits(uint8 / 255.0).numpy(), flat, atol=8 / 255 + 1e-5)
