"""Dataset formats by name (``DATASETS``), ``load_splits``, and numpy batch iteration.

The torch ``SampleDataset`` lives in :mod:`qtool.data.torch_dataset` (importing torch is slow)
and is re-exported lazily from here and from :mod:`qtool.data`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qtool.data.mtd import read_mtd
from qtool.data.mvtec import read_mvtec
from qtool.data.samples import Sample, Splits
from qtool.data.synth import generate_synthetic
from qtool.data.transforms import ImageTransform
from qtool.errors import DataError
from qtool.recipe import DataConfig
from qtool.registry import Registry

logger = logging.getLogger(__name__)

DATASETS: Registry[Callable[[DataConfig], Splits]] = Registry("dataset format")
"""Dataset format name (``DataConfig.format``) -> reader ``(cfg) -> Splits``."""


def read_synth(cfg: DataConfig) -> Splits:
    """Generate (or reuse) synthetic data at ``cfg.root`` from ``cfg.synth``, then read it as MVTec."""
    generate_synthetic(Path(cfg.root), cfg.synth)
    return read_mvtec(cfg)


DATASETS.add("mvtec", read_mvtec)
DATASETS.add("mtd", read_mtd)
DATASETS.add("synth", read_synth)


def load_splits(cfg: DataConfig) -> Splits:
    """Read the dataset ``cfg`` describes into checked train/holdout/test splits.

    Raises:
        RegistryError: unknown ``cfg.format``.
        DataError: unreadable layout, empty split, or a file in two splits.
    """
    splits = DATASETS.get(cfg.format)(cfg)
    for sub in cfg.include:
        splits = merge_splits(splits, DATASETS.get(sub.format)(sub))
    splits.check()
    return splits


def merge_splits(a: Splits, b: Splits) -> Splits:
    """One multi-class dataset from two (``data.include``); category names must not collide.

    Raises:
        DataError: a category present in both.
    """
    clash = sorted(set(a.categories()) & set(b.categories()))
    if clash:
        raise DataError(f"included dataset at {b.root} repeats category {clash[0]!r}")
    roots = [str(r) for r in (a.root, b.root) if r is not None]
    root = Path(os.path.commonpath([str(Path(r).resolve()) for r in roots])) if len(roots) == 2 else None
    return Splits(train=[*a.train, *b.train], holdout=[*a.holdout, *b.holdout], test=[*a.test, *b.test], root=root)


def iter_batches(
    samples: Sequence[Sample],
    transform: ImageTransform,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[np.ndarray, list[Sample]]]:
    """Yield ``(images, samples)`` batches in order: images float32 (B, 3, S, S); the last may be short.

    Args:
        samples: the samples to read.
        transform: turns each sample's file into an array.
        batch_size: images per batch (>= 1).
        progress: optional callback, called with the number of samples in each finished batch.

    Raises:
        DataError: ``batch_size`` < 1, or an unreadable image (named).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        yield np.stack([transform.image(s.path) for s in chunk]), chunk
        if progress is not None:
            progress(len(chunk))


def __getattr__(name: str) -> Any:
    if name == "SampleDataset":
        from qtool.data.torch_dataset import SampleDataset

        return SampleDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
