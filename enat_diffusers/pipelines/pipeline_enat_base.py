"""What every ENAT pipeline shares: input checks, the condition of both guidance streams (class labels or text),
guidance, the sampling loop with feature reuse, callbacks, interruption, decoding and saving.

A pipeline of this package subclasses [`ENATBasePipeline`]; its `__call__` is a short list of numbered steps, each a
call to one of the public methods below (`check_inputs`, `prepare_condition_kwargs`, `prepare_latents`,
`prepare_timesteps`, `denoise`, `decode_latents`). Editing pipelines add their own steps (encode the image, build the
token mask) around the same calls.
"""

import difflib
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import AmusedScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..hub import ENATHubMixin
from ..models.transformer_enat import ENATReuseState
from ..schedulers.guidance import (
    GUIDANCE_SCHEDULES,  # noqa: F401  (re-exported by enat_diffusers.pipelines)
    check_guidance_schedule,
    guidance_weight,
)
from ..schedulers.scheduling_enat import AMUSED_MASKING_SCHEDULES
from .lora_enat import ENATLoraLoaderMixin

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Release in which the deprecated call argument names (`num_images_per_class`) stop working.
DEPRECATED_NAMES_REMOVED_IN = "0.3.0"
# Upper bound on the images of one call (conditions x images per condition), checked before anything is allocated:
# beyond it a call would allocate tens of GB at once. Larger sets: several calls, or examples/sample_at_scale.py.
MAX_IMAGES_PER_CALL = 4096

# Transformer keyword arguments of a text condition, in the order the guidance streams are stacked.
TEXT_CONDITION_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "pooled_text_embeds")

# How much of the removed text the truncation warning shows.
TRUNCATION_ECHO_TOKENS = 20
TRUNCATION_ECHO_CHARS = 100
TRUNCATION_ECHO_PROMPTS = 3

# Written next to model_index.json so that diffusers' custom-pipeline loading can find the class.
_CUSTOM_PIPELINE_TEMPLATE = '''"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="{module}", trust_remote_code=True)` find
{class_name} without importing enat_diffusers first (the package must be installed: pip install enat-diffusers)."""

from {defining_module} import {class_name}  # noqa: F401
'''

_CARD_USAGE = """
import torch
import enat_diffusers  # registers the ENAT classes with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
{call}
"""


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
        # Only the start of what was removed: a prompt can be megabytes long.
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1 : max_length - 1 + TRUNCATION_ECHO_TOKENS])
        logger.warning(
            f"prompts were truncated to {max_length} tokens; the removed text starts with: "
            f"{[text[:TRUNCATION_ECHO_CHARS] for text in removed[:TRUNCATION_ECHO_PROMPTS]]}"
        )
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


def mark_remasked_stale(
    reuse_state: ENATReuseState, latents: torch.LongTensor, mask: torch.BoolTensor, mask_token_id: int
) -> ENATReuseState:
    """
    The reuse state for the next step after a scheduler step that may have masked visible tokens again (remasking):
    their features are stale, so they count as masked in `reuse_state.masking`; when a later step reveals them, the
    transformer encodes them as critical tokens. `latents` are the step's input ids, `mask` its output mask, both
    `(batch_size, ...)`; the state may hold both guidance streams (`2 * batch_size` rows, the same tokens). Without
    remasking the state is unchanged.
    """
    remasked = (mask & (latents != mask_token_id)).reshape(latents.shape[0], -1)
    streams = reuse_state.masking.shape[0] // remasked.shape[0]
    remasked = remasked.repeat(streams, 1).to(reuse_state.masking.device)
    return ENATReuseState(features=reuse_state.features, masking=reuse_state.masking | remasked)


class ENATPromptEmbeds(NamedTuple):
    """
    What [`~ENATBasePipeline.encode_prompt`] returns: the six embedding arguments of a text pipeline's `__call__`,
    by name. Works as a tuple and with `**`: `pipe(**pipe.encode_prompt("a cat"))` equals `pipe("a cat")`.
    Masks are bool (True: attend); `pooled_*` are None for a transformer without `pooled_text_embed_dim`, and the
    `negative_*` fields are None when guidance was off.
    """

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_attention_mask: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None

    def keys(self) -> tuple[str, ...]:
        return self._fields

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


def is_integer(value) -> bool:
    """Python, numpy and 0-dim torch integers count; bools do not (`True` is not a number of images)."""
    if isinstance(value, torch.Tensor):
        return (
            value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        )
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real_number(value) -> bool:
    """Python, numpy and 0-dim torch real numbers count; bools do not."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_id2label(id2label: dict | None) -> dict[str, int]:
    """Class name -> class id from `id2label` (ids as ints or json strings, comma-separated synonyms per class). A
    name listed for two classes is refused: it could only ever mean one of them."""
    labels: dict[str, int] = {}
    for class_id, names in (id2label or {}).items():
        for name in str(names).split(","):
            name = name.strip()
            if not name:
                continue
            if name in labels and labels[name] != int(class_id):
                raise ValueError(
                    f"`id2label` lists the name {name!r} for classes {labels[name]} and {int(class_id)}; every name "
                    "must belong to one class"
                )
            labels[name] = int(class_id)
    return labels


class ENATBasePipeline(ENATLoraLoaderMixin, ENATHubMixin, DiffusionPipeline):
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
    _callback_tensor_inputs = ["latents"]
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
            parse_id2label(config["id2label"])  # refuses ambiguous names at construction and load time
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self._guidance_scale = default_guidance_scale
        self._guidance_schedule = "linear"
        self._num_timesteps = 0
        self._interrupt = False

    # ----------------------------------------------------------------------------------------------------------------
    # State of the current call (diffusers' property names)

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
    def labels(self) -> dict[str, int]:
        """Class name (every synonym of `id2label`) -> class id; empty without `id2label`."""
        return parse_id2label(self.config.get("id2label"))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Maps class names (any synonym listed in `id2label`) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        labels = self.labels
        if not labels:
            raise ValueError("this pipeline has no `id2label` class names; pass class ids instead of names")
        unknown = [name for name in names if name not in labels]
        if unknown:
            hints = {name: difflib.get_close_matches(name, list(labels), n=5, cutoff=0.5) for name in unknown}
            hint_text = "; ".join(f"{name!r}: close matches {matches or 'none'}" for name, matches in hints.items())
            raise ValueError(f"unknown class name(s) in `class_labels`: {hint_text}")
        return [labels[name] for name in names]

    def class_label_ids(self, class_labels: int | str | list[int | str] | torch.Tensor) -> list[int]:
        """`class_labels` (an id, a name, a list of them or an integer tensor) as a checked list of class ids."""
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise TypeError(f"a `class_labels` tensor must hold integer class ids, got {class_labels.dtype}")
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, str) or is_integer(class_labels):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or not class_labels:
            raise TypeError("`class_labels` must be a class id, a class name, or a non-empty list of them")
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif is_integer(label):
                ids.append(int(label))
            else:
                raise TypeError(f"`class_labels` entries must be ints or class names, got {type(label).__name__}")
        num_classes = self.transformer.config.num_classes
        out_of_range = [label for label in ids if not 0 <= label < num_classes]
        if out_of_range:
            raise ValueError(f"`class_labels` must be class ids in [0, {num_classes - 1}], got {out_of_range}")
        return ids

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
        Checks every call argument before any model runs. Returns the number of images (`batch_size`): conditions
        (class labels or prompts) times `num_images_per_prompt`.
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
        if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        batch_size = self._condition_batch_size(class_labels, prompt, prompt_embeds) * int(num_images_per_prompt)
        if batch_size > MAX_IMAGES_PER_CALL:
            raise ValueError(
                f"this call asks for {batch_size} images (conditions x `num_images_per_prompt`); one call makes at "
                f"most {MAX_IMAGES_PER_CALL}: split the work into several calls (or use examples/sample_at_scale.py)"
            )
        num_tokens = self.token_grid_size**2
        if not is_integer(num_inference_steps) or not 1 <= num_inference_steps <= num_tokens:
            raise ValueError(
                f"`num_inference_steps` must be an integer in [1, {num_tokens}], got {num_inference_steps!r}"
            )
        if not is_real_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0 (guidance is on above 1), got {guidance_scale!r}"
            )
        check_guidance_schedule(guidance_schedule)
        self._check_generator(generator, batch_size)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
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
        self.check_scheduler()
        return batch_size

    def check_scheduler(self) -> None:
        """diffusers' `AmusedScheduler` knows fewer masking schedules than `ENATScheduler` (the ones its `__init__`
        declares); a config converted from ours may name another one, which it would only refuse at the first step."""
        if not isinstance(self.scheduler, AmusedScheduler):
            return
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
            raise ValueError(
                f"this pipeline's transformer is class-conditional: pass `class_labels`, not {', '.join(given)}"
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
        config = self.transformer.config
        if class_labels is not None:
            raise ValueError("this pipeline's transformer is text-conditioned: pass `prompt`, not `class_labels`")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError("`prompt` must be a string or a non-empty list of strings")
            num_prompts = len(prompts)
            if not self._has_text_encoder:
                raise ValueError(
                    "this pipeline has no text encoder and tokenizer: pass `prompt_embeds` (e.g. from a pipeline "
                    "that has them: `encode_prompt`) instead of `prompt`"
                )
        else:
            expected = f"(batch_size >= 1, text_length, {config.text_embed_dim})"
            if (
                not isinstance(prompt_embeds, torch.Tensor)
                or prompt_embeds.ndim != 3
                or prompt_embeds.shape[0] < 1
                or prompt_embeds.shape[2] != config.text_embed_dim
            ):
                shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else prompt_embeds
                raise ValueError(f"`prompt_embeds` must be a tensor of shape {expected}, got {shape}")
            num_prompts = prompt_embeds.shape[0]
            self._check_embeds_companions("", prompt_embeds, prompt_attention_mask, pooled_prompt_embeds)
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
            reference = prompt_embeds
            expected_shape = (num_prompts, "text_length", config.text_embed_dim)
            if (
                not isinstance(negative_prompt_embeds, torch.Tensor)
                or negative_prompt_embeds.ndim != 3
                or negative_prompt_embeds.shape[0] != num_prompts
                or negative_prompt_embeds.shape[2] != config.text_embed_dim
                or (reference is not None and negative_prompt_embeds.shape != reference.shape)
            ):
                shape = (
                    tuple(negative_prompt_embeds.shape)
                    if isinstance(negative_prompt_embeds, torch.Tensor)
                    else negative_prompt_embeds
                )
                wanted = tuple(reference.shape) if reference is not None else expected_shape
                raise ValueError(
                    f"`negative_prompt_embeds` must have the shape of `prompt_embeds` {wanted}, got {shape}"
                )
            self._check_embeds_companions(
                "negative_", negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds
            )

    def _check_embeds_companions(self, prefix: str, embeds, attention_mask, pooled) -> None:
        batch_size, length = embeds.shape[:2]
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch_size, length)
        ):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"`{prefix}prompt_attention_mask` must have shape {(batch_size, length)}, got {shape}")
        pooled_dim = self.transformer.config.pooled_text_embed_dim
        if pooled_dim is None:
            if pooled is not None:
                raise ValueError(
                    f"`{prefix}pooled_prompt_embeds` was given, but this transformer takes no pooled text embedding"
                )
            return
        if pooled is None:
            raise ValueError(
                f"this transformer needs `{prefix}pooled_prompt_embeds` of shape {(batch_size, pooled_dim)} with "
                f"`{prefix}prompt_embeds`"
            )
        if pooled is not None and (
            not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (batch_size, pooled_dim)
        ):
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else pooled
            raise ValueError(f"`{prefix}pooled_prompt_embeds` must have shape {(batch_size, pooled_dim)}, got {shape}")

    @staticmethod
    def _check_generator(generator, batch_size: int) -> None:
        if generator is None or isinstance(generator, torch.Generator):
            return
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(
                    f"`generator` is a list of {len(generator)} generators, but {batch_size} images are requested; "
                    "pass one generator per image"
                )
            strangers = sorted({type(g).__name__ for g in generator if not isinstance(g, torch.Generator)})
            if strangers:
                raise TypeError(f"a `generator` list may only hold torch.Generator objects, got {strangers}")
            return
        raise TypeError(
            f"`generator` must be a torch.Generator, a list of them (one per image) or None, got "
            f"{type(generator).__name__}"
        )

    def check_latents(self, latents: torch.LongTensor, batch_size: int) -> None:
        """Checks starting token ids `(batch_size, side, side)` (mask token id = to generate)."""
        side = self.token_grid_size
        if not isinstance(latents, torch.Tensor) or latents.dtype not in (torch.int32, torch.int64):
            raise TypeError("`latents` must be an integer torch.Tensor of token ids")
        if tuple(latents.shape) != (batch_size, side, side):
            raise ValueError(f"`latents` must have shape {(batch_size, side, side)}, got {tuple(latents.shape)}")
        if latents.min() < 0 or latents.max() > self.mask_token_id:
            raise ValueError(
                f"`latents` must hold token ids in [0, {self.mask_token_id}] ({self.mask_token_id} = masked), "
                f"got values in [{latents.min().item()}, {latents.max().item()}]"
            )

    def _warn_deprecated_argument(self, old: str, new: str) -> None:
        warnings.warn(
            f"`{old}` is deprecated and will be removed in enat-diffusers {DEPRECATED_NAMES_REMOVED_IN}; use `{new}`",
            FutureWarning,
            stacklevel=3,
        )

    def start_call(self, *, guidance_scale: float, guidance_schedule: str) -> None:
        """Records the checked guidance settings for this call and clears a previous interruption."""
        self._guidance_scale = float(guidance_scale)
        self._guidance_schedule = guidance_schedule
        self._interrupt = False

    # ----------------------------------------------------------------------------------------------------------------
    # Step 1: the condition of both guidance streams

    @property
    def _has_text_encoder(self) -> bool:
        return getattr(self, "text_encoder", None) is not None and getattr(self, "tokenizer", None) is not None

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

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> ENATPromptEmbeds:
        """
        Encodes `prompt` (or takes `prompt_embeds`) and, for guidance, `negative_prompt` (the empty prompt by default;
        or takes `negative_prompt_embeds`). Each row is repeated `num_images_per_prompt` times. Without
        `negative_prompt_embeds`, guidance needs the pipeline's text encoder for the empty prompt.

        Returns:
            [`ENATPromptEmbeds`]: the six embedding arguments of `__call__` (no autograd history), so that
            `pipe(**pipe.encode_prompt(prompt))` reproduces `pipe(prompt)` exactly.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self._encode_text(prompts, device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if not self._has_text_encoder:
                raise ValueError(
                    "guidance (guidance_scale > 1) needs the unconditional stream: pass `negative_prompt_embeds` (with "
                    "`negative_prompt_attention_mask` and `negative_pooled_prompt_embeds` where used), or load the "
                    "pipeline with its text encoder and tokenizer, or set guidance_scale=1"
                )
            negative_prompt = "" if negative_prompt is None else negative_prompt
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * prompt_embeds.shape[0]
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds = self._encode_text(
                list(negative_prompt), device
            )
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = negative_pooled_prompt_embeds = None

        def prepare(tensor: torch.Tensor | None, is_mask: bool = False) -> torch.Tensor | None:
            if tensor is None:
                return None
            tensor = tensor.detach().to(device)
            if is_mask:
                tensor = tensor.bool()
            return tensor.repeat_interleave(int(num_images_per_prompt), dim=0)

        return ENATPromptEmbeds(
            prompt_embeds=prepare(prompt_embeds),
            prompt_attention_mask=prepare(prompt_attention_mask, is_mask=True),
            pooled_prompt_embeds=prepare(pooled_prompt_embeds),
            negative_prompt_embeds=prepare(negative_prompt_embeds),
            negative_prompt_attention_mask=prepare(negative_prompt_attention_mask, is_mask=True),
            negative_pooled_prompt_embeds=prepare(negative_pooled_prompt_embeds),
        )

    def _encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self._has_text_encoder:
            raise ValueError("this pipeline has no text encoder and tokenizer: pass `prompt_embeds` instead of text")
        encoded = encode_text(self.text_encoder, self.tokenizer, prompts, device)
        pooled = encoded["pooled_text_embeds"] if self.transformer.config.pooled_text_embed_dim else None
        return encoded["encoder_hidden_states"], encoded["encoder_attention_mask"], pooled

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

    # ----------------------------------------------------------------------------------------------------------------
    # Step 4: the sampling loop

    def guidance_weight(self, step_index: int, num_inference_steps: int) -> float:
        """`s_k - 1` at step `step_index` of `num_inference_steps`: the weight `w` of `cond + w * (cond - uncond)`,
        which equals `uncond + s_k * (cond - uncond)`. Computed in this form so that the guided logits equal the
        reference sampler's bit for bit."""
        return guidance_weight(self._guidance_schedule, self._guidance_scale, step_index, num_inference_steps)

    def scheduler_region_kwargs(self, latents: torch.LongTensor, *, late_start: bool) -> dict:
        """The region arguments of `scheduler.step` for a run from `latents` (schedulers without them get none): the
        tokens the run generates (masked at its start), and for a run that starts later in the schedule
        (image-to-image, after `add_noise`) the whole grid's schedule, which `add_noise` masked by."""
        parameters = inspect.signature(self.scheduler.step).parameters
        if "region_mask" not in parameters:
            return {}
        return {"region_mask": latents == self.mask_token_id, "starting_mask_ratio": 1.0 if late_start else None}

    def transformer_forward(self, model_input: torch.LongTensor, *, condition_kwargs: dict, reuse_state=None):
        """One transformer call of the sampling loop (both guidance streams stacked). A seam for pipelines that
        compute some steps differently (editing shares the first step between the samples of one image)."""
        return self.transformer(model_input, **condition_kwargs, reuse_state=reuse_state)

    def denoise(
        self,
        latents: torch.LongTensor,
        *,
        condition_kwargs: dict[str, torch.Tensor | None],
        timesteps: torch.Tensor,
        num_inference_steps: int | None = None,
        generator=None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> torch.LongTensor:
        """
        Runs the sampling loop over `timesteps` from `latents` and returns token ids without mask ids.

        `condition_kwargs` come from `prepare_condition_kwargs`. `num_inference_steps` is the length of the full
        schedule that `timesteps` ends (default: `len(timesteps)`): the guidance ramp and the step index passed to
        the callback count from its start, so a run that starts later in the schedule (image-to-image) continues the
        ramp. After `pipe._interrupt = True` (from `callback_on_step_end`) the loop stops and the result is the last
        step's `pred_original_sample`: every masked token filled by that step's sample. The flag is read after each
        step, and every call starts uninterrupted, so at least one step runs; with no timesteps at all the result is
        `latents` as given.
        """
        num_inference_steps = len(timesteps) if num_inference_steps is None else int(num_inference_steps)
        first_index = num_inference_steps - len(timesteps)
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self._num_timesteps = len(timesteps)
        reuse_state = None
        step_region = self.scheduler_region_kwargs(latents, late_start=first_index > 0)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for offset, timestep in enumerate(timesteps):
                step_index = first_index + offset
                guided = self.do_classifier_free_guidance
                model_input = torch.cat([latents, latents]) if guided else latents
                output = self.transformer_forward(
                    model_input, condition_kwargs=condition_kwargs, reuse_state=reuse_state
                )
                # The condition is the same at every step: later steps take the blocks' form of it from step 0.
                condition_kwargs = {"conditioning": output.conditioning}
                logits = output.logits
                if guided:
                    conditional, unconditional = logits.chunk(2)
                    logits = conditional + self.guidance_weight(step_index, num_inference_steps) * (
                        conditional - unconditional
                    )
                if not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"the transformer's logits hold NaN or infinite values at step {step_index}: the weights may "
                        "hold NaN/inf, or the model overflows in float16 (try bfloat16 or float32)"
                    )
                step_output = self.scheduler.step(logits, timestep, latents, generator=generator, **step_region)
                # Only a scheduler that reports the tokens it revealed keeps visible tokens fixed, which reuse needs.
                reuse_state = output.reuse_state if getattr(step_output, "critical_tokens", None) is not None else None
                if reuse_state is not None:
                    reuse_state = mark_remasked_stale(reuse_state, latents, step_output.mask, self.mask_token_id)
                latents = step_output.prev_sample
                prediction = step_output.pred_original_sample
                if callback_on_step_end is not None:
                    local_values = {"latents": latents}
                    callback_kwargs = {name: local_values[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                    if not isinstance(callback_outputs, dict):
                        raise TypeError(
                            "`callback_on_step_end` must return a dict (empty, or replacing tensors named in "
                            f"`callback_on_step_end_tensor_inputs`), got {type(callback_outputs).__name__}"
                        )
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
                if self.interrupt:
                    return prediction
        return latents

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
