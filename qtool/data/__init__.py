"""Datasets: MVTec AD and MTD readers, a synthetic generator, transforms and leakage-safe splits.

``SampleDataset`` (torch) is imported lazily so ``import qtool.data`` does not import torch.
"""

from __future__ import annotations

from typing import Any

from qtool.data import real_textures  # noqa: F401  (registers brick, grass, gravel)
from qtool.data.datasets import DATASETS, iter_batches, load_splits, read_synth
from qtool.data.listing import IMAGE_EXTENSIONS, list_images
from qtool.data.mtd import read_mtd, split_free
from qtool.data.mvtec import read_mvtec, read_mvtec_category
from qtool.data.samples import Sample, Splits
from qtool.data.synth import generate_synthetic
from qtool.data.synth_scenes import CATEGORIES as SYNTH_CATEGORIES
from qtool.data.transforms import ImageTransform, apply_geometry, open_image

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "SYNTH_CATEGORIES",
    "ImageTransform",
    "Sample",
    "SampleDataset",
    "Splits",
    "apply_geometry",
    "generate_synthetic",
    "iter_batches",
    "list_images",
    "load_splits",
    "open_image",
    "read_mtd",
    "read_mvtec",
    "read_mvtec_category",
    "read_synth",
    "split_free",
]


def __getattr__(name: str) -> Any:
    if name == "SampleDataset":
        from qtool.data.torch_dataset import SampleDataset

        return SampleDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
