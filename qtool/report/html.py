"""``report.html``: one self-contained page (inline CSS, figures as data URIs, no scripts, no network)."""

from __future__ import annotations

import base64
import html
from typing import Any

from qtool.report.figures import Figure
from qtool.report.tables import Table, all_tables

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; position: sticky; top: 0; }
td:first-child, th:first-child, td.text { text-align: left; }
tr.pareto td:first-child { font-weight: bold; }
tr.failed, tr.skipped { color: #a00; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { font-size: 0.85em; color: #555; max-width: 70em; }
.wrap { overflow-x: auto; }
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def html_table(table: Table, row_classes: list[str] | None = None) -> str:
    """One table as HTML (id = the table's id)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td{" class=text" if not _numeric(x) else ""}>{_e(x)}</td>' for x in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    return (f'<h2 id="{_e(table.id)}-title">{_e(table.title)}</h2><div class="wrap"><table id="{_e(table.id)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{note}")


def _numeric(text: str) -> bool:
    return text.split(" ")[0].lstrip("+-").replace(".", "", 1).isdigit() or text in ("-", "")


def html_figure(fig: Figure) -> str:
    """A figure as an inline PNG (or just its caption when there is nothing to draw)."""
    img = ""
    if fig.png:
        data = base64.b64encode(fig.png).decode("ascii")
        img = f'<img src="data:image/png;base64,{data}" alt="{_e(fig.title)}" id="fig-{_e(fig.name)}">'
    return f"<h2>{_e(fig.title)}</h2><figure>{img}<figcaption>{_e(fig.caption)}</figcaption></figure>"


def render_html(report: dict[str, Any], figures: list[Figure]) -> str:
    """The whole HTML report."""
    tables = all_tables(report)
    classes = [" ".join(x for x in (c["status"] if c["status"] != "ok" else "", "pareto" if c.get("pareto") else "")
                        if x) for c in report["cells"]]
    ok = sum(c["status"] == "ok" for c in report["cells"])
    notes = "".join(f"<li>{_e(n)}</li>" for n in report["notes"])
    summary = (f"<p>{ok} of {len(report['cells'])} cells ok; {report['wall_seconds']:.1f} s on "
               f"{_e(report['machine'].get('cpu_model', 'unknown CPU'))}; qtool {_e(report['qtool'])}, "
               f"{_e(report['created'])}; cache {_e(report['cache_dir'])}.</p>")
    summary += f"<ul>{notes}</ul>" if notes else ""
    body = [f"<h1>Sweep report: {_e(report['recipe'])}</h1>", summary, html_table(tables[0], classes),
            *(html_figure(f) for f in figures), *(html_table(t) for t in tables[1:])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>qtool sweep: {_e(report['recipe'])}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
