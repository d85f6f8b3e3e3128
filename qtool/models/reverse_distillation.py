"""Reverse Distillation (Deng & Li 2022): frozen encoder, one-class bottleneck (OCBE), decoder student.

Sized from the encoder's channel list (EfficientNet-Lite0 [24,40,112], ResNet-18 [64,128,256],
WideResNet-50-2 [256,512,1024]); the levels must double in stride (4, 8, 16 for levels 1..3).
- OCBE (multi-scale fusion): each shallower level goes through strided 3x3 conv + BN + ReLU steps
  (channels c_i -> c_{i+1} -> ... -> c_last, as the original 256->512->1024) to the deepest level's
  resolution; the levels are concatenated (3*c_last) and ``ocbe_blocks`` (default 1) bottleneck
  residual blocks, the first with stride ``embed_stride`` (2, the original; or 1), give the compact
  embedding (``embed_channels``, default 2*c_last, the original's 2048 for WRN-50 and 512 for
  ResNet-18). With ``embed_stride: 1`` the embedding keeps the deepest level's resolution (16 x 16
  instead of 8 x 8 at 256 px, stride 16), for a finer map of the deepest level.
- Decoder (the student's second half), deepest level first: per level one upsampling residual block
  (ConvTranspose2d k2 s2 + BN + ReLU + 3x3 conv + BN, shortcut ConvTranspose2d k2 s2 + BN, ReLU)
  then a linear 1x1 conv to the teacher level's channels. With ``embed_stride: 1`` the deepest
  level's block does not upsample (3x3 conv in place of the ConvTranspose2d, 1x1 conv shortcut), so
  a map of the deepest level only has no ConvTranspose2d left in the graph. The linear output is
  our change: teachers such as EfficientNet-Lite0 emit signed features that a ReLU output could not
  match in direction.
- Loss (option ``loss``, registry ``RD_LOSSES``), summed over levels: ``position`` (default), 1 -
  cosine similarity over channels at every position, averaged over positions and batch, the form the
  anomaly map uses, so training and scoring agree; ``flat``, the original's one cosine of each
  sample's flattened (C*h*w) vectors, averaged over the batch. It only asks the decoder to match the
  whole level's direction, so positions where the teacher's features are small weigh less.
- Map: per level 1 - cosine over channels, bilinearly upsampled to the input size, summed over
  levels (the original), smoothed with the original's evaluation-time Gaussian blur (option
  ``map_sigma``, default 4; 0 turns it off); score = maximum of the smoothed map. Option
  ``map_levels`` (entries of ``model.levels``) restricts the map to some levels; training still
  reconstructs all of them. On MTD the unweighted sum is dominated by the shallowest level (its
  normal-data distances are ~3x the deepest's) although it separates worst; ``recipes/mtd_rd.yaml``
  maps the deepest level only (bench/results/mtd_map_levels.md). Option ``map_combine`` (``COMBINERS``
  name, default ``sum``) joins the mapped levels otherwise, e.g. ``product`` as STFPM.
The trainable OCBE and decoder both live in ``student`` so "student" is every trainable inference part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import ModelError, RegistryError
from qtool.models.backbones import build_backbone
from qtool.models.base import MODELS, KDModel, check_options, freeze
from qtool.models.head import AnomalyMapHead, cosine_distance, map_combine, map_levels, map_sigma
from qtool.recipe import ModelConfig
from qtool.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RD_LOSSES: Registry[LossFn] = Registry("rd loss")


@RD_LOSSES.register("position")
def position_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions of 1 - channel cosine (the map's distance)."""
    return cosine_distance(t, s).mean()


@RD_LOSSES.register("flat")
def flat_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cosine of the flattened per-sample features (the original RD loss)."""
    return (1.0 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    """ResNet bottleneck residual block (1x1, 3x3 with ``stride``, 1x1), projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(1, cout // 4)
        self.body = nn.Sequential(*_conv_bn(cin, mid, 1), nn.ReLU(), *_conv_bn(mid, mid, 3, stride), nn.ReLU(),
                                  *_conv_bn(mid, cout, 1))
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout
                         else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum, then ReLU."""
        return self.relu(self.body(x) + self.shortcut(x))


class Ocbe(nn.Module):
    """One-class bottleneck embedding: multi-scale feature fusion + residual block(s) with stride 2."""

    def __init__(self, channels: list[int], embed: int, blocks: int = 1, stride: int = 2) -> None:
        super().__init__()
        last = len(channels) - 1
        self.down = nn.ModuleList()
        for i in range(last):
            steps: list[nn.Module] = []
            for j in range(i, last):
                steps += [*_conv_bn(channels[j], channels[j + 1], 3, 2), nn.ReLU()]
            self.down.append(nn.Sequential(*steps))
        fused = channels[-1] * len(channels)
        self.blocks = nn.Sequential(Bottleneck(fused, embed, stride),
                                    *(Bottleneck(embed, embed) for _ in range(blocks - 1)))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features (shallow to deep) -> embedding at the deepest resolution over ``stride``."""
        n = len(self.down)  # index, never iterate, ``feats``: torch.fx traces the student on its own (QAT)
        fused = torch.cat([self.down[i](feats[i]) for i in range(n)] + [feats[n]], dim=1)
        return self.blocks(fused)


class UpBlock(nn.Module):
    """Upsampling residual block: ConvTranspose2d(k2, s2) main path and shortcut, BN, ReLU.

    ``scale`` 1: the same block at the same resolution (3x3 conv main path, 1x1 conv shortcut).
    """

    def __init__(self, cin: int, cout: int, scale: int = 2) -> None:
        super().__init__()
        def first(kernel: int) -> list[nn.Module]:  # the resolution step: ConvTranspose k2 s2, or a same-size conv
            if scale == 2:
                return [nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout)]
            return _conv_bn(cin, cout, kernel)

        # body first, then shortcut: the order of seeded initialisation before embed_stride, so a recipe
        # and seed keep giving the same weights
        self.body = nn.Sequential(*first(3), nn.ReLU(), *_conv_bn(cout, cout, 3))
        self.shortcut = nn.Sequential(*first(1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Double the resolution (``scale`` 2) or keep it (1)."""
        return self.relu(self.body(x) + self.shortcut(x))


class Decoder(nn.Module):
    """Reverse of the encoder: one upsampling block per level (deep to shallow) and a linear 1x1 output.

    ``first_scale``: the deepest block's upsampling (2, or 1 for an embedding at that level's resolution).
    """

    def __init__(self, channels: list[int], embed: int, first_scale: int = 2) -> None:
        super().__init__()
        ups, outs, cin = [], [], embed
        for i, c in enumerate(reversed(channels)):
            ups.append(UpBlock(cin, c, first_scale if i == 0 else 2))
            outs.append(nn.Conv2d(c, c, 1))
            cin = c
        self.ups = nn.ModuleList(ups)
        self.outs = nn.ModuleList(outs)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Embedding -> reconstructed encoder features, shallow to deep (the teacher's order)."""
        feats = []
        for up, out in zip(self.ups, self.outs):
            z = up(z)
            feats.append(out(z))
        return feats[::-1]


class RdStudent(nn.Module):
    """The trainable inference part: OCBE then decoder."""

    def __init__(self, channels: list[int], embed: int, blocks: int, stride: int = 2) -> None:
        super().__init__()
        self.ocbe = Ocbe(channels, embed, blocks, stride)
        self.decoder = Decoder(channels, embed, stride)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher features -> reconstructed teacher features."""
        return self.decoder(self.ocbe(feats))


def _check_geometry(reductions: list[int], image_size: int, backbone: str, stride: int) -> None:
    for a, b in zip(reductions, reductions[1:]):
        if b != 2 * a:
            raise ModelError(f"rd needs encoder levels that double in stride; {backbone} levels have {reductions}")
    unit = stride * reductions[-1]
    if image_size % unit:
        raise ModelError(f"rd with strides {reductions} needs image_size divisible by {unit}, got {image_size}")


class ReverseDistillation(KDModel):
    """Reverse Distillation.

    Options: ``embed_channels`` (default 2*c_last), ``ocbe_blocks`` (default 1), ``embed_stride``
    (2, the original; or 1), ``loss`` (``position``, default, or ``flat``: ``RD_LOSSES``),
    ``map_sigma`` (default 4.0, the map blur), ``map_levels`` (default all levels), ``map_combine``
    (default ``sum``, the original; ``product`` as STFPM).
    """

    MAP_OPTIONS = ("map_sigma", "map_levels", "map_combine")
    OPTIONS = ("embed_channels", "ocbe_blocks", "embed_stride", "loss", *MAP_OPTIONS)

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        check_options(cfg, self.OPTIONS)
        self.teacher = freeze(build_backbone(cfg.backbone, cfg.levels, cfg.weights))
        channels, reductions = self.teacher.channels, self.teacher.reductions
        stride = cfg.options.get("embed_stride", 2)
        if stride not in (1, 2) or isinstance(stride, bool):
            raise ModelError(f"rd option embed_stride={stride!r}: expected 2 (the original) or 1")
        _check_geometry(reductions, image_size, cfg.backbone, stride)
        embed = int(cfg.options.get("embed_channels", 2 * channels[-1]))
        blocks = int(cfg.options.get("ocbe_blocks", 1))
        if embed < 1 or blocks < 1:
            raise ModelError(f"rd options embed_channels={embed} and ocbe_blocks={blocks} must be >= 1")
        self.student = RdStudent(channels, embed, blocks, stride)
        try:
            self.loss_fn = RD_LOSSES.get(str(cfg.options.get("loss", "position")))
        except RegistryError as e:
            raise ModelError(f"rd option loss: {e}") from None
        sigma = map_sigma(cfg.options.get("map_sigma", 4.0), "rd")
        combine = map_combine(cfg.options.get("map_combine"), "rd", "sum")
        self.head = AnomalyMapHead("cosine", combine, map_size=image_size, out_size=image_size, sigma=sigma,
                                   levels=map_levels(cfg.options.get("map_levels"), cfg.levels, "rd"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference graph: encoder, OCBE + decoder, cosine-distance head."""
        feats = self.teacher(x)
        return self.head(feats, self.student(feats))

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum over levels of the ``loss`` option's cosine distance (default: mean per position)."""
        with torch.no_grad():
            feats = self.teacher(x)
        recon = self.student(feats)
        terms = {f"cos{i}": self.loss_fn(t, s) for i, (t, s) in enumerate(zip(feats, recon))}
        terms["loss"] = sum(terms.values())
        return terms


MODELS.add("rd", ReverseDistillation)
