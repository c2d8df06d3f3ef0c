from .scheduling_enat import AMUSED_MASKING_SCHEDULES, MASKING_SCHEDULES, ENATScheduler, ENATSchedulerOutput

__all__ = ["AMUSED_MASKING_SCHEDULES", "MASKING_SCHEDULES", "ENATScheduler", "ENATSchedulerOutput"]
