"""Tiny random ENAT components shared by the pipeline tests."""

import torch

from enat_diffusers.models.transformer_enat import ENATTransformer2DModel
from enat_diffusers.models.vq_maskgit import MaskGITVQModel
from enat_diffusers.pipelines.pipeline_enat import ENATPipeline
from enat_diffusers.schedulers.scheduling_enat import ENATScheduler

CODEBOOK_SIZE = 16
GRID = 4
NUM_CLASSES = 5
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark", 3: "tiger shark", 4: "hammerhead"}


def tiny_transformer(seed: int = 0) -> ENATTransformer2DModel:
    torch.manual_seed(seed)
    model = ENATTransformer2DModel(
        sample_size=GRID,
        codebook_size=CODEBOOK_SIZE,
        hidden_size=32,
        num_attention_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=1,
        num_classes=NUM_CLASSES,
    )
    with torch.no_grad():  # as after training: no block is an identity map
        for block in [*model.encoder_blocks, *model.decoder_blocks]:
            block.adaln_modulation.weight.normal_(0, 0.2)
            block.adaln_modulation.bias.normal_(0, 0.2)
        model.class_embedding.weight.normal_(0, 1.0)
    return model.eval()


def tiny_vqvae(seed: int = 0) -> MaskGITVQModel:
    torch.manual_seed(seed)
    return MaskGITVQModel(
        hidden_channels=8,
        channel_multipliers=(1, 2),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=CODEBOOK_SIZE,
        norm_num_groups=4,
        sample_size=GRID * 2,
    ).eval()


def tiny_pipeline(scheduler=None, **kwargs) -> ENATPipeline:
    pipe = ENATPipeline(
        transformer=tiny_transformer(),
        vqvae=tiny_vqvae(),
        scheduler=scheduler or ENATScheduler(mask_token_id=CODEBOOK_SIZE),
        id2label=ID2LABEL,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def public_config(config) -> dict:
    """A config without diffusers' private bookkeeping entries (`_name_or_path`, `_use_default_values`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}
