"""Class-conditional image generation with ENAT."""

from collections.abc import Callable

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring

from ..models.transformer_enat import ENATTransformer2DModel
from ..models.vq_maskgit import MaskGITVQModel
from .lora_enat import apply_call_lora_scale
from .pipeline_enat_base import ENATBasePipeline

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import enat_diffusers  # registers the ENAT classes with diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/enat-l-256")
        >>> image = pipe(class_labels=["golden retriever"], generator=torch.manual_seed(0)).images[0]
        ```
"""


class ENATPipeline(ENATBasePipeline):
    r"""
    Class-conditional image generation with an ENAT transformer and a MaskGIT VQ tokenizer.

    Args:
        transformer ([`ENATTransformer2DModel`]): Predicts the tokens of the image grid.
        vqvae ([`MaskGITVQModel`]): Turns token ids into images.
        scheduler ([`SchedulerMixin`]): An [`ENATScheduler`] (with feature reuse) or diffusers' `AmusedScheduler`
            (every visible token is recomputed at every step).
        id2label (`dict[int, str]`, *optional*): Class names, comma-separated synonyms per class, for
            `get_label_ids` and for passing names as `class_labels` (keys may be strings, as json stores them). A name
            listed for two classes is refused.
        default_num_inference_steps (`int`, defaults to 8): Used when `__call__` gets no `num_inference_steps`.
        default_guidance_scale (`float`, defaults to 3.5): Used when `__call__` gets no `guidance_scale`
            (diffusers' meaning; the reference's `cfg` is `guidance_scale - 1`).
    """

    _card_pipeline_tag = "unconditional-image-generation"
    _card_call = "images = pipe(class_labels=[0, 1], generator=torch.manual_seed(0)).images"
    _card_tags = ("class-conditional",)

    def __init__(
        self,
        transformer: ENATTransformer2DModel,
        vqvae: MaskGITVQModel,
        scheduler: SchedulerMixin,
        id2label: dict | None = None,
        default_num_inference_steps: int = 8,
        default_guidance_scale: float = 3.5,
    ):
        super().__init__(
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            id2label=id2label,
        )
        self.register_modules(transformer=transformer, vqvae=vqvae, scheduler=scheduler)

    @torch.no_grad()
    @apply_call_lora_scale
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "linear",
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.LongTensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict | None = None,
        num_images_per_class: int | None = None,
        prompt: str | list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images of the given classes.

        Args:
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`):
                Class ids in `[0, num_classes)` or class names known to `id2label`.
            num_inference_steps (`int`, *optional*):
                Sampling steps, in `[1, number of tokens]`; defaults to the pipeline config (8 for ENAT).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale `s` in `uncond + s * (cond - uncond)`, as in diffusers: guidance is on
                when `s > 1`. The paper's / reference code's `cfg` is `s - 1`. Defaults to the pipeline config (3.5 at
                256 px, 4.5 at 512 px for the converted reference models, i.e. the reference's `cfg` 2.5 / 3.5).
            guidance_schedule (`str` or `GuidanceSchedule`, defaults to `"linear"`):
                `"linear"` ramps the scale from 1 (unguided) at the first step: `s_k = 1 + (s - 1) * k / T` at step
                `k` of `T`, as the reference sampler; `"constant"` uses `s` at every step; `"power-cosine"` and
                `"interval"` are in `enat_diffusers.schedulers.guidance`.
            num_images_per_prompt (`int`, defaults to 1):
                Images generated for each entry of `class_labels`. At most 4096 images per call in all.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image: image `i` then only depends on generator `i`.
            latents (`torch.LongTensor` of shape `(batch_size, side, side)`, *optional*):
                Starting token ids (mask token id for tokens to generate); fully masked by default.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` images, or `"latent"` for the token ids.
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)` after every step; it
                returns a dict, empty or with replaced tensors named in `callback_on_step_end_tensor_inputs`. Setting
                `pipe._interrupt = True` there stops sampling after that step; the result is then that step's
                `pred_original_sample` (every masked token filled by its sample), in any `output_type`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Tensors passed to the callback: `"latents"` (the tokens after the step, which the callback may
                replace) and `"pred_original_sample"` (the step's prediction: every masked token filled by its
                sample; decode it with `pipe.decode_latents` to show the run's progress).
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}`: the LoRA scale of this call, as in diffusers' pipelines (the loaded LoRA layers of
                the transformer and text encoder are scaled by `s` during the call; a fused LoRA is not).
            num_images_per_class (`int`, *optional*):
                Deprecated name of `num_images_per_prompt` (removed in 0.3.0).
            prompt (`str` or `list[str]`, *optional*):
                Class names, read as `class_labels` (what a bare string means in every ENAT pipeline), for callers
                that pass `prompt=` (e.g. through `AutoPipelineForText2Image`); a text that names no class is refused
                with the names this pipeline knows.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: generated images (token ids for `output_type="latent"`).
        """
        if num_images_per_class is not None:
            self._warn_deprecated_argument("num_images_per_class", "num_images_per_prompt")
            num_images_per_prompt = num_images_per_class
        callback_on_step_end_tensor_inputs = self.callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device

        # 0. Defaults from the pipeline config; check every argument before any model runs
        num_inference_steps, guidance_scale = self.resolve_defaults(num_inference_steps, guidance_scale)
        prompt, class_labels = self.prompt_as_class_labels(prompt, class_labels)
        batch_size = self.check_inputs(
            class_labels=class_labels,
            prompt=prompt,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            generator=generator,
            latents=latents,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.start_call(
            guidance_scale=guidance_scale, guidance_schedule=guidance_schedule, attention_kwargs=attention_kwargs
        )

        # 1. Condition: class labels, then null labels for the unconditional stream when guided
        condition_kwargs = self.prepare_condition_kwargs(
            class_labels=class_labels, num_images_per_prompt=num_images_per_prompt, device=device
        )

        # 2. Starting tokens
        latents = self.prepare_latents(batch_size, latents=latents, device=device)

        # 3. Timesteps
        timesteps = self.prepare_timesteps(num_inference_steps, device=device)

        # 4. Sampling loop
        latents = self.denoise(
            latents,
            condition_kwargs=condition_kwargs,
            timesteps=timesteps,
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
