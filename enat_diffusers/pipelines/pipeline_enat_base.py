"""What every ENAT pipeline shares: the call's defaults and input checks, the condition of both guidance streams
(class labels or text), decoding and saving. The sampling loop is [`~enat_diffusers.sampling.ENATSamplingMixin`],
prompt encoding [`~enat_diffusers.conditioning.ENATPromptEncodingMixin`] and the argument rules
`enat_diffusers.checks`.

A pipeline of this package subclasses [`ENATBasePipeline`]; its `__call__` is a short list of numbered steps, each a
call to one of the public methods below (`check_inputs`, `prepare_condition_kwargs`, `prepare_latents`,
`prepare_timesteps`, `denoise`, `decode_latents`). Editing pipelines add their own steps (encode the image, build the
token mask) around the same calls.
"""

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AmusedScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import logging

# Names that lived here before their modules existed, kept importable from here.
from ..checks import (  # noqa: E402, F401
    MAX_IMAGES_PER_CALL,
    check_choice,
    check_generator,
    check_guidance_scale,
    check_images_per_call,
    check_num_inference_steps,
    check_positive_integer,
    check_text_companions,
    check_text_embeds,
    check_token_id_range,
    check_token_id_tensor,
    is_integer,
    is_real_number,
)
from ..conditioning import TEXT_CONDITION_KEYS, ENATClassNames, ENATPromptEmbeds, encode_text, parse_id2label  # noqa: E402, F401
from ..demo import resolve_pretrained_location
from ..hub import ENATHubMixin
from ..models.transformer_enat import ENATTransformer2DModel
from ..models.vq_maskgit import MaskGITVQModel
from ..sampling import CALLBACK_TENSOR_INPUTS, ENATSamplingMixin
from ..schedulers.guidance import (  # GUIDANCE_SCHEDULES: re-exported by enat_diffusers.pipelines
    GUIDANCE_SCHEDULES,  # noqa: F401
    check_guidance_schedule,
)
from ..schedulers.scheduling_enat import AMUSED_MASKING_SCHEDULES
from .lora_enat import ENATLoraLoaderMixin

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Release in which the deprecated call argument names (`num_images_per_class`) stop working.
DEPRECATED_NAMES_REMOVED_IN = "0.3.0"
# Written next to model_index.json so that diffusers' custom-pipeline loading can find the class.
_CUSTOM_PIPELINE_TEMPLATE = '''"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="{module}", trust_remote_code=True)` find
{class_name} without importing enat_diffusers first (enat-diffusers must be installed, from its git repository: pip install -e .)."""

from {defining_module} import {class_name}  # noqa: F401
'''

_CARD_USAGE = """
import torch
import enat_diffusers  # registers the ENAT classes with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
{call}
"""


class ENATBasePipeline(ENATSamplingMixin, ENATLoraLoaderMixin, ENATHubMixin, DiffusionPipeline):
    r"""
    Base of the ENAT pipelines. Serves both kinds of `ENATTransformer2DModel`: class-conditional (`class_labels`,
    ids or names from `id2label`) and text-conditioned (`prompt` / `prompt_embeds` with an optional text encoder and
    tokenizer).

    Classifier-free guidance has diffusers' meaning: the logits are `uncond + s_k * (cond - uncond)`, on when
    `guidance_scale > 1`. With `guidance_schedule="linear"` (the reference's) the scale at step `k` of `T` is
    `s_k = 1 + (guidance_scale - 1) * k / T`, so the first step is unguided; `"constant"` uses `s_k =
    guidance_scale`; `enat_diffusers.schedulers.guidance` has the others (`GUIDANCE_SCHEDULES`). The ENAT paper's
    and reference code's `cfg` is `guidance_scale - 1` (its `cond + w * (cond - uncond)`, `w = cfg * k / T`):
    `guidance_scale=3.5` is the reference's `cfg=2.5`. Both streams run as one batch of `2 * batch_size` rows, each
    row keeping its own reuse state.

    Writing a pipeline on this base (checked when the class is defined):

    - `__init__` calls `super().__init__(default_num_inference_steps=..., default_guidance_scale=..., **config)`
      first (the defaults and any other config entries, e.g. `id2label`, are registered there), then
      `self.register_modules(...)`. It takes `default_num_inference_steps` and `default_guidance_scale` parameters,
      so that saved folders restore them.
    - Set `_card_call` (the example call of the Hub model card) and `_card_pipeline_tag`.
    - Add the class to `enat_diffusers.pipelines.ENAT_PIPELINES`, the one list that registration with diffusers uses.
    - To be found by diffusers' `AutoPipelineFor...`, add it to `AUTO_PIPELINE_FAMILIES` in
      `enat_diffusers._diffusers_registry`.

    An intermediate base class that is not a pipeline of its own sets `_abstract = True` (then these checks skip it).

    The module written next to `model_index.json` for diffusers' custom-pipeline loading is named after the module
    that defines the class (`pipeline_enat.py` for `ENATPipeline`).
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _callback_tensor_inputs = CALLBACK_TENSOR_INPUTS
    _card_call: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls) or cls.__dict__.get("_abstract", False):
            return
        missing = [name for name in ("_card_call", "_card_pipeline_tag") if getattr(cls, name, None) is None]
        parameters = inspect.signature(cls.__init__).parameters
        missing += [
            name for name in ("default_num_inference_steps", "default_guidance_scale") if name not in parameters
        ]
        if missing:
            raise TypeError(f"{cls.__name__} must define {missing} (see the ENATBasePipeline docstring)")

    def __init__(self, *, default_num_inference_steps: int, default_guidance_scale: float, **config):
        super().__init__()
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            **config,
        )
        if "id2label" in config:
            ENATClassNames(config["id2label"])  # refuses ambiguous names at construction and load time
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self._guidance_scale = default_guidance_scale
        self._guidance_schedule = "linear"
        self._num_timesteps = 0
        self._interrupt = False
        self._attention_kwargs = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, where `demo:NAME` also names a packaged demo pipeline
        (`ENATPipeline.from_pretrained("demo:digits")`). diffusers' own `DiffusionPipeline.from_pretrained` has no
        public hook for it: there, use `enat_diffusers.load_demo_pipeline(NAME)`."""
        return super().from_pretrained(resolve_pretrained_location(pretrained_model_name_or_path), **kwargs)

    def register_modules(self, **kwargs):
        """diffusers' `register_modules`, refusing components of the wrong kind (a `model_index.json` naming another
        class loads it without complaint) and an `id2label` that names classes the transformer does not have."""
        expected = {"transformer": ENATTransformer2DModel, "vqvae": MaskGITVQModel}
        for name, value in kwargs.items():
            kind = expected.get(name)
            if value is None or kind is None:
                continue
            module = getattr(value, "_orig_mod", value)  # torch.compile wraps the module
            # A diffusers model of another class is a wrong folder; plain torch wrappers (profilers, benchmarks) pass.
            if isinstance(module, ModelMixin) and not isinstance(module, kind):
                raise TypeError(
                    f"{type(self).__name__} needs `{name}` to be a {kind.__name__}, got {type(module).__name__}; "
                    f"check the `{name}` entry of model_index.json"
                )
        super().register_modules(**kwargs)
        transformer = kwargs.get("transformer")
        if transformer is not None and self.config.get("id2label") is not None:
            if transformer.is_class_conditional:
                ENATClassNames(self.config["id2label"], transformer.config.num_classes)
            elif self.config["id2label"]:
                raise ValueError("`id2label` names classes, but this pipeline's transformer is text-conditioned")

    # ----------------------------------------------------------------------------------------------------------------
    # State of the current call (diffusers' property names)

    @property
    def attention_kwargs(self) -> dict | None:
        """The current call's `attention_kwargs` (its LoRA scale, applied around the call by
        `apply_call_lora_scale`)."""
        return self._attention_kwargs

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def token_grid_size(self) -> int:
        return self.transformer.config.sample_size

    @property
    def mask_token_id(self) -> int:
        return self.scheduler.config.mask_token_id

    @property
    def is_class_conditional(self) -> bool:
        return self.transformer.is_class_conditional

    # ----------------------------------------------------------------------------------------------------------------
    # Class names

    @property
    def class_names(self) -> ENATClassNames:
        """The class names of `id2label` and the one resolution of class labels to ids ([`ENATClassNames`])."""
        transformer = getattr(self, "transformer", None)
        num_classes = transformer.config.num_classes if transformer is not None else None
        return ENATClassNames(self.config.get("id2label"), num_classes)

    @property
    def labels(self) -> dict[str, int]:
        """Class name (every synonym of `id2label`) -> class id; empty without `id2label` (diffusers' DiT name)."""
        return self.class_names.mapping

    def get_label_ids(self, label: int | str | list[int | str] | torch.Tensor) -> list[int]:
        """Class labels (ids, or names: any synonym of `id2label`, case-insensitive when unambiguous) as a checked
        list of class ids (diffusers' DiT name; `class_label_ids` is the same method)."""
        return self.class_names.ids(label)

    class_label_ids = get_label_ids

    def prompt_as_class_labels(self, prompt, class_labels) -> tuple:
        """
        The one meaning of a bare string across the ENAT pipelines: it names the condition. A class-conditional
        pipeline reads `prompt` (a string or a list of strings, given without `class_labels`) as class names, as
        `ENATPipeline("seven")` does; a name that is not a class is refused, saying what to pass. Returns the
        `(prompt, class_labels)` to check.
        """
        if not self.is_class_conditional or prompt is None or class_labels is not None:
            return prompt, class_labels
        names = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
            return prompt, class_labels  # `check_inputs` refuses it
        class_names = self.class_names
        unknown = [name for name in names if class_names.lookup(name) is None]
        if unknown:
            known = sorted(class_names.mapping)[:10] or "none: this pipeline has no `id2label`"
            largest = self.transformer.config.num_classes - 1
            raise ValueError(
                f"this pipeline's transformer is class-conditional: a prompt is read as class names, and {unknown} "
                f"names no class (known names: {known}); pass `class_labels` (class ids in [0, {largest}] or names)"
            )
        return None, prompt

    # ----------------------------------------------------------------------------------------------------------------
    # Step 0: defaults and checks

    def resolve_defaults(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """`num_inference_steps` and `guidance_scale`, from the pipeline config where not given."""
        steps = self.config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        return steps, scale

    def _condition_batch_size(self, class_labels, prompt, prompt_embeds) -> int:
        """Number of conditions (class labels or prompts) of a call whose condition arguments are valid."""
        if self.is_class_conditional:
            return len(self.class_label_ids(class_labels))
        if prompt is not None:
            return 1 if isinstance(prompt, str) else len(prompt)
        return prompt_embeds.shape[0]

    def check_inputs(
        self,
        *,
        class_labels=None,
        prompt=None,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_schedule: str = "linear",
        generator=None,
        latents: torch.LongTensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> int:
        """
        Checks every call argument before any model runs (the rules live in `enat_diffusers.checks`). Returns the
        number of images (`batch_size`): conditions (class labels or prompts) times `num_images_per_prompt`.
        """
        if self.is_class_conditional:
            self._check_class_inputs(class_labels, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        else:
            self._check_text_inputs(
                class_labels,
                prompt,
                negative_prompt,
                prompt_embeds,
                prompt_attention_mask,
                pooled_prompt_embeds,
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                negative_pooled_prompt_embeds,
            )
        num_images_per_prompt = check_positive_integer(num_images_per_prompt, "num_images_per_prompt")
        batch_size = self._condition_batch_size(class_labels, prompt, prompt_embeds) * num_images_per_prompt
        check_images_per_call(batch_size)
        check_num_inference_steps(num_inference_steps, self.token_grid_size**2)
        check_guidance_scale(guidance_scale)
        check_guidance_schedule(guidance_schedule)
        check_generator(generator, batch_size)
        check_choice(output_type, OUTPUT_TYPES, "output_type")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                "`callback_on_step_end` must be callable as `callback(pipe, step_index, timestep, callback_kwargs)` "
                f"and return a dict, got {type(callback_on_step_end).__name__}"
            )
        unknown = [
            name for name in callback_on_step_end_tensor_inputs or [] if name not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}"
            )
        if latents is not None:
            self.check_latents(latents, batch_size)
        self.check_scheduler(generator)
        return batch_size

    def check_scheduler(self, generator=None) -> None:
        """diffusers' `AmusedScheduler` knows fewer masking schedules than `ENATScheduler` (the ones its `__init__`
        declares); a config converted from ours may name another one, which it would only refuse at the first step.
        It also draws with one generator: a list would fail inside its `step`, after the transformer ran."""
        if not isinstance(self.scheduler, AmusedScheduler):
            return
        if isinstance(generator, (list, tuple)):
            raise ValueError(
                "`generator` is a list, but AmusedScheduler draws with one torch.Generator: pass a single generator, "
                "or use ENATScheduler (ENATScheduler.from_config(pipe.scheduler.config)) for one generator per image"
            )
        supported = AMUSED_MASKING_SCHEDULES
        schedule = self.scheduler.config.masking_schedule
        if supported and schedule not in supported:
            raise ValueError(
                f"AmusedScheduler has no {schedule!r} masking schedule (it knows {', '.join(map(repr, supported))}): "
                f"swap with AmusedScheduler.from_config(pipe.scheduler.config, masking_schedule={supported[0]!r}), or "
                f"use ENATScheduler for {schedule!r}"
            )

    def _check_class_inputs(self, class_labels, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        text_arguments = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
        }
        given = [name for name, value in text_arguments.items() if value is not None]
        if given:
            hint = f" (a class name goes there too: `class_labels={prompt!r}`)" if isinstance(prompt, str) else ""
            raise ValueError(
                f"this pipeline's transformer is class-conditional: pass `class_labels`, not {', '.join(given)}{hint}"
            )
        if class_labels is None:
            raise ValueError("`class_labels` is required: class ids or names")
        self.class_label_ids(class_labels)

    def _check_text_inputs(
        self,
        class_labels,
        prompt,
        negative_prompt,
        prompt_embeds,
        prompt_attention_mask,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        negative_pooled_prompt_embeds,
    ) -> None:
        width = self.transformer.config.text_embed_dim
        pooled_width = self.transformer.config.pooled_text_embed_dim
        if not hasattr(self, "encode_prompt"):
            raise ValueError(
                f"{type(self).__name__} is for class-conditional transformers, and this one is text-conditioned: use "
                "ENATText2ImagePipeline.from_pipe(pipe) (or an editing pipeline) and pass `prompt`"
            )
        if class_labels is not None:
            raise ValueError("this pipeline's transformer is text-conditioned: pass `prompt`, not `class_labels`")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError("`prompt` must be a string or a non-empty list of strings")
            num_prompts = len(prompts)
            if not getattr(self, "_has_text_encoder", False):
                raise ValueError(
                    "this pipeline has no text encoder and tokenizer: pass `prompt_embeds` (e.g. from a pipeline "
                    "that has them: `encode_prompt`) instead of `prompt`"
                )
        else:
            check_text_embeds("prompt_embeds", prompt_embeds, width=width)
            num_prompts = prompt_embeds.shape[0]
            check_text_companions("", prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, pooled_width)
        if negative_prompt is not None:
            if not (
                isinstance(negative_prompt, str)
                or (isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt))
            ):
                raise TypeError(
                    f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}"
                )
            if negative_prompt_embeds is not None:
                raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
            if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {num_prompts} prompts")
        if negative_prompt_embeds is not None:
            check_text_embeds(
                "negative_prompt_embeds",
                negative_prompt_embeds,
                width=width,
                batch_size=num_prompts,
                like=prompt_embeds,
            )
            check_text_companions(
                "negative_",
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                negative_pooled_prompt_embeds,
                pooled_width,
            )

    def check_latents(self, latents: torch.LongTensor, batch_size: int) -> None:
        """Checks starting token ids `(batch_size, side, side)` (mask token id = to generate)."""
        side = self.token_grid_size
        check_token_id_tensor(latents, "latents")
        if tuple(latents.shape) != (batch_size, side, side):
            raise ValueError(f"`latents` must have shape {(batch_size, side, side)}, got {tuple(latents.shape)}")
        check_token_id_range(int(latents.min()), int(latents.max()), self.mask_token_id, "latents")

    def _warn_deprecated_argument(self, old: str, new: str) -> None:
        warnings.warn(
            f"`{old}` is deprecated and will be removed in enat-diffusers {DEPRECATED_NAMES_REMOVED_IN}; use `{new}`",
            FutureWarning,
            stacklevel=3,
        )

    def start_call(
        self, *, guidance_scale: float, guidance_schedule: str, attention_kwargs: dict | None = None
    ) -> None:
        """Records the checked guidance settings and `attention_kwargs` for this call (diffusers' per-call
        properties) and clears a previous interruption."""
        self._guidance_scale = float(guidance_scale)
        self._guidance_schedule = guidance_schedule
        self._attention_kwargs = attention_kwargs
        self._interrupt = False

    # ----------------------------------------------------------------------------------------------------------------
    # Step 1: the condition of both guidance streams

    def prepare_class_labels(
        self,
        class_labels,
        *,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        device: torch.device | None = None,
    ) -> torch.LongTensor:
        """Class ids, each repeated `num_images_per_prompt` times, followed by as many null labels when guided."""
        ids = [label for label in self.class_label_ids(class_labels) for _ in range(int(num_images_per_prompt))]
        labels = torch.tensor(ids, dtype=torch.long, device=device or self._execution_device)
        if do_classifier_free_guidance:
            labels = torch.cat([labels, torch.full_like(labels, self.transformer.null_class_label)])
        return labels

    def prepare_condition_kwargs(
        self,
        *,
        class_labels=None,
        prompt=None,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """
        The transformer's condition keyword arguments for this call, for the kind of transformer this pipeline has:
        `class_labels` for a class-conditional one, `encoder_hidden_states` / `encoder_attention_mask` /
        `pooled_text_embeds` for a text one. Rows are the `batch_size` images (each condition repeated
        `num_images_per_prompt` times), followed by their unconditional rows when guidance is on
        (`do_classifier_free_guidance`, set by `start_call`).
        """
        device = device or self._execution_device
        guided = self.do_classifier_free_guidance
        if self.is_class_conditional:
            labels = self.prepare_class_labels(
                class_labels, num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=guided,
                device=device,
            )  # fmt: skip
            return {"class_labels": labels}
        embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            do_classifier_free_guidance=guided,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
        )
        streams = [(embeds.prompt_embeds, embeds.prompt_attention_mask, embeds.pooled_prompt_embeds)]
        if guided:
            streams.append(
                (
                    embeds.negative_prompt_embeds,
                    embeds.negative_prompt_attention_mask,
                    embeds.negative_pooled_prompt_embeds,
                )
            )
        dtype = self.transformer.dtype
        condition = {}
        for index, key in enumerate(TEXT_CONDITION_KEYS):
            parts = [stream[index] for stream in streams]
            if key == "encoder_attention_mask" and any(part is not None for part in parts):
                # A missing mask means "attend to every token".
                parts = [
                    part if part is not None else torch.ones(stream[0].shape[:2], dtype=torch.bool, device=device)
                    for part, stream in zip(parts, streams, strict=True)
                ]
            if any(part is None for part in parts):
                if not all(part is None for part in parts):
                    name = {"pooled_text_embeds": "negative_pooled_prompt_embeds"}.get(key, key)
                    raise ValueError(f"`{name}` is needed: the other guidance stream has it")
                condition[key] = None
                continue
            stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
            condition[key] = stacked.to(dtype) if stacked.is_floating_point() else stacked
        return condition

    # ----------------------------------------------------------------------------------------------------------------
    # Steps 2 and 3: latents and timesteps

    def prepare_latents(
        self, batch_size: int, *, latents: torch.LongTensor | None = None, device: torch.device | None = None
    ) -> torch.LongTensor:
        """Starting token ids `(batch_size, side, side)`: the given `latents`, or a fully masked grid."""
        device = device or self._execution_device
        if latents is None:
            side = self.token_grid_size
            return torch.full((batch_size, side, side), self.mask_token_id, dtype=torch.long, device=device)
        return latents.to(device=device, dtype=torch.long)

    def prepare_timesteps(self, num_inference_steps: int, *, device: torch.device | None = None) -> torch.Tensor:
        self.scheduler.set_timesteps(int(num_inference_steps), device=device or self._execution_device)
        return self.scheduler.timesteps

    # Step 4, the sampling loop (`denoise`), is `ENATSamplingMixin`'s.

    # ----------------------------------------------------------------------------------------------------------------
    # Step 5: decoding

    @torch.no_grad()
    def decode_latents(self, latents: torch.LongTensor, output_type: str = "pil"):
        """Token ids -> images of `output_type` (`"latent"` returns the token ids)."""
        if output_type == "latent":
            return latents
        images = self.vqvae.decode(latents).sample
        return self.image_processor.postprocess(images.float(), output_type=output_type)

    @staticmethod
    def callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs) -> list[str]:
        """The tensors to pass to the callback: a diffusers `PipelineCallback` names its own."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return callback_on_step_end_tensor_inputs or ["latents"]

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and model cards

    @classmethod
    def custom_pipeline_module(cls) -> str:
        """Name of the module written next to `model_index.json`: the module that defines the class."""
        return cls.__module__.rsplit(".", 1)[-1]

    def _card_usage(self, repo_id: str) -> str:
        return _CARD_USAGE.format(repo_id=repo_id, call=self._card_call)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """`DiffusionPipeline.save_pretrained`, plus a one-line module that lets diffusers' custom-pipeline loading
        find this class without importing enat_diffusers first."""
        # Written first so that `push_to_hub=True` uploads it too.
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        module = self.custom_pipeline_module()
        (Path(save_directory) / f"{module}.py").write_text(
            _CUSTOM_PIPELINE_TEMPLATE.format(
                module=module, class_name=type(self).__name__, defining_module=type(self).__module__
            )
        )
        super().save_pretrained(save_directory, *args, **kwargs)
