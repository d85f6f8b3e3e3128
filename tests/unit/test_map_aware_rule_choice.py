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
