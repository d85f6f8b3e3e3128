"""Uninformed Students: dense one-pass scoring, receptive field, ensemble variance, teacher pretraining hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.kd_recipes import tiny_recipe

from qtool.data import load_splits
from qtool.errors import ModelError, RegistryError
from qtool.models import build_model, load_checkpoint
from qtool.models.head import ensemble_error_variance
from qtool.models.students import PATCH_NETS, UninformedStudents, receptive_field
from qtool.recipe import ModelConfig, TrainConfig
from qtool.train import fit

OPTS = {"width": 8, "descriptor_dim": 16, "n_students": 3}


def _us(size: int = 64, **options) -> UninformedStudents:
    cfg = ModelConfig(name="us", weights="none", options={**OPTS, **options})
    return build_model(cfg, size).eval()


@pytest.mark.parametrize("patch", sorted(PATCH_NETS))
def test_patch_nets_have_the_patch_size_as_receptive_field(patch: int) -> None:
    assert receptive_field(PATCH_NETS[patch]) == (patch, 4)


def test_dense_scoring_is_one_pass_at_stride_4() -> None:
    model = _us(patch_sizes=[17, 33])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher, student = model.teacher(x), model.student(x)
        amap, score = model(x)
    assert [t.shape for t in teacher] == [(2, 16, 16, 16)] * 2  # one descriptor per stride-4 position
    assert [s.shape for s in student] == [(2, 3, 16, 16, 16)] * 2
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)


def test_descriptor_sees_only_its_patch() -> None:
    net = _us().teacher.nets[0]
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[0, :, 32, 32] += 10.0
    with torch.no_grad():
        changed = (net(x) - net(y)).abs().amax(1)[0] > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    # output cell i is centred on pixel 4i and sees +-8 px (17x17 patch): cells 6..10 can see pixel 32
    assert rows.min() >= 6 and rows.max() <= 10 and cols.min() >= 6 and cols.max() <= 10
    assert changed[8, 8]


def test_variance_is_zero_when_students_are_identical() -> None:
    model = _us()
    nets = model.student.scales[0]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t, s = model.teacher(x)[0], model.student(x)[0]
        parts = ensemble_error_variance(t, s)
        single = (nets[0](x) - t).pow(2).mean(1)
    assert parts.shape == (2, 2, 16, 16)
    assert float(parts[:, 1].abs().max()) < 1e-10
    assert torch.allclose(parts[:, 0], single, rtol=1e-5, atol=1e-7)


def test_prepare_distils_and_normalises_teacher() -> None:
    model = _us(teacher_epochs=4)
    images = torch.randn(6, 3, 64, 64)
    before = [p.clone() for p in model.teacher.parameters()]
    facts = model.prepare_training(images, TrainConfig(batch_size=3), seed=0)
    assert facts["teacher_epochs"] == 4 and facts["teacher_loss_last"] < facts["teacher_loss_first"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    with torch.no_grad():
        d = model.teacher(images)[0]
    assert torch.allclose(d.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-4)
    assert torch.allclose(d.std(dim=(0, 2, 3), unbiased=False), torch.ones(16), atol=1e-3)
    assert all(k.split(".")[0] in ("teacher", "student", "head") for k in model.state_dict())


def test_fit_runs_hooks_once_and_resume_skips_prepare(tmp_path: Path, monkeypatch) -> None:
    recipe = tiny_recipe(tmp_path / "synth", "us", epochs=1)
    splits = load_splits(recipe.data)
    calls = []
    original = UninformedStudents.prepare_training

    def counting(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(UninformedStudents, "prepare_training", counting)
    first = fit(recipe, splits.train, splits.holdout, tmp_path / "run", "all")
    resumed = fit(recipe.model_copy(update={"train": recipe.train.model_copy(update={"epochs": 2})}),
                  splits.train, splits.holdout, tmp_path / "run", "all")
    assert len(calls) == 1
    model, meta = load_checkpoint(resumed.checkpoint)
    assert meta["extra"]["prepare"] == load_checkpoint(first.checkpoint)[1]["extra"]["prepare"]
    assert meta["extra"]["prepare"]["teacher_epochs"] == 2
    assert float(model.head.scale[0, 0, 0]) != 1.0 and "error_mean" in meta["extra"]["finish"]


def test_bad_options_are_model_errors() -> None:
    with pytest.raises(ModelError, match="patch_sizes"):
        _us(patch_sizes=[21])
    with pytest.raises(ModelError, match="unknown us option"):
        _us(students=2)
    with pytest.raises(ModelError, match="divisible by 4"):
        _us(size=66)
    with pytest.raises(RegistryError, match="leaky_relu"):
        _us(activation="gelu")


def test_leaky_relu_variant_exports_and_matches(tmp_path: Path) -> None:
    from qtool.export import export_onnx, parity

    model = _us(activation="leaky_relu", n_students=2)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.student.modules())
    path = export_onnx(model, tmp_path / "us.onnx", 64)
    assert parity(model, path, torch.randn(1, 3, 64, 64).numpy())["map_max_rel"] < 1e-4


def test_teacher_and_students_trace_with_torch_fx() -> None:
    model = _us(patch_sizes=[17, 33])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for part in (model.teacher, model.student):
            gm = torch.fx.symbolic_trace(part)
            assert all(torch.equal(a, b) for a, b in zip(gm(x), part(x)))
