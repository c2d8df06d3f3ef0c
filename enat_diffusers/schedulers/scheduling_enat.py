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
"""Token sampler of ENAT (EfficientNAT, NeurIPS 2024): confidence or Halton reveal order, optional remasking."""

import functools
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

__all__ = [
    "AMUSED_MASKING_SCHEDULES",
    "MASKING_SCHEDULES",
    "TOKEN_ORDERS",
    "ENATScheduler",
    "ENATSchedulerOutput",
    "SchedulerMixin",
    "halton_ranks",
    "lowest_per_row",
    "uniform_noise",
]

GeneratorType = torch.Generator | list[torch.Generator] | None

# The `masking_schedule` values of ENATScheduler.
MASKING_SCHEDULES = ("cosine", "linear", "arccos", "pow")
# The `token_order` values: which masked tokens a step reveals.
TOKEN_ORDERS = ("confidence", "halton")
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
            Token ids after the step: the tokens the step leaves (or, with remasking, puts back) under the mask are
            `mask_token_id`. This is the input of the next step.
        pred_original_sample (`torch.LongTensor`):
            Token ids with every masked position filled by the token sampled at this step and every visible token
            kept. Contains no mask ids; after the last step it equals `prev_sample`.
        mask (`torch.BoolTensor`):
            `True` where `prev_sample` is masked.
        critical_tokens (`torch.BoolTensor`):
            `True` where a token was masked before the step and is visible after it (the tokens this step
            revealed). ENAT's transformer re-encodes only these at the next step and reuses the features of the
            other visible tokens. A remasked token is masked after the step; when a later step reveals it again it
            is a critical token of that step.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    mask: torch.BoolTensor
    critical_tokens: torch.BoolTensor


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# What each config entry accepts: (test, description for the error). One rule per entry, checked in one place.
_CONFIG_RULES = {
    "mask_token_id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "masking_schedule": (lambda v: v in MASKING_SCHEDULES, f"one of {MASKING_SCHEDULES}"),
    "masking_schedule_power": (lambda v: _is_real(v) and 0 < v < math.inf, "a finite number > 0"),
    "mask_temperature": (lambda v: _is_real(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "sample_temperature": (lambda v: _is_real(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "sample_temperature_floor": (lambda v: _is_real(v) and 0 < v < math.inf, "a finite number > 0"),
    "token_order": (lambda v: v in TOKEN_ORDERS, f"one of {TOKEN_ORDERS}"),
    "remasking": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
}


def _check_config(config: dict) -> None:
    for name, (accepts, accepted) in _CONFIG_RULES.items():
        if not accepts(config[name]):
            raise ValueError(f"`{name}` must be {accepted}, got {config[name]!r}.")


def uniform_noise(shape: tuple[int, ...], generator: GeneratorType, device: torch.device) -> torch.Tensor:
    """Uniform float32 noise in [0, 1) of `shape`, drawn on each generator's own device and moved to `device`.

    With a list of generators, row `i` (along the first dimension) is drawn from `generator[i]` alone, so it equals
    what a batch of one row would get from that generator.
    """
    if isinstance(generator, (list, tuple)):
        rows = [torch.rand(shape[1:], generator=g, device=g.device).to(device) for g in generator]
        return torch.stack(rows)
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def _radical_inverse(index: int, base: int) -> float:
    """`index` written in `base`, digits mirrored behind the point: the van der Corput sequence."""
    result, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        result += digit * scale
        scale /= base
    return result


@functools.lru_cache(maxsize=32)
def _halton_ranks(height: int, width: int) -> tuple[int, ...]:
    ranks = [-1] * (height * width)
    found, index = 0, 0
    while found < height * width:
        index += 1
        position = int(_radical_inverse(index, 2) * height) * width + int(_radical_inverse(index, 3) * width)
        if ranks[position] < 0:
            ranks[position] = found
            found += 1
    return tuple(ranks)


def halton_ranks(height: int, width: int) -> torch.LongTensor:
    """
    Reveal rank of every raster position of a `height x width` token grid in the Halton order (Besnier et al., ICLR
    2025): the 2-D Halton sequence (bases 2 and 3) visits the grid's cells in a low-discrepancy order; each cell
    takes the index of its first visit. Rank 0 is revealed first; the ranks are a permutation of `height * width`.

    Returns:
        `torch.LongTensor` of shape `(height * width,)`.
    """
    return torch.tensor(_halton_ranks(int(height), int(width)))


class ENATScheduler(SchedulerMixin, ConfigMixin):
    """
    Scheduler of ENAT's iterative (MaskGIT-style) token sampling.

    Generation starts from a grid where every token is `mask_token_id`. At step `k` of `T` (`r = (k + 1) / T`) the
    scheduler receives the (already classifier-free guided) logits of the transformer and

    1. turns them into log-probabilities and samples a token at every masked position from
       `softmax(log_probs / max(sample_temperature * (1 - r), sample_temperature_floor))`;
    2. scores each sampled token (visible tokens score `+inf`): with `token_order="confidence"` (the reference) by
       its log-probability plus `mask_temperature * (1 - r)` times Gumbel noise; with `"halton"` by its position in
       a fixed low-discrepancy spatial order ([`halton_ranks`]), so which tokens a step reveals does not depend on
       the model;
    3. keeps masked the `floor(n * masking_ratio(r))` lowest-scoring tokens of each row, `n` being the size of the
       row's region (below), never more than were masked before the step;
    4. with `remasking > 0` (ReMDM, Wang et al. 2025), masks again `floor(remasking * min(v, m))` tokens of the row
       that earlier steps revealed, at random (`v` such tokens, `m` the number that stay masked), and reveals as
       many more of the masked ones, so every step still ends with `m` masked tokens and a run still ends in `T`
       steps. A remasked token is resampled at a later step.

    The region of a row is the set of tokens the run generates. `step` learns its size `n` from its arguments alone
    (the scheduler keeps no state between steps):

    - `starting_mask_ratio` (aMUSEd's argument: the region as a fraction of the `L` tokens of a row, one number or one
      per row): `n = round(starting_mask_ratio * L)`;
    - else `region_mask` (`True` at the tokens the run generates, which ENAT's pipelines pass: the tokens masked when
      the run started): `n` is its count per row;
    - else `n = L`, the whole grid (aMUSEd's convention).

    Remasking only picks tokens inside `region_mask` (the whole grid without it), so an edit never touches the kept
    tokens of an image.

    A run from a fully masked grid with the defaults is exactly the sampler of the ENAT reference code; guidance
    (weight `cfg * k / T` in the reference) is the pipeline's job.

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
            through `set_timesteps(..., temperature=...)`. Unused with `token_order="halton"`.
        sample_temperature (`float`, defaults to 6.0):
            Temperature of the token sampling, annealed by `(1 - r)`.
        sample_temperature_floor (`float`, defaults to 1e-3):
            Lower bound of the annealed sampling temperature; must be positive.
        token_order (`str`, defaults to `"confidence"`):
            Which masked tokens a step reveals: `"confidence"` (the most confident, with annealed Gumbel noise: the
            reference) or `"halton"` (a fixed spatial order, [`halton_ranks`]).
        remasking (`float`, defaults to 0.0):
            Strength of ReMDM-style remasking in `[0, 1]`: the fraction of the largest number of revealed tokens a
            step may mask again while keeping the schedule. 0 (the reference) never masks a revealed token again.
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
        token_order: str = "confidence",
        remasking: float = 0.0,
    ):
        _check_config(self.config)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        # Gumbel-noise scale of each step (float64, CPU), set by `set_timesteps`.
        self.temperatures: torch.Tensor | None = None

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
        region has `seq_len` tokens (the whole grid for generation): `floor(seq_len * masking_ratio((step_index + 1)
        / T))`. It is 0 after the last step.
        """
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
                Scale of the Gumbel noise that randomises which tokens stay masked (per step, stored in
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
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        steps = int(num_inference_steps)
        is_pair = isinstance(temperature, Sequence) and not isinstance(temperature, str) and len(temperature) == 2
        values = temperature if is_pair else [temperature]
        if not (temperature is None or all(_is_real(t) and 0 <= t < math.inf for t in values)):
            raise ValueError(
                "`temperature` must be None, a finite number >= 0 (replaces `mask_temperature`) or a (start, end) "
                f"pair of them, got {temperature!r}."
            )
        if is_pair:
            start, end = float(temperature[0]), float(temperature[1])
            temperatures = [start + (end - start) * k / max(steps - 1, 1) for k in range(steps)]
        else:
            base = float(self.config.mask_temperature if temperature is None else temperature)
            temperatures = [base * (1 - 1.0 * (k + 1) / steps) for k in range(steps)]

        self.num_inference_steps = steps
        self.timesteps = torch.arange(steps, device=device).flip(0)
        self.temperatures = torch.tensor(temperatures, dtype=torch.float64)

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step` or `add_noise`.")
        value = torch.as_tensor(timestep).reshape(-1).cpu()
        matches = (self.timesteps.cpu() == value).nonzero() if value.numel() == 1 else value[:0]
        if matches.numel() != 1:
            raise ValueError(
                f"`timestep` must be one of `scheduler.timesteps` {self.timesteps.tolist()}, got {timestep}."
            )
        return int(matches)

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
        uniform = uniform_noise(tuple(shape), generator, device)
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
        region_mask: torch.BoolTensor | None = None,
    ) -> ENATSchedulerOutput | tuple:
        """
        Run one sampling step: sample every masked token, then choose which tokens of each row's region stay (or,
        with remasking, become) masked (see the class docstring).

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
                The region as a fraction of the tokens of a row, in `[0, 1]`: one number for the whole batch or a
                tensor with one per row ([`AmusedInpaintPipeline`] passes it at every step).
            region_mask (`torch.BoolTensor` shaped like `sample`, *optional*):
                `True` at the tokens this run generates (the tokens masked when it started), the same at every step
                of a run. Sizes the schedule when `starting_mask_ratio` is not given, and bounds remasking.

        Returns:
            [`ENATSchedulerOutput`] or `tuple`: `(prev_sample, pred_original_sample, mask, critical_tokens)`, all
            shaped like `sample`.
        """
        step_index = self._step_index(timestep)
        ids, logits, region, region_sizes = self._check_step_inputs(
            model_output, sample, generator, starting_mask_ratio, region_mask
        )
        batch_size, seq_len = ids.shape
        num_classes = logits.shape[-1]
        mask_id = int(self.config.mask_token_id)

        r = 1.0 * (step_index + 1) / self.num_inference_steps
        sample_temperature = max(float(self.config.sample_temperature) * (1 - r), self.config.sample_temperature_floor)

        log_probs = torch.log_softmax(logits, dim=-1)
        was_masked = ids == mask_id
        drawn = self.draw_token_samples(log_probs / sample_temperature, generator).to(ids.device)
        filled = torch.where(was_masked, drawn, ids)

        # Score of each sampled token; visible tokens (+inf) are never among the lowest.
        if self.config.token_order == "halton":
            side = math.isqrt(seq_len) if sample.ndim == 2 else sample.shape[1]
            height, width = (side, seq_len // side) if side * (seq_len // side) == seq_len else (1, seq_len)
            score = -halton_ranks(height, width).to(ids.device, torch.float32).expand(batch_size, seq_len)
        else:
            score = torch.gather(log_probs, -1, filled.clamp(0, num_classes - 1).unsqueeze(-1)).squeeze(-1)
            noise = self.draw_gumbel_noise((batch_size, seq_len), generator, device=ids.device)
            noise_scale = float(self.temperatures[step_index])
            if noise.device.type == "mps":  # no float64 there
                score = score + noise.float() * noise_scale
            else:  # scale in float64, then round, as the reference does
                score = score + (noise.double() * noise_scale).float()
        score = torch.where(was_masked, score, torch.full_like(score, math.inf))

        # Keep masked the lowest-scoring tokens of each row's region, never more than were masked before the step.
        targets = torch.tensor(
            [self.num_masked_after_step(step_index, size) for size in region_sizes], device=ids.device
        )
        num_to_mask = torch.minimum(was_masked.sum(dim=1), targets)  # (batch_size,)
        remasked = torch.zeros_like(was_masked)
        if self.config.remasking > 0:
            # ReMDM: mask again some revealed tokens of the region, reveal as many more; the masked count is unchanged.
            candidates = region & ~was_masked
            num_remasked = (self.config.remasking * torch.minimum(candidates.sum(dim=1), num_to_mask)).floor().long()
            chance = torch.where(candidates, uniform_noise((batch_size, seq_len), generator, ids.device), 2.0)
            remasked = lowest_per_row(chance, num_remasked)
            num_to_mask = num_to_mask - num_remasked
        new_mask = lowest_per_row(score, num_to_mask) | remasked

        prev_sample = torch.where(new_mask, torch.full_like(filled, mask_id), filled).to(sample.dtype)
        pred_original_sample = filled.to(sample.dtype)
        critical_tokens = was_masked & ~new_mask

        outputs = tuple(
            t.reshape(sample.shape) for t in (prev_sample, pred_original_sample, new_mask, critical_tokens)
        )
        if not return_dict:
            return outputs
        return ENATSchedulerOutput(*outputs)

    def _check_step_inputs(self, model_output, sample, generator, starting_mask_ratio, region_mask):
        """
        The checks that protect a caller of `step` from silent garbage, in one place. Returns the token ids `(B, L)`,
        the float32 logits `(B, L, C)`, the region mask `(B, L)` and each row's region size (a list of `B` ints).
        """
        is_ids = isinstance(sample, torch.Tensor) and not sample.is_floating_point() and sample.dtype != torch.bool
        is_logits = isinstance(model_output, torch.Tensor) and model_output.is_floating_point()
        if not (is_ids and is_logits and sample.ndim in (2, 3) and model_output.ndim == sample.ndim + 1) or (
            model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[1:]
        ):
            raise ValueError(
                "`model_output` must be float logits (batch, num_classes, height, width) with `sample` integer ids "
                "(batch, height, width), or (batch, num_classes, seq_len) with (batch, seq_len); got "
                f"{_describe(model_output)} and {_describe(sample)}."
            )
        batch_size, num_classes = model_output.shape[:2]
        if num_classes > self.config.mask_token_id:
            raise ValueError(
                f"`model_output` has {num_classes} classes but `mask_token_id` is {self.config.mask_token_id}: pass "
                "only the codebook logits, or sampled ids would include the mask id."
            )
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators for {batch_size} batch rows.")

        ids = sample.reshape(batch_size, -1)
        seq_len = ids.shape[1]
        logits = model_output.reshape(batch_size, num_classes, seq_len).transpose(1, 2).float()
        if region_mask is not None and (region_mask.dtype != torch.bool or region_mask.shape != sample.shape):
            raise ValueError(
                f"`region_mask` must be a bool tensor shaped like `sample`, got {_describe(region_mask)}."
            )
        region = torch.ones_like(ids, dtype=torch.bool) if region_mask is None else region_mask.reshape(ids.shape)
        if starting_mask_ratio is None:
            sizes = [seq_len] * batch_size if region_mask is None else region.sum(dim=1).tolist()
            return ids, logits, region.to(ids.device), sizes
        try:
            ratios = torch.as_tensor(starting_mask_ratio, dtype=torch.float64).reshape(-1).tolist()
        except (TypeError, ValueError, RuntimeError):
            ratios = []  # not numbers: refused below
        if len(ratios) not in (1, batch_size) or not all(0 <= ratio <= 1 for ratio in ratios):
            raise ValueError(
                "`starting_mask_ratio` must be a number in [0, 1] or a tensor of one per batch row, got "
                f"{starting_mask_ratio!r}."
            )
        if self.config.remasking > 0 and region_mask is None and min(ratios) < 1:
            raise ValueError(
                "remasking needs `region_mask` with `starting_mask_ratio` < 1: it must know which tokens the run "
                "generates, so as not to mask the kept tokens of an edit."
            )
        sizes = [round(ratio * seq_len) for ratio in (ratios * batch_size if len(ratios) == 1 else ratios)]
        return ids, logits, region.to(ids.device), sizes

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
            timesteps (`int` or `torch.Tensor`):
                An entry of `self.timesteps`; one value for the whole batch (a tensor may repeat it per row).
            generator (`torch.Generator`, list of `torch.Generator`, *optional*):
                Random source for the positions; a list must hold one generator per batch row.

        Returns:
            `torch.LongTensor` shaped like `sample`, `mask_token_id` at the masked positions.
        """
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if timesteps.numel() > 1 and not bool((timesteps == timesteps[0]).all()):
            raise ValueError(
                "`timesteps` must be one value for the whole batch (every row gets the same number of masked "
                f"tokens), got {timesteps.tolist()}."
            )
        step_index = self._step_index(timesteps[:1])
        batch_size = sample.shape[0]
        ids = sample.reshape(batch_size, -1)
        seq_len = ids.shape[1]
        num_to_mask = self.num_masked_after_step(step_index, seq_len)
        rank = uniform_noise((batch_size, seq_len), generator, ids.device).argsort(dim=-1).argsort(dim=-1)
        masked = torch.where(rank < num_to_mask, torch.full_like(ids, self.config.mask_token_id), ids)
        return masked.reshape(sample.shape)


def lowest_per_row(score: torch.Tensor, count: torch.LongTensor) -> torch.BoolTensor:
    """`True` at the `count[i]` lowest entries of each row `i` of `score` `(B, L)`."""
    batch_size, seq_len = score.shape
    order = score.argsort(dim=-1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(seq_len, device=score.device).expand(batch_size, seq_len))
    return rank < count.unsqueeze(1)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
