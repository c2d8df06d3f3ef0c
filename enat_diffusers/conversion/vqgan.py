"""Convert MaskGIT's VQGAN checkpoint (`vqgan_jax_strongaug.ckpt`, taming key names) to [`MaskGITVQModel`].

Key correspondence (reference -> ours), `L` being the number of levels:

- `encoder.down.{i}.block.{k}.*` -> `encoder.down_blocks.{i}.resnets.{k}.*`
- `{encoder,decoder}.mid.block_{n}.*` -> `{encoder,decoder}.mid_block.resnets.{n - 1}.*`
- `decoder.up.{i}.block.{k}.*` -> `decoder.up_blocks.{L - 1 - i}.resnets.{k}.*` (ours run deepest level first)
- `decoder.up.{i}.upsample.conv.*` -> `decoder.up_blocks.{L - 1 - i}.upsampler.conv.*`
- `*.nin_shortcut.*` -> `*.skip_proj.*`
- `{encoder,decoder}.{conv_in,norm_out,conv_out}.*` and `quantize.embedding.weight` keep their names.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models.vq_maskgit import MaskGITVQModel
from ..script_utils import resolve_dtype
from .common import (
    CheckpointMismatchError,
    check_finite,
    load_reference_checkpoint,
    rename_state_dict,
    unwrap_state_dict,
)

__all__ = ["convert_maskgit_vqgan_state_dict", "convert_vqgan", "vqgan_config_from_state_dict"]


_ENCODER_BLOCK = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$")
_DECODER_BLOCK = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$")
_DECODER_UPSAMPLE = re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$")
_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$")
_KEPT = re.compile(r"^((encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)|quantize\.embedding\.weight)$")
_RESNET_PARAMS = {
    "norm1.weight",
    "norm1.bias",
    "conv1.weight",
    "norm2.weight",
    "norm2.bias",
    "conv2.weight",
    "nin_shortcut.weight",
}


def _resnet_param(name: str) -> str | None:
    if name not in _RESNET_PARAMS:
        return None
    return name.replace("nin_shortcut.", "skip_proj.")


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointMismatchError(f"Cannot infer the VQGAN config: the checkpoint has no key {key!r}.")
    return state_dict[key]


def vqgan_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the [`MaskGITVQModel`] config (widths, levels, blocks, codebook) from the shapes of a reference state dict.

    GroupNorm groups cannot be read from the weights; the reference always uses 32, which is the default.
    """
    state_dict = unwrap_state_dict(state_dict)
    conv_in = _require(state_dict, "encoder.conv_in.weight")
    hidden_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted({int(match.group(1)) for key in state_dict if (match := _ENCODER_BLOCK.match(key))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointMismatchError(
            f"Cannot infer the VQGAN config: expected encoder.down.0..N blocks, found levels {levels}."
        )
    multipliers = []
    for level in levels:
        width = int(_require(state_dict, f"encoder.down.{level}.block.0.conv1.weight").shape[0])
        if width % hidden_channels:
            raise CheckpointMismatchError(
                f"Cannot infer the VQGAN config: width {width} of level {level} is not a multiple of {hidden_channels}."
            )
        multipliers.append(width // hidden_channels)
    layers = {
        int(match.group(2)) for key in state_dict if (match := _ENCODER_BLOCK.match(key)) and match.group(1) == "0"
    }
    codebook = _require(state_dict, "quantize.embedding.weight")
    return {
        "in_channels": in_channels,
        "out_channels": int(_require(state_dict, "decoder.conv_out.weight").shape[0]),
        "hidden_channels": hidden_channels,
        "channel_multipliers": tuple(multipliers),
        "layers_per_block": len(layers),
        "latent_channels": int(codebook.shape[1]),
        "num_vq_embeddings": int(codebook.shape[0]),
    }


def convert_maskgit_vqgan_state_dict(
    state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Rename a reference VQGAN state dict (taming key names) to the parameter names of [`MaskGITVQModel`].

    Args:
        state_dict: the reference `VQModel` state dict, or a checkpoint dict holding it under `"state_dict"`.
        config: [`MaskGITVQModel`] config the result must fit; inferred from the shapes when `None`.

    Returns:
        A state dict that loads strictly into `MaskGITVQModel(**config)`.

    Raises:
        CheckpointMismatchError: listing every missing key, unexpected key and shape mismatch together.
    """
    state_dict = unwrap_state_dict(state_dict)
    config = dict(vqgan_config_from_state_dict(state_dict) if config is None else config)
    with torch.device("meta"):
        target = MaskGITVQModel(**config)
    target_shapes = {key: value.shape for key, value in target.state_dict().items()}
    num_levels = len(target.config.channel_multipliers)

    def rename(key: str) -> str | None:
        if _KEPT.match(key):
            return key
        if match := _ENCODER_BLOCK.match(key):
            level, index, param = match.groups()
            param = _resnet_param(param)
            return None if param is None else f"encoder.down_blocks.{level}.resnets.{index}.{param}"
        if match := _DECODER_BLOCK.match(key):
            level, index, param = match.groups()
            param = _resnet_param(param)
            up_index = num_levels - 1 - int(level)
            return None if param is None or up_index < 0 else f"decoder.up_blocks.{up_index}.resnets.{index}.{param}"
        if match := _DECODER_UPSAMPLE.match(key):
            up_index = num_levels - 1 - int(match.group(1))
            return None if up_index < 0 else f"decoder.up_blocks.{up_index}.upsampler.conv.{match.group(2)}"
        if match := _MID_BLOCK.match(key):
            part, number, param = match.groups()
            param = _resnet_param(param)
            return None if param is None else f"{part}.mid_block.resnets.{int(number) - 1}.{param}"
        return None

    return rename_state_dict(state_dict, rename, target_shapes)


def convert_vqgan(
    checkpoint_path: str | os.PathLike, dtype: str | torch.dtype = torch.float32, sample_size: int = 256
) -> MaskGITVQModel:
    """Build a [`MaskGITVQModel`] holding the weights of a reference VQGAN checkpoint (config inferred from shapes).

    Args:
        checkpoint_path: path of `vqgan_jax_strongaug.ckpt` (taming key names, optionally under `"state_dict"`).
        dtype: `"fp32"`, `"fp16"`, `"bf16"` or a floating `torch.dtype` for the returned weights.
        sample_size: image size recorded in the config (informational; the same VQGAN serves 256 and 512 px).
    """
    dtype = resolve_dtype(dtype)
    state_dict = load_reference_checkpoint(checkpoint_path)
    config = vqgan_config_from_state_dict(state_dict)
    config["sample_size"] = sample_size
    converted = convert_maskgit_vqgan_state_dict(state_dict, config)
    model = MaskGITVQModel(**config)
    model.load_state_dict(converted, strict=True)
    # nn.Module.to rather than ModelMixin.to, which warns about float32-pinned modules even when there are none.
    torch.nn.Module.to(model, dtype=dtype)
    check_finite(model, "VQGAN")
    return model.eval()
