"""``qtool sweep``: run a recipe's precision grid (cached, resumable, optionally in parallel) into one report."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qtool.commands.common import TqdmProgress, build_recipe, fail_cleanly


def _event_line(ev) -> str:  # noqa: ANN001 - a qtool.sweep.run.SweepEvent
    """One progress line: ``[3/10] stfpm:int8-ptq-entropy-train-both-cpu: done in 12.3 s``."""
    where = f"[{ev.done}/{ev.total}] " if ev.kind == "cell" else "model "
    took = f" in {ev.seconds:.1f} s" if ev.seconds is not None and ev.status != "cached" else ""
    detail = f" ({ev.detail})" if ev.detail and ev.status != "done" else ""
    return f"{where}{ev.name}: {ev.status}{took}{detail}"


@click.command("sweep")
@click.argument("recipe_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default runs/<recipe name>-sweep).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache of finished models, builds and cells (default: recipe sweep.cache_dir).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Cells run in this many parallel processes (default: recipe sweep.jobs).")
@click.option("--dry-run", is_flag=True, help="List the cells of the grid and stop.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable).")
@fail_cleanly
def sweep_cmd(recipe_file: str, out: str | None, cache_dir: str | None, jobs: int | None, dry_run: bool,
              overrides: tuple[str, ...]) -> None:
    """Expand the recipe's sweep grid, run each cell like qtool ptq/qat + eval + bench, write one report."""
    from qtool.sweep import expand_grid
    from qtool.sweep.run import run_sweep

    r = build_recipe(recipe_file, overrides)
    if dry_run:
        grid = expand_grid(r)
        for cell in grid.cells:
            click.echo(cell.id)
        for cell, why in grid.skipped:
            click.echo(f"{cell.id}: skipped ({why})")
        for note in grid.notes:
            click.echo(f"note: {note}")
        click.echo(f"{len(grid.cells)} cells, {len(grid.skipped)} skipped")
        return
    out_dir = Path(out or f"runs/{r.name}-sweep")
    with TqdmProgress("train") as bar:
        report = run_sweep(r, out_dir, jobs, Path(cache_dir) if cache_dir else None,
                           lambda ev: click.echo(_event_line(ev)), bar)
    metric = report["pareto_metric"]
    for c in report["cells"]:
        m, lat = c.get("metrics") or {}, c.get("latency") or {}
        shown = (f"{metric} {m.get(metric) or float('nan'):.4f}, AUPRO {m.get('aupro') or float('nan'):.4f}, "
                 f"p50 {lat.get('p50_ms', float('nan')):.2f} ms" if c["status"] == "ok" else c["status"])
        click.echo(f"{'*' if c.get('pareto') else ' '} {c['label']:<40} {shown}")
    failed = [c for c in report["cells"] if c["status"] == "failed"]
    click.echo(f"report: {out_dir / 'report.html'} (and report.md, report.json); {report['wall_seconds']:.0f} s")
    if failed:
        click.echo(f"error: {len(failed)} cells failed, first {failed[0]['id']}: {failed[0]['error']}", err=True)
        sys.exit(1)
