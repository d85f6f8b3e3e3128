"""Oracle tests of qtool.metrics: hand-computed values and independent brute-force implementations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from qtool import metrics
from qtool.errors import DataError


def brute_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """Threshold-by-threshold PRO curve over every distinct score, clipped trapezoid, / max_fpr."""
    gt = masks.astype(bool)
    regions = []
    for i, mask in enumerate(gt):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & ~gt).sum() / (~gt).sum())
        ys.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:], strict=True):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_cut) / 2
    return area / max_fpr


def random_case(seed: int, n: int = 3, size: int = 12, levels: int | None = None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(2):
            r, c, h, w = rng.integers(0, size - 3, 2).tolist() + rng.integers(1, 4, 2).tolist()
            masks[i, r : r + h, c : c + w] = 1
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels:  # coarse scores: many ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


# image AUROC


def test_image_auroc_counts_ordered_pairs():
    # normals 0.1, 0.4, 0.35; anomalies 0.8 (beats 3) and 0.35 (beats 0.1, ties 0.35): 4.5 / 6
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.35])
    assert metrics.image_auroc(labels, scores) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("label", [0, 1])
def test_image_auroc_single_class_raises(label):
    with pytest.raises(DataError, match=f"got only label {label}"):
        metrics.image_auroc(np.full(4, label), np.arange(4.0))


def test_bad_inputs_raise():
    with pytest.raises(DataError, match="same length"):
        metrics.image_auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(DataError, match="0 .normal. or 1"):
        metrics.image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(DataError, match="NaN"):
        metrics.image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(DataError, match="0 and 1"):
        metrics.pixel_auroc(np.full((1, 2, 2), 3), np.zeros((1, 2, 2)))
    with pytest.raises(DataError, match=r"\(1, 2, 2\) and \(1, 2, 3\)"):
        metrics.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))


# pixel AUROC


def test_pixel_auroc_matches_sklearn_and_histogram_path():
    masks, maps = random_case(0, n=4, size=16)
    exact = metrics.pixel_auroc(masks, maps)
    assert exact == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    approx = metrics.pixel_auroc(masks, maps, exact_limit=0)
    assert abs(approx - exact) < 1e-3


def test_pixel_auroc_histogram_is_exact_on_distinct_bin_values():
    # scores on 11 levels spread over the bins: the binned ROC is the exact ROC (ties count 1/2 in both)
    masks, maps = random_case(1, levels=10)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps, exact_limit=0, bins=64) == pytest.approx(exact, abs=1e-12)


def test_pixel_histograms_weighted_sum_is_the_auroc_of_repeated_images():
    # counting image 0 twice and dropping image 2 (a bootstrap draw) equals the AUROC of that stack
    masks, maps = random_case(2, n=4, size=16, levels=10)
    pos, neg = metrics.pixel_histograms(masks.astype(bool), maps, 64, float(maps.min()), float(maps.max()))
    assert pos.shape == neg.shape == (4, 64) and (pos + neg).sum() == masks.size
    w = np.array([2.0, 1.0, 0.0, 1.0])
    stack = [0, 0, 1, 3]
    want = roc_auc_score(masks[stack].ravel(), maps[stack].ravel())
    assert metrics.auroc_from_counts(w @ pos, w @ neg) == pytest.approx(want, abs=1e-12)
    with pytest.raises(DataError, match="both positives and negatives"):
        metrics.auroc_from_counts(np.zeros(4), np.ones(4))


def test_pro_tables_weighted_sum_is_the_aupro_of_repeated_images():
    """A resample's AUPRO from per-image tables equals the exact AUPRO of the repeated stack (up to binning)."""
    masks, maps = random_case(3, n=6, size=24, levels=1000)
    masks[:3, 4:9, 4:9] = 1
    masks[:3, 15:18, 2:20] = 1  # two regions in each of the first three images
    tables = metrics.pro_tables(masks, maps, 1 << 14, float(maps.min()), float(maps.max()))
    assert tables.false_positives.shape == tables.overlap.shape == (6, 1 << 14)
    for w in (np.ones(6), np.array([2.0, 0.0, 1.0, 3.0, 1.0, 0.0])):
        stack = np.repeat(np.arange(6), w.astype(int))
        got = metrics.aupro_from_tables(w @ tables.false_positives, w @ tables.overlap, w @ tables.normals,
                                        w @ tables.regions)
        assert got == pytest.approx(metrics.aupro(masks[stack], maps[stack]), abs=2e-4)
    with pytest.raises(DataError, match="defect region"):
        metrics.aupro_from_tables(np.zeros(4), np.zeros(4), 10.0, 0.0)


def test_pixel_auroc_needs_both_pixel_classes():
    with pytest.raises(DataError, match="only label 0"):
        metrics.pixel_auroc(np.zeros((2, 3, 3)), np.random.default_rng(0).random((2, 3, 3)))


# AUPRO


def test_aupro_hand_case_two_regions():
    # region A = pixel (0,0) score 0.9; region B = (3,2) 0.8 and (3,3) 0.1; 13 normals: one 0.85, rest 0.
    # curve: (0,0) (0,.5) (1/13,.5) (1/13,.75) (1/13,1) (1,1) -> area to .3 = .5/13 + (.3 - 1/13)
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, 0, 0] = masks[0, 3, 2] = masks[0, 3, 3] = 1
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0], maps[0, 3, 2], maps[0, 3, 3], maps[0, 1, 2] = 0.9, 0.8, 0.1, 0.85
    assert metrics.aupro(masks, maps) == pytest.approx(34 / 39, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # (0,0) and (1,1) touch diagonally: one region of 2 pixels (4-connectivity would make two).
    # At t=0.9 PRO = (1/2 + 0) / 2 = 1/4 (4-connectivity: 1/3); one normal at 0.5 of 13.
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3], maps[0, 0, 3] = 0.9, 0.2, 0.2, 0.5
    assert metrics.aupro(masks, maps) == pytest.approx(21 / 26, abs=1e-12)


def test_aupro_perfect_map_is_one():
    masks, _ = random_case(2)
    maps = masks.astype(np.float32) + 0.1 * np.random.default_rng(2).random(masks.shape, dtype=np.float32)
    assert metrics.aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed,levels,max_fpr", [(3, None, 0.3), (4, 8, 0.3), (5, 5, 0.05), (6, None, 1.0)])
def test_aupro_matches_brute_force(seed, levels, max_fpr):
    masks, maps = random_case(seed, levels=levels)
    expected = brute_aupro(masks, maps, max_fpr)
    assert metrics.aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)


def test_aupro_errors():
    with pytest.raises(DataError, match="defect region"):
        metrics.aupro(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))
    with pytest.raises(DataError, match="normal pixels"):
        metrics.aupro(np.ones((1, 3, 3)), np.zeros((1, 3, 3)))
    with pytest.raises(DataError, match="max_fpr"):
        metrics.aupro(np.eye(3)[None], np.zeros((1, 3, 3)), max_fpr=0.0)


# F1 and thresholds


def test_f1_max_and_f1_at_hand_case():
    # predict >= t: t=.9 -> 1/2, .7 -> 4/5, .6 -> 2/3, .4 -> 6/7 (best), .1 -> 3/4
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    best, threshold = metrics.f1_max(labels, scores)
    assert best == pytest.approx(6 / 7, abs=1e-12)
    assert threshold == 0.4
    assert metrics.f1_at(labels, scores, 0.5) == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.f1_at(labels, scores, 0.4) == pytest.approx(6 / 7, abs=1e-12)
    assert metrics.f1_at(labels, scores, 1.0) == 0.0


def test_threshold_from_normals():
    assert metrics.threshold_from_normals(np.array([5, 1, 4, 2, 3.0]), fpr=0.25) == pytest.approx(4.0)
    assert metrics.threshold_from_normals(np.arange(101.0), fpr=0.1) == pytest.approx(90.0)
    with pytest.raises(DataError, match="fpr"):
        metrics.threshold_from_normals(np.arange(3.0), fpr=1.0)
    with pytest.raises(DataError, match="finite"):
        metrics.threshold_from_normals(np.array([]))


# per-category evaluation


def test_evaluate_arrays_per_category_and_mean():
    masks_a, maps_a = random_case(9, n=4)
    labels_a = (masks_a.reshape(4, -1).max(1) > 0).astype(int)
    scores_a = maps_a.reshape(4, -1).max(1)
    masks_b = np.zeros((2, 12, 12), np.uint8)
    maps_b = np.random.default_rng(10).random((2, 12, 12)).astype(np.float32)
    labels = np.concatenate([labels_a, [0, 0]])
    scores = np.concatenate([scores_a, maps_b.reshape(2, -1).max(1)])
    out = metrics.evaluate_arrays(
        labels,
        scores,
        np.concatenate([masks_a, masks_b]),
        np.concatenate([maps_a, maps_b]),
        ["a"] * 4 + ["b"] * 2,
        threshold={"a": 0.9, "b": 0.9},
    )
    json.dumps(out)  # plain JSON-able values
    a, b = out["per_category"]["a"], out["per_category"]["b"]
    assert a["image_auroc"] == metrics.image_auroc(labels_a, scores_a)
    assert a["pixel_auroc"] == metrics.pixel_auroc(masks_a, maps_a)
    assert a["aupro"] == metrics.aupro(masks_a, maps_a)
    assert (a["f1_max"], a["f1_max_threshold"]) == metrics.f1_max(labels_a, scores_a)
    assert a["f1_at_threshold"] == metrics.f1_at(labels_a, scores_a, 0.9)
    assert "note" not in a and (a["n_images"], a["n_anomalous"]) == (4, 3)
    assert b["image_auroc"] is None and b["aupro"] is None and b["f1_at_threshold"] is None
    assert "only normal images" in b["note"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_at_threshold"):
        assert out["mean"][key] == a[key]
        assert out["mean"]["n_categories"][key] == 1
    with pytest.raises(DataError, match="no threshold for category 'b'"):
        metrics.evaluate_arrays(
            labels,
            scores,
            np.concatenate([masks_a, masks_b]),
            np.concatenate([maps_a, maps_b]),
            ["a"] * 4 + ["b"] * 2,
            threshold={"a": 1.0},
        )
