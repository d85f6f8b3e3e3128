"""qtool's MinMax QDQ against onnxruntime's own quantize_static, and ORT's integer-kernel fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.ort_utils import minmax_ranges, optimized_ops, run
from helpers.tiny_models import calib_batches, tiny_model
from onnx import numpy_helper

from qtool.graph import OP_RULES, build_spec, insert_qdq, lint, prepare, save_model
from qtool.recipe import PtqConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> onnx.ModelProto:
    return prepare(tiny_model(tmp_path_factory.mktemp("tiny")))


def _qdq_params(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale and zero point per quantized tensor: Q nodes by their input, offline DQs by their int data."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] in inits):
            out[n.input[0]] = (inits[n.input[1]], inits[n.input[2]])
    return out


def _ort_quantize(model: onnx.ModelProto, feeds, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp / "float.onnx", tmp / "ort_qdq.onnx"
    save_model(model, src)
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=sorted(OP_RULES),
        nodes_to_exclude=[n.name for n in model.graph.node if n.name.startswith("/head/")],
        # ORT by default deletes a Relu after a quantized op and lets the uint8 zero point clamp;
        # qtool keeps the node (same numbers, and ORT's optimiser removes it anyway): keep it here too.
        extra_options={
            "ActivationSymmetric": False,
            "WeightSymmetric": True,
            "QDQKeepRemovableActivations": True,
        },
    )
    return onnx.load(str(dst))


def test_minmax_qdq_matches_onnxruntime_quantize_static(prepared, tmp_path):
    feeds = calib_batches(4)
    spec = build_spec(prepared, PtqConfig(head_inputs="quantized"), "cpu")  # onnxruntime's placement
    ours = insert_qdq(prepared, spec, minmax_ranges(prepared, spec.tensors_to_calibrate(), feeds))
    theirs = _ort_quantize(prepared, feeds, tmp_path)

    mine, ref = _qdq_params(ours), _qdq_params(theirs)
    assert set(mine) == set(ref), f"only qtool: {set(mine) - set(ref)}; only ORT: {set(ref) - set(mine)}"
    convs = [n for n in prepared.graph.node if n.op_type == "Conv"]
    assert {c.input[0] for c in convs} | {f"{c.input[1]}_quantized" for c in convs} <= set(mine)
    for name, (scale, zp) in ref.items():
        np.testing.assert_allclose(mine[name][0], scale, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(mine[name][1], zp, err_msg=name)
        assert mine[name][1].dtype == zp.dtype, name
    inits_ours = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    for t in theirs.graph.initializer:
        if t.name.endswith("_quantized"):  # int8 weights and int32 biases, value for value
            np.testing.assert_array_equal(inits_ours[t.name], numpy_helper.to_array(t), err_msg=t.name)

    out_ours, out_ref = run(ours, feeds), run(theirs, feeds)
    for a, b in zip(out_ours, out_ref, strict=True):
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)  # same graph, same params: equal up to fp32 rounding
    assert lint(ours, "cpu") == []


def test_every_conv_runs_as_integer_kernel_after_ort_optimisation(prepared, tmp_path):
    spec = build_spec(prepared, PtqConfig(quantize="both"), "cpu")
    q = insert_qdq(prepared, spec, minmax_ranges(prepared, spec.tensors_to_calibrate(), calib_batches(2)))
    ops = optimized_ops(q, tmp_path)
    quantized_parts = ("/teacher/", "/student/")
    float_convs = [name for op, name in ops if op in ("Conv", "FusedConv") and name.startswith(quantized_parts)]
    assert not float_convs, f"float Conv left in quantized parts: {float_convs}"
    n_int = sum(op in ("QLinearConv", "ConvInteger") for op, _ in ops)
    assert n_int == sum(n.op_type == "Conv" for n in prepared.graph.node) == 5
    assert ("QLinearAdd", "/student/Add") in ops
