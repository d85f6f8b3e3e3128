"""Map-aware calibrator: per tensor, the histogram candidate range that best preserves the anomaly map.

Candidates come from the standard rules over one shared histogram (min/max, KL, MSE, percentiles);
``refine`` scores each whole rule, then improves the best one tensor by tensor (coordinate descent),
by running the quantized graph on normal calibration images and synthetic anomalies, judged by
:class:`qtool.proxy.MapDistortion`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from onnx import numpy_helper

from calibrators.base import Calibrator, TensorRange, WeightRange, finite_values
from calibrators.context import SearchContext
from calibrators.evidence import EvidenceGate
from calibrators.graph_search import GraphSearch
from calibrators.objectives import OBJECTIVES, Scores
from calibrators.rule_bank import SEARCH_SUFFIX, RuleBank
from qtool.errors import CalibrationError
from qtool.graph.weight_ranges import WEIGHT_RANGES, weight_bounds

log = logging.getLogger(__name__)
Candidates = list[tuple[list[str], TensorRange | WeightRange]]


class MapAwareCalibrator(Calibrator):
    """Choose each tensor's clipping range by what it does to the final anomaly map and image scores.

    ``compute`` returns the ``initial`` rule's ranges (mse by default) and keeps
    every rule's candidate per tensor (rules with identical bounds are one candidate): each rule on
    the calibration source alone (the range its standalone calibrator gives) and, with
    ``search_candidates``, each rule again on the source plus the search images (``mse+search``...),
    whose ranges cover the synthetic anomalies. ``refine`` searches on the fully
    quantized graph, run on the search set (normal calibration images and synthetic anomalies), in
    two stages:

    1. rules: every tensor at one rule's range, for each rule (``initial`` first); the best by the
       ``objective`` is the base. ``separation``: the highest pixel AUROC of the synthetic
       anomalies against the normals, then image AUROC, then the lowest map distortion, among the
       rules whose image AUROC is within ``IMAGE_TOLERANCE`` (0.1) of the best rule's;
       ``distortion`` (default): the lowest map distortion (fp32 map error over the upper tail and the
       synthetic defect regions, plus flipped normal/anomaly score pairs). Separation chases small
       search-set AUROC gains at large distortion (multi-class STFPM, 8 bits: entropy+search for +0.004
       search-set pixel AUROC at five times mse's distortion, test pixel AUROC 0.660 vs 0.791); on four
       models at 8, 6 and 4 bits (corrected scan, bias correction) distortion fell significantly below the
       best standard calibrator in 2 of 24 cell-metrics, separation in 3
       (``bench/results/map_aware_distortion6_decision_rule.txt``, pre-registered).
       ``anchored``: no scan; ``initial`` itself is the base (a proxy-picked rule need not carry
       over to test data, and one fixed rule, mse, had the fewest shortfalls across the grids:
       ``bench/results/calibrator_every_*.md``), and the whole budget goes to stage 2.
    2. tensors: coordinate descent from the base, one tensor at a time (those whose candidates differ
       by the most quantization steps first, then graph order): each other candidate is tried with
       every other tensor at its current range, and kept only if it lowers the distortion and, under
       ``separation`` and ``anchored``, lowers neither AUROC.

    With ``corrected_scan`` (and bias correction on in the pipeline: ``SearchContext.correct``), each whole
    rule of stage 1 (activation and weight rules alike) is scored on the graph whose biases are corrected for
    that rule's ranges, as the pipeline corrects the graph it saves, and stage 2 builds every candidate with
    the base's corrected biases (not corrected again per candidate); the pipeline then corrects the final
    ranges' graph. Each correction costs a few graph runs on the calibration images (``corrections`` in the
    summary), outside ``max_graphs``.

    Final check (``final_check``, on; only when the pipeline corrects biases and the descent changed a range):
    the descent judged its moves on graphs without biases corrected for them (uncorrected, or with the base's
    corrected biases), but the pipeline saves the graph corrected for the final ranges. So the result and the
    base are scored once more as they will be saved, each with biases corrected for its own ranges, and the
    descent is undone (the base's ranges returned) unless the result still lowers neither AUROC (under
    ``separation`` and ``anchored``) and distorts no more. One or two corrections and graph runs, outside
    ``max_graphs``; ``final_check`` in the summary holds both scores and the verdict. With a check set
    (``SearchContext.check``, ``ptq.search.check_normals`` > 0) both are scored on it instead: images the descent
    was not chosen on, so a move that only fits the search set is undone (``final_check.set``: "check").

    Evidence (``evidence`` = p, 0 = off; :mod:`calibrators.evidence`): the search leaves its priors (``initial``,
    the spec's weight range, the base in the final check) only for a rule or a descent that distorts less in at
    least a share p of paired bootstrap resamples of the search (or check) images; ``evidence`` in the summary
    holds every share computed. With ``guard`` ("separation") the ``separation`` objective must also prefer the
    departure to the prior on the same images. The descent's single moves are not gated (nor recorded).

    Confirmation (``confirm``, off; needs a check set, ``ptq.search.check_normals`` > 0, best with anomalies of other
    kinds, ``ptq.search.check_kinds``): every departure the search set accepted (the base rule over ``initial``,
    the weight base over the spec's weight range, the descent over its base, after the final check, which then
    runs on the search set) is judged again on the check set, the prior and the departure scored there the same
    way (the descent as saved), and kept only if there too the gate is convinced and the objective picks it (the
    descent: the final check's test); otherwise the prior stays. It only vetoes; its graph runs are outside
    ``max_graphs`` (``confirm`` in the summary: every comparison and its verdict).

    So the result never distorts more than the base and, under ``separation``, never separates the
    search set worse than the best whole rule (under ``anchored``, than ``initial``); with bias correction
    on and ``final_check``, the result as saved is also never worse than the base as saved. Ties keep the
    earlier choice (``initial`` first), so the search is deterministic. Two budgets bound it: ``max_graphs``
    quantized graphs run (a budget that gives the same result on any machine) and ``time_budget_s`` seconds (a
    safety cap; a search it stops depends on the machine's speed, and says so). When one runs out, the remaining
    tensors keep the base rule's range (``initial``'s if no rule was scored). After ``refine``,
    :attr:`search_summary` holds the rule scores, the base, the counts and which budget stopped it.

    Options: ``num_bins`` (2048), ``percentiles`` ([99.9, 99.99, 99.999]), ``initial`` ("mse"; or "minmax",
    "entropy", "percentile-P"), ``objective`` ("distortion", "separation" or "anchored"),
    ``search_candidates`` (True), ``search_weights`` (True: each weight's bounds under every rule in
    ``qtool.graph.weight_ranges`` are candidates too, scanned as whole rules after the activation rules,
    then searched in the same descent; False: weights keep the spec's weight range rule; the default since
    bench/results/map_aware_weights_decision_rule.txt), ``max_graphs`` (None: no limit but the time),
    ``time_budget_s`` (300), ``tail_quantile`` (0.99: fp32 map values above this quantile on normals count as
    tail), ``rank_weight`` (1.0: weight of flipped pairs in the distortion), ``corrected_scan`` (False: rules
    scored as quantized, without bias correction; see above), ``final_check`` (True; see above), ``evidence``
    (0.95: see above; 0 turns the gate off), ``guard`` ("separation"; "none" turns it off: see above), ``confirm``
    (False: see above).
    """

    OPTIONS = {"num_bins": 2048, "percentiles": [99.9, 99.99, 99.999], "initial": "mse",
               "objective": "distortion", "search_candidates": True, "search_weights": True, "max_graphs": None,
               "time_budget_s": 300.0, "tail_quantile": 0.99, "rank_weight": 1.0, "corrected_scan": False,
               "final_check": True, "evidence": 0.95, "guard": "separation", "confirm": False}
    needs_graph = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        ps = o["percentiles"]
        if not isinstance(ps, (list, tuple)) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 50.0 <= p <= 100.0 for p in ps):
            raise self._option_error("percentiles", "a list of numbers in [50, 100]")
        if o["num_bins"] < 8:
            raise self._option_error("num_bins", "an integer >= 8")
        graphs = o["max_graphs"]
        if graphs is not None and (not isinstance(graphs, int) or isinstance(graphs, bool) or graphs < 0):
            raise self._option_error("max_graphs", "an integer >= 0, or null for no limit")
        if o["time_budget_s"] < 0:
            raise self._option_error("time_budget_s", "a number of seconds >= 0")
        if not 0.0 < o["tail_quantile"] < 1.0:
            raise self._option_error("tail_quantile", "a number in (0, 1)")
        if o["rank_weight"] < 0:
            raise self._option_error("rank_weight", "a number >= 0")
        for option, expected in EvidenceGate.problems(o["evidence"], o["guard"]):
            raise self._option_error(option, expected)
        if not isinstance(o["confirm"], bool):
            raise self._option_error("confirm", "true or false")
        if o["objective"] not in OBJECTIVES.names():
            raise self._option_error("objective", "one of " + ", ".join(OBJECTIVES.names()))
        self.objective = OBJECTIVES.get(o["objective"])
        def bank() -> RuleBank:
            return RuleBank(self.symmetric, self.num_bits, o["num_bins"], ps)

        # "": the calibration source only (each rule as its standalone calibrator computes it);
        # SEARCH_SUFFIX: the source plus the search images, whose ranges cover the synthetic anomalies
        self.banks = {"": bank(), **({SEARCH_SUFFIX: bank()} if o["search_candidates"] else {})}
        self.labels = self.banks[""].labels
        if o["initial"] not in self.labels:
            raise self._option_error("initial", "one of " + ", ".join(self.labels))
        self.candidates: dict[str, Candidates] = {}
        self.weight_levels: dict[str, int] = {}  # integer steps of each searched weight's width
        self.weight_rules: list[str] = []  # the weight range rules, the spec's first (set by refine)
        self._search_images = False

    def observe(self, name: str, array: np.ndarray) -> None:
        """Add one batch of ``name`` to the shared histograms (see :meth:`Calibrator.observe`).

        Calibration-source batches go to both rule banks; after :meth:`begin_search_images`, only to
        the ``+search`` bank.
        """
        checked = finite_values(name, array)
        if checked is not None:
            for suffix, bank in self.banks.items():
                if suffix == SEARCH_SUFFIX or not self._search_images:
                    bank.add(name, checked)

    def begin_search_images(self) -> None:
        """What follows are search images (normals and synthetic anomalies), not the calibration source."""
        self._search_images = True

    def compute(self) -> dict[str, TensorRange]:
        """Every rule's range per tensor as candidates; returns the ``initial`` rule's (see :meth:`refine`)."""
        names = self.banks[""].names()
        if not names:
            raise CalibrationError("no calibration data observed")
        by_rule = {label + suffix: r for suffix, bank in self.banks.items() for label, r in bank.ranges().items()}
        order = self._rule_order()
        out: dict[str, TensorRange] = {}
        for name in names:
            cands: list[tuple[list[str], TensorRange]] = []
            for label in order:
                r = by_rule[label][name]
                same = next((c for c in cands if self._same(c[1], r)), None)
                if same is None:
                    cands.append(([label], TensorRange(r.lo, r.hi)))
                else:
                    same[0].append(label)
            self.candidates[name] = cands
            out[name] = self._with_meta(name, 0, {}, "not searched")
        return out

    @staticmethod
    def _same(a: TensorRange, b: TensorRange) -> bool:
        """Identical bounds: one candidate; near-equal ranges stay apart, so each rule's candidate is its own range."""
        return a.lo == b.lo and a.hi == b.hi

    def _with_meta(self, name: str, chosen: int, losses: dict[int, dict[str, float]], status: str,
                   base: str | None = None, initial: str | None = None) -> TensorRange | WeightRange:
        cands = self.candidates[name]
        initial = initial or self.options["initial"]
        listed = [{"rules": labels, **r.to_dict(), **losses.get(i, {})} for i, (labels, r) in enumerate(cands)]
        meta = {"chosen": cands[chosen][0], "initial": initial, "base": base or initial, "search": status,
                "candidates": listed}
        return dataclasses.replace(cands[chosen][1], meta=meta)

    def _index_of(self, name: str, rule: str) -> int:
        """Which candidate of ``name`` holds ``rule``'s range."""
        return next(i for i, (labels, _) in enumerate(self.candidates[name]) if rule in labels)

    def _spread(self, name: str) -> float:
        """How many quantization steps the candidates of ``name`` span (bounds' spread over the widest step).

        A weight's is the mean over its channels, each in that channel's own step.
        """
        los = np.array([np.asarray(r.lo, np.float64) for _, r in self.candidates[name]])
        his = np.array([np.asarray(r.hi, np.float64) for _, r in self.candidates[name]])
        levels = self.weight_levels.get(name, (1 << self.num_bits) - 1)
        step = (his.max(axis=0) - los.min(axis=0)) / levels
        step = np.where(step > 0, step, 1.0)
        return float(np.mean((his.max(axis=0) - his.min(axis=0) + los.max(axis=0) - los.min(axis=0)) / step))

    def _weight_candidates(self, context: SearchContext) -> list[str]:
        """Each quantized weight's candidate bounds, one per weight range rule (the spec's own first).

        Returns the weights (graph order) whose rules do not all agree, i.e. that have something to search.
        """
        spec = context.spec
        rules = self.weight_rules = [spec.weight_range, *(r for r in WEIGHT_RANGES.names() if r != spec.weight_range)]
        data = {t.name: t for t in context.model.graph.initializer}
        searched = []
        for w, params in spec.weights.items():
            cands: Candidates = []
            values = numpy_helper.to_array(data[w])
            for rule in rules:
                lo, hi = weight_bounds(rule, values, params)
                same = next((c for c in cands if np.array_equal(c[1].lo, lo) and np.array_equal(c[1].hi, hi)), None)
                if same is None:
                    cands.append(([rule], WeightRange(lo, hi)))
                else:
                    same[0].append(rule)
            self.candidates[w] = cands
            self.weight_levels[w] = params.qmax - params.qmin
            if len(cands) > 1:
                searched.append(w)
        return searched

    def refine(self, ranges: dict[str, TensorRange], context: SearchContext) -> dict[str, TensorRange]:
        """Whole rules, then coordinate descent per tensor, on the quantized graph (see the class)."""
        search = GraphSearch(context, self.objective, self.options)
        objective, gate, spent, score = self.objective, search.gate, search.spent, search.score
        judge, confirmed, corrected, confirm = search.judge, search.confirmed, search.corrected, search.confirm
        check_set, loss, check_loss = search.check_set, search.loss, search.check_loss

        def at_rule(tensors: list[str], rule: str, onto: dict[str, TensorRange]) -> dict[str, TensorRange]:
            """``onto`` with each of ``tensors`` at ``rule``'s candidate."""
            return {**onto, **{t: self.candidates[t][self._index_of(t, rule)][1] for t in tensors}}

        names = [t for t in context.tensors if t in self.candidates]
        rule_scores: dict[str, Scores] = {}
        rule_biases: dict[str, Any] = {}
        seen: dict[tuple[int, ...], tuple[Scores, Any]] = {}
        for rule in (self._rule_order() if objective.scans else [self.options["initial"]]) if names else []:
            if spent():
                break
            key = tuple(self._index_of(n, rule) for n in names)  # a rule whose every range another rule has: no run
            if key not in seen:
                seen[key] = judge({**ranges, **{n: self.candidates[n][i][1] for n, i in zip(names, key)}})
            rule_scores[rule], rule_biases[rule] = seen[key]
        initial = self.options["initial"]
        base = objective.choose(gate.eligible(rule_scores, initial, "rule")) if rule_scores else initial
        if base != initial and not confirmed((at_rule(names, initial, ranges), rule_biases[initial]),
                                             (at_rule(names, base, ranges), rule_biases[base]),
                                             f"rule {base} vs {initial}"):
            base = initial
        index = {n: self._index_of(n, base) for n in names}
        current = {**ranges, **{n: self.candidates[n][index[n]][1] for n in names}}
        best, biases = rule_scores.get(base), rule_biases.get(base)
        # weights: every weight at each weight range rule (the spec's first, already scored), the best as their base
        weights = self._weight_candidates(context) if self.options["search_weights"] and names else []
        weight_base = context.spec.weight_range if weights else None
        weight_scores: dict[str, Scores] = {}
        if weights and best is not None:
            weight_scores[weight_base] = best
            weight_biases = {weight_base: biases}
            for rule in self.weight_rules[1:] if objective.scans else []:
                if spent():
                    break
                weight_scores[rule], weight_biases[rule] = judge(at_rule(weights, rule, current))
            spec_rule = weight_base
            weight_base = objective.choose(gate.eligible(weight_scores, spec_rule, "weight rule"))
            if weight_base != spec_rule and not confirmed(
                    (at_rule(weights, spec_rule, current), weight_biases[spec_rule]),
                    (at_rule(weights, weight_base, current), weight_biases[weight_base]),
                    f"weight rule {weight_base} vs {spec_rule}"):
                weight_base = spec_rule
            best, biases = weight_scores[weight_base], weight_biases[weight_base]
        for w in weights:
            index[w] = self._index_of(w, weight_base)
            current[w] = self.candidates[w][index[w]][1]
        bases = {**dict.fromkeys(names, base), **dict.fromkeys(weights, weight_base)}
        out: dict[str, TensorRange | WeightRange] = {}
        changed = 0
        start, start_scores = dict(index), best
        tried_by: dict[str, dict[int, Scores]] = {}

        def meta(name: str, status: str) -> TensorRange | WeightRange:
            """``name``'s current range with its search record (candidates, their scores, base, status)."""
            return self._with_meta(name, index[name], tried_by[name], status, bases[name],
                                   context.spec.weight_range if name in self.weight_levels else None)

        for name in sorted([*names, *weights], key=lambda n: -self._spread(n)):  # stable: graph order among equals
            cands = self.candidates[name]
            tried: dict[int, Scores] = {}
            if len(cands) < 2:
                status = "single candidate"
            elif best is None or spent():
                status = f"{search.stop} budget spent: base kept"
            else:
                tried[index[name]] = best
                for i in (i for i in range(len(cands)) if i != index[name]):
                    if spent():
                        break
                    tried[i] = score({**current, name: cands[i][1]}, biases, judged=False)
                status = "searched" if len(tried) == len(cands) else f"{search.stop} budget spent: best so far"
                kept = [i for i in tried if i == index[name] or objective.keeps(tried[i], best)]
                pick = min(kept, key=lambda i: (tried[i]["loss"], i != index[name]))  # ties keep the current
                if pick != index[name]:
                    index[name], best, changed = pick, tried[pick], changed + 1
                    current[name] = cands[pick][1]
            tried_by[name] = tried
            out[name] = meta(name, status)
            if context.progress:
                context.progress(1)
        search_runs, check = search.runs, None
        base_ranges = {**current, **{n: self.candidates[n][i][1] for n, i in start.items()}}
        keep = True
        if changed and context.correct is not None and self.options["final_check"]:
            # the descent judged its moves on graphs whose biases are not the ones the pipeline saves: compare the
            # result with the base as both will be saved (each with biases corrected for its own ranges), on the
            # check set when there is one and confirm is off (with confirm the check set confirms it below)
            on = check_set if check_set is not None and not confirm else context
            against = loss if on is context else check_loss
            base_saved = (start_scores if corrected and on is context else
                          search.as_saved(base_ranges, on, against)[0])
            result_saved, _ = search.as_saved(current, on, against)
            keep = (objective.keeps(result_saved, base_saved) and result_saved["loss"] <= base_saved["loss"]
                    and gate.convinced(base_saved, result_saved, "descent vs base"))
            check = {"set": "search" if on is context else "check", "images": len(on.images),
                     "base": base_saved, "result": result_saved, "kept": "descent" if keep else "base",
                     "graphs_run": search.runs - search_runs, "changes_undone": 0 if keep else changed}
        undone_by = None if keep else "final check"
        if changed and keep and confirm:  # as saved: with the biases the pipeline corrects for each (if it does)
            keep = confirmed((base_ranges, search.saved_biases(base_ranges)), (current, search.saved_biases(current)),
                             "descent vs base", descent=True)
            undone_by = None if keep else "confirmation"
            if check is not None:
                check.update(kept="descent" if keep else "base", changes_undone=0 if keep else changed)
        if not keep:
            for name in [n for n in start if start[n] != index[n]]:
                index[name], current[name] = start[name], self.candidates[name][start[name]][1]
                out[name] = meta(name, f"descent undone by the {undone_by}")
            best, changed = start_scores, 0
        seconds, stop, budget, runs = search.seconds(), search.stop, search.budget, search.runs
        self.search_summary = {
            "objective": self.options["objective"], "rule_losses": rule_scores, "base": base, "final": best,
            "graphs_run": search_runs, "corrected_scan": corrected, "corrections": search.corrections,
            "final_check": check,
            "tensors": len(names), "tensors_changed_from_base": changed,
            "weights_searched": len(weights), "weight_rule_scores": weight_scores, "weight_base": weight_base,
            "seconds": round(seconds, 3), "budget_s": budget, "max_graphs": search.max_graphs,
            "budget_spent": stop is not None, "stopped_by": stop, "evidence": gate.summary(),
            "confirm": None if not confirm else {"images": len(check_set.images), "graphs_run": search.confirm_runs,
                                                 "departures": search.confirmations},
        }
        if stop == "time" and budget > 0:
            log.warning("map-aware search stopped by its time budget (%g s) after %d graphs: the result depends on "
                        "this machine's speed; set ptq.calib_options.max_graphs (under %d) for one that does not",
                        budget, runs, runs)
        log.info("map-aware search (%s): base rule %s (of %d scored), %d tensors, %d graphs run, %d ranges changed, "
                 "%.1f s", self.options["objective"], base, len(rule_scores), len(names), runs, changed, seconds)
        return {**ranges, **out}

    def _rule_order(self) -> list[str]:
        """The rules in scoring order: ``initial`` first, then min/max and the histogram rules, each bank in turn."""
        initial = self.options["initial"]
        plain = [initial, *(k for k in self.labels if k != initial)]
        return [label + suffix for suffix in self.banks for label in plain]
