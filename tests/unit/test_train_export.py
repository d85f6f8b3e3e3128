"""Training (resume, unified mixing, one-class folders), ONNX export and fp32 evaluation parity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.kd_run import shared

import qtool.train as train_mod
from qtool.data import ImageTransform, load_splits
from qtool.errors import ModelError
from qtool.evaluate import TorchPredictor
from qtool.export import INPUT_NAME, OUTPUT_NAMES
from qtool.modelio import DATA_METADATA_KEY, TRANSFORM_KEYS
from qtool.models import load_checkpoint
from qtool.runs import run_eval, run_export
from qtool.train import fit, train


@pytest.fixture(scope="module")
def kd(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def splits(kd):
    return load_splits(kd.recipe().data)


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- training


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_continues_exactly_like_an_uninterrupted_run(kd, splits, tmp_path):
    one, two = kd.recipe("train.epochs=1"), kd.recipe("train.epochs=2")
    first = fit(one, splits.train, splits.holdout, tmp_path / "resumed", "all")
    assert len(first.history) == 1
    after_one = _state(first.checkpoint)
    resumed = fit(two, splits.train, splits.holdout, tmp_path / "resumed", "all")
    straight = fit(two, splits.train, splits.holdout, tmp_path / "straight", "all")

    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0], "resume rewrote the first epoch's row"
    saved = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in saved] == [1, 2]
    for key in ("train_loss", "holdout_loss"):
        assert resumed.history[1][key] == pytest.approx(straight.history[1][key], rel=1e-5, abs=1e-6)
    a, b = _state(resumed.checkpoint), _state(straight.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")
    # the second run really trained epoch 2 (it did not just reload epoch 1)
    assert any(not torch.equal(a[k], after_one[k]) for k in a if k.startswith("student."))


def test_last_checkpoint_of_another_recipe_is_refused(kd, splits, tmp_path):
    fit(kd.recipe(), splits.train, splits.holdout, tmp_path / "a", "all")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    with pytest.raises(ModelError, match="different recipe"):
        fit(kd.recipe("train.lr=0.1", "train.epochs=2"), splits.train, splits.holdout, tmp_path / "b", "all")
    assert not (tmp_path / "b" / "model.pt").exists()


class _BatchRecorder:
    """Wraps build_model so every training batch is recorded (as the indices of the images it holds)."""

    def __init__(self, monkeypatch, reference: torch.Tensor) -> None:
        self.reference = reference.flatten(1)
        self.batches: list[list[int]] = []
        real = train_mod.build_model

        def build(cfg, size):
            model = real(cfg, size)
            loss = model.training_loss

            def recording(x):
                if torch.is_grad_enabled():  # training steps only, not the holdout loss
                    d = torch.cdist(x.flatten(1), self.reference)
                    self.batches.append(d.argmin(1).tolist())
                return loss(x)

            model.training_loss = recording
            return model

        monkeypatch.setattr(train_mod, "build_model", build)


def test_unified_mode_mixes_categories_in_batches(kd, splits, tmp_path, monkeypatch):
    recipe = kd.recipe("train.mode=unified")
    images = train_mod.load_images(splits.train, ImageTransform(recipe.data))
    rec = _BatchRecorder(monkeypatch, images)
    results = train(recipe, splits, tmp_path)
    assert len(results) == 1 and results[0].category == "all"
    assert (tmp_path / "model.pt").is_file()
    seen = sorted(i for b in rec.batches for i in b)
    assert seen == list(range(len(splits.train))), "one epoch must see every training image once"
    cats = [{splits.train[i].category for i in b} for b in rec.batches]
    assert len({s.category for s in splits.train}) == 2
    assert any(len(c) > 1 for c in cats), f"no batch mixes categories: {cats}"


def test_one_class_mode_writes_one_model_per_category(kd, splits, tmp_path, monkeypatch):
    recipe = kd.recipe("train.mode=one-class")
    images = train_mod.load_images(splits.train, ImageTransform(recipe.data))
    rec = _BatchRecorder(monkeypatch, images)
    results = train(recipe, splits, tmp_path)
    cats = sorted({s.category for s in splits.train})
    assert sorted(r.category for r in results) == cats
    assert not (tmp_path / "model.pt").exists()
    for cat in cats:
        _, meta = load_checkpoint(tmp_path / cat / "model.pt")
        assert meta["extra"]["category"] == cat
        assert (tmp_path / cat / "history.json").is_file()
    # each model saw only its own category's images
    per_fit = []
    for b in rec.batches:
        c = {splits.train[i].category for i in b}
        assert len(c) == 1, f"one-class batch mixes categories: {c}"
        per_fit.append(c.pop())
    assert sorted(set(per_fit)) == cats


# ---------------------------------------------------------------- export


def test_exported_onnx_contract(kd):
    model = onnx.load(str(kd.onnx))
    onnx.checker.check_model(model, full_check=True)
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) >= 17
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES) == ["anomaly_map", "score"]
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    meta = {p.key: p.value for p in model.metadata_props}
    data = json.loads(meta[DATA_METADATA_KEY])
    _, ckpt = load_checkpoint(kd.checkpoint)
    assert data == {k: ckpt["data"][k] for k in TRANSFORM_KEYS}
    assert data["image_size"] == 64


def test_onnx_matches_torch(kd):
    model, _ = load_checkpoint(kd.checkpoint)
    rng = np.random.default_rng(3)
    sess = ort.InferenceSession(str(kd.onnx), providers=["CPUExecutionProvider"])
    for _ in range(2):
        x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
        t_map, t_score = TorchPredictor(model)(x)
        o_map, o_score = sess.run(["anomaly_map", "score"], {"image": x})
        assert o_map.shape == (1, 1, 64, 64)
        scale = float(np.abs(t_map).max())
        assert scale > 0
        err = float(np.abs(o_map[:, 0] - t_map).max())
        assert err <= 1e-4 * scale, f"map differs by {err} (map max {scale})"
        assert float(np.abs(o_score - t_score).max()) <= 1e-4 * scale


def test_run_export_reports_parity_and_stamps_metadata(kd, tmp_path):
    res = run_export(kd.checkpoint, tmp_path / "m.onnx", kd.recipe("export.batch_size=2"))
    assert res["parity"]["map_max_rel"] < 1e-4
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert DATA_METADATA_KEY in {p.key for p in model.metadata_props}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "temporary files left behind"


def test_eval_of_checkpoint_and_onnx_agree(kd, tmp_path):
    recipe = kd.recipe()
    pt = run_eval(kd.checkpoint, recipe, tmp_path / "pt.json")
    ox = run_eval(kd.onnx, recipe)
    assert pt["files"] == ox["files"] and pt["n_test"] == ox["n_test"] > 0
    np.testing.assert_allclose(pt["scores"], ox["scores"], rtol=1e-4, atol=1e-6)
    rows_pt = {**pt["metrics"]["per_category"], "mean": pt["metrics"]["mean"]}
    rows_ox = {**ox["metrics"]["per_category"], "mean": ox["metrics"]["mean"]}
    assert rows_pt.keys() == rows_ox.keys()
    for cat, row in rows_pt.items():
        for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert row[k] == pytest.approx(rows_ox[cat][k], abs=1e-4), f"{cat} {k}"
    assert sorted(pt["metrics"]["per_category"]) == ["disc", "grid"]
    assert json.loads((tmp_path / "pt.json").read_text())["n_test"] == pt["n_test"]


# ---------------------------------------------------------------- label-free validation (proxy)


def test_proxy_validation_records_the_curve_selects_the_best_epoch_and_leaves_training_unchanged(kd, tmp_path):
    data = "data.holdout_fraction=0.4"
    splits = load_splits(kd.recipe(data).data)
    assert len(splits.holdout) >= 2
    with_proxy = fit(kd.recipe(data, "train.epochs=3", "train.proxy_every=1", "train.select=proxy"),
                     splits.train, splits.holdout, tmp_path / "proxy", "all")
    plain = fit(kd.recipe(data, "train.epochs=3"), splits.train, splits.holdout, tmp_path / "plain", "all")

    rows = with_proxy.history
    assert all(0.0 <= r["proxy_pixel_auroc"] <= 1.0 and 0.0 <= r["proxy_image_auroc"] <= 1.0 for r in rows)
    assert not any("proxy_pixel_auroc" in r for r in plain.history)
    a, b = _state(tmp_path / "proxy" / "last.pt"), _state(tmp_path / "plain" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "the proxy changed the training trajectory"

    best = max(rows, key=lambda r: (r["proxy_pixel_auroc"], r["proxy_image_auroc"]))
    extra = torch.load(with_proxy.checkpoint, map_location="cpu", weights_only=True)["extra"]
    assert extra["selected_epoch"] == with_proxy.selected_epoch == best["epoch"]
    chosen, best_pt = _state(with_proxy.checkpoint), _state(tmp_path / "proxy" / "best.pt")
    assert all(torch.equal(chosen[k], best_pt[k]) for k in chosen)
    if best["epoch"] != 3:  # a selected earlier epoch is really that epoch's weights, not the last ones
        assert any(not torch.equal(chosen[k], a[k]) for k in chosen if k.startswith("student."))


def test_select_proxy_needs_proxy_every(kd):
    from qtool.errors import RecipeError

    with pytest.raises(RecipeError, match="train.select=proxy needs train.proxy_every"):
        kd.recipe("train.select=proxy")


def test_proxy_without_held_out_normals_is_refused_before_anything_is_written(kd, tmp_path):
    recipe = kd.recipe("data.holdout_fraction=0", "train.proxy_every=1")
    splits = load_splits(recipe.data)
    with pytest.raises(ModelError, match="train.proxy_every needs at least 2 held-out normals, the split has 0"):
        fit(recipe, splits.train, splits.holdout, tmp_path / "out", "all")
    assert not (tmp_path / "out").exists()
