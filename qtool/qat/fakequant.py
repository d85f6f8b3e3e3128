"""Fake-quant modules parameterised from QuantParams: per-tensor activations, per-channel weights.

Forward values come from torch's core ops ``fake_quantize_per_tensor_affine`` /
``fake_quantize_per_channel_affine`` with ``[qmin, qmax]`` taken from the QuantParams (so 6/4-bit
and the symmetric int8 range [-127, 127] are exactly the QDQ graph's), scale and zero point from
:func:`qtool.graph.profiles.scale_zero_point` (onnxruntime's formula; zero point 0 for symmetric int8).

Ranges are either *observed* (activations: calibrated ranges, optionally updated by an EMA of batch
min/max; weights: per-channel min/max of the current weights, recomputed every step, as PTQ does, times
a per-channel clip fraction fixed at the start from the spec's weight range rule: 1 for ``minmax``) or
*learnable*: the scale is ``exp(log_scale)`` (TQT's log-domain threshold: always positive, updates are
relative), its gradient LSQ's straight-through estimate (``round(x/s) - x/s`` inside the range,
``qmin - z`` / ``qmax - z`` outside); the zero point stays at its calibrated value. Freezing stops both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qtool.graph.profiles import QuantParams, scale_zero_point
from qtool.graph.weight_ranges import clip_fractions, weight_bounds


class _LearnableFakeQuant(torch.autograd.Function):
    """Core-op fake quantization whose backward also gives LSQ's scale gradient (one fused pass)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                axis: int | None) -> torch.Tensor:
        if axis is None:
            q = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        else:
            q = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
        ctx.save_for_backward(x, scale, zp)
        ctx.qmin, ctx.qmax, ctx.axis = qmin, qmax, axis
        return q

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        x, scale, zp = ctx.saved_tensors
        shape = [1] * x.ndim
        if ctx.axis is not None:
            shape[ctx.axis] = -1
        s, z = scale.reshape(shape), zp.to(x.dtype).reshape(shape)
        v = x / s + z
        r = torch.round(v)
        low, high = r < ctx.qmin, r > ctx.qmax
        inside = ~(low | high)
        # d q / d s: round(x/s) - x/s inside the range, qmin - z or qmax - z where it clamps
        ds = torch.where(inside, r - v, torch.where(low, ctx.qmin - z, ctx.qmax - z))
        gs = g * ds
        gs = gs.sum() if ctx.axis is None else gs.sum(dim=[d for d in range(x.ndim) if d != ctx.axis])
        return g * inside, gs.reshape(scale.shape), None, None, None, None


# aten's fused learnable kernels (native ops, not torch.ao); the autograd Function above is the fallback
_ATEN_LEARNABLE_PT = getattr(torch, "_fake_quantize_learnable_per_tensor_affine", None)
_ATEN_LEARNABLE_PC = getattr(torch, "_fake_quantize_learnable_per_channel_affine", None)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None) -> torch.Tensor:
    """Fake-quantize ``x`` (per tensor, or per channel along ``axis``); LSQ gradient to ``scale`` if it needs one."""
    if scale.requires_grad and torch.is_grad_enabled():
        zf = zp.to(torch.float32)
        if axis is None and _ATEN_LEARNABLE_PT is not None:  # the same maths in one fused aten kernel
            return _ATEN_LEARNABLE_PT(x, scale.reshape(1), zf.reshape(1), qmin, qmax, 1.0)
        if axis is not None and _ATEN_LEARNABLE_PC is not None:
            return _ATEN_LEARNABLE_PC(x, scale, zf, axis, qmin, qmax, 1.0)
        return _LearnableFakeQuant.apply(x, scale, zp, qmin, qmax, axis)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)


class _Scale(nn.Module):
    """Holds a scale as a buffer, or as a learnable ``log_scale`` parameter."""

    learnable: bool

    def _init_scale(self, n: int | None) -> None:
        shape = () if n is None else (n,)
        if self.learnable:
            self.log_scale = nn.Parameter(torch.zeros(shape))
        else:
            self.register_buffer("scale", torch.ones(shape))

    def get_scale(self) -> torch.Tensor:
        """The scale (differentiable when learnable)."""
        return self.log_scale.exp() if self.learnable else self.scale

    def put_scale(self, value: torch.Tensor | float, where: torch.Tensor | None = None) -> None:
        """Set the scale (float32 values, clamped positive).

        With ``where`` (a mask of the scale's shape) only those entries are set; the others keep their stored
        value bit for bit (a learnable scale is not taken through exp and log again).
        """
        v = torch.as_tensor(value, dtype=torch.float32).clamp_min(1e-12)
        stored = self.log_scale if self.learnable else self.scale
        v = (v.log() if self.learnable else v).reshape(stored.shape)
        with torch.no_grad():
            stored.copy_(v if where is None else torch.where(torch.as_tensor(where).reshape(stored.shape), v, stored))

    @property
    def scale_parameter(self) -> nn.Parameter | None:
        """The learnable parameter (None for observed ranges)."""
        return self.log_scale if self.learnable else None

    def set_frozen(self, frozen: bool) -> None:
        """Stop (or resume) learning the scale."""
        if self.learnable:
            self.log_scale.requires_grad_(not frozen)


def activation_bounds(params: QuantParams) -> tuple[int, int]:
    """Integer range an activation saturates to in the QDQ graph.

    Below 8 bits insert_qdq clips to ``[qmin, qmax]``; at 8 bits QuantizeLinear saturates to the
    storage type, so symmetric int8 reaches -128 for values under the range (the scale is still
    absmax / 127, as ``QuantParams.qmin = -127`` says).
    """
    if params.emulated:
        return params.qmin, params.qmax
    info = np.iinfo(params.np_type)
    return int(info.min), int(info.max)


class ActFakeQuant(_Scale):
    """Per-tensor fake quantization of the activations sharing one range owner (an ONNX tensor).

    Called with ``observe=True`` where the owner tensor itself flows (updates the EMA range while
    observing), ``observe=False`` where a tensor borrows the owner's range (ORT's shared ranges).
    """

    def __init__(self, params: QuantParams, tensor: str, learnable: bool = False, momentum: float = 0.01) -> None:
        super().__init__()
        self.params = params
        self.tensor = tensor
        self.qmin, self.qmax = activation_bounds(params)
        self.learnable = learnable
        self.momentum = momentum
        self.observing = False
        self._init_scale(None)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("lo", torch.zeros((), dtype=torch.float32))
        self.register_buffer("hi", torch.zeros((), dtype=torch.float32))

    def set_range(self, lo: float, hi: float) -> None:
        """Set the float range; scale and zero point follow qtool's (onnxruntime's) formula."""
        scale, zp = scale_zero_point(lo, hi, self.params)
        with torch.no_grad():
            self.lo.fill_(float(lo))
            self.hi.fill_(float(hi))
            self.zero_point.fill_(int(zp))
        self.put_scale(float(scale))

    def range(self) -> tuple[float, float]:
        """The float range the current scale and zero point represent: ``s * (qmin - z)``, ``s * (qmax - z)``."""
        s, z = float(self.get_scale().detach()), int(self.zero_point)
        return s * (self.params.qmin - z), s * (self.params.qmax - z)

    def set_frozen(self, frozen: bool) -> None:
        """Stop (or resume) learning the scale and observing ranges."""
        super().set_frozen(frozen)
        self.observing = not frozen and not self.learnable and self.momentum > 0

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        """Fake-quantize ``x`` with the current scale and zero point."""
        if observe and self.observing and self.training:
            with torch.no_grad():
                lo, hi = float(x.min()), float(x.max())
                m = self.momentum
                self.set_range(float(self.lo) + m * (lo - float(self.lo)), float(self.hi) + m * (hi - float(self.hi)))
        return fake_quantize(x, self.get_scale(), self.zero_point, self.qmin, self.qmax, None)

    def extra_repr(self) -> str:
        """Tensor, storage and integer range in the module's repr."""
        p = self.params
        return (f"{self.tensor!r}, {p.dtype}, bits={p.bits}, symmetric={p.symmetric}, "
                f"q=[{self.qmin}, {self.qmax}], learnable={self.learnable}")


class WeightFakeQuant(_Scale):
    """Per-channel (or per-tensor) weight fake quantization, used as a ``torch.nn.utils.parametrize`` parametrization.

    Args:
        params: the spec's weight params (its ``axis`` is the ONNX axis, used only to decide per-channel).
        tensor: the ONNX initializer this weight becomes.
        axis: output-channel axis of the torch weight.
        channels: size of that axis.
        learnable: LSQ scales (initialised from the per-channel min/max) instead of min/max every step.
    """

    def __init__(self, params: QuantParams, tensor: str, axis: int, channels: int, learnable: bool = False) -> None:
        super().__init__()
        self.params = params
        self.tensor = tensor
        self.axis = axis if params.axis is not None else None
        self.qmin, self.qmax = params.qmin, params.qmax
        self.learnable = learnable
        n = channels if self.axis is not None else 1
        self._init_scale(n)
        self._cached: tuple | None = None
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("clip", torch.ones(n, dtype=torch.float64))

    def use_rule(self, rule: str, w: torch.Tensor) -> None:
        """Clip each channel at the fraction of its min/max that weight range ``rule`` gives ``w``.

        The fraction stays fixed while ``w`` trains (``minmax``: 1, nothing clipped).
        """
        self.use_bounds(*weight_bounds(rule, w.detach().float().numpy(), self.params.with_axis(self.axis)), w)

    def use_bounds(self, lo: np.ndarray, hi: np.ndarray, w: torch.Tensor) -> None:
        """Clip each channel at the fraction of its min/max that per-channel ``lo``/``hi`` span (a calibrator's)."""
        data = w.detach().float().numpy()
        with torch.no_grad():
            self.clip.copy_(torch.from_numpy(clip_fractions(lo, hi, data, self.params.with_axis(self.axis))))

    def bounds(self, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float bounds of ``w`` now: its min/max times the clip fractions (0-d per-tensor)."""
        data = w.detach().float()
        if self.axis is None:
            lo, hi = np.asarray(float(data.min())), np.asarray(float(data.max()))
        else:
            flat = data.movedim(self.axis, 0).reshape(data.shape[self.axis], -1)
            lo, hi = flat.min(dim=1).values.numpy(), flat.max(dim=1).values.numpy()
        clip = self.clip.numpy().reshape(np.shape(lo))
        return (lo * clip).astype(np.float32), (hi * clip).astype(np.float32)

    def observed_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of ``w`` from :meth:`bounds` (exactly what PTQ/insert_qdq computes from them)."""
        scale, zp = scale_zero_point(*self.bounds(w), self.params)
        return torch.from_numpy(np.atleast_1d(scale)), torch.from_numpy(np.atleast_1d(zp).astype(np.int32))

    def init_from(self, w: torch.Tensor) -> None:
        """Initialise the (learnable) scales and zero points from ``w``'s clipped min/max."""
        scale, zp = self.observed_qparams(w)
        self.put_scale(scale)
        with torch.no_grad():
            self.zero_point.copy_(zp)

    def current_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and zero points used for ``w`` now (learned, or its min/max)."""
        if self.learnable:
            return self.get_scale(), self.zero_point
        return self.observed_qparams(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the weight tensor."""
        frozen = not self.learnable and not w.requires_grad  # a frozen teacher: quantize once
        key = (w.data_ptr(), w._version)
        if frozen and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        scale, zp = self.current_qparams(w)
        if self.axis is None:
            out = fake_quantize(w, scale[0], zp[0], self.qmin, self.qmax, None)
        else:
            out = fake_quantize(w, scale, zp, self.qmin, self.qmax, self.axis)
        self._cached = (key, out) if frozen else None
        return out

    def extra_repr(self) -> str:
        """Tensor, storage and axis in the module's repr."""
        p = self.params
        return (f"{self.tensor!r}, {p.dtype}, bits={p.bits}, symmetric={p.symmetric}, axis={self.axis}, "
                f"learnable={self.learnable}")


_INT32_MIN, _INT32_MAX = float(np.iinfo(np.int32).min), float(np.iinfo(np.int32).max)


class BiasFakeQuant(nn.Module):
    """int32 bias fake quantization, as the QDQ graph stores it: scale = input scale x weight scale, zero point 0.

    A ``parametrize`` parametrization of a quantized layer's bias. Rounding is straight-through (the
    bias gradient passes unchanged; the scales get none from here). The two quantizers are held outside
    the module tree (they already belong to it elsewhere), so the state dict has no second copy of them.
    """

    def __init__(self, act: ActFakeQuant, weight: WeightFakeQuant, latent_weight: Any) -> None:
        super().__init__()
        self._sources = (act, weight, latent_weight)
        self._observed: tuple | None = None  # (weight version, its min/max scales): a frozen weight's, once

    def scale(self) -> torch.Tensor:
        """The bias scale now: the input's scale times the weight's (per channel)."""
        act, weight, latent = self._sources
        if weight.learnable:
            w_scale = weight.get_scale().detach()
        else:
            w = latent()
            key = (w.data_ptr(), w._version)
            if self._observed is None or self._observed[0] != key:
                self._observed = (key, weight.observed_qparams(w)[0].to(torch.float32))
            w_scale = self._observed[1]
        return (act.get_scale().detach() * w_scale).reshape(-1)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        """``b`` rounded to the int32 grid of :meth:`scale`, clamped to int32 as the export does."""
        s = self.scale()
        q = torch.clamp(torch.round(b.double() / s.double()), _INT32_MIN, _INT32_MAX) * s.double()
        return b + (q.to(b.dtype) - b).detach()
