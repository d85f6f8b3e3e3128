"""Shared pytest setup. Its presence puts ``tests/`` on sys.path (pytest's prepend import mode, no
``__init__.py``), so test modules import the tiny-model helpers as ``helpers.*``."""
