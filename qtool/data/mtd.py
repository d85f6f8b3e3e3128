"""Reader for the Magnetic Tile Defect (MTD) layout, with a seeded split stratified by acquisition group.

``MT_Free/Imgs/*.jpg`` are normals; ``MT_<Defect>/Imgs/*.jpg`` are defects with the mask
``<stem>.png`` beside each image. One category, ``"mtd"``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

from qtool.data.listing import list_images
from qtool.data.samples import Sample, Splits, fraction_count, seeded_pick
from qtool.errors import DataError
from qtool.recipe import DataConfig

logger = logging.getLogger(__name__)

CATEGORY = "mtd"
FREE = "MT_Free"
MASK_EXT = ".png"
_GROUP = re.compile(r"^(exp\d+)_", re.IGNORECASE)


def acquisition_group(name: str) -> str:
    """The acquisition group of an MTD file name (``exp3_num_123.jpg`` -> ``exp3``; else ``other``)."""
    m = _GROUP.match(name)
    return m.group(1).lower() if m else "other"


def _images_and_masks(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """Images (non-PNG) in an MTD ``Imgs`` folder, and the PNG masks beside them by stem."""
    files = list_images(folder)
    masks = {p.stem: p for p in files if p.suffix.lower() == MASK_EXT}
    images = [p for p in files if p.suffix.lower() != MASK_EXT]
    orphans = set(masks) - {p.stem for p in images}
    if orphans:
        logger.warning("%d mask(s) without an image in %s, e.g. %s", len(orphans), folder, min(orphans))
    return images, masks


def _imgs_dir(root: Path, folder: str) -> Path:
    d = root / folder / "Imgs"
    if not d.is_dir():
        raise DataError(f"{root} is not an MTD layout: missing folder {folder}/Imgs/")
    return d


def split_free(
    names: list[str], test_fraction: float, holdout_fraction: float, seed: int
) -> tuple[set[str], set[str], set[str]]:
    """Split defect-free file names into (train, holdout, test), stratified by acquisition group.

    Per group: ``test_fraction`` of the names go to test, then ``holdout_fraction`` of the rest to
    holdout, the remainder to train; each chosen by a permutation seeded with ``seed`` and the
    group over sorted names. A group of two or more names keeps at least one in train and one in
    test; a group of one name goes to train.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        groups[acquisition_group(n)].append(n)
    train: set[str] = set()
    holdout: set[str] = set()
    test: set[str] = set()
    for g, members in sorted(groups.items()):
        n = len(members)
        n_test = fraction_count(n, test_fraction, keep=1)
        if n >= 2:
            n_test = max(n_test, 1)
        g_test = seeded_pick(members, n_test, seed, key=f"{g}/test")
        rest = [m for m in members if m not in g_test]
        n_hold = fraction_count(len(rest), holdout_fraction, keep=1)
        g_hold = seeded_pick(rest, n_hold, seed, key=f"{g}/holdout")
        test |= g_test
        holdout |= g_hold
        train |= set(rest) - g_hold
    return train, holdout, test


def read_mtd(cfg: DataConfig) -> Splits:
    """Read the MTD layout at ``cfg.root`` into splits of the single category ``"mtd"``.

    Defect-free images are split by :func:`split_free` with ``cfg.test_fraction``,
    ``cfg.holdout_fraction`` and ``cfg.split_seed``; every defect image goes to test.

    Raises:
        DataError: missing root or ``MT_Free/Imgs``, a category other than ``"mtd"`` asked for,
            no defect folder, or a defect image without its mask.
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    if cfg.categories is not None and list(cfg.categories) != [CATEGORY]:
        raise DataError(f"MTD has one category {CATEGORY!r}; got categories {cfg.categories}")
    free_images, _ = _images_and_masks(_imgs_dir(root, FREE))
    if not free_images:
        raise DataError(f"no defect-free images in {root / FREE / 'Imgs'}")
    defect_dirs = sorted(
        d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("MT_") and d.name != FREE
    )
    if not defect_dirs:
        raise DataError(f"{root} is not an MTD layout: no MT_<Defect> folders beside {FREE}")

    train, holdout, _test = split_free(
        [p.name for p in free_images], cfg.test_fraction, cfg.holdout_fraction, cfg.split_seed
    )
    splits = Splits(root=root)
    for p in free_images:
        s = Sample(path=p, category=CATEGORY, label=0, defect="good", mask=None)
        part = splits.train if p.name in train else splits.holdout if p.name in holdout else splits.test
        part.append(s)
    for folder in defect_dirs:
        defect = folder[len("MT_"):].lower()
        images, masks = _images_and_masks(_imgs_dir(root, folder))
        for p in images:
            if p.stem not in masks:
                raise DataError(f"defect image {p} has no mask; expected {p.with_suffix(MASK_EXT)}")
            splits.test.append(Sample(path=p, category=CATEGORY, label=1, defect=defect, mask=masks[p.stem]))
    logger.info(
        "mtd: %d train, %d holdout, %d test (%d defective)",
        len(splits.train), len(splits.holdout), len(splits.test), sum(s.label for s in splits.test),
    )
    return splits
