"""The MTD reader: the real dataset in ../shared/data/mtd (listing only) and a tiny fake layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from qtool.data import read_mtd, split_free
from qtool.data.mtd import acquisition_group
from qtool.errors import DataError
from qtool.recipe import DataConfig

MTD = Path(__file__).resolve().parents[3] / "shared" / "data" / "mtd"  # <project>/../shared/data/mtd


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="mtd", root=str(root), **kw)


@pytest.mark.skipif(not (MTD / "MT_Free" / "Imgs").is_dir(), reason="MTD dataset not available")
def test_real_mtd_split_counts_disjoint_stratified_deterministic() -> None:
    s = read_mtd(_cfg(MTD, test_fraction=0.2, holdout_fraction=0.1, split_seed=0))
    free = s.train + s.holdout + [x for x in s.test if x.label == 0]
    defects = [x for x in s.test if x.label == 1]
    assert len(free) == 952 and len(defects) == 392
    assert Counter(x.defect for x in defects) == {
        "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103
    }
    assert all(x.mask is not None and x.mask.name == x.path.stem + ".png" for x in defects)
    assert s.categories() == ["mtd"]
    s.check()  # disjoint, non-empty
    n_test_free = len(free) - len(s.train) - len(s.holdout)
    assert abs(n_test_free - 0.2 * 952) <= 7  # per-group rounding
    assert abs(len(s.holdout) - 0.1 * (952 - n_test_free)) <= 7

    groups = Counter(acquisition_group(x.path.name) for x in free)
    train_groups = Counter(acquisition_group(x.path.name) for x in s.train)
    test_groups = Counter(acquisition_group(x.path.name) for x in s.test if x.label == 0)
    for g, n in groups.items():
        assert train_groups[g] >= 1
        if n >= 2:  # exp0 has a single image: it stays in train
            assert test_groups[g] >= 1
            assert abs(test_groups[g] / n - 0.2) < 0.02

    again = read_mtd(_cfg(MTD, test_fraction=0.2, holdout_fraction=0.1, split_seed=0))
    assert again.to_json() == s.to_json()
    other = read_mtd(_cfg(MTD, test_fraction=0.2, holdout_fraction=0.1, split_seed=1))
    assert {x.path for x in other.train} != {x.path for x in s.train}


def test_split_free_is_order_independent_and_keeps_groups() -> None:
    names = [f"exp{g}_num_{i}.jpg" for g in range(3) for i in range(10)] + ["exp9_num_1.jpg", "odd.jpg"]
    a = split_free(names, 0.3, 0.25, seed=5)
    b = split_free(list(reversed(names)), 0.3, 0.25, seed=5)
    assert a == b
    train, holdout, test = a
    assert not (train & holdout or train & test or holdout & test)
    assert train | holdout | test == set(names)
    for g in ("exp0", "exp1", "exp2"):
        assert sum(acquisition_group(n) == g for n in test) == 3
        assert sum(acquisition_group(n) == g for n in holdout) == 2  # 25 % of the 7 left
    assert {"exp9_num_1.jpg", "odd.jpg"} <= train


def _fake_mtd(root: Path) -> Path:
    for folder, n in (("MT_Free", 4), ("MT_Crack", 2)):
        d = root / folder / "Imgs"
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("L", (12, 8), 100).save(d / f"exp1_num_{i}.jpg")
            Image.new("L", (12, 8), 0).save(d / f"exp1_num_{i}.png")
    return root


def test_fake_mtd_layout_and_errors(tmp_path: Path) -> None:
    root = _fake_mtd(tmp_path / "mtd")
    s = read_mtd(_cfg(root, test_fraction=0.25, holdout_fraction=0.0))
    assert (len(s.train), len(s.holdout), len(s.test)) == (3, 0, 3)
    assert {x.defect for x in s.test} == {"good", "crack"}
    with pytest.raises(DataError, match="one category 'mtd'"):
        read_mtd(_cfg(root, categories=["tiles"]))
    (root / "MT_Crack" / "Imgs" / "exp1_num_1.png").unlink()
    with pytest.raises(DataError, match=r"MT_Crack/Imgs/exp1_num_1.jpg has no mask"):
        read_mtd(_cfg(root))
    with pytest.raises(DataError, match=r"MT_Free/Imgs"):
        read_mtd(_cfg(tmp_path))
    with pytest.raises(DataError, match="nowhere"):
        read_mtd(_cfg(tmp_path / "nowhere"))
