"""``qtool bench`` as a library call: run a backend over batch sizes and write the results atomically."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qtool import __version__
from qtool.artifacts import write_json
from qtool.backends import get_backend
from qtool.backends.base import RESULT_SCHEMA, BenchOptions, BenchResult

log = logging.getLogger(__name__)


def results_document(results: list[BenchResult], command: list[str] | None = None) -> dict[str, Any]:
    """The JSON document of a bench run: schema tag, qtool version, command line, results."""
    return {"schema": RESULT_SCHEMA, "qtool": __version__, "command": command if command is not None else sys.argv,
            "results": [r.to_dict() for r in results]}


def run_bench(device: str, model: Path, batches: Sequence[int | None] = (None,), options: BenchOptions | None = None,
              out: Path | None = None) -> list[BenchResult]:
    """Measure ``model`` on backend ``device`` at each batch; write ``out`` (JSON) only if every run succeeded.

    Returns:
        One :class:`BenchResult` per batch.
    Raises:
        RegistryError: unknown device. BackendError, GraphError: one-line failures; ``out`` is then untouched.
    """
    backend = get_backend(device, options or BenchOptions())
    results = backend.run(Path(model), list(batches) or [None])
    if out is not None:
        write_json(Path(out), results_document(results))
        log.info("wrote %s", out)
    return results
