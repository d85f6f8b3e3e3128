"""Which state of a QAT run is exported (``qat.keep``): a registry of keep rules, and the holdout pass they judge on.

* ``last``: the last epoch's state.
* ``best``: the lowest holdout loss among the start (epoch 0) and every epoch (ties: the earlier), so on the
  holdout the export is never worse than where training began.
* ``guarded``: as ``best``, among only the states whose proxy image and pixel AUROC on the check set (its normals
  against the synthetic anomalies made from them; :func:`qtool.proxy.separation`) are both at least the start's.
  The start is always eligible, so on the check set the export is no worse than the start in any of the three.
  Needs a check set with masks: ``qat.loss map`` with ``ptq.search.check_normals`` > 0.

The holdout pass (:func:`holdout_row`) runs the model once over the holdout; with a check set the same outputs
give the proxy AUROCs, so a guarded run costs one AUROC per epoch more than ``best``, not another forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qtool.proxy import SEPARATION_KEYS, separation
from qtool.registry import Registry
from qtool.train import mean_loss

Row = dict[str, Any]


@dataclass(frozen=True)
class KeepRule:
    """A ``qat.keep``: ``better(row, kept, start)`` says whether ``row``'s state replaces the kept one.

    ``better`` None: no choice, the last epoch's state is exported. ``needs``: what the holdout rows must carry
    (``"holdout"``: a holdout loss; ``"check"``: also the check set's proxy AUROCs).
    """

    describe: str
    better: Callable[[Row, Row, Row], bool] | None = None
    needs: str | None = None


def _lower_loss(row: Row, kept: Row, start: Row) -> bool:
    return row["holdout_loss"] < kept["holdout_loss"]


def _guarded(row: Row, kept: Row, start: Row) -> bool:
    eligible = all(row[f"proxy_{k}"] >= start[f"proxy_{k}"] for k in SEPARATION_KEYS)
    return eligible and _lower_loss(row, kept, start)


KEEP_RULES: Registry[KeepRule] = Registry("qat.keep")
KEEP_RULES.add("last", KeepRule("the last epoch's state"))
KEEP_RULES.add("best", KeepRule("the lowest holdout loss among the start and every epoch (ties: the earlier)",
                                _lower_loss, "holdout"))
KEEP_RULES.add("guarded", KeepRule("the lowest holdout loss among the start and the epochs whose check-set proxy "
                                   "image and pixel AUROC are both at least the start's (ties: the earlier)",
                                   _guarded, "check"))


def replay(rule: KeepRule, history: list[Row]) -> Row:
    """The row ``rule`` keeps of a run's ``history`` (rows from epoch 0 on, offered in order).

    Another rule's choice on a finished run, without rerunning it (the trajectory does not depend on the keep rule).
    """
    if rule.better is None:
        return history[-1]
    kept = start = history[0]
    for row in history[1:]:
        if rule.better(row, kept, start):
            kept = row
    return kept


class Kept:
    """The state a keep rule prefers among those offered so far (a snapshot of ``module``'s state dict)."""

    def __init__(self, module: nn.Module, rule: KeepRule, start: Row) -> None:
        self.module, self.rule, self.start, self.row = module, rule, start, start
        self.state = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def offer(self, row: Row) -> None:
        """Snapshot the current state if the rule prefers ``row`` to the kept one."""
        if self.rule.better(row, self.row, self.start):
            self.row, self.state = row, self._snapshot()

    def restore(self) -> None:
        """Load the kept state back into the module."""
        with torch.no_grad():
            self.module.load_state_dict(self.state)


@torch.no_grad()
def holdout_row(model: nn.Module, holdout: Any, batch_size: int, check: Any = None) -> Row:
    """``{"holdout_loss", "holdout_seconds"}`` of ``model`` (eval mode) on ``holdout``.

    With ``check`` (a :class:`qtool.search.SearchSet` whose images are the holdout's, in order: its masks and
    labels) also ``proxy_image_auroc`` / ``proxy_pixel_auroc`` of the same pass; ``model`` must then have
    ``outputs_and_loss(batch)`` (:class:`qtool.qat.objectives.MapDistillation`).
    """
    t0 = time.perf_counter()
    if check is None:
        return {"holdout_loss": mean_loss(model, holdout, batch_size), "holdout_seconds": time.perf_counter() - t0}
    model.eval()
    outputs = [model.outputs_and_loss(holdout[i : i + batch_size]) for i in range(0, len(holdout), batch_size)]
    loss = sum(float(terms["loss"]) * len(q_map) for (q_map, _), terms in outputs) / max(1, len(holdout))
    sep = separation(np.concatenate([q_map[:, 0].numpy() for (q_map, _), _ in outputs]),
                     np.concatenate([q_score.numpy() for (_, q_score), _ in outputs]), check.masks, check.labels)
    return {"holdout_loss": loss, **{f"proxy_{k}": v for k, v in sep.items()},
            "holdout_seconds": time.perf_counter() - t0}
