"""ENAT (EfficientNAT) token-based image generation for Hugging Face diffusers."""

from .models import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput, MaskGITVQModel
from .schedulers import ENATScheduler, ENATSchedulerOutput

__version__ = "0.1.0.dev0"

__all__ = [
    "ENATReuseState",
    "ENATScheduler",
    "ENATSchedulerOutput",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskGITVQModel",
]
