"""What the ENAT editing pipelines (inpainting, image-to-image) share on top of [`ENATBasePipeline`]: their
components (both kinds of transformer), image and mask checks in diffusers' input conventions, tokenizing the input
images once per image, matching conditions to images, the first sampling step shared by the samples of one image,
and the kept tokens as fixed context for the later steps.
"""

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import SchedulerMixin
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checks import check_choice, check_fraction
from ..conditioning import ENATPromptEncodingMixin
from ..image_utils import editing_inputs_as_pixels, resize_pixels
from ..models.transformer_enat import ENATTransformer2DModel
from ..models.vq_maskgit import MaskGITVQModel
from ..sampling import KEPT_CONTEXT_MODES, ENATEditState, map_rows
from .pipeline_enat_base import ENATBasePipeline

# Condition arguments of a text transformer that hold one row per prompt.
_TEXT_TENSOR_ARGUMENTS = (
    "prompt_embeds",
    "prompt_attention_mask",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_prompt_attention_mask",
    "negative_pooled_prompt_embeds",
)


def image_batch_sizes(image, *, name: str = "image", is_mask: bool = False) -> list[tuple[int, int]]:
    """The `(height, width)` of every image of `image` in diffusers' input conventions, all of it checked
    (`enat_diffusers.image_utils.editing_inputs_as_pixels`)."""
    return [tuple(pixels.shape[-2:]) for pixels in editing_inputs_as_pixels(image, name=name, is_mask=is_mask)]


class ENATEditingPipelineBase(ENATPromptEncodingMixin, ENATBasePipeline):
    r"""
    Base of [`ENATInpaintPipeline`] and [`ENATImg2ImgPipeline`]. Takes the components of either generation pipeline:
    a class-conditional transformer (with `id2label` class names) or a text one (with an optional `text_encoder` and
    `tokenizer`), so `from_pipe(pipe)` works from any ENAT pipeline without reloading weights.

    Conditions and images: `class_labels` (or prompts) and `image` each hold one entry per input image, or one for
    all of them; every input image then gives `num_images_per_prompt` outputs. Images of any size are accepted and
    resized to the model's resolution (`image_size`: token grid side x the VQ downsampling factor), which is also the
    size of the results: images with antialiased bicubic resampling, masks by area averaging (a resized mask pixel
    is the fraction of it that was masked, then binarized at 0.5 as diffusers does). Float pixels must lie in
    [0, 1] (diffusers' convention); NaN or 0..255 floats are refused. 16-bit PIL images (16-bit PNGs) are read at
    their full scale.
    """

    _abstract = True
    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: ENATTransformer2DModel,
        vqvae: MaskGITVQModel,
        scheduler: SchedulerMixin,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        id2label: dict | None = None,
        default_num_inference_steps: int = 8,
        default_guidance_scale: float = 3.5,
    ):
        super().__init__(
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            id2label=id2label,
        )
        self.register_modules(
            transformer=transformer, vqvae=vqvae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.mask_processor = VaeImageProcessor(
            do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    @property
    def image_size(self) -> int:
        """Side in pixels of the images this pipeline edits: the token grid side times the VQ downsampling."""
        return self.token_grid_size * self.vqvae.downsample_factor

    # ----------------------------------------------------------------------------------------------------------------
    # Step 0: image checks and matching conditions to images

    @staticmethod
    def check_kept_context_mode(kept_context_mode) -> str:
        """`kept_context_mode` if it is one of `KEPT_CONTEXT_MODES`, else a clear error."""
        return check_choice(kept_context_mode, KEPT_CONTEXT_MODES, "kept_context_mode")

    def check_image(self, image, *, name: str = "image", is_mask: bool = False) -> list[tuple[int, int]]:
        """Checks `image` (or a mask: `is_mask=True`) and returns the `(height, width)` of each image. Any size is
        accepted: `preprocess_image` and the masks' preparation resize to `image_size`."""
        return image_batch_sizes(image, name=name, is_mask=is_mask)

    def check_output_size(self, height, width) -> None:
        """`height` / `width` (diffusers' names) may only be the model's resolution: ENAT draws a fixed token grid."""
        side = self.image_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != side:
                raise ValueError(
                    f"`{name}` must be {side} (or None): this model draws {side}x{side} images; inputs of other sizes "
                    f"are resized to {side}x{side}"
                )

    def _num_conditions(self, class_labels, prompt, prompt_embeds) -> int | None:
        """Number of conditions, or None where the arguments are too wrong to count (`check_inputs` says why)."""
        if self.is_class_conditional:
            return None if class_labels is None else len(self.class_label_ids(class_labels))
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        if isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.ndim == 3:
            return prompt_embeds.shape[0]
        return None

    def match_conditions_to_images(self, num_images: int, conditions: dict) -> dict:
        """
        `conditions` (the condition arguments of `__call__`) with one condition repeated for each of `num_images`
        images where a single condition was given for several images. Counts that match neither way are refused.
        """
        count = self._num_conditions(
            conditions.get("class_labels"), conditions.get("prompt"), conditions.get("prompt_embeds")
        )
        if count is None or count == num_images or num_images == 1:
            return conditions
        if count != 1:
            what = "`class_labels`" if self.is_class_conditional else "prompts"
            raise ValueError(
                f"{count} {what} for {num_images} images: pass one condition per image, one for all images, or one "
                "image for all conditions"
            )
        conditions = dict(conditions)
        if self.is_class_conditional:
            conditions["class_labels"] = self.class_label_ids(conditions["class_labels"]) * num_images
            return conditions
        for name in ("prompt", "negative_prompt"):
            value = conditions.get(name)
            if isinstance(value, str) and name == "prompt":
                conditions[name] = [value] * num_images
            elif isinstance(value, list) and len(value) == 1:
                conditions[name] = value * num_images
        for name in _TEXT_TENSOR_ARGUMENTS:
            value = conditions.get(name)
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == 1:
                conditions[name] = value.expand(num_images, *value.shape[1:])
        return conditions

    @staticmethod
    def row_sources(count: int, num_conditions: int, num_images_per_prompt: int) -> torch.LongTensor:
        """For every output row, the index of its entry among `count` inputs (1 = shared by all), in the row order
        of `prepare_condition_kwargs`: condition after condition, `num_images_per_prompt` rows each."""
        per_condition = torch.zeros(num_conditions, dtype=torch.long) if count == 1 else torch.arange(num_conditions)
        return per_condition.repeat_interleave(int(num_images_per_prompt))

    # ----------------------------------------------------------------------------------------------------------------
    # Step 2: the input images as tokens

    def preprocess_image(self, image, *, device: torch.device | None = None) -> torch.Tensor:
        """Images (see `check_image`) -> `(num_images, 3, image_size, image_size)` in `[-1, 1]`, resized where
        needed (antialiased bicubic)."""
        pixels = [resize_pixels(item, self.image_size) for item in editing_inputs_as_pixels(image)]
        return (2.0 * torch.stack(pixels) - 1.0).to(device or self._execution_device)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.LongTensor:
        """Token ids `(num_images, side, side)` of images in `[-1, 1]`: the VQ encoder runs once per input image."""
        return self.vqvae.encode(pixels.to(self.vqvae.dtype)).token_ids

    # ----------------------------------------------------------------------------------------------------------------
    # Step 4: the first step, shared by the samples of one image; the kept tokens as fixed context afterwards

    def denoise_images(
        self,
        latents: torch.LongTensor,
        *,
        rows_per_image: int,
        kept_context_mode: str = "fixed",
        schedule_region: torch.BoolTensor | None = None,
        **denoise_kwargs,
    ) -> torch.LongTensor:
        """`denoise` for `rows_per_image` consecutive rows per input image: their first step may be shared, and the
        tokens visible at the first step are seen as `kept_context_mode` says (`KEPT_CONTEXT_MODES`);
        `schedule_region`: the tokens the masking schedule counts where more than the masked ones
        (`ENATEditState.schedule_region`). The state of the run is an [`ENATEditState`] made here for this call."""
        edit_state = ENATEditState(
            rows_per_image=rows_per_image, kept_context_mode=kept_context_mode, schedule_region=schedule_region
        )
        return self.denoise(latents, edit_state=edit_state, **denoise_kwargs)


__all__ = ["KEPT_CONTEXT_MODES", "ENATEditingPipelineBase", "check_fraction", "image_batch_sizes", "map_rows"]
