"""Anomaly-detection metrics: image/pixel AUROC, AUPRO, F1, thresholds, per-category evaluation.

The fidelity of a quantized model's maps and scores to its fp32 reference is ``qtool.fidelity``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qtool.errors import DataError

log = logging.getLogger(__name__)

EXACT_PIXEL_LIMIT = 20_000_000
"""Above this many pixels, `pixel_auroc` switches from sklearn's exact sort to a histogram."""

CHUNK_PIXELS = 1 << 22  # pixels per chunk in streaming passes: bounds temporary memory


def _scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level labels in {0, 1} and finite scores of the same length."""
    y, s = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0 or y.size != s.size:
        raise DataError(f"labels and scores must be non-empty and the same length; got {y.size} and {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"labels must be 0 (normal) or 1 (anomalous); got values {np.unique(y)[:5].tolist()}")
    if not np.isfinite(s).all():
        raise DataError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/Inf values")
    return y.astype(np.int8), s


def _pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) masks in {0, 1} and finite maps of the same shape; masks come back bool."""
    m, a = np.asarray(masks), np.asarray(maps)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if m.ndim != 3 or m.shape != a.shape or m.size == 0:
        raise DataError(
            f"masks and maps must be non-empty (N, H, W) arrays of one shape; got {m.shape} and {a.shape}"
        )
    if m.dtype != np.bool_:
        if not ((m == 0) | (m == 1)).all():
            raise DataError(f"masks must hold only 0 and 1; got values {np.unique(m)[:5].tolist()}")
        m = m.astype(bool)
    if not np.isfinite(a).all():
        raise DataError(f"anomaly maps contain {int((~np.isfinite(a)).sum())} NaN/Inf values")
    return m, a


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores (anomalous = 1); ties count one half.

    Raises DataError when the labels hold only one class or the inputs are malformed.
    """
    from sklearn.metrics import roc_auc_score

    y, s = _scores(labels, scores)
    if np.unique(y).size < 2:
        raise DataError(f"image AUROC needs both normal and anomalous images; got only label {int(y[0])}")
    return float(roc_auc_score(y, s))


def pixel_auroc(
    masks: np.ndarray, maps: np.ndarray, *, exact_limit: int = EXACT_PIXEL_LIMIT, bins: int = 1 << 16
) -> float:
    """Area under the ROC curve of all pixels of `maps` (N, H, W) against `masks` (N, H, W) in {0, 1}.

    Up to `exact_limit` pixels the result is sklearn's exact AUROC. Above it, to bound memory, the
    scores are binned into `bins` equal-width bins over their range and the ROC curve is taken at the
    bin edges (trapezoid rule): a defect/normal pixel pair in the same bin counts one half instead of
    0 or 1, so the error is at most half the share of such pairs (logged at DEBUG; ~1e-4 in practice).
    Raises DataError when the masks hold only one class or the inputs are malformed.
    """
    m, a = _pixels(masks, maps)
    n_pos = int(np.count_nonzero(m))
    if n_pos in (0, m.size):
        only = int(n_pos > 0)
        raise DataError(f"pixel AUROC needs both normal and defect pixels; masks have only label {only}")
    if m.size <= exact_limit:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(m.ravel(), a.ravel()))
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return 0.5  # one constant score: every pair is a tie
    pos, tot = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    step = max(1, CHUNK_PIXELS // (m.shape[1] * m.shape[2]))
    for i in range(0, m.shape[0], step):
        idx = _bin_index(a[i : i + step], lo, hi, bins)
        tot += np.bincount(idx, minlength=bins)
        pos += np.bincount(idx, weights=m[i : i + step].ravel(), minlength=bins).astype(np.int64)
    neg = tot - pos
    bound = 0.5 * float(np.dot(pos, neg)) / (n_pos * (m.size - n_pos))
    log.debug("histogram pixel AUROC over %d pixels, %d bins: error bound %.2e", m.size, bins, bound)
    return auroc_from_counts(pos, neg)


def _bin_index(maps: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Flat bin index in [0, bins) of each value of ``maps`` over equal bins of [lo, hi]."""
    scale = bins / (hi - lo) if hi > lo else 0.0
    idx = ((maps.astype(np.float64) - lo) * scale).astype(np.int64).ravel()
    return np.clip(idx, 0, bins - 1, out=idx)


def pixel_histograms(masks: np.ndarray, maps: np.ndarray, bins: int, lo: float, hi: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per image, how many defect and normal pixels fall in each of ``bins`` equal bins over [lo, hi].

    Inputs as validated by ``pixel_auroc`` (bool masks, finite maps, (N, H, W)). Summed over images
    (with multiplicities, for a bootstrap) the counts give :func:`auroc_from_counts`.
    Returns: (defect counts (N, bins), normal counts (N, bins)), int64.
    """
    n = masks.shape[0]
    pos, tot = np.zeros((n, bins), np.int64), np.zeros((n, bins), np.int64)
    for i in range(n):
        idx = _bin_index(maps[i], lo, hi, bins)
        tot[i] = np.bincount(idx, minlength=bins)
        pos[i] = np.bincount(idx, weights=masks[i].ravel(), minlength=bins).astype(np.int64)
    return pos, tot - pos


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from per-bin positive and negative counts over ascending score bins (same-bin pairs count 1/2)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        raise DataError("AUROC needs both positives and negatives")
    tpr = np.concatenate(([0.0], np.cumsum(pos[::-1]) / n_pos))
    fpr = np.concatenate(([0.0], np.cumsum(neg[::-1]) / n_neg))
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) (x non-decreasing) from x[0] to x_max.

    The last segment crossing x_max is cut there with y linearly interpolated.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    full = x1 <= x_max
    area = float(np.sum((x1[full] - x0[full]) * (y0[full] + y1[full]) / 2))
    cross = np.flatnonzero((x0 < x_max) & (x1 > x_max))
    if cross.size:
        j = cross[0]
        y_cut = y0[j] + (y1[j] - y0[j]) * (x_max - x0[j]) / (x1[j] - x0[j])
        area += float((x_max - x0[j]) * (y0[j] + y_cut) / 2)
    return area


def _pro_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Normalised area under the PRO curve (points by falling threshold, starting at (0, 0)) up to ``max_fpr``."""
    x = np.concatenate(([0.0], np.minimum(fpr, 1.0)))
    y = np.concatenate(([0.0], np.minimum(pro, 1.0)))
    return _area_to(x, y, max_fpr) / max_fpr


def defect_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One mask's defect regions as AUPRO counts them: 8-connected components (scipy.ndimage.label, 3x3).

    Returns: the label image (0 = normal, 1..n = regions) and each label's pixel count (index 0: normal pixels).
    """
    from scipy import ndimage

    labeled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return labeled, np.bincount(labeled.ravel(), minlength=n + 1)


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the Per-Region-Overlap curve up to `max_fpr` (MVTec AD definition).

    Defect regions are the connected components of each mask (scipy.ndimage.label with a 3x3
    structure, i.e. 8-connectivity, as in the MVTec AD evaluation code). At each threshold t
    (pixel anomalous if map >= t), PRO is the mean over all regions of the share of the region
    above t, and FPR the share of all normal pixels above t. PRO is integrated over FPR in
    [0, max_fpr] (trapezoids, linear interpolation at max_fpr) and divided by max_fpr.
    Exact, sort-based (like compute_pro of the MVTec reference), but it only sorts pixels scoring at
    or above the threshold where FPR reaches max_fpr.
    Raises DataError when there is no defect region, no normal pixel, max_fpr is outside (0, 1], or
    the inputs are malformed.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise DataError(f"max_fpr must be in (0, 1]; got {max_fpr}")
    m, a = _pixels(masks, maps)
    n_ok = int(m.size - np.count_nonzero(m))
    if n_ok == 0:
        raise DataError("AUPRO needs normal pixels; every mask pixel is a defect")
    # Scores of the k highest-scoring normal pixels decide every curve point with FPR <= max_fpr plus the
    # first point beyond it (needed to interpolate); +1 guards against rounding in max_fpr * n_ok.
    k = min(n_ok, math.ceil(max_fpr * n_ok) + 1)
    normal = a[~m]
    cut = np.partition(normal, n_ok - k)[n_ok - k]
    del normal
    n_regions, sel_scores, sel_fp, sel_w = 0, [], [], []
    for mask, amap in zip(m, a, strict=True):
        labeled, sizes = defect_regions(mask)
        n = len(sizes) - 1
        n_regions += n
        inv_size = np.zeros(n + 1)
        inv_size[1:] = 1.0 / sizes[1:]
        keep = amap >= cut
        lab = labeled[keep]
        sel_scores.append(amap[keep])
        sel_fp.append(lab == 0)
        sel_w.append(inv_size[lab])
    if n_regions == 0:
        raise DataError("AUPRO needs at least one defect region; every mask is empty")
    scores = np.concatenate(sel_scores)
    order = np.argsort(scores, kind="stable")[::-1]
    scores = scores[order]
    fpr = np.cumsum(np.concatenate(sel_fp)[order], dtype=np.int64) / n_ok
    pro = np.cumsum(np.concatenate(sel_w)[order]) / n_regions
    last = np.append(np.diff(scores) != 0, True)  # one point per distinct threshold
    return _pro_area(fpr[last], pro[last], max_fpr)


@dataclass(frozen=True)
class ProTables:
    """Each image's share of the PRO curve on binned thresholds, so a resample's AUPRO is a weighted sum.

    Threshold ``t`` is the lower edge of bin ``t`` counted from the top (``bins`` equal bins over [lo, hi]):
    ``false_positives[i, t]``: normal pixels of image i scoring in bin ``t`` or above; ``overlap[i, t]``: the sum
    over i's defect regions of each region's share scoring there; ``normals[i]``, ``regions[i]``: its normal pixel
    and region counts. The PRO curve of images weighted ``w`` is ``(w @ overlap) / (w @ regions)`` against
    ``(w @ false_positives) / (w @ normals)`` (:func:`aupro_from_tables`).
    """

    false_positives: np.ndarray
    overlap: np.ndarray
    normals: np.ndarray
    regions: np.ndarray


def pro_tables(masks: np.ndarray, maps: np.ndarray, bins: int, lo: float, hi: float) -> ProTables:
    """:class:`ProTables` of ``maps`` against ``masks`` (regions as :func:`aupro`: 8-connected components)."""
    m, a = _pixels(masks, maps)
    n = len(m)
    fp, ov = np.zeros((n, bins)), np.zeros((n, bins))
    normals, regions = np.zeros(n), np.zeros(n)
    for i, (mask, amap) in enumerate(zip(m, a, strict=True)):
        labeled, sizes = defect_regions(mask)
        inv_size = np.zeros(len(sizes))
        inv_size[1:] = 1.0 / sizes[1:]
        top = bins - 1 - _bin_index(amap, lo, hi, bins)  # bin index counted from the top
        flat = mask.ravel()
        fp[i] = np.cumsum(np.bincount(top[~flat], minlength=bins))
        ov[i] = np.cumsum(np.bincount(top[flat], weights=inv_size[labeled.ravel()[flat]], minlength=bins))
        normals[i], regions[i] = np.count_nonzero(~flat), len(sizes) - 1
    return ProTables(fp, ov, normals, regions)


def aupro_from_tables(fp: np.ndarray, overlap: np.ndarray, normals: float, regions: float,
                      max_fpr: float = 0.3) -> float:
    """Binned AUPRO from summed (or weighted-summed) :class:`ProTables` rows: ``fp``, ``overlap`` of shape (bins,).

    Raises:
        DataError: no normal pixel or no defect region.
    """
    if normals <= 0 or regions <= 0:
        raise DataError("AUPRO needs normal pixels and at least one defect region")
    return _pro_area(fp / normals, overlap / regions, max_fpr)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds (image anomalous if score >= threshold) and that threshold.

    Raises DataError when there is no anomalous image or the inputs are malformed.
    """
    from sklearn.metrics import precision_recall_curve

    y, s = _scores(labels, scores)
    if not y.any():
        raise DataError("F1 needs at least one anomalous image; got only label 0")
    precision, recall, thresholds = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of the rule "anomalous if score >= threshold"; 0.0 when it has no true positive.

    Raises DataError when the inputs are malformed.
    """
    y, s = _scores(labels, scores)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & (y == 1)))
    fp = int(np.count_nonzero(pred & (y == 0)))
    fn = int(np.count_nonzero(~pred & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def threshold_from_normals(scores: np.ndarray, fpr: float = 0.01) -> float:
    """Decision threshold fitted on held-out normal images only (no test labels are used).

    Returns the (1 - fpr) quantile (numpy's linear interpolation) of `scores`, so that about a share
    `fpr` of held-out normals score at or above it (the rule is "anomalous if score >= threshold").
    Raises DataError when scores are empty or not finite, or fpr is outside (0, 1).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < fpr < 1.0:
        raise DataError(f"fpr must be in (0, 1); got {fpr}")
    if s.size == 0 or not np.isfinite(s).all():
        raise DataError(f"threshold needs finite held-out normal scores; got {s.size} values, some NaN/Inf")
    return float(np.quantile(s, 1.0 - fpr))


_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_max_threshold", "f1_at_threshold")


def _category_metrics(
    y: np.ndarray, s: np.ndarray, m: np.ndarray, a: np.ndarray, max_fpr: float, threshold: float | None
) -> dict:
    """All metrics of one category; a metric its data cannot define is None and explained in "note"."""
    out: dict = {"n_images": int(y.size), "n_anomalous": int(y.sum())}
    notes = []

    def attempt(keys: tuple[str, ...], fn, *args) -> None:
        try:
            value = fn(*args)
            values = value if isinstance(value, tuple) else (value,)
            out.update({k: float(v) for k, v in zip(keys, values, strict=True)})
        except DataError as e:
            out.update(dict.fromkeys(keys))
            notes.append(str(e))

    if np.unique(y).size < 2:
        out.update(dict.fromkeys(("image_auroc", "f1_max", "f1_max_threshold")))
        kind = "anomalous" if y[0] else "normal"
        notes.append(f"test set has only {kind} images: image metrics undefined")
    else:
        attempt(("image_auroc",), image_auroc, y, s)
        attempt(("f1_max", "f1_max_threshold"), f1_max, y, s)
    attempt(("pixel_auroc",), pixel_auroc, m, a)
    attempt(("aupro",), aupro, m, a, max_fpr)
    if threshold is not None:
        out["f1_at_threshold"] = f1_at(y, s, threshold) if y.any() else None
    if notes:
        out["note"] = "; ".join(dict.fromkeys(notes))
    return out


def evaluate_arrays(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    categories: Sequence[str],
    max_fpr: float = 0.3,
    threshold: float | Mapping[str, float] | None = None,
) -> dict:
    """Per-category and mean metrics of a test set, as plain JSON-able values.

    Takes image labels (N,), image scores (N,), masks (N, H, W) in {0, 1}, maps (N, H, W) and the
    category of each image. `threshold` (one float, or one per category) adds f1_at_threshold.
    Returns {"per_category": {category: metrics}, "mean": metrics}; metrics are image_auroc,
    pixel_auroc, aupro, f1_max, f1_max_threshold (and f1_at_threshold), None where the category's
    data cannot define them (with a "note"); "mean" averages each metric over the categories that
    define it (except f1_max_threshold) and counts them in "n_categories".
    Raises DataError on malformed inputs or a threshold mapping missing a category.
    """
    y, s = _scores(labels, scores)
    m, a = _pixels(masks, maps)
    cats = np.asarray(list(categories), dtype=object)
    if not (cats.size == y.size == m.shape[0]):
        raise DataError(
            f"need one label, score, mask/map and category per image; got {y.size}, {m.shape[0]}, {cats.size}"
        )
    per: dict[str, dict] = {}
    for cat in sorted(set(cats.tolist())):
        idx = np.flatnonzero(cats == cat)
        if isinstance(threshold, Mapping):
            if cat not in threshold:
                raise DataError(f"no threshold for category {cat!r}; have {sorted(threshold)}")
            t = float(threshold[cat])
        else:
            t = None if threshold is None else float(threshold)
        per[cat] = _category_metrics(y[idx], s[idx], m[idx], a[idx], max_fpr, t)
        log.debug("metrics of %s: %s", cat, per[cat])
    mean: dict = {}
    for key in _METRICS:
        if key == "f1_max_threshold" or key not in next(iter(per.values())):
            continue
        vals = [v[key] for v in per.values() if v.get(key) is not None]
        mean[key] = float(np.mean(vals)) if vals else None
        mean.setdefault("n_categories", {})[key] = len(vals)
    return {"per_category": per, "mean": mean}
