"""ImageTransform: channels, normalisation, image/mask alignment per resize mode, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qtool.data import ImageTransform, Sample
from qtool.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from qtool.errors import DataError
from qtool.recipe import DataConfig


def _tf(size: int = 32, **kw) -> ImageTransform:
    return ImageTransform(DataConfig(image_size=size, **kw))


def _save(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _unnormalise(x: np.ndarray) -> np.ndarray:
    return x * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (10, 1))  # 25 wide, 10 high
    x = _tf(32).image(_save(gray, tmp_path / "g.png"))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    raw = _unnormalise(x)
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
    np.testing.assert_allclose(raw[0], raw[2], atol=1e-5)
    assert raw[0, :, -1].mean() > raw[0, :, 0].mean() + 0.5  # the gradient survives


def test_normalisations(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[..., 2] = 51
    x = _tf().image(_save(rgb, tmp_path / "c.png"))
    expected = (np.array([1.0, 0.0, 0.2]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:, 3, 3], expected, atol=1e-5)
    noisy = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    y = _tf(normalize="per-image").image(_save(noisy, tmp_path / "n.png"))
    assert abs(float(y.mean())) < 1e-4 and abs(float(y.std()) - 1.0) < 1e-3
    sixteen = np.full((8, 8), 65535, np.uint16)
    z = _tf().image(_save(sixteen, tmp_path / "w16.png"))
    np.testing.assert_allclose(_unnormalise(z), 1.0, atol=1e-5)


# 96x72 image, a white 16x16 square centred at (x=64, y=32); S = 48. Expected centre per mode:
# stretch scales x by 1/2, y by 2/3; pad scales by 1/2 (to 48x36) and pads 6 rows on top;
# crop scales by 2/3 (to 64x48) and crops 8 columns on the left.
@pytest.mark.parametrize(
    "mode, centre", [("stretch", (32.0, 21.33)), ("pad", (32.0, 22.0)), ("crop", (34.67, 21.33))]
)
def test_image_and_mask_stay_aligned(tmp_path: Path, mode: str, centre: tuple[float, float]) -> None:
    img = np.zeros((72, 96), np.uint8)
    img[24:40, 56:72] = 255
    path = _save(np.stack([img] * 3, -1), tmp_path / "sq.png")
    mask = _save(img, tmp_path / "sq_mask.png")
    tf = _tf(48, resize=mode)
    x = tf.image(path)
    m = tf.mask(Sample(path=path, category="c", label=1, defect="d", mask=mask))
    assert x.shape == (3, 48, 48) and m.shape == (48, 48)
    assert set(np.unique(m)) == {0.0, 1.0}
    bright = _unnormalise(x)[0] > 0.5
    iou = (bright & (m > 0)).sum() / (bright | (m > 0)).sum()
    assert iou >= 0.8, f"{mode}: image and mask disagree (IoU {iou:.2f})"
    ys, xs = np.nonzero(m)
    # pixel (i, j) covers [i, i+1): its centre is i + 0.5
    assert abs(xs.mean() + 0.5 - centre[0]) <= 1.0 and abs(ys.mean() + 0.5 - centre[1]) <= 1.0


def test_mask_threshold_and_none(tmp_path: Path) -> None:
    img = _save(np.zeros((8, 8, 3), np.uint8), tmp_path / "i.png")
    soft = np.full((8, 8), 100, np.uint8)
    soft[:, 4:] = 200
    mask = _save(soft, tmp_path / "m.png")
    m = _tf().mask(Sample(path=img, category="c", label=1, defect="d", mask=mask))
    assert m[:, :16].max() == 0.0 and m[:, 16:].min() == 1.0  # 8 -> 32 px, nearest
    z = _tf().mask(Sample(path=img, category="c", label=0, defect="good", mask=None))
    assert z.shape == (32, 32) and not z.any()


def test_missized_mask_names_both_files(tmp_path: Path) -> None:
    img = _save(np.zeros((16, 16, 3), np.uint8), tmp_path / "img.png")
    mask = _save(np.zeros((8, 8), np.uint8), tmp_path / "small_mask.png")
    with pytest.raises(DataError, match=r"small_mask.png is 8x8 but its image .*img.png is 16x16"):
        _tf().mask(Sample(path=img, category="c", label=1, defect="d", mask=mask))


def test_missing_mask_file(tmp_path: Path) -> None:
    img = _save(np.zeros((16, 16, 3), np.uint8), tmp_path / "img.png")
    with pytest.raises(DataError, match=r"gone_mask.png does not exist"):
        _tf().mask(Sample(path=img, category="c", label=1, defect="d", mask=tmp_path / "gone_mask.png"))


def test_corrupt_and_missing_images_name_the_file(tmp_path: Path) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot decode image .*cut.jpg"):
        _tf().image(tmp_path / "cut.jpg")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk.png"):
        _tf().image(tmp_path / "junk.png")
    with pytest.raises(DataError, match=r"absent.png does not exist"):
        _tf().image(tmp_path / "absent.png")
