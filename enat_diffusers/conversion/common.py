"""Key bookkeeping shared by the checkpoint converters: nothing is dropped or renamed silently."""

import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


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
    unexpected, mismatched, not_floating, not_finite = [], [], [], []
    for key, value in state_dict.items():
        if dropped_prefixes and key.startswith(dropped_prefixes):
            continue
        if not value.is_floating_point():
            not_floating.append(f"{key} ({value.dtype})")
            continue
        if not torch.isfinite(value).all():
            not_finite.append(key)
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
    if not_floating:
        problems.append(
            "weights that are not floating point (casting them would change them): " + ", ".join(not_floating)
        )
    if not_finite:
        problems.append("weights holding NaN or inf: " + ", ".join(not_finite))
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
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        # torch.load does not check the members' CRCs: a damaged archive would load damaged weights silently.
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"{os.fspath(path)!r} is a damaged zip archive: {error}") from None
        if damaged is not None:
            raise ValueError(f"{os.fspath(path)!r} is damaged: its member {damaged!r} fails its CRC check")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError for files it refuses to load safely
        raise ValueError(
            f"Could not load {os.fspath(path)!r} with torch.load(weights_only=True); only checkpoints made of "
            f"tensors and plain containers are accepted: {error}"
        ) from error
    return unwrap_state_dict(checkpoint)


def check_finite(module: torch.nn.Module, name: str) -> None:
    """Refuses a converted model with NaN or inf weights, e.g. values beyond float16's range after `--dtype fp16`."""
    bad = [
        key for key, value in module.state_dict().items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:
        raise ValueError(
            f"the converted {name} has NaN or inf weights ({', '.join(bad[:10])}{', ...' if len(bad) > 10 else ''}); "
            f"with fp16, values beyond its range overflow: convert to fp32 or bf16"
        )


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> str | None:
    """
    The problem with writing a converted folder to `output_dir`, in one sentence, or `None`: a file in the way, a
    non-empty folder without `overwrite`, or a place that cannot be written. Meant to run before the conversion work.
    """
    path = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{output_dir} exists and is not a folder"
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        return f"{output_dir} is not empty; choose another folder or pass --overwrite to replace it"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot create {output_dir}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK)):
        return f"cannot write to {output_dir}: no write permission in {parent}"
    return None


def save_converted(
    converted, output_dir: str | os.PathLike, push_to_hub: str | None = None, overwrite: bool = False
) -> None:
    """
    Saves a converted model or pipeline as safetensors into `output_dir`, whole or not at all: it is written into a
    temporary folder next to it and moved into place when complete, so an interrupted conversion leaves no mixed
    folder. An existing non-empty `output_dir` is refused unless `overwrite`, and is then replaced as a whole (no
    file of an earlier pipeline stays). Optionally pushes it to the Hub repo `push_to_hub`.
    """
    problem = check_output_dir(output_dir, overwrite)
    if problem:
        raise ValueError(problem)
    target = os.path.abspath(os.fspath(output_dir))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        converted.save_pretrained(temporary, safe_serialization=True)
        if os.path.isdir(target):
            previous = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.old")
            os.replace(target, previous)
            os.replace(temporary, target)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    print(f"saved to {output_dir}")
    if push_to_hub:
        converted.push_to_hub(push_to_hub)
        print(f"pushed to https://huggingface.co/{push_to_hub}")
