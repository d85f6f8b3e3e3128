"""``report.md``: the sweep report's tables in Markdown, with the figures linked from ``figures/``."""

from __future__ import annotations

from typing import Any

from qtool.report.figures import Figure
from qtool.report.tables import Table, all_tables


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """One table as GitHub-flavoured Markdown, with its note below."""
    lines = [f"## {table.title}", "", "| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], figures: list[Figure]) -> str:
    """The whole Markdown report."""
    ok = sum(c["status"] == "ok" for c in report["cells"])
    head = [f"# Sweep report: {report['recipe']}", "",
            f"{ok} of {len(report['cells'])} cells ok; {report['wall_seconds']:.1f} s on "
            f"{report['machine'].get('cpu_model', 'unknown CPU')}; qtool {report['qtool']}, {report['created']}.", ""]
    head += [f"- {n}" for n in report["notes"]]
    parts = ["\n".join(head)]
    tables = all_tables(report)
    parts.append(markdown_table(tables[0]))
    for fig in figures:
        link = f"![{fig.title}](figures/{fig.name}.png)\n\n" if fig.png else ""
        parts.append(f"## {fig.title}\n\n{link}{fig.caption}")
    parts += [markdown_table(t) for t in tables[1:]]
    return "\n\n".join(parts) + "\n"
