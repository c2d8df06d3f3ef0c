from .pipeline_enat import ENATPipeline
from .pipeline_enat_text2img import ENATText2ImagePipeline, encode_text

__all__ = ["ENATPipeline", "ENATText2ImagePipeline", "encode_text"]
