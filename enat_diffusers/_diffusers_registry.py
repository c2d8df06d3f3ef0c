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

- diffusers' AutoPipelines (`AutoPipelineForText2Image`, `AutoPipelineForImage2Image`, `AutoPipelineForInpainting`) pick
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

The AutoPipeline tables live in `diffusers.pipelines.auto_pipeline`, whose import pulls in every diffusers pipeline
(and prints transformers' "requires torchvision" lines where torchvision is missing). `import enat_diffusers` does not
import it: the ENAT families are added when it is first imported (an import hook), or at once if it already was.

What `save_pretrained` writes is unchanged.
"""

import importlib.abc
import importlib.machinery
import sys

import diffusers
import diffusers.pipelines
from diffusers import AmusedScheduler
from diffusers.pipelines import pipeline_loading_utils

from .models import transformer_enat, vq_maskgit
from .pipelines import (
    ENAT_PIPELINES,
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATText2ImagePipeline,
)
from .schedulers import ENATScheduler, scheduling_enat

# Component module -> the diffusers base class its classes derive from.
COMPONENT_MODULES = {transformer_enat: "ModelMixin", vq_maskgit: "ModelMixin", scheduling_enat: "SchedulerMixin"}


# Model family -> (text-to-image, image-to-image, inpainting) pipeline, for diffusers' AutoPipelines. Order matters:
# an editing class belongs to the first family that lists it.
AUTO_PIPELINE_FAMILIES = {
    "enat": (ENATText2ImagePipeline, ENATImg2ImgPipeline, ENATInpaintPipeline),
    "enat-class": (ENATPipeline, ENATImg2ImgPipeline, ENATInpaintPipeline),
}


AUTO_PIPELINE_MODULE = "diffusers.pipelines.auto_pipeline"


def register_with_auto_pipelines(auto_pipeline=None) -> None:
    """Adds the ENAT families to the AutoPipeline tables (of `auto_pipeline`, the imported module)."""
    auto_pipeline = auto_pipeline or sys.modules[AUTO_PIPELINE_MODULE]
    tables = (
        auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
    )
    for family, pipelines in AUTO_PIPELINE_FAMILIES.items():
        for table, pipeline_class in zip(tables, pipelines, strict=True):
            table[family] = pipeline_class


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader of `diffusers.pipelines.auto_pipeline`, then adds the ENAT families to its tables."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register_with_auto_pipelines(module)


class _AutoPipelineImportHook(importlib.abc.MetaPathFinder):
    """Finds `diffusers.pipelines.auto_pipeline` as the path finder does, with a loader that registers after it
    runs; removes itself once used."""

    def find_spec(self, fullname, path, target=None):
        if fullname != AUTO_PIPELINE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def register_with_auto_pipelines_when_imported() -> None:
    if AUTO_PIPELINE_MODULE in sys.modules:
        register_with_auto_pipelines()
    elif not any(isinstance(finder, _AutoPipelineImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoPipelineImportHook())


def register_with_diffusers() -> None:
    for pipeline_class in ENAT_PIPELINES:
        # Where diffusers' own pipeline classes are found: the package and its `pipelines` module.
        setattr(diffusers, pipeline_class.__name__, pipeline_class)
        setattr(diffusers.pipelines, pipeline_class.__name__, pipeline_class)
    diffusers_classes = pipeline_loading_utils.LOADABLE_CLASSES["diffusers"]
    for module, base_class in COMPONENT_MODULES.items():
        pipeline_loading_utils.LOADABLE_CLASSES[module.__name__] = {base_class: diffusers_classes[base_class]}
    setattr(diffusers, ENATScheduler.__name__, ENATScheduler)
    if ENATScheduler.__name__ not in AmusedScheduler._compatibles:
        # A new list: the one there may be shared with other classes.
        AmusedScheduler._compatibles = [*AmusedScheduler._compatibles, ENATScheduler.__name__]
    register_with_auto_pipelines_when_imported()
