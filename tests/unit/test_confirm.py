"""Map-aware's confirmation: a departure the search set accepted must also hold on a check set, else the prior stays.

Oracles: the prior's and the departure's graphs rebuilt with insert_qdq and run in plain ORT sessions on the check
images, the bootstrap share recomputed from those outputs, and the unconfirmed search's own result.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.ort_utils import map_outputs
from helpers.outlier_model import TEACHER_TENSOR, outlier_model, smooth_normals

from calibrators import get_calibrator
from qtool.bias_correction import BiasCorrector
from qtool.calibrate import calibrate
from qtool.errors import CalibrationError
from qtool.graph import build_spec, insert_qdq, prepare
from qtool.proxy import MapDistortion
from qtool.recipe import PtqConfig, SearchConfig
from qtool.search import Harness, SearchSet, search_set_from_arrays

#: The gate alone (no guard), from mse: at 4 bits mse clips the teacher tensor's anomaly outliers, and the search
#: leaves it for a range that keeps them (test_evidence.py: the evidence is overwhelming on the search set).
OPTIONS = {"initial": "mse", "evidence": 0.95, "guard": "none", "search_weights": False}


@pytest.fixture(scope="module")
def setup():
    normals = smooth_normals(12)
    return normals, prepare(outlier_model(normals)), search_set_from_arrays(normals, ["scratch", "noise"], seed=0)


def _no_outlier_set(normals: np.ndarray) -> SearchSet:
    """A check set whose 'anomalies' are the normals again (masks but no defect): nothing for a wide range to keep."""
    n, size = len(normals), normals.shape[-1]
    masks = np.zeros((2 * n, size, size), np.float32)
    masks[n:, size // 4 : size // 2, size // 4 : size // 2] = 1
    return SearchSet(images=np.concatenate([normals, normals]).astype(np.float32), masks=masks,
                     labels=np.r_[np.zeros(n), np.ones(n)].astype(np.int64))


CHECK_SETS = {
    # other normals and other anomaly families than the search set's (as ptq.search.check_kinds gives)
    "other families": lambda: search_set_from_arrays(smooth_normals(12, 5), ["crack", "hole", "stain"], seed=1),
    "no outliers": lambda: _no_outlier_set(smooth_normals(12, 5)),
}


def _search(setup, check: SearchSet | None, corrector: bool = False, **options):
    normals, model, search = setup
    spec = build_spec(model, PtqConfig(activation_bits=4, weight_bits=4), "cpu")
    cal = get_calibrator("map-aware", num_bits=4, **{**OPTIONS, **options})
    start = calibrate(model, spec.tensors_to_calibrate(), [normals], cal, threads=1, search_batches=[search.images])
    fix = BiasCorrector(model, spec, lambda: iter([normals]), threads=1) if corrector else None
    chosen = cal.refine(start, Harness(model, spec, search, threads=1, corrector=fix, check=check).context())
    return spec, start, cal, chosen


def _rule_ranges(cal, start, rule):
    return {**start, **{t: c[cal._index_of(t, rule)][1] for t, c in cal.candidates.items()}}


@pytest.mark.parametrize("check_name, verdict", [("other families", True), ("no outliers", False)])
def test_a_rule_departure_stays_only_if_it_holds_on_the_check_set(setup, check_name, verdict):
    _, model, _ = setup
    check = CHECK_SETS[check_name]()
    _, _, off, unconfirmed = _search(setup, check)  # confirm off: the check set is not used for rules
    departure = off.search_summary["base"]
    assert departure != "mse" and off.search_summary["confirm"] is None  # premise: the search set leaves mse
    spec, start, cal, chosen = _search(setup, check, confirm=True)
    label = f"rule {departure} vs mse"
    record = cal.search_summary["confirm"]["departures"][label]
    # oracle: both rules' graphs on the check images in plain ORT sessions, the share from those outputs
    d = MapDistortion(*map_outputs(model, check.images), check.masks, check.labels)
    draws = d.draws(2000, 0)
    outs = {r: d.parts(*map_outputs(insert_qdq(model, spec, _rule_ranges(cal, start, r)), check.images))
            for r in ("mse", departure)}
    share = float(np.mean(d.resampled_losses(outs[departure], draws) < d.resampled_losses(outs["mse"], draws)))
    assert cal.search_summary["evidence"]["shares"][f"{label} on the check set"] == pytest.approx(share, abs=1e-3)
    assert record["prior"]["loss"] == pytest.approx(d.summary(outs["mse"])["loss"], rel=1e-5)
    assert record["new"]["loss"] == pytest.approx(d.summary(outs[departure])["loss"], rel=1e-5)
    passes = share >= 0.95 and record["new"]["loss"] < record["prior"]["loss"]
    assert record["passed"] is passes is verdict  # the two check sets were chosen to give both verdicts
    assert cal.search_summary["base"] == (departure if verdict else "mse")
    descent = cal.search_summary["confirm"]["departures"].get("descent vs base")
    if verdict and (descent is None or descent["passed"]):  # all confirmed: the unconfirmed search's result
        assert all((chosen[t].lo, chosen[t].hi) == (unconfirmed[t].lo, unconfirmed[t].hi) for t in chosen)
    elif verdict:  # the base confirmed, the descent from it not: the base rule's ranges
        base = _rule_ranges(cal, start, departure)
        assert all((chosen[t].lo, chosen[t].hi) == (base[t].lo, base[t].hi) for t in chosen)
    else:
        assert chosen[TEACHER_TENSOR].hi < unconfirmed[TEACHER_TENSOR].hi
    assert cal.search_summary["graphs_run"] == off.search_summary["graphs_run"] or not verdict
    assert cal.search_summary["confirm"]["graphs_run"] >= 2  # outside max_graphs


def test_confirmation_never_runs_against_the_graph_budget(setup):
    """The same max_graphs gives the same number of counted runs with confirmation on a set it passes."""
    check = CHECK_SETS["other families"]()
    _, _, off, unconfirmed = _search(setup, check, max_graphs=6)
    _, _, cal, chosen = _search(setup, check, confirm=True, max_graphs=6)
    assert cal.search_summary["graphs_run"] == off.search_summary["graphs_run"] == 6
    assert all((chosen[t].lo, chosen[t].hi) == (unconfirmed[t].lo, unconfirmed[t].hi) for t in chosen)


@pytest.mark.parametrize("check_name, verdict", [("other families", True), ("no outliers", False)])
def test_a_descent_stays_only_if_it_holds_on_the_check_set_as_saved(setup, check_name, verdict):
    """Bias correction on, anchored at entropy (4 bits): the descent's moves are confirmed as the pipeline saves them.

    Oracle: the unconfirmed search (no check set), whose final check keeps the descent; the verdict recomputed
    from the recorded check-set scores.
    """
    options = {"initial": "entropy", "objective": "anchored", "evidence": 0.0, "corrector": True}
    _, start, off, descent = _search(setup, None, **options)
    changed = off.search_summary["tensors_changed_from_base"]
    assert changed > 0 and off.search_summary["final_check"]["kept"] == "descent"  # premise: the descent moves
    _, _, cal, chosen = _search(setup, CHECK_SETS[check_name](), confirm=True, **options)
    summary = cal.search_summary
    record = summary["confirm"]["departures"]["descent vs base"]
    prior, new = record["prior"], record["new"]
    assert record["passed"] is (new["loss"] <= prior["loss"] and new["pixel_auroc"] >= prior["pixel_auroc"]
                                and new["image_auroc"] >= prior["image_auroc"]) is verdict
    assert summary["final_check"]["set"] == "search"  # with confirm the final check stays on the search set
    assert summary["final_check"]["kept"] == ("descent" if verdict else "base")
    assert summary["tensors_changed_from_base"] == (changed if verdict else 0)
    expected = descent if verdict else _rule_ranges(cal, start, "entropy")
    assert all((chosen[t].lo, chosen[t].hi) == (expected[t].lo, expected[t].hi) for t in chosen)
    if not verdict:
        undone = {chosen[t].meta["search"] for t in chosen
                  if t in descent and (descent[t].lo, descent[t].hi) != (expected[t].lo, expected[t].hi)}
        assert undone == {"descent undone by the confirmation"}


def test_confirm_without_a_check_set_is_a_one_line_error(setup):
    with pytest.raises(CalibrationError, match=r"confirm needs a check set \(set ptq.search.check_normals > 0\)"):
        _search(setup, None, confirm=True)


def test_confirm_must_be_a_boolean():
    with pytest.raises(Exception, match="confirm"):
        get_calibrator("map-aware", num_bits=8, confirm="yes")


def test_check_kinds_default_to_the_search_kinds():
    assert SearchConfig().check_kinds is None
    assert SearchConfig(check_kinds=["crack"]).check_kinds == ["crack"]
    with pytest.raises(ValueError):
        SearchConfig(check_kinds=[])
