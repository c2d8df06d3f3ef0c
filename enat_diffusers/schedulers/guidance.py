"""Classifier-free guidance schedules for token logits: how the guidance scale changes over the sampling steps.

The pipelines compute guided logits as `cond + w_k * (cond - uncond)` (which equals `uncond + s_k * (cond - uncond)`,
`s_k = 1 + w_k`); this module gives `w_k` at step `k` of `T` for a `guidance_scale` `s`:

- `"linear"` (ENAT's reference and MUSE's ramp): `w_k = (s - 1) * k / T`, unguided at the first step.
- `"constant"`: `w_k = s - 1`.
- `"power-cosine"` (MDT, used by MaskGen): `w_k = (s - 1) * (1 - cos(pi * (k / T) ** power)) / 2`, a slow start that
  reaches nearly `s` at the end; `power=1` is a cosine ramp.
- `"interval"` (Kynkaanniemi et al., NeurIPS 2024, "Applying guidance in a limited interval"): `w_k = s - 1` while
  `start <= k / T < end`, else 0 (unguided).

A schedule is given by name (its default parameters) or as a [`GuidanceSchedule`] with parameters.
"""

import math
from dataclasses import dataclass

__all__ = ["GUIDANCE_SCHEDULES", "GuidanceSchedule", "guidance_weight", "check_guidance_schedule"]

GUIDANCE_SCHEDULES = ("linear", "constant", "power-cosine", "interval")


@dataclass(frozen=True)
class GuidanceSchedule:
    """
    A guidance schedule with its parameters (`guidance_schedule=` of every ENAT pipeline also takes its name).

    Args:
        name (`str`): One of `GUIDANCE_SCHEDULES`.
        power (`float`, defaults to 2.0): Exponent of `"power-cosine"` (> 0).
        interval (`tuple[float, float]`, defaults to `(0.25, 0.75)`): `[start, end)` of `"interval"`, as fractions of
            the steps in `[0, 1]`, `start < end`.
    """

    name: str
    power: float = 2.0
    interval: tuple[float, float] = (0.25, 0.75)


def check_guidance_schedule(schedule) -> GuidanceSchedule:
    """`schedule` (a name or a [`GuidanceSchedule`]) as a checked `GuidanceSchedule`, or a clear error."""
    if isinstance(schedule, str):
        schedule = GuidanceSchedule(schedule)
    if not isinstance(schedule, GuidanceSchedule) or schedule.name not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES} or a GuidanceSchedule, got {schedule!r}"
        )
    start, end = schedule.interval
    if not (isinstance(schedule.power, (int, float)) and 0 < schedule.power < math.inf and 0 <= start < end <= 1):
        raise ValueError(
            f"GuidanceSchedule needs `power` > 0 and `interval` (start, end) with 0 <= start < end <= 1, got {schedule}"
        )
    return schedule


def guidance_weight(schedule: str | GuidanceSchedule, guidance_scale: float, step_index: int, num_steps: int) -> float:
    """`w_k = s_k - 1` at step `step_index` of `num_steps` (see the module docstring). The linear form is computed as
    the reference does, so that guided logits equal the reference sampler's bit for bit."""
    schedule = schedule if isinstance(schedule, GuidanceSchedule) else GuidanceSchedule(schedule)
    excess = guidance_scale - 1
    progress = step_index / num_steps
    if schedule.name == "constant":
        return excess
    if schedule.name == "power-cosine":
        return excess * (1 - math.cos(math.pi * progress**schedule.power)) / 2
    if schedule.name == "interval":
        start, end = schedule.interval
        return excess if start <= progress < end else 0.0
    return excess * step_index / num_steps
