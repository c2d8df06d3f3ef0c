from .transformer_enat import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput
from .vq_maskgit import MaskGITVQEncoderOutput, MaskGITVQModel, MaskGITVQModelOutput

__all__ = [
    "ENATReuseState",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskGITVQEncoderOutput",
    "MaskGITVQModel",
    "MaskGITVQModelOutput",
]
