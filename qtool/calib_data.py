"""Calibration data sources: held-out normal images, the seed paper's Gaussian noise, or a mix.

Sources yield preprocessed batches (B,3,S,S) lazily, so memory stays bounded whatever the
number of samples. Labelled anomalies are refused unless ``calib_data.allow_anomalies`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qtool.data import ImageTransform, Sample, Splits, iter_batches
from qtool.errors import CalibrationError
from qtool.recipe import CalibDataConfig
from qtool.registry import Registry


@dataclass
class CalibrationSet:
    """A recorded description plus a lazy stream of calibration batches."""

    description: dict
    batches: Callable[[], Iterator[np.ndarray]]
    count: int


def spread_order(n: int) -> list[int]:
    """``0 .. n-1`` in van der Corput order: every prefix is spread evenly over the range (0, n/2, n/4, 3n/4...)."""
    if n <= 1:
        return list(range(n))
    bits = (n - 1).bit_length()
    order = (int(f"{j:0{bits}b}"[::-1], 2) * n >> bits for j in range(1 << bits))
    return list(dict.fromkeys(order))  # steps of n / 2**bits <= 1: every index, first occurrence kept


def normal_pool(splits: Splits, n: int) -> list[Sample]:
    """Up to ``n`` normals, never the test split, representative of the dataset: round robin over the categories.

    Each category offers its held-out normals, then its training normals (the student has seen those), each
    part sorted by file name and taken in :func:`spread_order` (on MTD the names start with the acquisition
    group, so a prefix covers every group); the categories take turns, in order of first appearance. The
    order is fixed, so a longer pool extends a shorter one (the check set follows the search set's images).
    Earlier versions took the first ``n`` held-out images: on the multi-class recipe all of one category.
    """
    pool = in_turns((splits.holdout, splits.train), n)
    if not pool:
        raise CalibrationError("empty calibration set: the dataset has no held-out or training normals")
    return pool


def in_turns(parts: Sequence[list[Sample]], n: int) -> list[Sample]:
    """Up to ``n`` samples of ``parts``, the categories taking turns (see :func:`normal_pool`); [] if none."""
    queues: dict[str, list[Sample]] = {}
    for part in parts:
        groups: dict[str, list[Sample]] = {}
        for s in part:  # one pass; categories in order of first appearance
            groups.setdefault(s.category, []).append(s)
        for category, members in groups.items():
            members.sort(key=lambda s: str(s.path))
            queues.setdefault(category, []).extend(members[i] for i in spread_order(len(members)))
    longest = max((len(q) for q in queues.values()), default=0)
    return [q[i] for i in range(longest) for q in queues.values() if i < len(q)][:n]


def _check_labels(samples: list[Sample], cfg: CalibDataConfig) -> None:
    bad = [s for s in samples if s.label]
    if bad and not cfg.allow_anomalies:
        raise CalibrationError(
            f"calibration set holds {len(bad)} labelled anomalies (e.g. {bad[0].path}); "
            "set ptq.calib_data.allow_anomalies=true to force it"
        )


def _images(samples: list[Sample], transform: ImageTransform, batch: int) -> Iterator[np.ndarray]:
    for images, _ in iter_batches(samples, transform, batch):
        yield images


def _noise(n: int, size: int, cfg: CalibDataConfig, seed_offset: int = 0) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(cfg.seed + seed_offset)
    for i in range(0, n, cfg.batch_size):
        b = min(cfg.batch_size, n - i)
        yield (cfg.noise_mean + cfg.noise_std * rng.standard_normal((b, 3, size, size))).astype(np.float32)


SOURCES: Registry[Callable[[Splits, ImageTransform, CalibDataConfig], CalibrationSet]] = Registry("calibration source")


@SOURCES.register("train")
def train_source(splits: Splits, transform: ImageTransform, cfg: CalibDataConfig) -> CalibrationSet:
    """Held-out normal images (then training normals), never test images."""
    return _pool_window(normal_pool(splits, cfg.num_samples), transform, cfg)


def _pool_window(samples: list[Sample], transform: ImageTransform, cfg: CalibDataConfig,
                 **extra: object) -> CalibrationSet:
    """The train source's set of ``samples`` (a window of the normal pool), ``extra`` added to its description."""
    _check_labels(samples, cfg)
    desc = {"source": "train", "images": len(samples), **extra, "files": [str(s.path) for s in samples]}
    return CalibrationSet(desc, lambda: _images(samples, transform, cfg.batch_size), len(samples))


def calibration_draws(splits: Splits, transform: ImageTransform, cfg: CalibDataConfig) -> list[CalibrationSet]:
    """``cfg.draws`` train-source sets on disjoint windows of the normal pool: draw ``i`` is images ``[i*n, (i+1)*n)``.

    Draw 0 is :func:`train_source`'s set (the pool is fixed, so a longer pool extends a shorter one).

    Raises:
        CalibrationError: the pool holds fewer than ``draws x num_samples`` images, or refused anomalies.
    """
    n, k = cfg.num_samples, cfg.draws
    pool = normal_pool(splits, n * k)
    if len(pool) < n * k:
        raise CalibrationError(f"ptq.calib_data.draws: the normal pool holds {len(pool)} images; {k} draws of "
                               f"{n} need {n * k}")
    return [_pool_window(pool[i * n : (i + 1) * n], transform, cfg, draw=i) for i in range(k)]


@SOURCES.register("random-normal")
def noise_source(splits: Splits, transform: ImageTransform, cfg: CalibDataConfig) -> CalibrationSet:
    """Gaussian noise in the normalised input space (the seed paper's "random normal" data)."""
    desc = {"source": "random-normal", "images": cfg.num_samples, "mean": cfg.noise_mean, "std": cfg.noise_std,
            "seed": cfg.seed}
    return CalibrationSet(desc, lambda: _noise(cfg.num_samples, transform.size, cfg), cfg.num_samples)


@SOURCES.register("mix")
def mix_source(splits: Splits, transform: ImageTransform, cfg: CalibDataConfig) -> CalibrationSet:
    """Normal images and noise, ``mix_noise_fraction`` of the samples being noise."""
    n_noise = int(round(cfg.num_samples * cfg.mix_noise_fraction))
    samples = normal_pool(splits, cfg.num_samples - n_noise) if n_noise < cfg.num_samples else []
    _check_labels(samples, cfg)

    def stream() -> Iterator[np.ndarray]:
        yield from _images(samples, transform, cfg.batch_size)
        yield from _noise(n_noise, transform.size, cfg, seed_offset=1)

    desc = {"source": "mix", "images": len(samples), "noise": n_noise, "mean": cfg.noise_mean,
            "std": cfg.noise_std, "seed": cfg.seed, "files": [str(s.path) for s in samples]}
    return CalibrationSet(desc, stream, len(samples) + n_noise)


@SOURCES.register("test")
def test_source(splits: Splits, transform: ImageTransform, cfg: CalibDataConfig) -> CalibrationSet:
    """The labelled test split: leaks evaluation data, refused unless anomalies are explicitly allowed."""
    if not cfg.allow_anomalies:  # test normals are evaluation data too: refuse the split, not its anomalies
        raise CalibrationError("calibration source 'test' uses the evaluation split; "
                               "set ptq.calib_data.allow_anomalies=true to force it")
    samples = in_turns((splits.test,), cfg.num_samples)  # every category, spread over its file names
    desc = {"source": "test", "images": len(samples), "warning": "calibrated on the test split",
            "files": [str(s.path) for s in samples]}
    return CalibrationSet(desc, lambda: _images(samples, transform, cfg.batch_size), len(samples))


def calibration_set(splits: Splits, transform: ImageTransform, cfg: CalibDataConfig) -> CalibrationSet:
    """Build the calibration source named by ``cfg.source``.

    Raises:
        RegistryError: unknown source. CalibrationError: empty set or refused anomalies.
    """
    return SOURCES.get(cfg.source)(splits, transform, cfg)
