"""Reference ENAT checkpoints -> a complete `ENATPipeline` with the reference's sampling defaults."""

import json
import os
from pathlib import Path

import torch

from ..models.transformer_enat import ENATTransformer2DModel
from ..pipelines.pipeline_enat import ENATPipeline
from ..schedulers.scheduling_enat import ENATScheduler
from ..script_utils import resolve_dtype
from .common import check_finite, load_reference_checkpoint
from .transformer import convert_enat_transformer_state_dict, transformer_config_from_state_dict
from .vqgan import convert_vqgan

# The reference's evaluation settings per resolution (README of LeapLabTHU/ENAT). `guidance_scale` has diffusers'
# meaning: the reference's `cfg` 2.5 / 3.5 is `guidance_scale - 1`.
SAMPLING_DEFAULTS = {
    256: {"guidance_scale": 3.5, "mask_temperature": 1.5, "sample_temperature": 6.0, "num_inference_steps": 8},
    512: {"guidance_scale": 4.5, "mask_temperature": 1.5, "sample_temperature": 4.0, "num_inference_steps": 8},
}
VQ_DOWNSAMPLING = 16
IMAGENET_ID2LABEL = Path(__file__).resolve().parent / "imagenet1k_id2label.json"


def imagenet_id2label() -> dict[int, str]:
    """The ImageNet-1k class names by class id (WordNet lemmas, comma-separated; each name belongs to one class only;
    see conversion/make_imagenet_id2label.py for where they come from and how the few shared lemmas were resolved)."""
    return {int(key): names for key, names in json.loads(IMAGENET_ID2LABEL.read_text()).items()}


def check_id2label(id2label: dict, num_classes: int) -> dict[int, str]:
    """`id2label` with int keys, checked against the model: ids in `[0, num_classes)`, non-empty names, and no name
    (compared without case) given to two classes."""
    checked, owners, problems = {}, {}, []
    for key, names in id2label.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            problems.append(f"{key!r} is not a class id")
            continue
        if not 0 <= class_id < num_classes:
            problems.append(f"class id {class_id} is outside [0, {num_classes - 1}]")
        if not isinstance(names, str) or not any(name.strip() for name in names.split(",")):
            problems.append(f"class {class_id} has no name")
            continue
        for name in (name.strip() for name in names.split(",") if name.strip()):
            other = owners.setdefault(name.casefold(), class_id)
            if other != class_id:
                problems.append(f"{name!r} names classes {other} and {class_id}")
        checked[class_id] = names
    if problems:
        raise ValueError("`id2label` does not fit the model: " + "; ".join(problems))
    return checked


def convert_transformer(
    checkpoint_path: str | os.PathLike, num_attention_heads: int | None = None, num_decoder_layers: int | None = None
) -> ENATTransformer2DModel:
    """An `ENATTransformer2DModel` holding the weights of `nnet_ema.pth` / `nnet_ema_512.pth` (fp32). The head count
    and encoder/decoder split come from the paper configuration the checkpoint's width and depth identify (see
    `transformer_config_from_state_dict`); pass them only for other checkpoints."""
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
    num_attention_heads: int | None = None,
    num_decoder_layers: int | None = None,
    id2label: dict[int, str] | None = None,
) -> ENATPipeline:
    """
    Builds an `ENATPipeline` from the reference transformer and VQGAN checkpoints; `resolution` (256 or 512) picks
    the sampling defaults and must match the checkpoint's token grid. `id2label` defaults to the ImageNet-1k class
    names for a checkpoint with 1000 classes (so `pipe(class_labels=["golden retriever"])` works). Weights that are
    not floating point, or NaN/inf before or after the cast to `dtype`, are refused.
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
    num_classes = transformer.config.num_classes
    if id2label is None and num_classes == len(imagenet_id2label()):
        id2label = imagenet_id2label()
    if id2label is not None:
        id2label = check_id2label(id2label, num_classes)
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
    check_finite(transformer, "transformer")
    return ENATPipeline(
        transformer=transformer,
        vqvae=vqvae,
        scheduler=scheduler,
        id2label=id2label,
        default_num_inference_steps=defaults["num_inference_steps"],
        default_guidance_scale=defaults["guidance_scale"],
    )
