"""Samples, splits, the MVTec AD reader, the DATASETS registry and batch iteration."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qtool.data import (
    DATASETS,
    ImageTransform,
    Sample,
    SampleDataset,
    Splits,
    iter_batches,
    load_splits,
    read_mvtec,
)
from qtool.errors import DataError, RegistryError
from qtool.recipe import DataConfig, SynthConfig


def _png(path: Path, size: tuple[int, int] = (16, 16), value: int = 128, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


def make_mvtec(
    root: Path, category: str = "widget", n_train: int = 10, order: list[int] | None = None
) -> Path:
    """A tiny MVTec AD layout: n_train normals, 2 good + 2 scratch + 1 hole test images."""
    cat = root / category
    for i in order if order is not None else range(n_train):
        _png(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png")
        _png(cat / "test" / "scratch" / f"{i:03d}.png")
        _png(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mode="L", value=255)
    _png(cat / "test" / "hole" / "000.jpg")
    _png(cat / "ground_truth" / "hole" / "000_mask.png", mode="L", value=255)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="mvtec", root=str(root), image_size=32, **kw)


def _names(samples: list[Sample]) -> list[str]:
    return [s.path.name for s in samples]


def test_mvtec_reader_reads_labels_defects_and_masks(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "b")
    make_mvtec(tmp_path, "a")
    (tmp_path / "a" / "train" / "good" / "notes.txt").write_text("x")
    (tmp_path / "a" / "train" / "good" / ".DS_Store").write_text("x")
    s = read_mvtec(_cfg(tmp_path, holdout_fraction=0.2))
    assert s.categories() == ["a", "b"]
    a = s.filter("a")
    assert (len(a.train), len(a.holdout)) == (8, 2)
    assert {x.defect for x in a.test} == {"good", "scratch", "hole"}
    for x in a.test:
        assert x.label == (x.defect != "good")
        if x.label:
            assert x.mask == tmp_path / "a" / "ground_truth" / x.defect / f"{x.path.stem}_mask.png"
        else:
            assert x.mask is None
    assert all(x.label == 0 and x.mask is None for x in a.train + a.holdout)
    only_b = read_mvtec(_cfg(tmp_path, categories=["b"]))
    assert only_b.categories() == ["b"]


def test_holdout_is_deterministic_disjoint_and_order_independent(tmp_path: Path) -> None:
    order = list(range(20))
    random.Random(1).shuffle(order)
    make_mvtec(tmp_path / "r1", n_train=20)
    make_mvtec(tmp_path / "r2", order=order)
    s1 = read_mvtec(_cfg(tmp_path / "r1", holdout_fraction=0.25, split_seed=3))
    s1b = read_mvtec(_cfg(tmp_path / "r1", holdout_fraction=0.25, split_seed=3))
    s2 = read_mvtec(_cfg(tmp_path / "r2", holdout_fraction=0.25, split_seed=3))
    assert len(s1.holdout) == 5 and len(s1.train) == 15
    assert _names(s1.holdout) == _names(s1b.holdout) == _names(s2.holdout)
    assert set(_names(s1.holdout)) != {f"{i:03d}.png" for i in range(5)}  # permuted, not the first names
    s1.check()
    paths = [x.path for x in s1.train + s1.holdout + s1.test]
    assert len(paths) == len(set(paths))
    other = read_mvtec(_cfg(tmp_path / "r1", holdout_fraction=0.25, split_seed=4))
    assert set(_names(other.holdout)) != set(_names(s1.holdout))
    none = read_mvtec(_cfg(tmp_path / "r1", holdout_fraction=0.0))
    assert none.holdout == [] and len(none.train) == 20


def test_splits_to_json_counts_filter_and_check(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    s = read_mvtec(_cfg(tmp_path, holdout_fraction=0.2))
    j = json.loads(json.dumps(s.to_json()))
    assert j["counts"] == {"train": 8, "holdout": 2, "test_normal": 2, "test_anomalous": 3}
    assert "widget/test/hole/000.jpg" in j["test"]
    assert all(n.startswith("widget/train/good/") for n in j["train"] + j["holdout"])
    with pytest.raises(DataError, match="nope.*available: widget"):
        s.filter("nope")
    s.test = [x for x in s.test if x.category != "widget"]
    with pytest.raises(DataError, match="no test images"):
        s.check()
    leaky = Splits(train=s.train, holdout=s.holdout + s.train[:1], test=s.holdout)
    with pytest.raises(DataError, match=s.train[0].path.name):
        leaky.check()


def test_mvtec_layout_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing_root"):
        read_mvtec(_cfg(tmp_path / "missing_root"))
    make_mvtec(tmp_path / "ok")
    with pytest.raises(DataError, match="ghost"):
        read_mvtec(_cfg(tmp_path / "ok", categories=["ghost"]))

    (tmp_path / "flat" / "cat").mkdir(parents=True)
    _png(tmp_path / "flat" / "cat" / "img.png")
    with pytest.raises(DataError, match=r"not an MVTec AD layout.*train/good"):
        read_mvtec(_cfg(tmp_path / "flat"))

    (tmp_path / "empty" / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no training images in .*empty/cat/train/good"):
        read_mvtec(_cfg(tmp_path / "empty"))

    make_mvtec(tmp_path / "nomask")
    (tmp_path / "nomask" / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"scratch/001.png has no mask.*001_mask.png"):
        read_mvtec(_cfg(tmp_path / "nomask"))

    make_mvtec(tmp_path / "gif")
    (tmp_path / "gif" / "widget" / "test" / "good" / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"unsupported file .*x.gif.*\.png"):
        read_mvtec(_cfg(tmp_path / "gif"))


def test_load_splits_dispatches_and_checks(tmp_path: Path) -> None:
    assert set(DATASETS.names()) >= {"mvtec", "mtd", "synth"}
    with pytest.raises(RegistryError, match="available: .*mvtec"):
        DATASETS.get("coco")
    make_mvtec(tmp_path / "m")
    assert len(load_splits(_cfg(tmp_path / "m")).test) == 5
    (tmp_path / "m" / "lonely" / "train" / "good").mkdir(parents=True)
    _png(tmp_path / "m" / "lonely" / "train" / "good" / "0.png")
    (tmp_path / "m" / "lonely" / "test").mkdir()
    with pytest.raises(DataError, match="'lonely'.*no test images"):
        load_splits(_cfg(tmp_path / "m"))
    synth = SynthConfig(categories=["grid"], n_train=3, n_test_good=1, n_test_defect=2, size=32)
    s = load_splits(DataConfig(format="synth", root=str(tmp_path / "s"), holdout_fraction=0.34, synth=synth))
    assert (len(s.train), len(s.holdout), len(s.test)) == (2, 1, 3)


def test_sample_dataset_and_iter_batches(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    cfg = _cfg(tmp_path)
    s = read_mvtec(cfg)
    tr = ImageTransform(cfg)
    ds = SampleDataset(s.test, tr)
    assert len(ds) == 5
    anomalous = next(i for i, x in enumerate(s.test) if x.label == 1)
    item = ds[anomalous]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert item["label"] == 1 and item["category"] == "widget" and float(item["mask"].min()) == 1.0
    done: list[int] = []
    batches = list(iter_batches(s.test, tr, 2, progress=done.append))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1] and done == [2, 2, 1]
    assert batches[0][0].dtype == np.float32 and batches[0][0].shape[1:] == (3, 32, 32)
    assert [x for _, chunk in batches for x in chunk] == s.test
    with pytest.raises(DataError, match="batch size"):
        next(iter_batches(s.test, tr, 0))
