from .guidance import GUIDANCE_SCHEDULES, GuidanceSchedule, check_guidance_schedule, guidance_weight
from .scheduling_enat import (
    AMUSED_MASKING_SCHEDULES,
    MASKING_SCHEDULES,
    TOKEN_ORDERS,
    ENATScheduler,
    ENATSchedulerOutput,
    halton_ranks,
)

__all__ = [
    "AMUSED_MASKING_SCHEDULES",
    "GUIDANCE_SCHEDULES",
    "MASKING_SCHEDULES",
    "TOKEN_ORDERS",
    "ENATScheduler",
    "ENATSchedulerOutput",
    "GuidanceSchedule",
    "check_guidance_schedule",
    "guidance_weight",
    "halton_ranks",
]
