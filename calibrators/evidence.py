"""Map-aware's evidence gate: the search leaves its prior only where the search set shows it distorts less.

A rule (or a descent) that distorts the search set's maps a little less than the prior can be the luck of these
64 images. With ``evidence`` = p > 0, a departure from the prior is allowed only if its map distortion is lower
than the prior's in at least a share p of paired, stratified bootstrap resamples of the search images
(:meth:`qtool.proxy.MapDistortion.draws`, the same draws for both graphs). p = 0 turns the gate off.

A ``guard`` ("separation"; "none" = no guard) adds a second condition: of the prior and the departure, the
``separation`` objective's own rule (:func:`calibrators.objectives.by_separation`: the higher pixel AUROC of the
synthetic anomalies on the same images, among graphs whose image AUROC is within 0.1 of the better one's) must
pick the departure. A map can distort less in the tail yet rank the defect pixels worse; the guard keeps the prior
then. A pixel AUROC alone would not do: where the prior's map is erased (image AUROC at chance) the few pixels
left can still rank well (tests/unit/test_evidence.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrators.objectives import by_separation
from qtool.proxy import SEPARATION_KEYS, DistortionParts, MapDistortion

Scores = dict[str, float]
#: Bootstrap resamples per comparison, and their seed (fixed: the gate is deterministic).
ROUNDS, SEED = 2000, 0
#: ``guard`` values: none, or the separation objective's choice between the prior and the departure.
GUARDS = ("none", "separation")
#: What the guard's rule reads of each graph's scores (and the report keeps): separation, then the distortion.
GUARD_KEYS = (*SEPARATION_KEYS, "loss")


class EvidenceGate:
    """Remembers each scored graph's per-image distortion and judges departures from a prior by bootstrap.

    ``record`` is called for every scored graph; ``eligible`` and ``convinced`` compare two recorded scores
    (measured against the same :class:`MapDistortion`). ``shares`` keeps every comparison made, for the report;
    ``guarded`` the prior's and the departure's separation, and the verdict, wherever the guard judged.
    """

    def __init__(self, level: float, guard: str = "none", rounds: int = ROUNDS, seed: int = SEED) -> None:
        self.level, self.rounds, self.seed = float(level), rounds, seed
        self.guard = None if guard == "none" else guard
        self._parts: dict[int, tuple[Scores, MapDistortion, DistortionParts]] = {}
        self._draws: dict[int, np.ndarray] = {}
        self.shares: dict[str, float] = {}
        self.guarded: dict[str, dict[str, Any]] = {}

    @staticmethod
    def problems(level: Any, guard: Any) -> list[tuple[str, str]]:
        """(option, what it must be) for each of ``evidence`` / ``guard`` that is not valid."""
        bad = []
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level < 1.0:
            bad.append(("evidence", "a share in [0, 1): 0 off, e.g. 0.95"))
        if guard not in GUARDS:
            bad.append(("guard", "one of " + ", ".join(GUARDS)))
        return bad

    @property
    def on(self) -> bool:
        """Whether departures need evidence (``level`` > 0) or pass a guard."""
        return self.level > 0 or self.guard is not None

    def record(self, scores: Scores, loss: MapDistortion, parts: DistortionParts) -> None:
        """Keep the per-image parts behind ``scores`` (nothing when no evidence is needed)."""
        if self.level > 0:  # the scores object is kept alive with its parts, so its id is not reused
            self._parts[id(scores)] = (scores, loss, parts)

    def share(self, base: Scores, new: Scores) -> float:
        """Share of resamples in which ``new`` distorts less than ``base``."""
        _, loss, base_parts = self._parts[id(base)]
        _, new_loss, new_parts = self._parts[id(new)]
        if new_loss is not loss:
            raise ValueError("evidence compares graphs scored on the same images only")
        draws = self._draws.get(id(loss))
        if draws is None:
            draws = self._draws[id(loss)] = loss.draws(self.rounds, self.seed)
        return float(np.mean(loss.resampled_losses(new_parts, draws) < loss.resampled_losses(base_parts, draws)))

    def convinced(self, base: Scores, new: Scores, label: str) -> bool:
        """Whether ``new`` may replace ``base``: a share of at least ``level`` (if > 0) and the guard's pick.

        With a guard, both scores need the separation's keys (the search computes them then).
        """
        ok = True
        if self.level > 0:
            self.shares[label] = round(self.share(base, new), 4)
            ok = self.shares[label] >= self.level
        if self.guard is not None:
            passed = by_separation({"prior": base, "new": new}) == "new"
            self.guarded[label] = {"prior": {k: base[k] for k in GUARD_KEYS},
                                   "new": {k: new[k] for k in GUARD_KEYS}, "passed": passed}
            ok = ok and passed
        return ok

    def eligible(self, scores: dict[str, Scores], prior: str, kind: str) -> dict[str, Scores]:
        """``scores`` restricted to ``prior`` and the entries that convince against it (all of them when off).

        Order is kept, so an objective's tie-break (the earlier entry) is unchanged.
        """
        if not self.on or prior not in scores:
            return scores
        return {k: s for k, s in scores.items()
                if k == prior or self.convinced(scores[prior], s, f"{kind} {k} vs {prior}")}

    def summary(self) -> dict[str, Any] | None:
        """The level, every share computed and, with a guard, its name and values (None when off)."""
        if not self.on:
            return None
        out = {"level": self.level, "rounds": self.rounds, "shares": dict(self.shares)}
        return out | ({"guard": self.guard, "guarded": dict(self.guarded)} if self.guard else {})
