"""DCAM (Distributed Convolutional Attention Module) and its losses, for training only.

Choices the paper leaves open, made here and documented in the README:
- the attention of level l is computed from the student's level-l feature ``s`` and applied to it,
  ``s' = A(s) * s``; the distillation losses compare ``s'`` with the teacher feature ``t``;
- the plain STFPM loss on (``s``, ``t``) is kept with weight 1, so the inference student (which
  never sees the attention) stays aligned with the teacher;
- spatial KL: per channel, softmax over the h*w positions at temperature T, KL(teacher || student),
  mean over batch and channels, times T^2 (the usual distillation scaling);
- channel cosine: per channel, 1 - cosine over the flattened spatial vector, mean.
Defaults: channel attention (the paper's best), reduction 8, 7x7 spatial kernel, weights 1.0/1.0, T = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.recipe import DcamConfig


class ChannelAttention(nn.Module):
    """CBAM channel attention: avg- and max-pooled vectors through a shared MLP, sigmoid."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return per-channel weights (B,C,1,1) in (0,1)."""
        return torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel mean and max concatenated, a kxk conv, sigmoid."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return per-position weights (B,1,H,W) in (0,1)."""
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class AttentionBlock(nn.Module):
    """Channel, spatial, or both (channel first, as CBAM) attention on one feature level."""

    def __init__(self, channels: int, cfg: DcamConfig) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, cfg.reduction) if cfg.variant in ("channel", "both") else None
        self.spatial = SpatialAttention(cfg.kernel_size) if cfg.variant in ("spatial", "both") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attended feature map."""
        if self.channel is not None:
            x = x * self.channel(x)
        if self.spatial is not None:
            x = x * self.spatial(x)
        return x


def spatial_kl(t: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of per-channel spatial softmax distributions, times T^2."""
    t_log = F.log_softmax(t.flatten(2) / temperature, dim=-1)
    s_log = F.log_softmax(s.flatten(2) / temperature, dim=-1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)
    return kl.mean() * temperature**2


def channel_cosine(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over channels of 1 - cosine similarity of the flattened spatial vectors."""
    return (1.0 - F.cosine_similarity(t.flatten(2), s.flatten(2), dim=-1)).mean()


class Dcam(nn.Module):
    """One attention block per student level and the DCAM distillation losses."""

    def __init__(self, channels: list[int], cfg: DcamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(AttentionBlock(c, cfg) for c in channels)

    def losses(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the weighted ``kl`` and ``cos`` terms summed over levels."""
        kl = sum(spatial_kl(t, blk(s), self.cfg.temperature) for t, s, blk in zip(teacher, student, self.blocks))
        cos = sum(channel_cosine(t, blk(s)) for t, s, blk in zip(teacher, student, self.blocks))
        return {"kl": self.cfg.kl_weight * kl, "cos": self.cfg.cos_weight * cos}
