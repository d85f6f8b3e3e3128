"""Tiny recipes for training any registered model on 64x64 synthetic data in seconds."""

from __future__ import annotations

from pathlib import Path

from qtool.recipe import DataConfig, ModelConfig, Recipe, SynthConfig, TrainConfig

SIZE = 64
# small options per model; models not listed use their defaults
TINY: dict[str, dict] = {
    "us": {"width": 8, "descriptor_dim": 16, "n_students": 2, "teacher_epochs": 2, "compact_weight": 0.1},
    "rd": {"embed_channels": 64},
}


def tiny_recipe(root: Path, name: str, epochs: int = 3) -> Recipe:
    """A recipe for a tiny run of model ``name`` on synthetic data at ``root`` (random-init backbone)."""
    data = DataConfig(format="synth", root=str(root), image_size=SIZE, holdout_fraction=0.25,
                      synth=SynthConfig(categories=["grid"], n_train=8, n_test_good=2, n_test_defect=2, size=SIZE))
    model = ModelConfig(name=name, weights="none", options=TINY.get(name, {}))
    train = TrainConfig(epochs=epochs, batch_size=4, optimizer="adam", lr=1e-3, threads=1)
    return Recipe(name=f"contract-{name}", data=data, model=model, train=train)
