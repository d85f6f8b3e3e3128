"""``qtool sweep`` as a library call: expand the grid, resolve the models, run the cells, write one report.

Cells already in the cache are reused; the rest run in dependency order (the fp32 reference of a
model first; a QAT cell after the PTQ cell whose ranges it starts from), in this process or in
``jobs`` spawned worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.recipe import Recipe
from qtool.sweep.cache import Cache, code_fingerprint, content_key
from qtool.sweep.cells import CellJob, run_job
from qtool.sweep.grid import Cell, Grid, cell_recipe, expand_grid
from qtool.sweep.models import ModelSource, data_fingerprint, resolve_models

log = logging.getLogger(__name__)

BUILD_SECTIONS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("data",), "ptq": ("data", "ptq"),
                                              "qat": ("data", "ptq", "qat", "export", "train")}
"""Recipe sections each builder reads (besides thread counts); they, and nothing else of the recipe, key its build."""
CELL_SECTIONS = ("data", "eval")
"""Sections the evaluation of a cell reads (with ``sweep.bench`` and ``sweep.overlays``)."""


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep, for the CLI to print: a model resolved or a cell finished."""

    kind: str  # "model" or "cell"
    name: str
    status: str  # "cached", "done", "failed", "skipped"
    seconds: float | None = None
    detail: str | None = None
    done: int = 0
    total: int = 0


OnEvent = Callable[[SweepEvent], None] | None


class InlineExecutor(Executor):
    """Runs each submitted call at once in this process (``--jobs 1``), behind the Executor interface."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Call ``fn`` now; return a finished future."""
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:  # delivered through the future, as a process pool would
            f.set_exception(e)
        return f


def _qat_init(cell: Cell, cells: list[Cell]) -> Cell | None:
    """The PTQ cell whose ranges start QAT ``cell`` (same width, calibrator, source, part, target), if any."""
    if cell.method != "qat":
        return None
    twins = (Cell(**{**cell.axes(), "method": "ptq", "bias_correction": bc}) for bc in (False, True))
    return next((t for t in twins if t in cells), None)  # bias correction moves biases only, not the ranges


def plan_jobs(recipe: Recipe, grid: Grid, sources: dict[str, ModelSource], cache: Cache,
              data_fp: str) -> tuple[list[CellJob], dict[str, list[str]]]:
    """One job per cell with its content keys, and each job's dependencies (cell keys).

    The build key hashes the builder, the axis values, the model files' hashes, the dataset
    fingerprint, the recipe sections that builder reads and the qtool/calibrator sources; the cell
    key hashes the build key, the evaluation sections, the timing settings and the reference cell's key.
    """
    order = sorted(grid.cells, key=lambda c: (c.precision != "fp32", c.method == "qat"))
    code = code_fingerprint()
    jobs: dict[Cell, CellJob] = {}
    deps: dict[str, list[str]] = {}
    for cell in order:
        r = cell_recipe(recipe, cell)
        src = sources[cell.model]
        twin = _qat_init(cell, grid.cells)
        sections = {s: getattr(r, s).model_dump(mode="json", exclude={"init_from"} if twin and s == "qat" else None)
                    for s in BUILD_SECTIONS[cell.builder]}
        axes = {k: v for k, v in cell.axes().items() if k != "model"}
        build_key = content_key({"kind": "build", "code": code, "builder": cell.builder, "cell": axes,
                                 "model": src.identity(),
                                 "data": data_fp if "data" in sections else None, "sections": sections,
                                 "seed": r.seed, "init_from": jobs[twin].build_key if twin else None})
        ref = None if cell.precision == "fp32" else jobs[cell.reference()]
        cell_key = content_key({"kind": "cell", "code": code, "build": build_key, "data": data_fp,
                                "precision": cell.precision,
                                "sections": {s: getattr(r, s).model_dump(mode="json") for s in CELL_SECTIONS},
                                "bench": r.sweep.bench.model_dump(mode="json"), "overlays": r.sweep.overlays,
                                "reference": ref.cell_key if ref else None})
        jobs[cell] = CellJob(cell, r.model_dump(mode="json"), src, build_key, cell_key, cache.root,
                             cache.entry("cells", ref.cell_key) if ref else None,
                             cache.entry("builds", jobs[twin].build_key) if twin else None)
        deps[cell_key] = [j.cell_key for j in (ref, jobs[twin] if twin else None) if j is not None]
    return [jobs[c] for c in grid.cells], deps


def cached_result(cache: Cache, job: CellJob) -> dict[str, Any] | None:
    """The stored result of a finished cell (its build must still be there too), else None."""
    if not (cache.has("cells", job.cell_key) and cache.has("builds", job.build_key)):
        return None
    return json.loads((cache.entry("cells", job.cell_key) / "result.json").read_text())


def execute(jobs: list[CellJob], deps: dict[str, list[str]], results: dict[str, dict[str, Any]], n_jobs: int,
            on_event: OnEvent = None) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` not yet in ``results`` as their dependencies finish; a failed dependency skips its dependents.

    Returns:
        ``results`` completed: cell key -> result (status ok, failed or skipped).
    """
    by_key = {j.cell_key: j for j in jobs}
    pending = [j for j in jobs if j.cell_key not in results]
    total = len(jobs)
    pool: Executor = InlineExecutor() if n_jobs <= 1 else ProcessPoolExecutor(
        n_jobs, mp_context=multiprocessing.get_context("spawn"))

    def finish(key: str, result: dict[str, Any]) -> None:
        results[key] = result
        if on_event:
            on_event(SweepEvent("cell", by_key[key].cell.id, result["status"], result.get("wall_seconds"),
                                result.get("error") or result.get("reason"), len(results), total))

    with pool:
        running: dict[Future, str] = {}
        while pending or running:
            for job in list(pending):
                if len(running) >= max(1, n_jobs):  # inline: one at a time, so each is reported as it ends
                    break
                needs = deps[job.cell_key]
                bad = [k for k in needs if k in results and results[k]["status"] != "ok"]
                if bad:
                    pending.remove(job)
                    finish(job.cell_key, {"status": "skipped", "id": job.cell.id, "cell": job.cell.axes(),
                                          "key": job.cell_key, "reason": f"needs {by_key[bad[0]].cell.id}, which "
                                          f"{results[bad[0]]['status']}"})
                elif all(k in results for k in needs):
                    pending.remove(job)
                    running[pool.submit(run_job, dataclasses.replace(job, parallel=n_jobs))] = job.cell_key
            if not running:
                if pending and not any(all(k in results for k in deps[j.cell_key]) for j in pending):
                    raise RuntimeError(f"sweep cells wait on cells not in the grid: {pending[0].cell.id}")  # a bug
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in [f for f in running if f in done]:  # in submission order
                key = running.pop(f)
                finish(key, f.result())
    return results


def run_sweep(recipe: Recipe, out_dir: Path, jobs: int | None = None, cache_dir: Path | None = None,
              on_event: OnEvent = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the sweep ``recipe.sweep`` describes and write ``report.json``, ``report.md``, ``report.html``.

    Args:
        recipe: the resolved recipe (its ``sweep`` section is the grid).
        out_dir: where the report goes (with ``figures/``, ``recipe.yaml`` and ``manifest.json``).
        jobs: worker processes (default ``sweep.jobs``); 1 runs the cells in this process.
        cache_dir: the cache (default ``sweep.cache_dir``).
        on_event: called as models are resolved and cells finish.
        progress: item-count callback for training.
    Returns:
        The report (as written to ``report.json``).
    Raises:
        RecipeError: a bad axis value or model entry. ModelError, DataError: unreadable models or data.
    """
    from qtool.report import assemble_report, write_report
    from qtool.report.figures import render_figures

    t0, stages = time.perf_counter(), {}
    grid = expand_grid(recipe)
    cache = Cache(Path(cache_dir or recipe.sweep.cache_dir))
    cache.clean_stale()
    t = time.perf_counter()
    data_fp = data_fingerprint(recipe.data)
    stages["data"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    sources = resolve_models(recipe, grid.models, data_fp, cache, progress)
    stages["models"] = round(time.perf_counter() - t, 3)
    for s in sources.values():
        if on_event:
            on_event(SweepEvent("model", s.label, "cached" if s.cached else "done", s.train_seconds, str(s.onnx)))
    job_list, deps = plan_jobs(recipe, grid, sources, cache, data_fp)
    results = {j.cell_key: r for j in job_list if (r := cached_result(cache, j)) is not None}
    cached = set(results)
    for n, job in enumerate([j for j in job_list if j.cell_key in cached], 1):
        if on_event:
            on_event(SweepEvent("cell", job.cell.id, "cached", None, None, n, len(job_list)))
    t = time.perf_counter()
    execute(job_list, deps, results, jobs or recipe.sweep.jobs, on_event)
    stages["cells"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    report = assemble_report(recipe, grid, sources, job_list, results, cached, cache)
    figures = render_figures(report, recipe)
    stages["report"] = round(time.perf_counter() - t, 3)
    report["stage_seconds"] = stages
    report["wall_seconds"] = round(time.perf_counter() - t0, 3)
    write_report(Path(out_dir), report, figures, recipe)
    return report
