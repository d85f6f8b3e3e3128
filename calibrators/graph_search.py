"""The bookkeeping of a search that runs quantized graphs: budgets, scoring, bias-corrected scores, confirmation.

:class:`GraphSearch` holds what map-aware's ``refine`` stages share: the graph and time budgets (and which one cut
the search), the distortion on the search set and on the check set, the evidence gate, and the counts the report
gives (graphs run, bias corrections, confirmations). The stages themselves (rule scan, weight scan, descent, final
check) stay in :mod:`calibrators.map_aware`.
"""

from __future__ import annotations

import time
from typing import Any

from calibrators.base import TensorRange
from calibrators.context import SearchContext
from calibrators.evidence import EvidenceGate
from calibrators.objectives import Objective, Scores
from qtool.errors import CalibrationError
from qtool.proxy import MapDistortion, separation

#: Up to this many search-set pixels the separation's pixel AUROC is exact; above, binned (error ~1e-6).
SEARCH_EXACT_PIXELS = 1 << 20


class GraphSearch:
    """One ``refine`` run's state: budgets, losses, the evidence gate, counters (see the module).

    Raises:
        CalibrationError: ``corrected_scan`` without bias correction, ``confirm`` without a check set.
    """

    def __init__(self, context: SearchContext, objective: Objective, options: dict[str, Any]) -> None:
        self.context, self.objective = context, objective
        self.loss = MapDistortion(*context.reference, context.masks, context.labels, options["tail_quantile"],
                                  options["rank_weight"])
        self.corrected = bool(options["corrected_scan"])
        if self.corrected and context.correct is None:
            raise CalibrationError("map-aware: corrected_scan needs bias correction on (ptq.bias_correction: true)")
        self.confirm, self.check_set = bool(options["confirm"]), context.check
        if self.confirm and self.check_set is None:
            raise CalibrationError("map-aware: confirm needs a check set (set ptq.search.check_normals > 0)")
        self.check_loss = None if self.check_set is None else MapDistortion(
            *self.check_set.reference, self.check_set.masks, self.check_set.labels, options["tail_quantile"],
            options["rank_weight"])
        self.t0 = time.monotonic()
        self.budget, self.max_graphs = options["time_budget_s"], options["max_graphs"]
        self.runs, self.corrections, self.stop, self.confirm_runs = 0, 0, None, 0
        self.gate = EvidenceGate(options["evidence"], options["guard"])
        self.confirmations: dict[str, dict[str, Any]] = {}

    def spent(self) -> bool:
        """Whether a budget is spent; ``stop``: the first that cut the search (``graphs`` or ``time``)."""
        now = ("graphs" if self.max_graphs is not None and self.runs >= self.max_graphs else
               "time" if self.budget <= 0 or time.monotonic() - self.t0 > self.budget else None)
        self.stop = self.stop or now
        return now is not None

    def score(self, assignment: dict[str, TensorRange], biases: Any = None, on: SearchContext | None = None,
              against: MapDistortion | None = None, judged: bool = True, counted: bool = True) -> Scores:
        """``assignment``'s scores on ``on``'s images (the search set's unless a check's set).

        ``counted``: the run counts against ``max_graphs`` (a confirmation's runs do not, so confirming
        leaves the descent's budget as it was).
        """
        on, against = on or self.context, against or self.loss
        if counted:
            self.runs += 1
        else:
            self.confirm_runs += 1
        maps, scores = on.run(on.build(assignment, None, biases))
        parts = against.parts(maps, scores)
        out = against.summary(parts)
        if judged:  # a graph the gate may compare (a whole rule, the final check), not a descent move
            self.gate.record(out, against, parts)
        if self.objective.separates or (judged and self.gate.guard):
            out.update(separation(maps, scores, on.masks, on.labels, exact_limit=SEARCH_EXACT_PIXELS))
        return out

    def as_saved(self, assignment: dict[str, TensorRange], on: SearchContext | None = None,
                 against: MapDistortion | None = None) -> tuple[Scores, Any]:
        """Scores of the graph with biases corrected for ``assignment``'s own ranges, and those biases."""
        self.corrections += 1
        biases = self.context.correct(assignment)
        return self.score(assignment, biases, on, against), biases

    def judge(self, assignment: dict[str, TensorRange]) -> tuple[Scores, Any]:
        """A whole rule's scores, and the corrected biases it was scored with (``corrected_scan``; else None)."""
        return self.as_saved(assignment) if self.corrected else (self.score(assignment), None)

    def confirmed(self, prior: tuple[dict[str, TensorRange], Any], new: tuple[dict[str, TensorRange], Any],
                  label: str, descent: bool = False) -> bool:
        """Whether a departure the search set accepted (``new``: ranges, biases) beats ``prior`` on the check set.

        Both are scored there with the biases given; the departure must convince the gate on the check
        images and be the objective's pick of the two (a ``descent``: distort no more and, under the
        objective, separate no worse, as in the final check). True when confirm is off.
        """
        if not self.confirm:
            return True
        p = self.score(*prior, self.check_set, self.check_loss, counted=False)
        n = self.score(*new, self.check_set, self.check_loss, counted=False)
        better = (self.objective.keeps(n, p) and n["loss"] <= p["loss"] if descent else
                  self.objective.choose({"prior": p, "new": n}) == "new")
        ok = self.gate.convinced(p, n, f"{label} on the check set") and better
        self.confirmations[label] = {"prior": p, "new": n, "passed": ok}
        return ok

    def saved_biases(self, assignment: dict[str, TensorRange]) -> Any:
        """The biases the pipeline saves ``assignment`` with: corrected for its ranges (None without correction)."""
        if self.context.correct is None:
            return None
        self.corrections += 1
        return self.context.correct(assignment)

    def seconds(self) -> float:
        """Seconds since the search began."""
        return time.monotonic() - self.t0
