"""Record every image file PIL opens inside a block (to prove which files a stage read)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from PIL import Image


@contextmanager
def opened_images() -> Iterator[list[str]]:
    """Yield a list that fills with the path of every ``PIL.Image.open`` call made in the block."""
    opened: list[str] = []
    real_open = Image.open

    def tracking_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(Image, "open", tracking_open)
    try:
        yield opened
    finally:
        patch.undo()
