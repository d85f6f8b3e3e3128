"""``qtool sweep`` for real on the shared tiny KD run: the report and its numbers checked independently,
cache hits and misses, a sweep killed midway (SIGKILL to its process group) and resumed, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.kd_run import shared
from helpers.sweep_run import shared_sweep, sweep_recipe

from qtool.cli import main
from qtool.recipe import load_recipe
from qtool.report.json import read_report
from qtool.sweep.run import run_sweep

QTOOL = Path(sys.executable).parent / "qtool"
IDS = ["train:fp32", "train:fp16", "train:int8-ptq-minmax-train-both-cpu-bc",
       "train:int8-ptq-minmax-random-normal-both-cpu-bc", "train:int8-ptq-entropy-train-both-cpu-bc",
       "train:int4-ptq-minmax-train-both-cpu-bc", "train:int8-qat-minmax-train-both-cpu"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return shared_sweep(tmp_path_factory)


def cells(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["cells"]}


def result_mtimes(cache: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (cache / "cells").glob("[!.]*/result.json")}  # not .tmp-*


def test_report_follows_the_schema_and_lists_every_cell(sweep):
    doc = read_report(sweep.out / "report.json")
    assert [c["id"] for c in doc["cells"]] == IDS
    assert all(c["status"] == "ok" and not c["cached"] for c in doc["cells"]), [c["error"] for c in doc["cells"]]
    assert doc["categories"] == ["disc", "grid"] and doc["models"][0]["origin"] == "exported"
    figures = sorted(p.name for p in (sweep.out / "figures").iterdir())
    assert figures == ["calib-source.png", "category-deltas.png", *[f"overlay-{i:02d}.png" for i in range(5)],
                       "pareto.png"], "one overlay per quantized cell"
    md = (sweep.out / "report.md").read_text()
    assert all(c["label"] in md for c in doc["cells"]) and "figures/pareto.png" in md
    assert {"report.json", "report.md", "report.html", "recipe.yaml", "manifest.json"} <= {
        p.name for p in sweep.out.iterdir()}
    front = [c for c in doc["cells"] if c["pareto"]]
    assert front, "some cell is always on the Pareto front"
    for c in doc["cells"]:  # nothing on the front is beaten on both latency and accuracy
        for f in front:
            assert not (c["latency"]["p50_ms"] < f["latency"]["p50_ms"]
                        and c["metrics"]["image_auroc"] > f["metrics"]["image_auroc"]), (c["id"], f["id"])


def _f1(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    tp = np.sum((scores >= t) & (labels == 1))
    fp, fn = np.sum((scores >= t) & (labels == 0)), np.sum((scores < t) & (labels == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def test_metrics_thresholds_and_fidelity_independently(sweep):
    by_id = cells(sweep.report)
    fp32 = by_id["train:fp32"]
    assert fp32["fidelity"]["pixel_pearson"] == pytest.approx(1.0) and fp32["fidelity"]["map_max_abs_diff"] == 0.0
    assert fp32["metrics"]["f1_at_fp32_threshold"] == fp32["metrics"]["f1_at_threshold"]
    ref_maps = np.load(Path(fp32["entry"]) / "maps.npy")
    ref_scores = np.array(json.loads((Path(fp32["entry"]) / "eval.json").read_text())["scores"])
    for c in sweep.report["cells"][1:]:
        ev = json.loads((Path(c["entry"]) / "eval.json").read_text())
        labels, scores, cats = np.array(ev["labels"]), np.array(ev["scores"]), np.array(ev["categories"])
        assert c["fp32_threshold"] == fp32["threshold"] and c["threshold"] == ev["threshold"]
        for cat in ("disc", "grid"):
            idx = cats == cat
            assert c["per_category"][cat]["f1_at_fp32_threshold"] == pytest.approx(
                _f1(labels[idx], scores[idx], fp32["threshold"])), (c["id"], cat)
            assert c["per_category"][cat]["f1_at_threshold"] == pytest.approx(
                _f1(labels[idx], scores[idx], c["threshold"])), (c["id"], cat)
            want = c["per_category"][cat]["aupro"] - fp32["per_category"][cat]["aupro"]
            assert c["deltas"][cat]["aupro"] == pytest.approx(want)
        ov = np.load(Path(c["entry"]) / "overlay.npz")
        diffs = [float(np.abs(ov["maps"][k] - ref_maps[i]).max()) for k, i in enumerate(c["overlay"]["indices"])]
        assert diffs == pytest.approx(c["overlay"]["max_abs_diff"]) and diffs == sorted(diffs, reverse=True)
        assert diffs[0] == pytest.approx(c["fidelity"]["map_max_abs_diff"], rel=1e-6), "the top image is the max"
        assert c["overlay"]["files"] == [ev["files"][i] for i in c["overlay"]["indices"]]
        assert float(np.max(np.abs(scores - ref_scores))) == pytest.approx(c["fidelity"]["score_max_abs_shift"])
    assert by_id["train:fp16"]["fidelity"]["pixel_pearson"] > 0.999
    assert by_id["train:int4-ptq-minmax-train-both-cpu-bc"]["fidelity"]["pixel_pearson"] < by_id[
        "train:int8-ptq-minmax-train-both-cpu-bc"]["fidelity"]["pixel_pearson"]


def fused_integer_convs(model: Path, tmp: Path) -> int:
    """QLinearConv nodes in the graph ONNX Runtime CPU actually runs (its saved optimised model)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / f"{model.parent.name}-optimised.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "QLinearConv" for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_latency_memory_size_and_stage_times(sweep, tmp_path):
    by_id = cells(sweep.report)
    for c in sweep.report["cells"]:
        lat = c["latency"]
        assert lat["device"] == "cpu" and lat["iterations"] == 5 and lat["threads"] == 1
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] and lat["peak_rss_mb"] > 0
        assert lat["throughput_ips"] == pytest.approx(1000.0 * lat["batch"] / lat["mean_ms"])
        bench = json.loads((Path(c["entry"]) / "bench.json").read_text())["results"][0]
        assert bench["precision"] == ("fp16" if c["precision"] == "fp16" else "int8" if c["calibrator"] else "fp32")
        build = Path(c["entry"]).parents[1] / "builds" / c["build_key"] / "model.onnx"
        assert c["model_size_bytes"] == build.stat().st_size
        assert {"build", "eval", "fidelity", "bench"} <= set(c["stage_seconds"])
    # the int4 cell's timing says its QDQ runs in float; checked against ORT's own optimised graph
    from qtool.sweep.cells import EMULATED_ACTIVATIONS_NOTE

    expected = [("train:int4-ptq-minmax-train-both-cpu-bc", True), ("train:int8-ptq-minmax-train-both-cpu-bc", False)]
    for cid, emulated in expected:
        c = by_id[cid]
        assert (EMULATED_ACTIVATIONS_NOTE in c["latency"]["notes"]) is emulated, cid
        fused = fused_integer_convs(Path(c["entry"]).parents[1] / "builds" / c["build_key"] / "model.onnx", tmp_path)
        assert (fused == 0) is emulated, (cid, fused)
    size = {k: c["model_size_bytes"] for k, c in by_id.items()}
    # a tiny model: QDQ scales and zero points weigh as much as the int8 savings over fp16
    assert size["train:int8-ptq-minmax-train-both-cpu-bc"] < 0.6 * size["train:fp32"]
    assert size["train:fp16"] < 0.6 * size["train:fp32"]
    assert "build.calibrate" in by_id["train:int8-ptq-entropy-train-both-cpu-bc"]["stage_seconds"]
    assert "build.train" in by_id["train:int8-qat-minmax-train-both-cpu"]["stage_seconds"]


def test_qat_cell_starts_from_the_ranges_of_its_ptq_twin(sweep):
    by_id = cells(sweep.report)
    ptq, qat = by_id["train:int8-ptq-minmax-train-both-cpu-bc"], by_id["train:int8-qat-minmax-train-both-cpu"]
    builds = sweep.cache / "builds"
    qat_report = json.loads((builds / qat["build_key"] / "report.json").read_text())
    ptq_tensors = json.loads((builds / ptq["build_key"] / "report.json").read_text())["quantization"]["tensors"]
    assert qat_report["init"]["init_from"] == str(builds / ptq["build_key"])
    assert qat_report["init"]["model_check"] == "checked"
    for t, r in qat_report["ranges"].items():
        assert r["initial"] == pytest.approx([ptq_tensors[t]["lo"], ptq_tensors[t]["hi"]]), t


def test_rerun_hits_the_cache_and_a_new_axis_value_runs_alone(sweep, tmp_path):
    cache = shutil.copytree(sweep.cache, tmp_path / "cache")
    before = result_mtimes(cache)
    res = CliRunner().invoke(main, ["sweep", str(sweep.recipe_file), "--out", str(tmp_path / "again"),
                                    "--cache", str(cache)])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert res.stdout.count(": cached") == len(IDS) + 1  # the exported model and every cell
    assert f"report: {tmp_path / 'again' / 'report.html'}" in res.stdout
    again = read_report(tmp_path / "again" / "report.json")
    assert all(c["cached"] for c in again["cells"]) and result_mtimes(cache) == before
    for a, b in zip(sweep.report["cells"], again["cells"], strict=True):
        assert (a["key"], a["metrics"], a["latency"]) == (b["key"], b["metrics"], b["latency"])
    more = run_sweep(load_recipe(sweep.recipe_file, [
        "sweep.calibrators=[minmax,entropy,percentile]",
        "sweep.exclude=[{calibrator: entropy, calib_source: random-normal}, {calibrator: percentile, "
        "calib_source: random-normal}]"]), tmp_path / "more", jobs=1, cache_dir=cache)
    fresh = {c["id"] for c in more["cells"] if not c["cached"]}
    assert fresh == {"train:int8-ptq-percentile-train-both-cpu-bc"} and len(more["cells"]) == len(IDS) + 1
    assert set(result_mtimes(cache)) - set(before) == {c["key"] for c in more["cells"] if c["id"] in fresh}
    assert all(result_mtimes(cache)[k] == t for k, t in before.items())


def _in_group(proc_dir: Path, pgid: int) -> bool:
    try:
        fields = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[2]) == pgid and fields[0] not in ("Z", "X")  # fields: state, ppid, pgrp


def _unfinished(cache: Path) -> list[Path]:
    return [p for kind in ("builds", "cells") if (cache / kind).is_dir() for p in (cache / kind).glob(".tmp-*")]


def test_killed_sweep_resumes_without_redoing_finished_cells(tmp_path_factory, tmp_path):
    kd = shared(tmp_path_factory)
    grid = {"precisions": ["fp32", "int8"], "calibrators": ["minmax", "entropy", "percentile"],
            "bench": {"iterations": 5, "warmup": 1, "threads": 1}, "overlays": 1}
    recipe = sweep_recipe(tmp_path / "kill.yaml", kd.onnx, kd.data, grid)
    cache, out, log = tmp_path / "cache", tmp_path / "out", open(tmp_path / "sweep.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(QTOOL), "sweep", str(recipe), "--out", str(out), "--cache", str(cache),
                             "--jobs", "2"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while True:  # kill once a quantized cell is finished while another is being written
            assert proc.poll() is None, "the sweep finished before it could be killed: " + \
                (tmp_path / "sweep.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no finished cell within 240 s"
            if len(result_mtimes(cache)) >= 2 and _unfinished(cache):
                os.killpg(proc.pid, signal.SIGKILL)  # the parent and its spawned workers, mid-cell
                break
            time.sleep(0.02)
    finally:
        proc.wait(30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    for _ in range(200):  # the spawned workers die with the group; wait until none is left running
        if not [p for p in Path("/proc").glob("[0-9]*") if _in_group(p, proc.pid)]:
            break
        time.sleep(0.05)
    finished = result_mtimes(cache)
    assert 2 <= len(finished) < 4 and _unfinished(cache), "killed between cells: nothing half-written to test"
    for key in finished:  # every entry in place is whole
        entry = cache / "cells" / key
        assert json.loads((entry / "result.json").read_text())["status"] == "ok"
        assert json.loads((entry / "entry.json").read_text())["key"] == key
    assert not (out / "report.json").exists()

    report = run_sweep(load_recipe(recipe), out, jobs=1, cache_dir=cache)
    assert [c["status"] for c in report["cells"]] == ["ok"] * 4
    assert {c["key"] for c in report["cells"] if c["cached"]} == set(finished), "finished cells were not redone"
    assert {k: t for k, t in result_mtimes(cache).items() if k in finished} == finished
    assert _unfinished(cache) == [], "the killed run's temporary folders are cleaned up"
    assert read_report(out / "report.json")["cells"][0]["id"] == "train:fp32"


def test_cli_dry_run_lists_the_grid_and_bad_input_is_one_line(sweep, tmp_path):
    res = CliRunner().invoke(main, ["sweep", str(sweep.recipe_file), "--dry-run"])
    assert res.exit_code == 0 and res.stdout.splitlines() == [*IDS, "7 cells, 0 skipped"], res.stdout
    res = CliRunner().invoke(main, ["sweep", str(sweep.recipe_file), "--dry-run", "--set", "sweep.calibrators=[kl]"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "sweep.calibrators: unknown calibrator 'kl'" in res.stderr
    res = CliRunner().invoke(main, ["sweep", str(sweep.recipe_file), "--out", str(tmp_path / "o"),
                                    "--set", "sweep.bench.iteratons=1"])
    assert res.exit_code == 2 and "sweep.bench.iteratons: unknown key" in res.stderr
    assert not (tmp_path / "o").exists()
    assert "sweep" in CliRunner().invoke(main, ["--help"]).stdout


def test_mixed_precision_axis_and_proxy_correlation(sweep, tmp_path):
    """Mixed precision is a sweep axis; with the proxy on, each quantized cell reports it and the report correlates
    it with the test AUROC (checked against scipy on the cells' own numbers)."""
    from scipy.stats import spearmanr

    cache = shutil.copytree(sweep.cache, tmp_path / "cache")
    report = run_sweep(load_recipe(sweep.recipe_file, [
        "sweep.precisions=[fp32,int8,int4]", "sweep.calibrators=[minmax,entropy]", "sweep.calib_sources=[train]",
        "sweep.include=[]", "sweep.exclude=[{precision: int8, mixed_precision: 0.0}]",
        "sweep.mixed_precisions=[null,0.0]", "ptq.search.proxy=true", "ptq.search.normals=4",
        "ptq.search.latency_iterations=2", "ptq.bias_correction=false", "ptq.mixed_precision_criterion=separation",
        "ptq.mixed_precision_rank=per-mac"]),
        tmp_path / "mp", jobs=1, cache_dir=cache)
    by_id = cells(report)  # without bias correction, which moves the proxy after mixed precision chose
    assert set(by_id) == {"train:fp32", "train:int8-ptq-minmax-train-both-cpu", "train:int8-ptq-entropy-train-both-cpu",
                          "train:int4-ptq-minmax-train-both-cpu", "train:int4-ptq-entropy-train-both-cpu",
                          "train:int4-ptq-minmax-train-both-cpu-mp0", "train:int4-ptq-entropy-train-both-cpu-mp0"}
    assert all(c["status"] == "ok" for c in report["cells"]), [c["error"] for c in report["cells"]]
    assert report["axes"]["mixed_precision"] == ["off", "mp0"]
    quantized = [c for c in report["cells"] if c["precision"] != "fp32"]
    assert all(c["proxy"] is not None for c in quantized) and by_id["train:fp32"]["proxy"] is None
    for c in quantized:
        fb = c["fallback"]
        assert (fb is None) == (c["mixed_precision"] is None), c["id"]
        if fb is not None:  # budget 0: the proxy of the final model must not drop at all
            assert fb["budget"] == 0.0 and c["proxy"]["drop"] <= 1e-9 and fb["rank"] == "per-mac", c["id"]
            twin = by_id[c["id"].removesuffix("-mp0")]
            assert bool(fb["layers"]) == (twin["proxy"]["drop"] > 1e-9), c["id"]
            # int4 is emulated: a fallback's cost is timed on the 8-bit stand-in and stated as a MAC share too
            assert fb["latency_stand_in"] == bool(fb["layers"]), c["id"]
            assert (fb["float_macs_share"] > 0) == bool(fb["layers"]) and fb["float_macs_share"] <= 1, c["id"]
    corr = report["proxy_correlation"]
    assert corr["n_cells"] == len(quantized)
    for key in ("image_auroc", "pixel_auroc"):
        rho = spearmanr([c["proxy"]["quantized"][key] for c in quantized], [c["metrics"][key] for c in quantized])
        want = None if np.isnan(rho.statistic) else pytest.approx(float(rho.statistic))
        assert corr[key] == want, key
    md = (tmp_path / "mp" / "report.md").read_text()
    assert "Proxy metric and mixed precision" in md and "int4 minmax mp0" in md and "(separation 0, per-mac)" in md
