"""Makes diffusers' generic loaders find the ENAT classes once `enat_diffusers` is imported.

diffusers resolves a pipeline's `_class_name` only as an attribute of the `diffusers` module, and before a Hub
download it accepts a component library only if it is one of its own or an attribute of `diffusers.pipelines`.
Registering our pipeline classes and component modules under those names lets `DiffusionPipeline.from_pretrained`
load ENAT folders and Hub repos with their standard layout (no extra files, no `trust_remote_code`). What
`save_pretrained` writes is unchanged: components keep their full module paths.

diffusers' AutoPipelines (`AutoPipelineForText2Image`, `AutoPipelineForImage2Image`, `AutoPipelineForInpainting`) pick
the pipeline of a task through a model-family key: the family of the given class (the first key, over the task tables
in diffusers' order, whose pipeline has that class name), then that family's entry in the task's table. Our families:

- `"enat"`: `ENATText2ImagePipeline`, `ENATImg2ImgPipeline`, `ENATInpaintPipeline` (listed first: the AutoPipelines
  are prompt-driven);
- `"enat-class"`: `ENATPipeline` and the same two editing pipelines (they serve both transformer kinds).

So from either generation pipeline (or its folder), the image-to-image and inpainting AutoPipelines give our editing
pipelines, and those convert into each other. The one direction that cannot work for a class-conditional transformer
is from an editing pipeline to `AutoPipelineForText2Image`: diffusers finds the family from the class name alone, the
editing classes are found in `"enat"` first, so it gives `ENATText2ImagePipeline`, which takes prompts. Use
`ENATPipeline.from_pipe(editing_pipe)` there.
"""

import diffusers
import diffusers.pipelines
from diffusers.pipelines import auto_pipeline

from .models import transformer_enat, vq_maskgit
from .pipelines import (
    ENAT_PIPELINES,
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATText2ImagePipeline,
)
from .schedulers import scheduling_enat

COMPONENT_MODULES = (transformer_enat, vq_maskgit, scheduling_enat)

# Model family -> (text-to-image, image-to-image, inpainting) pipeline, for diffusers' AutoPipelines. Order matters:
# an editing class belongs to the first family that lists it.
AUTO_PIPELINE_FAMILIES = {
    "enat": (ENATText2ImagePipeline, ENATImg2ImgPipeline, ENATInpaintPipeline),
    "enat-class": (ENATPipeline, ENATImg2ImgPipeline, ENATInpaintPipeline),
}


def register_with_auto_pipelines() -> None:
    tables = (
        auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
    )
    for family, pipelines in AUTO_PIPELINE_FAMILIES.items():
        for table, pipeline_class in zip(tables, pipelines, strict=True):
            table[family] = pipeline_class


def register_with_diffusers() -> None:
    for pipeline_class in ENAT_PIPELINES:
        setattr(diffusers, pipeline_class.__name__, pipeline_class)
    for module in COMPONENT_MODULES:
        setattr(diffusers.pipelines, module.__name__, module)
    register_with_auto_pipelines()
