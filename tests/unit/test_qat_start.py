"""Where a QAT run starts and what it keeps: ``qat.init_from`` starts from the PTQ run's graph (its ranges and its
bias-corrected biases), ``qat.keep: best`` exports the lowest-holdout state, never worse than the start."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from helpers.kd_run import lib_ptq, shared
from test_qat_objectives import RANGES, _clipped, _setup

from qtool.cli import main
from qtool.qat.insert import prepare_qat
from qtool.qat.keep import mean_loss
from qtool.qat.objectives import LEARN_SETS, MapDistillation, select_parameters
from qtool.qat.trace import QatError
from qtool.qat.train import build_optimizer, qat_train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MAP_RANGES = ["--loss", "map", "--learn", "ranges", "--set", "qat.batch_size=4", "--set", "ptq.search.normals=4",
              "--set", "ptq.search.check_normals=2", "--set", "qat.freeze_epochs=0", "--set", "qat.optimizer=adam"]


def _outputs(path, image: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: image})


def _bias_corrected_ptq(tmp_path_factory):
    return lib_ptq(tmp_path_factory, "qat-start-mse-bc-4bit", "ptq.calib=mse", "ptq.activation_bits=4",
                   "ptq.weight_bits=4", "ptq.bias_correction=true")


def _qat(kd, out, ptq_dir, *extra: str):
    return CliRunner().invoke(main, ["qat", "--model", str(kd.checkpoint), "--recipe", str(kd.recipe_file),
                                     "--bits", "4", "--init-from", str(ptq_dir), "--out", str(out), *MAP_RANGES,
                                     *extra])


@pytest.mark.parametrize("epochs", ["0", "2"])
def test_a_run_from_a_ptq_run_starts_at_its_graph_and_keep_best_never_leaves_a_worse_one(tmp_path_factory, tmp_path,
                                                                                          epochs):
    """Untrained (0 epochs), or trained with a step so large that every epoch is worse on the check set and
    ``keep: best`` returns to the start: the export is the bias-corrected PTQ graph (outputs to 1e-5)."""
    kd = shared(tmp_path_factory)
    ptq_report, ptq_dir = _bias_corrected_ptq(tmp_path_factory)
    assert ptq_report["bias_correction"]["layers"], "the PTQ run moved biases (else the test shows nothing)"
    out = tmp_path / "qat"
    res = _qat(kd, out, ptq_dir, "--epochs", epochs, "--keep", "best", "--set", "qat.scale_lr=3.0",
               "--set", "qat.lr=3.0")
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["init"]["model_check"] == "checked" and report["init"]["biases"] > 0
    losses = [h["holdout_loss"] for h in report["history"]]
    assert len(losses) == int(epochs) + 1 and all(x > losses[0] for x in losses[1:]), losses
    assert report["kept_epoch"] == 0 and [h["epoch"] for h in report["history"] if h.get("kept")] == [0]
    image = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for got, want in zip(_outputs(out / "model.onnx", image), _outputs(ptq_dir / "model.onnx", image), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_without_the_ptq_biases_the_start_would_differ(tmp_path_factory, tmp_path):
    """The bias-corrected PTQ graph differs from the same ranges on the fp32 biases: taking them is what matters."""
    kd = shared(tmp_path_factory)
    _, ptq_dir = _bias_corrected_ptq(tmp_path_factory)
    plain = tmp_path / "plain"
    shutil.copytree(ptq_dir, plain)
    graph = onnx.load(str(plain / "model.onnx"))
    fp32 = {t.name: t for t in onnx.load(str(kd.onnx)).graph.initializer}
    moved = 0
    for t in graph.graph.initializer:  # put the fp32 biases back in the PTQ graph, as int32 on the same scale
        name = t.name.removesuffix("_quantized")
        if t.name.endswith("_quantized") and name in fp32 and len(fp32[name].dims) == 1:
            scale = onnx.numpy_helper.to_array(next(s for s in graph.graph.initializer if s.name == f"{t.name}_scale"))
            value = np.round(onnx.numpy_helper.to_array(fp32[name]) / scale).astype(np.int32)
            moved += int((value != onnx.numpy_helper.to_array(t)).any())
            t.CopyFrom(onnx.numpy_helper.from_array(value, t.name))
    onnx.save(graph, str(plain / "model.onnx"))
    assert moved > 0
    out = tmp_path / "qat"
    assert _qat(kd, out, ptq_dir, "--epochs", "0").exit_code == 0
    image = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    got, plain_map = _outputs(out / "model.onnx", image)[0], _outputs(plain / "model.onnx", image)[0]
    assert np.abs(got - plain_map).max() > 1e-3 * np.abs(plain_map).max()


def test_keep_best_restores_the_epoch_with_the_lowest_holdout_loss(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    qm = prepare_qat(model, graph, spec, _clipped(ranges), learnable=True, ranges_only=True)
    params = select_parameters(qm, LEARN_SETS.get("ranges"))
    objective = MapDistillation(qm.model, model, images[:8])
    cfg = RANGES.model_copy(update={"keep": "best", "epochs": 5})
    history = qat_train(qm, images, cfg, images[8:], optimizer=build_optimizer(qm, cfg, params),
                        objective=objective)
    losses = {h["epoch"]: h["holdout_loss"] for h in history}
    best = min(losses, key=losses.get)
    assert [h["epoch"] for h in history if h.get("kept")] == [best], losses
    assert 0 < best < 5, losses  # learning helped, then overshot: the kept state is neither start nor last
    assert mean_loss(objective, images[8:], cfg.batch_size) == pytest.approx(losses[best], rel=1e-6)


def test_keep_best_without_a_holdout_is_an_error(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    qm = prepare_qat(model, graph, spec, ranges, learnable=True, ranges_only=True)
    with pytest.raises(QatError, match="keep best needs a holdout"):
        qat_train(qm, images, RANGES.model_copy(update={"keep": "best"}), None,
                  objective=MapDistillation(qm.model, model, images[:4]))


@pytest.mark.parametrize("damage", ["another model", "truncated model", "no check set"])
def test_bad_ptq_start_or_keep_is_a_one_line_error_and_no_folder(tmp_path_factory, tmp_path, damage):
    kd = shared(tmp_path_factory)
    _, ptq_dir = _bias_corrected_ptq(tmp_path_factory)
    run = tmp_path / "ptq"
    shutil.copytree(ptq_dir, run)
    extra = ["--epochs", "1"]
    if damage == "another model":
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["inputs"]["model"]["sha256"] = "0" * 64
        (run / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "truncated model":
        data = (run / "model.onnx").read_bytes()
        (run / "model.onnx").write_bytes(data[: len(data) // 3])
    else:
        extra += ["--keep", "best", "--set", "ptq.search.check_normals=0"]
    out = tmp_path / "qat"
    res = _qat(kd, out, run, *extra)
    assert res.exit_code != 0 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert {"another model": "another model", "truncated model": "model.onnx",
            "no check set": "keep best"}[damage] in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("loss", ["map", "kd"])
def test_keep_best_without_a_holdout_is_refused_before_anything_is_written(tmp_path_factory, tmp_path, loss):
    """``run_qat`` itself (no CLI clean-up) refuses before its folder exists: map without a check set, kd without a
    holdout split."""
    from qtool.qat.run import run_qat
    from qtool.recipe import load_recipe

    kd = shared(tmp_path_factory)
    recipe = load_recipe(kd.recipe_file)
    if loss == "map":
        recipe.ptq.search.check_normals = 0
    else:
        recipe.data.holdout_fraction = 0.0
    recipe.qat.loss, recipe.qat.keep = loss, "best"
    out = tmp_path / "qat"
    with pytest.raises(QatError, match=f"keep best needs a holdout loss: qat.loss {loss}"):
        run_qat(kd.checkpoint, recipe, out)
    assert not out.exists()


def test_learned_weight_scales_stay_above_the_int32_bias_floor_after_every_step(tmp_path):
    """A learned weight scale pushed below PTQ's int32-bias floor is grown back by the next optimizer step, so the
    bias fake quant (and the export) never clamps a bias at the int32 limit."""
    from qtool.qat.insert import grow_for_biases

    model, graph, spec, ranges, images = _setup("stfpm", tmp_path, bits=8)
    qm = prepare_qat(model, graph, spec, ranges, learnable=True, ranges_only=True)
    params = select_parameters(qm, LEARN_SETS.get("ranges"))
    assert grow_for_biases(qm) == 0  # set_ranges already grew what PTQ would
    from torch.nn.utils import parametrize

    def module_of(w):
        return qm.part_module(qm.smap.weights[w].part, qm.smap.weights[w].module)

    w = next(w for w in qm.weights if parametrize.is_parametrized(module_of(w), "bias"))
    wq, bias, module = qm.weights[w], qm.latent_bias(w), module_of(w)
    with torch.no_grad():
        bias.copy_(torch.linspace(-2.0, 2.0, len(bias)))
    low = torch.zeros(len(bias), dtype=torch.bool)
    low[::2] = True  # every other channel far below the floor: those biases saturate
    wq.put_scale(torch.full_like(wq.get_scale(), 1e-12), where=low)
    others = wq.scale_parameter.detach().clone()[~low]
    assert not torch.allclose(module.bias, bias, rtol=1e-3)  # the fake-quant bias is clamped at int32
    opt = build_optimizer(qm, RANGES, params)
    opt.zero_grad()
    opt.step()  # no gradients: only after_step acts
    assert float(wq.get_scale().detach().min()) > 1e-12
    assert torch.equal(wq.scale_parameter.detach()[~low], others)  # the channels above the floor: bit for bit
    spec_bias = next(b for b in qm.spec.biases.values() if b.weight == w)
    step = (qm.act[qm.smap.activations[spec_bias.input].owner].get_scale() * wq.get_scale()).detach()
    assert torch.all((module.bias - bias).abs() <= 0.5 * step * (1 + 1e-4))  # on the int32 grid, unclamped
    assert grow_for_biases(qm) == 0


def test_snapshots_export_every_state_and_change_nothing_else(tmp_path_factory, tmp_path):
    """``qat.snapshots``: the QDQ ONNX of the start and of each epoch; the start's is the PTQ graph, the kept epoch's
    is ``model.onnx`` (same initializers), and the run's history equals the same run without snapshots."""
    kd = shared(tmp_path_factory)
    _, ptq_dir = _bias_corrected_ptq(tmp_path_factory)
    runs = {}
    for snap in ("true", "false"):
        out = tmp_path / f"qat-{snap}"
        res = _qat(kd, out, ptq_dir, "--epochs", "2", "--keep", "best", "--set", f"qat.snapshots={snap}")
        assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
        runs[snap] = json.loads((out / "report.json").read_text())
    snaps = tmp_path / "qat-true" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["epoch_000.onnx", "epoch_001.onnx", "epoch_002.onnx"]
    assert not (tmp_path / "qat-false" / "snapshots").exists()
    assert runs["true"]["history"] == [{**h, "seconds": runs["true"]["history"][i]["seconds"],
                                        "holdout_seconds": runs["true"]["history"][i]["holdout_seconds"]}
                                       for i, h in enumerate(runs["false"]["history"])]

    def weights(path):
        return [t.raw_data for t in onnx.load(str(path)).graph.initializer]

    kept = runs["true"]["kept_epoch"]
    assert weights(snaps / f"epoch_{kept:03d}.onnx") == weights(tmp_path / "qat-true" / "model.onnx")
    assert len({b"".join(weights(p)) for p in snaps.iterdir()}) == 3, "each epoch moved the ranges"
    image = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for got, want in zip(_outputs(snaps / "epoch_000.onnx", image), _outputs(ptq_dir / "model.onnx", image),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
