"""The sweep report: assembled from cell results, written as ``report.json``, ``report.md`` and ``report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.report.assemble import assemble_report, pareto_front
from qtool.report.schema import REPORT_SCHEMA, SweepReport, json_schema, validate_report

__all__ = ["REPORT_SCHEMA", "SweepReport", "assemble_report", "json_schema", "pareto_front", "validate_report",
           "write_report"]


def write_report(out_dir: Path, report: dict[str, Any], figures: list[Any], recipe: Any) -> dict[str, Path]:
    """Write the report files (each atomically) into ``out_dir``; return their paths.

    ``report.json`` (validated), ``report.md`` (figures in ``figures/``), the self-contained
    ``report.html``, the resolved ``recipe.yaml`` and ``manifest.json``.
    """
    from qtool.artifacts import atomic_path, atomic_write_text, write_manifest
    from qtool.recipe import dump_recipe
    from qtool.report.html import render_html
    from qtool.report.json import write_report_json
    from qtool.report.markdown import render_markdown

    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    names = {f"{fig.name}.png" for fig in figures if fig.png}
    for old in (out_dir / "figures").glob("*.png"):
        if old.name not in names:  # left by an earlier run of a larger grid into the same folder
            old.unlink()
    for fig in figures:
        if fig.png:
            with atomic_path(out_dir / "figures" / f"{fig.name}.png") as tmp:
                tmp.write_bytes(fig.png)
    doc = write_report_json(out_dir / "report.json", report)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    atomic_write_text(paths["md"], render_markdown(doc, figures))
    atomic_write_text(paths["html"], render_html(doc, figures))
    dump_recipe(recipe, out_dir / "recipe.yaml")
    write_manifest(out_dir, {}, {"command": "sweep"})
    return paths
