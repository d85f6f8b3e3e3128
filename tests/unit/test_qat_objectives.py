"""``qat.learn: ranges`` and ``qat.loss: map``: range learning with no weight change, map distillation against fp32,
the exported graph equal to the trained fake-quant model, the search set (never the test split) as training data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers.kd_recipes import TINY
from helpers.kd_run import shared
from helpers.ort_utils import minmax_ranges, run

from qtool.cli import main
from qtool.export import export_onnx
from qtool.graph import build_spec, insert_qdq_report, prepare
from qtool.models import build_model
from qtool.qat.checkpoint import load_qat_checkpoint
from qtool.qat.export import export_qdq
from qtool.qat.insert import prepare_qat
from qtool.qat.keep import mean_loss
from qtool.qat.objectives import LEARN_SETS, MapDistillation, fp32_targets, quantized_biases, select_parameters
from qtool.qat.train import build_optimizer, qat_train
from qtool.recipe import ModelConfig, PtqConfig, QatConfig

RANGES = QatConfig(epochs=4, batch_size=4, optimizer="adam", lr=1e-3, scale_lr=0.02, freeze_epochs=0,
                   loss="map", learn="ranges")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _setup(name: str, tmp_path, bits: int = 4):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, weights="none", options=TINY.get(name, {})), 64).eval()
    graph = prepare(onnx.load(str(export_onnx(model, tmp_path / "fp32.onnx", 64))))
    images = np.random.default_rng(0).standard_normal((12, 3, 64, 64)).astype(np.float32)
    spec = build_spec(graph, PtqConfig(activation_bits=bits, weight_bits=bits))
    ranges = minmax_ranges(graph, spec.tensors_to_calibrate(), [{"image": images[i : i + 1]} for i in range(4)])
    return model, graph, spec, ranges, torch.from_numpy(images)


def _clipped(ranges: dict, fraction: float = 0.3) -> dict:
    """Every activation range cut to ``fraction`` of its span: a bad start that learning has to undo."""
    return {t: (r[0] * fraction, r[1] * fraction) if isinstance(r, tuple) else r for t, r in ranges.items()}


def _trained_ranges_model(model, graph, spec, ranges, images):
    qm = prepare_qat(model, graph, spec, ranges, learnable=True, ranges_only=True)
    params = select_parameters(qm, LEARN_SETS.get("ranges"))
    objective = MapDistillation(qm.model, model, images[:8])
    before = mean_loss(objective, images, 4)
    history = qat_train(qm, images, RANGES, images, optimizer=build_optimizer(qm, RANGES, params),
                        objective=objective)
    return qm, params, objective, before, history


def _initializers(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("name", ["stfpm", "rd"])
def test_ranges_learn_scales_and_biases_not_weights_and_export_the_trained_graph(name, tmp_path):
    """Map loss goes down; every weight stays; teacher and student scales and biases move; ONNX = fake quant.

    RD's decoder has ConvTransposes, which ``qat.learn: student`` cannot train (no exported weight of
    theirs); ranges mode trains no weight, so it runs.
    """
    model, graph, spec, ranges, images = _setup(name, tmp_path)
    ranges = _clipped(ranges)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qm, params, objective, before, history = _trained_ranges_model(model, graph, spec, ranges, images)
    assert history[-1]["holdout_loss"] < 0.8 * before, (before, history)
    assert params and {id(p) for p in params} == {id(p) for p in quantized_biases(qm)}
    trained = {id(p) for p in qm.model.parameters() if p.requires_grad}
    assert trained == {id(p) for p in params}  # the scales are frozen once training ends
    for k, v in model.state_dict().items():  # the fp32 reference is left as it was
        assert torch.equal(v, state[k]), k
    initial = prepare_qat(model, graph, spec, ranges, learnable=True, ranges_only=True)
    moved = {part: [t for t, q in qm.act.items() if t.startswith(f"/{part}/")
                    and not np.isclose(q.range()[1], initial.act[t].range()[1], rtol=1e-4)]
             for part in ("teacher", "student")}
    assert moved["teacher"] and moved["student"], moved
    qdq, report = export_qdq(qm, graph)
    base, _ = export_qdq(initial, graph)
    new, old, fp = _initializers(qdq), _initializers(base), _initializers(graph)
    weights = list(report["weights"])
    assert report["learned_weight_scales"] == len(weights)
    for w in weights:  # the quantized weights come from the same float weights (only their scales learned)
        assert w in fp and f"{w}_scale" in new
    assert any(not np.array_equal(new[f"{w}_scale"], old[f"{w}_scale"]) for w in weights)
    start_biases = quantized_biases(initial)
    assert any(not torch.equal(a, b) for a, b in zip(params, start_biases, strict=True))
    x = images[:2].numpy()
    with torch.no_grad():
        fq = qm.model.eval()(images[:2])[0].numpy()
    out = run(qdq, [{"image": x[:1]}, {"image": x[1:]}])
    got = np.concatenate([o[0] for o in out])
    np.testing.assert_allclose(got, fq, atol=1e-4 * max(1.0, float(np.abs(fq).max())))
    # and training made the exported graph closer to fp32 than the untrained one
    with torch.no_grad():
        ref = model(images[:2])[0].numpy()
    start = np.concatenate([o[0] for o in run(base, [{"image": x[:1]}, {"image": x[1:]}])])
    assert np.mean((got - ref) ** 2) < np.mean((start - ref) ** 2)


def test_map_distillation_is_zero_against_itself_and_measures_the_tail(tmp_path):
    model, _, _, _, images = _setup("stfpm", tmp_path)
    same = MapDistillation(model, model, images[:8])
    terms = same.training_loss(images[:4])
    assert all(float(v) == 0.0 for v in terms.values())
    with torch.no_grad():
        maps = torch.cat([model(images[i : i + 4])[0] for i in range(0, 8, 4)]).flatten().double()
    share = float((maps > same.threshold).double().mean())
    assert 0.005 <= share <= 0.011  # the 0.99 quantile of the normals' maps

    class Shifted(torch.nn.Module):  # a map off by a constant only in the tail
        def forward(self, x):
            m, s = model(x)
            return m + (m > same.threshold) * 1.0, s

    tail = MapDistillation(Shifted(), model, images[:8]).training_loss(images[:8])
    assert float(tail["tail"]) > float(tail["map"]) > 0 and float(tail["score"]) == 0.0
    MapDistillation(Shifted(), model, images[:8]).train()
    assert not model.training  # train() on the loss never reaches the reference


def test_map_distillation_reads_fp32_targets_computed_once(tmp_path):
    """Training on :class:`Targets` gives the plain-image run's history, and the fp32 model runs only for them."""
    import copy

    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    reference, calls = copy.deepcopy(model), []  # a copy: the QAT models are copies of ``model`` (hooks too)
    reference.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    targets = fp32_targets(reference, images, 4)
    assert sum(calls) == len(images) and len(targets[torch.tensor([3, 1])]) == 2
    objective = MapDistillation(model, reference, targets[:8])
    assert sum(calls) == len(images)  # the tail threshold came from the targets' maps
    for key, value in objective.training_loss(targets[2:6]).items():
        assert float(value.detach()) == float(objective.training_loss(images[2:6])[key].detach()), key
    histories = []
    for data in (images, targets):
        qm = prepare_qat(model, graph, spec, _clipped(ranges), learnable=True, ranges_only=True)
        params = select_parameters(qm, LEARN_SETS.get("ranges"))
        del calls[:]
        histories.append(qat_train(qm, data, RANGES, data, optimizer=build_optimizer(qm, RANGES, params),
                                   objective=MapDistillation(qm.model, reference, targets[:8])))
        # plain images run the fp32 model on every training batch and every holdout pass; targets never
        assert sum(calls) == (len(images) * (2 * RANGES.epochs + 1) if data is images else 0)
    for a, b in zip(*histories, strict=True):
        assert a["epoch"] == b["epoch"] and a["holdout_loss"] == pytest.approx(b["holdout_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="no images"):
        fp32_targets(reference, images[:0], 4)


def test_checkpoint_of_a_ranges_run_rebuilds_it(tmp_path):
    from qtool.qat.checkpoint import qat_payload, save_qat_checkpoint

    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    qm, *_ = _trained_ranges_model(model, graph, spec, ranges, images)
    ptq = PtqConfig(activation_bits=4, weight_bits=4)
    base = {"model": ModelConfig(weights="none").model_dump(mode="json"), "data": {}, "image_size": 64}
    payload = qat_payload(qm, base, model.state_dict(), ptq.model_dump(mode="json"), {"batch_size": 1, "opset": 17},
                          RANGES.model_dump(mode="json"), {"epoch": 4})
    again, graph2, _ = load_qat_checkpoint(save_qat_checkpoint(payload, tmp_path / "qat.pt"))
    assert not again.frozen_parts
    a, b = export_qdq(again, graph2)[0], export_qdq(qm, graph)[0]
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def test_cli_map_distillation_trains_on_the_search_set_never_the_test_split(tmp_path_factory, tmp_path):
    kd = shared(tmp_path_factory)
    out = tmp_path / "mapd"
    args = ["qat", "--model", str(kd.checkpoint), "--recipe", str(kd.recipe_file), "--epochs", "1", "--bits", "4",
            "--calib", "mse", "--out", str(out), "--loss", "map", "--learn", "ranges",
            "--set", "qat.batch_size=4", "--set", "ptq.search.normals=4", "--set", "ptq.search.check_normals=2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["learn"] == "ranges" and report["objective"]["loss"] == "map"
    files = report["objective"]["images"]["files"] + report["objective"]["holdout"]["files"]
    assert report["train_images"] == 8 and len(files) == 6
    test_files = {str(p) for p in (kd.data).rglob("test/**/*.png")}
    assert test_files and not set(files) & test_files
    assert [h["epoch"] for h in report["history"]] == [0, 1] and "train_tail" in report["history"][1]
    assert report["trained_parameters"] > 0 and report["lint"] == []


def test_a_check_set_past_the_end_of_the_pool_is_a_one_line_error_and_no_folder(tmp_path_factory, tmp_path):
    kd = shared(tmp_path_factory)
    out = tmp_path / "mapd"
    res = CliRunner().invoke(main, ["qat", "--model", str(kd.checkpoint), "--recipe", str(kd.recipe_file),
                                    "--out", str(out), "--loss", "map", "--learn", "ranges", "--bits", "4",
                                    "--set", "ptq.search.normals=1000", "--set", "ptq.search.check_normals=2"])
    assert res.exit_code != 0 and res.stderr.count("\n") == 1 and "check_normals" in res.stderr, res.stderr
    assert not out.exists()


@pytest.mark.parametrize(("key", "value"), [("qat.loss", "mse"), ("qat.learn", "everything")])
def test_unknown_loss_or_learn_set_is_a_one_line_error(tmp_path_factory, tmp_path, key, value):
    kd = shared(tmp_path_factory)
    out = tmp_path / "bad"
    res = CliRunner().invoke(main, ["qat", "--model", str(kd.checkpoint), "--recipe", str(kd.recipe_file),
                                    "--out", str(out), "--set", f"{key}={value}"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and value in res.stderr, res.stderr
    assert not out.exists()


def test_a_tiny_weight_channel_keeps_its_bias_as_the_qdq_graph_does(tmp_path):
    """int32 bias: its scale is input x weight scale; a nearly dead channel's tiny weight scale is grown (as ORT
    does), so its bias survives instead of saturating int32."""
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    node = next(n for n in graph.graph.node if n.op_type == "Conv" and n.name.startswith("/student/")
                and len(n.input) > 2 and n.name in spec.biases)
    inits = {t.name: t for t in graph.graph.initializer}
    w, b = (onnx.numpy_helper.to_array(inits[n]).copy() for n in node.input[1:3])
    w[0], b[0] = 1e-9, 0.5  # weight scale ~1e-10: bias / (input x weight scale) far beyond int32
    for name, value in zip(node.input[1:3], (w, b), strict=True):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
    ptq, ptq_report = insert_qdq_report(graph, spec, ranges)
    qm = prepare_qat(model, graph, spec, ranges, learnable=True, ranges_only=True)
    qdq, _ = export_qdq(qm, graph)
    got, want = _initializers(qdq), _initializers(ptq)
    np.testing.assert_allclose(got[f"{node.input[1]}_scale"], want[f"{node.input[1]}_scale"], rtol=1e-6)
    site = qm.smap.weights[node.input[1]]
    with torch.no_grad():
        bias = qm.part_module(site.part, site.module).bias  # the fake-quantized bias the model computes with
    dq = want[f"{node.input[2]}_quantized"].astype(np.float64) * want[f"{node.input[2]}_quantized_scale"]
    np.testing.assert_allclose(bias.numpy(), dq, rtol=1e-6, atol=1e-12)  # the QDQ graph's dequantized bias
    assert float(bias[0]) == pytest.approx(0.5, rel=1e-3)
    assert ptq_report["biases"][node.input[2]]["scale_max"] > 0
