"""Which files in a dataset folder are images: the accepted extensions and the ignored clutter.

Shared by the MVTec and MTD readers so both accept and reject the same files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qtool.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Image file extensions the readers accept (case-insensitive)."""

NON_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".csv", ".xml", ".db", ".ini", ".log", ".pdf",
     ".zip", ".tar", ".gz", ".npy", ".npz", ".py", ".html"}
)
"""Extensions that are clearly not images: such files (and hidden files) are skipped silently."""


def is_image_name(path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """True if ``path`` has one of ``extensions`` (case-insensitive)."""
    return path.suffix.lower() in extensions


def list_images(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Hidden files, sub-folders and files with a clearly non-image extension (``.txt``, ``.json`` ...)
    are skipped. Any other file is refused, so an unsupported image format is never dropped
    without a word.

    Args:
        folder: the folder to list.
        extensions: the accepted image extensions (lower case, with the dot).

    Returns:
        The image paths, sorted by file name.

    Raises:
        DataError: if ``folder`` is not a directory, or holds a file of an unsupported type.
    """
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    images: list[Path] = []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.name.startswith(".") or p.is_dir():
            continue
        suffix = p.suffix.lower()
        if suffix in extensions:
            images.append(p)
        elif suffix in NON_IMAGE_EXTENSIONS or p.name in ("Thumbs.db", "desktop.ini"):
            logger.debug("skipping non-image file %s", p)
        else:
            raise DataError(
                f"unsupported file {p}; accepted image extensions: {', '.join(extensions)}"
            )
    return images
