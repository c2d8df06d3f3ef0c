"""ENAT (EfficientNAT, NeurIPS 2024) token-based image generation for Hugging Face diffusers."""

# First, before anything imports torch: the CPU threads' wait policy (see `cpu_threads`).
from . import cpu_threads  # noqa: F401  # isort: skip
from ._quiet import import_noise_silenced, silence_session_noise  # isort: skip

with import_noise_silenced():
    from ._diffusers_registry import register_with_diffusers
    from .conditioning import ENATClassNames
    from .cpu_memory import disable_cpu_memory_reuse, enable_cpu_memory_reuse
    from .demo import load_demo_pipeline
    from .models import (
        ENAT_PRESETS,
        ENATConditioning,
        ENATKeptContext,
        ENATReuseState,
        ENATTransformer2DModel,
        ENATTransformer2DModelOutput,
        MaskGITVQEncoderOutput,
        MaskGITVQModel,
        MaskGITVQModelOutput,
    )
    from .pipelines import (
        ENAT_PIPELINES,
        ENATBasePipeline,
        ENATImg2ImgPipeline,
        ENATInpaintPipeline,
        ENATPipeline,
        ENATPromptEmbeds,
        ENATText2ImagePipeline,
        encode_text,
        outpainting_canvas,
    )
    from .quantization import choose_precision, quantize_decoder_for_cpu, quantize_for_cpu, set_precision
    from .sampling import ENATEditState
    from .schedulers import ENATScheduler, ENATSchedulerOutput, GuidanceSchedule

__version__ = "0.1.0.dev0"

register_with_diffusers()
silence_session_noise()

__all__ = [
    "ENAT_PIPELINES",
    "ENAT_PRESETS",
    "ENATBasePipeline",
    "ENATClassNames",
    "ENATEditState",
    "ENATImg2ImgPipeline",
    "ENATInpaintPipeline",
    "ENATPipeline",
    "ENATPromptEmbeds",
    "ENATConditioning",
    "ENATKeptContext",
    "ENATReuseState",
    "ENATScheduler",
    "ENATSchedulerOutput",
    "ENATText2ImagePipeline",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskGITVQEncoderOutput",
    "MaskGITVQModel",
    "MaskGITVQModelOutput",
    "GuidanceSchedule",
    "choose_precision",
    "disable_cpu_memory_reuse",
    "enable_cpu_memory_reuse",
    "encode_text",
    "load_demo_pipeline",
    "outpainting_canvas",
    "quantize_decoder_for_cpu",
    "quantize_for_cpu",
    "set_precision",
]
