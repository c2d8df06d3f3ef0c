from .transformer_enat import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput
from .vq_maskgit import MaskGITVQModel

__all__ = ["ENATReuseState", "ENATTransformer2DModel", "ENATTransformer2DModelOutput", "MaskGITVQModel"]
