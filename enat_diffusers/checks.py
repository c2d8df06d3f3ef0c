"""Argument checks shared by the pipelines, the transformer, the scheduler and the app: each rule is written here once.

Every check raises one sentence that names the argument and says what is accepted, before any heavy work. Checks
that need the values of device tensors take host numbers (the caller fetches them with one device sync).
"""

import difflib
import math
import numbers
from collections.abc import Sequence

import torch

# Upper bound on the images of one call (conditions x images per condition), checked before anything is allocated:
# beyond it a call would allocate tens of GB at once. Larger sets: several calls, or examples/sample_at_scale.py.
MAX_IMAGES_PER_CALL = 4096


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


def shape_of(value) -> object:
    """What an error message shows for a value that should have been a tensor: its shape, else the value."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else value


def check_choice(value, choices: Sequence[str], name: str) -> str:
    """`value` if it is one of `choices`, else an error with the closest choice."""
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
        raise ValueError(
            f"`{name}` must be one of {list(choices)}, got {value!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
    return value


def check_positive_integer(value, name: str, *, maximum: int | None = None) -> int:
    """`value` as an int in `[1, maximum]`, or a clear error."""
    if not is_integer(value) or value < 1 or (maximum is not None and value > maximum):
        interval = "a positive integer" if maximum is None else f"an integer in [1, {maximum}]"
        raise ValueError(f"`{name}` must be {interval}, got {value!r}")
    return int(value)


def check_num_inference_steps(num_inference_steps, num_tokens: int | None = None) -> int:
    """The step count of a sampling run: at least 1 and, on a grid of `num_tokens` tokens, at most that many (every
    step reveals at least one token)."""
    return check_positive_integer(num_inference_steps, "num_inference_steps", maximum=num_tokens)


def check_fraction(value, name: str, *, closed_above: bool = True) -> float:
    """`value` as a float in `[0, 1]` (`[0, 1)` with `closed_above=False`), or a clear error."""
    interval = "[0, 1]" if closed_above else "[0, 1)"
    if (
        not is_real_number(value)
        or not math.isfinite(value)
        or value < 0
        or value > 1
        or (value == 1 and not closed_above)
    ):
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)


def check_non_negative_integer(value, name: str) -> int:
    """`value` as an int >= 0, or a clear error."""
    if not is_integer(value) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
    return int(value)


def check_strength(strength, num_inference_steps: int | None = None) -> float:
    """`strength` of an editing run, diffusers' meaning (of `num_inference_steps` steps, the last
    `int(num_inference_steps * strength)` run): a number in (0, 1] that leaves at least one step to run, or a clear
    error. `num_inference_steps` must already be checked; `None` (not known yet, e.g. a script's default) checks the
    range only."""
    if not is_real_number(strength) or not math.isfinite(strength) or not 0 < strength <= 1:
        raise ValueError(f"`strength` must be a number in (0, 1], got {strength!r}")
    if num_inference_steps is not None and int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"`strength` {float(strength):g} runs no step of `num_inference_steps` {num_inference_steps} "
            f"(int({num_inference_steps} * {float(strength):g}) is 0): pass a strength of at least "
            f"1/{num_inference_steps}, or more steps"
        )
    return float(strength)


def check_attention_kwargs(attention_kwargs) -> float:
    """`attention_kwargs` of a pipeline call: None or `{"scale": s}`, diffusers' per-call LoRA scale (a finite
    number). Returns the scale (1.0 when not given)."""
    if attention_kwargs is None:
        return 1.0
    if not isinstance(attention_kwargs, dict):
        raise TypeError(
            f"`attention_kwargs` must be a dict such as {{'scale': 0.5}}, got {type(attention_kwargs).__name__}"
        )
    unknown = sorted(set(attention_kwargs) - {"scale"})
    if unknown:
        raise ValueError(
            f"`attention_kwargs` takes only `scale` (the LoRA scale of this call) in ENAT pipelines, got {unknown}"
        )
    scale = attention_kwargs.get("scale", 1.0)
    if not is_real_number(scale) or not math.isfinite(scale):
        raise ValueError(f"`attention_kwargs['scale']` must be a finite number, got {scale!r}")
    return float(scale)


def check_guidance_scale(guidance_scale) -> float:
    if not is_real_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"`guidance_scale` must be a finite number >= 0 (guidance is on above 1), got {guidance_scale!r}"
        )
    return float(guidance_scale)


def check_generator(generator, batch_size: int, *, rows: str = "images") -> None:
    """`generator`: None, one `torch.Generator`, or a list/tuple of them with one per row of the batch (`rows` names
    what a row is in the message: images for a pipeline, batch rows for a scheduler)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {batch_size} {rows} are requested; pass "
                f"one generator per {rows.rstrip('s')}, a single torch.Generator, or None"
            )
        strangers = sorted({type(g).__name__ for g in generator if not isinstance(g, torch.Generator)})
        if strangers:
            raise TypeError(f"a `generator` list may only hold torch.Generator objects, got {strangers}")
        return
    raise TypeError(
        f"`generator` must be a torch.Generator, a list of them (one per {rows.rstrip('s')}) or None, got "
        f"{type(generator).__name__}"
    )


def check_images_per_call(batch_size: int) -> None:
    if batch_size > MAX_IMAGES_PER_CALL:
        raise ValueError(
            f"this call asks for {batch_size} images (conditions x `num_images_per_prompt`); one call makes at "
            f"most {MAX_IMAGES_PER_CALL}: split the work into several calls (or use examples/sample_at_scale.py)"
        )


# ------------------------------------------------------------------------------------------------------------------
# Class labels


def check_class_label_range(label_min: int, label_max: int, num_classes: int, *, null_allowed: bool) -> None:
    """Class ids in `[0, num_classes)`; with `null_allowed` (the transformer, which also gets the unconditional
    stream) the null class `num_classes` too."""
    upper = num_classes if null_allowed else num_classes - 1
    if label_min < 0 or label_max > upper:
        null = f", {num_classes} = null class" if null_allowed else ""
        raise ValueError(
            f"`class_labels` must lie in [0, {upper}] (class ids in [0, {num_classes - 1}]{null}), got values in "
            f"[{label_min}, {label_max}]"
        )


def check_class_label_tensor(class_labels, batch_size: int | None = None) -> None:
    """A `class_labels` tensor of integer ids (and `batch_size` of them, where given)."""
    if (
        not isinstance(class_labels, torch.Tensor)
        or class_labels.is_floating_point()
        or class_labels.dtype == torch.bool
    ):
        got = class_labels.dtype if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
        raise TypeError(f"`class_labels` must be an integer torch.Tensor of class ids, got {got}")
    if batch_size is not None and class_labels.numel() != batch_size:
        raise ValueError(f"`class_labels` must hold {batch_size} labels, got shape {tuple(class_labels.shape)}")


# ------------------------------------------------------------------------------------------------------------------
# Text embeddings


def check_text_embeds(
    name: str,
    embeds,
    *,
    width: int,
    batch_size: int | None = None,
    like: torch.Tensor | None = None,
    like_name: str = "prompt_embeds",
) -> None:
    """Text hidden states `(batch_size, text_length, width)`; `like`: the tensor (named `like_name`) whose shape they
    must have."""
    if embeds is None:
        raise ValueError(f"`{name}` of shape {(batch_size or 'batch_size', 'text_length', width)} is required")
    ok = (
        isinstance(embeds, torch.Tensor)
        and embeds.ndim == 3
        and embeds.shape[0] >= 1
        and embeds.shape[2] == width
        and (batch_size is None or embeds.shape[0] == batch_size)
        and (like is None or embeds.shape == like.shape)
    )
    if ok:
        return
    if like is not None:
        raise ValueError(f"`{name}` must have the shape of `{like_name}` {tuple(like.shape)}, got {shape_of(embeds)}")
    expected = (batch_size if batch_size is not None else "batch_size >= 1", "text_length", width)
    raise ValueError(f"`{name}` must have shape {expected}, got {shape_of(embeds)}".replace("'", ""))


def check_text_companions(
    prefix: str,
    embeds: torch.Tensor,
    attention_mask,
    pooled,
    pooled_width: int | None,
    *,
    names: tuple[str, str] = ("prompt_attention_mask", "pooled_prompt_embeds"),
) -> None:
    """The attention mask `(B, T)` and pooled embedding `(B, pooled_width)` that go with text hidden states `embeds`
    `(B, T, C)`; `names` are the arguments' names (after `prefix`: `"negative_"` for the unconditional stream)."""
    mask_name, pooled_name = (prefix + name for name in names)
    batch_size, length = embeds.shape[:2]
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch_size, length)
    ):
        raise ValueError(f"`{mask_name}` must have shape {(batch_size, length)}, got {shape_of(attention_mask)}")
    if pooled_width is None:
        if pooled is not None:
            raise ValueError(f"`{pooled_name}` was given, but this transformer takes no pooled text embedding")
        return
    if pooled is None:
        raise ValueError(f"this transformer needs `{pooled_name}` of shape {(batch_size, pooled_width)}")
    if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (batch_size, pooled_width):
        raise ValueError(f"`{pooled_name}` must have shape {(batch_size, pooled_width)}, got {shape_of(pooled)}")


# ------------------------------------------------------------------------------------------------------------------
# Token ids


def check_token_id_range(id_min: int, id_max: int, mask_token_id: int, name: str = "input_ids") -> None:
    if id_min < 0 or id_max > mask_token_id:
        raise ValueError(
            f"`{name}` must lie in [0, {mask_token_id}] (token ids in [0, {mask_token_id - 1}], {mask_token_id} = "
            f"masked), got values in [{id_min}, {id_max}]"
        )


def check_token_id_tensor(value, name: str = "input_ids") -> None:
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`{name}` must be an integer torch.Tensor of token ids")


__all__ = [
    "check_attention_kwargs",
    "MAX_IMAGES_PER_CALL",
    "check_choice",
    "check_class_label_range",
    "check_class_label_tensor",
    "check_fraction",
    "check_generator",
    "check_guidance_scale",
    "check_images_per_call",
    "check_non_negative_integer",
    "check_num_inference_steps",
    "check_positive_integer",
    "check_strength",
    "check_text_companions",
    "check_text_embeds",
    "check_token_id_range",
    "check_token_id_tensor",
    "is_integer",
    "is_real_number",
    "shape_of",
]
