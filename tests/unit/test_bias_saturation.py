"""bench/bias_saturation.py: finds int32 biases at the limit in a QDQ model and pairs them with the learned ones."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bias_saturation as bs  # noqa: E402


def test_module_name_follows_nested_scopes():
    assert bs.module_name("/teacher/body/blocks.1/blocks.1.1/conv_pw/Conv") == "teacher.body.blocks.1.1.conv_pw"
    assert bs.module_name("/teacher/body/conv_stem/Conv") == "teacher.body.conv_stem"


def test_saturated_channels_are_found_with_their_learned_bias(tmp_path):
    q = np.array([5, 2**31 - 1, -(2**31) + 1, -7], dtype=np.int32)  # channels 1 and 2 at the limit
    scale = np.full(4, 1e-9, dtype=np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((q, "b_q"), (scale, "b_s"), (np.zeros(4, np.int32), "b_z"),
                                                        (np.zeros((4, 3, 1, 1), np.float32), "w"))]
    nodes = [helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], name="/teacher/body/conv_stem/Conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    learned = torch.tensor([0.0, 2.5, -3.0, 0.0], dtype=torch.float64)
    torch.save({"qat_state_dict": {"teacher.body.conv_stem.parametrizations.bias.original": learned}},
               tmp_path / "qat.pt")
    [hit] = bs.saturated_biases(tmp_path)
    assert hit["layer"] == "/teacher/body/conv_stem/Conv" and hit["channels"] == [1, 2]
    assert hit["learned"] == [2.5, -3.0]
    np.testing.assert_allclose(hit["exported"], [(2**31 - 1) * 1e-9, (-(2**31) + 1) * 1e-9], rtol=1e-6)


def test_an_unreadable_run_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys):
    import pytest

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(SystemExit, match="cannot read its model.onnx"):
        bs.main(["--runs", str(run), "--out", str(tmp_path / "out")])
    assert not list(tmp_path.glob("out*"))


def _conv_clip_run(tmp_path, weight, bias_q, bias_scale, learned):
    """A QDQ Conv (uint8 image in [0, 2.55], int8 per-channel weight, int32 bias) read by Clip(0, 6), and its qat.pt."""
    w_scale = np.full(weight.shape[0], 0.01, np.float32)
    arrays = {"x_s": np.array(0.01, np.float32), "x_z": np.array(0, np.uint8),
              "w_q": np.round(weight / 0.01).astype(np.int8), "w_s": w_scale, "w_z": np.zeros(weight.shape[0], np.int8),
              "b_q": bias_q.astype(np.int32), "b_s": np.full(weight.shape[0], bias_scale, np.float32),
              "b_z": np.zeros(weight.shape[0], np.int32), "y_s": np.array(0.05, np.float32),
              "y_z": np.array(128, np.uint8), "hi": np.array(6.0, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0),
             helper.make_node("Conv", ["xd", "w", "b"], ["y"], name="/teacher/body/conv_stem/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "y_s", "y_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["yd"]),
             helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
             helper.make_node("Clip", ["yd", "lo", "hi"], ["z"])]
    c = weight.shape[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 4, 4])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "model.onnx")
    torch.save({"qat_state_dict": {"teacher.body.conv_stem.parametrizations.bias.original":
                                   torch.tensor(learned, dtype=torch.float64)}}, tmp_path / "qat.pt")
    return tmp_path


def test_a_saturated_channel_is_dead_only_when_no_input_can_lift_it_over_the_clip(tmp_path):
    import onnxruntime as ort

    weight = np.zeros((4, 2, 3, 3), np.float32)
    weight[1, 0, 0, 0] = 0.5  # channel 1 can reach 0.5 * 2.55 = 1.275 above its bias
    weight[3, 0] = 0.5  # channel 3: 9 such weights, 11.475
    limit = 2**31 - 1
    bias_q = np.array([-limit, -limit, -limit, -limit])  # all clamped at -limit * 1e-9 = -2.147
    run = _conv_clip_run(tmp_path, weight, bias_q, 1e-9, [-3.0, -3.0, 0.5, -3.0])
    [hit] = bs.saturated_biases(run)
    assert hit["channels"] == [0, 1, 2, 3] and hit["floor"] == 0.0
    np.testing.assert_allclose(hit["bound_exported"], [-2.147, -2.147 + 1.275, -2.147, -2.147 + 11.475], atol=1e-3)
    # 0: no weight, negative under both biases; 1: its weight cannot lift it; 2: the learned bias is positive;
    # 3: its weights can lift it over the floor
    assert hit["dead"] == [True, True, False, False]
    # the bound is a real bound: no input in the quantized range lifts a dead channel's Clip output off 0
    sess = ort.InferenceSession(str(run / "model.onnx"))
    x = np.random.default_rng(0).uniform(0, 2.55, (64, 1, 2, 4, 4)).astype(np.float32)
    out = np.stack([sess.run(None, {"x": xi})[0] for xi in x])
    assert out[:, :, :2].max() == 0.0 and out[:, :, 3].max() > 0.0


def test_a_layer_without_a_clip_after_it_is_never_called_dead(tmp_path):
    run = _conv_clip_run(tmp_path, np.zeros((1, 2, 3, 3), np.float32), np.array([-(2**31 - 1)]), 1e-9, [-3.0])
    model = onnx.load(run / "model.onnx")
    model.graph.node[-1].op_type = "Sigmoid"  # the reader is no longer a floor
    del model.graph.node[-1].input[1:]
    onnx.save(model, run / "model.onnx")
    [hit] = bs.saturated_biases(run)
    assert hit["floor"] is None and hit["dead"] == [False]
