from .transformer_enat import (
    ENAT_PRESETS,
    ENATConditioning,
    ENATKeptContext,
    ENATReuseState,
    ENATTransformer2DModel,
    ENATTransformer2DModelOutput,
)
from .vq_maskgit import MaskGITVQEncoderOutput, MaskGITVQModel, MaskGITVQModelOutput

__all__ = [
    "ENAT_PRESETS",
    "ENATConditioning",
    "ENATKeptContext",
    "ENATReuseState",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskGITVQEncoderOutput",
    "MaskGITVQModel",
    "MaskGITVQModelOutput",
]
