"""Key bookkeeping shared by the checkpoint converters: nothing is dropped or renamed silently."""

from collections.abc import Callable, Iterable, Mapping

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
