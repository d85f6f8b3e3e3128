"""bench/qat_trajectory.py: every snapshot of a real (tiny) map-distillation run scored, the run's check set rebuilt
exactly, the cache, the rule's decisions on crafted runs, and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.kd_run import shared

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import qat_trajectory as qt  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
KEYS = ("image_auroc", "pixel_auroc", "aupro")


@pytest.fixture(scope="module")
def tiny_cell(tmp_path_factory):
    """A map-distillation run with snapshots (2 epochs) as a cell folder, beside five standard cells."""
    from qtool.qat.run import run_qat
    from qtool.runs import run_eval

    kd = shared(tmp_path_factory)
    setup = tmp_path_factory.mktemp("trajectory") / "tiny"
    cell = setup / "mapdt-in8-train-4bit"
    recipe = kd.recipe("ptq.activation_bits=4", "ptq.weight_bits=4", "ptq.calib=mse", "qat.loss=map",
                       "qat.learn=ranges", "qat.keep=guarded", "qat.snapshots=true", "qat.epochs=2",
                       "qat.freeze_epochs=0", "qat.optimizer=adam", "qat.batch_size=4", "ptq.search.normals=4",
                       "ptq.search.check_normals=4", "eval.threads=1")
    report = run_qat(kd.checkpoint, recipe, cell / "qat")
    metrics = run_eval(Path(report["output"]), recipe)["metrics"]["mean"]
    (cell / "cell.json").write_text(json.dumps({k: metrics[k] for k in KEYS}))
    for i, col in enumerate(qt.STANDARD.split(",")):  # standard cells: only their metric values are read
        (setup / f"{col}-train-4bit").mkdir()
        (setup / f"{col}-train-4bit" / "cell.json").write_text(json.dumps({k: 0.5 + 0.01 * i for k in KEYS}))
    return kd, recipe, cell


def test_every_state_is_scored_and_the_kept_one_is_the_cells_export(tiny_cell):
    _, _, cell = tiny_cell
    spec = qt.parse_cell(f"tiny/seed 0={cell}@image_auroc:{cell}")
    run = qt.analyse(spec, qt.STANDARD.split(","), {"mtd-like": ["crack", "hole"]}, threads=1)
    assert [s["epoch"] for s in run["states"]] == [0, 1, 2]
    assert run["kept_equals_cell"] is True  # the kept snapshot, evaluated here, is the cell's own model.onnx
    assert run["earlier"] == {"dir": str(cell), "same_curve": True, "same_kept_epoch": True,
                              "kept_metrics_equal": True}
    assert set(run["states"][0]["proxies"]) == {"run", "mtd-like"}
    assert run["standard"]["column"] == "mawc-in8" and run["standard"]["value"] == pytest.approx(0.54)
    assert run["oracle"]["value"] == max(s["image_auroc"] for s in run["states"])
    assert run["picks"]["guarded (run)"] == run["kept_epoch"]
    assert all(-1.0 <= r <= 1.0 for rho in run["spearman"].values() for r in rho.values() if r is not None)
    assert all(-1.0 <= s["map_order"] < 1.0 for s in run["states"])  # quantized maps do not keep every pixel's order


def test_map_order_of_the_fp32_model_against_itself_is_one(tiny_cell):
    from qtool.evaluate import OnnxPredictor
    from qtool.search import RUN_LEVEL

    _, recipe, cell = tiny_cell
    report = json.loads((cell / "qat" / "report.json").read_text())
    normals = qt.check_normals(cell / "qat" / "model.onnx", report, recipe)
    ref = OnnxPredictor(cell / "qat" / "fp32.onnx", 1, RUN_LEVEL)(normals)[0]
    assert qt.map_order(OnnxPredictor(cell / "qat" / "fp32.onnx", 1, RUN_LEVEL)(normals)[0], ref) == pytest.approx(1.0)
    assert qt.map_order(OnnxPredictor(cell / "qat" / "model.onnx", 1, RUN_LEVEL)(normals)[0], ref) < 1.0


def test_the_run_kinds_check_set_is_the_runs_own(tiny_cell):
    """Rebuilt from the report's file list, the normals and the run-kind anomalies are the check set QAT used."""
    from qtool.data import ImageTransform, load_splits
    from qtool.search import build_check_set

    kd, recipe, cell = tiny_cell
    report = json.loads((cell / "qat" / "report.json").read_text())
    images, layout, n = qt.check_images(cell, report, recipe, {"mtd-like": ["crack"]})
    original = build_check_set(load_splits(recipe.data), ImageTransform(recipe.data), recipe.ptq.search)
    part, masks, labels = layout["run"]
    np.testing.assert_array_equal(np.concatenate([images[:n], images[part]]), original.images)
    np.testing.assert_array_equal(masks, original.masks)
    assert not np.array_equal(images[layout["mtd-like"][0]], images[part])


def test_scores_are_cached_per_state(tiny_cell, monkeypatch):
    _, _, cell = tiny_cell
    spec = qt.parse_cell(f"tiny/seed 0={cell}@aupro")
    first = qt.analyse(spec, qt.STANDARD.split(","), {}, threads=1)

    def no_eval(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(qt, "run_eval", no_eval)
    assert qt.analyse(spec, qt.STANDARD.split(","), {}, threads=1)["states"] == first["states"]


def _crafted(cell: str, values: list[float], kept: int, guard_pick: int, standard: float) -> dict:
    states = [{"epoch": i, "image_auroc": v} for i, v in enumerate(values)]
    return {"cell": cell, "metric": "image_auroc", "states": states, "standard": {"value": standard},
            "oracle": {"value": max(values)}, "picks": {"guarded (run)": kept, "guarded (m, ONNX)": guard_pick},
            "spearman": {"p": {"image_auroc": 0.6 if cell == "a" else 0.2}}}


def test_decisions_follow_the_rule():
    runs = [_crafted("a", [0.5, 0.7, 0.6], 2, 1, 0.65), _crafted("a", [0.5, 0.6, 0.7], 1, 1, 0.65),
            _crafted("b", [0.5, 0.6, 0.6], 0, 0, 0.65), _crafted("b", [0.5, 0.7, 0.4], 1, 2, 0.65)]
    dec = qt.decisions(runs, ["m"])
    assert dec["reachable"] == {"a": True, "b": False}  # b's first run never reaches 0.65
    assert dec["guards"]["m"]["better"] == 1 and dec["guards"]["m"]["worse"] == 1
    assert dec["median_spearman_on_metric"]["p"] == pytest.approx(0.4)


@pytest.mark.parametrize("damage", ["no snapshots", "bad metric"])
def test_bad_input_is_a_one_line_error_and_no_output(tiny_cell, tmp_path, damage):
    import shutil

    _, _, cell = tiny_cell
    if damage == "no snapshots":
        copy = tmp_path / "tiny" / cell.name
        shutil.copytree(cell, copy, ignore=shutil.ignore_patterns("snapshots", "trajectory"))
        for col in qt.STANDARD.split(","):
            shutil.copytree(cell.parent / f"{col}-train-4bit", tmp_path / "tiny" / f"{col}-train-4bit")
        arg = f"tiny/seed 0={copy}@image_auroc"
    else:
        arg = f"tiny/seed 0={cell}@auroc"
    with pytest.raises(SystemExit) as e:
        qt.main(["--cell", arg, "--out", str(tmp_path / "out")])
    if damage == "no snapshots":
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value) and "snapshots" in str(e.value)
    else:
        assert e.value.code == 2
    assert not (tmp_path / "out.json").exists()


def test_export_parity_of_a_real_run(tiny_cell, tmp_path):
    """bench/qat_export_parity.py on the tiny run: the float export matches torch to float precision, the QDQ export
    matches its fake-quant model far closer than any quantization step; a missing checkpoint is a one-line error."""
    import shutil

    import qat_export_parity as qp

    _, _, cell = tiny_cell
    row = qp.parity(cell, images=2, noise=1e-5, threads=1)
    assert row["images"] == 2
    assert row["fp32_onnx_vs_torch"]["max"] < 1e-4
    assert row["qdq_vs_fake_quant"]["mean"] < 1e-3
    assert row["fp32_under_noise"]["mean"] > 0.0
    broken = tmp_path / cell.name
    shutil.copytree(cell, broken, ignore=shutil.ignore_patterns("qat.pt", "snapshots", "trajectory"))
    with pytest.raises(SystemExit) as e:
        qp.main(["--cell", str(broken), "--out", str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and "qat.pt" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out.json").exists()
