"""Class-conditional image generation with ENAT."""

import difflib
from collections.abc import Callable

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring

from ..models.transformer_enat import ENATTransformer2DModel
from ..models.vq_maskgit import MaskGITVQModel
from .sampling_enat import ENATSamplingMixin

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import enat_diffusers  # registers the ENAT classes with diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/enat-l-256")
        >>> image = pipe(class_labels=["golden retriever"], generator=torch.manual_seed(0)).images[0]
        ```
"""


class ENATPipeline(ENATSamplingMixin, DiffusionPipeline):
    r"""
    Class-conditional image generation with an ENAT transformer and a MaskGIT VQ tokenizer.

    Args:
        transformer ([`ENATTransformer2DModel`]): Predicts the tokens of the image grid.
        vqvae ([`MaskGITVQModel`]): Turns token ids into images.
        scheduler ([`SchedulerMixin`]): An [`ENATScheduler`] (with feature reuse) or diffusers' `AmusedScheduler`
            (every visible token is recomputed at every step).
        id2label (`dict[int, str]`, *optional*): Class names, comma-separated synonyms per class, for
            `get_label_ids` and for passing names as `class_labels` (keys may be strings, as json stores them).
        default_num_inference_steps (`int`, defaults to 8): Used when `__call__` gets no `num_inference_steps`.
        default_guidance_scale (`float`, defaults to 2.5): Used when `__call__` gets no `guidance_scale`.
    """

    custom_pipeline_module = "pipeline_enat"
    _card_pipeline_tag = "unconditional-image-generation"
    _card_call = "images = pipe(class_labels=[0, 1], generator=torch.manual_seed(0)).images"
    _card_tags = ("class-conditional",)

    def __init__(
        self,
        transformer: ENATTransformer2DModel,
        vqvae: MaskGITVQModel,
        scheduler: SchedulerMixin,
        id2label: dict | None = None,
        default_num_inference_steps: int = 8,
        default_guidance_scale: float = 2.5,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
        self.register_to_config(
            id2label=id2label,
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
        )
        self.labels = {}
        for class_id, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = int(class_id)
        self._init_sampling_state()

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Maps class names (any synonym listed in `id2label`) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError("this pipeline has no `id2label` class names; pass class ids instead of names")
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            hints = {name: difflib.get_close_matches(name, list(self.labels), n=5, cutoff=0.5) for name in unknown}
            hint_text = "; ".join(f"{name!r}: close matches {matches or 'none'}" for name, matches in hints.items())
            raise ValueError(f"unknown class name(s) in `class_labels`: {hint_text}")
        return [self.labels[name] for name in names]

    def _class_ids(self, class_labels: int | str | list[int | str] | torch.Tensor) -> list[int]:
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or not class_labels:
            raise TypeError("`class_labels` must be a class id, a class name, or a non-empty list of them")
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, int) and not isinstance(label, bool):
                ids.append(label)
            else:
                raise TypeError(f"`class_labels` entries must be ints or class names, got {type(label).__name__}")
        num_classes = self.transformer.config.num_classes
        out_of_range = [label for label in ids if not 0 <= label < num_classes]
        if out_of_range:
            raise ValueError(f"`class_labels` must be class ids in [0, {num_classes - 1}], got {out_of_range}")
        return ids

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "linear",
        num_images_per_class: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.LongTensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images of the given classes.

        Args:
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`):
                Class ids in `[0, num_classes)` or class names known to `id2label`.
            num_inference_steps (`int`, *optional*):
                Sampling steps, in `[1, number of tokens]`; defaults to the pipeline config (8 for ENAT).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance weight `w` in `cond + w * (cond - uncond)`; 0 disables guidance. Defaults to
                the pipeline config (2.5 at 256 px, 3.5 at 512 px for the reference models).
            guidance_schedule (`str`, defaults to `"linear"`):
                `"linear"` ramps the weight from 0 at the first step to `guidance_scale * (T-1)/T` at the last, as
                the reference sampler; `"constant"` uses `guidance_scale` at every step.
            num_images_per_class (`int`, defaults to 1):
                Images generated for each entry of `class_labels`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image: image `i` then only depends on generator `i`.
            latents (`torch.LongTensor` of shape `(batch_size, side, side)`, *optional*):
                Starting token ids (mask token id for tokens to generate); fully masked by default.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` images, or `"latent"` for the token ids.
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)` after every step; it may
                return a dict with replaced tensors named in `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Tensors passed to the callback; only `"latents"`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: generated images (token ids for `output_type="latent"`).
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_inference_steps, guidance_scale = self._resolve_defaults(num_inference_steps, guidance_scale)
        class_ids = self._class_ids(class_labels)
        if not isinstance(num_images_per_class, int) or num_images_per_class < 1:
            raise ValueError(f"`num_images_per_class` must be a positive integer, got {num_images_per_class}")
        class_ids = [label for label in class_ids for _ in range(num_images_per_class)]
        batch_size = len(class_ids)
        self._check_sampling_inputs(
            batch_size,
            num_inference_steps,
            guidance_scale,
            guidance_schedule,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        labels = torch.tensor(class_ids, device=self._execution_device)
        if self.do_classifier_free_guidance:
            labels = torch.cat([labels, torch.full_like(labels, self.transformer.null_class_label)])
        latents = self._sample(
            batch_size,
            {"class_labels": labels},
            num_inference_steps,
            guidance_schedule,
            generator,
            latents,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        return self._decode(latents, output_type, return_dict)
