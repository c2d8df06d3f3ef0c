"""Key bookkeeping shared by the checkpoint converters: nothing is dropped or renamed silently."""

import errno
import glob
import os
import re
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


# Written besides the weights (configs, id2label, the scheduler): a margin on top of the weights' bytes.
SAVE_MARGIN_BYTES = 16 * 2**20


def _staging_folders(target: str, kind: str) -> list[str]:
    """The hidden folders `save_converted` makes next to `target`: `.NAME.<hex>.tmp` (being written) or `.old` (the
    previous folder while it is replaced)."""
    parent, name = os.path.split(target)
    candidates = glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.{kind}"))
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{32}}\.{kind}")
    return sorted(path for path in candidates if pattern.fullmatch(os.path.basename(path)))


def recover_output_dir(output_dir: str | os.PathLike) -> list[str]:
    """
    Cleans up after an earlier conversion into `output_dir` that was killed, and returns one sentence per action:
    an unfinished `.NAME.*.tmp` folder is deleted; a `.NAME.*.old` folder (the previous output, moved aside while
    being replaced) is moved back to `output_dir` when the kill came between the two renames and `output_dir` is
    missing, and deleted otherwise (the replacement had completed).
    """
    target = os.path.abspath(os.fspath(output_dir))
    messages = []
    for folder in _staging_folders(target, "tmp"):
        shutil.rmtree(folder, ignore_errors=True)
        messages.append(f"removed {folder}, an unfinished conversion left by an earlier run that was stopped")
    for folder in _staging_folders(target, "old"):
        if not os.path.exists(target):
            os.replace(folder, target)
            messages.append(
                f"restored {output_dir} from {folder}: an earlier run was stopped while replacing it, after moving "
                "the previous folder aside"
            )
        else:
            shutil.rmtree(folder, ignore_errors=True)
            messages.append(f"removed {folder}, the previous {output_dir} that an earlier run had already replaced")
    return messages


def saved_size(converted) -> int:
    """Bytes the safetensors files of `converted` (a model or pipeline) take, plus `SAVE_MARGIN_BYTES`."""
    modules = (
        [converted] if isinstance(converted, torch.nn.Module) else list(getattr(converted, "components", {}).values())
    )
    tensors = {}
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for tensor in module.state_dict().values():
                tensors[(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = (
                    tensor.numel() * tensor.element_size()
                )
    return sum(tensors.values()) + SAVE_MARGIN_BYTES


def free_space_problem(output_dir: str | os.PathLike, needed_bytes: int) -> str | None:
    """A sentence when the disk that will hold `output_dir` has less than `needed_bytes` free, else None."""
    folder = os.path.dirname(os.path.abspath(os.fspath(output_dir)))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        return (
            f"not enough free space for {output_dir}: the converted weights need about {needed_bytes / 2**30:.2f} GiB, "
            f"{folder} has {free / 2**30:.2f} GiB free"
        )
    return None


def save_converted(
    converted, output_dir: str | os.PathLike, push_to_hub: str | None = None, overwrite: bool = False
) -> None:
    """
    Saves a converted model or pipeline as safetensors into `output_dir`, whole or not at all: it is written into a
    temporary folder next to it and moved into place when complete, so an interrupted conversion leaves no mixed
    folder. An existing non-empty `output_dir` is refused unless `overwrite`, and is then replaced as a whole (no
    file of an earlier pipeline stays). Leftovers of an earlier run that was killed are cleaned first
    (`recover_output_dir`, which says what it did), and the free space is checked before writing; a disk that
    fills up anyway is reported in one sentence with nothing left behind. Optionally pushes it to the Hub repo
    `push_to_hub`.
    """
    for message in recover_output_dir(output_dir):
        print(message)
    problem = check_output_dir(output_dir, overwrite) or free_space_problem(output_dir, saved_size(converted))
    if problem:
        raise ValueError(problem)
    target = os.path.abspath(os.fspath(output_dir))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        converted.save_pretrained(temporary, safe_serialization=True)
        if os.path.isdir(target):
            # If the process dies between these renames, the next run moves `previous` back (`recover_output_dir`).
            previous = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.old")
            os.replace(target, previous)
            os.replace(temporary, target)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, target)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ValueError(
            f"the disk holding {output_dir} filled up while the converted weights were written; nothing was "
            f"written (the partial copy was removed). Free about {saved_size(converted) / 2**30:.2f} GiB and run again"
        ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    print(f"saved to {output_dir}")
    if push_to_hub:
        converted.push_to_hub(push_to_hub)
        print(f"pushed to https://huggingface.co/{push_to_hub}")


def push_to_hub_problem(repo_id: str | None) -> str | None:
    """
    Why `--push_to_hub repo_id` cannot work, in one sentence, or None; checked at start-up, before the conversion:
    the repo id must be `namespace/name` (diffusers' `push_to_hub` needs the namespace), a Hub token must be there
    (`hf auth login` or HF_TOKEN), and the Hub must not be switched off (HF_HUB_OFFLINE).
    """
    if repo_id is None:
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return f"--push_to_hub {repo_id!r} is not a Hub repo id ({str(error).splitlines()[0]})"
    if repo_id.count("/") != 1:
        return f"--push_to_hub {repo_id!r}: give the repo as NAMESPACE/NAME, e.g. your-user/enat-l-256"
    if constants.HF_HUB_OFFLINE:
        return f"--push_to_hub {repo_id!r}: the Hub is switched off here (HF_HUB_OFFLINE=1)"
    if get_token() is None:
        return f"--push_to_hub {repo_id!r} needs a Hub token: run `hf auth login` or set HF_TOKEN"
    return None


def estimated_conversion_bytes(checkpoint_paths, dtype_bytes: int) -> int:
    """What the converted safetensors will take, estimated before converting: the reference checkpoints hold fp32
    weights, so their sizes scaled to `dtype_bytes` per value (plus `SAVE_MARGIN_BYTES`)."""
    return sum(os.path.getsize(path) for path in checkpoint_paths) * dtype_bytes // 4 + SAVE_MARGIN_BYTES


def conversion_start_problem(
    output_dir: str | os.PathLike,
    overwrite: bool,
    push_to_hub: str | None,
    checkpoint_paths,
    dtype_bytes: int,
) -> str | None:
    """
    The start-up checks of the conversion scripts, run before any conversion work: cleans what an earlier killed
    run left next to `output_dir` (printing what it did), then returns the first problem as a sentence naming the
    flag, or None: `--output_dir` (`check_output_dir`), `--push_to_hub` (`push_to_hub_problem`), and the free space
    for the estimated output (`estimated_conversion_bytes`).
    """
    for message in recover_output_dir(output_dir):
        print(message)
    problem = check_output_dir(output_dir, overwrite)
    if problem:
        return f"--output_dir: {problem}"
    problem = push_to_hub_problem(push_to_hub)
    if problem:
        return problem
    problem = free_space_problem(output_dir, estimated_conversion_bytes(checkpoint_paths, dtype_bytes))
    return f"--output_dir: {problem}" if problem else None
