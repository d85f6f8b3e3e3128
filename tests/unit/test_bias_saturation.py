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
