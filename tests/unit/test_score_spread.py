"""bench/score_spread.py: the raw relative error hides ranking errors on offset scores; the centred one does not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import score_spread as ss  # noqa: E402


def test_an_offset_hides_a_reordering_from_the_raw_error_only():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(200)
    spread -= spread.mean()
    ref = 10.0 + spread  # scores on a large common offset
    swapped = 10.0 - spread  # the same values, ranking reversed
    err = ss.errors(swapped, ref)
    assert err["raw"] < 0.05  # small against sum r^2 ...
    assert err["centred"] == pytest.approx(4.0, rel=1e-6)  # ... but 4x the spread: (2 (r - mean))^2 / (r - mean)^2
    assert ss.errors(ref, ref) == {"raw": 0.0, "centred": 0.0}
    maps, labels = rng.random((200, 1, 2, 2)), np.arange(200) % 2
    assert ss.cell_row("x", maps, swapped, (maps, ref), labels)["spearman"] == pytest.approx(-1.0)
    shuffled = rng.permutation(ref)
    assert ss.cell_row("x", maps, shuffled, (maps, ref), labels)["spearman"] == pytest.approx(
        spearmanr(shuffled, ref).statistic)
