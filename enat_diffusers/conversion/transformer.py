"""Reference ENAT transformer checkpoints (`nnet_ema.pth`, `nnet_ema_512.pth`) -> `ENATTransformer2DModel`."""

import math
import re
from collections.abc import Mapping

import torch

from ..models.transformer_enat import ENAT_PRESETS
from .common import CheckpointMismatchError, rename_state_dict

# Trained only as an auxiliary module in the reference and never called at inference.
DROPPED_PREFIXES = ("prev_embedder.",)

_FIXED_RENAMES = {
    "x_embedder.word_embeddings.weight": "embed.word_embedding.weight",
    "x_embedder.position_embeddings.weight": "embed.position_embedding.weight",
    "x_embedder.LayerNorm.weight": "embed.norm.weight",
    "x_embedder.LayerNorm.bias": "embed.norm.bias",
    "y_embedder.embedding_table.weight": "class_embedding.weight",
    "norm.weight": "head.norm_out.weight",
    "norm.bias": "head.norm_out.bias",
    "mlm_layer.bias": "head.bias",
}

_MODULE_RENAMES = {
    "prev_proj.norm": "reuse_proj.norm",
    "prev_proj.mlp.fc1": "reuse_proj.ff.net.0.proj",
    "prev_proj.mlp.fc2": "reuse_proj.ff.net.2",
    "mlm_layer.fc": "head.proj",
    "mlm_layer.ln": "head.norm",
}

_BLOCK_RENAMES = {
    "attn.q": "attn.to_q",
    "attn.kv.A": "attn.to_kv_context",
    "attn.kv.B": "attn.to_kv",
    "attn.proj": "attn.to_out",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "adaln_modulation",
}

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_MODULE_KEY = re.compile(r"(.+)\.(weight|bias)")


def _num_blocks(state_dict: Mapping[str, torch.Tensor]) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.fullmatch(key))}
    return max(indices) + 1 if indices else 0


def match_preset(hidden_size: int, num_layers: int) -> str | None:
    """The paper configuration (`ENAT_PRESETS`) with this width and number of blocks, if any: ENAT-S, -B and -L
    differ in both, and the head count and encoder/decoder split are not recorded in the weights."""
    for name, preset in ENAT_PRESETS.items():
        if preset.get("num_classes", 1) is None:  # text-conditioned presets have no class-conditional checkpoint
            continue
        if (preset["hidden_size"], preset["num_encoder_layers"] + preset["num_decoder_layers"]) == (
            hidden_size,
            num_layers,
        ):
            return name
    return None


def transformer_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_decoder_layers: int | None = None,
) -> dict:
    """
    The `ENATTransformer2DModel` config of a reference checkpoint. Head count and the encoder/decoder split are not
    recorded in the weights: for a checkpoint whose width and depth are those of a paper configuration (ENAT-S, -B or
    -L in `ENAT_PRESETS`) they come from it, and arguments that contradict it are refused; any other checkpoint needs
    both arguments.
    """
    required = ("x_embedder.word_embeddings.weight", "x_embedder.position_embeddings.weight")
    required += ("y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise CheckpointMismatchError(f"Not an ENAT transformer checkpoint; missing keys: {', '.join(missing)}")
    vocab_size, hidden_size = state_dict["x_embedder.word_embeddings.weight"].shape
    num_positions = state_dict["x_embedder.position_embeddings.weight"].shape[0]
    sample_size = math.isqrt(num_positions)
    if sample_size**2 != num_positions:
        raise CheckpointMismatchError(f"{num_positions} position embeddings do not form a square token grid")
    num_layers = _num_blocks(state_dict)
    preset = match_preset(hidden_size, num_layers)
    given = {"num_attention_heads": num_attention_heads, "num_decoder_layers": num_decoder_layers}
    if preset is not None:
        contradicting = [
            f"`{name}` {value} (the checkpoint is {preset}: {ENAT_PRESETS[preset][name]})"
            for name, value in given.items()
            if value is not None and value != ENAT_PRESETS[preset][name]
        ]
        if contradicting:
            raise ValueError(
                f"the checkpoint's width {hidden_size} and {num_layers} blocks are those of {preset}, which "
                f"contradicts {' and '.join(contradicting)}; leave the argument out to use {preset}'s"
            )
        num_attention_heads = ENAT_PRESETS[preset]["num_attention_heads"]
        num_decoder_layers = ENAT_PRESETS[preset]["num_decoder_layers"]
    else:
        unknown = [name for name, value in given.items() if value is None]
        if unknown:
            presets = ", ".join(
                f"{name} {preset['hidden_size']}/{preset['num_encoder_layers'] + preset['num_decoder_layers']}"
                for name, preset in ENAT_PRESETS.items()
                if preset.get("num_classes", 1) is not None
            )
            raise ValueError(
                f"the checkpoint (width {hidden_size}, {num_layers} blocks) is none of the paper's configurations "
                f"(width/blocks: {presets}), so {' and '.join(f'`{name}`' for name in unknown)} must be given"
            )
    if num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise ValueError(
            f"`num_attention_heads` must be a positive divisor of the width {hidden_size}, got {num_attention_heads}"
        )
    if not 0 < num_decoder_layers < num_layers:
        raise ValueError(f"`num_decoder_layers` must be in [1, {num_layers - 1}] for {num_layers} blocks")
    return {
        "sample_size": sample_size,
        "codebook_size": vocab_size - 1,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_encoder_layers": num_layers - num_decoder_layers,
        "num_decoder_layers": num_decoder_layers,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
    }


def _rename_key(key: str, num_encoder_layers: int) -> str | None:
    if key in _FIXED_RENAMES:
        return _FIXED_RENAMES[key]
    if match := _BLOCK_KEY.fullmatch(key):
        index, module, kind = int(match.group(1)), match.group(2), match.group(3)
        if module not in _BLOCK_RENAMES:
            return None
        stack = "encoder_blocks" if index < num_encoder_layers else "decoder_blocks"
        index = index if index < num_encoder_layers else index - num_encoder_layers
        return f"{stack}.{index}.{_BLOCK_RENAMES[module]}.{kind}"
    if (match := _MODULE_KEY.fullmatch(key)) and match.group(1) in _MODULE_RENAMES:
        return f"{_MODULE_RENAMES[match.group(1)]}.{match.group(2)}"
    return None


def convert_enat_transformer_state_dict(
    state_dict: Mapping[str, torch.Tensor], target_shapes: Mapping[str, torch.Size], num_encoder_layers: int
) -> dict[str, torch.Tensor]:
    """
    Renames a reference transformer state dict for an `ENATTransformer2DModel` whose parameters have
    `target_shapes` (e.g. `{k: v.shape for k, v in model.state_dict().items()}`). Blocks `0..num_encoder_layers-1`
    become encoder blocks, the rest decoder blocks. Raises `CheckpointMismatchError` listing every missing,
    unexpected or misshaped key; only `prev_embedder.*` is dropped.
    """
    state_dict = dict(state_dict)
    if "mlm_layer.bias" in state_dict:
        # Stored as (1, 1, vocab) for broadcasting in the reference.
        state_dict["mlm_layer.bias"] = state_dict["mlm_layer.bias"].reshape(-1)
    return rename_state_dict(
        state_dict,
        lambda key: _rename_key(key, num_encoder_layers),
        target_shapes,
        dropped_prefixes=DROPPED_PREFIXES,
    )
