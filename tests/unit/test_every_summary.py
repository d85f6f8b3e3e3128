"""bench/every_summary.py: it adds up the verdicts the --every files hold, and refuses a file that is not one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import every_summary as es  # noqa: E402


def _verdict(anchor: str, metric: str, verdict: str, diff: float) -> dict:
    lo, hi = {"below": (diff / 2, diff * 2), "above": (diff * 2, diff / 2), "tie": (-abs(diff), abs(diff))}[verdict]
    return {"anchor": anchor, "metric": metric, "anchor_value": 0.7, "best": "other", "best_value": 0.7 + diff,
            "best_minus_anchor": diff, "ci95": [lo, hi], "verdict": verdict}


def _file(tmp_path: Path, name: str, cells: list[tuple[int, str, list[dict]]], every: bool = True,
          pair: list[str] | None = None) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {"every": every, "pair": pair}, "cells": [
        {"setup": "mtd-rd", "bits": b, "source": s, "rows": [], "verdicts": v} for b, s, v in cells]}))
    return path


def test_counts_are_the_files_verdicts_and_the_focus_lists_the_significant_ones(tmp_path):
    a = _file(tmp_path, "a_every.json", [(4, "train", [_verdict("x", "image_auroc", "below", 0.02),
                                                        _verdict("y", "image_auroc", "tie", 0.01)])])
    b = _file(tmp_path, "b_every.json", [(8, "mix", [_verdict("x", "pixel_auroc", "above", -0.03),
                                                      _verdict("y", "pixel_auroc", "below", 0.04)])])
    out = tmp_path / "sum"
    es.main(["--focus", "x", "--group", f"G1=four bits:{a}", "--group", f"G2=eight:{b}", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["total"] == {"x": {"below": 1, "tie": 0, "above": 1}, "y": {"below": 1, "tie": 1, "above": 0}}
    assert [g["counts"]["x"] for g in data["groups"]] == [{"below": 1, "tie": 0, "above": 0},
                                                         {"below": 0, "tie": 0, "above": 1}]
    assert [(f["bits"], f["metric"], f["verdict"]) for f in data["focus"]] == [(4, "image_auroc", "below"),
                                                                              (8, "pixel_auroc", "above")]
    md = out.with_suffix(".md").read_text()
    assert "**1 / 0 / 1**" in md
    assert "| 4 | train | image_auroc | below |" in md and "| a_every.json |" in md  # which file (seed) it came from


def test_a_file_that_is_not_an_every_result_is_refused_and_nothing_is_written(tmp_path, capsys):
    bad = _file(tmp_path, "best.json", [(4, "train", [])], every=False)
    out = tmp_path / "sum"
    with pytest.raises(SystemExit) as e:
        es.main(["--focus", "x", "--group", f"G=w:{bad}", "--out", str(out)])
    assert e.value.code != 0 and "not a map_aware_bootstrap.py --every or --pair result" in capsys.readouterr().err
    assert not list(tmp_path.glob("sum*"))


def test_pair_files_add_up_against_their_base_and_baselines_do_not_mix(tmp_path, capsys):
    one = [(6, "train", [_verdict("x", "image_auroc", "below", 0.02)])]
    a = _file(tmp_path, "a_fp32.json", one, every=False, pair=["fp32", "x"])
    b = _file(tmp_path, "b_fp32.json", one, every=False, pair=["fp32", "x", "y"])
    out = tmp_path / "sum"
    es.main(["--focus", "x", "--group", f"G=w:{a},{b}", "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text())["total"] == {"x": {"below": 2, "tie": 0, "above": 0}}
    assert "each column against the pair's base fp32" in out.with_suffix(".md").read_text()
    for other in (_file(tmp_path, "c_every.json", one), _file(tmp_path, "d.json", one, every=False, pair=["mse", "x"])):
        with pytest.raises(SystemExit):
            es.main(["--focus", "x", "--group", f"G=w:{a},{other}", "--out", str(tmp_path / "mixed")])
        assert "different baselines" in capsys.readouterr().err
    assert not list(tmp_path.glob("mixed*"))


def test_metrics_keeps_only_those_verdicts(tmp_path):
    a = _file(tmp_path, "a_every.json", [(4, "train", [_verdict("x", "image_auroc", "below", 0.02),
                                                        _verdict("x", "aupro", "above", -0.1)])])
    out = tmp_path / "sum"
    es.main(["--focus", "x", "--metrics", "aupro", "--group", f"G=w:{a}", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["total"] == {"x": {"below": 0, "tie": 0, "above": 1}} and data["meta"]["metrics"] == ["aupro"]
    assert "same source and width; aupro)" in out.with_suffix(".md").read_text()


def test_the_focus_margins_average_every_cell_and_against_sets_name_the_baseline(tmp_path):
    cells = [(4, "train", [_verdict("x", "image_auroc", "tie", 0.02), _verdict("x", "aupro", "above", -0.10)]),
             (8, "train", [_verdict("x", "image_auroc", "below", 0.04), _verdict("y", "image_auroc", "tie", 0.0)])]
    a = _file(tmp_path, "a_every.json", cells)
    data = json.loads(a.read_text())
    data["meta"]["against"] = ["minmax", "mse"]
    a.write_text(json.dumps(data))
    out = tmp_path / "sum"
    es.main(["--focus", "x", "--group", f"G=w:{a}", "--out", str(out)])
    got = {m["metric"]: m for m in json.loads(out.with_suffix(".json").read_text())["margins"]}
    assert got["image_auroc"]["cells"] == 2 and got["image_auroc"]["under_best"] == 2
    assert got["image_auroc"]["mean_best_minus"] == pytest.approx(0.03)
    assert got["image_auroc"]["mean_ci_width"] == pytest.approx((0.04 + 0.06) / 2)
    assert got["aupro"] == {"metric": "aupro", "cells": 1, "mean_best_minus": pytest.approx(-0.10), "under_best": 0,
                            "mean_ci_width": pytest.approx(0.15)}
    md = out.with_suffix(".md").read_text()
    assert "against the best of minmax, mse" in md and "| image_auroc | 2 | +0.0300 | 2 | 0.0500 |" in md
