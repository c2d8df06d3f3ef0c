"""The sampling loop of every ENAT pipeline, in one place: guidance, feature reuse, the step callback, interruption,
and what an edit adds to a run ([`ENATEditState`]: rows per input image, the first step shared by them, the kept
tokens as fixed context), passed explicitly to `denoise` instead of being set on the pipeline around the call.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import check_choice
from .models.transformer_enat import (
    ENATConditioning,
    ENATKeptContext,
    ENATReuseState,
    ENATTransformer2DModelOutput,
)
from .schedulers.guidance import guidance_weight
from .schedulers.scheduling_enat import lowest_per_row, uniform_noise

# How the later steps of an editing run see the kept tokens (the `kept_context_mode` argument):
# "fixed": after the first step their features (the reuse projection of their first-pass features) and keys/values at
#   every block are computed once per image and guidance stream (`ENATTransformer2DModel.prepare_kept_context`) and
#   reused by every later step and every sample of the image; the region's tokens are all that is encoded.
# "refreshed": the generation rule: every step projects their features again and recomputes their keys/values at every
#   block, for every sample. Same first two steps as "fixed"; an inpainting costs more than generating the whole image
#   this way (docs, "Editing images").
KEPT_CONTEXT_MODES = ("fixed", "refreshed")

# Tensors the step callback can receive (`callback_on_step_end_tensor_inputs`).
CALLBACK_TENSOR_INPUTS = ["latents", "pred_original_sample"]


@dataclass
class ENATEditState:
    """
    What an editing run adds to the sampling loop, for one `denoise` call. The pipeline object holds none of it.

    Args:
        rows_per_image (`int`, defaults to 1):
            Consecutive batch rows (per guidance stream) that come from one input image: its
            `num_images_per_prompt` samples.
        kept_context_mode (`str`, defaults to `"fixed"`):
            How later steps see the tokens visible at the first step (`KEPT_CONTEXT_MODES`).
        share_first_step (`bool`, defaults to `True`):
            Run the first step once per image and guidance stream when its rows start identical (same tokens, same
            condition); their results are those of the unshared call.
        schedule_region (`torch.BoolTensor` shaped like the latents, *optional*):
            The tokens the masking schedule counts, when the run starts with only part of them masked (inpainting at
            `strength` < 1: the whole inpainting region, of which the schedule left a share masked). None: the tokens
            masked at the start (or the whole grid for a run that starts later in the schedule, image-to-image).
            Either way only the tokens masked at the start are generated: the others stay as they are.

    Filled in during the run:
        shared_rows (`int`): rows per image that shared the first step (1: none shared).
        kept_context (`ENATKeptContext` or None): the fixed context, from the first reuse step on (`"fixed"`).
        kept_context_made (`bool`): whether `kept_context` was made for this run.
    """

    rows_per_image: int = 1
    kept_context_mode: str = "fixed"
    share_first_step: bool = True
    schedule_region: torch.BoolTensor | None = None
    shared_rows: int = 1
    kept_context: ENATKeptContext | None = None
    kept_context_made: bool = False

    def __post_init__(self):
        check_choice(self.kept_context_mode, KEPT_CONTEXT_MODES, "kept_context_mode")
        self.rows_per_image = int(self.rows_per_image)


def map_rows(rows_output, function):
    """`rows_output` (an `ENATReuseState` or `ENATConditioning`) with `function` applied to each of its tensors, all of
    which have a batch axis first; fields that are None stay None."""
    return type(rows_output)(**{name: function(value) for name, value in rows_output.items()})


def mark_remasked_stale(
    reuse_state: ENATReuseState, latents: torch.LongTensor, mask: torch.BoolTensor, mask_token_id: int
) -> ENATReuseState:
    """
    The reuse state for the next step after a scheduler step that may have masked visible tokens again (remasking):
    their features are stale, so they count as masked in `reuse_state.masking`; when a later step reveals them, the
    transformer encodes them as critical tokens. `latents` are the step's input ids, `mask` its output mask, both
    `(batch_size, ...)`; the state may hold both guidance streams (`2 * batch_size` rows, the same tokens). Without
    remasking the state is unchanged.
    """
    remasked = (mask & (latents != mask_token_id)).reshape(latents.shape[0], -1)
    streams = reuse_state.masking.shape[0] // remasked.shape[0]
    remasked = remasked.repeat(streams, 1).to(reuse_state.masking.device)
    return ENATReuseState(features=reuse_state.features, masking=reuse_state.masking | remasked)


def mask_region_at_random(
    tokens: torch.LongTensor, region: torch.BoolTensor, counts: list[int], mask_token_id: int, generator=None
) -> torch.LongTensor:
    """
    `tokens` `(batch_size, ...)` with `counts[i]` tokens of row `i`'s `region` (`True` where the row may be masked)
    replaced by `mask_token_id`, chosen uniformly at random: the start of an inpainting run at `strength` < 1. One
    `torch.Generator` draws for the whole batch, a list draws row `i` from `generator[i]` alone (so a row equals the
    row alone); draws happen on the generator's device.
    """
    flat_region = region.reshape(tokens.shape[0], -1)
    # Tokens outside the region rank after every token inside it, so the lowest `count` ranks lie in the region.
    chance = torch.where(flat_region, uniform_noise(flat_region.shape, generator, tokens.device), 2.0)
    chosen = lowest_per_row(chance, torch.tensor(counts, device=tokens.device))
    return torch.where(chosen.reshape(tokens.shape), mask_token_id, tokens)


class ENATSamplingMixin:
    """The sampling loop of [`ENATBasePipeline`]. Reads the call's guidance settings (`guidance_scale`,
    `do_classifier_free_guidance`, diffusers' per-call properties) from the pipeline and everything else from its
    arguments."""

    def guidance_weight(self, step_index: int, num_inference_steps: int) -> float:
        """`s_k - 1` at step `step_index` of `num_inference_steps`: the weight `w` of `cond + w * (cond - uncond)`,
        which equals `uncond + s_k * (cond - uncond)`. Computed in this form so that the guided logits equal the
        reference sampler's bit for bit."""
        return guidance_weight(self._guidance_schedule, self._guidance_scale, step_index, num_inference_steps)

    @property
    def scheduler_runs_regions(self) -> bool:
        """Whether the scheduler's `step` runs its masking schedule over a region (takes `region_mask`, as
        `ENATScheduler` does); diffusers' `AmusedScheduler` does not."""
        return "region_mask" in inspect.signature(self.scheduler.step).parameters

    def scheduler_region_kwargs(
        self, latents: torch.LongTensor, *, late_start: bool, schedule_region: torch.BoolTensor | None = None
    ) -> dict:
        """The region arguments of `scheduler.step` for a run from `latents` (schedulers without them get none): the
        tokens the run generates (masked at its start), and the size of the region whose schedule the run follows:
        `schedule_region`'s where given (inpainting at `strength` < 1, masked by that region's schedule), else the
        whole grid for a run that starts later in the schedule (image-to-image, after `add_noise`), else the
        generated tokens themselves."""
        if not self.scheduler_runs_regions:
            return {}
        region_mask = latents == self.mask_token_id
        if schedule_region is None:
            return {"region_mask": region_mask, "starting_mask_ratio": 1.0 if late_start else None}
        # The generated tokens bound remasking (the others are fixed context); the schedule counts the whole region.
        sizes = schedule_region.reshape(latents.shape[0], -1).sum(dim=1).to("cpu", torch.float64)
        return {"region_mask": region_mask, "starting_mask_ratio": sizes / schedule_region[0].numel()}

    def transformer_forward(
        self,
        model_input: torch.LongTensor,
        *,
        condition_kwargs: dict,
        reuse_state: ENATReuseState | None = None,
        edit_state: ENATEditState | None = None,
    ) -> ENATTransformer2DModelOutput:
        """
        One transformer call of the sampling loop (both guidance streams stacked).

        With an `edit_state`, first step (no reuse state yet): the `rows_per_image` rows of one image and guidance
        stream are identical (same tokens, same condition), so the transformer runs once per image and stream and
        its logits, reuse state and conditioning are repeated for the other rows; this is where the kept tokens go
        through the encoder, so their cost is paid once per image. Rows that differ (image-to-image re-masks each
        sample at random) run as usual. Later steps with `kept_context_mode="fixed"`: the tokens visible at the first
        step become a fixed context (`ENATTransformer2DModel.prepare_kept_context`) at the first reuse step, once per
        image and stream where the first step was shared, and every later step attends to it.
        """
        if edit_state is None:
            return self.transformer(model_input, **condition_kwargs, reuse_state=reuse_state)
        if reuse_state is None:
            edit_state.kept_context, edit_state.kept_context_made = None, False
            return self._first_edit_step(model_input, condition_kwargs, edit_state)
        if edit_state.kept_context_mode == "fixed" and not edit_state.kept_context_made:
            edit_state.kept_context = self._make_kept_context(
                reuse_state, condition_kwargs.get("conditioning"), edit_state.shared_rows
            )
            edit_state.kept_context_made = True
        if edit_state.kept_context is None:
            return self.transformer(model_input, **condition_kwargs, reuse_state=reuse_state)
        return self.transformer(
            model_input, **condition_kwargs, reuse_state=reuse_state, kept_context=edit_state.kept_context
        )

    def _make_kept_context(
        self, reuse_state: ENATReuseState, conditioning: ENATConditioning | None, group: int
    ) -> ENATKeptContext | None:
        """The kept context from the first reuse state, one group per image and stream where the first step was
        shared (its rows are copies), else one per row."""
        if conditioning is None:
            return None
        if group > 1:
            reuse_state, conditioning = (
                map_rows(part, lambda rows: rows[::group]) for part in (reuse_state, conditioning)
            )
        return self.transformer.prepare_kept_context(reuse_state, conditioning, rows_per_group=group)

    def _first_edit_step(self, model_input: torch.LongTensor, condition_kwargs: dict, edit_state: ENATEditState):
        group = edit_state.rows_per_image
        edit_state.shared_rows = 1
        if not edit_state.share_first_step or group <= 1 or "conditioning" in condition_kwargs:
            return self.transformer(model_input, **condition_kwargs, reuse_state=None)
        unique_input = model_input[::group]
        unique_kwargs = {
            name: value[::group] if isinstance(value, torch.Tensor) else value
            for name, value in condition_kwargs.items()
        }
        pairs = [(model_input, unique_input)]
        pairs += [
            (value, unique_kwargs[name]) for name, value in condition_kwargs.items() if isinstance(value, torch.Tensor)
        ]
        if not all(torch.equal(full, unique.repeat_interleave(group, dim=0)) for full, unique in pairs):
            return self.transformer(model_input, **condition_kwargs, reuse_state=None)
        output = self.transformer(unique_input, **unique_kwargs, reuse_state=None)
        edit_state.shared_rows = group

        def repeat(rows):
            return rows.repeat_interleave(group, dim=0)

        return ENATTransformer2DModelOutput(
            logits=repeat(output.logits),
            reuse_state=map_rows(output.reuse_state, repeat),
            conditioning=map_rows(output.conditioning, repeat),
        )

    def denoise(
        self,
        latents: torch.LongTensor,
        *,
        condition_kwargs: dict[str, torch.Tensor | None],
        timesteps: torch.Tensor,
        num_inference_steps: int | None = None,
        generator=None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        edit_state: ENATEditState | None = None,
    ) -> torch.LongTensor:
        """
        Runs the sampling loop over `timesteps` from `latents` and returns token ids without mask ids.

        `condition_kwargs` come from `prepare_condition_kwargs`. `num_inference_steps` is the length of the full
        schedule that `timesteps` ends (default: `len(timesteps)`): the guidance ramp and the step index passed to
        the callback count from its start, so a run that starts later in the schedule (image-to-image) continues the
        ramp. `edit_state` ([`ENATEditState`]) is what an editing run adds (rows per image, shared first step, kept
        context); None for generation.

        The callback gets `latents` (the tokens after the step) and, when named in
        `callback_on_step_end_tensor_inputs`, `pred_original_sample` (the step's prediction: every masked token
        filled by its sample). After `pipe._interrupt = True` (from `callback_on_step_end`) the loop stops and the
        result is the last step's `pred_original_sample`. The flag is read after each step, and every call starts
        uninterrupted, so at least one step runs; with no timesteps at all the result is `latents` as given.
        """
        num_inference_steps = len(timesteps) if num_inference_steps is None else int(num_inference_steps)
        first_index = num_inference_steps - len(timesteps)
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self._num_timesteps = len(timesteps)
        reuse_state = None
        step_region = self.scheduler_region_kwargs(
            latents,
            late_start=first_index > 0,
            schedule_region=None if edit_state is None else edit_state.schedule_region,
        )
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for offset, timestep in enumerate(timesteps):
                step_index = first_index + offset
                guided = self.do_classifier_free_guidance
                model_input = torch.cat([latents, latents]) if guided else latents
                output = self.transformer_forward(
                    model_input, condition_kwargs=condition_kwargs, reuse_state=reuse_state, edit_state=edit_state
                )
                # The condition is the same at every step: later steps take the blocks' form of it from step 0.
                condition_kwargs = {"conditioning": output.conditioning}
                logits = output.logits
                if guided:
                    conditional, unconditional = logits.chunk(2)
                    logits = conditional + self.guidance_weight(step_index, num_inference_steps) * (
                        conditional - unconditional
                    )
                if not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"the transformer's logits hold NaN or infinite values at step {step_index}: the weights may "
                        "hold NaN/inf, or the model overflows in float16 (try bfloat16 or float32)"
                    )
                step_output = self.scheduler.step(logits, timestep, latents, generator=generator, **step_region)
                # Only a scheduler that reports the tokens it revealed keeps visible tokens fixed, which reuse needs.
                reuse_state = output.reuse_state if getattr(step_output, "critical_tokens", None) is not None else None
                if reuse_state is not None:
                    reuse_state = mark_remasked_stale(reuse_state, latents, step_output.mask, self.mask_token_id)
                latents = step_output.prev_sample
                prediction = step_output.pred_original_sample
                if callback_on_step_end is not None:
                    local_values = {"latents": latents, "pred_original_sample": prediction}
                    callback_kwargs = {name: local_values[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                    if not isinstance(callback_outputs, dict):
                        raise TypeError(
                            "`callback_on_step_end` must return a dict (empty, or replacing tensors named in "
                            f"`callback_on_step_end_tensor_inputs`), got {type(callback_outputs).__name__}"
                        )
                    latents = callback_outputs.pop("latents", latents)
                    prediction = callback_outputs.pop("pred_original_sample", prediction)
                progress_bar.update()
                if self.interrupt:
                    return prediction
        return latents


__all__ = [
    "CALLBACK_TENSOR_INPUTS",
    "KEPT_CONTEXT_MODES",
    "ENATEditState",
    "ENATSamplingMixin",
    "map_rows",
    "mark_remasked_stale",
    "mask_region_at_random",
]
