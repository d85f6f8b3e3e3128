"""Map-aware's evidence gate: per-image distortion, its bootstrap, and where the search may leave its prior.

Oracles: the distortion recomputed pixel by pixel on the resampled images (np.repeat of each drawn image), hand-made
maps whose per-image errors are known, and each rule's graph rebuilt with insert_qdq and run in plain ORT sessions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.ort_utils import map_outputs
from helpers.outlier_model import TEACHER_TENSOR, outlier_model, smooth_normals

from calibrators import get_calibrator
from calibrators.evidence import EvidenceGate
from calibrators.objectives import OBJECTIVES
from qtool.bias_correction import BiasCorrector, correct_biases
from qtool.calibrate import calibrate
from qtool.errors import CalibrationError
from qtool.graph import build_spec, insert_qdq, prepare
from qtool.proxy import MapDistortion, separation
from qtool.recipe import PtqConfig
from qtool.search import Harness, search_set_from_arrays


def _toy(n_normal: int = 10, n_anomalous: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_normal + n_anomalous
    labels = np.r_[np.zeros(n_normal), np.ones(n_anomalous)].astype(int)
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[n_normal:, 2:5, 3:6] = 1
    ref = rng.random((n, 8, 8)) + 2.0 * masks
    return ref, ref.reshape(n, -1).max(axis=1), masks, labels


def _oracle_loss(d: MapDistortion, ref, ref_scores, maps, scores, labels, counts) -> float:
    """The distortion by its definition, on the images repeated as often as ``counts`` says."""
    idx = np.repeat(np.arange(len(counts)), counts)
    err = np.concatenate([(maps[i] - ref[i])[d.region[i]] for i in idx])
    base = np.concatenate([ref[i][d.region[i]] for i in idx])
    rel = math.sqrt(np.mean(err**2)) / math.sqrt(np.mean(base**2))
    normals, anomalies = idx[labels[idx] == 0], idx[labels[idx] == 1]
    flips = []
    for a in normals:
        for b in anomalies:
            new, old = np.sign(scores[b] - scores[a]), np.sign(ref_scores[b] - ref_scores[a])
            flips.append(0.0 if new == old else 0.5 if new == 0 else 1.0)
    return rel + d.rank_weight * float(np.mean(flips))


def test_resampled_losses_are_the_distortion_of_the_resampled_images():
    ref, ref_scores, masks, labels = _toy()
    d = MapDistortion(ref, ref_scores, masks, labels, rank_weight=0.7)
    rng = np.random.default_rng(1)
    maps = ref + rng.normal(0, 0.2, ref.shape)
    scores = ref_scores + rng.normal(0, 0.8, ref_scores.shape)  # some pairs flip
    parts = d.parts(maps, scores)
    ones = np.ones((1, len(labels)), np.int64)
    assert d.resampled_losses(parts, ones)[0] == pytest.approx(d(maps, scores)["loss"], rel=1e-12)
    draws = d.draws(25, seed=3)
    got = d.resampled_losses(parts, draws)
    for row, value in zip(draws, got):
        assert value == pytest.approx(_oracle_loss(d, ref, ref_scores, maps, scores, labels, row), rel=1e-9)


def test_draws_resample_normals_and_anomalies_separately_and_are_deterministic():
    ref, ref_scores, masks, labels = _toy()
    d = MapDistortion(ref, ref_scores, masks, labels)
    draws = d.draws(200, seed=5)
    assert draws.shape == (200, len(labels))
    assert (draws[:, labels == 0].sum(axis=1) == 10).all() and (draws[:, labels == 1].sum(axis=1) == 6).all()
    assert np.array_equal(draws, d.draws(200, seed=5)) and not np.array_equal(draws, d.draws(200, seed=6))
    assert len({tuple(r) for r in draws}) > 150  # resamples, not copies of the set


def test_gate_passes_a_graph_better_on_every_image_and_holds_one_better_on_a_single_image():
    ref, ref_scores, masks, labels = _toy()
    d = MapDistortion(ref, ref_scores, masks, labels)
    rng = np.random.default_rng(2)
    noise = rng.choice([-1.0, 1.0], size=ref.shape)  # |error| fixed per pixel: per-image errors are known
    lucky_err = np.full(len(labels), 0.102)
    lucky_err[12] = 0.0  # better on one anomaly only, slightly worse on the 15 others
    graphs = {"prior": ref + 0.1 * noise, "lucky": ref + lucky_err[:, None, None] * noise,
              "better": ref + 0.09 * noise}
    gate, scores = EvidenceGate(0.95), {}
    for name, maps in graphs.items():
        scores[name] = d(maps, ref_scores)
        gate.record(scores[name], d, d.parts(maps, ref_scores))
    assert scores["lucky"]["loss"] < scores["prior"]["loss"]  # premise: lowest-loss pick would leave the prior
    assert gate.share(scores["prior"], scores["better"]) == 1.0
    assert gate.share(scores["prior"], scores["lucky"]) < 0.95
    eligible = gate.eligible(scores, "prior", "rule")
    assert list(eligible) == ["prior", "better"]
    assert OBJECTIVES.get("distortion").choose(eligible) == "better"
    assert set(gate.summary()["shares"]) == {"rule lucky vs prior", "rule better vs prior"}
    off = EvidenceGate(0.0)
    assert off.eligible(scores, "prior", "rule") is scores and off.summary() is None
    assert off.convinced(scores["prior"], scores["lucky"], "x")


def test_guard_holds_a_graph_that_distorts_less_but_ranks_the_defect_pixels_worse():
    """Distortion counts only the tail and defect region; the guard sees pixels outside it outscore the defects."""
    ref, ref_scores, masks, labels = _toy()
    d = MapDistortion(ref, ref_scores, masks, labels)
    rng = np.random.default_rng(4)
    prior = ref + 0.1 * rng.choice([-1.0, 1.0], size=ref.shape)
    worse_ranked = ref + 0.05 * rng.choice([-1.0, 1.0], size=ref.shape)
    outside = ~d.region & (rng.random(ref.shape) < 0.3)
    worse_ranked[outside] = 2.5  # above the defects' values, in pixels the distortion does not count
    graphs = {"prior": prior, "worse_ranked": worse_ranked, "better": ref + 0.05 * np.sign(prior - ref)}
    scores, gates = {}, {"none": EvidenceGate(0.95), "separation": EvidenceGate(0.95, "separation"),
                         "guard only": EvidenceGate(0.0, "separation")}
    for name, maps in graphs.items():
        scores[name] = {**d(maps, ref_scores), **separation(maps, ref_scores, masks, labels)}
        for gate in gates.values():
            gate.record(scores[name], d, d.parts(maps, ref_scores))
    assert scores["worse_ranked"]["pixel_auroc"] < scores["prior"]["pixel_auroc"]  # premises
    assert scores["worse_ranked"]["image_auroc"] == scores["prior"]["image_auroc"] == 1.0
    assert gates["none"].share(scores["prior"], scores["worse_ranked"]) == 1.0
    assert list(gates["none"].eligible(scores, "prior", "rule")) == ["prior", "worse_ranked", "better"]
    for name in ("separation", "guard only"):
        assert list(gates[name].eligible(scores, "prior", "rule")) == ["prior", "better"]
        summary = gates[name].summary()
        assert summary["guard"] == "separation"
        assert {k: v["passed"] for k, v in summary["guarded"].items()} == {
            "rule worse_ranked vs prior": False, "rule better vs prior": True}
        assert summary["guarded"]["rule worse_ranked vs prior"]["new"]["pixel_auroc"] == pytest.approx(
            scores["worse_ranked"]["pixel_auroc"])
    assert gates["guard only"].summary()["shares"] == {}  # no evidence asked: no bootstrap run


@pytest.fixture(scope="module")
def setup():
    normals = smooth_normals(12)
    return normals, prepare(outlier_model(normals)), search_set_from_arrays(normals, ["scratch", "noise"], seed=0)


def _search(setup, bits: int, corrector: bool = False, **options):
    options.setdefault("guard", "none")  # the evidence gate alone, unless a test sets the guard
    normals, model, search = setup
    spec = build_spec(model, PtqConfig(activation_bits=bits, weight_bits=bits), "cpu")
    cal = get_calibrator("map-aware", num_bits=bits, search_weights=False, **options)
    start = calibrate(model, spec.tensors_to_calibrate(), [normals], cal, threads=1, search_batches=[search.images])
    fix = BiasCorrector(model, spec, lambda: iter([normals]), threads=1) if corrector else None
    chosen = cal.refine(start, Harness(model, spec, search, threads=1, corrector=fix).context())
    return spec, start, cal, chosen


def _rule_ranges(cal, start, rule):
    return {**start, **{t: c[cal._index_of(t, rule)][1] for t, c in cal.candidates.items()}}


def test_base_leaves_initial_only_for_a_rule_that_convinces(setup):
    """8 bits, source candidates only: the lowest-loss rule beats entropy by noise; with the gate entropy stays.

    Oracle: every rule's graph rebuilt with insert_qdq and run in a plain ORT session; shares from those outputs.
    """
    _, model, search = setup
    options = {"initial": "entropy", "search_candidates": False}
    _, _, off, _ = _search(setup, 8, evidence=0.0, **options)
    spec, start, cal, _ = _search(setup, 8, evidence=0.95, **options)
    rules = cal.search_summary["rule_losses"]
    assert off.search_summary["base"] == min(rules, key=lambda k: rules[k]["loss"]) != "entropy"  # premise
    d = MapDistortion(*map_outputs(model, search.images), search.masks, search.labels)
    draws = d.draws(2000, 0)
    outs = {r: map_outputs(insert_qdq(model, spec, _rule_ranges(cal, start, r)), search.images) for r in rules}
    losses = {r: d.resampled_losses(d.parts(*outs[r]), draws) for r in rules}
    shares = {r: float(np.mean(losses[r] < losses["entropy"])) for r in rules if r != "entropy"}
    assert cal.search_summary["evidence"]["shares"] == pytest.approx({f"rule {r} vs entropy": s
                                                                     for r, s in shares.items()}, abs=1e-3)
    eligible = ["entropy", *(r for r, s in shares.items() if s >= 0.95)]
    assert cal.search_summary["base"] == min(eligible, key=lambda r: (rules[r]["loss"], eligible.index(r)))
    assert cal.search_summary["base"] == "entropy"


def test_gate_still_leaves_a_range_that_erases_the_anomalies(setup):
    """4 bits, prior mse: clipping the teacher tensor erases the defects, so the evidence is overwhelming."""
    normals, model, search = setup
    spec, start, cal, chosen = _search(setup, 4, initial="mse", evidence=0.95)
    on_normals = calibrate(model, spec.tensors_to_calibrate(), [normals], get_calibrator("mse", num_bits=4), threads=1)
    assert chosen[TEACHER_TENSOR].hi > 2 * on_normals[TEACHER_TENSOR].hi
    summary = cal.search_summary
    assert summary["base"] != "mse" and summary["evidence"]["shares"][f"rule {summary['base']} vs mse"] >= 0.95
    # the separation guard lets it through: mse's clipped map ranks images at chance, although the few pixels
    # left rank better than the kept range's (a pixel-AUROC-only guard would have kept the clipping)
    _, _, guarded, kept = _search(setup, 4, initial="mse", evidence=0.95, guard="separation")
    verdict = guarded.search_summary["evidence"]["guarded"][f"rule {summary['base']} vs mse"]
    assert verdict["passed"] and guarded.search_summary["base"] == summary["base"]
    assert kept[TEACHER_TENSOR].hi > 2 * on_normals[TEACHER_TENSOR].hi
    assert verdict["prior"]["image_auroc"] < verdict["new"]["image_auroc"] - 0.1
    assert verdict["prior"]["pixel_auroc"] > verdict["new"]["pixel_auroc"]
    recomputed = separation(*map_outputs(insert_qdq(model, spec, _rule_ranges(cal, start, "mse")), search.images),
                            search.masks, search.labels)
    assert {k: verdict["prior"][k] for k in recomputed} == pytest.approx(recomputed, abs=1e-5)
    assert verdict["prior"]["loss"] == summary["rule_losses"]["mse"]["loss"]


@pytest.mark.parametrize("bits, verdict", [(8, "base"), (4, "descent")])
def test_final_check_keeps_the_descent_only_on_evidence(setup, bits, verdict):
    """With bias correction, the descent is kept only if it convinces against its base as both are saved.

    The cases were found by trying: at 8 bits the descent's gain is noise (undone; the gate off keeps it), at
    4 bits it holds on nearly every resample. Oracle: both graphs bias-corrected by ``correct_biases``, rebuilt
    and run in plain ORT sessions; the share from those outputs.
    """
    normals, model, search = setup
    options = {"corrected_scan": True, "objective": "distortion"}
    _, _, off, descent = _search(setup, bits, corrector=True, evidence=0.0, **options)
    spec, start, cal, chosen = _search(setup, bits, corrector=True, evidence=0.95, **options)
    assert off.search_summary["final_check"]["kept"] == "descent"  # premise: without the gate it stays
    check = cal.search_summary["final_check"]
    d = MapDistortion(*map_outputs(model, search.images), search.masks, search.labels)
    draws = d.draws(2000, 0)

    def resampled(ranges):
        fixed, _ = correct_biases(model, spec, ranges, lambda: iter([normals]), threads=1)
        return d.resampled_losses(d.parts(*map_outputs(insert_qdq(fixed, spec, ranges), search.images)), draws)

    share = float(np.mean(resampled(descent) < resampled(_rule_ranges(cal, start, cal.search_summary["base"]))))
    assert cal.search_summary["evidence"]["shares"]["descent vs base"] == pytest.approx(share, abs=1e-3)
    assert check["kept"] == verdict == ("descent" if share >= 0.95 else "base")
    expected = descent if verdict == "descent" else _rule_ranges(cal, start, cal.search_summary["base"])
    assert all((chosen[t].lo, chosen[t].hi) == (expected[t].lo, expected[t].hi) for t in spec.tensors_to_calibrate())


@pytest.mark.parametrize("option, value", [("evidence", -0.1), ("evidence", 1.0), ("evidence", 2),
                                           ("evidence", True), ("guard", "pixel_auroc"), ("guard", None)])
def test_bad_evidence_or_guard_names_the_option(option, value):
    with pytest.raises(CalibrationError, match=option):
        get_calibrator("map-aware", **{option: value})
