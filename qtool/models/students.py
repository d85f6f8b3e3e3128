"""Uninformed Students (Bergmann et al. 2020): a patch-descriptor teacher and an ensemble of students.

Dense scoring is one fully convolutional pass: the descriptor networks are small FCNs (receptive
field = the patch size, 17 or 33 px, overall stride 4, "same" padding) so every stride-4 position
gets a descriptor of the patch around it; there is no per-patch loop and no multi-pooling.
- Teacher pretraining (``prepare_training``, before the KD epochs): the descriptor FCN plus a 1x1
  projection (training only, discarded) regress the pretrained backbone's features at the same
  position (``model.levels``, each level bilinearly resized to the stride-4 grid, concatenated and
  standardised per channel): the paper's knowledge-distillation loss, densely. The backbone's
  features see more context than the patch (the original embedded each cropped patch separately).
  Optional descriptor-compactness term (``compact_weight``, default 0); the paper's metric-learning
  (triplet) term is not used. Adam, ``teacher_lr`` (1e-3), ``teacher_epochs`` (10), train batch size.
  The teacher is then frozen and per-channel mean/std of its descriptors on the training images
  become buffers: the teacher outputs normalised descriptors.
- Students (``n_students``, default 3, same FCN, random init) regress the normalised descriptors:
  loss = sum over students and scales of the mean squared error over channels and positions.
- Map (head, ``ensemble`` distance): e = mean over channels of (student mean - teacher)^2,
  v = mean over channels of the students' variance; each standardised with its mean/std over all
  positions of normal images (``finish_training``: holdout normals, else train), summed; averaged
  over patch sizes ("mean" combiner); bilinear to the input size; score = map maximum.
The pretrained backbone is built only inside ``prepare_training`` (from ``model.weights``): it is
neither in the inference graph nor in the state dict, so checkpoints rebuild without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import ModelError
from qtool.models.base import MODELS, KDModel, check_options, freeze
from qtool.models.head import AnomalyMapHead, ensemble_error_variance
from qtool.recipe import ModelConfig, TrainConfig
from qtool.registry import Registry

log = logging.getLogger(__name__)

# patch size -> conv layers (kernel, stride, channels as a multiple of ``width``); receptive field = patch size
PATCH_NETS: dict[int, list[tuple[int, int, float]]] = {
    17: [(5, 1, 0.5), (5, 2, 1.0), (3, 1, 1.0), (3, 2, 2.0)],
    33: [(5, 1, 0.5), (5, 2, 1.0), (3, 1, 1.0), (3, 2, 2.0), (3, 1, 2.0), (3, 1, 2.0)],
}
# ReLU by default: Conv+ReLU fuses in int8 backends; "leaky_relu" is the paper's (slope 5e-3)
ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("us activation")
ACTIVATIONS.add("relu", nn.ReLU)
ACTIVATIONS.add("leaky_relu", lambda: nn.LeakyReLU(0.005))
DEFAULTS: dict[str, Any] = {"n_students": 3, "patch_sizes": [17], "width": 32, "descriptor_dim": 128,
                            "activation": "relu", "teacher_epochs": 10, "teacher_lr": 1e-3, "compact_weight": 0.0}


def receptive_field(layers: list[tuple[int, int, float]]) -> tuple[int, int]:
    """(receptive field in pixels, overall stride) of a conv stack given as (kernel, stride, _)."""
    rf, jump = 1, 1
    for k, s, _ in layers:
        rf += (k - 1) * jump
        jump *= s
    return rf, jump


def descriptor_net(patch: int, width: int, dim: int, activation: str = "relu") -> nn.Sequential:
    """FCN mapping an image to ``dim``-channel descriptors of ``patch`` x ``patch`` patches at stride 4."""
    layers: list[nn.Module] = []
    cin = 3
    for k, s, mult in PATCH_NETS[patch]:
        cout = max(1, int(width * mult))
        layers += [nn.Conv2d(cin, cout, k, s, k // 2), ACTIVATIONS.get(activation)()]
        cin = cout
    layers.append(nn.Conv2d(cin, dim, 1))
    return nn.Sequential(*layers)


class DescriptorTeacher(nn.Module):
    """One descriptor FCN per patch size; outputs descriptors standardised with stored statistics."""

    def __init__(self, patch_sizes: list[int], width: int, dim: int, activation: str) -> None:
        super().__init__()
        self.nets = nn.ModuleList(descriptor_net(p, width, dim, activation) for p in patch_sizes)
        self.register_buffer("mean", torch.zeros(len(patch_sizes), 1, dim, 1, 1))
        self.register_buffer("std", torch.ones(len(patch_sizes), 1, dim, 1, 1))

    def raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unnormalised descriptors, one (B,dim,h,w) map per patch size."""
        return [net(x) for net in self.nets]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Standardised descriptors, one (B,dim,h,w) map per patch size."""
        return [(d - self.mean[i]) / self.std[i] for i, d in enumerate(self.raw(x))]


class StudentEnsemble(nn.Module):
    """``n`` students per patch size, each the teacher's architecture with its own random init."""

    def __init__(self, patch_sizes: list[int], n: int, width: int, dim: int, activation: str) -> None:
        super().__init__()
        self.scales = nn.ModuleList(nn.ModuleList(descriptor_net(p, width, dim, activation) for _ in range(n))
                                    for p in patch_sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stacked predictions (B,n,dim,h,w), one per patch size."""
        return [torch.stack([net(x) for net in nets], dim=1) for nets in self.scales]


class EnsembleHead(AnomalyMapHead):
    """``ensemble`` distance per patch size, each part standardised by normal-data statistics, summed."""

    def __init__(self, n_scales: int, map_size: int, out_size: int) -> None:
        super().__init__("ensemble", "mean", map_size=map_size, out_size=out_size)
        # per scale: shift and scale of (error, variance); identity until finish_training sets them
        self.register_buffer("shift", torch.zeros(n_scales, 1, 2, 1, 1))
        self.register_buffer("scale", torch.ones(n_scales, 1, 2, 1, 1))

    def level_maps(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per patch size: standardised error + standardised variance at ``map_size``."""
        size = (self.map_size, self.map_size)
        maps = []
        for i, (t, s) in enumerate(zip(teacher, student)):
            parts = (self._distance(t, s) - self.shift[i]) / self.scale[i]
            maps.append(F.interpolate(parts.sum(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=False))
        return maps


def _options(cfg: ModelConfig) -> dict[str, Any]:
    check_options(cfg, DEFAULTS)
    opts = {**DEFAULTS, **cfg.options}
    sizes = opts["patch_sizes"] = [int(p) for p in (opts["patch_sizes"] or [])]
    bad = [p for p in sizes if p not in PATCH_NETS]
    if not sizes or bad:
        raise ModelError(f"us patch_sizes {sizes} invalid; allowed: {sorted(PATCH_NETS)} (one or more)")
    for key in ("n_students", "width", "descriptor_dim"):
        if int(opts[key]) < 1:
            raise ModelError(f"us option {key}={opts[key]} must be >= 1")
    return opts


def _batches(n: int, batch_size: int, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _compactness(d: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation between descriptor channels (paper's compactness loss)."""
    flat = d.transpose(0, 1).flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / (flat.norm(dim=1, keepdim=True) + 1e-6)
    corr = flat @ flat.T
    off = corr - torch.diag(torch.diag(corr))
    return off.pow(2).sum() / max(1, corr.numel() - len(corr))


class UninformedStudents(KDModel):
    """Uninformed Students; options (defaults): see ``DEFAULTS``."""

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.opts = _options(cfg)
        self.source_cfg = cfg  # backbone to distil the teacher from; built only when pretraining it
        sizes, width, dim = self.opts["patch_sizes"], int(self.opts["width"]), int(self.opts["descriptor_dim"])
        self.stride = receptive_field(PATCH_NETS[sizes[0]])[1]
        if image_size % self.stride:
            raise ModelError(f"us needs image_size divisible by {self.stride}, got {image_size}")
        act = str(self.opts["activation"])
        ACTIVATIONS.get(act)  # unknown name: RegistryError listing the allowed ones
        self.teacher = freeze(DescriptorTeacher(sizes, width, dim, act))
        self.student = StudentEnsemble(sizes, int(self.opts["n_students"]), width, dim, act)
        self.head = EnsembleHead(len(sizes), image_size // self.stride, image_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference graph: descriptor teacher, student ensemble, ensemble head (one dense pass)."""
        return self.head(self.teacher(x), self.student(x))

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum over students and patch sizes of the MSE to the normalised teacher descriptors."""
        with torch.no_grad():
            teacher = self.teacher(x)
        terms = {f"reg{i}": (s - t.unsqueeze(1)).pow(2).mean(dim=(0, 2, 3, 4)).sum()
                 for i, (t, s) in enumerate(zip(teacher, self.student(x)))}
        terms["loss"] = sum(terms.values())
        return terms

    def prepare_training(self, images: torch.Tensor, cfg: TrainConfig, seed: int = 0) -> dict[str, Any]:
        """Distil the descriptor teacher from the pretrained backbone, freeze it, store its statistics."""
        facts: dict[str, Any] = {"teacher_epochs": int(self.opts["teacher_epochs"])}
        if facts["teacher_epochs"] > 0:
            facts.update(self._distil_teacher(images, cfg.batch_size, seed))
        freeze(self.teacher)
        with torch.no_grad():
            sums = [torch.zeros(self.teacher.mean.shape[2], dtype=torch.float64) for _ in self.teacher.nets]
            sq = [torch.zeros_like(s) for s in sums]
            count = 0
            for idx in _batches(len(images), cfg.batch_size):
                for i, d in enumerate(self.teacher.raw(images[idx])):
                    d = d.double().transpose(0, 1).flatten(1)
                    sums[i] += d.sum(1)
                    sq[i] += d.pow(2).sum(1)
                count += d.shape[1]
            for i in range(len(sums)):
                mean = sums[i] / count
                std = (sq[i] / count - mean.pow(2)).clamp_min(1e-12).sqrt()
                self.teacher.mean[i].copy_(mean.view(1, -1, 1, 1).float())
                self.teacher.std[i].copy_(std.clamp_min(1e-6).view(1, -1, 1, 1).float())
        return facts

    def _distil_teacher(self, images: torch.Tensor, batch_size: int, seed: int) -> dict[str, Any]:
        from qtool.models.backbones import build_backbone

        t0 = time.perf_counter()
        cfg = self.source_cfg
        source = freeze(build_backbone(cfg.backbone, cfg.levels, cfg.weights))
        size = images.shape[-1] // self.stride

        def target(x: torch.Tensor) -> torch.Tensor:
            feats = source(x)
            return torch.cat([F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
                              for f in feats], dim=1)

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # per-channel standardisation of the regression target, from up to 64 random images
            pick = torch.randperm(len(images), generator=gen)[:64]
            sample = torch.cat([target(images[pick[idx]]) for idx in _batches(len(pick), batch_size)])
            t_mean = sample.mean(dim=(0, 2, 3), keepdim=True)
            t_std = sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        dim = self.teacher.mean.shape[2]
        projections = nn.ModuleList(nn.Conv2d(dim, sample.shape[1], 1) for _ in self.teacher.nets)
        self.teacher.requires_grad_(True)
        params = list(self.teacher.parameters()) + list(projections.parameters())
        opt = torch.optim.Adam(params, lr=float(self.opts["teacher_lr"]))
        weight = float(self.opts["compact_weight"])
        losses = []
        for epoch in range(int(self.opts["teacher_epochs"])):
            total = 0.0
            for idx in _batches(len(images), batch_size, gen):
                x = images[idx]
                with torch.no_grad():
                    goal = (target(x) - t_mean) / t_std
                loss = torch.zeros(())
                for net, proj in zip(self.teacher.nets, projections):
                    d = net(x)
                    loss = loss + (proj(d) - goal).pow(2).mean()
                    if weight > 0:
                        loss = loss + weight * _compactness(d)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(images))
            log.info("us teacher epoch %d loss %.5f", epoch + 1, losses[-1])
        return {"teacher_loss_first": losses[0], "teacher_loss_last": losses[-1],
                "teacher_seconds": round(time.perf_counter() - t0, 2)}

    @torch.no_grad()
    def finish_training(self, images: torch.Tensor, cfg: TrainConfig) -> dict[str, Any]:
        """Standardisation statistics of the error and variance maps on normal ``images``."""
        self.eval()
        n_scales = len(self.teacher.nets)
        sums = torch.zeros(n_scales, 2, dtype=torch.float64)
        sq = torch.zeros_like(sums)
        count = 0
        for idx in _batches(len(images), cfg.batch_size):
            x = images[idx]
            for i, (t, s) in enumerate(zip(self.teacher(x), self.student(x))):
                parts = ensemble_error_variance(t, s).double().transpose(0, 1).flatten(1)
                sums[i] += parts.sum(1)
                sq[i] += parts.pow(2).sum(1)
            count += parts.shape[1]
        mean = sums / count
        std = (sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        self.head.shift.copy_(mean.view(n_scales, 1, 2, 1, 1).float())
        self.head.scale.copy_(std.view(n_scales, 1, 2, 1, 1).float())
        return {"error_mean": mean[:, 0].tolist(), "error_std": std[:, 0].tolist(),
                "variance_mean": mean[:, 1].tolist(), "variance_std": std[:, 1].tolist()}


MODELS.add("us", UninformedStudents)
