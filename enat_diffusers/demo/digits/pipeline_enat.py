"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline_enat", trust_remote_code=True)` find
ENATPipeline without importing enat_diffusers first (enat-diffusers must be installed, from its git repository: pip install -e .)."""

from enat_diffusers.pipelines.pipeline_enat import ENATPipeline  # noqa: F401
