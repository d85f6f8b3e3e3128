"""Wall time of the README's quickstart from a fresh clone: install (new venv) and the main job, timed apart.

Clones this repository's committed HEAD into a temporary folder (or ``--dir``), then runs exactly the
README's two commands there, each timed: ``python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'``
and ``.venv/bin/qtool sweep recipes/quickstart.yaml``; records the sweep's own stage times, the load
average before and after, and the machine.

Run: .venv/bin/python bench/quickstart_fresh.py [--keep]
Writes bench/results/quickstart_fresh.{json,md} (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtool.artifacts import write_json

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'"
MAIN_JOB = ".venv/bin/qtool sweep recipes/quickstart.yaml"


def timed(command: str, cwd: Path, log: Path) -> float:
    """Run ``command`` in a shell in ``cwd`` (output to ``log``); its wall seconds. Exits on failure."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call(["bash", "-c", command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"error: {command!r} failed with exit status {rc}; see {log}")
    return round(time.perf_counter() - t0, 1)


def main(argv: list[str] | None = None) -> None:
    """Clone, install, run the quickstart, write the timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="clone here (must not exist); default a temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the clone")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quickstart_fresh"))
    args = ap.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="qtool-fresh-")) / "qtool"
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    subprocess.check_call(["git", "clone", "-q", str(ROOT), str(base)])
    load_before = os.getloadavg()
    try:
        install_s = timed(INSTALL, base, base.parent / "install.log")
        job_s = timed(MAIN_JOB, base, base.parent / "quickstart.log")
        report = json.loads((base / "runs" / "quickstart-sweep" / "report.json").read_text())
        result = {
            "commit": commit, "clone": str(base), "install_command": INSTALL, "main_command": MAIN_JOB,
            "install_seconds": install_s, "main_job_seconds": job_s, "total_seconds": round(install_s + job_s, 1),
            "sweep_stage_seconds": report["stage_seconds"], "cells": len(report["cells"]),
            "cells_ok": sum(c["status"] == "ok" for c in report["cells"]),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        }
    finally:
        if not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["sweep_stage_seconds"].items())
    out.with_suffix(".md").write_text(
        "# Quickstart from a fresh clone\n\n"
        f"`python bench/quickstart_fresh.py` at commit {commit[:12]}; {result['machine']}; load average before "
        f"{result['load_average_before']}, after {result['load_average_after']}\n\n"
        "| step | command | wall s |\n|---|---|---|\n"
        f"| install | `{INSTALL}` | {install_s} |\n| main job | `{MAIN_JOB}` | {job_s} |\n"
        f"| total | | {result['total_seconds']} |\n\n"
        f"Sweep stages: {stages}; {result['cells_ok']} of {result['cells']} cells ok.\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
