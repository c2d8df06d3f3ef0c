from .scheduling_enat import ENATScheduler, ENATSchedulerOutput

__all__ = ["ENATScheduler", "ENATSchedulerOutput"]
