"""Text-to-image generation with ENAT."""

from collections.abc import Callable

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..conditioning import ENATPromptEncodingMixin, encode_text
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

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/enat-b-coco")
        >>> image = pipe("a red double-decker bus on a city street", generator=torch.manual_seed(0)).images[0]
        ```
"""

__all__ = ["ENATText2ImagePipeline", "encode_text"]


class ENATText2ImagePipeline(ENATPromptEncodingMixin, ENATBasePipeline):
    r"""
    Text-to-image generation with a text-conditioned ENAT transformer and a MaskGIT VQ tokenizer. The unconditional
    guidance stream uses the encoding of `negative_prompt`, the empty prompt by default.

    Args:
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): Any transformers text encoder (CLIP by default)
            whose hidden width is the transformer's `text_embed_dim`. Optional with `tokenizer`: without them the
            pipeline samples from precomputed `prompt_embeds` (e.g. `encode_prompt` of a pipeline that has them).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): Its tokenizer.
        transformer ([`ENATTransformer2DModel`]): A text-conditioned ENAT transformer.
        vqvae ([`MaskGITVQModel`]): Turns token ids into images.
        scheduler ([`SchedulerMixin`]): An [`ENATScheduler`] or diffusers' `AmusedScheduler`.
        default_num_inference_steps (`int`, defaults to 8): Used when `__call__` gets no `num_inference_steps`.
        default_guidance_scale (`float`, defaults to 3.5): Used when `__call__` gets no `guidance_scale`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["text_encoder", "tokenizer"]
    _card_pipeline_tag = "text-to-image"
    _card_call = 'image = pipe("a photo of a red bus", generator=torch.manual_seed(0)).images[0]'
    _card_tags = ("text-to-image",)

    def __init__(
        self,
        text_encoder: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase | None,
        transformer: ENATTransformer2DModel,
        vqvae: MaskGITVQModel,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 8,
        default_guidance_scale: float = 3.5,
    ):
        super().__init__(
            default_num_inference_steps=default_num_inference_steps, default_guidance_scale=default_guidance_scale
        )
        self.register_modules(
            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vqvae=vqvae, scheduler=scheduler
        )

    @torch.no_grad()
    @apply_call_lora_scale
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "linear",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.LongTensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images from text.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Prompts; give either `prompt` or `prompt_embeds`. Prompts longer than the tokenizer takes are
                truncated with a warning.
            negative_prompt (`str` or `list[str]`, *optional*):
                Prompt of the unconditional guidance stream; the empty prompt by default.
            prompt_embeds (`torch.Tensor` of shape `(batch_size, text_length, text_embed_dim)`, *optional*):
                Precomputed text hidden states, with `prompt_attention_mask` `(batch_size, text_length)` (all ones if
                not given) and `pooled_prompt_embeds` `(batch_size, pooled_dim)` where the model uses a pooled
                embedding. `pipe(**pipe.encode_prompt(prompt))` equals `pipe(prompt)`. With guidance and without
                `negative_prompt_embeds`, the empty prompt is encoded for the unconditional stream (that needs the
                text encoder).
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed unconditional hidden states, shaped like `prompt_embeds`, with
                `negative_prompt_attention_mask` and `negative_pooled_prompt_embeds`.
            num_images_per_prompt (`int`, defaults to 1):
                Images generated for each prompt. At most 4096 images per call in all.
            num_inference_steps (`int`, *optional*):
                Sampling steps, in `[1, number of tokens]`; defaults to the pipeline config.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale `s` in `uncond + s * (cond - uncond)`, as in diffusers: guidance is on
                when `s > 1`. The paper's / reference code's `cfg` is `s - 1`. Defaults to the pipeline config.
            guidance_schedule (`str` or `GuidanceSchedule`, defaults to `"linear"`):
                `"linear"` ramps the scale from 1 at the first step, `s_k = 1 + (s - 1) * k / T` (as ENAT's sampler);
                `"constant"` keeps `s`; `"power-cosine"` and `"interval"` are in `enat_diffusers.schedulers.guidance`.
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
                returns a dict. `pipe._interrupt = True` there stops sampling after that step; the result is then that
                step's `pred_original_sample`, in any `output_type`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Tensors passed to the callback: `"latents"` (the tokens after the step, which the callback may
                replace) and `"pred_original_sample"` (the step's prediction: every masked token filled by its
                sample; decode it with `pipe.decode_latents` to show the run's progress).
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}`: the LoRA scale of this call, as in diffusers' pipelines (the loaded LoRA layers of
                the transformer and text encoder are scaled by `s` during the call; a fused LoRA is not).

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: generated images (token ids for `output_type="latent"`).
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device
        text_arguments = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "prompt_embeds": prompt_embeds,
            "prompt_attention_mask": prompt_attention_mask,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
        }

        # 0. Defaults from the pipeline config; check every argument before any model runs
        num_inference_steps, guidance_scale = self.resolve_defaults(num_inference_steps, guidance_scale)
        batch_size = self.check_inputs(
            **text_arguments,
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

        # 1. Condition: the prompts' encodings, then the negative prompts' for the unconditional stream when guided
        condition_kwargs = self.prepare_condition_kwargs(
            **text_arguments, num_images_per_prompt=num_images_per_prompt, device=device
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
