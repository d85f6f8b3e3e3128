"""Shared pytest setup. Its presence puts ``tests/`` on sys.path (pytest's prepend import mode, no
``__init__.py``), so test modules import the tiny-model helpers as ``helpers.*``."""

import pytest


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test (the suite's timings and ORT sessions share two cores), restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
