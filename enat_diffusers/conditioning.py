"""The condition of an ENAT run, in one place: class names to class ids ([`ENATClassNames`]) and prompts to text
embeddings ([`encode_text`], and the pipelines' `encode_prompt` from [`ENATPromptEncodingMixin`]).

Training scripts use the same functions: `ENATClassNames(id2label).ids(["seven", 3])` resolves class labels the way
the pipelines do (the ambiguity check included), and `encode_text` encodes prompts the way sampling does.
"""

import difflib
import functools
from typing import NamedTuple

import torch
from diffusers.utils import logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checks import check_class_label_range, is_integer

logger = logging.get_logger(__name__)

# Transformer keyword arguments of a text condition, in the order the guidance streams are stacked.
TEXT_CONDITION_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "pooled_text_embeds")

# How much of the removed text the truncation warning shows.
TRUNCATION_ECHO_TOKENS = 20
TRUNCATION_ECHO_CHARS = 100
TRUNCATION_ECHO_PROMPTS = 3


# ------------------------------------------------------------------------------------------------------------------
# Class names


class ENATClassNames:
    """
    The class names of a class-conditional model, from its `id2label` (ids as ints or json strings, comma-separated
    synonyms per class), and the one way class labels are resolved to class ids.

    A name listed for two classes is refused when the table is built: it could only ever mean one of them. Names
    match exactly or, when that finds nothing, case-insensitively (`"Golden Retriever"` finds `"golden retriever"`),
    unless the case-insensitive match is ambiguous.
    """

    def __init__(self, id2label: dict | None, num_classes: int | None = None):
        self.num_classes = num_classes
        self.mapping: dict[str, int] = {}
        for class_id, names in (id2label or {}).items():
            try:
                class_id = int(class_id)
            except (TypeError, ValueError):
                raise ValueError(f"`id2label` keys must be class ids, got {class_id!r}") from None
            if num_classes is not None and not 0 <= class_id < num_classes:
                raise ValueError(
                    f"`id2label` names class {class_id}, but the model has {num_classes} classes (ids 0 to "
                    f"{num_classes - 1})"
                )
            for name in str(names).split(","):
                name = name.strip()
                if not name:
                    continue
                if name in self.mapping and self.mapping[name] != class_id:
                    raise ValueError(
                        f"`id2label` lists the name {name!r} for classes {self.mapping[name]} and {class_id}; every "
                        "name must belong to one class"
                    )
                self.mapping[name] = class_id
        self._folded: dict[str, set[int]] = {}
        for name, class_id in self.mapping.items():
            self._folded.setdefault(name.casefold(), set()).add(class_id)

    def __bool__(self) -> bool:
        return bool(self.mapping)

    def lookup(self, name: str) -> int | None:
        """The class id of `name` (exact, else case-insensitive when unambiguous), or None if unknown; a name whose
        case-insensitive matches name several classes is an error."""
        if name in self.mapping:
            return self.mapping[name]
        matches = self._folded.get(name.casefold().strip(), set())
        if len(matches) > 1:
            spelled = sorted(n for n in self.mapping if n.casefold() == name.casefold().strip())
            raise ValueError(
                f"the class name {name!r} matches {spelled} (classes {sorted(matches)}) when case is ignored; "
                "spell it exactly"
            )
        return next(iter(matches)) if matches else None

    def ids(self, class_labels) -> list[int]:
        """`class_labels` (an id, a name, a list of them, or an integer tensor) as a checked list of class ids."""
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise TypeError(f"a `class_labels` tensor must hold integer class ids, got {class_labels.dtype}")
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, str) or is_integer(class_labels):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or not class_labels:
            raise TypeError("`class_labels` must be a class id, a class name, or a non-empty list of them")
        ids, unknown = [], []
        for label in class_labels:
            if isinstance(label, str):
                class_id = self.lookup(label)
                if class_id is None:
                    unknown.append(label)
                else:
                    ids.append(class_id)
            elif is_integer(label):
                ids.append(int(label))
            else:
                raise TypeError(f"`class_labels` entries must be ints or class names, got {type(label).__name__}")
        if unknown:
            if not self.mapping:
                raise ValueError("this pipeline has no `id2label` class names; pass class ids instead of names")
            hints = {
                name: difflib.get_close_matches(name.casefold(), list(self._folded), n=5, cutoff=0.5)
                for name in unknown
            }
            hint_text = "; ".join(f"{name!r}: close matches {matches or 'none'}" for name, matches in hints.items())
            raise ValueError(f"unknown class name(s) in `class_labels`: {hint_text}")
        if self.num_classes is not None:
            check_class_label_range(min(ids), max(ids), self.num_classes, null_allowed=False)
        return ids


def parse_id2label(id2label: dict | None) -> dict[str, int]:
    """Class name -> class id from `id2label` (kept name; see [`ENATClassNames`], which also resolves labels)."""
    return ENATClassNames(id2label).mapping


# ------------------------------------------------------------------------------------------------------------------
# Text


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


class ENATPromptEmbeds(NamedTuple):
    """
    What [`~ENATPromptEncodingMixin.encode_prompt`] returns: the six embedding arguments of a text pipeline's
    `__call__`, by name. Works as a tuple and with `**`: `pipe(**pipe.encode_prompt("a cat"))` equals `pipe("a cat")`.
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


def _as_prompt_embeds(encode):
    """`encode_prompt` returns its six tensors as a plain tuple (the form diffusers' tooling reads from the source);
    callers get them as an [`ENATPromptEmbeds`]."""

    @functools.wraps(encode)
    def wrapper(*args, **kwargs) -> ENATPromptEmbeds:
        return ENATPromptEmbeds(*encode(*args, **kwargs))

    return wrapper


def _repeat_rows(tensor: torch.Tensor | None, device, repeat: int, is_mask: bool = False) -> torch.Tensor | None:
    """`tensor` without autograd history, on `device` (masks as bool), each row repeated `repeat` times."""
    if tensor is None:
        return None
    tensor = tensor.detach().to(device)
    if is_mask:
        tensor = tensor.bool()
    return tensor.repeat_interleave(repeat, dim=0)


class ENATPromptEncodingMixin:
    """`encode_prompt` for the pipelines that take prompts. It needs only the text encoder and tokenizer (no
    transformer), so embeddings can be computed by a pipeline loaded with just those."""

    @property
    def _has_text_encoder(self) -> bool:
        return getattr(self, "text_encoder", None) is not None and getattr(self, "tokenizer", None) is not None

    @torch.no_grad()
    @_as_prompt_embeds
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
            if prompt is None:
                raise ValueError("pass `prompt` (a string or a list of strings) or `prompt_embeds` to `encode_prompt`")
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

        # One statement per name: diffusers' tooling reads the names of the returned tuple from this source.
        repeat = int(num_images_per_prompt)
        prompt_embeds = _repeat_rows(prompt_embeds, device, repeat)
        prompt_attention_mask = _repeat_rows(prompt_attention_mask, device, repeat, is_mask=True)
        pooled_prompt_embeds = _repeat_rows(pooled_prompt_embeds, device, repeat)
        negative_prompt_embeds = _repeat_rows(negative_prompt_embeds, device, repeat)
        negative_prompt_attention_mask = _repeat_rows(negative_prompt_attention_mask, device, repeat, is_mask=True)
        negative_pooled_prompt_embeds = _repeat_rows(negative_pooled_prompt_embeds, device, repeat)
        return (
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
        )

    def _encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self._has_text_encoder:
            raise ValueError("this pipeline has no text encoder and tokenizer: pass `prompt_embeds` instead of text")
        encoded = encode_text(self.text_encoder, self.tokenizer, prompts, device)
        # Without a transformer (a pipeline loaded for its text encoder only) the encoder's pooled embedding is kept.
        transformer = getattr(self, "transformer", None)
        uses_pooled = transformer is None or transformer.config.pooled_text_embed_dim is not None
        pooled = encoded["pooled_text_embeds"] if uses_pooled else None
        return encoded["encoder_hidden_states"], encoded["encoder_attention_mask"], pooled


__all__ = [
    "ENATClassNames",
    "ENATPromptEmbeds",
    "ENATPromptEncodingMixin",
    "TEXT_CONDITION_KEYS",
    "encode_text",
    "parse_id2label",
]
