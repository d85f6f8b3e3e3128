"""Target profiles: which integer types, symmetry and granularity a backend wants, as data.

``scale_zero_point`` mirrors onnxruntime's ``compute_scale_zp`` (quant_utils.py) so that a qtool QDQ
model and one from ``onnxruntime.quantization.quantize_static`` agree to the last bit for 8 bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from onnx import TensorProto

from qtool.errors import GraphError
from qtool.registry import Registry

DTYPES: dict[str, tuple[int, type[np.integer]]] = {
    "uint8": (TensorProto.UINT8, np.uint8),
    "int8": (TensorProto.INT8, np.int8),
}
BITS = (4, 6, 7, 8)  # 7: weights of a reduced-range profile only (recipes ask for 8, 6 or 4)


@dataclass(frozen=True)
class QuantParams:
    """How one tensor is quantized.

    Widths below 8 are emulated in int8/uint8 storage with a narrower integer range:
    uint8 -> [0, 2^b - 1]; int8 asymmetric -> [-2^(b-1), 2^(b-1) - 1]; int8 symmetric ->
    the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1] (so 8 bits = [-127, 127], 4 bits = [-7, 7]),
    which is onnxruntime's symmetric int8 range and TensorRT's.

    Attributes:
        dtype: storage type, "uint8" or "int8".
        bits: integer width, 8, 6 or 4.
        symmetric: range made symmetric around 0; zero point is the middle of the range (0 for int8).
        axis: per-channel axis of a weight, None for per-tensor.
    """

    dtype: Literal["uint8", "int8"]
    bits: int = 8
    symmetric: bool = False
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise GraphError(f"quantized dtype {self.dtype!r} not supported; allowed: {', '.join(DTYPES)}")
        if self.bits not in BITS:
            raise GraphError(f"bit width {self.bits} not supported; allowed: {', '.join(map(str, BITS))}")

    @property
    def qmin(self) -> int:
        """Smallest integer used."""
        if self.dtype == "uint8":
            return 0
        half = 2 ** (self.bits - 1)
        return -(half - 1) if self.symmetric else -half

    @property
    def qmax(self) -> int:
        """Largest integer used."""
        return 2**self.bits - 1 if self.dtype == "uint8" else 2 ** (self.bits - 1) - 1

    @property
    def onnx_type(self) -> int:
        """ONNX TensorProto element type of the storage."""
        return DTYPES[self.dtype][0]

    @property
    def np_type(self) -> type[np.integer]:
        """NumPy type of the storage."""
        return DTYPES[self.dtype][1]

    @property
    def emulated(self) -> bool:
        """True when no integer kernel of this width exists (bits < 8): the QDQ graph only simulates it."""
        return self.bits < 8

    @property
    def symmetric_zero_point(self) -> int:
        """Zero point a symmetric tensor gets (0 for int8, the middle of the range for uint8)."""
        return int(np.round((self.qmin + self.qmax) / 2.0))

    def with_axis(self, axis: int | None) -> QuantParams:
        """Copy with another per-channel axis."""
        return dataclasses.replace(self, axis=axis)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view, with the integer range."""
        return {**dataclasses.asdict(self), "qmin": self.qmin, "qmax": self.qmax}


def scale_zero_point(lo: Any, hi: Any, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for the float range ``[lo, hi]`` (scalars, or arrays for per-channel).

    Mirrors onnxruntime's ``compute_scale_zp``: the range is widened to include 0, made symmetric
    when ``params.symmetric``, scale = (hi - lo) / (qmax - qmin) computed in float64 and stored as
    float32, zero point = round(qmin - lo / scale) (symmetric: the middle of [qmin, qmax]); a scale
    below float32's smallest normal becomes 1 with zero point 0.

    Returns:
        (scale as float32 array, zero point as an array of ``params.np_type``), shaped like ``lo``.

    Raises:
        GraphError: if a bound is NaN or infinite.
    """
    rmin = np.asarray(lo, dtype=np.float32)
    rmax = np.asarray(hi, dtype=np.float32)
    if not (np.all(np.isfinite(rmin)) and np.all(np.isfinite(rmax))):
        raise GraphError(f"quantization range [{lo}, {hi}] is not finite")
    rmin = np.minimum(rmin, np.float32(0))
    rmax = np.maximum(rmax, np.float32(0))
    if params.symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    qmin, qmax = params.qmin, params.qmax
    scale64 = (rmax.astype(np.float64) - rmin.astype(np.float64)) / float(qmax - qmin)
    tiny = scale64 < np.finfo(np.float32).tiny
    safe = np.where(tiny, 1.0, scale64)
    if params.symmetric:
        zp = np.full(scale64.shape, np.round((qmin + qmax) / 2.0))
    else:
        zp = np.round(qmin - rmin / safe)
    zp = np.where(tiny, 0.0, np.clip(zp, qmin, qmax))
    scale = np.where(tiny, np.float32(1.0), scale64.astype(np.float32)).astype(np.float32)
    return scale, zp.astype(params.np_type)


def quantize_array(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, params: QuantParams) -> np.ndarray:
    """Quantize ``data`` like onnxruntime's ``quantize_nparray`` (float32 divide, round half to even).

    Values are clipped to ``[params.qmin, params.qmax]``; per-channel scales broadcast along ``params.axis``.
    """
    data = np.asarray(data, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point)
    if params.axis is not None and scale.ndim == 1:
        shape = [1] * data.ndim
        shape[params.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = np.round(data / scale) + zero_point.astype(np.float32)
    return np.clip(q, params.qmin, params.qmax).astype(params.np_type)


@dataclass(frozen=True)
class TargetProfile:
    """What a backend executes fast and correctly; the policy and lint read it, nobody branches on names.

    Attributes:
        name: registry name.
        activation_dtype / activation_symmetric: activation storage and symmetry (always per-tensor).
        weight_dtype / weight_symmetric: weight storage and symmetry.
        per_channel_weights: one scale per output channel (axis from the op: Conv 0, ConvTranspose 1).
        quantize_bias: Conv/Gemm bias as int32 with scale input_scale * weight_scale (what ONNX
            Runtime needs to fuse QLinearConv); False keeps bias float (TensorRT fuses it itself).
        strict_qdq_pairs: lint requires every DequantizeLinear to repeat its QuantizeLinear's params.
        fp16_fallback: layers kept out of int8 may run in float16 on this target.
        description: one line for reports.
        reduced_weight_range: 8-bit weights use 7 bits ([-63, 63]), onnxruntime's ``reduce_range``: on
            x86 without VNNI the u8 x s8 kernels (VPMADDUBSW) add two products in int16, which
            saturates for full-range weights; 7-bit weights keep every pair sum below 2^15.
        needs_int8_dot: full-range int8 weights are exact only where the CPU has an int8 dot-product
            instruction (VNNI on x86); ``qtool ptq`` warns on an x86 host without it.
        float_ops: op types the backend has no integer kernel for: the policy keeps them float
            (a QDQ pair around them would only add dequantization), with ``float_ops_reason``.
    """

    name: str
    activation_dtype: Literal["uint8", "int8"]
    activation_symmetric: bool
    weight_dtype: Literal["uint8", "int8"]
    weight_symmetric: bool
    per_channel_weights: bool
    quantize_bias: bool
    strict_qdq_pairs: bool
    fp16_fallback: bool
    description: str
    reduced_weight_range: bool = False
    needs_int8_dot: bool = False
    float_ops: tuple[str, ...] = ()
    float_ops_reason: str = ""

    def activation(self, bits: int = 8) -> QuantParams:
        """Per-tensor activation params at ``bits``."""
        return QuantParams(self.activation_dtype, bits, self.activation_symmetric, None)

    def weight(self, bits: int = 8, axis: int | None = None) -> QuantParams:
        """Weight params at ``bits``; ``axis`` is kept only when the profile wants per-channel weights."""
        if self.reduced_weight_range and bits == 8:
            bits = 7
        return QuantParams(self.weight_dtype, bits, self.weight_symmetric, axis if self.per_channel_weights else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        return dataclasses.asdict(self)


PROFILES: Registry[TargetProfile] = Registry("target profile")
PROFILES.add(
    "cpu",
    TargetProfile(
        name="cpu",
        activation_dtype="uint8",
        activation_symmetric=False,
        weight_dtype="int8",
        weight_symmetric=True,
        per_channel_weights=True,
        quantize_bias=True,
        strict_qdq_pairs=False,
        fp16_fallback=False,
        description="ONNX Runtime x86 CPU: uint8 asymmetric activations, int8 symmetric per-channel weights "
        "(the combination with fast VNNI kernels), int32 bias",
        needs_int8_dot=True,
        # measured with onnxruntime 1.32: DQ -> ConvTranspose -> Q is not fused (no QLinearConvTranspose on CPU)
        float_ops=("ConvTranspose",),
        float_ops_reason="no integer kernel in ONNX Runtime CPU (QDQ ConvTranspose runs in float)",
    ),
)
PROFILES.add(
    "cpu-avx2",
    dataclasses.replace(
        PROFILES.get("cpu"),
        name="cpu-avx2",
        reduced_weight_range=True,
        needs_int8_dot=False,
        description="ONNX Runtime x86 CPU without VNNI (AVX2 only): as cpu, with 7-bit weights so the "
        "u8 x s8 int16 pair sums cannot saturate",
    ),
)
PROFILES.add(
    "tensorrt",
    TargetProfile(
        name="tensorrt",
        activation_dtype="int8",
        activation_symmetric=True,
        weight_dtype="int8",
        weight_symmetric=True,
        per_channel_weights=True,
        quantize_bias=False,
        strict_qdq_pairs=True,
        fp16_fallback=True,
        description="TensorRT explicit quantization: int8 symmetric (zero point 0) activations and "
        "per-channel weights, float bias, matching Q/DQ pairs",
    ),
)


def get_profile(profile: str | TargetProfile) -> TargetProfile:
    """Return ``profile`` itself or the registered profile of that name.

    Raises:
        RegistryError: unknown name (the message lists the profiles).
    """
    return profile if isinstance(profile, TargetProfile) else PROFILES.get(profile)


def host_warning(profile: TargetProfile, cpu_flags: dict[str, bool], machine: str) -> str | None:
    """Why ``profile`` may lose accuracy on this host (an x86 CPU without VNNI), or None."""
    x86 = machine.lower() in {"x86_64", "amd64", "i686"}
    dot = any(cpu_flags.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    if profile.needs_int8_dot and x86 and not dot:
        return (f"this CPU has no VNNI: ONNX Runtime's u8s8 kernels may saturate with profile {profile.name!r}; "
                "target cpu-avx2 (7-bit weights) avoids it")
    return None
