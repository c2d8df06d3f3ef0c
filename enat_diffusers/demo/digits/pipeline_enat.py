"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline_enat", trust_remote_code=True)` find
ENATPipeline without importing enat_diffusers first (the package must be installed: pip install enat-diffusers)."""

from enat_diffusers.pipelines.pipeline_enat import ENATPipeline  # noqa: F401
