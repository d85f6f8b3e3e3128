"""``qtool ptq --calib map-aware --mixed-precision BUDGET`` on the shared tiny STFPM: the report's search
sections, the files it read (never the test split), and the recipe fields the sweep can vary."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers.kd_run import shared
from helpers.opened_files import opened_images

from calibrators.map_aware import MapAwareCalibrator
from calibrators.objectives import OBJECTIVES, by_separation
from qtool.cli import main
from qtool.data import load_splits
from qtool.errors import RecipeError
from qtool.recipe import load_recipe


@pytest.fixture(scope="module")
def kd(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def searched(kd, tmp_path_factory):
    """One map-aware + mixed-precision run, recording every image file opened while it ran.

    Without bias correction, so the saved graph is the one mixed precision scored (the correction's own
    interplay with the budget: test_cli.py::test_bias_correction_never_breaks_the_mixed_precision_budget).
    """
    out = tmp_path_factory.mktemp("ptq_search") / "run"
    with opened_images() as opened:
        result = CliRunner().invoke(main, [
            "ptq", "--model", str(kd.onnx), "--recipe", str(kd.recipe_file), "--out", str(out),
            "--calib", "map-aware", "--mixed-precision", "0.25", "--mp-criterion", "distortion",
            "--set", "ptq.calib_options.time_budget_s=600",  # ends by itself (~15 s); 20 s cut it short under load
            "--set", "ptq.search.normals=4", "--set", "ptq.search.latency_iterations=2",
            "--set", "ptq.search.time_budget_s=20", "--set", "ptq.search.check_normals=3",
            "--set", "ptq.search.check_kinds=[crack,hole]", "--no-bias-correction"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text()), opened, result.output


def test_search_stages_never_read_a_test_split_file(kd, searched):
    _, report, opened, _ = searched
    splits = load_splits(kd.recipe().data)
    test_files = {str(s.path) for s in splits.test} | {str(s.mask) for s in splits.test if s.mask}
    assert opened and not test_files & set(opened)
    used = report["search_set"]["files"]
    assert used and set(used) <= {str(s.path) for s in [*splits.holdout, *splits.train]}
    assert set(used) <= set(opened) and report["search_set"]["streamed_to_calibrator"] is True
    assert "never the test split" in report["search_set"]["what"]
    # the check set (ptq.search.check_normals): further normals of the same pool, none of the search set's
    checked = report["check_set"]["files"]
    assert len(checked) == 3 and set(checked) <= {str(s.path) for s in [*splits.holdout, *splits.train]}
    assert not set(checked) & set(used) and set(checked) <= set(opened)
    assert report["check_set"]["seed"] == report["search_set"]["seed"] + 1
    # its anomalies are of the families ptq.search.check_kinds names, not the search set's
    assert report["check_set"]["kinds"] == ["crack", "hole"] != report["search_set"]["kinds"]
    assert {r["kind"] for r in report["check_set"]["anomaly_records"]} <= {"crack", "hole"}


def _refused_ptq(kd, tmp_path, *options: str):
    """``qtool ptq --calib map-aware`` with ``options``; asserts a non-zero exit and no output folder."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "ptq", "--model", str(kd.onnx), "--recipe", str(kd.recipe_file), "--out", str(out), "--calib", "map-aware",
        *options])
    assert result.exit_code != 0 and not out.exists()
    return result


def test_a_check_set_the_pool_cannot_fill_is_a_one_line_error(kd, tmp_path):
    result = _refused_ptq(kd, tmp_path, "--set", "ptq.search.normals=100000", "--set", "ptq.search.check_normals=4")
    assert "ptq.search.check_normals: the normal pool has 0 image(s) past the search set's 100000" in result.output


def test_confirm_without_a_check_set_is_a_one_line_error(kd, tmp_path):
    result = _refused_ptq(kd, tmp_path, "--set", "ptq.calib_options.confirm=true", "--set", "ptq.search.normals=4",
                          "--no-bias-correction")
    assert "map-aware: confirm needs a check set (set ptq.search.check_normals > 0)" in result.output


def test_an_unknown_check_kind_is_a_one_line_error(kd, tmp_path):
    result = _refused_ptq(kd, tmp_path, "--set", "ptq.search.normals=4", "--set", "ptq.search.check_normals=3",
                          "--set", "ptq.search.check_kinds=[dent]", "--no-bias-correction")
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "'dent'" in lines[0] and "crack" in lines[0], result.output


def test_report_shows_per_layer_ranges_candidates_sensitivity_and_precision(searched):
    out, report, _, stdout = searched
    assert {"search", "mixed_precision", "proxy", "calibrate"} <= set(report["stage_seconds"])
    layers = report["layers"]
    mp = report["mixed_precision"]
    assert len(layers) == mp["layers"] > 1
    fallback = {f["layer"] for f in mp["fallback"]}
    for row in layers:
        assert row["precision"] == ("fp32" if row["layer"] in fallback else "w8a8"), row["layer"]
        for name, r in row["tensors"].items():
            assert r["lo"] <= r["hi"] and r["candidates"], name
            assert r["chosen"] in [c["rules"] for c in r["candidates"]], name
    assert all(row["sensitivity"] is not None for row in layers[: mp["layers_scanned"]])
    searched_tensors = [r for row in layers for r in row["tensors"].values() if r["search"] == "searched"]
    assert searched_tensors and all("loss" in c for r in searched_tensors for c in r["candidates"])
    search = report["search"]  # the calibrator's summary: every rule scored, the best one is the base
    base, final = search["rule_losses"][search["base"]], search["final"]
    objective = MapAwareCalibrator.OPTIONS["objective"]  # the default: this run sets none
    assert search["objective"] == objective
    gate = search["evidence"]  # on by default: a rule leaves its prior only if it distorts less on enough resamples
    assert gate["level"] == MapAwareCalibrator.OPTIONS["evidence"] > 0
    assert ("guarded" in gate) == (MapAwareCalibrator.OPTIONS["guard"] != "none")

    def passes(label: str) -> bool:
        """The comparison's share reaches the level and, under the default guard if any, the guard passed it."""
        return gate["shares"][label] >= gate["level"] and gate.get("guarded", {}).get(label, {"passed": True})["passed"]

    def convincing(scores: dict, prior: str, kind: str) -> dict:
        return {k: v for k, v in scores.items() if k == prior or passes(f"{kind} {k} vs {prior}")}

    initial = MapAwareCalibrator.OPTIONS["initial"]
    assert list(search["rule_losses"])[0] == initial
    assert search["base"] == OBJECTIVES.get(objective).choose(convincing(search["rule_losses"], initial, "rule"))
    if search["weights_searched"]:  # then the weights' whole rules are scored too; their pick is the final base
        prior = list(search["weight_rule_scores"])[0]  # the spec's weight range
        assert search["weight_base"] == OBJECTIVES.get(objective).choose(
            convincing(search["weight_rule_scores"], prior, "weight rule"))
        base = search["weight_rule_scores"][search["weight_base"]]
    assert final["loss"] <= base["loss"]
    if OBJECTIVES.get(objective).separates:
        assert final["pixel_auroc"] >= base["pixel_auroc"] and final["image_auroc"] >= base["image_auroc"]
    assert all(r["base"] == search["base"] for row in layers for r in row["tensors"].values())
    assert report["proxy"]["drop"] == pytest.approx(mp["final"]["drop"], abs=1e-9)
    # the proxy also has the final graph's map distortion against fp32, as mixed precision scored it
    assert report["proxy"]["quantized"]["loss"] == pytest.approx(mp["final"]["loss"], abs=1e-9)
    assert report["proxy"]["quantized"]["loss"] > 0
    # the distortion criterion: at most a quarter of the all-quantized graph's map distortion is left
    assert mp["criterion"] == "distortion" and mp["all_quantized"]["loss"] > 0
    assert report["proxy"]["quantized"]["loss"] <= 0.25 * mp["all_quantized"]["loss"] + 1e-12
    assert mp["final"]["value"] == pytest.approx(mp["final"]["loss"] / mp["all_quantized"]["loss"])
    assert report["plan"]["quantized_nodes"] and "mixed precision" in stdout
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.ptq.calib == "map-aware" and recipe.ptq.mixed_precision == 0.25
    assert recipe.ptq.mixed_precision_criterion == "distortion"


@pytest.mark.parametrize(("override", "key"), [("ptq.mixed_precision=-0.1", "ptq.mixed_precision"),
                                               ("ptq.search.normals=1", "ptq.search.normals"),
                                               ("ptq.search.kinds=[]", "ptq.search.kinds"),
                                               ("ptq.search.check_kinds=[]", "ptq.search.check_kinds"),
                                               ("ptq.mixed_precision_criterion=auroc",
                                                "ptq.mixed_precision_criterion"),
                                               ("ptq.mixed_precision_rank=cheapest", "ptq.mixed_precision_rank")])
def test_bad_search_fields_name_the_key(override: str, key: str):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_qat_initial_ranges_come_from_the_search_too(kd, monkeypatch):
    from calibrators import MapAwareCalibrator
    from qtool.data import ImageTransform
    from qtool.graph import build_spec, load_model, prepare
    from qtool.qat.start import initial_ranges

    refined = []
    real = MapAwareCalibrator.refine

    def spy(self, ranges, context):
        refined.append(real(self, ranges, context))
        return refined[-1]

    monkeypatch.setattr(MapAwareCalibrator, "refine", spy)
    recipe = kd.recipe("ptq.calib=map-aware", "ptq.calib_options.time_budget_s=2", "ptq.search.normals=2")
    prepared = prepare(load_model(kd.onnx))
    spec = build_spec(prepared, recipe.ptq)
    ranges, _ = initial_ranges(recipe, prepared, spec, load_splits(recipe.data), ImageTransform(recipe.data), None)
    from calibrators import WeightRange

    assert len(refined) == 1 and ranges.keys() == refined[0].keys()
    for t, r in refined[0].items():  # activations as (lo, hi); a searched weight's bounds handed on as chosen
        assert ranges[t] is r if isinstance(r, WeightRange) else ranges[t] == (r.lo, r.hi), t


@pytest.mark.parametrize("bias_correction", [True, False])
def test_corrected_scan_runs_in_the_pipeline_and_needs_bias_correction(kd, tmp_path, bias_correction):
    """``corrected_scan`` judges whole rules on bias-corrected graphs (calibration images from the pipeline);
    with bias correction off it is a one-line error and no model is written."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "ptq", "--model", str(kd.onnx), "--recipe", str(kd.recipe_file), "--out", str(out),
        "--calib", "map-aware", "--set", "ptq.calib_options.corrected_scan=true",
        "--set", "ptq.calib_options.max_graphs=4", "--set", "ptq.search.normals=4",
        "--bias-correction" if bias_correction else "--no-bias-correction"])
    if not bias_correction:
        assert result.exit_code != 0 and not out.exists()  # no partial run folder
        assert "corrected_scan needs bias correction" in result.output
        return
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    search = report["search"]
    assert search["corrected_scan"] and search["graphs_run"] == 4
    assert 1 <= search["corrections"] <= search["graphs_run"]  # one per whole rule scored, none in the descent
    # the budget ended the search in the scan, so the saved ranges are the base rule's, which the scan corrected:
    # the pipeline reuses that correction instead of computing it again
    assert search["tensors_changed_from_base"] == 0 and report["bias_correction"]["reused"] is True


def test_separation_guard_runs_in_the_pipeline_and_a_bad_guard_is_a_one_line_error(kd, tmp_path):
    """``guard=separation``: every departure judged is recorded with both graphs' separation, and the base is
    ``initial`` or a rule that both convinced and the separation rule picked; a misspelt guard writes nothing."""
    bad = tmp_path / "bad"
    result = CliRunner().invoke(main, [
        "ptq", "--model", str(kd.onnx), "--recipe", str(kd.recipe_file), "--out", str(bad), "--calib", "map-aware",
        "--set", "ptq.calib_options.guard=pixel"])
    assert result.exit_code != 0 and not bad.exists()
    assert "guard" in result.output and "separation" in result.output and len(result.output.strip().splitlines()) == 1
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "ptq", "--model", str(kd.onnx), "--recipe", str(kd.recipe_file), "--out", str(out), "--calib", "map-aware",
        "--set", "ptq.calib_options.guard=separation", "--set", "ptq.calib_options.max_graphs=12",
        "--set", "ptq.search.normals=4", "--no-bias-correction"])
    assert result.exit_code == 0, result.output
    search = json.loads((out / "report.json").read_text())["search"]
    gate = search["evidence"]
    assert gate["guard"] == "separation" and gate["guarded"]
    for label, verdict in gate["guarded"].items():
        assert verdict["passed"] == (by_separation({"prior": verdict["prior"], "new": verdict["new"]}) == "new"), label
    rules, initial = search["rule_losses"], MapAwareCalibrator.OPTIONS["initial"]
    allowed = [k for k in rules if k == initial or (gate["shares"][f"rule {k} vs {initial}"] >= gate["level"]
                                                    and gate["guarded"][f"rule {k} vs {initial}"]["passed"])]
    assert search["base"] == OBJECTIVES.get(search["objective"]).choose({k: rules[k] for k in allowed})


# ---------------------------------------------------------------- calibration draws (ptq.calib_data.draws)


def _run_ptq(kd, out, *args: str):
    return CliRunner().invoke(main, ["ptq", "--model", str(kd.onnx), "--recipe", str(kd.recipe_file), "--out",
                                     str(out), "--calib", "minmax", "--bits", "4", "--num-calib", "4",
                                     "--set", "ptq.search.normals=4", *args])


def test_calibration_draws_keep_the_window_with_the_least_map_distortion(kd, tmp_path):
    out = tmp_path / "draws"
    with opened_images() as opened:
        result = _run_ptq(kd, out, "--calib-draws", "3")
    assert result.exit_code == 0, result.output
    assert "calibration draws: kept draw" in result.output
    report = json.loads((out / "report.json").read_text())
    rows = report["calibration_draws"]["draws"]
    assert [r["draw"] for r in rows] == [0, 1, 2] and all(r["images"] == 4 for r in rows)
    losses = [r["loss"] for r in rows]
    chosen = report["calibration_draws"]["chosen"]
    assert chosen == min(range(3), key=lambda i: (losses[i], i)) and report["calibration_draws"]["bias_corrected"]
    # the saved calibration is the chosen window: four pool images no other window holds, never the test split
    files = report["calibration"]["files"]
    assert report["calibration"]["draw"] == chosen and files[0] == rows[chosen]["first_file"]
    splits = load_splits(kd.recipe().data)
    pool = [str(s.path) for s in [*splits.holdout, *splits.train]]
    assert len(set(files)) == 4 and set(files) <= set(pool)
    assert len({r["first_file"] for r in rows}) == 3
    test_files = {str(s.path) for s in splits.test}
    assert not test_files & set(opened)
    # draw 0 is the usual calibration set: a run without draws calibrates on exactly its files
    plain = tmp_path / "plain"
    assert _run_ptq(kd, plain).exit_code == 0
    plain_report = json.loads((plain / "report.json").read_text())
    assert plain_report["calibration"]["files"][0] == rows[0]["first_file"] and "calibration_draws" not in plain_report
    if chosen == 0:
        assert plain_report["quantization"]["tensors"] == report["quantization"]["tensors"]


@pytest.mark.parametrize(("args", "needle"), [
    (("--set", "ptq.calib_data.draws=4"), "ptq.calib_data.draws: the normal pool holds"),
    (("--calib-source", "random-normal", "--set", "ptq.calib_data.draws=2"), "need the train source"),
])
def test_bad_calibration_draws_are_one_line_errors(kd, tmp_path, args, needle):
    out = tmp_path / "bad"
    result = _run_ptq(kd, out, *args)
    assert result.exit_code != 0 and needle in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error")]) == 1
    assert not out.exists()
