"""Bundled KD anomaly models; importing this package registers them in ``MODELS``."""

from qtool.models import reverse_distillation, stfpm, students  # noqa: F401  (register "rd", "stfpm", "us")
from qtool.models.backbones import BACKBONES, build_backbone
from qtool.models.base import MODELS, KDModel, build_model
from qtool.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["BACKBONES", "MODELS", "KDModel", "build_backbone", "build_model", "load_checkpoint", "save_checkpoint"]
