"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline_enat_text2img", trust_remote_code=True)` find
ENATText2ImagePipeline without importing enat_diffusers first (enat-diffusers must be installed, from its git repository: pip install -e .)."""

from enat_diffusers.pipelines.pipeline_enat_text2img import ENATText2ImagePipeline  # noqa: F401
