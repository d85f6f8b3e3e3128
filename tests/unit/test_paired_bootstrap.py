"""bench/paired_bootstrap.py: the stratified draws and the per-category metric the map-aware bootstrap relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import paired_bootstrap as pb  # noqa: E402

from qtool import metrics  # noqa: E402


def _outputs(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(int)
    groups = np.array(["a", "b"])[np.arange(n) % 2]
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[labels == 1, 2:5, 2:5] = 1
    # category b's scores sit on a different scale: pooling the categories would mix them
    shift = np.where(groups == "b", 5.0, 0.0)
    outs = {f"m{i}": ((rng.random((n, 8, 8)) + masks * 0.4 * i + shift[:, None, None]).astype(np.float32),
                      rng.random(n) + labels * 0.3 * i + shift) for i in range(2)}
    return outs, masks, labels, groups


def test_draws_keep_each_category_and_class_count():
    _, _, labels, groups = _outputs()
    w = pb.draws(labels, rounds=20, seed=3, groups=groups)
    assert np.all(w.sum(axis=1) == len(labels))
    for g in ("a", "b"):
        for cls in (0, 1):
            sel = (groups == g) & (labels == cls)
            assert np.all(w[:, sel].sum(axis=1) == sel.sum())


def test_full_split_value_is_the_mean_over_categories():
    outs, masks, labels, groups = _outputs()
    rows = pb.compare(outs, {"a": ["m0"], "b": ["m1"]}, masks, labels, 50, 256, 0, groups)
    image = next(r for r in rows if r["metric"] == "image_auroc")
    want = np.mean([roc_auc_score(labels[groups == g], outs["m1"][1][groups == g]) for g in ("a", "b")])
    assert image["b_value"] == pytest.approx(want)
    pooled = roc_auc_score(labels, outs["m1"][1])
    assert abs(pooled - want) > 1e-3  # the shifted category makes the pooled value differ


def test_per_category_values_are_those_the_full_split_value_averages():
    outs, masks, labels, groups = _outputs()
    models = {"a": ["m0"], "b": ["m1"]}
    per = pb.category_values(outs, models, masks, labels, groups)
    assert set(per) == {"a", "b"} and per["a"]["images"] == (groups == "a").sum()
    assert per["b"]["defective"] == labels[groups == "b"].sum()
    sel = groups == "b"
    assert per["b"]["b"]["image_auroc"] == pytest.approx(roc_auc_score(labels[sel], outs["m1"][1][sel]))
    rows = pb.compare(outs, models, masks, labels, 20, 256, 0, groups)
    for r in rows:
        assert r["b_value"] == pytest.approx(np.mean([per[g]["b"][r["metric"]] for g in ("a", "b")]))
    lines = pb.category_table(per)
    assert lines[0] == "| category (images, defective) | metric | a | b |" and len(lines) == 2 + 2 * 2


def test_aupro_is_bootstrapped_on_the_same_rounds_when_asked():
    outs, masks, labels, groups = _outputs()
    models = {"a": ["m0"], "b": ["m1"]}
    plain = pb.compare(outs, models, masks, labels, 40, 256, 0, groups)
    rows = pb.compare(outs, models, masks, labels, 40, 256, 0, groups, metrics=pb.WITH_AUPRO)
    assert [r["metric"] for r in rows] == ["image_auroc", "pixel_auroc", "aupro"] and rows[:2] == plain
    row = rows[2]
    want = np.mean([metrics.aupro(masks[groups == g], outs["m1"][0][groups == g]) for g in ("a", "b")])
    assert row["b_value"] == pytest.approx(want)  # the full-split value is the exact per-category mean
    lo, hi = row["ci95"]
    assert lo > 0 and lo <= row["difference"] <= hi  # m1 marks the defects, m0 does not


def test_one_category_equals_no_categories():
    outs, masks, labels, _ = _outputs()
    models = {"a": ["m0"], "b": ["m1"]}
    plain = pb.compare(outs, models, masks, labels, 40, 128, 1)
    grouped = pb.compare(outs, models, masks, labels, 40, 128, 1, np.full(len(labels), "mtd"))
    assert plain == grouped


def _three(n: int = 48):
    outs, masks, labels, groups = _outputs(n)
    rng = np.random.default_rng(7)
    outs["m2"] = ((rng.random((n, 8, 8)) + masks * 0.2).astype(np.float32), rng.random(n) + labels * 0.5)
    return outs, {"a": ["m0"], "b": ["m1"], "c": ["m2"]}, masks, labels, groups


def test_several_anchors_share_the_rounds_and_mirror_each_other():
    outs, models, masks, labels, groups = _three()
    rows = pb.compare(outs, models, masks, labels, 60, 128, 2, groups, anchors=["a", "b", "c"])
    assert len(rows) == 3 * 2 * len(pb.METRICS)
    first = pb.compare(outs, models, masks, labels, 60, 128, 2, groups)
    assert first == [r for r in rows if r["a"] == "a"]  # the first anchor alone: the default
    for r in rows:
        back = next(x for x in rows if (x["a"], x["b"], x["metric"]) == (r["b"], r["a"], r["metric"]))
        assert back["difference"] == pytest.approx(-r["difference"])
        assert back["ci95"] == pytest.approx([-r["ci95"][1], -r["ci95"][0]])  # the same rounds, sign flipped


def test_every_calibrator_is_judged_against_the_best_of_the_others():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import map_aware_bootstrap as mab

    outs, models, masks, labels, groups = _three()
    rows = pb.compare(outs, models, masks, labels, 60, 128, 2, groups, anchors=["a", "b", "c"])
    cells = [{"bits": 8, "verdicts": [v for a in models for v in mab.verdicts(rows, a)]}]
    for v in cells[0]["verdicts"]:
        others = [r for r in rows if r["a"] == v["anchor"] and r["metric"] == v["metric"]]
        best = max(others, key=lambda r: r["b_value"])
        assert (v["best"], v["best_minus_anchor"]) == (best["b"], best["b_value"] - best["a_value"])
        lo, hi = v["ci95"]
        assert v["verdict"] == ("below" if lo > 0 else "above" if hi < 0 else "tie")
    counts = {a: mab.verdict_counts(cells, a) for a in models}
    assert all(sum(c.values()) == len(pb.METRICS) for c in counts.values())
    assert all(mab.verdict_counts(cells, a, 8) == counts[a] for a in models)
    assert all(sum(mab.verdict_counts(cells, a, 4).values()) == 0 for a in models)  # no 4-bit cell
    best_image = max(models, key=lambda a: next(r["a_value"] for r in rows
                                                 if r["a"] == a and r["metric"] == "image_auroc"))
    assert next(v for v in cells[0]["verdicts"]
                if v["anchor"] == best_image and v["metric"] == "image_auroc")["best_minus_anchor"] < 0


def test_a_calibrator_variant_is_parsed_into_its_calibrator_and_options_or_refused():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import argparse

    import map_aware as ma

    label, calib, options = ma.parse_variant("mse-anchored=map-aware:initial=mse,objective=anchored")
    assert (label, calib) == ("mse-anchored", "map-aware")
    assert options == ["ptq.calib_options.initial=mse", "ptq.calib_options.objective=anchored"]
    args = argparse.Namespace(variants=[(label, calib, options)], overrides=[], map_aware_budget=60.0,
                              map_aware_graphs=None)
    got = ma.cell_overrides("mse-anchored", "train", 4, args)
    assert got[0] == "ptq.calib=map-aware" and "ptq.calib_options.objective=anchored" in got
    assert "ptq.calib_options.time_budget_s=60.0" in got  # a map-aware variant gets the map-aware budget
    assert ma.cell_overrides("mse", "train", 4, args)[0] == "ptq.calib=mse"
    wide = argparse.Namespace(**{**vars(args), "map_aware_graphs": 40,
                                 "variants": [ma.parse_variant("g120=map-aware:max_graphs=120")]})
    graphs = [o for o in ma.cell_overrides("g120", "train", 4, wide) if "max_graphs" in o]
    assert graphs[-1] == "ptq.calib_options.max_graphs=120"  # the variant's own option wins (applied last)
    assert ma.build_recipe(ma.Recipe().model_dump(mode="json"),
                           ma.cell_overrides("g120", "train", 4, wide)).ptq.calib_options["max_graphs"] == 120
    for bad in ("map-aware=map-aware:initial=mse", "x", "=map-aware", "v=map-aware:initial", "v=map-aware:=mse"):
        with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
            ma.parse_variant(bad)
    ma.check_variant("mse-anchored", args)  # a valid variant builds
    # a ``ptq.`` key is a recipe override, not a calibrator option
    recipe_variant = argparse.Namespace(**{**vars(args), "variants": [ma.parse_variant("w=mse:ptq.weight_range=mse")]})
    assert ma.cell_overrides("w", "train", 4, recipe_variant)[-1] == "ptq.weight_range=mse"
    ma.check_variant("w", recipe_variant)
    from qtool.errors import QtoolError

    for text, match in (("v=map-aware:objective=bogus", "objective"), ("v=nosuch:", "nosuch"),
                        ("v=map-aware:nokey=1", "nokey"), ("v=mse:ptq.weight_range=kl", "weight range rule")):
        bad_args = argparse.Namespace(**{**vars(args), "variants": [ma.parse_variant(text)]})
        with pytest.raises(QtoolError, match=match):
            ma.check_variant("v", bad_args)


def test_bootstrap_refuses_variants_without_every(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import map_aware_bootstrap as mab

    with pytest.raises(SystemExit, match="--variants needs --every"):
        mab.main(["--work", "w", "--setup", "s", "--variants", "v", "--out", "o"])


def test_bootstrap_pair_judges_the_variant_against_its_base_only(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import map_aware_bootstrap as mab

    for bad in (["--pair", "mse"], ["--pair", "mse,mse-bc", "--every"], ["--pair", "mse,"], ["--pair", "a,b,a"]):
        with pytest.raises(SystemExit, match="--pair takes BASE,VARIANT"):
            mab.main(["--work", "w", "--setup", "s", *bad, "--out", "o"])
    outs, models, masks, labels, groups = _three()
    rows = pb.compare(outs, {"b": models["b"], "a": models["a"]}, masks, labels, 60, 128, 2, groups, anchors=["b"])
    verdicts = mab.verdicts(rows, "b")
    assert [v["best"] for v in verdicts] == ["a", "a"]  # no pick: the base is the only other column
    for v in verdicts:
        row = next(r for r in rows if r["metric"] == v["metric"])
        assert v["best_minus_anchor"] == row["b_value"] - row["a_value"] and v["ci95"] == row["ci95"]



def test_bootstrap_columns_need_every_and_two_names(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import map_aware_bootstrap as mab

    for bad in (["--columns", "a,b"], ["--every", "--columns", "a"], ["--every", "--columns", ","]):
        with pytest.raises(SystemExit, match="--columns takes two or more column names and needs --every"):
            mab.main(["--work", "w", "--setup", "s", *bad, "--out", "o"])


def test_bootstrap_column_fp32_is_the_setups_float_model(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import map_aware_bootstrap as mab

    setup = tmp_path / "mtd-rd"
    (setup / "mse-train-6bit" / "qat").mkdir(parents=True)
    (setup / "mse-train-6bit" / "qat" / "model.onnx").write_bytes(b"x")
    with pytest.raises(SystemExit, match="fp32.onnx is missing"):
        mab.cell_models(tmp_path, "mtd-rd", "train", 6, ["fp32", "mse"])
    (setup / "fp32.onnx").write_bytes(b"x")
    assert mab.cell_models(tmp_path, "mtd-rd", "train", 6, ["fp32", "mse"]) == {
        "fp32": str(setup / "fp32.onnx"), "mse": str(setup / "mse-train-6bit" / "qat" / "model.onnx")}


def _fake_cell(monkeypatch, mab) -> list[list[str]]:
    """One cell of columns a, b, c (``_three``'s m0, m1, m2) without files; returns the file lists run, in order."""
    outs, _, masks, labels, groups = _three()
    paths, seen = {"a": "m0", "b": "m1", "c": "m2"}, []
    monkeypatch.setattr(mab, "cell_models", lambda work, setup, source, bits, names: {n: paths[n] for n in names})
    monkeypatch.setattr(mab, "load_splits", lambda data: type("S", (), {"test": list(range(len(labels)))})())
    monkeypatch.setattr(mab, "run_models", lambda files, splits, transform: (
        seen.append(files) or {f: outs[f] for f in files}, masks, labels, groups))
    return seen


def test_bootstrap_pair_with_several_variants_judges_each_against_the_base_only(tmp_path, monkeypatch):
    """``--pair b,a,c``: a and c each against b (never against each other), on one set of rounds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import json

    import map_aware_bootstrap as mab

    _fake_cell(monkeypatch, mab)
    out = tmp_path / "pair"
    mab.main(["--work", "w", "--setup", "s", "--bits", "8", "--sources", "train", "--pair", "b,a,c", "--rounds", "60",
              "--bins", "128", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    cell = json.loads(out.with_suffix(".json").read_text())["cells"][0]
    assert {(v["anchor"], v["best"]) for v in cell["verdicts"]} == {("a", "b"), ("c", "b")}
    for v in cell["verdicts"]:
        row = next(r for r in cell["rows"] if (r["a"], r["b"], r["metric"]) == (v["anchor"], "b", v["metric"]))
        assert v["best_minus_anchor"] == row["difference"] and v["ci95"] == row["ci95"]
    assert any(r["b"] == "c" for r in cell["rows"] if r["a"] == "a")  # compared, but not what a is judged on


def test_a_pool_spec_is_parsed_or_refused_in_one_line():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import argparse

    import map_aware_bootstrap as mab

    assert mab.parse_pool("mapdw=mapdw-in8+mapdw-r-in8") == ("mapdw", ["mapdw-in8", "mapdw-r-in8"])
    assert mab.parse_pool("one=mapdw-in8") == ("one", ["mapdw-in8"])
    for bad in ("mapdw", "=a+b", "p=a+", "p=a+a", "p=p+a", "p="):
        with pytest.raises(argparse.ArgumentTypeError, match="--pool takes NAME=LABEL"):
            mab.parse_pool(bad)
    with pytest.raises(SystemExit, match="names a column twice"):
        mab.main(["--work", "w", "--setup", "s", "--every", "--pool", "p=a+b", "--pool", "p=c+d", "--out", "o"])


def test_pooled_models_give_a_pool_one_file_per_run(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import map_aware_bootstrap as mab

    for label in ("mse", "q0", "q1"):
        (tmp_path / "mtd-rd" / f"{label}-train-6bit" / "qat").mkdir(parents=True)
        (tmp_path / "mtd-rd" / f"{label}-train-6bit" / "qat" / "model.onnx").write_bytes(b"x")
    got = mab.pooled_models(tmp_path, "mtd-rd", "train", 6, ["mse", "q"], {"q": ["q0", "q1"]})
    cell = tmp_path / "mtd-rd"
    assert got == {"mse": [str(cell / "mse-train-6bit/qat/model.onnx")],
                   "q": [str(cell / f"q{i}-train-6bit/qat/model.onnx") for i in (0, 1)]}
    with pytest.raises(SystemExit, match="q2-train-6bit"):  # a run missing in the cell: one line, nothing judged
        mab.pooled_models(tmp_path, "mtd-rd", "train", 6, ["mse", "q"], {"q": ["q0", "q2"]})


def test_a_pooled_column_is_judged_on_the_mean_of_its_runs(tmp_path, monkeypatch):
    """``--every --pool p=b+c``: p's value is the mean of b's and c's, its rows keep each run's value, and its
    interval comes from rounds that redraw the runs (so it differs from judging either run alone)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import json

    import map_aware_bootstrap as mab

    seen = _fake_cell(monkeypatch, mab)
    common = ["--work", "w", "--setup", "s", "--bits", "8", "--sources", "train", "--every", "--rounds", "60",
              "--bins", "128", "--cache", str(tmp_path / "cache")]
    mab.main([*common, "--columns", "a,p", "--pool", "p=b+c", "--out", str(tmp_path / "pool")])
    mab.main([*common, "--columns", "a,b,c", "--out", str(tmp_path / "each")])
    assert seen[0] == ["m0", "m1", "m2"]  # each file run once
    pooled = json.loads((tmp_path / "pool.json").read_text())
    each = json.loads((tmp_path / "each.json").read_text())["cells"][0]["verdicts"]
    assert pooled["meta"]["pools"] == {"p": ["b", "c"]}
    for v in (v for v in pooled["cells"][0]["verdicts"] if v["anchor"] == "p"):
        runs = [next(x["anchor_value"] for x in each if (x["anchor"], x["metric"]) == (r, v["metric"]))
                for r in ("b", "c")]
        assert v["anchor_runs"] == pytest.approx(runs) and v["anchor_value"] == pytest.approx(np.mean(runs))
        lo, hi = v["ci95"]
        assert v["verdict"] == ("below" if lo > 0 else "above" if hi < 0 else "tie")
    md = (tmp_path / "pool.md").read_text()
    assert "Pooled column p: the mean of the runs b, c" in md and "(runs " in md
    assert len(list((tmp_path / "cache").glob("*pool=p=b+c*"))) == 1  # cached apart from the unpooled columns


def test_against_judges_each_column_against_the_best_of_those_columns_only(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import json

    import map_aware_bootstrap as mab

    for bad in (["--against", "a,b"], ["--every", "--columns", "a,b", "--against", "a"],
                ["--every", "--columns", "a,b", "--against", "a,z"]):
        with pytest.raises(SystemExit, match="--against takes two or more of the judged columns"):
            mab.main(["--work", "w", "--setup", "s", *bad, "--out", "o"])
    _fake_cell(monkeypatch, mab)
    mab.main(["--work", "w", "--setup", "s", "--bits", "8", "--sources", "train", "--every", "--columns", "a,b,c",
              "--against", "a,b", "--rounds", "60", "--bins", "128", "--cache", str(tmp_path / "cache"),
              "--out", str(tmp_path / "out")])
    verdicts = json.loads((tmp_path / "out.json").read_text())["cells"][0]["verdicts"]
    assert {v["best"] for v in verdicts if v["anchor"] == "c"} <= {"a", "b"}  # c judged against a and b only
    assert {v["best"] for v in verdicts if v["anchor"] == "a"} == {"b"}  # never against itself or c
    assert {v["best"] for v in verdicts if v["anchor"] == "b"} == {"a"}
    assert "Best = the other calibrator (of a, b;" in (tmp_path / "out.md").read_text()
