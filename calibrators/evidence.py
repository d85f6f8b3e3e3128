"""Map-aware's evidence gate: the search leaves its prior only where the search set shows it distorts less.

A rule (or a descent) that distorts the search set's maps a little less than the prior can be the luck of these
64 images. With ``evidence`` = p > 0, a departure from the prior is allowed only if its map distortion is lower
than the prior's in at least a share p of paired, stratified bootstrap resamples of the search images
(:meth:`qtool.proxy.MapDistortion.draws`, the same draws for both graphs). p = 0 turns the gate off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtool.proxy import DistortionParts, MapDistortion

Scores = dict[str, float]
#: Bootstrap resamples per comparison, and their seed (fixed: the gate is deterministic).
ROUNDS, SEED = 2000, 0


class EvidenceGate:
    """Remembers each scored graph's per-image distortion and judges departures from a prior by bootstrap.

    ``record`` is called for every scored graph; ``eligible`` and ``convinced`` compare two recorded scores
    (measured against the same :class:`MapDistortion`). ``shares`` keeps every comparison made, for the report.
    """

    def __init__(self, level: float, rounds: int = ROUNDS, seed: int = SEED) -> None:
        self.level, self.rounds, self.seed = float(level), rounds, seed
        self._parts: dict[int, tuple[Scores, MapDistortion, DistortionParts]] = {}
        self._draws: dict[int, np.ndarray] = {}
        self.shares: dict[str, float] = {}

    @property
    def on(self) -> bool:
        """Whether departures need evidence (``level`` > 0)."""
        return self.level > 0

    def record(self, scores: Scores, loss: MapDistortion, parts: DistortionParts) -> None:
        """Keep the per-image parts behind ``scores`` (nothing when the gate is off)."""
        if self.on:  # the scores object is kept alive with its parts, so its id is not reused
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
        """Whether ``new`` may replace ``base``: always when off, else on a share of at least ``level``."""
        if not self.on:
            return True
        self.shares[label] = round(self.share(base, new), 4)
        return self.shares[label] >= self.level

    def eligible(self, scores: dict[str, Scores], prior: str, kind: str) -> dict[str, Scores]:
        """``scores`` restricted to ``prior`` and the entries that convince against it (all of them when off).

        Order is kept, so an objective's tie-break (the earlier entry) is unchanged.
        """
        if not self.on or prior not in scores:
            return scores
        return {k: s for k, s in scores.items()
                if k == prior or self.convinced(scores[prior], s, f"{kind} {k} vs {prior}")}

    def summary(self) -> dict[str, Any] | None:
        """The level and every share computed (None when off)."""
        return {"level": self.level, "rounds": self.rounds, "shares": dict(self.shares)} if self.on else None
