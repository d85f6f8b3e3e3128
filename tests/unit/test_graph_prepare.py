"""Loading/saving, prepare (static shapes, names kept through onnxslim, BN fold), probes and float16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers.ort_utils import run
from helpers.tiny_models import SIZE, calib_batches, export_tiny, tiny_model
from onnx import TensorProto, helper
from torch import nn

from qtool.errors import GraphError
from qtool.graph import add_outputs, load_model, prepare, save_model, to_fp16


def test_load_save_roundtrip(tmp_path):
    m = load_model(export_tiny(tmp_path / "t.onnx"))
    out = save_model(m, tmp_path / "sub" / "copy.onnx")
    assert load_model(out).graph.node[0].name == m.graph.node[0].name
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["copy.onnx"]  # no temporary left behind


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("truncated", "is not a valid ONNX model: "),
        (b"\x0a\xff\xff\xff\xff\x0fnot an onnx model at all", "is not a valid ONNX model: "),
        (b"hello, plain text", "is not a valid ONNX model: "),
    ],
)
def test_load_rejects_bad_bytes(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        data = export_tiny(tmp_path / "t.onnx").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(GraphError, match=message) as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_missing_and_checker_failure(tmp_path):
    with pytest.raises(GraphError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    g = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="n")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    bad = tmp_path / "checker.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    with pytest.raises(GraphError, match="checker: .*NoSuchOp"):
        load_model(bad)


def test_prepare_keeps_names_and_folds_constants(tmp_path):
    m = tiny_model(tmp_path)
    p = prepare(m)
    before = {n.name for n in m.graph.node if n.op_type != "Constant"}
    after = {n.name for n in p.graph.node}
    assert after <= before, f"new names: {after - before}"
    assert {n.name for n in m.graph.node if n.op_type in ("Conv", "Relu", "Add", "MaxPool", "Resize")} <= after
    assert not any(n.op_type == "Constant" for n in p.graph.node)
    assert {v.name for v in p.graph.value_info} >= {"/student/Add_output_0"}
    feeds = calib_batches(1)
    np.testing.assert_allclose(run(m, feeds)[0][0], run(p, feeds)[0][0], atol=1e-6)


def test_dynamic_batch_needs_a_shape(tmp_path):
    m = tiny_model(tmp_path, dynamic=True)
    with pytest.raises(
        GraphError, match="input 'input' has dynamic dim 'batch'; give a calibration shape with --input-shape"
    ):
        prepare(m)
    with pytest.raises(GraphError, match="unknown input 'x'"):
        prepare(m, {"x": [1, 3, SIZE, SIZE]})
    with pytest.raises(GraphError, match="dim 1 is 3"):
        prepare(m, {"input": [2, 4, SIZE, SIZE]})
    p = prepare(m, {"input": [2, 3, SIZE, SIZE]})
    assert [d.dim_value for d in p.graph.input[0].type.tensor_type.shape.dim] == [2, 3, SIZE, SIZE]
    assert run(p, calib_batches(1, batch=2))[0][0].shape == (2, 1, SIZE, SIZE)


def test_batchnorm_is_folded_into_conv(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
    ).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    path = tmp_path / "bn.onnx"
    # a foreign export that keeps BatchNormalization (no eval-mode folding, weights behind Identity)
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["out"],
    )
    m = load_model(path)
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 2
    p = prepare(m)
    assert [n.op_type for n in p.graph.node] == ["Conv", "Relu", "Conv"]
    assert {n.name for n in p.graph.node if n.op_type == "Conv"} <= {n.name for n in m.graph.node}
    x = [{"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}]
    np.testing.assert_allclose(run(p, x)[0][0], run(m, x)[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_batchnorm_is_folded_into_conv_transpose(tmp_path, groups):
    """ConvTranspose weights are (C_in, C_out / groups, k...): the fold scales axis 1 within each group."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, 2, groups=groups, bias=groups == 2), nn.BatchNorm2d(6),
                        nn.ReLU()).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net[1].weight.data.uniform_(0.2, 2.0)
    net[1].bias.data.uniform_(-0.5, 0.5)
    path = tmp_path / "bnt.onnx"
    torch.onnx.export(net, (torch.randn(1, 4, 5, 5),), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["out"])
    m = load_model(path)
    assert [n.op_type for n in m.graph.node if n.op_type != "Identity"] == ["ConvTranspose", "BatchNormalization",
                                                                            "Relu"]
    p = prepare(m)
    assert [n.op_type for n in p.graph.node] == ["ConvTranspose", "Relu"]
    x = [{"input": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)}]
    np.testing.assert_allclose(run(p, x)[0][0], run(m, x)[0][0], rtol=1e-5, atol=1e-5)


def test_add_outputs_exposes_intermediates(tmp_path):
    m = prepare(tiny_model(tmp_path))
    probe = add_outputs(m, ["input", "/student/Add_output_0", "score"])
    names = [o.name for o in probe.graph.output]
    assert names == ["anomaly_map", "score", "input", "/student/Add_output_0"]
    assert len(m.graph.output) == 2  # the original is untouched
    with pytest.raises(GraphError, match="'nope' is not in the graph"):
        add_outputs(m, ["nope"])


def test_fp16_runs_and_matches_fp32(tmp_path):
    m = prepare(tiny_model(tmp_path))
    h = to_fp16(m)
    assert h.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in h.graph.initializer)
    feeds = calib_batches(2)
    for a, b in zip(run(m, feeds), run(h, feeds), strict=True):
        assert b[0].dtype == np.float32
        np.testing.assert_allclose(b[0], a[0], atol=5e-3)
        np.testing.assert_allclose(b[1], a[1], atol=5e-3)


def _pad_conv_graph(pad_value: float, pads: list[int], second_user: str = "Conv") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [2, 3, 1, 1], rng.standard_normal(6).astype(np.float32))
    p = helper.make_tensor("pads", TensorProto.INT64, [8], pads)
    v = helper.make_tensor("v", TensorProto.FLOAT, [], [pad_value])
    user = (helper.make_node("Conv", ["xp", "w2"], ["z"], name="conv2") if second_user == "Conv"
            else helper.make_node("Relu", ["xp"], ["z"], name="relu"))
    nodes = [helper.make_node("Pad", ["x", "pads", "v"], ["xp"], name="pad", mode="constant"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv", strides=[2, 2], pads=[1, 0, 1, 0]), user]
    zshape = [1, 2, 10, 9] if second_user == "Conv" else [1, 3, 10, 9]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, zshape)], [w, w2, p, v])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_zero_pad_fuses_into_every_conv_it_feeds(tmp_path):
    from qtool.graph import fuse_pad_into_conv

    model = _pad_conv_graph(0.0, [0, 0, 0, 1, 0, 0, 2, 0])  # TF "same": bottom 2, left 1
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = run(model, [{"x": x}])[0]
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_pad_into_conv(fused) == 1
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Conv"]
    pads = {n.name: list(helper.get_attribute_value(a) for a in n.attribute if a.name == "pads")[0]
            for n in fused.graph.node}
    assert pads == {"conv": [1, 1, 3, 0], "conv2": [0, 1, 2, 0]}
    for a, b in zip(ref, run(fused, [{"x": x}])[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("value", "pads", "user"), [
    (1.0, [0, 0, 0, 1, 0, 0, 2, 0], "Conv"),   # non-zero fill
    (0.0, [0, 1, 0, 0, 0, 0, 0, 0], "Conv"),   # pads the channel dim
    (0.0, [0, 0, 0, 1, 0, 0, 2, 0], "Relu"),   # a consumer that is not a Conv
])
def test_pad_that_cannot_fuse_stays(value, pads, user):
    from qtool.graph import fuse_pad_into_conv

    model = _pad_conv_graph(value, pads, user)
    assert fuse_pad_into_conv(model) == 0
    assert "Pad" in [n.op_type for n in model.graph.node]
