"""Backbones (weights mapping, errors, truncation), STFPM, DCAM losses and export, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qtool.errors import ModelError, RegistryError
from qtool.export import export_onnx
from qtool.models import BACKBONES, build_backbone, build_model, load_checkpoint, save_checkpoint
from qtool.models.backbones import load_classifier
from qtool.models.dcam import channel_cosine, spatial_kl
from qtool.recipe import DcamConfig, ModelConfig, Recipe, TrainConfig
from qtool.train import OPTIMIZERS

SIZE = 64


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------- backbones


def _imagenet_batch(img: np.ndarray) -> torch.Tensor:
    from PIL import Image

    arr = np.asarray(Image.fromarray(img).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    x = arr.astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


def test_lite0_imagenet_weights_classify_real_photos():
    """The in-order key mapping of the shipped weights is right only if real photos are recognised."""
    skdata = pytest.importorskip("skimage.data")
    import timm

    model = load_classifier("tf_efficientnet_lite0")
    names = timm.data.ImageNetInfo()
    with torch.no_grad():
        cat = int(model(_imagenet_batch(skdata.chelsea())).argmax())
        coffee = int(model(_imagenet_batch(skdata.coffee())).argmax())
    assert names.index_to_description(cat) in {"Egyptian cat", "tabby, tabby cat", "tiger cat"}
    assert names.index_to_description(coffee) == "espresso"


def test_resnet18_has_no_offline_imagenet_weights():
    with pytest.raises(ModelError, match=r"model\.weights"):
        build_backbone("resnet18", [1, 2], "imagenet")


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nope" / "r18.pth"
    with pytest.raises(ModelError, match=str(path)):
        build_backbone("resnet18", [1, 2], str(path))


def test_weights_file_that_is_not_a_torch_file_is_one_line(tmp_path):
    text = tmp_path / "r18.pth"
    text.write_text("not weights")
    with pytest.raises(ModelError, match=r"^backbone 'resnet18' weights file .*r18\.pth cannot be read: not a torch "
                                         r"file, or it holds objects other than tensors") as e:
        build_backbone("resnet18", [1, 2], str(text))
    assert "\n" not in str(e.value)
    pickled = tmp_path / "obj.pth"  # a pickled arbitrary object is refused too (weights_only=True)
    torch.save({"conv1.weight": Path("/etc/passwd")}, pickled)
    with pytest.raises(ModelError, match="cannot be read: not a torch file, or it holds objects"):
        build_backbone("resnet18", [1, 2], str(pickled))


def _resnet18_keys() -> list[str]:
    import timm

    return list(timm.create_model("resnet18", pretrained=False).state_dict())


def test_weights_file_with_other_keys_is_refused(tmp_path):
    path = tmp_path / "renamed.pth"
    torch.save({f"module.{k}": torch.zeros(1) for k in _resnet18_keys()}, path)
    with pytest.raises(ModelError, match="lack"):
        build_backbone("resnet18", [1, 2], str(path))


def test_lite0_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({k: torch.zeros(1) for k in _resnet18_keys()}, path)
    with pytest.raises(ModelError, match="does not match"):
        build_backbone("tf_efficientnet_lite0", [1, 2], str(path))


def test_weights_file_with_wrong_shapes_is_a_model_error(tmp_path):
    path = tmp_path / "shapes.pth"
    torch.save({k: torch.zeros(1) for k in _resnet18_keys()}, path)  # right keys, wrong shapes
    with pytest.raises(ModelError, match=str(path)):
        build_backbone("resnet18", [1, 2], str(path))


def test_classifier_weights_with_other_keys_is_a_model_error(tmp_path):
    path = tmp_path / "renamed.pth"
    torch.save({f"module.{k}": torch.zeros(1) for k in _resnet18_keys()}, path)
    with pytest.raises(ModelError):
        load_classifier("resnet18", str(path))


def test_unknown_backbone_lists_the_registered_ones():
    with pytest.raises(RegistryError) as e:
        build_backbone("vgg16", [1, 2], "none")
    for name in BACKBONES.names():
        assert name in str(e.value)
    assert "vgg16" in str(e.value)


def test_backbone_computes_only_the_levels_used():
    full = build_backbone("tf_efficientnet_lite0", [1, 2, 3], "none")
    assert len(full.body.blocks) == 5, "blocks beyond index 4 (stride 16) should be dropped"
    n_params = sum(p.numel() for p in full.parameters())
    assert n_params < 1_000_000, n_params
    feats = full(torch.zeros(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in feats] == full.channels == [24, 40, 112]
    assert [f.shape[-1] for f in feats] == [SIZE // 4, SIZE // 8, SIZE // 16]
    two = build_backbone("tf_efficientnet_lite0", [1, 2], "none")
    assert len(two.body.blocks) == 3
    assert sum(p.numel() for p in two.parameters()) < n_params


# ---------------------------------------------------------------- STFPM


@pytest.fixture(scope="module")
def stfpm():
    torch.manual_seed(0)
    return build_model(ModelConfig(levels=[1, 2]), SIZE)


def test_stfpm_map_shape_and_score_is_map_max(stfpm):
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        amap, score = stfpm.eval()(x)
    assert amap.shape == (3, 1, SIZE, SIZE)
    assert score.shape == (3,)
    torch.testing.assert_close(score, amap.flatten(1).max(1).values, rtol=0, atol=0)
    assert torch.isfinite(amap).all() and (amap >= 0).all()


def test_stfpm_parts_and_trainable_parameters(stfpm):
    names = {n.split(".")[0] for n, _ in stfpm.named_children()}
    assert {"teacher", "student", "head"} <= names
    trainable = {id(p) for p in stfpm.trainable_parameters()}
    assert trainable, "nothing to train"
    assert all(id(p) not in trainable and not p.requires_grad for p in stfpm.teacher.parameters())
    assert all(id(p) in trainable for p in stfpm.student.parameters())
    stfpm.train()
    assert not stfpm.teacher.training, "the frozen teacher must stay in eval mode (BatchNorm statistics)"


def test_training_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(levels=[1, 2]), SIZE)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = OPTIMIZERS.get("sgd")(list(model.trainable_parameters()), TrainConfig(lr=0.4))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    model.train()
    losses = []
    for _ in range(10):
        terms = model.training_loss(x)
        assert set(terms) == {"stfpm", "loss"}
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher tensor {k} changed during training"


def test_dcam_adds_kl_and_cos_terms_and_stays_out_of_the_onnx(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(levels=[1, 2], dcam=DcamConfig(enabled=True, kl_weight=0.5)), SIZE)
    assert any(k.startswith("dcam.") for k in model.state_dict())
    terms = model.training_loss(torch.randn(2, 3, SIZE, SIZE))
    assert set(terms) == {"stfpm", "kl", "cos", "loss"}
    assert terms["kl"] > 0 and terms["cos"] > 0
    torch.testing.assert_close(terms["loss"], terms["stfpm"] + terms["kl"] + terms["cos"])
    path = export_onnx(model, tmp_path / "dcam.onnx", SIZE)
    graph = onnx.load(str(path)).graph
    dcam_nodes = [n.name for n in graph.node if "dcam" in n.name.lower()]
    dcam_weights = [t.name for t in graph.initializer if "dcam" in t.name.lower()]
    assert not dcam_nodes and not dcam_weights, (dcam_nodes[:3], dcam_weights[:3])
    stray = [n.name for n in graph.node
             if not n.name.startswith(("/teacher/", "/student/", "/head/")) and n.op_type != "Constant"]
    assert not stray, f"nodes outside teacher/student/head: {stray[:5]}"
    assert any(n.name.startswith("/head/") for n in graph.node)


def test_dcam_weights_scale_their_terms():
    torch.manual_seed(0)
    cfg = ModelConfig(levels=[1, 2], dcam=DcamConfig(enabled=True, kl_weight=0.0, cos_weight=2.0))
    model = build_model(cfg, SIZE)
    terms = model.training_loss(torch.randn(1, 3, SIZE, SIZE))
    assert float(terms["kl"].detach()) == 0.0
    assert float(terms["cos"].detach()) > 0


def test_spatial_kl_hand_computed():
    t = torch.randn(2, 3, 4, 4)
    assert float(spatial_kl(t, t.clone(), 1.0)) == pytest.approx(0.0, abs=1e-6)
    # one channel, two positions: teacher uniform (1/2, 1/2); student logits (0, ln 3)
    teacher = torch.zeros(1, 1, 1, 2)
    student = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(spatial_kl(teacher, student, 1.0)) == pytest.approx(expected, rel=1e-5)
    # temperature 2: student distribution (1, sqrt 3) / (1 + sqrt 3), result scaled by T^2 = 4
    q0, q1 = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    expected_t2 = 4 * (0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1))
    assert float(spatial_kl(teacher, student, 2.0)) == pytest.approx(expected_t2, rel=1e-5)
    # KL(teacher || student) is not symmetric: swapping the arguments changes the value
    assert float(spatial_kl(student, teacher, 1.0)) != pytest.approx(expected, rel=1e-3)


def test_channel_cosine_hand_computed():
    t = torch.randn(2, 3, 4, 4)
    assert float(channel_cosine(t, 3.0 * t)) == pytest.approx(0.0, abs=1e-6)
    assert float(channel_cosine(t, -t)) == pytest.approx(2.0, abs=1e-6)
    # channel 0 identical (0), channel 1 orthogonal (1): mean 0.5
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    assert float(channel_cosine(teacher, student)) == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- checkpoints


def _recipe(**model) -> Recipe:
    return Recipe.model_validate({"data": {"image_size": SIZE}, "model": {"levels": [1, 2], **model}})


def test_checkpoint_round_trip_gives_equal_outputs(tmp_path, stfpm):
    recipe = _recipe()
    with torch.no_grad():
        for p in stfpm.student.parameters():  # differ from any fresh init
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(stfpm, tmp_path / "m.pt", recipe, {"epoch": 3})
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, sa = stfpm.eval()(x)
        b, sb = loaded(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sa, sb, rtol=0, atol=0)
    assert meta["extra"]["epoch"] == 3
    assert meta["image_size"] == SIZE
    assert meta["data_config"].image_size == SIZE
    assert not loaded.training
    assert [f.name for f in tmp_path.iterdir()] == ["m.pt"], "temporary files left beside the checkpoint"


class _Payload:
    """Unpickling this runs code: it must never happen when loading a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> None:
    Path(path).write_text("pwned")


def test_checkpoint_with_arbitrary_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"format": "qtool-checkpoint", "version": 1, "obj": _Payload(str(marker))}, path)
    with pytest.raises(ModelError, match=str(path)):
        load_checkpoint(path)
    assert not marker.exists(), "loading a checkpoint executed pickled code (weights_only not used)"


@pytest.mark.parametrize("content", ["dict", "bytes", "missing"])
def test_non_checkpoint_files_are_refused(tmp_path, content):
    path = tmp_path / "x.pt"
    if content == "dict":
        torch.save({"state_dict": {}}, path)
    elif content == "bytes":
        path.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ModelError, match=str(path)):
        load_checkpoint(path)


def test_checkpoint_version_mismatch(tmp_path, stfpm):
    path = save_checkpoint(stfpm, tmp_path / "m.pt", _recipe())
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(ModelError, match="version 99"):
        load_checkpoint(path)


def test_checkpoint_config_mismatch_names_the_key(tmp_path, stfpm):
    path = save_checkpoint(stfpm, tmp_path / "m.pt", _recipe())
    with pytest.raises(ModelError, match=r"model\.levels"):
        load_checkpoint(path, expect=ModelConfig(levels=[1, 2, 3]))
    with pytest.raises(ModelError, match=r"model\.backbone"):
        load_checkpoint(path, expect=ModelConfig(levels=[1, 2], backbone="resnet18"))
    model, _ = load_checkpoint(path, expect=ModelConfig(levels=[1, 2]))  # same config loads
    assert isinstance(model, torch.nn.Module)


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path, stfpm):
    path = save_checkpoint(stfpm, tmp_path / "m.pt", _recipe())
    payload = torch.load(path, weights_only=True)
    payload["model"]["levels"] = [1, 2, 3]  # the stored weights are for [1, 2]
    torch.save(payload, path)
    with pytest.raises(ModelError, match="do not fit"):
        load_checkpoint(path)
