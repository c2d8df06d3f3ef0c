"""Makes diffusers' generic loaders find the ENAT classes once `enat_diffusers` is imported.

- Pipelines: diffusers resolves `model_index.json`'s `_class_name` only as an attribute of the `diffusers` module, so
  every class of `ENAT_PIPELINES` is set there.
- Components: `model_index.json` records them under their module paths (`enat_diffusers.models.transformer_enat`,
  ...). Those modules are added to diffusers' table of component libraries (`LOADABLE_CLASSES`), with the save/load
  methods diffusers uses for its own models and schedulers. Before a Hub download diffusers accepts only those
  libraries (or modules of `diffusers.pipelines`); and for a library in that table it checks the type of a component
  passed to `from_pretrained` (`transformer=...`) against the library's base classes. Registering the modules as
  modules of `diffusers.pipelines` instead (what this package did before) also passes the Hub check, but diffusers
  cannot check the type of a pipeline module's component and prints a warning with the whole module instead.

- Schedulers: `ENATScheduler` is added to `AmusedScheduler`'s compatible schedulers (diffusers' `_compatibles`, the
  list behind `scheduler.compatibles`), as `ENATScheduler` lists `AmusedScheduler`. Then
  `AmusedScheduler.from_config(enat_scheduler.config)` drops our scheduler's own settings (temperatures, the `pow`
  exponent) silently, as diffusers does between any two compatible schedulers, instead of warning that they "will be
  ignored".

- AutoPipelines: a pipeline class with `_auto_pipeline_task` (`"text2image"`, `"image2image"`, `"inpainting"`) is
  added under the model family `"enat"` to diffusers' table of that task (`AUTO_TEXT2IMAGE_PIPELINES_MAPPING`, ...;
  diffusers has no registration call), so `AutoPipelineForText2Image.from_pretrained(folder)` and `from_pipe`
  between the tasks of one family work. The class-conditional `ENATPipeline` has no task there: diffusers'
  AutoPipelines are prompt-driven, and diffusers registers no class-conditional pipeline (DiT) either.

What `save_pretrained` writes is unchanged.
"""

import diffusers
from diffusers import AmusedScheduler
from diffusers.pipelines import auto_pipeline, pipeline_loading_utils

from .models import transformer_enat, vq_maskgit
from .pipelines import ENAT_PIPELINES
from .schedulers import ENATScheduler, scheduling_enat

# Component module -> the diffusers base class its classes derive from.
COMPONENT_MODULES = {transformer_enat: "ModelMixin", vq_maskgit: "ModelMixin", scheduling_enat: "SchedulerMixin"}


AUTO_PIPELINE_FAMILY = "enat"
AUTO_PIPELINE_TABLES = {
    "text2image": auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    "image2image": auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    "inpainting": auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
}


def register_with_diffusers() -> None:
    for pipeline_class in ENAT_PIPELINES:
        setattr(diffusers, pipeline_class.__name__, pipeline_class)
    diffusers_classes = pipeline_loading_utils.LOADABLE_CLASSES["diffusers"]
    for module, base_class in COMPONENT_MODULES.items():
        pipeline_loading_utils.LOADABLE_CLASSES[module.__name__] = {base_class: diffusers_classes[base_class]}
    setattr(diffusers, ENATScheduler.__name__, ENATScheduler)
    if ENATScheduler.__name__ not in AmusedScheduler._compatibles:
        # A new list: the one there may be shared with other classes.
        AmusedScheduler._compatibles = [*AmusedScheduler._compatibles, ENATScheduler.__name__]
    for pipeline_class in ENAT_PIPELINES:
        task = pipeline_class._auto_pipeline_task
        if task is not None:
            if task not in AUTO_PIPELINE_TABLES:
                raise ValueError(
                    f"{pipeline_class.__name__}._auto_pipeline_task must be one of {list(AUTO_PIPELINE_TABLES)}"
                )
            AUTO_PIPELINE_TABLES[task][AUTO_PIPELINE_FAMILY] = pipeline_class
