"""Sweep grid expansion, recipe validation of the sweep section, content keys, the cache's atomic entries,
the scheduler's dependency handling, the Pareto front and the report schema (no model is run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.errors import RecipeError
from qtool.recipe import load_recipe
from qtool.report import json_schema, pareto_front, validate_report
from qtool.report.assemble import short_labels
from qtool.sweep import Cell, cell_recipe, expand_grid
from qtool.sweep.cache import Cache, content_key
from qtool.sweep.models import ModelSource
from qtool.sweep.run import execute, plan_jobs

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def recipe(*overrides: str):
    return load_recipe(None, ["sweep.models=[m.onnx]", *overrides])


def ids(grid) -> list[str]:
    return [c.id for c in grid.cells]


# ---------------------------------------------------------------- grid expansion


def test_grid_is_the_product_with_one_cell_per_float_precision():
    g = expand_grid(recipe("sweep.precisions=[fp32,fp16,int8,int4]", "sweep.calibrators=[minmax,entropy]",
                           "sweep.calib_sources=[train,random-normal]", "sweep.parts=[student,both]"))
    quant = [c for c in g.cells if c.quantized]
    assert len(quant) == 2 * 2 * 2 * 2  # precisions x calibrators x sources x parts
    assert ids(g)[:2] == ["m:fp32", "m:fp16"], "float precisions: one cell each, references first"
    assert len(set(ids(g))) == len(g.cells)
    assert "m:int4-ptq-entropy-random-normal-student-cpu-bc" in ids(g)
    assert g.skipped == [] and g.notes == []


def test_exclude_and_include_like_a_ci_matrix():
    g = expand_grid(recipe("sweep.precisions=[fp32,int8]", "sweep.calibrators=[minmax,entropy]",
                           "sweep.calib_sources=[train,random-normal]",
                           "sweep.exclude=[{calibrator: entropy, calib_source: random-normal}, {precision: fp16}]",
                           "sweep.include=[{precision: int6, calibrator: entropy}, {calibrator: percentile}]"))
    assert ids(g) == ["m:fp32", "m:int8-ptq-minmax-train-both-cpu-bc", "m:int8-ptq-minmax-random-normal-both-cpu-bc",
                      "m:int8-ptq-entropy-train-both-cpu-bc", "m:int6-ptq-entropy-train-both-cpu-bc",
                      "m:int8-ptq-percentile-train-both-cpu-bc"]  # an include without precision is quantized


def test_fp32_reference_is_added_and_qat_on_an_onnx_model_is_skipped():
    g = expand_grid(recipe("sweep.precisions=[int8]", "sweep.methods=[ptq,qat]"))
    assert ids(g) == ["m:fp32", "m:int8-ptq-mse-train-both-cpu-bc"]
    assert "m:fp32 added" in g.notes[0]
    (cell, why), = g.skipped
    assert cell.method == "qat" and "QAT needs a qtool checkpoint" in why and "m.onnx" in why


def test_several_models_and_labels():
    r = load_recipe(None, ["sweep.models=[runs/a/model.pt, {model: {name: rd}}, {label: x, path: b.onnx}]",
                           "sweep.methods=[ptq,qat]"])
    g = expand_grid(r)
    assert list(g.models) == ["a", "rd", "x"]
    assert {c.model for c in g.cells if c.method == "qat"} == {"a", "rd"}
    assert [c.model for c, _ in g.skipped] == ["x"]
    with pytest.raises(RecipeError, match=r"sweep\.models\.1: model label 'a' is used twice"):
        expand_grid(load_recipe(None, ["sweep.models=[x/a.onnx, y/a.onnx]"]))


def test_cell_recipe_writes_the_axes_into_ptq():
    r = recipe("ptq.calib=percentile", "ptq.calib_options={percentile: 99.9}",
               "sweep.calib_options={mse: {num_candidates: 8}}")
    cell = Cell("m", "w4a8", "ptq", "percentile", "random-normal", "student", "tensorrt")
    p = cell_recipe(r, cell).ptq
    assert (p.calib, p.calib_data.source, p.quantize, p.target, p.weight_bits, p.activation_bits) == (
        "percentile", "random-normal", "student", "tensorrt", 4, 8)
    assert p.calib_options == {"percentile": 99.9}  # the recipe's options belong to its own calibrator
    assert cell_recipe(r, Cell("m", "int8", "ptq", "minmax", "train", "both", "cpu")).ptq.calib_options == {}
    assert cell_recipe(r, Cell("m", "int8", "ptq", "mse", "train", "both", "cpu")).ptq.calib_options == {
        "num_candidates": 8}
    assert cell_recipe(r, Cell("m", "fp32")).ptq == r.ptq


# ---------------------------------------------------------------- recipe validation names the key


@pytest.mark.parametrize("override, match", [
    ("sweep.bench.iteratons=3", r"sweep\.bench\.iteratons: unknown key"),
    ("sweep.include=[{calib: minmax}]", r"sweep\.include\.0\.calib: unknown key"),
    ("sweep.exclude=[{}, {part: head}]", r"sweep\.exclude\.1\.part: "),
    ("sweep.methods=[ptq, qta]", r"sweep\.methods\.1: "),
    ("sweep.jobs=0", r"sweep\.jobs: .*greater than or equal to 1"),
    ("sweep.precisions=[]", r"sweep\.precisions: "),
    ("sweep.models=[{path: a.onnx, wieghts: x}]", r"sweep\.models\.0\.wieghts: unknown key"),
])
def test_schema_errors_name_the_key(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, [override])


@pytest.mark.parametrize("override, match", [
    ("sweep.precisions=[fp32, int3]", r"sweep\.precisions: unknown precision 'int3'; available: .*int4"),
    ("sweep.calibrators=[minmax, kl]", r"sweep\.calibrators: unknown calibrator 'kl'; available: .*entropy"),
    ("sweep.calib_sources=[noise]", r"sweep\.calib_sources: unknown calibration source 'noise'"),
    ("sweep.targets=[cpu, jetson]", r"sweep\.targets: unknown target profile 'jetson'|sweep\.targets: unknown"),
    ("sweep.include=[{precision: fp8}]", r"sweep\.include\.0\.precision: unknown precision 'fp8'"),
    ("sweep.exclude=[{model: other}]", r"sweep\.exclude\.0\.model: unknown model label 'other'; models: m"),
    ("sweep.bench.device=tpu", r"sweep\.bench\.device: unknown backend 'tpu'; available: cpu"),
])
def test_axis_values_are_checked_against_the_registries(override, match):
    with pytest.raises(RecipeError, match=match):
        expand_grid(recipe(override))


def test_model_overrides_are_validated_with_their_key():
    with pytest.raises(RecipeError, match=r"sweep\.models\.0\.model\.levls: unknown key"):
        expand_grid(load_recipe(None, ["sweep.models=[{model: {levls: [1]}}]"]))
    with pytest.raises(RecipeError, match=r"sweep\.models\.0: give either path"):
        expand_grid(load_recipe(None, ["sweep.models=[{path: a.pt, model: {name: rd}}]"]))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_its_grid_expands(path):
    g = expand_grid(load_recipe(path))
    assert g.cells[0].precision == "fp32" and all(c.builder in ("fp32", "fp16", "ptq", "qat") for c in g.cells)


def test_quickstart_is_the_promised_sweep():
    g = expand_grid(load_recipe(REPO / "recipes" / "quickstart.yaml"))
    precisions = {c.precision for c in g.cells}
    assert {"fp32", "fp16", "int8"} <= precisions and precisions & {"int4", "int6", "w4a8", "w6a8"}
    assert {c.calibrator for c in g.cells if c.precision == "int8"} >= {"minmax", "entropy", "percentile", "mse"}
    assert len(g.cells) == 11  # fp32, fp16, 4 calibrators x 2 sources at int8, one 6-bit cell (the README's count)
    assert {c.target for c in expand_grid(load_recipe(REPO / "recipes" / "jetson.yaml")).cells} >= {"tensorrt"}


# ---------------------------------------------------------------- content keys


def _plan(r, tmp_path):
    g = expand_grid(r)
    src = {m: ModelSource(m, Path(f"{m}.onnx"), Path(f"{m}.pt"), "a" * 64, "b" * 64, "file") for m in g.models}
    jobs, deps = plan_jobs(r, g, src, Cache(tmp_path), "data-fp")
    return {j.cell.id: j for j in jobs}, deps


def test_keys_change_with_what_made_the_cell_and_only_with_it(tmp_path):
    base = ["sweep.models=[m.pt]", "sweep.precisions=[fp32,fp16,int8]", "sweep.methods=[ptq,qat]"]
    a, deps = _plan(load_recipe(None, base), tmp_path)
    assert a == _plan(load_recipe(None, base), tmp_path)[0], "keys are deterministic"
    assert len({j.cell_key for j in a.values()}) == len(a) == len({j.build_key for j in a.values()})
    ptq, qat, fp32 = a["m:int8-ptq-mse-train-both-cpu-bc"], a["m:int8-qat-mse-train-both-cpu"], a["m:fp32"]
    assert set(deps[qat.cell_key]) == {fp32.cell_key, ptq.cell_key} and deps[fp32.cell_key] == []
    assert qat.init_from == tmp_path / "builds" / ptq.build_key, "QAT starts from the PTQ twin's ranges"
    assert ptq.reference_dir == tmp_path / "cells" / fp32.cell_key

    def changed(*extra):
        b = _plan(load_recipe(None, [*base, *extra]), tmp_path)[0]
        return ({i for i in a if a[i].build_key != b[i].build_key}, {i for i in a if a[i].cell_key != b[i].cell_key})

    everything = set(a)
    assert changed("sweep.jobs=4", "sweep.cache_dir=elsewhere", "name=other") == (set(), set())
    assert changed("sweep.bench.iterations=7") == (set(), everything), "timing settings reuse every build"
    builds, cells = changed("ptq.calib_data.num_samples=3")
    assert builds == {ptq.cell.id, qat.cell.id} and cells == builds
    assert changed("qat.epochs=9") == ({qat.cell.id}, {qat.cell.id})
    assert changed("eval.max_fpr=0.1") == (set(), everything), "a new evaluation reuses every build"
    builds, cells = changed("data.holdout_fraction=0.2")  # PTQ calibrates on held-out normals; fp32 is a copy
    assert builds == everything - {"m:fp32"} and cells == everything


def test_model_content_keys_cells(tmp_path):
    r = load_recipe(None, ["sweep.models=[m.onnx]"])
    g = expand_grid(r)
    keys = []
    for sha in ("a" * 64, "c" * 64):
        src = {"m": ModelSource("m", Path("elsewhere/m.onnx"), None, sha, None, "file")}
        keys.append([j.cell_key for j in plan_jobs(r, g, src, Cache(tmp_path), "fp")[0]])
    assert not set(keys[0]) & set(keys[1])
    moved = {"m": ModelSource("m", Path("moved/m.onnx"), None, "a" * 64, None, "file")}
    assert [j.cell_key for j in plan_jobs(r, g, moved, Cache(tmp_path), "fp")[0]] == keys[0], "path is no input"
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1}) != content_key({"a": 2})


# ---------------------------------------------------------------- the cache


def test_an_entry_exists_only_when_complete(tmp_path):
    cache = Cache(tmp_path)
    with pytest.raises(RuntimeError), cache.writing("cells", "k1") as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("killed midway")
    assert not cache.has("cells", "k1") and list((tmp_path / "cells").iterdir()) == []
    with cache.writing("cells", "k1", {"why": "test"}) as tmp:
        (tmp / "result.json").write_text("{}")
        assert not cache.has("cells", "k1")
    assert cache.has("cells", "k1") and cache.read_entry("cells", "k1")["inputs"] == {"why": "test"}
    with cache.writing("cells", "k1") as tmp:  # another process finished it meanwhile: its copy is kept
        (tmp / "result.json").write_text('{"second": true}')
    assert (tmp_path / "cells" / "k1" / "result.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["k1"]


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "builds" / f".tmp-abc-{int(dead.stdout)}-ffffff"
    live = tmp_path / "cells" / f".tmp-abc-{os.getpid()}-ffffff"
    for p in (stale, live):
        p.mkdir(parents=True)
    assert Cache(tmp_path).clean_stale() == [stale]
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- scheduler


def test_a_failed_cell_skips_its_dependents(tmp_path, monkeypatch):
    r = load_recipe(None, ["sweep.models=[a.pt, b.onnx]", "sweep.methods=[ptq,qat]", "sweep.precisions=[int8]"])
    g = expand_grid(r)
    src = {m: ModelSource(m, Path(f"{m}.onnx"), Path(f"{m}.pt"), m * 64, None, "file") for m in g.models}
    jobs, deps = plan_jobs(r, g, src, Cache(tmp_path), "fp")
    ran = []

    def fake(job):
        ran.append(job.cell.id)
        status = "failed" if job.cell.id == "a:int8-ptq-mse-train-both-cpu-bc" else "ok"
        return {"status": status, "id": job.cell.id, "error": "GraphError: x" if status == "failed" else None}

    monkeypatch.setattr("qtool.sweep.run.run_job", fake)
    events = []
    results = execute(jobs, deps, {}, 1, events.append)
    by_id = {j.cell.id: results[j.cell_key] for j in jobs}
    assert by_id["a:int8-qat-mse-train-both-cpu"]["status"] == "skipped"
    assert "needs a:int8-ptq-mse-train-both-cpu-bc, which failed" in by_id["a:int8-qat-mse-train-both-cpu"][
        "reason"]
    assert by_id["b:int8-ptq-mse-train-both-cpu-bc"]["status"] == "ok"
    assert ran.index("a:fp32") < ran.index("a:int8-ptq-mse-train-both-cpu-bc")
    assert "a:int8-qat-mse-train-both-cpu" not in ran
    assert [e.done for e in events] == list(range(1, len(jobs) + 1))


# ---------------------------------------------------------------- report


def test_pareto_front_against_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    pts = [(f"p{i}", rng.choice([1.0, 2.0, 3.0]), rng.choice([0.5, 0.7, 0.9])) for i in range(30)]
    front = set(pareto_front(pts))
    for (n, c, v), (_, c2, v2) in itertools.product(pts, pts):
        if (c2 < c and v2 >= v) or (c2 <= c and v2 > v):
            assert n not in front
    for n, c, v in pts:  # every non-dominated point is on the front
        if not any((c2 < c and v2 >= v) or (c2 <= c and v2 > v) for _, c2, v2 in pts):
            assert n in front
    assert pareto_front([("a", 1, 0.5), ("b", 2, 0.9), ("c", 2, 0.8), ("d", 1, 0.5)]) == ["a", "b", "d"]


def test_report_schema_file_is_the_schema():
    on_disk = json.loads((REPO / "docs" / "sweep-report.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), \
        "the report schema changed: regenerate docs/sweep-report.schema.json deliberately (see qtool/report/schema.py)"


def test_report_validation_rejects_drift():
    cell = {"id": "m:fp32", "label": "fp32", "model": "m", "precision": "fp32", "method": None, "calibrator": None,
            "calib_source": None, "part": None, "target": None, "status": "skipped", "cached": False}
    doc = {"schema": "qtool.sweep/1", "qtool": "0", "recipe": "r", "created": "t", "command": [], "axes": {},
           "pareto_metric": "image_auroc", "categories": [], "models": [], "cells": [cell], "notes": [],
           "cache_dir": "c", "machine": {}, "stage_seconds": {}, "wall_seconds": 1.0}
    assert validate_report(doc)["schema"] == "qtool.sweep/1"
    from pydantic import ValidationError

    for bad in ({**doc, "extra": 1}, {k: v for k, v in doc.items() if k != "cells"},
                {**doc, "cells": [{**cell, "status": "done"}]}, {**doc, "schema": "qtool.sweep/2"}):
        with pytest.raises(ValidationError):
            validate_report(bad)


# ---------------------------------------------------------------- the fp16 cell's pieces


def test_fp16_model_passes_the_checker_and_benches_as_fp16(tmp_path):
    from helpers.tiny_models import export_tiny

    from qtool.backends import BenchOptions, get_backend
    from qtool.backends.base import model_facts
    from qtool.graph import load_model, prepare, save_model, to_fp16

    fp32 = export_tiny(tmp_path / "tiny.onnx")
    half = tmp_path / "half.onnx"
    save_model(to_fp16(prepare(load_model(fp32))), half)
    load_model(half)  # the ONNX checker wants topologically sorted nodes; the converter appends its Casts
    assert model_facts(half).stored_precision == "fp16" and model_facts(fp32).stored_precision == "fp32"
    opts = BenchOptions(threads=1, iterations=3, warmup=1, precision="fp16")
    assert get_backend("cpu", opts).run(half, [None])[0].precision == "fp16"


# ---------------------------------------------------------------- mixed precision axis


def test_mixed_precision_axis_expands_into_ptq_cells_and_their_recipes():
    g = expand_grid(recipe("sweep.precisions=[fp32,int8]", "sweep.mixed_precisions=[null,0.01]",
                           "sweep.methods=[ptq,qat]", "sweep.models=[m.pt]"))
    assert ids(g) == ["m:fp32", "m:int8-ptq-mse-train-both-cpu-bc", "m:int8-ptq-mse-train-both-cpu-mp0.01-bc",
                      "m:int8-qat-mse-train-both-cpu"]
    assert [(c.id, why) for c, why in g.skipped] == [
        ("m:int8-qat-mse-train-both-cpu-mp0.01", "QAT does not choose precisions: mixed precision is a PTQ axis")]
    base = recipe("ptq.mixed_precision=0.2")
    assert cell_recipe(base, g.cells[1]).ptq.mixed_precision is None
    assert cell_recipe(base, g.cells[2]).ptq.mixed_precision == 0.01
    assert cell_recipe(base, g.cells[0]).ptq.mixed_precision == 0.2, "float cells keep the recipe as it is"
    noted = expand_grid(recipe("ptq.mixed_precision=0.2"))
    assert any("ptq.mixed_precision=0.2 is not used" in n for n in noted.notes)


def test_bias_correction_axis_adds_cells_without_it_and_not_to_qat():
    g = expand_grid(recipe("sweep.precisions=[fp32,int4]", "sweep.bias_corrections=[false,true]",
                           "sweep.methods=[ptq,qat]", "sweep.models=[m.pt]"))
    assert ids(g) == ["m:fp32", "m:int4-ptq-mse-train-both-cpu", "m:int4-ptq-mse-train-both-cpu-bc",
                      "m:int4-qat-mse-train-both-cpu"]
    assert not g.skipped and g.cells[3].bias_correction is None  # QAT trains its biases: one QAT cell
    assert recipe().ptq.bias_correction is True  # the default (bench/results/bias_correction_decision_rule.txt)
    base = recipe("ptq.bias_correction=true")
    assert cell_recipe(base, g.cells[1]).ptq.bias_correction is False
    assert cell_recipe(base, g.cells[2]).ptq.bias_correction is True
    assert short_labels([c.axes() for c in g.cells]) == ["fp32", "int4 ptq", "int4 ptq bc", "int4 qat"]
    assert ids(expand_grid(base))[1] == "m:int8-ptq-mse-train-both-cpu-bc", "unset axis: the recipe's value"
    assert ids(expand_grid(recipe("ptq.bias_correction=false")))[1] == "m:int8-ptq-mse-train-both-cpu"
    only_off = recipe("ptq.bias_correction=true", "sweep.bias_corrections=[false]")
    assert any("ptq.bias_correction=true is not used" in n for n in expand_grid(only_off).notes)
    included = expand_grid(recipe("sweep.include=[{precision: int4, bias_correction: false}]"))
    assert ids(included) == ["m:fp32", "m:int8-ptq-mse-train-both-cpu-bc", "m:int4-ptq-mse-train-both-cpu"]


def test_mixed_precision_budget_out_of_range_names_the_key():
    with pytest.raises(RecipeError, match=r"recipe key sweep\.mixed_precisions\.1: "):
        recipe("sweep.mixed_precisions=[null,1.5]")
