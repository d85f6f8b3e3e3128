"""Error types of qtool: one line for users; the CLI maps them to exit codes."""

from __future__ import annotations


class QtoolError(Exception):
    """Base of every error a user can cause; its message is one line naming the bad value."""

    exit_code = 2


class RecipeError(QtoolError):
    """A recipe or an override is malformed: unknown key, wrong type, bad value."""


class DataError(QtoolError):
    """A dataset is unreadable: wrong layout, corrupt image, missing or mis-sized mask, empty split."""


class ModelError(QtoolError):
    """A model or checkpoint cannot be built or loaded: missing weights, config mismatch, bad file."""


class GraphError(QtoolError):
    """An ONNX graph cannot be read, prepared, quantized or linted."""


class CalibrationError(QtoolError):
    """Calibration failed: empty set, NaN/Inf activations, refused data source."""


class BackendError(QtoolError):
    """A backend cannot run: missing runtime, unreachable host, failed engine build."""


class RegistryError(QtoolError):
    """An unknown name was asked of a registry; the message lists the available names."""
