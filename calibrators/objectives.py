"""What map-aware's search optimises: the registered objectives (how the base rule is chosen, which changes stay).

``distortion`` (default) keeps a promise about the map distortion, ``separation`` about the search set's
separation, ``anchored`` starts from a fixed rule; see :class:`calibrators.map_aware.MapAwareCalibrator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qtool.registry import Registry

Scores = dict[str, float]


@dataclass(frozen=True)
class Objective:
    """How the search chooses the base rule and which tensor changes it may keep.

    ``choose(scores)``: the base among the scored rules (in scoring order, so ties keep the earlier).
    ``keeps(new, current)``: whether a tensor's candidate may replace the current range at all (it
    must also lower the distortion). ``separates``: the scores include the search set's separation.
    ``scans``: every whole rule is scored (stage 1); if False only ``initial`` is, and it is the base,
    so the whole graph budget goes to the tensor descent.
    """

    choose: Callable[[dict[str, Scores]], str]
    keeps: Callable[[Scores, Scores], bool]
    separates: bool
    scans: bool = True


#: Under ``separation``, rules whose image AUROC trails the best rule's by more than this are not chosen.
IMAGE_TOLERANCE = 0.1


def image_eligible(scores: dict[str, Scores]) -> list[str]:
    """The rules whose image AUROC is within :data:`IMAGE_TOLERANCE` of the best rule's."""
    best_image = max(s["image_auroc"] for s in scores.values())
    return [k for k, s in scores.items() if s["image_auroc"] >= best_image - IMAGE_TOLERANCE]


def by_separation(scores: dict[str, Scores]) -> str:
    """Highest pixel AUROC, then image AUROC, then lowest distortion: the project's proxy selection rule.

    Only among :func:`image_eligible` rules, so a rule that wins pixels by losing the image ranking is
    not chosen.
    """
    return min(image_eligible(scores),
               key=lambda k: (-scores[k]["pixel_auroc"], -scores[k]["image_auroc"], scores[k]["loss"]))


def separates_no_worse(new: Scores, current: Scores) -> bool:
    """Neither AUROC of the search set's separation drops."""
    return new["pixel_auroc"] >= current["pixel_auroc"] and new["image_auroc"] >= current["image_auroc"]


OBJECTIVES: Registry[Objective] = Registry("map-aware objective")
OBJECTIVES.add("distortion", Objective(choose=lambda scores: min(scores, key=lambda k: scores[k]["loss"]),
                                       keeps=lambda new, cur: True, separates=False))
OBJECTIVES.add("separation", Objective(choose=by_separation, keeps=separates_no_worse, separates=True))
# the base is ``initial`` itself (no rule scan, whose proxy pick may not carry over to test data); the descent
# keeps only a change that lowers the distortion and lowers neither AUROC, so the result is never worse than
# ``initial`` on the search set
OBJECTIVES.add("anchored", Objective(choose=lambda scores: next(iter(scores)), keeps=separates_no_worse,
                                     separates=True, scans=False))
