"""Text-to-image generation with ENAT."""

from collections.abc import Callable

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import logging, replace_example_docstring
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.transformer_enat import ENATTransformer2DModel
from ..models.vq_maskgit import MaskGITVQModel
from .sampling_enat import ENATSamplingMixin

logger = logging.get_logger(__name__)

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

TEXT_CONDITION_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "pooled_text_embeds")


def encode_text(
    text_encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor | None]:
    """
    Encodes prompts into the text conditioning of an `ENATTransformer2DModel`, the same way for training and
    sampling: padded to the tokenizer's `model_max_length`, truncated (with a warning) beyond it.

    Returns:
        `dict` with `encoder_hidden_states` `(B, T, C)`, `encoder_attention_mask` `(B, T)` (bool) and
        `pooled_text_embeds` `(B, C')`: the encoder's `text_embeds` or `pooler_output`, or None if it has neither.
    """
    device = device or text_encoder.device
    max_length = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > max_length:
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1 : -1])
        logger.warning(f"prompts were truncated to {max_length} tokens; removed: {removed}")
    attention_mask = tokens.attention_mask.to(device)
    output = text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)
    pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        pooled = getattr(output, "pooler_output", None)
    return {
        "encoder_hidden_states": output.last_hidden_state,
        "encoder_attention_mask": attention_mask.bool(),
        "pooled_text_embeds": pooled,
    }


class ENATText2ImagePipeline(ENATSamplingMixin, DiffusionPipeline):
    r"""
    Text-to-image generation with a text-conditioned ENAT transformer and a MaskGIT VQ tokenizer. The unconditional
    guidance stream uses the encoding of `negative_prompt`, the empty prompt by default.

    Args:
        text_encoder ([`~transformers.PreTrainedModel`]): Any transformers text encoder (CLIP by default) whose hidden
            width is the transformer's `text_embed_dim`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Its tokenizer.
        transformer ([`ENATTransformer2DModel`]): A text-conditioned ENAT transformer.
        vqvae ([`MaskGITVQModel`]): Turns token ids into images.
        scheduler ([`SchedulerMixin`]): An [`ENATScheduler`] or diffusers' `AmusedScheduler`.
        default_num_inference_steps (`int`, defaults to 8): Used when `__call__` gets no `num_inference_steps`.
        default_guidance_scale (`float`, defaults to 2.5): Used when `__call__` gets no `guidance_scale`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    custom_pipeline_module = "pipeline_enat_text2img"
    _card_pipeline_tag = "text-to-image"
    _card_call = 'image = pipe("a photo of a red bus", generator=torch.manual_seed(0)).images[0]'
    _card_tags = ("text-to-image",)

    def __init__(
        self,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        transformer: ENATTransformer2DModel,
        vqvae: MaskGITVQModel,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 8,
        default_guidance_scale: float = 2.5,
    ):
        super().__init__()
        self.register_modules(
            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vqvae=vqvae, scheduler=scheduler
        )
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps, default_guidance_scale=default_guidance_scale
        )
        self._init_sampling_state()

    def encode_prompt(
        self, prompt: str | list[str], device: torch.device | None = None, num_images_per_prompt: int = 1
    ) -> dict[str, torch.Tensor | None]:
        """The transformer's text conditioning for `prompt`, repeated `num_images_per_prompt` times per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        conditioning = encode_text(self.text_encoder, self.tokenizer, prompts, device or self._execution_device)
        return _repeat_rows(conditioning, num_images_per_prompt)

    def _check_prompt_inputs(
        self, prompt, negative_prompt, prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None
    ) -> int:
        """Validates the prompt arguments and returns the number of prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError("`prompt` must be a string or a non-empty list of strings")
            num_prompts = len(prompts)
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise ValueError("`prompt_embeds` must be a (batch_size, text_length, text_embed_dim) tensor")
            num_prompts = prompt_embeds.shape[0]
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {num_prompts} prompts")
        if (
            negative_prompt_embeds is not None
            and prompt_embeds is not None
            and negative_prompt_embeds.shape != prompt_embeds.shape
        ):
            raise ValueError(
                f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)} must have the shape of "
                f"`prompt_embeds` {tuple(prompt_embeds.shape)}"
            )
        return num_prompts

    def _embeds_conditioning(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pooled: torch.Tensor | None,
        num_images_per_prompt: int,
    ) -> dict[str, torch.Tensor | None]:
        device = self._execution_device
        conditioning = {
            "encoder_hidden_states": embeds.to(device),
            "encoder_attention_mask": None if attention_mask is None else attention_mask.to(device).bool(),
            "pooled_text_embeds": None if pooled is None else pooled.to(device),
        }
        return _repeat_rows(conditioning, num_images_per_prompt)

    @torch.no_grad()
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
                Precomputed text hidden states (e.g. from `encode_prompt`), with `prompt_attention_mask`
                `(batch_size, text_length)` and `pooled_prompt_embeds` `(batch_size, pooled_dim)` where the model
                uses a pooled embedding.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed unconditional hidden states, shaped like `prompt_embeds`, with
                `negative_prompt_attention_mask` and `negative_pooled_prompt_embeds`.
            num_images_per_prompt (`int`, defaults to 1):
                Images generated for each prompt.
            num_inference_steps (`int`, *optional*):
                Sampling steps, in `[1, number of tokens]`; defaults to the pipeline config.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance weight `w` in `cond + w * (cond - uncond)`; 0 disables guidance.
            guidance_schedule (`str`, defaults to `"linear"`):
                `"linear"` ramps the weight from 0 at the first step (as ENAT's sampler); `"constant"` keeps it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image: image `i` then only depends on generator `i`.
            latents (`torch.LongTensor` of shape `(batch_size, side, side)`, *optional*):
                Starting token ids (mask token id for tokens to generate); fully masked by default.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` images, or `"latent"` for the token ids.
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)` after every step.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Tensors passed to the callback; only `"latents"`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: generated images (token ids for `output_type="latent"`).
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_inference_steps, guidance_scale = self._resolve_defaults(num_inference_steps, guidance_scale)
        num_prompts = self._check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt}")
        batch_size = num_prompts * num_images_per_prompt
        self._check_sampling_inputs(
            batch_size,
            num_inference_steps,
            guidance_scale,
            guidance_schedule,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        if prompt_embeds is None:
            conditioning = self.encode_prompt(prompt, num_images_per_prompt=num_images_per_prompt)
        else:
            conditioning = self._embeds_conditioning(
                prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, num_images_per_prompt
            )
        if self.do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt = negative_prompt if negative_prompt is not None else ""
                negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt
                unconditional = self.encode_prompt(negatives, num_images_per_prompt=num_images_per_prompt)
            else:
                unconditional = self._embeds_conditioning(
                    negative_prompt_embeds,
                    negative_prompt_attention_mask,
                    negative_pooled_prompt_embeds,
                    num_images_per_prompt,
                )
            conditioning = _stack_streams(conditioning, unconditional)
        dtype = self.transformer.dtype
        conditioning = {
            k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in conditioning.items()
        }
        latents = self._sample(
            batch_size,
            conditioning,
            num_inference_steps,
            guidance_schedule,
            generator,
            latents,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        return self._decode(latents, output_type, return_dict)


def _repeat_rows(conditioning: dict[str, torch.Tensor | None], repeats: int) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else v.repeat_interleave(repeats, dim=0) for k, v in conditioning.items()}


def _stack_streams(
    conditional: dict[str, torch.Tensor | None], unconditional: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor | None]:
    """Batches both guidance streams as `[conditional; unconditional]`; a missing mask means "attend to all"."""
    stacked = {}
    for key in TEXT_CONDITION_KEYS:
        first, second = conditional[key], unconditional[key]
        if key == "encoder_attention_mask" and (first is None) != (second is None):
            first = first if first is not None else torch.ones_like(second)
            second = second if second is not None else torch.ones_like(first)
        if (first is None) != (second is None):
            raise ValueError(f"`{key}` is given for only one of the guidance streams")
        if first is not None and first.shape[1:] != second.shape[1:]:
            raise ValueError(
                f"the conditional and unconditional `{key}` differ in shape: {tuple(first.shape)} vs "
                f"{tuple(second.shape)}"
            )
        stacked[key] = None if first is None else torch.cat([first, second])
    return stacked
