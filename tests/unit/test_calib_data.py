"""The normal pool that calibration, the search set and the check set draw from: representative, fixed order."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtool.calib_data import SOURCES, normal_pool, spread_order
from qtool.data import Sample, Splits
from qtool.errors import CalibrationError
from qtool.recipe import CalibDataConfig


def _normals(category: str, part: str, names: list[str]) -> list[Sample]:
    return [Sample(Path(f"/data/{category}/{part}/{n}.png"), category, 0, "good") for n in names]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 13, 100])
def test_spread_order_is_a_permutation_whose_prefixes_leave_no_wide_gap(n):
    order = spread_order(n)
    assert sorted(order) == list(range(n))
    for k in range(1, n + 1):  # the first k picks, with the range's ends: no gap wider than about two bins of n / k
        marks = [0, *sorted(order[:k]), n]
        assert max(b - a for a, b in zip(marks, marks[1:])) <= 2 * n / k + 1, (k, order[:k])


def test_pool_takes_turns_over_categories_held_out_first_and_spread_over_names():
    # category "a" has plenty held out; "b" has 2 held out and 5 training normals; "c" only training normals
    a = _normals("a", "holdout", [f"exp{g}_{i}" for g in range(4) for i in range(5)])  # 20 names, 4 groups
    b_hold, b_train = _normals("b", "holdout", ["h0", "h1"]), _normals("b", "train", [f"t{i}" for i in range(5)])
    c_train = _normals("c", "train", [f"t{i}" for i in range(3)])
    test = [Sample(Path("/data/a/test/x.png"), "a", 1, "crack", Path("/data/a/mask/x.png"))]
    splits = Splits(train=[*b_train, *c_train], holdout=[*a, *b_hold], test=test)
    pool = normal_pool(splits, 12)
    assert [s.category for s in pool] == ["a", "b", "c"] * 3 + ["a", "b", "a"]
    b = [s for s in pool if s.category == "b"]
    assert b[:2] == sorted(b_hold, key=lambda s: str(s.path)) and set(b[2:]) <= set(b_train)
    picked_a = [s.path.stem for s in pool if s.category == "a"]
    assert {name.split("_")[0] for name in picked_a[:4]} == {"exp0", "exp1", "exp2", "exp3"}  # every group
    assert not set(pool) & set(test)
    assert normal_pool(splits, 30)[:12] == pool  # a longer pool extends a shorter one (search set, then check set)
    assert len(normal_pool(splits, 1000)) == len(a) + len(b_hold) + len(b_train) + len(c_train)


def test_pool_is_the_same_whatever_the_order_of_files_in_a_split():
    a = _normals("a", "holdout", [f"n{i}" for i in range(9)])
    first = normal_pool(Splits(holdout=a), 5)
    assert normal_pool(Splits(holdout=a[::-1]), 5) == first


def test_empty_pool_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="no held-out or training normals"):
        normal_pool(Splits(test=[Sample(Path("/t.png"), "a", 1, "x", Path("/m.png"))]), 4)


def test_the_test_source_takes_turns_over_the_categories_too():
    test = [Sample(Path(f"/data/{c}/test/{d}/{i}.png"), c, int(d != "good"), d, None if d == "good" else Path("/m.png"))
            for c in ("a", "b") for d in ("crack", "good") for i in range(6)]
    cfg = CalibDataConfig(source="test", num_samples=4, allow_anomalies=True)
    files = SOURCES.get("test")(Splits(test=test), None, cfg).description["files"]
    assert [f.split("/")[2] for f in files] == ["a", "b", "a", "b"]  # was the first 4: all of category a's cracks
    assert {f.split("/")[4] for f in files} == {"crack", "good"}
