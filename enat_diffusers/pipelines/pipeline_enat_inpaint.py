"""Inpainting, outpainting and class-conditional editing with ENAT."""

from collections.abc import Callable

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring

from ..checks import check_fraction
from ..image_utils import editing_inputs_as_pixels, resize_pixels
from .pipeline_enat_editing import ENATEditingPipelineBase

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> import torch
        >>> from enat_diffusers import ENATInpaintPipeline, load_demo_pipeline

        >>> pipe = ENATInpaintPipeline.from_pipe(load_demo_pipeline("digits"))
        >>> image = PIL.Image.open("digit.png")  # any size: resized to the model's 16x16
        >>> mask = PIL.Image.new("L", (16, 16), 0)  # white = regenerate
        >>> mask.paste(255, (0, 8, 16, 16))  # the bottom half
        >>> edited = pipe(image=image, mask_image=mask, class_labels="seven", generator=torch.manual_seed(0)).images[0]
        ```
"""


def outpainting_canvas(
    image: PIL.Image.Image, size: int | tuple[int, int], *, offset: tuple[int, int] | None = None, align: int = 1
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """
    Places `image` in a black canvas of `size` (`(height, width)` or one side) and returns `(canvas, mask_image)`,
    the mask white (regenerate) everywhere outside the image: inputs for [`ENATInpaintPipeline`] that extend the image
    beyond its borders.

    Args:
        image (`PIL.Image.Image`): At most the size of the canvas.
        size (`int` or `(int, int)`): The canvas; for the pipeline, its `image_size`.
        offset (`(int, int)`, *optional*): `(top, left)` of the image in the canvas; centred by default.
        align (`int`, defaults to 1): The default offset is rounded down to a multiple of it. Pass the VQ
            downsampling factor (as `ENATInpaintPipeline.outpainting_inputs` does) so that the image covers whole
            tokens: a token that is only partly covered by the image is regenerated.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}")
    height, width = (size, size) if isinstance(size, int) else size
    if image.height > height or image.width > width:
        raise ValueError(f"`image` ({image.height}x{image.width}) is larger than the canvas ({height}x{width})")
    if offset is None:
        offset = ((height - image.height) // 2 // align * align, (width - image.width) // 2 // align * align)
    top, left = offset
    if not (0 <= top <= height - image.height and 0 <= left <= width - image.width):
        raise ValueError(f"`offset` {offset} places the image outside the {height}x{width} canvas")
    canvas = PIL.Image.new("RGB", (width, height), "black")
    canvas.paste(image.convert("RGB"), (left, top))
    mask = PIL.Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


class ENATInpaintPipeline(ENATEditingPipelineBase):
    r"""
    Inpainting with ENAT: the masked region of each image is generated (as a class or from a prompt), everything else
    is kept. Serves both kinds of transformer, with the components of [`ENATPipeline`] (class-conditional,
    `class_labels=` ids or names) or of [`ENATText2ImagePipeline`] (`prompt=` / `prompt_embeds=`); build it from
    either with `ENATInpaintPipeline.from_pipe(pipe)`. Regenerating a region with another class than the image shows is
    MaskGIT's class-conditional editing; outpainting is inpainting of a canvas (`outpainting_inputs`).

    How the region is made and kept:

    - `mask_image` follows diffusers: white / 1 marks pixels to regenerate; a pixel counts as masked when its value is
      at least 0.5 (the mask processor binarizes).
    - Token rule: the VQ tokenizer turns each `f x f` patch of pixels into one token (`f = vqvae.downsample_factor`). A
      token is regenerated when more than `mask_threshold` of its patch is masked; with the default 0 that is when
      any of its pixels is masked, so the regenerated region covers the pixel mask.
    - Every other token is exactly the input image's token (`output_type="latent"` shows them), and the kept tokens
      go through the transformer's encoder once, at the first step (shared by the samples of an image); afterwards
      their keys/values are computed once and every step attends to them as fixed context for the region
      (`kept_context_mode`). The masking schedule runs over the region: each step reveals its share of the region's
      tokens, no step is idle.
    - Decoded images are the VQ reconstruction outside the region; `paste_back=True` pastes the original pixels back
      outside the pixel mask (diffusers' `VaeImageProcessor.apply_overlay`).
    - An image whose mask selects no token is returned as its reconstruction (the input itself with
      `paste_back=True`); when no image of the call has a masked token, no model runs but the VQ. An all-white mask is
      generation from scratch: the result equals the generation pipeline's for the same generator.

    Args:
        transformer ([`ENATTransformer2DModel`]): Class-conditional or text-conditioned.
        vqvae ([`MaskGITVQModel`]): Tokenizes the input images and decodes the result.
        scheduler ([`SchedulerMixin`]): An [`ENATScheduler`].
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): For `prompt=` with a text transformer.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): Its tokenizer.
        id2label (`dict[int, str]`, *optional*): Class names of a class-conditional transformer.
        default_num_inference_steps (`int`, defaults to 8): Used when `__call__` gets no `num_inference_steps`.
        default_guidance_scale (`float`, defaults to 3.5): Used when `__call__` gets no `guidance_scale`.
    """

    _card_pipeline_tag = "image-to-image"
    _card_call = "images = pipe(image=image, mask_image=mask_image, class_labels=[0]).images"
    _card_tags = ("inpainting",)

    def outpainting_inputs(
        self, image: PIL.Image.Image, *, offset: tuple[int, int] | None = None
    ) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """`(image, mask_image)` for outpainting `image` (smaller than `image_size`) on a canvas of this model's
        resolution: centred on whole tokens by default, or at `offset` `(top, left)`. See `outpainting_canvas`."""
        return outpainting_canvas(image, self.image_size, offset=offset, align=self.vqvae.downsample_factor)

    # ----------------------------------------------------------------------------------------------------------------

    def check_mask_inputs(self, image, mask_image, mask_threshold, paste_back: bool = False) -> tuple[int, int]:
        """Checks `image`, `mask_image` and the mask options; returns the numbers of images and masks (a mask per image or one)."""
        num_images = len(self.check_image(image))
        num_masks = len(self.check_image(mask_image, name="mask_image", is_mask=True))
        if num_masks not in (1, num_images):
            raise ValueError(
                f"`mask_image` holds {num_masks} masks for {num_images} images: pass one mask per image or one for all"
            )
        check_fraction(mask_threshold, "mask_threshold", closed_above=False)
        if not isinstance(paste_back, bool):
            raise TypeError(f"`paste_back` must be True or False, got {paste_back!r}")
        return num_images, num_masks

    def prepare_token_mask(
        self, mask_image, mask_threshold: float = 0.0, *, device=None
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """
        The binarized pixel masks `(num_masks, 1, H, W)` and the token masks `(num_masks, side, side)`: a token is
        regenerated when more than `mask_threshold` of its pixels are masked.
        """
        masks = [resize_pixels(mask, self.image_size, is_mask=True) for mask in editing_inputs_as_pixels(
            mask_image, name="mask_image", is_mask=True
        )]  # fmt: skip
        pixel_mask = self.mask_processor.binarize(torch.stack(masks))
        pixel_mask = pixel_mask.to(device or self._execution_device)
        coverage = F.avg_pool2d(pixel_mask.float(), self.vqvae.downsample_factor)
        return pixel_mask, (coverage > mask_threshold)[:, 0]

    def paste_back(
        self, images: list[PIL.Image.Image], originals: torch.Tensor, pixel_masks: torch.Tensor, output_type: str
    ):
        """Original pixels outside the pixel mask, generated ones inside (diffusers' `apply_overlay`), as
        `output_type`."""
        originals = self.image_processor.postprocess(originals.float().cpu(), output_type="pil")
        masks = self.mask_processor.postprocess(pixel_masks.float().cpu(), output_type="pil")
        overlaid = [
            self.image_processor.apply_overlay(mask, original, image)
            for mask, original, image in zip(masks, originals, images, strict=True)
        ]
        if output_type == "pil":
            return overlaid
        array = self.image_processor.pil_to_numpy(overlaid)
        return array if output_type == "np" else self.image_processor.numpy_to_pt(array)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        mask_threshold: float = 0.0,
        paste_back: bool = False,
        num_images_per_prompt: int = 1,
        kept_context_mode: str = "fixed",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "linear",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        height: int | None = None,
        width: int | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Regenerates the masked region of each image.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Text transformer: one prompt per image or one for all (or `prompt_embeds` and the other embedding
                arguments, as for [`ENATText2ImagePipeline`]). Class-conditional transformer: class names, read as
                `class_labels` (a bare string names the condition in every ENAT pipeline).
            image (PIL image, numpy array, torch tensor, or a list of them):
                The images to edit, in diffusers' conventions (arrays and tensors as floats in `[0, 1]`), of any size (resized to
                `pipe.image_size` square).
            mask_image (same kinds of input):
                One mask per image or one for all; white / 1 = regenerate; resized like `image`. A PIL mask painted
                only in its alpha channel is read from that channel.
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`, *optional*):
                Class-conditional transformer: the class to draw in the region, one per image or one for all (ids or
                names). A class other than the image's is MaskGIT's class-conditional editing.
            mask_threshold (`float` in `[0, 1)`, defaults to 0):
                A token is regenerated when more than this fraction of its pixels is masked (0: any pixel).
            paste_back (`bool`, defaults to `False`):
                Paste the original pixels back outside the mask (`output_type` `"pil"`, `"np"` or `"pt"`; the result
                then goes through 8-bit PIL images).
            num_images_per_prompt (`int`, defaults to 1):
                Samples per image. They share the first transformer pass (the kept tokens are encoded once).
            kept_context_mode (`str`, defaults to `"fixed"`):
                How later steps see the kept tokens (`KEPT_CONTEXT_MODES`). `"fixed"`: after the first step their
                keys/values at every block are computed once per image and guidance stream and reused by every later
                step and sample, so only the region is encoded (cheaper than generating the whole image).
                `"refreshed"`: generation's rule, their features projected again and their keys/values recomputed at
                every step for every sample (costs more than generation). The two agree on the first two steps.
            height (`int`, *optional*), width (`int`, *optional*):
                Size of the results: only the model's resolution (`pipe.image_size`), the default. Inputs of any size
                are resized to it (images: antialiased bicubic; masks: area averaging, then binarized at 0.5).
            num_inference_steps, guidance_scale, guidance_schedule, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs:
                As for [`ENATPipeline`]; `generator` may hold one generator per output image.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: edited images (token ids for `output_type="latent"`), image by image,
            `num_images_per_prompt` for each.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device
        conditions = {
            "class_labels": class_labels,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "prompt_embeds": prompt_embeds,
            "prompt_attention_mask": prompt_attention_mask,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
        }

        # 0. Defaults; check every argument (images and masks included) before any model runs
        num_inference_steps, guidance_scale = self.resolve_defaults(num_inference_steps, guidance_scale)
        self.check_output_size(height, width)
        conditions["prompt"], conditions["class_labels"] = self.prompt_as_class_labels(prompt, class_labels)
        num_images, num_masks = self.check_mask_inputs(image, mask_image, mask_threshold, paste_back)
        self.check_kept_context_mode(kept_context_mode)
        conditions = self.match_conditions_to_images(num_images, conditions)
        batch_size = self.check_inputs(
            **conditions,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            generator=generator,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        num_conditions = batch_size // num_images_per_prompt
        self.start_call(guidance_scale=guidance_scale, guidance_schedule=guidance_schedule)

        # 1. Condition of both guidance streams
        condition_kwargs = self.prepare_condition_kwargs(
            **conditions, num_images_per_prompt=num_images_per_prompt, device=device
        )

        # 2. Starting tokens: the input images' tokens (encoded once per image), mask ids in the region
        pixels = self.preprocess_image(image, device=device)
        pixel_masks, token_masks = self.prepare_token_mask(mask_image, mask_threshold, device=device)
        if num_masks == 1:
            pixel_masks, token_masks = (
                pixel_masks.expand(num_images, -1, -1, -1),
                token_masks.expand(num_images, -1, -1),
            )
        rows = self.row_sources(num_images, num_conditions, num_images_per_prompt).to(device)
        tokens = self.encode_image(pixels)[rows]
        latents = torch.where(token_masks[rows], self.mask_token_id, tokens)

        # 3. Timesteps
        timesteps = self.prepare_timesteps(num_inference_steps, device=device)

        # 4. Sampling loop over the region, the first step shared by the samples of one image
        if token_masks.any():
            latents = self.denoise_images(
                latents,
                rows_per_image=num_images_per_prompt,
                kept_context_mode=kept_context_mode,
                condition_kwargs=condition_kwargs,
                timesteps=timesteps,
                generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
        else:
            logger.info("the masks select no token: the images are returned as encoded, without sampling")

        # 5. Decode, and paste the original pixels back outside the mask if asked
        if paste_back and output_type != "latent":
            images = self.paste_back(self.decode_latents(latents, "pil"), pixels[rows], pixel_masks[rows], output_type)
        else:
            images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
