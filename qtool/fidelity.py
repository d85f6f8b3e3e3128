"""How closely a quantized model's anomaly maps and image scores follow its fp32 reference."""

from __future__ import annotations

import math

import numpy as np

from qtool.errors import DataError
from qtool.metrics import CHUNK_PIXELS


class PearsonAccumulator:
    """Streaming Pearson correlation of two equally shaped arrays fed in batches (bounded memory).

    Sums are taken around the first batch's means, which keeps the float64 sums well conditioned.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift = (0.0, 0.0)
        self._sums = np.zeros(5)  # x, y, xx, yy, xy (shifted)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add a batch; raises DataError when shapes differ."""
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        if x.shape != y.shape:
            raise DataError(f"Pearson batch shapes differ: {x.shape} and {y.shape}")
        if x.size == 0:
            return
        if self.n == 0:
            self._shift = (float(x.mean()), float(y.mean()))
        x, y = x - self._shift[0], y - self._shift[1]
        self._sums += (x.sum(), y.sum(), x @ x, y @ y, x @ y)
        self.n += x.size

    def compute(self) -> float | None:
        """Pearson correlation so far; None when undefined (no data or a constant input)."""
        if self.n == 0:
            return None
        sx, sy, sxx, syy, sxy = self._sums
        vx, vy = sxx - sx * sx / self.n, syy - sy * sy / self.n
        if vx <= 0 or vy <= 0:
            return None
        return float(np.clip((sxy - sx * sy / self.n) / math.sqrt(vx * vy), -1.0, 1.0))


def map_fidelity(
    ref_maps: np.ndarray, maps: np.ndarray, ref_scores: np.ndarray, scores: np.ndarray
) -> dict[str, float | None]:
    """How closely `maps`/`scores` (e.g. a quantized model) follow `ref_maps`/`ref_scores` (fp32).

    Returns pixel_pearson (over all pixels, streamed by image), map_max_abs_diff, score_max_abs_shift,
    score_max_rel_shift (max shift divided by the range of the reference scores) and score_spearman
    (rank correlation of image scores, scipy). Correlations are None where undefined (constant input).
    Raises DataError when shapes differ or values are not finite.
    """
    from scipy.stats import spearmanr

    ra, qa = np.asarray(ref_maps), np.asarray(maps)
    rs, qs = np.asarray(ref_scores, np.float64).ravel(), np.asarray(scores, np.float64).ravel()
    if ra.shape != qa.shape or ra.size == 0 or rs.shape != qs.shape or rs.size == 0:
        raise DataError(
            f"fidelity needs equal non-empty shapes; maps {ra.shape}/{qa.shape}, scores {rs.shape}/{qs.shape}"
        )
    if not (np.isfinite(rs).all() and np.isfinite(qs).all()):
        raise DataError("fidelity scores contain NaN/Inf values")
    pearson, max_diff = PearsonAccumulator(), 0.0
    flat_r, flat_q = ra.reshape(ra.shape[0], -1), qa.reshape(qa.shape[0], -1)
    step = max(1, CHUNK_PIXELS // max(1, flat_r.shape[1]))
    for i in range(0, flat_r.shape[0], step):
        r, q = flat_r[i : i + step].astype(np.float64), flat_q[i : i + step].astype(np.float64)
        if not (np.isfinite(r).all() and np.isfinite(q).all()):
            raise DataError(f"fidelity maps contain NaN/Inf values in images {i}..{i + len(r) - 1}")
        pearson.update(r, q)
        max_diff = max(max_diff, float(np.abs(r - q).max()))
    shift = float(np.abs(qs - rs).max())
    spread = float(rs.max() - rs.min())
    rho = None
    if rs.size > 1 and np.ptp(rs) > 0 and np.ptp(qs) > 0:
        rho = float(spearmanr(rs, qs).statistic)
    return {
        "pixel_pearson": pearson.compute(),
        "map_max_abs_diff": max_diff,
        "score_max_abs_shift": shift,
        "score_max_rel_shift": shift / spread if spread > 0 else None,
        "score_spearman": rho,
    }
