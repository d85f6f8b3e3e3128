"""Contract tests over every registered model: train, export, parity, evaluate, checkpoint round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.kd_recipes import SIZE, tiny_recipe

from qtool.data import ImageTransform, load_splits
from qtool.evaluate import TorchPredictor, evaluate
from qtool.export import export_onnx, parity
from qtool.models import MODELS, build_model, load_checkpoint, save_checkpoint
from qtool.recipe import EvalConfig
from qtool.train import fit

PARTS = ("teacher", "student", "head")


@pytest.fixture(scope="module", params=MODELS.names())
def trained(request, tmp_path_factory):
    """Train each registered model for a few steps; yields (recipe, splits, result)."""
    tmp = tmp_path_factory.mktemp(request.param)
    recipe = tiny_recipe(tmp_path_factory.getbasetemp() / "synth", request.param)
    splits = load_splits(recipe.data)
    result = fit(recipe, splits.train, splits.holdout, tmp / "run", "all")
    return recipe, splits, result


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def test_training_loss_finite_and_decreasing(trained) -> None:
    _, _, result = trained
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(row["holdout_loss"]) for row in result.history)
    assert losses[-1] < losses[0], losses


def test_forward_shapes_and_parts(trained) -> None:
    _, _, result = trained
    model, _ = load_checkpoint(result.checkpoint)
    amap, score = model(torch.from_numpy(_images(3)))
    assert amap.shape == (3, 1, SIZE, SIZE) and score.shape == (3,)
    assert torch.allclose(score, amap.flatten(1).amax(1))
    assert all(k.split(".")[0] in PARTS for k in model.state_dict()), "state outside teacher/student/head"


def test_teacher_frozen_and_kept_in_eval(trained) -> None:
    recipe, _, _ = trained
    model = build_model(recipe.model, SIZE).train()
    assert not model.teacher.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and not trainable & {id(p) for p in model.teacher.parameters()}


def test_onnx_parity_and_node_prefixes(trained, tmp_path: Path) -> None:
    _, _, result = trained
    model, _ = load_checkpoint(result.checkpoint)
    path = export_onnx(model, tmp_path / "m.onnx", SIZE, batch_size=2)
    diff = parity(model, path, _images(2, seed=1))
    assert diff["map_max_rel"] < 1e-4, diff
    graph = onnx.load(str(path)).graph
    convs = [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    # learned convolutions belong to teacher or student; the head holds only the fixed map blur (RD)
    assert convs and all(n.startswith(("/teacher/", "/student/", "/head/blur/")) for n in convs), convs
    assert any(n.name.startswith("/head/") for n in graph.node)


def test_evaluate_returns_metrics(trained) -> None:
    recipe, splits, result = trained
    model, _ = load_checkpoint(result.checkpoint)
    out = evaluate(TorchPredictor(model), splits, ImageTransform(recipe.data), EvalConfig(batch_size=4))
    mean = out["metrics"]["mean"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= mean[key] <= 1.0
    assert out["n_test"] == len(splits.test)


def test_checkpoint_round_trip(trained, tmp_path: Path) -> None:
    recipe, _, result = trained
    model, meta = load_checkpoint(result.checkpoint)
    again, _ = load_checkpoint(save_checkpoint(model, tmp_path / "again.pt", recipe, meta["extra"]))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.from_numpy(_images(2))
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])


@pytest.mark.parametrize("name", ["mtd_stfpm.yaml", "mtd_rd.yaml", "mtd_us.yaml"])
def test_model_recipes_load_and_build(name: str) -> None:
    from qtool.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / name)
    model = build_model(recipe.model.model_copy(update={"weights": "none"}), recipe.data.image_size)
    assert model.head.out_size == recipe.data.image_size
