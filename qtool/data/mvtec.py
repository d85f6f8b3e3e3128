"""Reader for the MVTec AD folder layout, with a seeded hold-out of training normals.

``<root>/<category>/train/good/*``, ``<root>/<category>/test/<defect>/*`` and
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (``test/good`` has no masks).
"""

from __future__ import annotations

import logging
from pathlib import Path

from qtool.data.listing import list_images
from qtool.data.samples import Sample, Splits, fraction_count, seeded_pick
from qtool.errors import DataError
from qtool.recipe import DataConfig

logger = logging.getLogger(__name__)

GOOD = "good"


def mvtec_categories(root: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``root``.

    Raises:
        DataError: if ``root`` is missing or has no sub-folder.
    """
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    cats = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cats:
        raise DataError(f"dataset root {root} has no category folders")
    return cats


def _mask_for(cat_dir: Path, defect: str, image: Path) -> Path:
    gt = cat_dir / "ground_truth" / defect
    expected = gt / f"{image.stem}_mask.png"
    if expected.is_file():
        return expected
    plain = gt / f"{image.stem}.png"  # some MVTec-style exports drop the _mask suffix
    if plain.is_file():
        return plain
    raise DataError(f"defect image {image} has no mask; expected {expected}")


def read_mvtec_category(
    root: Path, category: str, holdout_fraction: float, split_seed: int
) -> Splits:
    """Read one category of an MVTec AD layout.

    A fraction ``holdout_fraction`` of ``train/good`` (chosen by a permutation seeded with
    ``split_seed`` over the sorted file names) becomes ``holdout``; at least one image stays in train.

    Raises:
        DataError: missing category folder, not an MVTec layout, empty ``train/good``, a defect
            image without its mask, or an unsupported file.
    """
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise DataError(f"category folder {cat_dir} does not exist")
    for sub in ("train/good", "test"):
        if not (cat_dir / sub).is_dir():
            raise DataError(f"{cat_dir} is not an MVTec AD layout: missing folder {sub}/")
    train_good = list_images(cat_dir / "train" / GOOD)
    if not train_good:
        raise DataError(f"no training images in {cat_dir / 'train' / GOOD}")

    n_hold = fraction_count(len(train_good), holdout_fraction, keep=1)
    held = seeded_pick([p.name for p in train_good], n_hold, split_seed, key=category)
    splits = Splits(root=root)
    for p in train_good:
        s = Sample(path=p, category=category, label=0, defect=GOOD, mask=None)
        (splits.holdout if p.name in held else splits.train).append(s)

    test_dirs = sorted(
        (d for d in (cat_dir / "test").iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    for d in test_dirs:
        for p in list_images(d):
            if d.name == GOOD:
                splits.test.append(Sample(path=p, category=category, label=0, defect=GOOD, mask=None))
            else:
                mask = _mask_for(cat_dir, d.name, p)
                splits.test.append(Sample(path=p, category=category, label=1, defect=d.name, mask=mask))
    return splits


def read_mvtec(cfg: DataConfig) -> Splits:
    """Read the categories ``cfg.categories`` (None: every sub-folder) of the layout at ``cfg.root``.

    ``cfg.test_fraction`` is not used: MVTec AD has its own test folders.

    Raises:
        DataError: see :func:`read_mvtec_category`; also a missing root.
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    categories = cfg.categories if cfg.categories is not None else mvtec_categories(root)
    if not categories:
        raise DataError(f"no categories selected for {root}")
    out = Splits(root=root)
    for cat in categories:
        part = read_mvtec_category(root, cat, cfg.holdout_fraction, cfg.split_seed)
        out.train += part.train
        out.holdout += part.holdout
        out.test += part.test
        logger.info(
            "mvtec %s: %d train, %d holdout, %d test", cat, len(part.train), len(part.holdout), len(part.test)
        )
    return out
