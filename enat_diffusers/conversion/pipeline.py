"""Reference ENAT checkpoints -> a complete `ENATPipeline` with the reference's sampling defaults."""

import os

import torch

from ..models.transformer_enat import ENATTransformer2DModel
from ..pipelines.pipeline_enat import ENATPipeline
from ..schedulers.scheduling_enat import ENATScheduler
from .common import load_reference_checkpoint, resolve_dtype
from .transformer import convert_enat_transformer_state_dict, transformer_config_from_state_dict
from .vqgan import convert_vqgan

# The reference's evaluation settings per resolution (README of LeapLabTHU/ENAT).
SAMPLING_DEFAULTS = {
    256: {"guidance_scale": 2.5, "mask_temperature": 1.5, "sample_temperature": 6.0, "num_inference_steps": 8},
    512: {"guidance_scale": 3.5, "mask_temperature": 1.5, "sample_temperature": 4.0, "num_inference_steps": 8},
}
VQ_DOWNSAMPLING = 16


def convert_transformer(
    checkpoint_path: str | os.PathLike, num_attention_heads: int = 16, num_decoder_layers: int = 2
) -> ENATTransformer2DModel:
    """An `ENATTransformer2DModel` holding the weights of `nnet_ema.pth` / `nnet_ema_512.pth` (fp32)."""
    state_dict = load_reference_checkpoint(checkpoint_path)
    config = transformer_config_from_state_dict(state_dict, num_attention_heads, num_decoder_layers)
    model = ENATTransformer2DModel(**config)
    target_shapes = {key: value.shape for key, value in model.state_dict().items()}
    model.load_state_dict(
        convert_enat_transformer_state_dict(state_dict, target_shapes, config["num_encoder_layers"]), strict=True
    )
    return model.eval()


def convert_enat_pipeline(
    checkpoint_path: str | os.PathLike,
    vqgan_path: str | os.PathLike,
    resolution: int,
    dtype: str | torch.dtype = torch.float32,
    num_attention_heads: int = 16,
    num_decoder_layers: int = 2,
    id2label: dict[int, str] | None = None,
) -> ENATPipeline:
    """
    Builds an `ENATPipeline` from the reference transformer and VQGAN checkpoints; `resolution` (256 or 512) picks
    the sampling defaults and must match the checkpoint's token grid.
    """
    dtype = resolve_dtype(dtype)
    if resolution not in SAMPLING_DEFAULTS:
        raise ValueError(f"`resolution` must be one of {sorted(SAMPLING_DEFAULTS)}, got {resolution}")
    transformer = convert_transformer(checkpoint_path, num_attention_heads, num_decoder_layers)
    expected_grid = resolution // VQ_DOWNSAMPLING
    if transformer.config.sample_size != expected_grid:
        raise ValueError(
            f"`resolution` {resolution} needs a {expected_grid}x{expected_grid} token grid, but the checkpoint was "
            f"trained on {transformer.config.sample_size}x{transformer.config.sample_size}"
        )
    vqvae = convert_vqgan(vqgan_path, dtype=dtype, sample_size=resolution)
    if vqvae.codebook_size != transformer.config.codebook_size:
        raise ValueError(
            f"the VQGAN has {vqvae.codebook_size} codes but the transformer expects {transformer.config.codebook_size}"
        )
    defaults = SAMPLING_DEFAULTS[resolution]
    scheduler = ENATScheduler(
        mask_token_id=transformer.config.codebook_size,
        mask_temperature=defaults["mask_temperature"],
        sample_temperature=defaults["sample_temperature"],
    )
    # nn.Module.to: diffusers' ModelMixin.to warns about float32-pinned modules even when there are none.
    torch.nn.Module.to(transformer, dtype=dtype)
    return ENATPipeline(
        transformer=transformer,
        vqvae=vqvae,
        scheduler=scheduler,
        id2label=id2label,
        default_num_inference_steps=defaults["num_inference_steps"],
        default_guidance_scale=defaults["guidance_scale"],
    )
