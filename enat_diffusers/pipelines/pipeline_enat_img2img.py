"""Image-to-image with ENAT."""

from collections.abc import Callable

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring

from ..checks import check_strength
from .lora_enat import apply_call_lora_scale
from .pipeline_enat_editing import ENATEditingPipelineBase

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> import torch
        >>> from enat_diffusers import ENATImg2ImgPipeline, load_demo_pipeline

        >>> pipe = ENATImg2ImgPipeline.from_pipe(load_demo_pipeline("digits"))
        >>> image = PIL.Image.open("digit.png")  # any size: resized to the model's 16x16
        >>> varied = pipe(image=image, class_labels="three", strength=0.5, generator=torch.manual_seed(0)).images[0]
        ```
"""


class ENATImg2ImgPipeline(ENATEditingPipelineBase):
    r"""
    Image-to-image with ENAT: each image is tokenized, a share of its tokens is masked again at random, and the
    sampler finishes the run from that point of its masking schedule, conditioned on a class or a prompt. Serves both
    kinds of transformer (components of [`ENATPipeline`] or [`ENATText2ImagePipeline`]; `from_pipe(pipe)` works from
    either).

    `strength` has diffusers' meaning: of `num_inference_steps` steps `T`, the last `int(T * strength)` run. The run
    starts at step `T - int(T * strength)` of the masking schedule, with as many tokens masked as the schedule leaves
    after the step before (the scheduler's `add_noise`), so `strength=1.0` is generation from scratch (exactly what
    the generation pipeline gives for the same generator). A strength that leaves no step to run (`int(T * strength)
    == 0`) is refused, as in diffusers. With the cosine schedule and `T = 8`, `strength=0.5` masks `cos(pi/4)` = 71%
    of the tokens and runs 4 steps.

    Args: as [`ENATInpaintPipeline`].
    """

    _card_pipeline_tag = "image-to-image"
    _card_call = "images = pipe(image=image, class_labels=[0], strength=0.5).images"
    _card_tags = ("image-to-image",)

    def prepare_strength_latents(
        self,
        tokens: torch.LongTensor,
        *,
        strength: float,
        num_inference_steps: int,
        timesteps: torch.Tensor,
        generator=None,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """
        Starting tokens and the timesteps to run for `strength` (checked: at least one step runs): `tokens` with as
        many tokens masked at random as the masking schedule leaves before step `T - int(T * strength)`, and
        `timesteps` from that step on.
        """
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if start == 0:
            return torch.full_like(tokens, self.mask_token_id), timesteps
        return self.scheduler.add_noise(tokens, timesteps[start - 1], generator=generator), timesteps[start:]

    @torch.no_grad()
    @apply_call_lora_scale
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.5,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
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
        Redraws each image in part, as much as `strength` says.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Text transformer: one prompt per image or one for all (or `prompt_embeds` and the other embedding
                arguments, as for [`ENATText2ImagePipeline`]). Class-conditional transformer: class names, read as
                `class_labels` (a bare string names the condition in every ENAT pipeline).
            image (PIL image, numpy array, torch tensor, or a list of them):
                The images, in diffusers' conventions (arrays and tensors as floats in `[0, 1]`), of any size (resized to
                `pipe.image_size` square).
            strength (`float` in `(0, 1]`, defaults to 0.5):
                How much to redraw: `int(num_inference_steps * strength)` steps run, from the matching point of the
                masking schedule; at least one must (a smaller strength is refused). 1.0 ignores the image
                (generation).
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`, *optional*):
                Class-conditional transformer: one class per image or one for all (ids or names).
            num_images_per_prompt (`int`, defaults to 1):
                Samples per image (each re-masked at random).
            kept_context_mode (`str`, defaults to `"fixed"`):
                How later steps see the kept tokens (`KEPT_CONTEXT_MODES`). `"fixed"`: after the first step their
                keys/values at every block are computed once per image and guidance stream and reused by every later
                step and sample, so only the region is encoded (cheaper than generating the whole image).
                `"refreshed"`: generation's rule, their features projected again and their keys/values recomputed at
                every step for every sample (costs more). The two agree on the first two steps.
            height (`int`, *optional*), width (`int`, *optional*):
                Size of the results: only the model's resolution (`pipe.image_size`), the default. Inputs of any size
                are resized to it (images: antialiased bicubic; masks: area averaging, then binarized at 0.5).
            num_inference_steps, guidance_scale, guidance_schedule, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs, attention_kwargs:
                As for [`ENATPipeline`]. The guidance ramp and the callback's step index count from the start of the
                full schedule of `num_inference_steps`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: images (token ids for `output_type="latent"`), image by image,
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

        # 0. Defaults; check every argument (images and strength included) before any model runs
        num_inference_steps, guidance_scale = self.resolve_defaults(num_inference_steps, guidance_scale)
        self.check_output_size(height, width)
        conditions["prompt"], conditions["class_labels"] = self.prompt_as_class_labels(prompt, class_labels)
        num_images = len(self.check_image(image))
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
        strength = check_strength(strength, num_inference_steps)
        num_conditions = batch_size // num_images_per_prompt
        self.start_call(
            guidance_scale=guidance_scale, guidance_schedule=guidance_schedule, attention_kwargs=attention_kwargs
        )

        # 1. Condition of both guidance streams
        condition_kwargs = self.prepare_condition_kwargs(
            **conditions, num_images_per_prompt=num_images_per_prompt, device=device
        )

        # 2-3. The input images' tokens (encoded once per image), re-masked for `strength`, and the steps to run
        rows = self.row_sources(num_images, num_conditions, num_images_per_prompt).to(device)
        tokens = self.encode_image(self.preprocess_image(image, device=device))[rows]
        all_timesteps = self.prepare_timesteps(num_inference_steps, device=device)
        latents, timesteps = self.prepare_strength_latents(
            tokens,
            strength=strength,
            num_inference_steps=num_inference_steps,
            timesteps=all_timesteps,
            generator=generator,
        )

        # 4. Sampling loop from the matching point of the schedule; rows that start alike share the first step
        latents = self.denoise_images(
            latents,
            rows_per_image=num_images_per_prompt,
            kept_context_mode=kept_context_mode,
            condition_kwargs=condition_kwargs,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 5. Decode
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
