"""The anomaly-map head shared by the bundled models, exported inside the ONNX graph.

Per level a teacher-student distance map, upsampled to a common size, combined over levels
(product as STFPM, or sum), resized to the input size, optionally smoothed with a Gaussian (Reverse
Distillation's evaluation-time blur, sigma 4); the image score is the map's maximum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtool.registry import Registry

DISTANCES: Registry = Registry("distance")


@DISTANCES.register("l2norm")
def l2norm_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Half squared distance of channel-L2-normalised features, (B,1,h,w) (STFPM)."""
    return 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1, keepdim=True)


@DISTANCES.register("cosine")
def cosine_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One minus channel cosine similarity, (B,1,h,w) (Reverse Distillation)."""
    return 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)


@DISTANCES.register("sqerr")
def squared_error(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean squared regression error over channels, (B,1,h,w) (students regressing descriptors)."""
    return (t - s).pow(2).mean(dim=1, keepdim=True)


@DISTANCES.register("ensemble")
def ensemble_error_variance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Regression error of the ensemble mean and predictive variance, (B,2,h,w) (Uninformed Students).

    ``t`` is the (normalised) teacher descriptor (B,C,h,w), ``s`` the stacked student outputs
    (B,K,C,h,w). Channel 0: mean over channels of ``(mean_k s_k - t)^2``; channel 1: mean over
    channels of the population variance over the K students.
    """
    mean = s.mean(dim=1)
    err = (mean - t).pow(2).mean(dim=1, keepdim=True)
    var = (s - mean.unsqueeze(1)).pow(2).mean(dim=1).mean(dim=1, keepdim=True)
    return torch.cat([err, var], dim=1)


COMBINERS: Registry = Registry("level combiner")
COMBINERS.add("product", lambda maps: torch.stack(maps, 0).prod(0))
COMBINERS.add("sum", lambda maps: torch.stack(maps, 0).sum(0))
COMBINERS.add("mean", lambda maps: torch.stack(maps, 0).mean(0))


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of a (B,1,H,W) map, reflect padding, taps out to 4 sigma.

    Two fixed 1-D convolutions in the exported graph (no weights in the state dict), as anomalib's and
    the RD original's blur (kernel 2 * int(4 sigma + 0.5) + 1).
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        radius = int(4.0 * self.sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / self.sigma) ** 2)
        k = k / k.sum()
        self.radius = radius
        self.register_buffer("kernel_h", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", k.view(1, 1, -1, 1), persistent=False)

    def forward(self, amap: torch.Tensor) -> torch.Tensor:
        """The smoothed map, same shape."""
        r = self.radius
        amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), self.kernel_h)
        return F.conv2d(F.pad(amap, (0, 0, r, r), mode="reflect"), self.kernel_v)


def map_levels(value: object, levels: list[int], model: str) -> tuple[int, ...] | None:
    """A model's ``map_levels`` option checked: which of ``model.levels`` feed the anomaly map.

    Training still matches every level; only the map (and so the score) uses the chosen ones.
    Returns: their positions in ``levels`` (ascending), or None for all (option absent).
    Raises:
        ModelError: not a non-empty list of distinct entries of ``levels`` (the message names both).
    """
    from qtool.errors import ModelError

    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) > 0 and len(set(value)) == len(value)
          and all(isinstance(v, int) and not isinstance(v, bool) and v in levels for v in value))
    if not ok:
        raise ModelError(f"{model} option map_levels={value!r}: expected distinct entries of model.levels {levels}")
    return tuple(sorted(levels.index(v) for v in value))


def map_sigma(value: object, model: str) -> float:
    """A model's ``map_sigma`` option checked: a finite number >= 0 (0: no smoothing).

    Raises:
        ModelError: anything else (the message names the model and the option).
    """
    from qtool.errors import ModelError

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ModelError(f"{model} option map_sigma={value!r}: expected a number >= 0 (0 disables the map blur)")
    return float(value)


def map_combine(value: object, model: str, default: str) -> str:
    """A model's ``map_combine`` option checked: the ``COMBINERS`` name that joins its level maps.

    ``product`` keeps a pixel high only where every mapped level is; ``sum`` and ``mean`` follow the
    level with the largest distances. Returns ``default`` when the option is absent.
    Raises:
        ModelError: not a registered combiner (the message names the model and the choices).
    """
    from qtool.errors import ModelError

    if value is None:
        return default
    if not isinstance(value, str) or value not in COMBINERS:
        raise ModelError(f"{model} option map_combine={value!r}: expected one of {COMBINERS.names()}")
    return value


class AnomalyMapHead(nn.Module):
    """Teacher/student features -> (anomaly map (B,1,H,W), image score (B,)).

    Args:
        distance: a ``DISTANCES`` name.
        combine: a ``COMBINERS`` name.
        map_size: common resolution the level maps are upsampled to before combining.
        out_size: output map resolution (the input image size).
        sigma: Gaussian smoothing of the output map before the score (0: none).
        levels: positions of the levels that feed the map (None: all); the others are ignored, so
            the exported graph drops whatever computes only them.
    """

    def __init__(self, distance: str, combine: str, map_size: int, out_size: int, sigma: float = 0.0,
                 levels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.distance_name, self.combine_name = distance, combine
        self._distance = DISTANCES.get(distance)
        self._combine = COMBINERS.get(combine)
        self.map_size = map_size
        self.out_size = out_size
        self.blur = GaussianBlur(sigma) if sigma > 0 else None
        self.levels = levels

    def level_maps(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level distance maps at ``map_size``."""
        size = (self.map_size, self.map_size)
        return [
            F.interpolate(self._distance(t, s), size=size, mode="bilinear", align_corners=False)
            for t, s in zip(teacher, student)
        ]

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the anomaly map at ``out_size`` and the per-image maximum as score."""
        if self.levels is not None:
            teacher, student = [teacher[i] for i in self.levels], [student[i] for i in self.levels]
        amap = self._combine(self.level_maps(teacher, student))
        if self.out_size != self.map_size:
            amap = F.interpolate(amap, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        score = amap.flatten(1).amax(dim=1)
        return amap, score
