"""Key bookkeeping shared by the checkpoint converters: nothing is dropped or renamed silently."""

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the target model: lists every missing, unexpected or misshaped key."""


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None],
    target_shapes: Mapping[str, torch.Size],
    dropped_prefixes: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Rename every key of `state_dict` for a model whose parameters have `target_shapes`.

    `rename` maps a source key to a target key, or returns `None` for a key it does not know. Keys under one of
    `dropped_prefixes` are discarded on purpose. Unknown source keys, target keys left without a value, and shape
    mismatches are collected and raised together as a `CheckpointMismatchError`.
    """
    dropped_prefixes = tuple(dropped_prefixes)
    converted: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if dropped_prefixes and key.startswith(dropped_prefixes):
            continue
        new_key = rename(key)
        if new_key is None or new_key not in target_shapes:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(target_shapes[new_key]):
            mismatched.append(f"{key} -> {new_key}: {tuple(value.shape)} vs {tuple(target_shapes[new_key])}")
            continue
        converted[new_key] = value
    missing = sorted(set(target_shapes) - set(converted) - {m.split(" -> ")[1].split(":")[0] for m in mismatched})
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(sorted(unexpected)))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise CheckpointMismatchError("The checkpoint does not fit the model.\n" + "\n".join(problems))
    return converted


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return the tensors of a reference checkpoint, which may wrap them under a `"state_dict"` key."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"`checkpoint` must be a mapping of parameter names to tensors, got {type(checkpoint).__name__}."
        )
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    not_tensors = sorted(str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise TypeError(
            "`checkpoint` must map parameter names to tensors (optionally under a 'state_dict' key); these entries "
            f"are not tensors: {', '.join(not_tensors)}"
        )
    return dict(checkpoint)


def load_reference_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the tensors of a reference checkpoint (e.g. `vqgan_jax_strongaug.ckpt`) on CPU.

    Uses `torch.load(weights_only=True)`, so arbitrary pickled objects are refused rather than executed; tensors
    wrapped under a `"state_dict"` key are unwrapped.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises UnpicklingError / RuntimeError for files it refuses to load safely
        raise ValueError(
            f"Could not load {os.fspath(path)!r} with torch.load(weights_only=True); only checkpoints made of "
            f"tensors and plain containers are accepted: {error}"
        ) from error
    return unwrap_state_dict(checkpoint)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"fp32"`, `"fp16"`, `"bf16"` or a floating `torch.dtype` -> that `torch.dtype`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}.")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be one of {sorted(DTYPES)} or a floating torch.dtype, got {dtype!r}.")
    return dtype


def save_converted(converted, output_dir: str | os.PathLike, push_to_hub: str | None = None) -> None:
    """Saves a converted model or pipeline as safetensors and optionally pushes it to the Hub repo `push_to_hub`."""
    converted.save_pretrained(output_dir, safe_serialization=True)
    print(f"saved to {output_dir}")
    if push_to_hub:
        converted.push_to_hub(push_to_hub)
        print(f"pushed to https://huggingface.co/{push_to_hub}")
