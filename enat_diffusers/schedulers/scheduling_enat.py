# Copyright 2025 The enat-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Confidence-based re-masking scheduler of ENAT (EfficientNAT, NeurIPS 2024)."""

import inspect
import math
import numbers
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AmusedScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

__all__ = ["AMUSED_MASKING_SCHEDULES", "MASKING_SCHEDULES", "ENATScheduler", "ENATSchedulerOutput", "SchedulerMixin"]

GeneratorType = torch.Generator | list[torch.Generator] | None

# The `masking_schedule` values of ENATScheduler.
MASKING_SCHEDULES = ("cosine", "linear", "arccos", "pow")
# The ones diffusers' AmusedScheduler knows: the values its `__init__` declares (a config converted from ours may name
# another one, which AmusedScheduler would only refuse at its first step).
AMUSED_MASKING_SCHEDULES = typing.get_args(
    inspect.signature(AmusedScheduler.__init__).parameters["masking_schedule"].annotation
)


@dataclass
class ENATSchedulerOutput(BaseOutput):
    """
    Output of [`ENATScheduler.step`]. Every field has the shape of the `sample` given to `step`:
    `(batch_size, height, width)` or `(batch_size, sequence_length)`.

    Args:
        prev_sample (`torch.LongTensor`):
            Token ids after the step: the least confident newly sampled tokens are replaced by `mask_token_id` again.
            This is the input of the next step.
        pred_original_sample (`torch.LongTensor`):
            Token ids with every masked position filled by the token sampled at this step and every visible token
            kept. Contains no mask ids; after the last step it equals `prev_sample`.
        mask (`torch.BoolTensor`):
            `True` where `prev_sample` is masked.
        critical_tokens (`torch.BoolTensor`):
            `True` where a token was masked before the step and is visible after it (the tokens this step
            revealed). ENAT's transformer re-encodes only these at the next step and reuses the features of the
            other visible tokens.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    mask: torch.BoolTensor
    critical_tokens: torch.BoolTensor


def _is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_generator(generator: GeneratorType, batch_size: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has {batch_size} rows; pass one "
                "generator per row, a single `torch.Generator`, or None."
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("`generator` list must contain only `torch.Generator` objects.")
        return
    raise TypeError(
        f"`generator` must be a `torch.Generator`, a list of them (one per batch row) or None, got {type(generator)}."
    )


def _check_starting_mask_ratio(starting_mask_ratio: float | torch.Tensor, batch_size: int) -> list[float]:
    """The ratio as one float per row, or a clear error."""
    if isinstance(starting_mask_ratio, torch.Tensor):
        if starting_mask_ratio.numel() not in (1, batch_size) or starting_mask_ratio.dtype == torch.bool:
            raise ValueError(
                "`starting_mask_ratio` must be a number or a tensor with one value or one per batch row "
                f"({batch_size}), got shape {tuple(starting_mask_ratio.shape)}."
            )
        ratios = starting_mask_ratio.reshape(-1).double().tolist()
    elif _is_real_number(starting_mask_ratio):
        ratios = [float(starting_mask_ratio)]
    else:
        raise TypeError(
            f"`starting_mask_ratio` must be a number or a tensor in [0, 1], got {type(starting_mask_ratio).__name__}."
        )
    if not all(0 <= ratio <= 1 for ratio in ratios):
        raise ValueError(f"`starting_mask_ratio` must lie in [0, 1], got {ratios}.")
    return ratios * batch_size if len(ratios) == 1 else ratios


def _uniform(shape: tuple[int, ...], generator: GeneratorType, device: torch.device) -> torch.Tensor:
    """Uniform float32 noise in [0, 1) of `shape`, drawn on each generator's own device and moved to `device`.

    With a list of generators, row `i` (along the first dimension) is drawn from `generator[i]` alone, so it equals
    what a batch of one row would get from that generator.
    """
    if isinstance(generator, (list, tuple)):
        rows = [torch.rand(shape[1:], generator=g, device=g.device).to(device) for g in generator]
        return torch.stack(rows)
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


class ENATScheduler(SchedulerMixin, ConfigMixin):
    """
    Scheduler of ENAT's iterative (MaskGIT-style) token sampling.

    Generation starts from a grid where every token is `mask_token_id`. At step `k` of `T` (`r = (k + 1) / T`) the
    scheduler receives the (already classifier-free guided) logits of the transformer and

    1. turns them into log-probabilities and samples a token at every masked position from
       `softmax(log_probs / max(sample_temperature * (1 - r), sample_temperature_floor))`;
    2. scores each sampled token by its log-probability plus `mask_temperature * (1 - r)` times Gumbel noise
       (visible tokens score `+inf`);
    3. masks again the `floor(n * masking_ratio(r))` lowest-scoring tokens of each row, `n` being the size of the
       row's masked region (below), and never more than were masked before the step.

    The masking schedule applies to each row's masked region, the tokens it had to generate when the run started, so
    every row finishes in `num_inference_steps` steps whatever its region (an inpainting row with 6 of 16 tokens
    masked reveals them over all 8 steps of an 8-step run, not in the last two). Rows of one batch may have regions
    of different sizes. The scheduler learns each row's region size `n` (kept in `region_sizes`):

    - from `step(..., starting_mask_ratio=...)` when given (aMUSEd's argument: the region as a fraction of the `L`
      tokens of a row, one number for the batch or one per row): `n = round(starting_mask_ratio * L)`;
    - otherwise at the first step of a run (step index 0, i.e. `timesteps[0]` after `set_timesteps`): `n` is the
      number of masked tokens of each row of `sample`, remembered for the later steps of the run;
    - otherwise (a run that starts later in the schedule, as image-to-image does after `add_noise`): `n = L`, the
      whole grid, which is the region `add_noise` masks from.

    A run from a fully masked grid (`n = L`) with the default cosine schedule is exactly the sampler of the ENAT
    reference code; guidance itself (weight `cfg * k / T` in the reference) is the pipeline's job.

    The scheduler is a drop-in replacement for diffusers' [`AmusedScheduler`] (same `set_timesteps` / `step` /
    `add_noise` calling conventions and `mask_token_id`), and `AmusedScheduler.from_config(enat_scheduler.config)`
    works the other way round; `step` accepts aMUSEd's `starting_mask_ratio`, so the scheduler also runs inside
    [`AmusedImg2ImgPipeline`] and [`AmusedInpaintPipeline`].

    This scheduler inherits from [`SchedulerMixin`] and [`ConfigMixin`]; see the superclass documentation for the
    generic methods (loading, saving, `from_config`).

    Args:
        mask_token_id (`int`, defaults to 1024):
            Token id marking a masked position. Must not be a valid codebook index: the logits given to `step` must
            have at most `mask_token_id` classes.
        masking_schedule (`str`, defaults to `"cosine"`):
            Fraction of tokens still masked after a step as a function of `r = (k + 1) / T`: `"cosine"`
            (`cos(pi / 2 * r)`, the reference), `"linear"` (`1 - r`), `"arccos"` (`arccos(r) / (pi / 2)`) or `"pow"`
            (`1 - r ** masking_schedule_power`).
        masking_schedule_power (`float`, defaults to 2.0):
            Exponent of the `"pow"` schedule; must be positive. Ignored by the other schedules.
        mask_temperature (`float`, defaults to 1.5):
            Scale of the Gumbel noise added to the confidence, annealed by `(1 - r)`. Can be overridden per run
            through `set_timesteps(..., temperature=...)`.
        sample_temperature (`float`, defaults to 6.0):
            Temperature of the token sampling, annealed by `(1 - r)`.
        sample_temperature_floor (`float`, defaults to 1e-3):
            Lower bound of the annealed sampling temperature; must be positive.
    """

    order = 1
    _compatibles = ["AmusedScheduler"]

    @register_to_config
    def __init__(
        self,
        mask_token_id: int = 1024,
        masking_schedule: str = "cosine",
        masking_schedule_power: float = 2.0,
        mask_temperature: float = 1.5,
        sample_temperature: float = 6.0,
        sample_temperature_floor: float = 1e-3,
    ):
        if not isinstance(mask_token_id, numbers.Integral) or isinstance(mask_token_id, bool) or mask_token_id < 0:
            raise ValueError(f"`mask_token_id` must be a non-negative integer, got {mask_token_id!r}.")
        if masking_schedule not in MASKING_SCHEDULES:
            raise ValueError(
                f"`masking_schedule` must be one of {', '.join(repr(s) for s in MASKING_SCHEDULES)}, "
                f"got {masking_schedule!r}."
            )
        if not _is_real_number(masking_schedule_power) or not masking_schedule_power > 0:
            raise ValueError(f"`masking_schedule_power` must be a positive number, got {masking_schedule_power!r}.")
        for name, value in (("mask_temperature", mask_temperature), ("sample_temperature", sample_temperature)):
            if not _is_real_number(value) or not 0 <= value < math.inf:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not _is_real_number(sample_temperature_floor) or not 0 < sample_temperature_floor < math.inf:
            raise ValueError(
                f"`sample_temperature_floor` must be a finite number > 0, got {sample_temperature_floor!r}."
            )

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        # Gumbel-noise scale of each step (float64, CPU), set by `set_timesteps`.
        self.temperatures: torch.Tensor | None = None
        # Masked-region size of each row of the current run, recorded at its first step (see the class docstring).
        self.region_sizes: list[int] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # schedule

    def masking_ratio(self, r: float) -> float:
        """Fraction of tokens that stay masked once a fraction `r` in `[0, 1]` of the steps is done (float64)."""
        schedule = self.config.masking_schedule
        if schedule == "cosine":
            # Same float64 operations, in the same order, as the reference sampler.
            return math.cos(r * math.pi * 0.5)
        if schedule == "linear":
            return 1.0 - r
        if schedule == "arccos":
            return math.acos(r) / (math.pi * 0.5)
        return 1.0 - r ** float(self.config.masking_schedule_power)

    def num_masked_after_step(self, step_index: int, seq_len: int) -> int:
        """
        Number of tokens still masked after step `step_index` (0-based) of `self.num_inference_steps` in a row whose
        masked region has `seq_len` tokens (the whole grid for generation): `floor(seq_len * masking_ratio((step_index
        + 1) / T))`. It is 0 after the last step.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before using the schedule.")
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"`step_index` must be in [0, {self.num_inference_steps}), got {step_index}.")
        r = 1.0 * (step_index + 1) / self.num_inference_steps
        return min(seq_len, max(0, math.floor(seq_len * self.masking_ratio(r))))

    def set_timesteps(
        self,
        num_inference_steps: int,
        temperature: float | tuple[float, float] | list[float] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        """
        Set the number of sampling steps. `timesteps` becomes `[T - 1, ..., 1, 0]` (like [`AmusedScheduler`]); the
        step index is the position of a timestep in it.

        Args:
            num_inference_steps (`int`):
                Number of sampling steps `T` (>= 1).
            temperature (`float` or pair of `float`, *optional*):
                Scale of the Gumbel noise that randomises which tokens are masked again (per step, stored in
                `self.temperatures`):

                - `None`: `mask_temperature * (1 - r)` at step `k`, `r = (k + 1) / T` (the reference).
                - a number `t`: `t * (1 - r)`, i.e. it replaces `mask_temperature` for this run only.
                - a pair `(start, end)`: linear from `start` at the first step to `end` at the last, without the
                  `(1 - r)` factor. This is [`AmusedScheduler`]'s convention; [`AmusedPipeline`] always passes its
                  own `temperature` argument (default `(2, 0)`) positionally, so inside that pipeline this form is
                  the one in use.
            device (`str` or `torch.device`, *optional*):
                Device of `timesteps`.
        """
        if not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool):
            raise TypeError(f"`num_inference_steps` must be an int, got {type(num_inference_steps).__name__}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        num_inference_steps = int(num_inference_steps)

        ratios = [1.0 * (k + 1) / num_inference_steps for k in range(num_inference_steps)]
        if temperature is None:
            base = float(self.config.mask_temperature)
            temperatures = [base * (1 - r) for r in ratios]
        elif _is_real_number(temperature):
            if not 0 <= temperature < math.inf:
                raise ValueError(f"`temperature` must be a finite number >= 0, got {temperature!r}.")
            temperatures = [float(temperature) * (1 - r) for r in ratios]
        elif isinstance(temperature, Sequence) and not isinstance(temperature, str):
            if len(temperature) != 2 or not all(_is_real_number(t) and 0 <= t < math.inf for t in temperature):
                raise ValueError(
                    f"`temperature` given as a sequence must be a pair (start, end) of finite numbers >= 0, got "
                    f"{temperature!r}."
                )
            start, end = float(temperature[0]), float(temperature[1])
            span = max(num_inference_steps - 1, 1)
            temperatures = [start + (end - start) * k / span for k in range(num_inference_steps)]
        else:
            raise TypeError(
                "`temperature` must be None, a number (replaces `mask_temperature`) or a (start, end) pair, got "
                f"{type(temperature).__name__}."
            )

        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps, device=device).flip(0)
        self.temperatures = torch.tensor(temperatures, dtype=torch.float64)
        self.region_sizes = None  # a new run: its first step records them

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step` or `add_noise`.")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"`timestep` must be a single value, got a tensor of shape {tuple(timestep.shape)}.")
            timestep = timestep.item()
        if not isinstance(timestep, numbers.Integral) or isinstance(timestep, bool):
            if _is_real_number(timestep) and float(timestep).is_integer():
                timestep = int(timestep)
            else:
                raise TypeError(
                    f"`timestep` must be an integer (an entry of `scheduler.timesteps`), got {timestep!r}."
                )
        timesteps = self.timesteps.tolist()
        if timestep not in timesteps:
            raise ValueError(f"`timestep` {timestep} is not one of `scheduler.timesteps` ({timesteps}).")
        return timesteps.index(timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Return `sample` unchanged (token ids need no scaling); present for interface compatibility."""
        return sample

    # ------------------------------------------------------------------------------------------------------------
    # randomness (tests replace these two methods)

    def draw_token_samples(self, logits: torch.Tensor, generator: GeneratorType = None) -> torch.LongTensor:
        """
        Draw one token per position from `Categorical(logits=logits)`.

        Args:
            logits (`torch.Tensor` of shape `(batch_size, sequence_length, num_classes)`):
                Unnormalised log-probabilities, already divided by the sampling temperature.
            generator (`torch.Generator`, list of `torch.Generator`, *optional*):
                One generator for the whole batch, one per batch row (row `i` then depends on `generator[i]` only),
                or None for the global random state. Draws happen on the generator's device.

        Returns:
            `torch.LongTensor` of shape `(batch_size, sequence_length)` on the device of `logits`.
        """
        batch_size, seq_len, num_classes = logits.shape
        probs = torch.softmax(logits.float(), dim=-1)
        if isinstance(generator, (list, tuple)):
            rows = [
                torch.multinomial(probs[i].to(g.device), 1, generator=g).to(logits.device)
                for i, g in enumerate(generator)
            ]
            return torch.stack(rows).view(batch_size, seq_len)
        if generator is not None:
            probs = probs.to(generator.device)
        samples = torch.multinomial(probs.reshape(-1, num_classes), 1, generator=generator)
        return samples.to(logits.device).view(batch_size, seq_len)

    def draw_gumbel_noise(
        self, shape: tuple[int, ...], generator: GeneratorType = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """
        Draw standard Gumbel noise.

        Args:
            shape (`tuple[int, ...]`):
                Shape of the noise, `(batch_size, sequence_length)` in `step`.
            generator (`torch.Generator`, list of `torch.Generator`, *optional*):
                As in [`~ENATScheduler.draw_token_samples`]; a list needs one generator per entry of `shape[0]`.
            device (`str` or `torch.device`, *optional*):
                Device of the returned tensor (CPU when None).

        Returns:
            `torch.Tensor` of shape `shape`, float32.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        uniform = _uniform(tuple(shape), generator, device)
        tiny = torch.finfo(uniform.dtype).tiny
        exponential = (-torch.log(uniform.clamp_min(tiny))).clamp_min(tiny)  # -log(u) > 0
        return -torch.log(exponential)

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        generator: GeneratorType = None,
        return_dict: bool = True,
        starting_mask_ratio: float | torch.Tensor | None = None,
    ) -> ENATSchedulerOutput | tuple:
        """
        Run one sampling step: sample every masked token, then mask again the least confident ones of each row's
        masked region (see the class docstring for how the region sizes are learned).

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, num_classes, height, width)` or
                `(batch_size, num_classes, sequence_length)`):
                Guided logits over the codebook (`num_classes <= mask_token_id`). Any float dtype; the step computes
                in float32.
            timestep (`int` or `torch.Tensor`):
                An entry of `self.timesteps`.
            sample (`torch.LongTensor` of shape `(batch_size, height, width)` or `(batch_size, sequence_length)`):
                Current token ids, `mask_token_id` at masked positions.
            generator (`torch.Generator`, list of `torch.Generator`, *optional*):
                Random source; a list must hold one generator per batch row.
            return_dict (`bool`, defaults to `True`):
                Return an [`ENATSchedulerOutput`] instead of a tuple.
            starting_mask_ratio (`float` or `torch.Tensor`, *optional*):
                The masked region as a fraction of the tokens of a row, in `[0, 1]`: one number for the whole batch
                or a tensor with one per row ([`AmusedInpaintPipeline`] passes it at every step). Without it the
                region is what the first step of the run saw masked (the whole grid for a run that starts later).

        Returns:
            [`ENATSchedulerOutput`] or `tuple`: `(prev_sample, pred_original_sample, mask, critical_tokens)`, all
            shaped like `sample`.
        """
        if not isinstance(model_output, torch.Tensor) or not model_output.is_floating_point():
            raise TypeError("`model_output` must be a floating-point tensor of logits.")
        if not isinstance(sample, torch.Tensor) or sample.is_floating_point() or sample.dtype == torch.bool:
            raise TypeError("`sample` must be an integer tensor of token ids.")
        if sample.ndim not in (2, 3) or model_output.ndim != sample.ndim + 1:
            raise ValueError(
                "`model_output` must be (batch, num_classes, height, width) with `sample` (batch, height, width), or "
                "(batch, num_classes, seq_len) with `sample` (batch, seq_len); got shapes "
                f"{tuple(model_output.shape)} and {tuple(sample.shape)}."
            )
        if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[1:]:
            raise ValueError(
                f"`model_output` {tuple(model_output.shape)} does not match `sample` {tuple(sample.shape)}: expected "
                "the same batch size and the class dimension at dim 1."
            )
        mask_id = int(self.config.mask_token_id)
        num_classes = model_output.shape[1]
        if num_classes > mask_id:
            raise ValueError(
                f"`model_output` has {num_classes} classes but `mask_token_id` is {mask_id}: the sampled ids would "
                f"include the mask id. Pass only the codebook logits (at most {mask_id} classes)."
            )
        step_index = self._step_index(timestep)
        batch_size = sample.shape[0]
        _check_generator(generator, batch_size)

        ids = sample.reshape(batch_size, -1)
        seq_len = ids.shape[1]
        region_sizes = self._region_sizes(step_index, ids == mask_id, starting_mask_ratio)
        logits = model_output.reshape(batch_size, num_classes, seq_len).transpose(1, 2).float()

        r = 1.0 * (step_index + 1) / self.num_inference_steps
        sample_temperature = max(float(self.config.sample_temperature) * (1 - r), self.config.sample_temperature_floor)
        noise_scale = float(self.temperatures[step_index])

        log_probs = torch.log_softmax(logits, dim=-1)
        was_masked = ids == mask_id
        drawn = self.draw_token_samples(log_probs / sample_temperature, generator).to(ids.device)
        filled = torch.where(was_masked, drawn, ids)

        # Confidence of each sampled token; visible tokens are never masked again.
        chosen_log_probs = torch.gather(log_probs, -1, filled.clamp(0, num_classes - 1).unsqueeze(-1)).squeeze(-1)
        confidence = torch.where(was_masked, chosen_log_probs, torch.full_like(chosen_log_probs, math.inf))
        noise = self.draw_gumbel_noise((batch_size, seq_len), generator, device=ids.device)
        if noise.device.type == "mps":  # no float64 there
            confidence = confidence + noise.float() * noise_scale
        else:  # scale in float64, then round, as the reference does
            confidence = confidence + (noise.double() * noise_scale).float()

        # Mask again the lowest-confidence tokens of each row's region, never more than were masked before the step.
        targets = [self.num_masked_after_step(step_index, size) for size in region_sizes]
        num_to_mask = torch.minimum(was_masked.sum(dim=1), torch.tensor(targets, device=ids.device))  # (batch_size,)
        order = confidence.argsort(dim=-1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(seq_len, device=ids.device).expand(batch_size, seq_len))
        new_mask = rank < num_to_mask.unsqueeze(1)

        prev_sample = torch.where(new_mask, torch.full_like(filled, mask_id), filled).to(sample.dtype)
        pred_original_sample = filled.to(sample.dtype)
        critical_tokens = was_masked & ~new_mask

        outputs = tuple(
            t.reshape(sample.shape) for t in (prev_sample, pred_original_sample, new_mask, critical_tokens)
        )
        if not return_dict:
            return outputs
        return ENATSchedulerOutput(*outputs)

    def _region_sizes(
        self, step_index: int, was_masked: torch.BoolTensor, starting_mask_ratio: float | torch.Tensor | None
    ) -> list[int]:
        """Each row's masked-region size for this step (the rules are in the class docstring)."""
        batch_size, seq_len = was_masked.shape
        if starting_mask_ratio is not None:
            ratios = _check_starting_mask_ratio(starting_mask_ratio, batch_size)
            return [round(ratio * seq_len) for ratio in ratios]
        if step_index == 0:
            self.region_sizes = was_masked.sum(dim=1).tolist()
        if self.region_sizes is None:
            return [seq_len] * batch_size
        if len(self.region_sizes) != batch_size:
            raise ValueError(
                f"`sample` has {batch_size} rows but the first step of this run had {len(self.region_sizes)}; call "
                "`set_timesteps` to start a new run."
            )
        return self.region_sizes

    # ------------------------------------------------------------------------------------------------------------
    # training

    def add_noise(
        self,
        sample: torch.LongTensor,
        timesteps: int | torch.Tensor,
        generator: GeneratorType = None,
    ) -> torch.LongTensor:
        """
        Mask tokens of clean token ids for training, as many as remain masked after the step of `timesteps` (the
        meaning [`AmusedScheduler.add_noise`] gives it): `floor(L * masking_ratio((k + 1) / T))` tokens per row,
        exactly the same number in every row, at uniformly random positions. Needs `set_timesteps` first.

        Args:
            sample (`torch.LongTensor` of shape `(batch_size, height, width)` or `(batch_size, sequence_length)`):
                Clean token ids.
            timesteps (`int` or single-value `torch.Tensor`):
                An entry of `self.timesteps`; one value for the whole batch.
            generator (`torch.Generator`, list of `torch.Generator`, *optional*):
                Random source for the positions; a list must hold one generator per batch row.

        Returns:
            `torch.LongTensor` shaped like `sample`, `mask_token_id` at the masked positions.
        """
        if not isinstance(sample, torch.Tensor) or sample.is_floating_point() or sample.dtype == torch.bool:
            raise TypeError("`sample` must be an integer tensor of token ids.")
        if sample.ndim not in (2, 3):
            raise ValueError(
                f"`sample` must be (batch, height, width) or (batch, seq_len), got shape {tuple(sample.shape)}."
            )
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 1:
            if not bool((timesteps == timesteps.reshape(-1)[0]).all()):
                raise ValueError(
                    "`timesteps` must be one value for the whole batch (every row gets the same number of masked "
                    f"tokens), got {timesteps.tolist()}."
                )
            timesteps = timesteps.reshape(-1)[0]
        step_index = self._step_index(timesteps)
        batch_size = sample.shape[0]
        _check_generator(generator, batch_size)

        ids = sample.reshape(batch_size, -1)
        seq_len = ids.shape[1]
        num_to_mask = self.num_masked_after_step(step_index, seq_len)
        rank = _uniform((batch_size, seq_len), generator, ids.device).argsort(dim=-1).argsort(dim=-1)
        masked = torch.where(rank < num_to_mask, torch.full_like(ids, self.config.mask_token_id), ids)
        return masked.reshape(sample.shape)
