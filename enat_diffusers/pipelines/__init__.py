from ..conditioning import ENATPromptEmbeds, encode_text
from .pipeline_enat import ENATPipeline
from .pipeline_enat_base import GUIDANCE_SCHEDULES, ENATBasePipeline
from .pipeline_enat_editing import ENATEditingPipelineBase
from .pipeline_enat_img2img import ENATImg2ImgPipeline
from .pipeline_enat_inpaint import ENATInpaintPipeline, outpainting_canvas
from .pipeline_enat_text2img import ENATText2ImagePipeline

# The package's pipelines: the one list that registration with diffusers (and anything else listing them) uses.
# A new pipeline adds itself here.
ENAT_PIPELINES = (ENATPipeline, ENATText2ImagePipeline, ENATInpaintPipeline, ENATImg2ImgPipeline)

__all__ = [
    "ENAT_PIPELINES",
    "GUIDANCE_SCHEDULES",
    "ENATBasePipeline",
    "ENATEditingPipelineBase",
    "ENATImg2ImgPipeline",
    "ENATInpaintPipeline",
    "ENATPipeline",
    "ENATPromptEmbeds",
    "ENATText2ImagePipeline",
    "encode_text",
    "outpainting_canvas",
]
