"""Synthetic anomalies from normal images: seeded, masked exactly, within the pool's values, and fed only
from the normal calibration pool (every opened file is tracked)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.opened_files import opened_images
from helpers.outlier_model import smooth_normals

from qtool.calib_data import normal_pool
from qtool.data import ImageTransform, generate_synthetic, load_splits
from qtool.data.synth_anomalies import ANOMALY_KINDS, synthesize
from qtool.errors import DataError, RegistryError
from qtool.recipe import DataConfig, SearchConfig, SynthConfig
from qtool.search import build_search_set


def test_anomalies_change_only_their_masked_pixels_and_are_seeded():
    normals = smooth_normals(6, seed=1)
    kinds = ANOMALY_KINDS.names()
    a = synthesize(normals, kinds, seed=4)
    b = synthesize(normals, kinds, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert [r["kind"] for r in a.records] == [kinds[i % len(kinds)] for i in range(6)]
    for i, (img, mask) in enumerate(zip(a.images, a.masks, strict=True)):
        outside = np.broadcast_to(mask[None] == 0, img.shape)
        np.testing.assert_array_equal(img[outside], normals[i][outside])
        assert set(np.unique(mask)) == {0.0, 1.0} and a.records[i]["defect_pixels"] == int(mask.sum())
        changed = np.any(img != normals[i], axis=0)
        assert changed.sum() >= 0.5 * mask.sum(), f"image {i} ({a.records[i]['kind']}) barely changed"
    c = synthesize(normals, kinds, seed=5)
    assert not np.array_equal(a.masks, c.masks)
    # the defect geometry of image i does not depend on how many images come after it
    np.testing.assert_array_equal(synthesize(normals[:4], kinds, seed=4).masks, a.masks[:4])


def test_every_kind_stays_within_the_pool_values():
    normals = smooth_normals(4, seed=2)
    lo, hi = normals.min(axis=(0, 2, 3)), normals.max(axis=(0, 2, 3))
    for kind in ANOMALY_KINDS.names():
        out = synthesize(normals, [kind], seed=0).images
        assert np.all(out.min(axis=(0, 2, 3)) >= lo - 1e-6) and np.all(out.max(axis=(0, 2, 3)) <= hi + 1e-6), kind


def test_mtd_like_kinds_keep_the_texture_and_are_low_contrast():
    normals = smooth_normals(6, seed=5)
    std = normals.std(axis=(0, 2, 3))
    lo, hi = normals.min(axis=(0, 2, 3)), normals.max(axis=(0, 2, 3))
    for kind, (least, most) in {"stain": (0.5, 1.2), "crack": (1.0, 2.5)}.items():
        out = synthesize(normals, [kind], seed=1)
        for i, (img, mask) in enumerate(zip(out.images, out.masks, strict=True)):
            inside = mask > 0
            for c in range(3):
                delta = img[c][inside] - normals[i][c][inside]
                unclipped = (img[c][inside] > lo[c] + 1e-6) & (img[c][inside] < hi[c] - 1e-6)
                assert unclipped.any(), (kind, i)
                shift = delta[unclipped] / std[c]  # the same offset everywhere: the texture is kept
                np.testing.assert_allclose(shift, shift[0], atol=1e-4)
                assert least - 1e-4 <= abs(shift[0]) <= most + 1e-4, (kind, i, shift[0])
    holes = synthesize(normals, ["hole"], seed=1)
    for i, (img, mask) in enumerate(zip(holes.images, holes.masks, strict=True)):
        assert 1 <= mask.sum() <= 0.05 * mask.size and np.all(img[:, mask > 0] <= normals[i][:, mask > 0] + 1e-6)


def test_pasted_patch_comes_from_another_pool_image():
    normals = smooth_normals(3, seed=3)
    out = synthesize(normals, ["patch"], seed=0)
    for i, r in enumerate(out.records):
        assert r["donor"] != i
        top, left, h, w = r["box"]
        patch = out.images[i][:, top : top + h, left : left + w]
        donor = normals[r["donor"]]
        turned = np.rot90(patch, -r["quarter_turns"], axes=(1, 2))
        hh, ww = turned.shape[1:]
        windows = np.lib.stride_tricks.sliding_window_view(donor, (3, hh, ww))[0]
        assert np.any(np.all(windows == turned, axis=(-3, -2, -1))), f"patch {i} not found in its donor"


def test_bad_inputs_are_named():
    with pytest.raises(RegistryError, match="unknown synthetic anomaly kind 'dent'.*noise, patch, scratch"):
        synthesize(smooth_normals(2), ["dent"])
    with pytest.raises(DataError, match=r"shape \(3, 8, 8\)"):
        synthesize(np.zeros((3, 8, 8), np.float32))


def test_search_set_never_reads_a_test_split_file(tmp_path):
    root = generate_synthetic(tmp_path / "data", SynthConfig(categories=["grid"], n_train=6, n_test_good=3,
                                                             n_test_defect=3, size=32))
    cfg = DataConfig(format="mvtec", root=str(root), image_size=32, holdout_fraction=0.34)
    splits = load_splits(cfg)
    with opened_images() as opened:
        search = build_search_set(splits, ImageTransform(cfg), SearchConfig(normals=100, kinds=["patch", "scratch"]))
    test_files = {str(s.path) for s in splits.test} | {str(s.mask) for s in splits.test if s.mask}
    pool = [str(s.path) for s in normal_pool(splits, 100)]
    assert sorted(pool) == sorted(str(s.path) for s in [*splits.holdout, *splits.train])
    assert opened and set(opened) == set(pool), "the search set reads the whole normal pool and nothing else"
    assert not test_files & set(opened)
    assert search.description["files"] == pool and search.description["normals"] == len(pool)
    assert [r["base"] for r in search.description["anomaly_records"]] == pool
    assert list(search.labels) == [0] * len(pool) + [1] * len(pool)
