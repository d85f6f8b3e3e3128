"""Fidelity of a quantized model's maps and scores to fp32: streaming Pearson, shifts, rank correlation."""

from __future__ import annotations

import numpy as np
import pytest

from qtool import fidelity


def test_map_fidelity_identical_and_hand_case():
    rng = np.random.default_rng(7)
    ref = rng.random((3, 5, 5))
    scores = np.array([1.0, 2.0, 3.0])
    same = fidelity.map_fidelity(ref, ref.copy(), scores, scores.copy())
    assert same == {
        "pixel_pearson": pytest.approx(1.0, abs=1e-12),
        "map_max_abs_diff": 0.0,
        "score_max_abs_shift": 0.0,
        "score_max_rel_shift": 0.0,
        "score_spearman": pytest.approx(1.0, abs=1e-12),
    }
    shifted = fidelity.map_fidelity(ref, 1 - 2 * ref, scores, np.array([1.0, 2.5, 3.0]))
    assert shifted["pixel_pearson"] == pytest.approx(-1.0, abs=1e-12)
    assert shifted["score_max_abs_shift"] == pytest.approx(0.5)
    assert shifted["score_max_rel_shift"] == pytest.approx(0.25)  # 0.5 / range 2
    assert shifted["score_spearman"] == pytest.approx(1.0)


def test_pearson_accumulator_matches_numpy_over_batches():
    rng = np.random.default_rng(8)
    x = rng.random(300) + 1e3  # large offset: sums must stay well conditioned
    y = 0.5 * x + rng.random(300)
    acc = fidelity.PearsonAccumulator()
    for i in range(0, 300, 70):
        acc.update(x[i : i + 70], y[i : i + 70])
    assert acc.compute() == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    const = fidelity.PearsonAccumulator()
    const.update(np.ones(4), np.arange(4.0))
    assert const.compute() is None
