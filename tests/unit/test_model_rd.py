"""Reverse Distillation: decoder sized from any encoder's channel list, ConvTranspose in ONNX, bad geometry."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from qtool.errors import ModelError
from qtool.export import export_onnx
from qtool.models import build_model
from qtool.models.reverse_distillation import RdStudent
from qtool.recipe import ModelConfig


def _rd(backbone: str, size: int = 64, **options) -> torch.nn.Module:
    return build_model(ModelConfig(name="rd", backbone=backbone, weights="none", options=options), size).eval()


@pytest.mark.parametrize(("backbone", "channels"), [("tf_efficientnet_lite0", [24, 40, 112]),
                                                   ("resnet18", [64, 128, 256])])
def test_decoder_reconstructs_every_teacher_level(backbone: str, channels: list[int]) -> None:
    model = _rd(backbone)
    with torch.no_grad():
        feats = model.teacher(torch.randn(2, 3, 64, 64))
        embed = model.student.ocbe(feats)
        recon = model.student(feats)
    assert [f.shape[1] for f in feats] == channels
    assert embed.shape == (2, 2 * channels[-1], 2, 2)  # default embedding: 2*c_last at half the deepest grid
    assert [r.shape for r in recon] == [f.shape for f in feats]


def test_wide_resnet_channel_list() -> None:
    channels = [256, 512, 1024]
    student = RdStudent(channels, 2 * channels[-1], blocks=1).eval()
    feats = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)]
    with torch.no_grad():
        assert student.ocbe(feats).shape == (1, 2048, 2, 2)
        assert [r.shape for r in student(feats)] == [f.shape for f in feats]


def test_onnx_has_conv_transpose_in_student(tmp_path: Path) -> None:
    model = _rd("resnet18", embed_channels=32)
    graph = onnx.load(str(export_onnx(model, tmp_path / "rd.onnx", 64))).graph
    deconv = [n.name for n in graph.node if n.op_type == "ConvTranspose"]
    assert len(deconv) == 6  # main path + shortcut of one upsampling block per level
    assert all(n.startswith("/student/decoder/") for n in deconv)
    # the legacy exporter folds BN into Conv but not into ConvTranspose: these are left to qtool.graph.prepare
    bns = [n.name for n in graph.node if n.op_type == "BatchNormalization"]
    assert all(n.startswith("/student/decoder/ups.") for n in bns)


def test_embed_stride_1_keeps_the_deepest_grid_and_drops_every_conv_transpose(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    model = _rd("tf_efficientnet_lite0", size=32, embed_stride=1, map_levels=[3], map_sigma=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.teacher(x)
        embed = model.student.ocbe(feats)
        recon = model.student(feats)
        amap, _ = model(x)
    assert embed.shape == (2, 224, 2, 2) == (2, 2 * feats[2].shape[1], *feats[2].shape[2:])  # stride 16 at 32 px
    assert [r.shape for r in recon] == [f.shape for f in feats]
    path = export_onnx(model, tmp_path / "rd.onnx", 32)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "ConvTranspose" not in ops  # the deepest block does not upsample; the shallower ones are pruned
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x[:1].numpy()})[0]
    assert np.allclose(got, amap[:1].numpy(), atol=1e-5)
    full = [n.op_type for n in onnx.load(str(export_onnx(_rd("resnet18", size=48, embed_stride=1),
                                                        tmp_path / "full.onnx", 48))).graph.node]
    assert full.count("ConvTranspose") == 4  # all levels mapped: the two shallower blocks still upsample


@pytest.mark.parametrize("bad", [0, 3, True, "2"])
def test_bad_embed_stride_is_a_model_error(bad) -> None:
    with pytest.raises(ModelError, match="embed_stride"):
        _rd("resnet18", embed_stride=bad)


def test_up_block_initialises_body_before_shortcut() -> None:
    """Seeded weights follow the construction order; the body's layers come first (every release's order)."""
    from torch import nn

    from qtool.models.reverse_distillation import UpBlock

    torch.manual_seed(0)
    block = UpBlock(8, 4)
    torch.manual_seed(0)
    body_t = nn.ConvTranspose2d(8, 4, 2, 2, bias=False)
    nn.BatchNorm2d(4)
    body_conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    shortcut_t = nn.ConvTranspose2d(8, 4, 2, 2, bias=False)
    convs = [m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [type(m) for m in convs] == [nn.ConvTranspose2d, nn.Conv2d, nn.ConvTranspose2d]
    for got, want in zip(convs, (body_t, body_conv, shortcut_t)):
        assert torch.equal(got.weight, want.weight)


def test_loss_is_per_position_cosine_distance() -> None:
    model = _rd("resnet18", embed_channels=32).train()
    x = torch.randn(2, 3, 64, 64)
    terms = model.training_loss(x)
    assert set(terms) == {"cos0", "cos1", "cos2", "loss"}
    assert torch.isclose(terms["loss"], terms["cos0"] + terms["cos1"] + terms["cos2"])
    assert all(0.0 <= float(terms[k].detach()) <= 2.0 for k in ("cos0", "cos1", "cos2"))


def test_bad_geometry_and_options_are_model_errors() -> None:
    with pytest.raises(ModelError, match="divisible by 32"):
        _rd("resnet18", size=48)
    with pytest.raises(ModelError, match="unknown rd option 'nope'"):
        _rd("resnet18", nope=1)
    with pytest.raises(ModelError, match="must be >= 1"):
        _rd("resnet18", ocbe_blocks=0)


def test_student_traces_with_torch_fx_on_its_own() -> None:
    model = _rd("resnet18", embed_channels=32)
    gm = torch.fx.symbolic_trace(model.student)  # QAT traces each part separately; the input is a list
    with torch.no_grad():
        feats = model.teacher(torch.randn(1, 3, 64, 64))
        assert all(torch.equal(a, b) for a, b in zip(gm(feats), model.student(feats)))


@pytest.mark.parametrize("target", ["cpu", "cpu-avx2", "tensorrt"])
def test_decoder_upsampling_policy_per_target(tmp_path: Path, target: str) -> None:
    """ONNX Runtime CPU has no integer ConvTranspose: the cpu profiles keep it float (saying why) and every
    Conv of the quantized student still runs as an integer kernel; TensorRT (int8 deconvolution) quantizes it."""
    import numpy as np
    from helpers.ort_utils import minmax_ranges, optimized_ops

    from qtool.graph import build_spec, insert_qdq, prepare
    from qtool.recipe import PtqConfig

    graph = prepare(onnx.load(str(export_onnx(_rd("resnet18", embed_channels=32), tmp_path / "rd.onnx", 64))))
    spec = build_spec(graph, PtqConfig(quantize="student", target=target))
    deconv = [d for d in spec.decisions if d.op_type == "ConvTranspose"]
    assert len(deconv) == 6
    if target == "tensorrt":
        assert all(d.quantized for d in deconv)
        return
    assert all(not d.quantized and "no integer kernel in ONNX Runtime CPU" in d.reason for d in deconv)
    feeds = [{"image": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}]
    student_convs = [n.name for n in graph.graph.node if n.op_type == "Conv" and n.name.startswith("/student/")]
    for head_inputs in ("quantized", "float"):
        spec = build_spec(graph, PtqConfig(quantize="student", target=target, head_inputs=head_inputs))
        ranges = minmax_ranges(graph, spec.tensors_to_calibrate(), feeds)
        (tmp_path / head_inputs).mkdir()
        ops = optimized_ops(insert_qdq(graph, spec, ranges), tmp_path / head_inputs)
        integer = {name for op, name in ops if op == "QLinearConv" and name.startswith("/student/")}
        flt = {name for op, name in ops if op in ("Conv", "FusedConv") and name.startswith("/student/")}
        # the output convs that only the head reads run in float when it reads them unrounded
        head_only = {d.node for d in spec.decisions if "ptq.head_inputs=float" in d.reason}
        assert head_only == (set() if head_inputs == "quantized" else {c for c in student_convs if "/outs." in c})
        assert flt == head_only and integer == set(student_convs) - head_only


def test_map_blur_matches_scipy_gaussian_and_smooths_the_score() -> None:
    """Oracle: scipy.ndimage.gaussian_filter (mirror edges = torch reflect, truncate 4) of the unblurred map."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    blurred, plain = _rd("resnet18"), _rd("resnet18", map_sigma=0)
    plain.load_state_dict(blurred.state_dict())  # no weights of its own: the same state dict fits both
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        m_plain, _ = plain(x)
        m_blur, s_blur = blurred(x)
    want = np.stack([gaussian_filter(m.numpy()[0].astype(np.float64), 4.0, mode="mirror", truncate=4.0)
                     for m in m_plain])
    assert np.allclose(m_blur[:, 0].numpy(), want, atol=1e-5)
    assert torch.allclose(s_blur, m_blur.flatten(1).amax(1))
    assert blurred.head.blur.sigma == 4.0 and plain.head.blur is None


def test_map_blur_exports_as_float_head_convs(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    model = _rd("resnet18", embed_channels=32)
    path = export_onnx(model, tmp_path / "rd.onnx", 64)
    graph = onnx.load(str(path)).graph
    assert [n.name for n in graph.node if n.op_type == "Conv" and n.name.startswith("/head/")] == [
        "/head/blur/Conv", "/head/blur/Conv_1"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)[0].numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bad", [-1.0, "4", float("nan"), True])
def test_bad_map_sigma_is_a_model_error(bad) -> None:
    with pytest.raises(ModelError, match="rd option map_sigma="):
        _rd("resnet18", map_sigma=bad)


def test_flat_loss_is_the_original_per_sample_cosine_and_differs_from_the_per_position_one() -> None:
    from qtool.models.reverse_distillation import RD_LOSSES

    t = torch.randn(2, 4, 3, 3)
    s = t.clone()
    s[:, :, 0, 0] *= -1  # one position flipped: 1 of 9 positions wrong, a small share of the flattened vector
    flat = RD_LOSSES.get("flat")(t, s)
    position = RD_LOSSES.get("position")(t, s)
    expected = torch.stack([1 - torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()) for a, b in zip(t, s)])
    torch.testing.assert_close(flat, expected.mean())
    torch.testing.assert_close(position, torch.tensor(2.0 / 9))  # distance 2 at one position of nine
    assert RD_LOSSES.get("flat")(t, t) < 1e-6


def test_loss_option_drives_training_loss_and_bad_name_is_a_model_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    flat = _rd("resnet18", embed_channels=32, loss="flat")
    torch.manual_seed(1)
    position = _rd("resnet18", embed_channels=32)
    terms_flat, terms_pos = flat.training_loss(x), position.training_loss(x)
    assert set(terms_flat) == {"cos0", "cos1", "cos2", "loss"}
    assert not torch.isclose(terms_flat["loss"], terms_pos["loss"])
    with pytest.raises(ModelError, match="rd option loss: unknown rd loss 'global'; available: flat, position"):
        _rd("resnet18", loss="global")
