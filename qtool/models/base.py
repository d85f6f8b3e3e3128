"""Base class and registry of the bundled KD anomaly models.

Every model has submodules named ``teacher``, ``student`` and ``head`` so that exported ONNX node
names start with ``/teacher/``, ``/student/`` and ``/head/``; PTQ selects parts by these prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qtool.errors import ModelError
from qtool.recipe import ModelConfig, TrainConfig
from qtool.registry import Registry


class KDModel(nn.Module):
    """A teacher, a student and an anomaly-map head; ``forward`` is the inference graph."""

    teacher: nn.Module
    student: nn.Module
    head: nn.Module
    MAP_OPTIONS: tuple[str, ...] = ()  # options that change only the map head, never training (not fingerprinted)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (anomaly map (B,1,H,W), image score (B,))."""
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the KD loss terms for a batch of normal images; key ``loss`` is the total."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates (the teacher stays frozen)."""
        return (p for n, p in self.named_parameters() if not n.startswith("teacher."))

    def prepare_training(self, images: torch.Tensor, cfg: TrainConfig, seed: int = 0) -> dict[str, Any]:
        """Stage run once before the KD epochs on the training images (default: nothing).

        Models whose teacher is itself trained first (Uninformed Students' descriptor teacher)
        do it here. Args: ``images`` (N,3,S,S) preprocessed normals, the train section, a seed.
        Returns: JSON-able facts about the stage (logged and stored in the checkpoint).
        """
        return {}

    def finish_training(self, images: torch.Tensor, cfg: TrainConfig) -> dict[str, Any]:
        """Stage run once after the KD epochs on normal images (default: nothing).

        Models that normalise their anomaly map with statistics of normal data compute them here.
        Returns: JSON-able facts about the stage.
        """
        return {}

    def train(self, mode: bool = True) -> KDModel:
        """Set training mode; the frozen teacher always stays in eval mode (BatchNorm statistics)."""
        super().train(mode)
        self.teacher.eval()
        return self


ModelBuilder = Callable[[ModelConfig, int], KDModel]
MODELS: Registry[ModelBuilder] = Registry("model")


def build_model(cfg: ModelConfig, image_size: int) -> KDModel:
    """Build the registered model ``cfg.name`` for square inputs of ``image_size``.

    Raises:
        RegistryError: unknown model name (lists the available ones). ModelError: bad options.
    """
    return MODELS.get(cfg.name)(cfg, image_size)


def check_options(cfg: ModelConfig, allowed: Iterable[str]) -> None:
    """Refuse a model option ``cfg.name`` does not know.

    Raises:
        ModelError: naming the first unknown option and the allowed ones.
    """
    allowed = tuple(allowed)
    unknown = sorted(set(cfg.options) - set(allowed))
    if unknown:
        raise ModelError(f"unknown {cfg.name} option {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}")


def freeze(module: nn.Module) -> nn.Module:
    """Disable gradients of ``module`` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
