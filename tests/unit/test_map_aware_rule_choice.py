"""bench/map_aware_rule_choice.py: replaying the base-rule choice from a grid's standard cells, pooled over grids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import map_aware_rule_choice as rc  # noqa: E402

#: per rule: (test value on every metric, proxy pixel AUROC, proxy distortion) of the 8-bit train cell
CELL = {"minmax": (0.70, 0.95, 0.04), "entropy": (0.74, 0.96, 0.05), "mse": (0.72, 0.94, 0.03),
        "percentile": (0.80, 0.93, 0.06)}


def _grid(folder: Path) -> Path:
    """A setup folder with the four standard cells of one (8-bit, train) cell, their proxy carrying the distortion."""
    for calib, (value, pixel, loss) in CELL.items():
        cell = folder / f"{calib}-train-8bit"
        cell.mkdir(parents=True)
        (cell / "cell.json").write_text(json.dumps({
            "image_auroc": value, "pixel_auroc": value, "aupro": value,
            "proxy": {"image_auroc": 0.9, "pixel_auroc": pixel, "loss": loss}}))
    return folder


def test_replay_picks_and_regret(tmp_path):
    rows = rc.replay(_grid(tmp_path / "mtd-rd"))
    assert [r["cell"] for r in rows] == ["train-8bit"]
    picks, regret = rows[0]["picks"], rows[0]["regret"]
    assert picks["separation"] == "entropy" and picks["distortion"] == "mse"
    assert regret["separation"]["pixel_auroc"] == pytest.approx(0.80 - 0.74)
    assert regret["distortion"]["aupro"] == pytest.approx(0.80 - 0.72)
    assert regret["fixed-entropy"]["image_auroc"] == pytest.approx(0.06)
    assert regret["fixed-mse"]["pixel_auroc"] == pytest.approx(0.80 - 0.72) and picks["fixed-mse"] == "mse"


def test_pooled_tables_and_chance(tmp_path):
    grids = [_grid(tmp_path / "a" / "mtd-rd"), _grid(tmp_path / "b" / "mtd-stfpm")]
    out = tmp_path / "rc"
    rc.main([*(f"--grid={g}" for g in grids), "--out", str(out)])
    md = (out.with_suffix(".md")).read_text()
    assert "## pooled: every cell of the 2 setups above (2 cells)" in md
    assert "### pooled, 8bit cells only (2)" in md
    chance = 0.80 - sum(v for v, _, _ in CELL.values()) / 4  # best minus the mean of the four rules
    assert f"| (a rule drawn at random: expected) | {chance:.4f} |" in md
    assert len(json.loads(out.with_suffix(".json").read_text())["setups"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--setup", "mtd-rd"], "--setup and --work go together"),
    (["--work", "bench/work/x", "--grid", "/nonexistent/mtd-rd"], "--setup and --work go together"),
    ([], "no setup"),
    (["--grid", "/nonexistent/mtd-rd"], "no setup folder"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        rc.main([*argv, "--out", str(tmp_path / "rc")])
    assert message in str(e.value)
    assert not list(tmp_path.iterdir())


def _onnx(path: Path, constant: bool) -> Path:
    """A map model by hand: map = channel mean of the image (or 0.5 everywhere), score = the map's maximum."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1)]
    if constant:
        nodes += [helper.make_node("Mul", ["m", "zero"], ["m0"]), helper.make_node("Add", ["m0", "half"], ["map"])]
    else:
        nodes += [helper.make_node("Identity", ["m"], ["map"])]
    nodes += [helper.make_node("ReduceMax", ["map"], ["s4"], axes=[1, 2, 3], keepdims=0),
              helper.make_node("Identity", ["s4"], ["score"])]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, None)],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _rescorable(folder: Path) -> Path:
    """A grid whose graphs exist: the stored proxies say minmax is best; its graph maps a constant."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        f = folder.parent / "normals" / f"n{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32)) * 60 + 100).astype(np.uint8)).save(f)
        files.append(str(f))
    fp32 = _onnx(folder / "fp32.onnx", constant=False)
    _grid(folder)
    for calib in CELL:
        ptq = folder / f"{calib}-train-8bit" / "ptq"
        _onnx(ptq / "model.onnx", constant=calib == "minmax")
        (ptq / "recipe.yaml").write_text("version: 1\nname: t\ndata: {image_size: 32, normalize: per-image}\n")
        (ptq / "report.json").write_text(json.dumps({"model": str(fp32), "search_set": {"files": files, "seed": 0}}))
        cell = json.loads((folder / f"{calib}-train-8bit" / "cell.json").read_text())
        cell["proxy"]["loss"] = 0.0 if calib == "minmax" else 1.0  # what the grid recorded: minmax distorts least
        (folder / f"{calib}-train-8bit" / "cell.json").write_text(json.dumps(cell))
    return folder


def test_rescored_proxy_is_measured_not_read(tmp_path):
    grid = _rescorable(tmp_path / "g" / "mtd-rd")
    assert rc.replay(grid)[0]["picks"]["distortion"] == "minmax"  # the stored proxy
    row = rc.replay(grid, rc.Rescorer(["crack", "hole"], threads=1))[0]
    assert "re-scored on 6 normals + anomalies of kinds crack, hole" in row["proxy_from"]
    assert row["proxy"]["entropy"]["loss"] == 0.0 and row["proxy"]["mse"]["loss"] == 0.0  # identical to fp32
    assert row["proxy"]["minmax"]["loss"] > 0.1 and row["proxy"]["minmax"]["pixel_auroc"] == 0.5
    assert row["picks"]["distortion"] != "minmax"


def test_rescore_bad_kinds_and_missing_graph(tmp_path):
    grid = _rescorable(tmp_path / "g" / "mtd-rd")
    with pytest.raises(SystemExit) as e:
        rc.main(["--grid", str(grid), "--kinds", "crack,nope", "--out", str(tmp_path / "rc")])
    assert "--kinds 'crack,nope'" in str(e.value)
    fp32 = grid / "fp32.onnx"
    good = fp32.read_bytes()
    fp32.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(SystemExit) as e:
        rc.main(["--grid", str(grid), "--kinds", "crack", "--out", str(tmp_path / "rc")])
    assert "ONNX Runtime cannot load" in str(e.value) and "\n" not in str(e.value)
    fp32.write_bytes(good)
    (grid / "mse-train-8bit" / "ptq" / "model.onnx").unlink()
    with pytest.raises(SystemExit) as e:
        rc.main(["--grid", str(grid), "--kinds", "crack", "--out", str(tmp_path / "rc")])
    assert "model.onnx is missing" in str(e.value)
    assert not (tmp_path / "rc.md").exists()


def test_proxy_kinds_pair_measures_both_graphs_and_the_gate_share(tmp_path):
    """bench/proxy_kinds_pair.py on the same grid: entropy's graph equals fp32's, minmax's maps a constant."""
    import proxy_kinds_pair as pk

    grid = _rescorable(tmp_path / "g" / "mtd-rd")
    out = tmp_path / "pair"
    pk.main(["--setup", str(grid), "--a", "entropy-train-8bit", "--b", "minmax-train-8bit", "--kinds", "crack,hole",
             "--kinds", "stain", "--threads", "1", "--out", str(out)])
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [r["kinds"] for r in payload["rows"]] == [["crack", "hole"], ["stain"]]
    for row in payload["rows"]:
        assert row["a"]["loss"] == 0.0 and row["b"]["loss"] > 0.1 and row["b"]["pixel_auroc"] == 0.5
        assert row["share_b_better"] == 0.0  # B never distorts less than a graph equal to fp32
    assert payload["test"]["entropy-train-8bit"]["image_auroc"] == CELL["entropy"][0]
    swapped = pk.compare(grid, "minmax-train-8bit", "entropy-train-8bit", ["crack"], 1)
    assert swapped["share_b_better"] == 1.0
    assert "| crack, hole |" in out.with_suffix(".md").read_text()
