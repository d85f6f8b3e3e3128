"""QAT on torch.fx: spec placement equals the PTQ policy, QAT export equals PTQ's QDQ graph, KD loss goes down,
profiles' scales, weights_only checkpoints, and ``qtool qat`` end to end."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers.kd_run import lib_ptq, shared
from helpers.ort_utils import minmax_ranges, optimized_ops, run
from helpers.tiny_models import TinyKD, calib_batches, export_tiny

from qtool.cli import main
from qtool.export import export_onnx
from qtool.graph import build_spec, insert_qdq_report, lint, prepare
from qtool.models import build_model
from qtool.qat import SpecMapError
from qtool.qat.checkpoint import load_qat_checkpoint, qat_payload, read_qat_checkpoint, save_qat_checkpoint
from qtool.qat.export import export_qdq
from qtool.qat.fakequant import ActFakeQuant, WeightFakeQuant
from qtool.qat.insert import FQ_ATTR, prepare_qat
from qtool.qat.keep import mean_loss
from qtool.qat.spec_map import build_spec_map
from qtool.qat.train import qat_train
from qtool.recipe import ModelConfig, PtqConfig, QatConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyKD().eval()
    path = export_tiny(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return model, prepare(onnx.load(str(path)))


@pytest.fixture(scope="module")
def stfpm(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 64).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("stfpm") / "fp32.onnx", 64)
    graph = prepare(onnx.load(str(path)))
    rng = np.random.default_rng(0)
    feeds = [{"image": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(2)]
    ranges = {t: minmax_ranges(graph, build_spec(graph, PtqConfig(target=t, head_inputs="quantized"))
                               .tensors_to_calibrate(), feeds)  # every tensor either placement needs
              for t in ("cpu", "tensorrt")}
    return model, graph, feeds, ranges


def _fq_calls(qm) -> Counter:
    return Counter(n.op for gm in qm.smap.parts.values() for n in gm.graph.nodes
                   if n.op == "call_module" and str(n.target).startswith(FQ_ATTR))


def _check_placement(smap, spec) -> None:
    """Every spec entry has its fx place with the spec's params; nothing else is fake-quantized."""
    assert set(smap.activations) == {t for t, a in spec.activations.items() if not a.constant}
    for t, site in smap.activations.items():
        assert site.owner == spec.activations[t].range_of and site.params == spec.activations[t].params, t
        assert site.uses, t
    assert set(spec.nodes) <= set(smap.nodes)
    quantized = {w: s for w, s in smap.weights.items() if s.params is not None}
    assert set(quantized) == set(spec.weights)
    for w, site in quantized.items():
        assert site.params == spec.weights[w] and site.params.axis == site.axis, w


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_tiny_placement_equals_policy_and_matches_qdq_numerically(tiny, target):
    model, graph = tiny
    spec = build_spec(graph, PtqConfig(target=target))
    smap = build_spec_map(model, graph, spec)
    _check_placement(smap, spec)
    assert sorted(smap.parts) == ["student", "teacher"]  # the float head is not traced
    ranges = minmax_ranges(graph, spec.tensors_to_calibrate(), calib_batches(2))
    qm = prepare_qat(model, graph, spec, ranges)
    # one fake-quant call per use; every range owner is one module shared by its tensors
    assert sum(_fq_calls(qm).values()) == sum(len(s.uses) for s in smap.activations.values())
    assert len(qm.act) == len({a.range_of for a in spec.activations.values()})
    qdq, _ = insert_qdq_report(graph, spec, ranges)
    feed = calib_batches(1, seed=5)
    ref = run(qdq, feed)[0][0]
    with torch.no_grad():
        out = qm.model.eval()(torch.from_numpy(feed[0]["input"]))[0].numpy()
    # tensorrt (float bias) is the QDQ graph to float rounding; cpu adds int32-bias rounding
    np.testing.assert_allclose(out, ref, atol=1e-5 if target == "tensorrt" else 2e-3)
    assert model.student.conv1.weight.grad is None and not hasattr(model.student, FQ_ATTR)  # original untouched


@pytest.mark.parametrize(("quantize", "target", "head_inputs"),
                         [("both", "cpu", "quantized"), ("student", "tensorrt", "quantized"), ("both", "cpu", "float")])
def test_stfpm_placement_equals_policy(stfpm, quantize, target, head_inputs):
    model, graph, feeds, ranges = stfpm
    spec = build_spec(graph, PtqConfig(target=target, quantize=quantize, head_inputs=head_inputs))
    smap = build_spec_map(model, graph, spec)
    _check_placement(smap, spec)
    if head_inputs == "float":  # features the next block also reads: fake-quantized for that block only
        mixed = [t for t, s in smap.activations.items() if s.how == "consumers" and t.endswith("/Add_output_0")]
        assert mixed and all(u.consumers for t in mixed for u in smap.activations[t].uses)
    assert set(smap.parts) == ({"student", "teacher"} if quantize == "both" else {"student"})
    # the tf-"same" convs' Pad is fused into the Conv by prepare: the fake-quant sits on the Pad's input,
    # which F.pad then zero-pads inside the leaf module exactly as the fused Conv does
    assert not any(n.op_type == "Pad" for n in graph.graph.node)
    assert not any(t.endswith("/Pad_output_0") for t in smap.activations)
    # BatchNorm folded: no BN node or BN parameter left in the traced parts
    for gm in smap.parts.values():
        assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)
        assert not any(".bn" in k and k.endswith(("running_mean", "running_var")) for k in gm.state_dict())
    # the fx-folded weights are the exporter's (before prepare_qat syncs them bit for bit)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    for w, site in smap.weights.items():
        mod = smap.parts[site.part].get_submodule(site.module)
        np.testing.assert_allclose(mod.weight.detach().numpy(), inits[w], rtol=1e-4, atol=1e-6, err_msg=w)
    # numerics: the fake-quantized torch model follows the QDQ graph far closer than the float model does
    qm = prepare_qat(model, graph, spec, ranges[target])
    qdq, _ = insert_qdq_report(graph, spec, ranges[target])
    ref, flt = run(qdq, feeds[:1])[0][0], run(graph, feeds[:1])[0][0]
    with torch.no_grad():
        out = qm.model.eval()(torch.from_numpy(feeds[0]["image"]))[0].numpy()
    assert np.abs(out - ref).mean() < 0.02 * np.abs(flt - ref).mean()


@pytest.mark.parametrize(("name", "quantize"), [("rd", "student"), ("us", "both")])
def test_other_bundled_models_place_the_spec(tmp_path, name, quantize):
    """RD's decoder reads the encoder's outputs and folds BatchNorm into ConvTranspose; US stacks students."""
    from helpers.kd_recipes import TINY

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, weights="none", options=TINY.get(name, {})), 64).eval()
    graph = prepare(onnx.load(str(export_onnx(model, tmp_path / "fp32.onnx", 64))))
    feeds = [{"image": np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)}]
    spec = build_spec(graph, PtqConfig(target="tensorrt", quantize=quantize))
    ranges = minmax_ranges(graph, spec.tensors_to_calibrate(), feeds)
    if name == "rd":  # every BatchNorm folded, the ConvTransposes' too, in the graph and in the fx parts alike
        assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
        assert any(n.op_type == "ConvTranspose" for n in graph.graph.node)
        smap = build_spec_map(model, graph, spec)
        assert not smap.extras
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
        for w, site in smap.weights.items():  # the fx-folded weights are the ONNX fold's
            mod = smap.parts[site.part].get_submodule(site.module)
            np.testing.assert_allclose(mod.weight.detach().numpy(), inits[w], rtol=1e-5, atol=1e-7, err_msg=w)
    qm = prepare_qat(model, graph, spec, ranges)
    _check_placement(qm.smap, spec)
    ref = run(insert_qdq_report(graph, spec, ranges)[0], feeds)[0][0]
    with torch.no_grad():
        out = qm.model.eval()(torch.from_numpy(feeds[0]["image"]))[0].numpy()
    # (a deep random teacher, quantized too, can flip a rounding tie on float-accumulation noise; the
    # STFPM tests cover the quantized lite0 teacher)
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_unmatched_spec_entry_fails_with_the_node_name(tiny):
    model, graph = tiny
    g = onnx.ModelProto()
    g.CopyFrom(graph)
    node = next(n for n in g.graph.node if n.name == "/student/conv2/Conv")
    node.name = "/student/renamed/Conv"
    with pytest.raises(SpecMapError, match="/student/renamed/Conv"):
        build_spec_map(model, g, build_spec(g, PtqConfig()))


@pytest.mark.parametrize(("target", "bits", "learnable", "head_inputs"),
                         [("cpu", 8, True, "quantized"), ("tensorrt", 8, False, "quantized"),
                          ("cpu", 4, True, "quantized"), ("cpu", 4, True, "float")])
def test_qat_export_equals_ptq_graph(stfpm, tmp_path, target, bits, learnable, head_inputs):
    model, graph, feeds, ranges = stfpm
    cfg = PtqConfig(target=target, activation_bits=bits, weight_bits=bits, head_inputs=head_inputs)
    spec = build_spec(graph, cfg)
    ptq, ptq_report = insert_qdq_report(graph, spec, ranges[target])
    qm = prepare_qat(model, graph, spec, ranges[target], learnable=learnable)
    images = torch.from_numpy(np.concatenate([f["image"] for f in feeds]))
    qat_train(qm, images, QatConfig(epochs=1, batch_size=2, freeze_epochs=0, lr=1e-3))
    qdq, report = export_qdq(qm, graph)
    # node for node: same names and op types in the same order, same quantized tensors and counts
    assert [(n.name, n.op_type) for n in qdq.graph.node] == [(n.name, n.op_type) for n in ptq.graph.node]
    assert set(report["tensors"]) == set(ptq_report["tensors"]) and set(report["weights"]) == set(ptq_report["weights"])
    for key in ("q_nodes", "dq_nodes", "clip_nodes", "qdq_per_op_type"):
        assert report[key] == ptq_report[key], key
    assert report["learned_weight_scales"] == (33 if learnable else 0)  # the student's convs
    assert lint(qdq, target) == []
    student = [n for n in graph.graph.node if n.op_type == "Conv" and n.name.startswith("/student/")]
    changed = [n for n in student if not np.array_equal(*(onnx.numpy_helper.to_array(next(
        t for t in m.graph.initializer if t.name == f"{n.input[1]}_quantized")) for m in (qdq, ptq)))]
    assert changed, "QAT training changed no student weight"
    if target == "cpu" and bits == 8:  # every Conv of the quantized parts runs as an integer kernel
        ops = optimized_ops(qdq, tmp_path)
        assert not [name for op, name in ops if op in ("Conv", "FusedConv")]
        assert sum(op == "QLinearConv" for op, _ in ops) == sum(n.op_type == "Conv" for n in graph.graph.node)
    out = run(qdq, feeds[:1])[0]
    assert np.isfinite(out[0]).all() and out[0].shape == (1, 1, 64, 64)


def _weight_qparams(model: onnx.ModelProto, report: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {w: (inits[f"{w}_quantized"], inits[f"{w}_scale"]) for w in report["weights"]}


def test_qat_keeps_the_weight_range_rule_and_a_calibrators_weight_choice(stfpm):
    """Untrained QAT exports the PTQ graph's weights: the spec's rule (mse), or one weight a calibrator chose."""
    from calibrators import WeightRange
    from qtool.graph.weight_ranges import weight_bounds

    model, graph, _, ranges = stfpm
    mse_spec = build_spec(graph, PtqConfig(activation_bits=4, weight_bits=4, weight_range="mse"))
    minmax_spec = build_spec(graph, PtqConfig(activation_bits=4, weight_bits=4))
    w = next(n.input[1] for n in graph.graph.node if n.name.startswith("/student/") and n.op_type == "Conv")
    data = next(onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.name == w)
    given = {**ranges["cpu"], w: WeightRange(*weight_bounds("mse", data, minmax_spec.weights[w]))}
    for spec, rngs in ((mse_spec, ranges["cpu"]), (minmax_spec, given)):
        ptq, ptq_report = insert_qdq_report(graph, spec, rngs)
        qdq, report = export_qdq(prepare_qat(model, graph, spec, rngs), graph)
        want, got = _weight_qparams(ptq, ptq_report), _weight_qparams(qdq, report)
        for name, (ints, scale) in want.items():
            np.testing.assert_allclose(got[name][1], scale, rtol=1e-6, err_msg=name)
            assert np.mean(got[name][0] == ints) > 0.999, name  # a scale one ulp off may move a tie
    ptq_mm, mm_report = insert_qdq_report(graph, minmax_spec, ranges["cpu"])
    assert not np.array_equal(_weight_qparams(ptq_mm, mm_report)[w][1], _weight_qparams(ptq, ptq_report)[w][1])


def test_scales_follow_the_target_profile(tiny):
    model, graph = tiny
    for target, act_dtype in (("tensorrt", "int8"), ("cpu", "uint8")):
        spec = build_spec(graph, PtqConfig(target=target, activation_bits=4, weight_bits=4))
        qm = prepare_qat(model, graph, spec, minmax_ranges(graph, spec.tensors_to_calibrate(), calib_batches(2)))
        for q in qm.act.values():
            assert isinstance(q, ActFakeQuant) and q.params.dtype == act_dtype
            assert (q.qmin, q.qmax) == ((-7, 7) if target == "tensorrt" else (0, 15))
            if target == "tensorrt":
                assert int(q.zero_point) == 0
        for w in qm.weights.values():
            assert isinstance(w, WeightFakeQuant) and (w.qmin, w.qmax) == (-7, 7) and not w.zero_point.any()
            assert w.axis == 0 and w.get_scale().numel() > 1
        if target == "tensorrt":
            qdq, _ = export_qdq(qm, graph)
            assert lint(qdq, "tensorrt") == []


def test_qat_lowers_the_kd_loss_of_the_fake_quantized_model(stfpm):
    model, graph, feeds, ranges = stfpm
    spec = build_spec(graph, PtqConfig(target="cpu", quantize="student", activation_bits=4, weight_bits=4))
    qm = prepare_qat(model, graph, spec, ranges["cpu"], learnable=True)
    batch = torch.from_numpy(np.concatenate([f["image"] for f in feeds]))
    before = mean_loss(qm.model, batch, 2)
    history = qat_train(qm, batch, QatConfig(epochs=4, batch_size=2, lr=0.05, freeze_epochs=1), holdout=batch)
    after = mean_loss(qm.model, batch, 2)
    assert after < 0.9 * before, (before, after)
    assert history[0]["epoch"] == 0 and history[0]["holdout_loss"] == pytest.approx(before)
    assert [h["frozen"] for h in history[1:]] == [False, False, False, True]
    assert all(h["seconds"] > 0 for h in history[1:])
    scale = next(q for t, q in qm.act.items() if t.startswith("/student/"))
    assert not scale.log_scale.requires_grad  # frozen after training


def test_checkpoint_is_weights_only_and_rebuilds_the_model(stfpm, tmp_path):
    model, graph, feeds, ranges = stfpm
    ptq = PtqConfig(target="tensorrt")
    spec = build_spec(graph, ptq)
    qm = prepare_qat(model, graph, spec, ranges["tensorrt"], learnable=True)
    images = torch.from_numpy(np.concatenate([f["image"] for f in feeds]))
    qat_train(qm, images, QatConfig(epochs=1, batch_size=2, freeze_epochs=0))
    base = {"model": ModelConfig(weights="none").model_dump(mode="json"), "data": {}, "image_size": 64}
    payload = qat_payload(qm, base, model.state_dict(), ptq.model_dump(mode="json"), {"batch_size": 1, "opset": 17},
                          {"learnable_scales": True}, {"epoch": 1})
    path = save_qat_checkpoint(payload, tmp_path / "qat.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "qtool-qat-checkpoint" and "qat_state_dict" in raw
    assert read_qat_checkpoint(path)["extra"] == {"epoch": 1}
    again, graph2, meta = load_qat_checkpoint(path)
    x = torch.from_numpy(feeds[1]["image"])
    with torch.no_grad():
        np.testing.assert_array_equal(again.model(x)[0].numpy(), qm.model.eval()(x)[0].numpy())
    assert again.ranges().keys() == qm.ranges().keys() and meta["ptq"]["target"] == "tensorrt"
    for name, bounds in qm.ranges().items():  # activations' (lo, hi) and weights' per-channel bounds
        np.testing.assert_array_equal(np.asarray(again.ranges()[name]), np.asarray(bounds), err_msg=name)
    a, b = export_qdq(again, graph2)[0], export_qdq(qm, graph)[0]
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def test_cli_qat_end_to_end_and_init_from_ptq(tmp_path_factory, tmp_path):
    kd = shared(tmp_path_factory)
    ptq_report, ptq_dir = lib_ptq(tmp_path_factory, "qat-minmax-trt", "ptq.calib=minmax", "ptq.target=tensorrt")
    out = tmp_path / "qat"
    common = ["qat", "--model", str(kd.checkpoint), "--recipe", str(kd.recipe_file), "--epochs", "1",
              "--init-from", str(ptq_dir), "--set", "qat.batch_size=4"]
    res = CliRunner().invoke(main, [*common, "--target", "tensorrt", "--out", str(out)])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert "model.onnx" in res.stdout
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "fp32.onnx", "qat_fp32.onnx", "qat.pt", "last.pt", "report.json", "recipe.yaml",
            "manifest.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["init"]["init_from"] == str(ptq_dir) and report["init"]["model_check"] == "checked"
    assert report["lint"] == []
    assert len(report["epoch_seconds"]) == 1 and report["mean_epoch_seconds"] > 0
    for t, r in report["ranges"].items():  # QAT started from the PTQ run's ranges
        entry = ptq_report["quantization"]["tensors"][t]
        assert r["initial"] == pytest.approx([entry["lo"], entry["hi"]]), t
    assert set(report["quantization"]["tensors"]) == set(ptq_report["quantization"]["tensors"])
    assert report["quantization"]["qdq_per_op_type"] == ptq_report["quantization"]["qdq_per_op_type"]
    assert json.loads((out / "manifest.json").read_text())["command"] == "qat"
    assert torch.load(out / "qat.pt", weights_only=True)["extra"]["epoch"] == 1
    # a PTQ run for another target is refused with one error line
    bad = CliRunner().invoke(main, [*common, "--target", "cpu", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
    assert "tensorrt" in bad.stderr and not (tmp_path / "bad").exists()


def test_float_head_leaves_other_float_readers_fake_quantized(stfpm):
    """A feature the head reads in float and a float (excluded) conv reads dequantized: QAT rounds it for the conv."""
    model, graph, feeds, ranges = stfpm
    readers = defaultdict(list)
    for n in graph.graph.node:
        for x in n.input:
            readers[x].append(n)
    t, conv = next((t, c) for t, cs in readers.items() if any(c.name.startswith("/head/") for c in cs)
                   for c in cs if c.op_type == "Conv")
    spec = build_spec(graph, PtqConfig(exclude_nodes=[conv.name]))
    assert conv.name not in spec.nodes and t in spec.activations
    smap = build_spec_map(model, graph, spec)
    (use,) = smap.activations[t].uses
    assert use.consumers and len(use.consumers) == 1  # the excluded conv only, not the head
    qm = prepare_qat(model, graph, spec, ranges["cpu"])
    qdq, _ = insert_qdq_report(graph, spec, ranges["cpu"])
    ref, flt = run(qdq, feeds[:1])[0][0], run(graph, feeds[:1])[0][0]
    with torch.no_grad():
        out = qm.model.eval()(torch.from_numpy(feeds[0]["image"]))[0].numpy()
    assert np.abs(out - ref).mean() < 0.02 * np.abs(flt - ref).mean()


@pytest.mark.parametrize("learnable", [True, False])
def test_put_scale_with_a_mask_sets_those_channels_and_keeps_the_others_bit_for_bit(learnable):
    """Growing a few weight scales (QAT's int32-bias floor) must not move the others: no exp/log round trip."""
    from qtool.graph.profiles import get_profile

    wq = WeightFakeQuant(get_profile("cpu").weight(8, axis=0), "w", axis=0, channels=1000, learnable=learnable)
    wq.put_scale(torch.exp(torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3 - 8))
    stored = (wq.log_scale if learnable else wq.scale).detach().clone()
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[::7] = True
    wq.put_scale(torch.full((1000,), 0.5), where=mask)
    after = (wq.log_scale if learnable else wq.scale).detach()
    assert torch.equal(after[~mask], stored[~mask])
    torch.testing.assert_close(wq.get_scale().detach()[mask], torch.full((int(mask.sum()),), 0.5))
