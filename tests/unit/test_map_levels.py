"""Map-only options (``map_levels``, ``map_combine``): the map changes, training and fingerprint do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qtool.errors import ModelError
from qtool.export import export_onnx
from qtool.models import build_model
from qtool.models.head import cosine_distance, l2norm_distance
from qtool.recipe import ModelConfig, Recipe
from qtool.train import recipe_fingerprint


def _model(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, backbone="resnet18", weights="none", options=options), 64).eval()


def _upsampled(dist: torch.Tensor, size: int = 64) -> torch.Tensor:
    return torch.nn.functional.interpolate(dist, size=(size, size), mode="bilinear", align_corners=False)


def test_rd_deepest_level_map_is_that_level_alone_and_the_graph_drops_the_other_decoder_blocks(tmp_path: Path) -> None:
    import onnxruntime as ort

    full, deep = _model("rd", map_sigma=0), _model("rd", map_sigma=0, map_levels=[3])
    deep.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = full.teacher(x)
        want = _upsampled(cosine_distance(feats[2], full.student(feats)[2]))
        got, score = deep(x)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(score, want.flatten(1).amax(1))
        assert torch.equal(full.training_loss(x)["loss"], deep.training_loss(x)["loss"])  # training: every level
    paths = {k: export_onnx(m, tmp_path / f"{k}.onnx", 64) for k, m in {"full": full, "deep": deep}.items()}
    deconvs = {k: sum(n.op_type == "ConvTranspose" for n in onnx.load(str(p)).graph.node) for k, p in paths.items()}
    assert deconvs == {"full": 6, "deep": 2}  # two ConvTranspose2d per decoder block; only the first block is left
    ort_map = ort.InferenceSession(str(paths["deep"]), providers=["CPUExecutionProvider"]).run(
        None, {"image": x[:1].numpy()})[0]
    assert np.allclose(ort_map, got[:1].numpy(), atol=1e-5)


def test_stfpm_map_levels_multiply_only_the_chosen_levels() -> None:
    model = _model("stfpm", map_levels=[2, 3])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t, s = model.teacher(x), model.student(x)
        want = _upsampled(l2norm_distance(t[1], s[1]), 8) * _upsampled(l2norm_distance(t[2], s[2]), 8)
        got, _ = model(x)
    assert model.head.map_size == 8  # the finest chosen level's grid (stride 8 at 64 px)
    assert torch.allclose(got, _upsampled(want), atol=1e-6)


@pytest.mark.parametrize("name", ["rd", "stfpm"])
@pytest.mark.parametrize("bad", [[], [4], [3, 3], "3", [True], 3])
def test_bad_map_levels_is_a_model_error_naming_the_levels(name: str, bad) -> None:
    with pytest.raises(ModelError, match=rf"{name} option map_levels=.*model.levels \[1, 2, 3\]"):
        _model(name, map_levels=bad)


def test_rd_product_combiner_multiplies_the_level_maps_and_exports(tmp_path: Path) -> None:
    import onnxruntime as ort

    summed, product = _model("rd", map_sigma=0), _model("rd", map_sigma=0, map_combine="product")
    product.load_state_dict(summed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = summed.teacher(x)
        maps = [_upsampled(cosine_distance(t, s)) for t, s in zip(feats, summed.student(feats))]
        assert torch.allclose(summed(x)[0], maps[0] + maps[1] + maps[2], atol=1e-6)
        got, _ = product(x)
        assert torch.allclose(got, maps[0] * maps[1] * maps[2], atol=1e-7)
        assert torch.equal(summed.training_loss(x)["loss"], product.training_loss(x)["loss"])
    path = export_onnx(product, tmp_path / "rd.onnx", 64)
    ort_map = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x[:1].numpy()})[0]
    assert np.allclose(ort_map, got[:1].numpy(), rtol=1e-4, atol=1e-8)


def test_stfpm_sum_combiner_replaces_its_product() -> None:
    model = _model("stfpm", map_combine="sum")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t, s = model.teacher(x), model.student(x)
        want = sum(_upsampled(l2norm_distance(a, b), 16) for a, b in zip(t, s))
        got, _ = model(x)
    assert model.head.combine_name == "sum"
    assert torch.allclose(got, _upsampled(want), atol=1e-6)


@pytest.mark.parametrize("name", ["rd", "stfpm"])
@pytest.mark.parametrize("bad", ["max", "", 1, ["sum"]])
def test_bad_map_combine_is_a_model_error_naming_the_choices(name: str, bad) -> None:
    with pytest.raises(ModelError, match=rf"{name} option map_combine=.*expected one of \['mean', 'product', 'sum'\]"):
        _model(name, map_combine=bad)


def test_unknown_stfpm_option_is_refused() -> None:
    allowed = "map_levels, map_sigma, map_combine"
    with pytest.raises(ModelError, match=f"unknown stfpm option 'embed_channels'; allowed: {allowed}"):
        _model("stfpm", embed_channels=8)


def _recipe(**options) -> Recipe:
    return Recipe.model_validate({"version": 1, "name": "t", "model": {"name": "rd", "options": options}})


def test_map_only_options_leave_the_training_fingerprint_alone() -> None:
    base = recipe_fingerprint(_recipe(ocbe_blocks=1))
    assert recipe_fingerprint(_recipe(ocbe_blocks=1, map_levels=[3], map_sigma=0, map_combine="product")) == base
    assert recipe_fingerprint(_recipe(ocbe_blocks=2)) != base
