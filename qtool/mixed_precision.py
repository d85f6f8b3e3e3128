"""Automatic mixed precision: per-layer sensitivity of a proxy AD metric, then the fewest float layers in budget.

A layer's sensitivity is what the criterion (``ptq.mixed_precision_criterion``, :data:`CRITERIA`) measures
when only that layer is quantized: ``separation`` (default), the proxy's drop (the larger of the image and
pixel AUROC drops on the search set), ties broken by the map distortion, and the budget bounds that drop;
``distortion``, the map distortion (:class:`qtool.proxy.MapDistortion`), ties broken by the proxy drop, and
the budget is the share of the all-quantized graph's distortion that may remain. The most sensitive layers
go back to float (fp16 on TensorRT) one at a time, in the order of the rank (``ptq.mixed_precision_rank``,
:data:`RANKS`: sensitivity alone, or sensitivity per share of the model's MACs), until the whole quantized model
is within the budget; then every fallback that is no longer needed is quantized again, so no single fallback
can be dropped. With bias correction the choice is then judged corrected, and more layers go float while it is
over the budget. Each remaining fallback's cost is stated twice: its share of the model's multiply-accumulates
(hardware independent) and its ONNX Runtime CPU latency. Widths below 8 bits have no integer kernels here (emulated in
float), so their fallbacks are timed on the executable stand-in: the same layers float, the rest at 8 bits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from qtool.bias_correction import Biases
from qtool.graph import QuantSpec, layer_groups, node_macs, subset
from qtool.proxy import separation_drop
from qtool.recipe import SearchConfig
from qtool.registry import Registry
from qtool.search import Harness

log = logging.getLogger(__name__)


Scores = Mapping[str, float]


def _drop(scores: Scores, all_quantized: Scores) -> float:
    return float(scores["drop"])


def _distortion_share(scores: Scores, all_quantized: Scores) -> float:
    return float(scores["loss"]) / float(all_quantized["loss"]) if all_quantized["loss"] > 0 else 0.0


@dataclass(frozen=True)
class Criterion:
    """What a mixed-precision budget bounds: ``value(scores, all_quantized)`` of a graph's proxy scores.

    ``key``: the score that ranks layers by sensitivity (higher is more sensitive), ``tie``: the one that breaks ties.
    """

    proxy: str
    key: str
    tie: str
    value: Callable[[Scores, Scores], float]


CRITERIA: Registry[Criterion] = Registry("mixed-precision criterion")
CRITERIA.add("separation", Criterion(
    "max of the image and pixel AUROC drops vs fp32 on the search set (synthetic anomalies vs normals)",
    "drop", "loss", _drop))
CRITERIA.add("distortion", Criterion(
    "share of the all-quantized graph's map distortion (upper tail and synthetic defect regions, flipped score "
    "pairs) left on the search set", "loss", "drop", _distortion_share))


@dataclass(frozen=True)
class Rank:
    """The order in which layers go float: by ``key(sensitivity, mac_share)``, higher first (``help`` says what)."""

    help: str
    key: Callable[[float, float], float]


RANKS: Registry[Rank] = Registry("mixed-precision rank")
RANKS.add("sensitivity", Rank("the criterion's sensitivity alone (the fewest layers)", lambda value, share: value))
RANKS.add("per-mac", Rank(
    "sensitivity per share of the model's multiply-accumulates (a cheaper float share for the same budget; a layer "
    "without MACs, e.g. an Add, counts as the cheapest layer that has some)", lambda value, share: value / share))


@dataclass
class MixedPrecision:
    """The chosen spec, the layers kept float, and the record of how they were chosen."""

    spec: QuantSpec
    fallback: list[str]
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class _Scorer:
    """Proxy and distortion of the model quantizing only some layers (every other node float).

    ``full``: the spec whose layers are quantized (default the harness's; the 8-bit stand-in to time an emulated one).
    """

    def __init__(self, harness: Harness, ranges: Mapping[str, Any], layers: dict[str, list[str]], reason: str,
                 full: QuantSpec | None = None) -> None:
        self.harness, self.ranges, self.layers, self.reason = harness, ranges, layers, reason
        self.full = full if full is not None else harness.spec

    def nodes(self, quantized: Collection[str]) -> list[str]:
        return [n for layer in self.layers if layer in quantized for n in self.layers[layer]]

    def spec(self, quantized: Collection[str]) -> QuantSpec:
        return subset(self.harness.model, self.full, self.nodes(quantized), self.reason)

    def model(self, quantized: Collection[str], biases: Biases | None = None) -> Any:
        return self.harness.build_nodes(self.ranges, self.nodes(quantized), self.reason, biases, self.full)

    def __call__(self, quantized: Collection[str], biases: Biases | None = None) -> dict[str, float]:
        scores = self.harness.proxy(self.harness.run(self.model(quantized, biases)))
        return {**scores, "drop": separation_drop(self.harness.reference_separation, scores)}


def choose_precision(harness: Harness, ranges: Mapping[str, Any], budget: float, cfg: SearchConfig,
                     progress: Callable[[int], None] | None = None, criterion: str = "separation",
                     correct: Callable[[QuantSpec], Biases] | None = None,
                     stand_in: QuantSpec | None = None, rank: str = "sensitivity") -> MixedPrecision:
    """Keep the fewest layers float that bring the criterion's value within ``budget`` (see the module).

    Args:
        harness: graph, full spec and search set; ranges: calibrated ranges of every tensor.
        budget: the largest value allowed: with ``separation`` the proxy drop (e.g. 0.005), with
            ``distortion`` the share of the all-quantized graph's distortion (e.g. 0.25).
        criterion: a name in :data:`CRITERIA`.
        correct: when the pipeline corrects biases, the corrected biases of a (sub-)spec: the chosen graph is
            then judged corrected, as it will be saved, and while it is over the budget the next most sensitive
            layers go float too (each step corrected again), so the correction is kept and the budget still holds.
        cfg: ``time_budget_s`` bounds the sensitivity scan (layers not scanned by then come last,
            in graph order); ``latency_iterations`` timed runs per model.
        progress: called with 1 per scanned layer.
        stand_in: the 8-bit spec of the same graph, to time the fallbacks on when ``harness.spec`` is emulated
            (below 8 bits); None: time the spec itself.
        rank: a name in :data:`RANKS`: the order in which the scanned layers go float.

    Returns:
        The spec with the fallback layers float, and the report (proxy before/after, per-layer
        sensitivity, fallbacks with their MAC share and latency cost).
    """
    t0 = time.monotonic()
    rule, order_by = CRITERIA.get(criterion), RANKS.get(rank)
    layers = layer_groups(harness.model, harness.spec)
    per_node = node_macs(harness.model)
    total = sum(per_node.values())  # the whole graph's, float parts (e.g. an unquantized head) included
    macs = {x: sum(per_node.get(n, 0) for n in nodes) for x, nodes in layers.items()}
    shares = _mac_shares(macs, total)
    names = list(layers)
    precision = "fp16" if harness.spec.profile.fp16_fallback else "fp32"
    reason = f"kept float by mixed precision ({precision} on {harness.spec.profile.name})"
    score = _Scorer(harness, ranges, layers, reason)
    full = score(names)

    def value(state: dict[str, float]) -> float:
        return rule.value(state, full)

    sens: dict[str, dict[str, float]] = {}
    for layer in names:
        if time.monotonic() - t0 > cfg.time_budget_s:
            break
        sens[layer] = score([layer])
        if progress:
            progress(1)
    order = ranked(names, sens, shares, rule, order_by)
    fallback: list[str] = []
    final = full
    while value(final) > budget and len(fallback) < len(order):  # with every layer float, both values are 0
        fallback.append(order[len(fallback)])
        final = score([x for x in names if x not in fallback])
    for layer in list(reversed(fallback)):  # least sensitive first: quantize again what is not needed
        trial = [x for x in fallback if x != layer]
        state = score([x for x in names if x not in trial])
        if value(state) <= budget:
            fallback, final = trial, state
    corrected: dict[str, Any] | None = None
    if correct is not None:
        fallback, final, corrected = _corrected(score, names, order, fallback, correct, lambda st: value(st) <= budget)
    fallback.sort(key=names.index)
    keep = [x for x in names if x not in fallback]
    spec = score.spec(keep) if fallback else harness.spec
    report: dict[str, Any] = {
        "budget": budget, "criterion": criterion, "proxy": rule.proxy, "rank": rank, "rank_by": order_by.help,
        "precision_kept": precision,
        "fp32": harness.reference_separation, "all_quantized": {**full, "value": value(full)},
        "final": {**final, "value": value(final)},
        "layers": len(names), "layers_scanned": len(sens), "scan_time_budget_s": cfg.time_budget_s,
        "fallback": [{"layer": x, "nodes": layers[x], "sensitivity": sens.get(x)} for x in fallback],
        "order": order, "rank_mac_share": shares,  # MAC-less layers at the floor (_mac_shares)
    }
    if corrected is not None:
        report["bias_corrected"] = corrected
    if fallback:
        report["macs"] = _macs(macs, total, fallback)  # exact counts (``shares`` floors MAC-less layers)
        timed = _Scorer(harness, ranges, layers, reason, stand_in) if stand_in is not None else score
        report["latency"] = _latency(harness, timed, names, fallback, cfg.latency_iterations)
        for entry in report["fallback"]:
            entry["macs_share"] = report["macs"]["fallback_share"][entry["layer"]]
            entry["latency_cost_ms"] = report["latency"]["fallback_cost_ms"][entry["layer"]]
    report["seconds"] = round(time.monotonic() - t0, 2)
    log.info("mixed precision: %d of %d layers kept float, %s %.4f -> %.4f (budget %.4f), %.1f s",
             len(fallback), len(names), criterion, value(full), value(final), budget, report["seconds"])
    return MixedPrecision(spec, fallback, sens, report)


def ranked(names: list[str], sens: Mapping[str, Scores], shares: Mapping[str, float], rule: Criterion,
           rank: Rank) -> list[str]:
    """The order in which layers go float: scanned ones by ``rank``, unscanned ones last.

    Scanned layers sort by ``rank`` of the criterion's key, then of its tie, then graph order. ``names``: every
    layer in graph order; ``sens``: scores of the scanned ones; ``shares``: their MAC shares.
    """
    position = {layer: i for i, layer in enumerate(names)}
    order = sorted(sens, key=lambda x: (-rank.key(sens[x][rule.key], shares[x]),
                                        -rank.key(sens[x][rule.tie], shares[x]), position[x]))
    return order + [x for x in names if x not in sens]


def _corrected(score: _Scorer, names: list[str], order: list[str], fallback: list[str],
               correct: Callable[[QuantSpec], Biases], within: Callable[[dict[str, float]], bool]
               ) -> tuple[list[str], dict[str, float], dict[str, Any]]:
    """Judge the choice with corrected biases; while over the budget, float the next layer in ``order`` too."""
    fallback, added = list(fallback), []
    while True:
        keep = [x for x in names if x not in fallback]
        state = score(keep, correct(score.spec(keep)))
        if within(state) or len(fallback) == len(names):
            return fallback, state, {"added": added, "graphs": len(added) + 1}
        layer = next(x for x in order if x not in fallback)
        fallback.append(layer)
        added.append(layer)


def _mac_shares(macs: Mapping[str, int], total: int) -> dict[str, float]:
    """Each layer's share of the graph's ``total`` MACs, one without any at the smallest non-zero share (or 1)."""
    share = {x: m / total if total else 0.0 for x, m in macs.items()}
    floor = min((v for v in share.values() if v > 0), default=1.0)
    return {x: v if v > 0 else floor for x, v in share.items()}


def _macs(macs: Mapping[str, int], total: int, fallback: list[str]) -> dict[str, Any]:
    """Multiply-accumulates of the whole graph, those the fallback layers keep float, and each one's share."""
    per = {f: macs[f] for f in fallback}
    return {"total": total, "float": sum(per.values()),
            "float_share": round(sum(per.values()) / total, 6) if total else None,
            "fallback_share": {f: round(m / total, 6) if total else None for f, m in per.items()},
            "counted": "Conv, ConvTranspose, Gemm, MatMul"}


def _latency(harness: Harness, score: _Scorer, names: list[str], fallback: list[str], iterations: int
             ) -> dict[str, Any]:
    """ORT CPU latency of fp32, the all-quantized and final models; per fallback, final minus final-with-it-quantized.

    ``score`` builds the timed graphs: the stand-in's 8-bit spec when the chosen one is emulated.
    """
    keep = [x for x in names if x not in fallback]
    final = harness.latency_ms(score.model(keep), iterations)
    costs = {f: round(final - harness.latency_ms(score.model([*keep, f]), iterations), 4) for f in fallback}
    timed, chosen, stand_in = score.full, harness.spec, score.full is not harness.spec
    graph = (f"w{timed.weight_bits}a{timed.activation_bits} stand-in: the same layers float, the rest at 8 bits with "
             f"integer kernels (w{chosen.weight_bits}a{chosen.activation_bits} has none here: emulated in float)"
             if stand_in else f"as chosen (w{chosen.weight_bits}a{chosen.activation_bits})")
    return {"runtime": "onnxruntime cpu (default optimisations), one input batch, median", "graph": graph,
            "stand_in": stand_in, "iterations": iterations,
            "fp32_ms": round(harness.latency_ms(harness.model, iterations), 4),
            "all_quantized_ms": round(harness.latency_ms(score.model(names), iterations), 4),
            "final_ms": round(final, 4), "fallback_cost_ms": costs}
