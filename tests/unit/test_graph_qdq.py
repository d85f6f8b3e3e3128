"""QDQ insertion on the tensorrt profile (checked by lint), lint's violations, and emulated 4-bit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers.ort_utils import minmax_ranges, run, session
from helpers.tiny_models import calib_batches, tiny_model
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import GraphError
from qtool.graph import add_outputs, build_spec, insert_qdq, insert_qdq_report, lint, prepare
from qtool.recipe import PtqConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> onnx.ModelProto:
    return prepare(tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def ranges(prepared):
    spec = build_spec(prepared, PtqConfig(), "cpu")
    return minmax_ranges(prepared, spec.tensors_to_calibrate(), calib_batches(2))


def _qdq(prepared, ranges, target="cpu", **cfg):
    return insert_qdq_report(prepared, build_spec(prepared, PtqConfig(target=target, **cfg)), ranges)


def test_tensorrt_graph_is_int8_symmetric_and_lints_clean(prepared, ranges):
    q, report = _qdq(prepared, ranges, "tensorrt")
    assert lint(q, "tensorrt") == []
    json.dumps(report)
    json.dumps(build_spec(prepared, PtqConfig(target="tensorrt")).to_dict())
    with pytest.raises(GraphError, match="already quantized"):
        build_spec(q, PtqConfig())
    inits = {t.name: t for t in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 20
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
    assert all(
        n.input[2] == b for n in q.graph.node if n.op_type == "Conv" for b in [n.input[2]] if b.endswith("bias")
    ), "TensorRT keeps bias float"
    a, b = run(prepared, calib_batches(1)), run(q, calib_batches(1))
    np.testing.assert_allclose(a[0][0], b[0][0], atol=0.05)
    # the cpu graph breaks the tensorrt rules, node by node
    cpu_issues = lint(_qdq(prepared, ranges, "cpu")[0], "tensorrt")
    assert any(i.node == "input_QuantizeLinear" and "uint8" in i.message for i in cpu_issues)
    assert any("bias is quantized" in i.message for i in cpu_issues)


def test_lint_names_hand_made_violations(prepared, ranges):
    q, _ = _qdq(prepared, ranges, "tensorrt")
    node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
    # 1. a uint8 zero point on one Q (and its DQ)
    q.graph.initializer.append(numpy_helper.from_array(np.array(3, np.uint8), "bad_zp"))
    node.input[2] = "bad_zp"
    # 2. a dangling Q
    q.graph.node.append(helper.make_node("QuantizeLinear", ["input", node.input[1]], ["dangling"], "dangling_Q"))
    issues = lint(q, "tensorrt")
    msgs = {(i.node, i.message) for i in issues}
    assert (node.name, "activation is uint8; profile 'tensorrt' wants int8") in msgs
    assert any(i.node == node.name and "zero point [3]" in i.message for i in issues)
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0])
    assert any(i.node == dq.name and "differs from its QuantizeLinear" in i.message for i in issues)
    assert any(i.node == "dangling_Q" and "not read only by DequantizeLinear" in i.message for i in issues)
    assert str(issues[0]).startswith(issues[0].node + ": ")


def test_lint_checks_weight_granularity(prepared, ranges):
    q, _ = _qdq(prepared, ranges, "cpu")
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "teacher.2.weight_quantized")
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 1
    assert [i.node for i in lint(q, "cpu")] == [dq.name]


def test_missing_range_names_the_tensor(prepared, ranges):
    spec = build_spec(prepared, PtqConfig(), "cpu")
    partial = {k: v for k, v in ranges.items() if k != "/student/Relu_output_0"}
    with pytest.raises(GraphError, match="no calibration range for tensor '/student/Relu_output_0'"):
        insert_qdq(prepared, spec, partial)
    bad = {**ranges, "input": (np.nan, 1.0)}
    with pytest.raises(GraphError, match="'input'"):
        insert_qdq(prepared, spec, bad)


def test_4bit_is_emulated_with_17x_scales_and_narrow_integers(prepared, ranges):
    q8, r8 = _qdq(prepared, ranges, "cpu")
    q4, r4 = _qdq(prepared, ranges, "cpu", activation_bits=4, weight_bits=4)
    assert r4["emulated"] and not r8["emulated"]
    for t, rep in r4["tensors"].items():
        if rep["scale"] != 1.0:  # all-zero ranges keep scale 1
            np.testing.assert_allclose(rep["scale"] / r8["tensors"][t]["scale"], 255 / 15, rtol=1e-5, err_msg=t)
        assert 0 <= rep["zero_point"] <= 15
    for w, rep in r4["weights"].items():
        np.testing.assert_allclose(rep["scale_max"] / r8["weights"][w]["scale_max"], 127 / 7, rtol=1e-5)
    inits = {t.name: numpy_helper.to_array(t) for t in q4.graph.initializer}
    for w in r4["weights"]:
        assert np.abs(inits[f"{w}_quantized"]).max() <= 7, w
    # activations saturate at [0, 15] even outside the calibrated range (the Clip emulates 4-bit storage)
    q_outs = [n.output[0] for n in q4.graph.node if n.op_type == "QuantizeLinear"]
    assert r4["clip_nodes"] == len(q_outs) > 0
    probe = add_outputs(q4, q_outs)
    loud = {"input": 10 * calib_batches(1)[0]["input"]}
    for name, v in zip(q_outs, run(probe, [loud])[0][2:], strict=False):
        assert v.dtype == np.uint8 and v.max() <= 15, name
    out4, out8 = run(q4, calib_batches(1))[0], run(q8, calib_batches(1))[0]
    assert np.isfinite(out4[0]).all() and out4[0].shape == out8[0].shape


def _weight_ints(q: onnx.ModelProto) -> np.ndarray:
    """Every int8 weight initializer's integers (the ones DequantizeLinear nodes read)."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq_inputs = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    return np.concatenate([v.ravel() for k, v in inits.items()
                           if k in dq_inputs and v.dtype == np.int8 and v.ndim == 4])


def test_cpu_avx2_profile_uses_7_bit_weights(prepared, ranges):
    full, _ = _qdq(prepared, ranges, "cpu")
    reduced, report = _qdq(prepared, ranges, "cpu-avx2")
    assert np.abs(_weight_ints(full)).max() == 127
    assert np.abs(_weight_ints(reduced)).max() == 63
    assert lint(reduced, "cpu-avx2") == []
    # integer kernels (ORT's full optimisation) follow the float simulation of the same QDQ graph
    feeds = calib_batches(2, seed=5)
    sim, fused = (np.concatenate([session(reduced, level).run(None, f)[0] for f in feeds])
                  for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"))
    assert np.abs(sim - fused).max() < 0.05 * np.abs(sim).max()


def test_host_warning_names_the_reduced_range_profile():
    from qtool.graph import get_profile
    from qtool.graph.profiles import host_warning

    cpu, avx2 = get_profile("cpu"), get_profile("cpu-avx2")
    assert "cpu-avx2" in host_warning(cpu, {"avx2": True}, "x86_64")
    assert host_warning(cpu, {"avx2": True, "avx512_vnni": True}, "x86_64") is None
    assert host_warning(cpu, {}, "aarch64") is None
    assert host_warning(avx2, {"avx2": True}, "x86_64") is None


def test_input_bits_widens_only_the_graph_input(prepared, ranges):
    q, wide = _qdq(prepared, ranges, "cpu", activation_bits=4, weight_bits=4, input_bits=8)
    _, narrow = _qdq(prepared, ranges, "cpu", activation_bits=4, weight_bits=4)
    assert wide["tensors"]["input"]["bits"] == 8 and narrow["tensors"]["input"]["bits"] == 4
    np.testing.assert_allclose(narrow["tensors"]["input"]["scale"] / wide["tensors"]["input"]["scale"], 255 / 15,
                               rtol=1e-5)
    rest = [t for t in narrow["tensors"] if t != "input"]
    assert rest and all(wide["tensors"][t] == narrow["tensors"][t] for t in rest)
    assert wide["clip_nodes"] == narrow["clip_nodes"] - 1  # no 4-bit saturation on the input
    assert np.isfinite(run(q, calib_batches(1))[0][0]).all()


def test_input_ranges_come_from_a_calibrator_at_the_input_width(prepared):
    from calibrators import get_calibrator
    from qtool.calibrate import input_ranges

    batches = calib_batches(3)
    spec = build_spec(prepared, PtqConfig(activation_bits=4, weight_bits=4, input_bits=8), "cpu")
    got = input_ranges(spec, lambda: (b["input"] for b in batches), lambda bits: get_calibrator("mse", num_bits=bits))
    assert set(got) == {"input"}
    ref = {}
    for bits in (8, 4):
        c = get_calibrator("mse", num_bits=bits)
        for b in batches:
            c.observe("input", b["input"])
        ref[bits] = c.compute()["input"]
    assert (got["input"].lo, got["input"].hi) == (ref[8].lo, ref[8].hi) != (ref[4].lo, ref[4].hi)
    same = build_spec(prepared, PtqConfig(activation_bits=4, weight_bits=4), "cpu")
    assert input_ranges(same, lambda: (b["input"] for b in batches), lambda bits: get_calibrator("mse")) == {}
