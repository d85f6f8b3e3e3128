"""Sample records, the train/holdout/test split they form, and deterministic seeded selection.

``holdout`` normals are never trained on (threshold fitting, calibration); ``test`` is never used
for training or calibration. ``Splits.check`` enforces that the three never share a file.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import DataError


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        path: the image file.
        category: the category (object or texture) it belongs to.
        label: 0 normal, 1 anomalous.
        defect: ``"good"`` for normals, else the defect type.
        mask: the ground-truth mask file; None means an all-zero mask (normals only).
    """

    path: Path
    category: str
    label: int
    defect: str
    mask: Path | None = None


@dataclass
class Splits:
    """The three disjoint parts of a dataset.

    Attributes:
        train: normals used for training.
        holdout: normals never trained on: threshold fitting and calibration.
        test: normals and anomalies, never used for training or calibration.
        root: dataset root; ``to_json`` records file names relative to it.
    """

    train: list[Sample] = field(default_factory=list)
    holdout: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    root: Path | None = None

    def _parts(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "holdout": self.holdout, "test": self.test}

    def categories(self) -> list[str]:
        """Sorted names of every category present in any split."""
        return sorted({s.category for part in self._parts().values() for s in part})

    def filter(self, category: str) -> Splits:
        """The same splits restricted to one category.

        Raises:
            DataError: if no sample has that category; the message lists the available ones.
        """
        if category not in self.categories():
            available = ", ".join(self.categories())
            raise DataError(f"category {category!r} not in dataset; available: {available}")
        return Splits(
            train=[s for s in self.train if s.category == category],
            holdout=[s for s in self.holdout if s.category == category],
            test=[s for s in self.test if s.category == category],
            root=self.root,
        )

    def _rel(self, path: Path) -> str:
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.as_posix()

    def counts(self) -> dict[str, dict[str, int]]:
        """Per category: number of train, holdout, test-normal and test-anomalous samples."""
        out: dict[str, dict[str, int]] = {}
        for cat in self.categories():
            test = [s for s in self.test if s.category == cat]
            out[cat] = {
                "train": sum(s.category == cat for s in self.train),
                "holdout": sum(s.category == cat for s in self.holdout),
                "test_normal": sum(s.label == 0 for s in test),
                "test_anomalous": sum(s.label == 1 for s in test),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """The recorded split: root, counts (total and per category), relative file names per split."""
        per_cat = self.counts()
        totals = Counter[str]()
        for c in per_cat.values():
            totals.update(c)
        return {
            "root": str(self.root) if self.root is not None else None,
            "counts": dict(totals),
            "categories": per_cat,
            **{name: [self._rel(s.path) for s in part] for name, part in self._parts().items()},
        }

    def check(self) -> None:
        """Check the split is usable and leakage-free.

        Raises:
            DataError: if it has no category, a category has an empty train or test split, or a
                file appears in two splits (or twice in one).
        """
        cats = self.categories()
        if not cats:
            raise DataError(f"dataset at {self.root} has no samples")
        for cat, c in self.counts().items():
            if c["train"] == 0:
                raise DataError(f"category {cat!r} at {self.root} has no training images")
            if c["test_normal"] + c["test_anomalous"] == 0:
                raise DataError(f"category {cat!r} at {self.root} has no test images")
        seen: dict[Path, str] = {}
        for name, part in self._parts().items():
            for s in part:
                if s.path in seen:
                    raise DataError(f"{s.path} is in both the {seen[s.path]} and the {name} split")
                seen[s.path] = name


def fraction_count(n: int, fraction: float, keep: int = 0) -> int:
    """``round(n * fraction)`` (halves up), capped so that at least ``keep`` of ``n`` remain."""
    k = int(np.floor(n * fraction + 0.5))
    return max(0, min(k, n - keep))


def seeded_pick(names: list[str], count: int, seed: int, key: str) -> set[str]:
    """Pick ``count`` of ``names`` with a seeded permutation, independent of their listing order.

    The names are sorted first; the permutation is seeded by ``seed`` and a stable hash of ``key``
    (e.g. the category), so different categories or groups do not share one pattern.
    """
    ordered = sorted(names)
    rng = np.random.default_rng([seed % (1 << 64), zlib.crc32(key.encode())])
    perm = rng.permutation(len(ordered))
    return {ordered[i] for i in perm[:count]}
