"""Makes diffusers' generic loaders find the ENAT classes once `enat_diffusers` is imported.

diffusers resolves a pipeline's `_class_name` only as an attribute of the `diffusers` module, and before a Hub
download it accepts a component library only if it is one of its own or an attribute of `diffusers.pipelines`.
Registering our pipeline classes and component modules under those names lets `DiffusionPipeline.from_pretrained`
load ENAT folders and Hub repos with their standard layout (no extra files, no `trust_remote_code`). What
`save_pretrained` writes is unchanged: components keep their full module paths.
"""

import diffusers
import diffusers.pipelines

from .models import transformer_enat, vq_maskgit
from .pipelines import ENAT_PIPELINES
from .schedulers import scheduling_enat

COMPONENT_MODULES = (transformer_enat, vq_maskgit, scheduling_enat)


def register_with_diffusers() -> None:
    for pipeline_class in ENAT_PIPELINES:
        setattr(diffusers, pipeline_class.__name__, pipeline_class)
    for module in COMPONENT_MODULES:
        setattr(diffusers.pipelines, module.__name__, module)
