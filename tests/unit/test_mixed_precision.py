"""Layers and sub-specs (structural checks on TinyKD), and mixed precision on the outlier model.

The proxy of the chosen model is recomputed with a plain ONNX Runtime session and sklearn.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from helpers.ort_utils import minmax_ranges, run, session
from helpers.outlier_model import TEACHER_TENSOR, outlier_model, smooth_normals
from helpers.tiny_models import calib_batches, tiny_model
from sklearn.metrics import roc_auc_score

from calibrators import get_calibrator
from qtool.calibrate import calibrate
from qtool.graph import build_spec, insert_qdq, layer_groups, lint, node_tensors, prepare, subset
from qtool.graph.policy import OP_RULES
from qtool.mixed_precision import CRITERIA, RANKS, choose_precision, ranked
from qtool.proxy import MapDistortion
from qtool.recipe import PtqConfig, SearchConfig
from qtool.search import Harness, search_set_from_arrays


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = prepare(tiny_model(tmp_path_factory.mktemp("tiny")))
    spec = build_spec(model, PtqConfig(), "cpu")
    return model, spec, minmax_ranges(model, spec.tensors_to_calibrate(), calib_batches(2))


def _quantized_inputs(model: onnx.ModelProto) -> Counter:
    return Counter(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear")


def test_layers_partition_the_quantized_nodes_with_followers_in_their_producers_layer(tiny):
    model, spec, _ = tiny
    groups = layer_groups(model, spec)
    flat = [n for nodes in groups.values() for n in nodes]
    assert sorted(flat) == sorted(spec.nodes) and len(flat) == len(set(flat))
    assert any(len(nodes) > 1 for nodes in groups.values()), "TinyKD's Relu/MaxPool join their Conv's layer"
    op = {n.name: n.op_type for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    first_input = {n.name: n.input[0] for n in model.graph.node}
    for layer, nodes in groups.items():
        assert layer == nodes[0]
        head_producer = producer.get(first_input[layer])
        assert not OP_RULES[op[layer]].follows or head_producer not in spec.nodes, layer
        for n in nodes[1:]:
            assert OP_RULES[op[n]].follows and producer[first_input[n]] in nodes, (layer, n)
    convs = [n for n in spec.nodes if op[n] == "Conv"]
    assert set(convs) <= set(groups), "every Conv starts a layer"


def test_subsets_quantize_exactly_their_layers(tiny, tmp_path):
    model, spec, ranges = tiny
    full = insert_qdq(model, spec, ranges)
    assert _quantized_inputs(insert_qdq(model, subset(model, spec, spec.nodes, "x"), ranges)) == _quantized_inputs(full)
    nothing = insert_qdq(model, subset(model, spec, [], "kept float"), ranges)
    assert not [n for n in nothing.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    feeds = calib_batches(1)
    np.testing.assert_array_equal(run(model, feeds)[0][0], run(nothing, feeds)[0][0])
    needs = node_tensors(model, spec)
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    for layer, nodes in layer_groups(model, spec).items():
        sub = subset(model, spec, nodes, "kept float")
        assert set(sub.nodes) == set(nodes)
        assert {d.node for d in sub.decisions if d.quantized} == set(nodes)
        assert [d.reason for d in sub.decisions if d.node not in nodes and d.node in spec.nodes] == \
            ["kept float"] * (len(spec.nodes) - len(nodes))
        q = insert_qdq(model, sub, ranges)
        assert lint(q, "cpu") == [], layer
        assert set(sub.weights) == {weight_of[n] for n in nodes if n in weight_of}
        ranges_used = {sub.activations[t].range_of for t in sub.activations if not sub.activations[t].constant}
        assert ranges_used == {t for n in nodes for t in needs[n]}, layer
        assert set(_quantized_inputs(q)) <= set(_quantized_inputs(full)) and _quantized_inputs(q)


@pytest.fixture(scope="module")
def outlier():
    normals = smooth_normals(12)
    model = prepare(outlier_model(normals))
    search = search_set_from_arrays(normals, ["scratch", "noise"], seed=0)
    return normals, model, search


@pytest.fixture(scope="module")
def entropy4(outlier):
    """The outlier model at 4 bits with entropy ranges (which clip the teacher tensor's outliers) and its harness."""
    normals, model, search = outlier
    spec = build_spec(model, PtqConfig(activation_bits=4, weight_bits=4), "cpu")
    ranges = calibrate(model, spec.tensors_to_calibrate(), [normals, search.images],
                       get_calibrator("entropy", num_bits=4), threads=1)
    return model, search, spec, ranges, Harness(model, spec, search, threads=1)


def _outputs(model, search):
    """Maps and scores of ``model`` on the search images, from a plain ORT session."""
    sess = session(model, "ORT_ENABLE_BASIC")
    out = [sess.run(["anomaly_map", "score"], {"image": x[None]}) for x in search.images]
    return np.concatenate([o[0][:, 0] for o in out]), np.array([float(o[1][0]) for o in out])


def _drop(model, search, reference) -> float:
    """Independent proxy: ORT session + sklearn, image and pixel AUROC drop vs fp32 (the larger)."""
    maps, scores = _outputs(model, search)
    img = roc_auc_score(search.labels, scores)
    pix = roc_auc_score(search.masks.ravel() > 0, maps.ravel())
    return max(reference[0] - img, reference[1] - pix), (img, pix)


def test_mixed_precision_keeps_the_clipped_teacher_layer_float_and_meets_the_budget(entropy4):
    model, search, spec, ranges, harness = entropy4
    _, fp32 = _drop(model, search, (0.0, 0.0))
    budget = 0.02
    all_quantized, _ = _drop(insert_qdq(model, spec, ranges), search, fp32)
    assert all_quantized > 0.2, "premise: entropy at 4 bits clips the teacher tensor's outliers"
    mp = choose_precision(harness, ranges, budget, SearchConfig(latency_iterations=2), criterion="separation")
    assert mp.fallback == ["/teacher/conv/Conv"]
    assert TEACHER_TENSOR not in {n.input[0] for n in insert_qdq(model, mp.spec, ranges).graph.node
                                  if n.op_type == "QuantizeLinear"}
    final, _ = _drop(insert_qdq(model, mp.spec, ranges), search, fp32)
    assert final <= budget and final == pytest.approx(mp.report["final"]["drop"], abs=1e-9)
    assert mp.report["all_quantized"]["drop"] == pytest.approx(all_quantized, abs=1e-9)
    assert set(mp.sensitivity) == set(layer_groups(model, spec))
    assert mp.sensitivity["/teacher/conv/Conv"]["drop"] > mp.sensitivity["/student/conv/Conv"]["drop"]
    entry = mp.report["fallback"][0]
    assert entry["nodes"] == ["/teacher/conv/Conv", "/teacher/relu/Relu"] and np.isfinite(entry["latency_cost_ms"])
    assert mp.report["latency"]["iterations"] == 2 and mp.report["precision_kept"] == "fp32"


def test_emulated_fallbacks_are_costed_in_macs_and_timed_on_the_8bit_stand_in(entropy4):
    model, search, spec, ranges, harness = entropy4
    stand_in = build_spec(model, PtqConfig(), "cpu")
    config = SearchConfig(latency_iterations=1)
    mp = choose_precision(harness, ranges, 0.02, config, criterion="separation", stand_in=stand_in)
    plain = choose_precision(harness, ranges, 0.02, config, criterion="separation")
    assert mp.fallback == plain.fallback == ["/teacher/conv/Conv"], "the stand-in changes what is timed, not the choice"
    assert mp.report["final"] == plain.report["final"]
    # teacher and student are the same 3x3 Conv (3 -> 2 channels) on the same image: the teacher is half the MACs
    size = search.images.shape[-1]
    assert mp.report["macs"]["total"] == 2 * (size * size * 2 * 3 * 9)
    assert mp.report["macs"]["float_share"] == 0.5 and mp.report["fallback"][0]["macs_share"] == 0.5
    assert mp.report["latency"]["stand_in"] and mp.report["latency"]["graph"].startswith("w8a8 stand-in")
    assert not plain.report["latency"]["stand_in"] and plain.report["latency"]["graph"] == "as chosen (w4a4)"
    assert all(np.isfinite(mp.report["latency"][k]) for k in ("fp32_ms", "all_quantized_ms", "final_ms"))
    # what the stand-in times: the 8-bit graph (no emulation clip, 8-bit zero point range), the 4-bit one is emulated
    ops = Counter(n.op_type for n in harness.build_nodes(ranges, None, spec=stand_in).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["Clip"] == 1, "only the student's own Clip: no emulation clip"
    assert Counter(n.op_type for n in harness.build_nodes(ranges, None).graph.node)["Clip"] > ops["Clip"]


def test_a_sub_spec_keeps_the_weight_range_rule(tiny):
    model, _, _ = tiny
    spec = build_spec(model, PtqConfig(weight_range="mse"), "cpu")
    assert subset(model, spec, list(spec.nodes)[:1], "kept float").weight_range == "mse"


def test_mixed_precision_keeps_everything_quantized_when_already_within_budget(outlier):
    normals, model, search = outlier
    spec = build_spec(model, PtqConfig(), "tensorrt")
    ranges = calibrate(model, spec.tensors_to_calibrate(), [normals, search.images],
                       get_calibrator("minmax", symmetric=True), threads=1)
    harness = Harness(model, spec, search, threads=1)
    mp = choose_precision(harness, ranges, 0.05, SearchConfig(), criterion="separation")
    assert mp.fallback == [] and mp.spec is spec and "latency" not in mp.report
    assert mp.report["all_quantized"]["drop"] <= 0.05 and mp.report["precision_kept"] == "fp16"


def _distortion(model, search, measure: MapDistortion) -> float:
    """The map distortion of ``model`` (run in a plain ORT session) as ``measure`` scores it against fp32."""
    return measure(*_outputs(model, search))["loss"]


def test_distortion_criterion_keeps_the_fewest_layers_that_leave_a_share_of_the_distortion(entropy4):
    model, search, spec, ranges, harness = entropy4
    measure = MapDistortion(*_outputs(model, search), search.masks, search.labels)
    everything = _distortion(insert_qdq(model, spec, ranges), search, measure)
    assert everything > 0
    layers = list(layer_groups(model, spec))
    for share in (1.0, 0.3, 0.0):
        mp = choose_precision(harness, ranges, share, SearchConfig(latency_iterations=1), criterion="distortion")
        final = _distortion(insert_qdq(model, mp.spec, ranges), search, measure)
        assert final <= share * everything + 1e-9, share
        assert mp.report["final"]["value"] == pytest.approx(final / everything, abs=1e-9)
        assert mp.report["criterion"] == "distortion" and mp.report["all_quantized"]["value"] == 1.0
        for layer in mp.fallback:  # minimal: quantizing any one fallback again leaves more than the share
            keep = [n for x in layers if x not in mp.fallback or x == layer for n in layer_groups(model, spec)[x]]
            again = _distortion(insert_qdq(model, subset(model, spec, keep, "x"), ranges), search, measure)
            assert again > share * everything, (share, layer)
        if share == 1.0:
            assert mp.fallback == []
        if share == 0.3:  # the teacher layer, whose 4-bit clipping distorts the map most, is enough
            assert mp.fallback == ["/teacher/conv/Conv"]
            assert mp.sensitivity["/teacher/conv/Conv"]["loss"] > mp.sensitivity["/student/conv/Conv"]["loss"]
        if share == 0.0:
            assert sorted(mp.fallback) == sorted(layers)  # only the float model has no distortion at all


def test_criteria_registry():
    assert set(CRITERIA.names()) == {"separation", "distortion"}
    assert set(RANKS.names()) == {"sensitivity", "per-mac"}


def test_per_mac_rank_puts_cheap_sensitive_layers_first_and_unscanned_layers_last():
    names = ["stem", "big", "add", "small", "unscanned"]
    sens = {"stem": {"loss": 0.4, "drop": 0.0}, "big": {"loss": 0.5, "drop": 0.0},
            "add": {"loss": 0.1, "drop": 0.0}, "small": {"loss": 0.2, "drop": 0.0}}
    shares = {"stem": 0.2, "big": 0.7, "add": 0.05, "small": 0.05, "unscanned": 0.0}
    rule = CRITERIA.get("distortion")
    assert ranked(names, sens, shares, rule, RANKS.get("sensitivity")) == ["big", "stem", "small", "add", "unscanned"]
    # per MAC: small 4.0, stem 2.0, add 2.0 (tie on loss/share: the drop ties too, graph order), big 0.71
    assert ranked(names, sens, shares, rule, RANKS.get("per-mac")) == ["small", "stem", "add", "big", "unscanned"]


def test_per_mac_rank_is_recorded_with_the_shares_it_divided_by(entropy4):
    model, search, spec, ranges, harness = entropy4
    mp = choose_precision(harness, ranges, 0.3, SearchConfig(latency_iterations=1), criterion="distortion",
                          rank="per-mac")
    plain = choose_precision(harness, ranges, 0.3, SearchConfig(latency_iterations=1), criterion="distortion")
    assert mp.report["rank"] == "per-mac" and plain.report["rank"] == "sensitivity"
    # teacher and student Conv have the same MACs, so dividing by them keeps the order and the choice
    assert mp.report["rank_mac_share"] == {"/teacher/conv/Conv": 0.5, "/student/conv/Conv": 0.5}
    assert mp.report["order"] == plain.report["order"] == ["/teacher/conv/Conv", "/student/conv/Conv"]
    assert mp.fallback == plain.fallback == ["/teacher/conv/Conv"]


def test_a_correction_that_breaks_the_budget_floats_more_layers_instead_of_being_dropped(entropy4):
    """``correct`` is a deliberately harmful stand-in for bias correction (5 off every quantized Conv's bias): the
    choice made on uncorrected graphs is over budget once corrected, so the next layer goes float too."""
    from onnx import numpy_helper

    model, search, spec, ranges, harness = entropy4
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = {n.name: n.input[2] for n in model.graph.node if n.op_type == "Conv"}
    asked = []

    def spoil(sub):
        asked.append(sorted(sub.nodes))
        return {n: (convs[n], inits[convs[n]] - 5.0) for n in sub.nodes if n in convs}

    plain = choose_precision(harness, ranges, 0.3, SearchConfig(latency_iterations=1), criterion="distortion")
    assert plain.fallback == ["/teacher/conv/Conv"]  # premise: uncorrected, the teacher layer alone is enough
    mp = choose_precision(harness, ranges, 0.3, SearchConfig(latency_iterations=1), criterion="distortion",
                          correct=spoil)
    assert mp.report["bias_corrected"] == {"added": ["/student/conv/Conv"], "graphs": 2}
    assert sorted(mp.fallback) == sorted(layer_groups(model, spec)) and mp.report["final"]["value"] == 0.0
    assert "/student/conv/Conv" in asked[0] and "/teacher/conv/Conv" not in asked[0]
    kind = choose_precision(harness, ranges, 0.3, SearchConfig(latency_iterations=1), criterion="distortion",
                            correct=lambda sub: {})  # a correction that changes nothing keeps the plain choice
    assert kind.fallback == plain.fallback and kind.report["bias_corrected"] == {"added": [], "graphs": 1}
    assert kind.report["final"]["loss"] == pytest.approx(plain.report["final"]["loss"], abs=1e-12)
