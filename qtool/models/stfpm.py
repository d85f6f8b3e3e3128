"""STFPM: a frozen pretrained teacher, a same-architecture student from scratch, features matched per level.

Loss (per level): channel-L2-normalise both features, half squared difference summed over channels,
mean over positions; summed over levels. Map: the same per-level distance, upsampled to the first
level's resolution, multiplied over levels, resized to the input; image score = map maximum.
Options (map only, training unchanged): ``map_levels`` (entries of ``model.levels``, default all),
``map_sigma`` (Gaussian blur of the map, default 0) and ``map_combine`` (``COMBINERS`` name, default
``product``).
"""

from __future__ import annotations

import torch

from qtool.models.backbones import build_backbone
from qtool.models.base import MODELS, KDModel, check_options, freeze
from qtool.models.dcam import Dcam
from qtool.models.head import AnomalyMapHead, l2norm_distance, map_combine, map_levels, map_sigma
from qtool.recipe import ModelConfig


class Stfpm(KDModel):
    """Student-Teacher Feature Pyramid Matching (Wang et al. 2021), with optional DCAM in training."""

    MAP_OPTIONS = ("map_levels", "map_sigma", "map_combine")

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        check_options(cfg, self.MAP_OPTIONS)
        self.teacher = freeze(build_backbone(cfg.backbone, cfg.levels, cfg.weights))
        self.student = build_backbone(cfg.backbone, cfg.levels, "none")
        levels = map_levels(cfg.options.get("map_levels"), cfg.levels, "stfpm")
        map_size = image_size // self.teacher.reductions[levels[0] if levels else 0]
        self.head = AnomalyMapHead("l2norm", map_combine(cfg.options.get("map_combine"), "stfpm", "product"),
                                   map_size=map_size, out_size=image_size,
                                   sigma=map_sigma(cfg.options.get("map_sigma", 0.0), "stfpm"), levels=levels)
        self.dcam = Dcam(self.student.channels, cfg.dcam) if cfg.dcam.enabled else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference graph: teacher, student, head (DCAM is never part of it)."""
        return self.head(self.teacher(x), self.student(x))

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """STFPM loss, plus DCAM's spatial-KL and channel-cosine terms when enabled."""
        with torch.no_grad():
            teacher = self.teacher(x)
        student = self.student(x)
        terms = {"stfpm": sum(l2norm_distance(t, s).mean() for t, s in zip(teacher, student))}
        if self.dcam is not None:
            terms.update(self.dcam.losses(teacher, student))
        terms["loss"] = sum(terms.values())
        return terms


MODELS.add("stfpm", Stfpm)
