"""Learning-rate schedules of QAT (``qat.lr_schedule``, ``qat.warmup_epochs``): a registry of step factors.

Every learning rate of a QAT run (the recipe optimizer's and the scales' Adam) is its base value times
``factor(step)``, for the optimizer steps ``0 .. S-1`` of the whole run (``S = epochs * steps_per_epoch``):

* a linear warm-up over the first ``W = warmup_epochs * steps_per_epoch`` steps, ``(step + 1) / W``, whatever the
  schedule;
* then the schedule's shape over the remaining steps, at ``t = (step - W) / (S - W)`` in ``[0, 1)``:
  ``constant`` 1 (the default: with no warm-up, the constant learning rate QAT always had), ``cosine``
  ``0.5 * (1 + cos(pi * t))`` (from 1 down towards 0 at the last step).

The factor depends only on the step index, so a run resumed at epoch ``e`` continues the same schedule from step
``e * steps_per_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from qtool.registry import Registry

LR_SCHEDULES: Registry[Callable[[float], float]] = Registry("qat.lr_schedule")
LR_SCHEDULES.add("constant", lambda t: 1.0)
LR_SCHEDULES.add("cosine", lambda t: 0.5 * (1.0 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class StepSchedule:
    """The learning-rate factor of each optimizer step of one run (see the module docstring)."""

    shape: Callable[[float], float]
    total_steps: int
    warmup_steps: int = 0

    def factor(self, step: int) -> float:
        """The multiplier of every base learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        rest = self.total_steps - self.warmup_steps
        return self.shape((step - self.warmup_steps) / rest if rest > 0 else 0.0)


def step_schedule(name: str, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0) -> StepSchedule:
    """The :class:`StepSchedule` of ``qat.lr_schedule`` ``name`` for a run of ``epochs`` epochs.

    Raises:
        RegistryError: an unknown schedule name.
    """
    total = epochs * steps_per_epoch
    return StepSchedule(LR_SCHEDULES.get(name), total, min(total, round(warmup_epochs * steps_per_epoch)))
