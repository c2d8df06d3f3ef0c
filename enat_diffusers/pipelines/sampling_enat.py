"""The sampling loop shared by the ENAT pipelines: guidance, feature reuse, callbacks, decoding and output types."""

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..hub import ENATHubMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_SCHEDULES = ("linear", "constant")

# Written next to model_index.json so that diffusers' custom-pipeline loading can find the class.
_CUSTOM_PIPELINE_TEMPLATE = '''"""Lets `DiffusionPipeline.from_pretrained(..., custom_pipeline="{module}", trust_remote_code=True)` find
{class_name} without importing enat_diffusers first (the package must be installed: pip install enat-diffusers)."""

from {defining_module} import {class_name}  # noqa: F401
'''

_CARD_USAGE = """
import torch
import enat_diffusers  # registers the ENAT classes with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
{call}
"""


class ENATSamplingMixin(ENATHubMixin):
    """
    Shared by `ENATPipeline` and `ENATText2ImagePipeline`. Subclasses provide the conditioning of both guidance
    streams and call `_sample`.

    With classifier-free guidance the conditional and unconditional streams run as one batch of `2 * batch_size`
    rows; each row keeps its own reuse state, so each stream reuses its own previous features.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _callback_tensor_inputs = ["latents"]
    custom_pipeline_module: str = None
    _card_call: str = None

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def token_grid_size(self) -> int:
        return self.transformer.config.sample_size

    @property
    def mask_token_id(self) -> int:
        return self.scheduler.config.mask_token_id

    def _init_sampling_state(self) -> None:
        """Called at the end of `__init__`, after the pipeline config is registered."""
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self._guidance_scale = self.config.default_guidance_scale
        self._num_timesteps = 0
        self._interrupt = False

    def _card_usage(self, repo_id: str) -> str:
        return _CARD_USAGE.format(repo_id=repo_id, call=self._card_call)

    def _resolve_defaults(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        steps = self.config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        return steps, scale

    def _check_sampling_inputs(
        self,
        batch_size: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_schedule: str,
        generator,
        latents: torch.LongTensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        num_tokens = self.token_grid_size**2
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_tokens:
            raise ValueError(
                f"`num_inference_steps` must be an integer in [1, {num_tokens}], got {num_inference_steps}"
            )
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale}")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {batch_size} images are requested; "
                "pass one generator per image"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}"
            )
        if latents is not None:
            self._check_latents(latents, batch_size)

    def _check_latents(self, latents: torch.LongTensor, batch_size: int) -> None:
        side = self.token_grid_size
        if not isinstance(latents, torch.Tensor) or latents.dtype not in (torch.int32, torch.int64):
            raise TypeError("`latents` must be an integer torch.Tensor of token ids")
        if tuple(latents.shape) != (batch_size, side, side):
            raise ValueError(f"`latents` must have shape {(batch_size, side, side)}, got {tuple(latents.shape)}")
        if latents.min() < 0 or latents.max() > self.mask_token_id:
            raise ValueError(
                f"`latents` must hold token ids in [0, {self.mask_token_id}] ({self.mask_token_id} = masked), "
                f"got values in [{latents.min().item()}, {latents.max().item()}]"
            )

    def _guidance_weight(self, step_index: int, num_steps: int, guidance_schedule: str) -> float:
        """Weight `w` of `cond + w * (cond - uncond)`; the linear schedule starts unguided, as the reference does."""
        if guidance_schedule == "constant":
            return self._guidance_scale
        return self._guidance_scale * step_index / num_steps

    def _sample(
        self,
        batch_size: int,
        condition_kwargs: dict[str, torch.Tensor],
        num_inference_steps: int,
        guidance_schedule: str,
        generator,
        latents: torch.LongTensor | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.LongTensor:
        """
        Runs the sampling loop. `condition_kwargs` are the transformer's conditioning arguments, batched as
        `[conditional; unconditional]` (`2 * batch_size` rows) when guidance is on. Returns token ids
        `(batch_size, side, side)` without masked tokens.
        """
        device = self._execution_device
        side = self.token_grid_size
        if latents is None:
            latents = torch.full((batch_size, side, side), self.mask_token_id, dtype=torch.long, device=device)
        latents = latents.to(device=device, dtype=torch.long)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        reuse_state = None
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step_index, timestep in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
                output = self.transformer(model_input, **condition_kwargs, reuse_state=reuse_state)
                # The condition is the same at every step: later steps take the blocks' form of it from step 0.
                condition_kwargs = {"conditioning": output.conditioning}
                logits = output.logits
                if self.do_classifier_free_guidance:
                    conditional, unconditional = logits.chunk(2)
                    weight = self._guidance_weight(step_index, len(timesteps), guidance_schedule)
                    logits = conditional + weight * (conditional - unconditional)
                step_output = self.scheduler.step(logits, timestep, latents, generator=generator)
                latents = step_output.prev_sample
                # Only a scheduler that reports the tokens it revealed keeps visible tokens fixed, which reuse needs.
                reuse_state = output.reuse_state if getattr(step_output, "critical_tokens", None) is not None else None
                if callback_on_step_end is not None:
                    local_values = {"latents": latents}
                    callback_kwargs = {name: local_values[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    def _decode(self, latents: torch.LongTensor, output_type: str, return_dict: bool):
        if output_type == "latent":
            images = latents
        else:
            images = self.vqvae.decode(latents).sample
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, plus a one-line module that lets diffusers' custom-pipeline loading
        find this class without importing enat_diffusers first."""
        # Written first so that `push_to_hub=True` uploads it too.
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        module_file = Path(save_directory) / f"{self.custom_pipeline_module}.py"
        module_file.write_text(
            _CUSTOM_PIPELINE_TEMPLATE.format(
                module=self.custom_pipeline_module,
                class_name=type(self).__name__,
                defining_module=type(self).__module__,
            )
        )
        super().save_pretrained(save_directory, *args, **kwargs)
