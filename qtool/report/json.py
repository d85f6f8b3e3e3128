"""``report.json``: the machine-readable sweep report, validated against ``qtool.sweep/1`` on write and read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtool.artifacts import write_json
from qtool.errors import DataError
from qtool.report.schema import validate_report


def write_report_json(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Validate ``report`` against the schema and write it atomically; return the validated document."""
    doc = validate_report(report)
    write_json(Path(path), doc)
    return doc


def read_report(path: Path) -> dict[str, Any]:
    """Read and validate a ``report.json``.

    Raises:
        DataError: unreadable file, or a document that does not follow the schema.
    """
    from pydantic import ValidationError

    try:
        doc = json.loads(Path(path).read_text())
        return validate_report(doc)
    except (OSError, ValueError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            raise DataError(f"{path}: not a qtool.sweep/1 report: {'.'.join(map(str, err['loc']))}: {err['msg']}") \
                from None
        raise DataError(f"cannot read sweep report {path}: {e}") from None
