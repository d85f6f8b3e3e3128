"""Run artifacts: atomic writes, file hashes, and the manifest every run saves."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError

MANIFEST_PACKAGES = ("qtool", "torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def removed_on_error(folder: Path) -> Iterator[None]:
    """Run the block; if it fails and ``folder`` did not exist before it, remove ``folder`` (no partial run folder)."""
    existed = Path(folder).exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(names: tuple[str, ...] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where absent)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


@functools.cache
def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The widest x86 vector ISA this CPU has (``avx512``, ``avx2``, ``sse``) or the architecture's name.

    Float kernels (oneDNN, MKL) pick their code path by it and sum in a different order on each, so a
    seeded training reproduces bit for bit only on machines that report the same ISA.
    """
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("sse", "sse2")):
        if flag in flags:
            return isa
    return platform.machine()


ISA_PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def isa_pins() -> dict[str, str]:
    """The environment variables set that cap the ISA of torch's, oneDNN's and MKL's kernels.

    With ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2`` an AVX-512 machine trains
    bit for bit like an AVX2 one (``bench/results/mtd_stfpm_history_avx2_pinned_on_avx512.json``).
    """
    return {k: os.environ[k] for k in ISA_PINS if os.environ.get(k)}


# ``qtool --isa-cap NAME``: the pins per cap. Only AVX2 is offered: it is the cap measured to reproduce
# an AVX2 machine's training bit for bit (ONNX Runtime's own kernels ignore these variables).
ISA_CAPS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}


def cap_isa(name: str) -> None:
    """Set the ``ISA_CAPS[name]`` pins for this process and its children; torch must not be loaded yet.

    Raises:
        QtoolError: torch is already imported (it reads ``ATEN_CPU_CAPABILITY`` once, at import).
    """
    if "torch" in sys.modules:
        raise QtoolError(f"--isa-cap {name}: torch is already loaded; the cap must be set before it loads")
    os.environ.update(ISA_CAPS[name])


def machine_info() -> dict[str, Any]:
    """The machine facts a manifest and a bench result record: platform, processor, CPUs, ISA and its pins.

    When torch is loaded, also ``torch_cpu_capability``: the kernel set torch actually dispatches to
    (``AVX512``, ``AVX2``, ...), which shows whether a pin took effect.
    """
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "isa": cpu_isa(), "isa_pins": isa_pins()}
    if "torch" in sys.modules:
        info["torch_cpu_capability"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    return info


def write_manifest(out_dir: Path, inputs: dict[str, Path], extra: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json``: versions, machine, and SHA-256 of each input and output file.

    Args:
        out_dir: run folder; every regular file in it (but the manifest) is hashed as an output.
        inputs: named input files to hash (model, checkpoint, recipe ...).
        extra: additional JSON-able facts.
    Returns:
        The manifest's path.
    """
    out_dir = Path(out_dir)
    outputs = {
        str(p.relative_to(out_dir)): sha256_file(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    }
    manifest = {
        "versions": package_versions(),
        "python": platform.python_version(),
        "machine": machine_info(),
        "inputs": {
            k: {"path": str(v), "sha256": sha256_file(Path(v)) if Path(v).is_file() else None}
            for k, v in inputs.items()
        },
        "outputs": outputs,
        **(extra or {}),
    }
    path = out_dir / "manifest.json"
    write_json(path, manifest)
    return path


def bench_meta(script: str, argv: list[str], **extra: Any) -> dict[str, Any]:
    """The ``meta`` block of a bench result: the command that reproduces it, machine, Python, versions, ``extra``."""
    import shlex

    m = machine_info()
    return {"command": f"python {script} " + " ".join(shlex.quote(a) for a in argv),
            "machine": f"{m['processor'] or platform.machine()} ({m['isa']}), {m['cpus']} CPUs, {m['platform']}",
            "python": platform.python_version(), "versions": package_versions(), **extra}


def versions_line(versions: dict[str, str | None], skip_missing: bool = False) -> str:
    """The ``versions: pkg 1.2, ...`` line closing a bench result's Markdown; ``skip_missing`` drops absent ones."""
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v or not skip_missing)


def write_results(out: Path, payload: dict[str, Any], markdown: Callable[[Path], None]) -> None:
    """``out``.json (``payload``) and ``out``.md (written by ``markdown(path)``), folders made as needed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), payload)
    markdown(out.with_suffix(".md"))
