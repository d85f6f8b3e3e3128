"""Target profiles (ORT-exact scale/zero point) and the quantization policy (parts, exclusions, ops)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from helpers.ort_utils import minmax_ranges, run
from helpers.tiny_models import calib_batches, tiny_model

from qtool.errors import GraphError, RegistryError
from qtool.graph import PROFILES, QuantParams, build_spec, get_profile, insert_qdq, prepare, scale_zero_point
from qtool.recipe import PtqConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> onnx.ModelProto:
    return prepare(tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize(
    ("params", "qmin", "qmax"),
    [
        (QuantParams("uint8", 8, False), 0, 255),
        (QuantParams("int8", 8, True), -127, 127),
        (QuantParams("int8", 8, False), -128, 127),
        (QuantParams("int8", 4, True), -7, 7),
        (QuantParams("uint8", 4, False), 0, 15),
        (QuantParams("int8", 6, True), -31, 31),
    ],
)
def test_integer_ranges(params, qmin, qmax):
    assert (params.qmin, params.qmax) == (qmin, qmax)


@pytest.mark.parametrize("symmetric,dtype", [(False, "uint8"), (True, "int8"), (True, "uint8"), (False, "int8")])
def test_scale_zero_point_is_onnxruntime_compute_scale_zp(symmetric, dtype):
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    p = QuantParams(dtype, 8, symmetric)
    qmin, qmax = get_qmin_qmax_for_qType(p.onnx_type, symmetric=symmetric)
    assert (int(qmin), int(qmax)) == (p.qmin, p.qmax)
    rng = np.random.default_rng(0)
    cases = [(-1e-3, 5.0), (0.2, 7.0), (-3.0, -1.0), (0.0, 0.0), (-1e-40, 1e-40)]
    cases += [tuple(sorted(rng.normal(0, 3, 2))) for _ in range(20)]
    for lo, hi in cases:
        zp_ref, s_ref = compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax, symmetric)
        s, zp = scale_zero_point(lo, hi, p)
        assert s.dtype == np.float32 and s == s_ref, (lo, hi)
        assert zp.dtype == zp_ref.dtype and zp == zp_ref, (lo, hi)


def test_profiles_are_registered_data():
    cpu, trt = get_profile("cpu"), get_profile("tensorrt")
    assert cpu.activation() == QuantParams("uint8", 8, False, None)
    assert cpu.weight(8, axis=1) == QuantParams("int8", 8, True, 1)
    assert trt.activation(4) == QuantParams("int8", 4, True, None)
    assert trt.activation().symmetric_zero_point == 0
    assert set(PROFILES.names()) >= {"cpu", "tensorrt"}
    with pytest.raises(RegistryError, match="cpu, cpu-avx2, tensorrt"):
        get_profile("gpu-magic")


def _decision(spec, node):
    return next(d for d in spec.decisions if d.node == node)


def test_student_only_keeps_teacher_and_head_float(prepared):
    spec = build_spec(prepared, PtqConfig(quantize="student"), "cpu")
    t = _decision(spec, "/teacher/teacher.0/Conv")
    assert not t.quantized and "part 'teacher' not selected" in t.reason
    assert _decision(spec, "/student/conv1/Conv").quantized
    head = [d for d in spec.decisions if d.node.startswith("/head/")]
    assert head and all(not d.quantized for d in head)
    assert "quantize_head" in _decision(spec, "/head/Resize").reason
    assert not any(w.startswith("teacher.") for w in spec.weights)

    q = insert_qdq(prepared, spec, minmax_ranges(prepared, spec.tensors_to_calibrate(), calib_batches(2)))
    nodes = {n.name: n for n in q.graph.node}
    # the model input feeds a quantized (student) and a float (teacher) Conv: the float one reads it raw
    assert nodes["/teacher/teacher.0/Conv"].input[0] == "input"
    assert nodes["/student/conv1/Conv"].input[0] == "input_DequantizeLinear_Output"
    assert nodes["/teacher/teacher.0/Conv"].input[1] == "teacher.0.weight"


def test_relu_range_feeds_conv_output_and_pool_shares_it(prepared):
    spec = build_spec(prepared, PtqConfig(head_inputs="quantized"), "cpu")  # the pools feed only the head
    acts = spec.activations
    assert acts["/teacher/teacher.0/Conv_output_0"].range_of == "/teacher/teacher.1/Relu_output_0"
    assert acts["/teacher/teacher.4/MaxPool_output_0"].range_of == "/teacher/teacher.3/Relu_output_0"
    calib = spec.tensors_to_calibrate()
    assert "/teacher/teacher.0/Conv_output_0" not in calib and "/teacher/teacher.1/Relu_output_0" in calib
    assert calib[0] == "input"


def test_exclusions_by_glob_and_op_type(prepared):
    cfg = PtqConfig(exclude_nodes=["/student/conv2/*"], exclude_op_types=["Add"])
    spec = build_spec(prepared, cfg, "cpu")
    d = _decision(spec, "/student/conv2/Conv")
    assert not d.quantized and "'/student/conv2/*'" in d.reason
    assert "exclude_op_types" in _decision(spec, "/student/Add").reason
    assert "student.conv2.weight" not in spec.weights
    assert _decision(spec, "/student/conv3/Conv").quantized


def test_quantize_head_on_request(prepared):
    spec = build_spec(prepared, PtqConfig(quantize_head=True), "cpu")
    assert _decision(spec, "/head/Mul").quantized
    assert _decision(spec, "/head/Pow").reason == "unsupported op"
    feeds = calib_batches(2)
    q = insert_qdq(prepared, spec, minmax_ranges(prepared, spec.tensors_to_calibrate(), feeds))
    out = run(q, feeds)[0]
    assert out[0].shape == (1, 1, 16, 16) and np.isfinite(out[1]).all()


def test_unsupported_op_warns_or_fails_when_strict(tmp_path, caplog):
    m = prepare(tiny_model(tmp_path, student_act="tanh"))
    with caplog.at_level(logging.WARNING, logger="qtool.graph.policy"):
        spec = build_spec(m, PtqConfig(), "cpu")
    assert "/student/act/Tanh (Tanh)" in caplog.text
    assert _decision(spec, "/student/act/Tanh").reason == "unsupported op"
    with pytest.raises(GraphError, match=r"'/student/act/Tanh' \(Tanh\)"):
        build_spec(m, PtqConfig(strict=True), "cpu")
    # excluding the op type silences strict mode
    build_spec(m, PtqConfig(strict=True, exclude_op_types=["Tanh"]), "cpu")


def test_unnamed_nodes_are_refused(prepared):
    m = onnx.ModelProto()
    m.CopyFrom(prepared)
    m.graph.node[0].name = ""
    with pytest.raises(GraphError, match="has no name; run qtool.graph.prepare"):
        build_spec(m, PtqConfig(), "cpu")


def _with_probe(prepared: onnx.ModelProto) -> onnx.ModelProto:
    """The tiny graph plus a head node that also reads the student's residual sum (read by its Relu too)."""
    m = onnx.ModelProto()
    m.CopyFrom(prepared)
    m.graph.node.append(onnx.helper.make_node("ReduceMean", ["/student/Add_output_0"], ["probe"], "/head/Probe",
                                              keepdims=0))
    m.graph.output.append(onnx.helper.make_tensor_value_info("probe", onnx.TensorProto.FLOAT, None))
    return m


def test_head_inputs_float_reads_features_before_their_qdq(prepared):
    m = _with_probe(prepared)
    feeds = calib_batches(2)
    specs = {h: build_spec(m, PtqConfig(head_inputs=h), "cpu") for h in ("quantized", "float")}
    ranges = minmax_ranges(m, specs["quantized"].tensors_to_calibrate(), feeds)
    head_only = ["/teacher/teacher.4/MaxPool_output_0", "/student/pool/MaxPool_output_0"]
    assert all(t in specs["quantized"].activations for t in head_only)
    spec = specs["float"]
    assert not any(t in spec.activations for t in head_only)  # read by nothing quantized: no Q/DQ
    assert "/student/Add_output_0" in spec.activations  # the Relu still reads it quantized
    assert spec.float_readers == {d.node for d in spec.decisions if d.node.startswith("/head/")}
    assert "ptq.head_inputs=float" in _decision(spec, "/student/pool/MaxPool").reason
    assert set(spec.tensors_to_calibrate()) <= set(specs["quantized"].tensors_to_calibrate())

    graphs = {h: insert_qdq(m, s, ranges) for h, s in specs.items()}
    nodes = {h: {n.name: n for n in g.graph.node} for h, g in graphs.items()}
    assert nodes["float"]["/head/Div_1"].input[0] == "/student/pool/MaxPool_output_0"
    assert nodes["quantized"]["/head/Div_1"].input[0] == "/student/pool/MaxPool_output_0_DequantizeLinear_Output"
    assert nodes["float"]["/head/Probe"].input[0] == "/student/Add_output_0"
    assert nodes["float"]["/student/Relu"].input[0] == "/student/Add_output_0_DequantizeLinear_Output"
    assert not any(n.name.startswith("/student/pool/MaxPool_output_0") for n in graphs["float"].graph.node)
    # numerics: the probe averages the raw sum under float, its 8-bit rounding under quantized
    for h, g in graphs.items():
        g.graph.output.append(onnx.helper.make_tensor_value_info("/student/Add_output_0", onnx.TensorProto.FLOAT,
                                                                 None))
        probe, raw = run(g, feeds[:1])[0][2:]
        scale = next(onnx.numpy_helper.to_array(t) for t in g.graph.initializer
                     if t.name == "/student/Add_output_0_scale")
        zp = next(onnx.numpy_helper.to_array(t) for t in g.graph.initializer
                  if t.name == "/student/Add_output_0_zero_point").astype(np.float32)
        rounded = (np.clip(np.round(raw / scale) + zp, 0, 255) - zp) * scale
        assert not np.allclose(rounded, raw, atol=1e-6)
        expect = raw.mean() if h == "float" else rounded.mean()
        np.testing.assert_allclose(probe, expect, rtol=1e-5, atol=1e-6)
