"""The pieces a SpecMap is made of: where each ONNX node, activation and weight of a QuantSpec sits in fx.

Built by :func:`qtool.qat.spec_map.build_spec_map`; read by :mod:`qtool.qat.insert`, which installs the
fake-quants the sites describe.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from qtool.graph.policy import QuantSpec
from qtool.graph.profiles import QuantParams


@dataclass(frozen=True)
class FxSite:
    """Where an ONNX node lives: part, fx node name, and whether it is one op inside that leaf call."""

    part: str
    node: str
    internal: bool = False


@dataclass(frozen=True)
class FqUse:
    """One fake-quant application: the fx node carrying the tensor, and who reads the fake-quantized value.

    ``consumers`` None: every reader (the producer is quantized); else those fx nodes only.
    """

    part: str
    value: str
    consumers: tuple[str, ...] | None


@dataclass
class ActivationSite:
    """A spec activation: its range owner, params, and its fake-quant uses in the fx graphs."""

    tensor: str
    owner: str
    params: QuantParams
    uses: list[FqUse] = field(default_factory=list)
    how: str = ""


@dataclass(frozen=True)
class WeightSite:
    """A weighted ONNX node's initializer and the torch module holding it (params None: kept float)."""

    tensor: str
    node: str
    part: str
    module: str
    params: QuantParams | None
    axis: int
    transpose: bool
    bias: str | None


@dataclass
class SpecMap:
    """The spec placed on fx: traced parts, node sites, activation and weight sites."""

    spec: QuantSpec
    input_name: str
    parts: dict[str, fx.GraphModule]
    nodes: dict[str, FxSite]
    activations: dict[str, ActivationSite]
    weights: dict[str, WeightSite]
    extras: dict[str, tuple[str, str]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts for the run report."""
        how: dict[str, int] = defaultdict(int)
        for a in self.activations.values():
            how[a.how] += 1
        return {"parts": sorted(self.parts), "matched_nodes": len(self.nodes),
                "activations": len(self.activations), "placement": dict(how),
                "quantized_weights": sum(w.params is not None for w in self.weights.values()),
                "float_weights": sum(w.params is None for w in self.weights.values())}
