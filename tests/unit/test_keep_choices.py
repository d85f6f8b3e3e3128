"""bench/keep_choices.py: each keep rule's epoch replayed on a guarded run, the same-curve check, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import keep_choices as kc  # noqa: E402

METRICS = {"image_auroc": 0.7, "pixel_auroc": 0.8, "aupro": 0.5}
# (loss, image proxy, pixel proxy) of epochs 0..3: epoch 1 has the lowest loss but a lower pixel proxy than the start
CURVE = [(1.0, 0.9, 0.9), (0.4, 0.95, 0.85), (0.6, 0.92, 0.93), (0.7, 0.93, 0.94)]


def _cell(path: Path, keep: str, kept: int, curve=CURVE, proxies: bool = True) -> Path:
    rows = [{"epoch": i, "holdout_loss": loss, **({"proxy_image_auroc": im, "proxy_pixel_auroc": px} if proxies
                                                   else {})} for i, (loss, im, px) in enumerate(curve)]
    (path / "qat").mkdir(parents=True)
    (path / "cell.json").write_text(json.dumps({**METRICS, "qat_seconds": 10.0}))
    (path / "qat" / "report.json").write_text(json.dumps({"history": rows, "kept_epoch": kept,
                                                          "qat": {"keep": keep}}))
    return path


def test_each_rule_is_replayed_on_the_guarded_runs_history(tmp_path):
    row = kc.compare("r", _cell(tmp_path / "g", "guarded", 2), _cell(tmp_path / "b", "best", 1, proxies=False))
    assert row["same_curve"] is True
    assert {r: c["epoch"] for r, c in row["choices"].items()} == {"guarded": 2, "best": 1, "last": 3}
    assert row["kept"] == {"guarded_run": 2, "other_run": 1, "other_rule": "best"}
    kc.write_markdown(tmp_path / "out.md", {"command": "c", "machine": "m", "versions": {}}, [row])
    assert "different epochs: 1 of 1 (r)" in (tmp_path / "out.md").read_text()


def test_a_different_trajectory_is_flagged(tmp_path):
    other = [(1.0, 0.9, 0.9), (0.5, 0.9, 0.9), (0.6, 0.9, 0.9), (0.7, 0.9, 0.9)]
    row = kc.compare("r", _cell(tmp_path / "g", "guarded", 2), _cell(tmp_path / "b", "best", 1, other, False))
    assert row["same_curve"] is False


@pytest.mark.parametrize("damage", ["missing report", "no proxies"])
def test_bad_cells_are_a_one_line_error_and_no_output(tmp_path, capsys, damage):
    guarded = _cell(tmp_path / "g", "guarded", 2, proxies=damage != "no proxies")
    other = _cell(tmp_path / "b", "best", 1)
    if damage == "missing report":
        (other / "qat" / "report.json").unlink()
    with pytest.raises(SystemExit) as e:
        kc.main(["--cell", f"r={guarded}:{other}", "--out", str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert ("report.json" if damage == "missing report" else "no check-set proxy") in str(e.value)
    assert not (tmp_path / "out.json").exists()
