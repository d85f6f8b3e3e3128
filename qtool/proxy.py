"""Proxy anomaly-detection metrics on the search set (normal calibration images + synthetic anomalies).

Separation (image and pixel AUROC of the synthetic anomalies against the normals), and the
distortion of a quantized model's outputs where an anomaly detector lives: the upper tail of the
fp32 map, the synthetic defect regions, and the order of normal vs anomalous image scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qtool.errors import CalibrationError
from qtool.metrics import EXACT_PIXEL_LIMIT, image_auroc, pixel_auroc

SEPARATION_KEYS = ("image_auroc", "pixel_auroc")


def _check_shapes(maps: np.ndarray, masks: np.ndarray) -> None:
    if maps.shape != masks.shape:
        raise CalibrationError(f"anomaly maps {maps.shape} and synthetic defect masks {masks.shape} differ in shape; "
                               "the search needs a model whose map has the input's size")


def separation(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray,
               exact_limit: int = EXACT_PIXEL_LIMIT) -> dict[str, float]:
    """Image AUROC (scores vs labels) and pixel AUROC (maps vs masks) on the search set.

    ``exact_limit``: up to this many pixels the pixel AUROC is exact, above it binned (see
    :func:`qtool.metrics.pixel_auroc`); a search that scores many graphs lowers it for speed.

    Raises:
        CalibrationError: maps and masks of different shapes.
        DataError: a set without both normal and anomalous images (or pixels).
    """
    _check_shapes(maps, masks)
    return {"image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc(masks, maps, exact_limit=exact_limit)}


SELECTION_RULE = "proxy pixel AUROC, then proxy image AUROC"


def proxy_rank(row: dict[str, float]) -> tuple[float, float]:
    """Sort key of a row with ``proxy_pixel_auroc`` / ``proxy_image_auroc``: higher is better (``SELECTION_RULE``)."""
    return row["proxy_pixel_auroc"], row["proxy_image_auroc"]


def rank_correlation(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman correlation of (x, y) pairs (proxy vs test AUROC across cells); None under 3 pairs or if undefined."""
    from scipy.stats import spearmanr

    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:  # constant input: no correlation defined
        return None
    rho = float(spearmanr(xs, ys).statistic)
    return rho if math.isfinite(rho) else None


def separation_drop(reference: dict[str, float], quantized: dict[str, float]) -> float:
    """The proxy's loss: the larger of the image and pixel AUROC drops from ``reference`` to ``quantized``."""
    return max(reference[k] - quantized[k] for k in SEPARATION_KEYS)


@dataclass(frozen=True)
class DistortionParts:
    """One graph's distortion, per image (see :meth:`MapDistortion.parts`).

    ``sq_err`` (N,): squared map error summed over each image's region; ``flips`` (normals, anomalies): 0 / 0.5 / 1
    per (normal, anomaly) pair whose score order left fp32's.
    """

    sq_err: np.ndarray
    flips: np.ndarray


class MapDistortion:
    """How far a quantized model's maps and scores are from fp32's where it matters (lower is better).

    ``loss = map_rel_rms + rank_weight * order_flips``:

    * ``map_rel_rms``: RMS of the map error over the region that decides detections (synthetic
      defect pixels, plus pixels above the ``tail_quantile`` of fp32 map values on normals), divided
      by the RMS of the fp32 map there;
    * ``order_flips``: share of (normal, anomalous) image pairs whose score order differs from fp32's
      (a new tie counts one half).

    Args:
        ref_maps / ref_scores: fp32 outputs on the search images (N, H, W) and (N,).
        masks: synthetic defect masks (N, H, W); labels: (N,) 0 normal, 1 anomalous.

    Raises:
        CalibrationError: maps and masks of different shapes.
    """

    def __init__(self, ref_maps: np.ndarray, ref_scores: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                 tail_quantile: float = 0.99, rank_weight: float = 1.0) -> None:
        ref = np.asarray(ref_maps, dtype=np.float64)
        _check_shapes(ref, masks)
        labels = np.asarray(labels).ravel()
        normal = ref[labels == 0] if np.any(labels == 0) else ref
        self.region = (np.asarray(masks) > 0) | (ref > np.quantile(normal, tail_quantile))
        self.ref = ref[self.region]
        self.norm = math.sqrt(float(np.mean(self.ref**2))) if self.ref.size else 1.0
        self.norm = self.norm if self.norm > 0 else 1.0
        self.normals, self.anomalies = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
        s = np.asarray(ref_scores, dtype=np.float64).ravel()
        self.ref_order = np.sign(s[self.anomalies][None, :] - s[self.normals][:, None])
        self.rank_weight = rank_weight
        # per image: region pixels and the fp32 map's squared sum there (the norm of a resample)
        self.image_of = np.nonzero(self.region)[0]  # the image of each region pixel, in self.ref's order
        self.pixels = np.bincount(self.image_of, minlength=len(ref)).astype(np.float64)
        self.ref_sq = np.bincount(self.image_of, weights=self.ref**2, minlength=len(ref))

    def resampled_losses(self, parts: DistortionParts, draws: np.ndarray) -> np.ndarray:
        """The loss on each resample of the images: ``draws`` (R, N) counts of each image (normals, anomalies).

        With every count 1 it is :meth:`__call__`'s loss (up to rounding).
        """
        w = np.asarray(draws, dtype=np.float64)
        pixels = w @ self.pixels
        safe = np.where(pixels > 0, pixels, 1.0)
        norm = np.sqrt(w @ self.ref_sq / safe)
        rel = np.where(pixels > 0, np.sqrt(w @ parts.sq_err / safe) / np.where(norm > 0, norm, 1.0), 0.0)
        if not parts.flips.size:
            return rel
        wn, wa = w[:, self.normals], w[:, self.anomalies]
        flips = np.einsum("rn,na,ra->r", wn, parts.flips, wa) / (wn.sum(axis=1) * wa.sum(axis=1))
        return rel + self.rank_weight * flips

    def draws(self, rounds: int, seed: int = 0) -> np.ndarray:
        """(rounds, N) image counts of stratified bootstrap resamples (normals and anomalies drawn separately)."""
        rng = np.random.default_rng(seed)
        counts = np.zeros((rounds, len(self.pixels)), np.int64)
        for group in (self.normals, self.anomalies):
            if group.size:
                picks = group[rng.integers(0, group.size, size=(rounds, group.size))]
                np.add.at(counts, (np.arange(rounds)[:, None], picks), 1)
        return counts

    def parts(self, maps: np.ndarray, scores: np.ndarray) -> DistortionParts:
        """Per-image pieces of the distortion (:meth:`summary` sums them; :meth:`resampled_losses` reweights them)."""
        err = (np.asarray(maps, dtype=np.float64)[self.region] - self.ref) ** 2
        s = np.asarray(scores, dtype=np.float64).ravel()
        order = np.sign(s[self.anomalies][None, :] - s[self.normals][:, None])
        flips = np.where(order == self.ref_order, 0.0, np.where(order == 0, 0.5, 1.0))
        return DistortionParts(np.bincount(self.image_of, weights=err, minlength=len(self.pixels)), flips)

    def __call__(self, maps: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        """``{"loss", "map_rel_rms", "order_flips"}`` of one quantized model's outputs."""
        return self.summary(self.parts(maps, scores))

    def summary(self, parts: DistortionParts) -> dict[str, float]:
        """``{"loss", "map_rel_rms", "order_flips"}`` from a graph's :meth:`parts` (all images once)."""
        pixels = float(self.pixels.sum())
        rel_rms = math.sqrt(float(parts.sq_err.sum()) / pixels) / self.norm if pixels else 0.0
        flips = float(np.mean(parts.flips)) if parts.flips.size else 0.0
        return {"loss": rel_rms + self.rank_weight * flips, "map_rel_rms": rel_rms, "order_flips": flips}
