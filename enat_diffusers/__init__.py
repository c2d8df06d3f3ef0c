"""ENAT (EfficientNAT, NeurIPS 2024) token-based image generation for Hugging Face diffusers."""

from ._diffusers_registry import register_with_diffusers
from .models import (
    ENATReuseState,
    ENATTransformer2DModel,
    ENATTransformer2DModelOutput,
    MaskGITVQEncoderOutput,
    MaskGITVQModel,
    MaskGITVQModelOutput,
)
from .pipelines import ENATPipeline
from .schedulers import ENATScheduler, ENATSchedulerOutput

__version__ = "0.1.0.dev0"

register_with_diffusers()

__all__ = [
    "ENATPipeline",
    "ENATReuseState",
    "ENATScheduler",
    "ENATSchedulerOutput",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskGITVQEncoderOutput",
    "MaskGITVQModel",
    "MaskGITVQModelOutput",
]
