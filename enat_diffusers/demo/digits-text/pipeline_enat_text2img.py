"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline_enat_text2img", trust_remote_code=True)` find
ENATText2ImagePipeline without importing enat_diffusers first (the package must be installed: pip install enat-diffusers)."""

from enat_diffusers.pipelines.pipeline_enat_text2img import ENATText2ImagePipeline  # noqa: F401
