"""Insert fake-quant modules into the fx graphs of a KD model exactly where the PTQ policy puts QDQ pairs.

``prepare_qat`` traces the parts, folds BatchNorm, maps the spec (:mod:`qtool.qat.spec_map`), then:
one :class:`ActFakeQuant` per range owner (tensors sharing a range share the module), called on
each fx use the map lists; a :class:`WeightFakeQuant` parametrization on each quantized weight.
The parts are swapped into a copy of the model, so ``model.training_loss`` and ``model(x)`` run on
the fake-quantized graph unchanged. Frozen parts (the teacher) keep their calibrated ranges.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn
from torch.nn.utils import parametrize

from qtool.graph.insert_qdq import bounds_of, grow_for_int32_bias
from qtool.graph.policy import QuantSpec
from qtool.qat.fakequant import ActFakeQuant, BiasFakeQuant, WeightFakeQuant
from qtool.qat.sites import SpecMap
from qtool.qat.spec_map import build_spec_map
from qtool.qat.trace import QatError, SpecMapError

log = logging.getLogger(__name__)
FQ_ATTR = "qat_fq"


@dataclass
class QatModel:
    """A KD model whose parts are fake-quantized GraphModules, with handles on its quantizers.

    Attributes:
        model: the KD model (``training_loss``, ``forward`` and ``dcam`` as before).
        smap: where every spec entry sits in the fx graphs.
        act: range owner (ONNX tensor) -> its activation fake-quant.
        weights: ONNX weight initializer -> its weight fake-quant (parametrization).
        frozen_parts: parts whose parameters are not trained (their quantizers never move).
    """

    model: nn.Module
    smap: SpecMap
    act: dict[str, ActFakeQuant]
    weights: dict[str, WeightFakeQuant]
    frozen_parts: set[str]

    @property
    def spec(self) -> QuantSpec:
        """The QuantSpec this model lowers."""
        return self.smap.spec

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the ranges and scales of the trained parts' quantizers."""
        for q in self._trainable_quantizers():
            q.set_frozen(frozen)

    def _trainable_quantizers(self) -> list[nn.Module]:
        return [q for q in [*self.act.values(), *self.weights.values()] if getattr(q, "trainable", False)]

    def quantizer_parameters(self) -> list[nn.Parameter]:
        """The learnable log-scales of the trained parts (empty with observed ranges)."""
        return [q.scale_parameter for q in self._trainable_quantizers() if q.scale_parameter is not None]

    def ranges(self) -> dict[str, tuple[Any, Any]]:
        """Current float range of every range owner, and every weight's per-channel bounds.

        insert_qdq turns them back into the same scales and zero points.
        """
        return {**{t: q.range() for t, q in self.act.items()},
                **{w: q.bounds(self.latent_weight(w)) for w, q in self.weights.items()}}

    def part_module(self, part: str, target: str) -> nn.Module:
        """The module ``target`` of part ``part``'s GraphModule."""
        return self.smap.parts[part].get_submodule(target)

    def latent_weight(self, w: str) -> torch.Tensor:
        """The float (not fake-quantized) weight behind ONNX initializer ``w``."""
        site = self.smap.weights[w]
        return _latent(self.part_module(site.part, site.module), "weight")

    def latent_bias(self, w: str) -> torch.Tensor | None:
        """The float (not fake-quantized) bias of the layer of ONNX weight ``w`` (None without one)."""
        site = self.smap.weights[w]
        return _latent(self.part_module(site.part, site.module), "bias")

    def trained_initializers(self) -> dict[str, np.ndarray]:
        """ONNX initializer name -> float value from the trained parts (weights in ONNX layout, biases)."""
        out: dict[str, np.ndarray] = {}
        for w, site in self.smap.weights.items():
            if site.part in self.frozen_parts:
                continue
            value = self.latent_weight(w).detach().cpu().numpy().astype(np.float32)
            out[w] = value.T.copy() if site.transpose else value
            bias = self.latent_bias(w)
            if site.bias is not None and bias is not None:
                out[site.bias] = bias.detach().cpu().numpy().astype(np.float32)
        for t, (part, path) in self.smap.extras.items():
            if part not in self.frozen_parts:
                out[t] = _tensor(self.smap.parts[part], path).detach().cpu().numpy().astype(np.float32)
        return out

    def train_mode(self) -> None:
        """Training mode, except BatchNorms left unfolded: their statistics stay the exported ones."""
        self.model.train()
        for gm in self.smap.parts.values():
            for m in gm.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def _latent(mod: nn.Module, name: str) -> torch.Tensor | None:
    """``mod``'s parameter ``name`` behind its parametrization (fake quant), or as it is."""
    if parametrize.is_parametrized(mod, name):
        return getattr(mod.parametrizations, name).original
    return getattr(mod, name, None)


def _tensor(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _fq_node_root(node: fx.Node) -> fx.Node:
    while node.op == "call_module" and str(node.target).startswith(f"{FQ_ATTR}."):
        node = node.args[0]
    return node


def _apply_use(gm: fx.GraphModule, key: str, value: fx.Node, consumers: tuple[str, ...] | None,
               observe: bool, tensor: str) -> None:
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    kwargs = {"observe": observe}
    if consumers is None:
        with g.inserting_after(value):
            fq = g.call_module(f"{FQ_ATTR}.{key}", (value,), kwargs)
        value.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
        return
    for name in consumers:
        user = by_name[name]
        arg = next((a for a in user.all_input_nodes if _fq_node_root(a) is value), None)
        if arg is None:
            raise SpecMapError(f"tensor {tensor!r}: fx node {name!r} does not read {value.name!r}")
        anchor = arg if arg.op != "placeholder" else [n for n in g.nodes if n.op == "placeholder"][-1]
        with g.inserting_after(anchor):
            fq = g.call_module(f"{FQ_ATTR}.{key}", (arg,), kwargs)
        user.replace_input_with(arg, fq)


def _check_exportable(qm: QatModel) -> None:
    """Every trained parameter of a traced part must be an exported initializer (else QAT would lose it)."""
    for part, gm in qm.smap.parts.items():
        if part in qm.frozen_parts:
            continue
        covered: set[int] = set()
        for site in qm.smap.weights.values():
            if site.part == part:
                mod = gm.get_submodule(site.module)
                covered.add(id(qm.latent_weight(site.tensor)))
                bias = _latent(mod, "bias")
                if site.bias is not None and bias is not None:
                    covered.add(id(bias))
        covered |= {id(_tensor(gm, path)) for p, path in qm.smap.extras.values() if p == part}
        quantizers = {id(q.scale_parameter) for q in [*qm.act.values(), *qm.weights.values()]}
        for name, p in gm.named_parameters():
            if p.requires_grad and id(p) not in covered | quantizers:
                raise QatError(f"parameter {part}.{name} is trained by QAT but maps to no ONNX initializer "
                               f"(a layer the exporter does not keep as Conv/Gemm with its weight)")


def _sync_weights(smap: SpecMap, onnx_model: onnx.ModelProto) -> None:
    """Start from the ONNX graph's own (exporter-folded) weights, so QAT step 0 is bit-identical to PTQ."""
    inits = {t.name: t for t in onnx_model.graph.initializer}
    with torch.no_grad():
        for w, site in smap.weights.items():
            mod = smap.parts[site.part].get_submodule(site.module)
            value = torch.from_numpy(numpy_helper.to_array(inits[w]).copy())
            mod.weight.copy_(value.T if site.transpose else value)
            if site.bias is not None and mod.bias is not None:
                mod.bias.copy_(torch.from_numpy(numpy_helper.to_array(inits[site.bias]).copy()))


def prepare_qat(model: nn.Module, onnx_model: onnx.ModelProto, spec: QuantSpec,
                ranges: Mapping[str, Any] | None = None, learnable: bool = False,
                momentum: float = 0.01, ranges_only: bool = False) -> QatModel:
    """Build the fake-quantized copy of ``model`` for ``spec`` (``model`` itself is left as it is).

    Args:
        model: the float KD model that ``onnx_model`` was exported from.
        onnx_model: the prepared float ONNX graph ``spec`` was built from.
        spec: the PTQ policy's QuantSpec (same PtqConfig and profile as PTQ).
        ranges: ``{tensor: (lo, hi) or TensorRange}`` for every range owner (calibration or a PTQ
            report); None leaves unit scales (set them later with ``set_range``).
        learnable: LSQ scales for the trained parts' activations and weights.
        momentum: EMA factor of observed activation ranges (0: ranges stay as calibrated).
        ranges_only: no weight is trained (every parameter but the scales has ``requires_grad`` off; a
            caller may turn biases back on) and no part is frozen: the teacher's quantizers learn (or
            observe) too and its values are exported (``qat.learn: ranges``).

    Raises:
        SpecMapError: a spec entry with no place in the fx graph. QatError: untraceable part, a
            trained parameter that cannot be exported, or a missing range.
    """
    smap = build_spec_map(model, onnx_model, spec)
    _sync_weights(smap, onnx_model)
    qmodel = copy.deepcopy(model)
    frozen = set() if ranges_only else {p for p in smap.parts
                                        if not any(q.requires_grad for q in getattr(model, p).parameters())}
    for part, gm in smap.parts.items():
        setattr(qmodel, part, gm)
        setattr(gm, FQ_ATTR, nn.ModuleDict())
    act: dict[str, ActFakeQuant] = {}
    keys: dict[str, str] = {}
    for t, site in smap.activations.items():
        if site.owner not in act:
            parts = {u.part for u in smap.activations[site.owner].uses} | {u.part for u in site.uses}
            trainable = not (parts & frozen)
            q = ActFakeQuant(site.params, site.owner, learnable and trainable, momentum)
            q.trainable = trainable
            act[site.owner], keys[site.owner] = q, f"a{len(act)}"
        key, q = keys[site.owner], act[site.owner]
        for use in site.uses:
            gm = smap.parts[use.part]
            fqs = getattr(gm, FQ_ATTR)
            if key not in fqs:
                fqs[key] = q
            value = next(n for n in gm.graph.nodes if n.name == use.value)
            _apply_use(gm, key, value, use.consumers, t == site.owner, t)
    weights: dict[str, WeightFakeQuant] = {}
    for w, site in smap.weights.items():
        if site.params is None:
            continue
        mod = smap.parts[site.part].get_submodule(site.module)
        trainable = site.part not in frozen
        wq = WeightFakeQuant(site.params, w, site.axis, mod.weight.shape[site.axis], learnable and trainable)
        wq.trainable = trainable
        wq.use_rule(spec.weight_range, mod.weight)
        wq.init_from(mod.weight)
        parametrize.register_parametrization(mod, "weight", wq)
        weights[w] = wq
    _quantize_biases(smap, act, weights)
    for gm in smap.parts.values():
        gm.graph.lint()
        gm.recompile()
    qm = QatModel(qmodel, smap, act, weights, frozen)
    if ranges_only:
        scales = {id(p) for p in qm.quantizer_parameters()}
        for p in qm.model.parameters():
            p.requires_grad_(id(p) in scales)
    _check_exportable(qm)
    if ranges is not None:
        set_ranges(qm, ranges)
    qm.set_frozen(False)
    log.info("QAT graph: %s", smap.summary())
    return qm


def _quantize_biases(smap: SpecMap, act: dict[str, ActFakeQuant], weights: dict[str, WeightFakeQuant]) -> None:
    """A :class:`BiasFakeQuant` on every bias the spec stores as int32 (Conv/Gemm with quantized input and weight)."""
    for b in smap.spec.biases.values():
        site, owner = smap.weights.get(b.weight), smap.activations.get(b.input)
        if site is None or owner is None or site.bias != b.tensor or b.weight not in weights:
            continue
        mod = smap.parts[site.part].get_submodule(site.module)
        if mod.bias is None:
            continue
        latent = (lambda m=mod: m.parametrizations.weight.original)  # noqa: E731 (the weight behind its fake quant)
        parametrize.register_parametrization(mod, "bias", BiasFakeQuant(act[owner.owner], weights[b.weight], latent))


def set_ranges(qm: QatModel, ranges: Mapping[str, Any]) -> None:
    """Set every range owner's float range from ``ranges`` (TensorRange-like or ``(lo, hi)``).

    A weight in ``ranges`` (a calibrator's choice: per-channel bounds, or a weight range rule's name)
    sets that weight's clip fractions; the others keep the spec's weight range rule.

    Raises:
        QatError: a range owner missing from ``ranges`` (named) or a non-finite range.
    """
    for w, wq in qm.weights.items():
        if w in ranges:
            r, latent = ranges[w], qm.latent_weight(w)
            if isinstance(r, str):
                wq.use_rule(r, latent)
            else:
                wq.use_bounds(*bounds_of(r), latent)
            wq.init_from(latent)
    for t, q in qm.act.items():
        if t not in ranges:
            raise QatError(f"no initial range for tensor {t!r}; calibrate or give a PTQ report that has it")
        r = ranges[t]
        lo, hi = bounds_of(r)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise QatError(f"initial range of tensor {t!r} is [{lo}, {hi}]; need finite bounds")
        q.set_range(float(lo), float(hi))
    grow_for_biases(qm)


def grow_for_biases(qm: QatModel) -> int:
    """Grow learned weight scales where the int32 bias would overflow, as insert_qdq does; return how many grew.

    Run when the ranges are set (so learned scales start where PTQ puts them) and after every optimizer step
    (:func:`qtool.qat.train.build_optimizer`): a learned weight or input scale can drop below that floor, and the
    bias fake quant would then clamp the bias at int32 (as the export would), away from its learned value.
    """
    count = 0
    for b in qm.spec.biases.values():
        wq, owner = qm.weights.get(b.weight), qm.smap.activations.get(b.input)
        bias = qm.latent_bias(b.weight) if wq is not None else None
        if bias is None or owner is None or not wq.learnable or wq.params.dtype != "int8" or wq.zero_point.any():
            continue
        ws = wq.get_scale().detach().numpy()
        grown = grow_for_int32_bias(ws if wq.axis is not None else ws.reshape(()),
                                    float(qm.act[owner.owner].get_scale().detach()), bias.detach().numpy())
        grown = grown.reshape(ws.shape)
        # the rule's 1e-4 margin covers a learned scale's float32 log round trip (~1e-7): only real drops count
        below = grown > ws * (1.0 + 1e-6)
        if below.any():
            count += int(np.count_nonzero(below))
            wq.put_scale(torch.from_numpy(grown), where=torch.from_numpy(below))  # the rest untouched, bit for bit
    return count
