"""The scheduler: policy core (synchronous) and actor (async), plus the call executor."""

from __future__ import annotations

from parrot_actors.scheduler.actor import Scheduler
from parrot_actors.scheduler.config import SchedulerConfig

__all__ = ["Scheduler", "SchedulerConfig"]
