"""``SampleDataset``: samples as a torch map-style dataset of image, mask, label and category."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from qtool.data.samples import Sample
from qtool.data.transforms import ImageTransform


class SampleDataset(Dataset):
    """Map-style dataset over samples.

    Items are dicts: ``image`` Tensor float32 (3, S, S), ``mask`` Tensor float32 (S, S) in {0, 1},
    ``label`` int, ``category`` str.

    Args:
        samples: the samples, in order.
        transform: reads images and masks.
    """

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        return {
            "image": torch.from_numpy(self.transform.image(s.path)),
            "mask": torch.from_numpy(self.transform.mask(s)),
            "label": s.label,
            "category": s.category,
        }
