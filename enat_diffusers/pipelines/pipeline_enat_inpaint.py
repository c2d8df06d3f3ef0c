"""Inpainting, outpainting and class-conditional editing with ENAT."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring

from ..checks import check_fraction, check_non_negative_integer, check_strength
from ..image_utils import editing_inputs_as_pixels, resize_pixels
from ..sampling import mask_region_at_random
from .lora_enat import apply_call_lora_scale
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


def mask_crop_box(mask: torch.Tensor, padding: int) -> tuple[int, int, int, int]:
    """
    `(top, left, bottom, right)` of the crop that `padding_mask_crop=padding` edits for `mask` (`(H, W)` or
    `(1, H, W)`, 1 = regenerate, masked at values >= 0.5): the bounding box of the masked pixels with `padding` pixels
    added on every side, grown to a square about its centre (ENAT draws square images) and moved inside the `H x W`
    image. A square larger than the image's height or width takes all of that side (the crop is then not square,
    and resized to the model's square resolution like any other input). A mask with no masked pixel gives the whole
    image.
    """
    height, width = mask.shape[-2:]
    masked = mask.reshape(height, width) >= 0.5
    if not masked.any():
        return 0, 0, height, width
    rows, columns = masked.any(dim=1).nonzero()[:, 0], masked.any(dim=0).nonzero()[:, 0]
    top, bottom = max(int(rows[0]) - padding, 0), min(int(rows[-1]) + 1 + padding, height)
    left, right = max(int(columns[0]) - padding, 0), min(int(columns[-1]) + 1 + padding, width)
    side = max(bottom - top, right - left)
    top, bottom = _grow_span(top, bottom, side, height)
    left, right = _grow_span(left, right, side, width)
    return top, left, bottom, right


def _grow_span(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """`[start, end)` grown to `size` about its centre and moved inside `[0, limit)`; all of it if `size >= limit`."""
    if size >= limit:
        return 0, limit
    start = min(max(start - (size - (end - start)) // 2, 0), limit - size)
    return start, start + size


@dataclass
class MaskCrops:
    """
    What a call with `padding_mask_crop` edits (see [`ENATInpaintPipeline.prepare_mask_crops`]), one entry per input
    image.

    Args:
        images (`list[torch.Tensor]`): The input images `(3, H, W)` in `[0, 1]`, each at its own size.
        masks (`list[torch.BoolTensor]`): Their binarized masks `(1, H, W)` (`True` = regenerate).
        boxes (`list[tuple[int, int, int, int]]`): The crop of each image, `(top, left, bottom, right)`.
    """

    images: list[torch.Tensor]
    masks: list[torch.BoolTensor]
    boxes: list[tuple[int, int, int, int]]

    def image_crops(self) -> list[torch.Tensor]:
        """The crops of the images, `(3, h, w)` each."""
        return [_crop(image, box) for image, box in zip(self.images, self.boxes, strict=True)]

    def mask_crops(self) -> list[torch.Tensor]:
        """The crops of the masks, `(1, h, w)` floats each (1 = regenerate)."""
        return [_crop(mask, box).float() for mask, box in zip(self.masks, self.boxes, strict=True)]


def _crop(pixels: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, bottom, right = box
    return pixels[:, top:bottom, left:right]


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
    - `strength` (diffusers' meaning, default 1.0: the region regenerated from scratch): below 1 the region starts
      from the input's tokens with only a share of them masked, as many as the region's masking schedule leaves at
      step `T - int(T * strength)` of `T = num_inference_steps`, and the last `int(T * strength)` steps run from
      there. Only the masked tokens are generated; the region's other tokens stay the input's.
    - `padding_mask_crop` edits a square crop around the mask at the model's full resolution and pastes it back into
      the input image inside the mask: the results have the input images' sizes (`mask_crop_box`).

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

    def check_mask_inputs(
        self,
        image,
        mask_image,
        mask_threshold,
        paste_back: bool = False,
        *,
        padding_mask_crop: int | None = None,
        output_type: str = "pil",
    ) -> tuple[int, int]:
        """Checks `image`, `mask_image` and the mask options (`padding_mask_crop` with the `output_type` it returns);
        returns the numbers of images and masks (a mask per image or one)."""
        image_sizes = self.check_image(image)
        mask_sizes = self.check_image(mask_image, name="mask_image", is_mask=True)
        num_images, num_masks = len(image_sizes), len(mask_sizes)
        if num_masks not in (1, num_images):
            raise ValueError(
                f"`mask_image` holds {num_masks} masks for {num_images} images: pass one mask per image or one for all"
            )
        check_fraction(mask_threshold, "mask_threshold", closed_above=False)
        if not isinstance(paste_back, bool):
            raise TypeError(f"`paste_back` must be True or False, got {paste_back!r}")
        if padding_mask_crop is None:
            return num_images, num_masks
        check_non_negative_integer(padding_mask_crop, "padding_mask_crop")
        if output_type == "latent":
            raise ValueError(
                "`padding_mask_crop` returns the input images with the edited crop pasted in, which token ids cannot "
                "hold: pass `output_type` 'pil', 'np' or 'pt'"
            )
        for index, size in enumerate(image_sizes):
            mask_size = mask_sizes[index if num_masks > 1 else 0]
            if mask_size != size:
                raise ValueError(
                    f"with `padding_mask_crop` each mask must have its image's size (the crop is found in the image's "
                    f"pixels): image {index} is {size[0]}x{size[1]}, its mask {mask_size[0]}x{mask_size[1]}"
                )
        if output_type != "pil" and len(set(image_sizes)) > 1:
            raise ValueError(
                "with `padding_mask_crop` the results have the sizes of the input images, which differ here: only "
                f"`output_type='pil'` returns images of several sizes, got {output_type!r}"
            )
        return num_images, num_masks

    def check_strength(self, strength, num_inference_steps: int) -> float:
        """`strength` (`enat_diffusers.checks.check_strength`); below 1 the scheduler must run its masking schedule
        over a region (`ENATScheduler`), which the start of the run is counted by."""
        strength = check_strength(strength, num_inference_steps)
        if strength < 1 and not (self.scheduler_runs_regions and hasattr(self.scheduler, "num_masked_after_step")):
            raise ValueError(
                f"`strength` below 1 needs a scheduler that runs its masking schedule over the inpainting region, "
                f"which {type(self.scheduler).__name__} does not: pass strength=1.0, or use ENATScheduler "
                "(ENATScheduler.from_config(pipe.scheduler.config))"
            )
        return strength

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

    def prepare_region_latents(
        self,
        tokens: torch.LongTensor,
        region: torch.BoolTensor,
        *,
        strength: float,
        num_inference_steps: int,
        timesteps: torch.Tensor,
        generator=None,
    ) -> tuple[torch.LongTensor, torch.Tensor, torch.BoolTensor | None]:
        """
        Starting tokens, the timesteps to run and the region the masking schedule counts, for `strength` (checked: at
        least one step runs). At 1.0 every token of the `region` is masked and every step runs. Below, the run starts
        at step `start = T - int(T * strength)` of `T = num_inference_steps`: `tokens` with as many of each row's `n`
        region tokens masked at random as the region's schedule leaves after the step before
        (`scheduler.num_masked_after_step(start - 1, n)`), and the region is returned for the schedule to count.
        """
        start = num_inference_steps - int(num_inference_steps * strength)
        if start == 0:
            return torch.where(region, self.mask_token_id, tokens), timesteps, None
        sizes = region.reshape(region.shape[0], -1).sum(dim=1).tolist()
        counts = [self.scheduler.num_masked_after_step(start - 1, size) for size in sizes]
        latents = mask_region_at_random(tokens, region, counts, self.mask_token_id, generator)
        return latents, timesteps[start:], region

    def prepare_mask_crops(self, image, mask_image, padding_mask_crop: int) -> MaskCrops:
        """The input images at their own sizes, their binarized masks (one per image) and the crop of each image
        (`mask_crop_box`): what `padding_mask_crop` edits and pastes back into."""
        images = editing_inputs_as_pixels(image)
        masks = [mask >= 0.5 for mask in editing_inputs_as_pixels(mask_image, name="mask_image", is_mask=True)]
        masks = masks * len(images) if len(masks) == 1 else masks
        boxes = [mask_crop_box(mask, int(padding_mask_crop)) for mask in masks]
        return MaskCrops(images=images, masks=masks, boxes=boxes)

    def paste_crops(self, edited: torch.Tensor, crops: MaskCrops, rows: list[int], output_type: str):
        """
        Each edited crop (`edited`: `(num_rows, 3, image_size, image_size)` in `[0, 1]`, row `r` made from input image
        `rows[r]`) resized back to its box (antialiased bicubic) and pasted into its input image inside the mask
        only, as `output_type` (`"pil"`, `"np"` or `"pt"`, at the input images' sizes).
        """
        results = []
        for crop, index in zip(edited.float().cpu(), rows, strict=True):
            box, original, mask = crops.boxes[index], crops.images[index], crops.masks[index]
            top, left, bottom, right = box
            size = (bottom - top, right - left)
            if tuple(crop.shape[-2:]) != size:
                crop = F.interpolate(crop[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            result = original.clone()
            result[:, top:bottom, left:right] = torch.where(_crop(mask, box), crop.clamp(0, 1), _crop(original, box))
            results.append(result)
        if output_type == "pt":
            return torch.stack(results).to(edited.device)
        arrays = [result.permute(1, 2, 0).numpy() for result in results]
        if output_type == "np":
            return np.stack(arrays)
        return [self.image_processor.numpy_to_pil(array[None])[0] for array in arrays]

    @torch.no_grad()
    @apply_call_lora_scale
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
        strength: float = 1.0,
        padding_mask_crop: int | None = None,
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
        attention_kwargs: dict | None = None,
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
            strength (`float` in `(0, 1]`, defaults to 1.0):
                How much of the region to redraw, with diffusers' meaning: of `num_inference_steps` steps `T`, the last
                `int(T * strength)` run, and at least one must (a smaller strength is refused). 1.0 regenerates the
                whole region from scratch. Below 1 the region starts from the input image's tokens with a share of
                them masked at random: as many as the region's masking schedule leaves at step `T - int(T * strength)`
                (cosine schedule, `T = 8`, `strength=0.5`: 71% of the region's tokens, 4 steps). Only those are
                generated; the region's other tokens stay the input's. Below 1 the scheduler must be an
                [`ENATScheduler`].
            padding_mask_crop (`int`, *optional*):
                Edit a crop around the mask at the model's full resolution (diffusers' argument): the bounding box of
                the mask's masked pixels, grown by this many pixels on every side, made square (ENAT draws square
                images) and moved inside the image (`mask_crop_box`), is cut from the image and its mask, resized to
                `pipe.image_size`, edited, resized back (antialiased bicubic) and pasted into the input image inside
                the mask only. The results then have the sizes of the input images, not `pipe.image_size`, and every
                pixel outside the mask is the input's (`paste_back` is implied). Each mask must have its image's size.
                `output_type` may be `"pil"`, `"np"` or `"pt"` (the last two only for images of one size). Useful
                when the mask covers a small part of a larger image.
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
                are resized to it (images: antialiased bicubic; masks: area averaging, then binarized at 0.5). With
                `padding_mask_crop` the crops are resized so, and the results have the input images' sizes.
            num_inference_steps, guidance_scale, guidance_schedule, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs, attention_kwargs:
                As for [`ENATPipeline`]; `generator` may hold one generator per output image. With `strength` below 1
                the guidance ramp and the callback's step index count from the start of the full schedule of
                `num_inference_steps`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: edited images (token ids for `output_type="latent"`), image by image,
            `num_images_per_prompt` for each; of the input images' sizes with `padding_mask_crop`.
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
        num_images, num_masks = self.check_mask_inputs(
            image, mask_image, mask_threshold, paste_back, padding_mask_crop=padding_mask_crop, output_type=output_type
        )
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
        strength = self.check_strength(strength, num_inference_steps)
        num_conditions = batch_size // num_images_per_prompt
        self.start_call(
            guidance_scale=guidance_scale, guidance_schedule=guidance_schedule, attention_kwargs=attention_kwargs
        )

        # 1. Condition of both guidance streams
        condition_kwargs = self.prepare_condition_kwargs(
            **conditions, num_images_per_prompt=num_images_per_prompt, device=device
        )

        # 2. With `padding_mask_crop`, the crops around the masks are what is edited
        crops = None
        if padding_mask_crop is not None:
            crops = self.prepare_mask_crops(image, mask_image, padding_mask_crop)
            image, mask_image, num_masks = crops.image_crops(), crops.mask_crops(), num_images

        # 3. Timesteps, and the starting tokens: the input images' tokens (encoded once per image), with mask ids in
        # the region (all of it at strength 1, else the share its schedule leaves where the run starts)
        pixels = self.preprocess_image(image, device=device)
        pixel_masks, token_masks = self.prepare_token_mask(mask_image, mask_threshold, device=device)
        if num_masks == 1:
            pixel_masks, token_masks = (
                pixel_masks.expand(num_images, -1, -1, -1),
                token_masks.expand(num_images, -1, -1),
            )
        rows = self.row_sources(num_images, num_conditions, num_images_per_prompt).to(device)
        tokens = self.encode_image(pixels)[rows]
        timesteps = self.prepare_timesteps(num_inference_steps, device=device)
        latents, timesteps, schedule_region = self.prepare_region_latents(
            tokens,
            token_masks[rows],
            strength=strength,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            generator=generator,
        )

        # 4. Sampling loop over the region, the first step shared by the samples of one image
        if (latents == self.mask_token_id).any():
            latents = self.denoise_images(
                latents,
                rows_per_image=num_images_per_prompt,
                kept_context_mode=kept_context_mode,
                schedule_region=schedule_region,
                condition_kwargs=condition_kwargs,
                timesteps=timesteps,
                num_inference_steps=num_inference_steps,
                generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
        else:
            logger.info(
                "no token is masked at the start (the masks select none, or `strength` leaves none of a small region "
                "masked): the images are returned as encoded, without sampling"
            )

        # 5. Decode; paste the crops into the input images, or the original pixels back outside the mask if asked
        if crops is not None:
            images = self.paste_crops(self.decode_latents(latents, "pt"), crops, rows.tolist(), output_type)
        elif paste_back and output_type != "latent":
            images = self.paste_back(self.decode_latents(latents, "pil"), pixels[rows], pixel_masks[rows], output_type)
        else:
            images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
