"""Parsers for what a Jetson prints.

trtexec's performance summary, tegrastats lines, nvpmodel, jetson_clocks --show and
/etc/nv_tegra_release. Pure functions over text, so they are tested on
stored outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qtool.errors import BackendError

#: Test stand-ins print this; real NVIDIA tools never do. A result that saw it is ``simulated``.
STANDIN_MARKER = "QTOOL-STAND-IN"

_NUM = r"([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
_STAT = {"min": "min", "max": "max", "mean": "mean", "median": "median"}


@dataclass
class TrtexecSummary:
    """trtexec's "=== Performance summary ===": statistics per section, in ms (percentiles by number)."""

    throughput_qps: float
    latency: dict[str, float]
    gpu_compute: dict[str, float] = field(default_factory=dict)
    queries: int | None = None
    seconds: float | None = None
    tensorrt_version: str | None = None


def _stats(rest: str) -> dict[str, float]:
    """``min = 1 ms, max = 2 ms, mean = ..., median = ..., percentile(90%) = ...`` -> {"min":..,"p90":..}."""
    out: dict[str, float] = {}
    for key, value in re.findall(rf"(min|max|mean|median)\s*=\s*{_NUM}\s*ms", rest):
        out[_STAT[key]] = float(value)
    for pct, value in re.findall(rf"percentile\(\s*{_NUM}\s*%\s*\)\s*=\s*{_NUM}\s*ms", rest):
        out[f"p{float(pct):g}"] = float(value)
    return out


def _trt_version_from_tag(tag: str) -> str:
    """``8502`` -> ``8.5.2``; ``100300`` -> ``10.3.0`` (trtexec's ``[TensorRT v8502]`` banner)."""
    if len(tag) == 4:
        return f"{int(tag[0])}.{int(tag[1])}.{int(tag[2:])}"
    if len(tag) == 6:
        return f"{int(tag[:2])}.{int(tag[2:4])}.{int(tag[4:])}"
    return tag


def parse_trtexec(text: str) -> TrtexecSummary:
    """Read the performance summary out of a trtexec log.

    Raises:
        BackendError: the log has no ``Throughput:`` or ``Latency:`` summary line.
    """
    version = None
    m = re.search(r"TensorRT version:\s*([0-9][0-9.]*)", text)
    if m:
        version = m.group(1).rstrip(".")
    else:
        m = re.search(r"\[TensorRT v([0-9]+)\]", text)
        version = _trt_version_from_tag(m.group(1)) if m else None
    tput = re.search(rf"\]?\s*Throughput:\s*{_NUM}\s*qps", text)
    # "Latency:" at line start (after the [date] [I] prefixes), not "H2D Latency:" or "End-to-End Host Latency:"
    lat = re.search(r"^\s*(?:\[[^\]]*\]\s*)*Latency:\s*(.+)$", text, re.M)
    if not tput or not lat:
        raise BackendError("trtexec printed no performance summary (no 'Throughput: ... qps' / 'Latency:' lines)")
    gpu = re.search(r"^\s*(?:\[[^\]]*\]\s*)*GPU Compute(?: Time)?:\s*(.+)$", text, re.M)
    trace = re.search(rf"Timing trace has\s+([0-9]+)\s+queries over\s+{_NUM}\s*s", text)
    return TrtexecSummary(
        throughput_qps=float(tput.group(1)), latency=_stats(lat.group(1)),
        gpu_compute=_stats(gpu.group(1)) if gpu else {},
        queries=int(trace.group(1)) if trace else None, seconds=float(trace.group(2)) if trace else None,
        tensorrt_version=version)


def trtexec_error_line(text: str) -> str:
    """The error line of a failed trtexec log, its ``[date] [E]`` prefixes stripped.

    The last line with ``ERROR:`` (the parser's or builder's cause) if any, else the last ``[E]`` line,
    else the last non-empty line.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if "ERROR:" in ln]
    errors = [ln for ln in lines if "[E]" in ln]
    line = (causes or errors or lines or ["no output"])[-1]
    return re.sub(r"^(?:\[[^\]]*\]\s*)+", "", line)[:300]


_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+([0-9]+)(mW)?/([0-9]+)(mW)?(?![\w.])")
_BOARD_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats_line(line: str) -> dict[str, Any] | None:
    """One tegrastats line -> RAM MB, GR3D load %/MHz and power rails in mW (current and average).

    Handles JetPack 4 (``POM_5V_IN 900/943``, ``VDD_IN 5336/4970``: unitless mW) and JetPack 5/6
    (``VDD_IN 4900mW/5000mW``, ``GR3D_FREQ 26%@[306]``). ``power_mw`` is the board input rail when
    the module reports one (VDD_IN, POM_5V_IN), else the sum of all rails (AGX Xavier/Orin), named
    in ``power_rail``. Returns None for lines without a RAM field.
    """
    ram = re.search(r"\bRAM\s+([0-9]+)/([0-9]+)MB", line)
    if not ram:
        return None
    out: dict[str, Any] = {"ram_used_mb": int(ram.group(1)), "ram_total_mb": int(ram.group(2))}
    gr3d = re.search(r"\bGR3D_FREQ\s+([0-9]+)%(?:@\[?([0-9,]+)\]?)?", line)
    if gr3d:
        out["gr3d_pct"] = int(gr3d.group(1))
        if gr3d.group(2):
            out["gr3d_mhz"] = max(int(x) for x in gr3d.group(2).split(",") if x)
    rails = {name: (int(cur), int(avg)) for name, cur, _, avg, _ in _RAIL.findall(line)
             if name not in ("RAM", "SWAP", "IRAM")}
    out["rails_mw"] = {k: v[0] for k, v in rails.items()}
    board = next((r for r in _BOARD_INPUT_RAILS if r in rails), None)
    if board:
        out["power_rail"], out["power_mw"], out["power_avg_mw"] = board, rails[board][0], rails[board][1]
    elif rails:
        out["power_rail"] = "sum(" + "+".join(rails) + ")"
        out["power_mw"] = sum(v[0] for v in rails.values())
        out["power_avg_mw"] = sum(v[1] for v in rails.values())
    return out


def summarize_tegrastats(text: str) -> dict[str, Any]:
    """Summary of a tegrastats log: sample count, RAM peak, mean/peak power, mean GR3D load."""
    samples = [s for s in (parse_tegrastats_line(ln) for ln in text.splitlines()) if s]
    if not samples:
        return {"samples": 0}
    power = [s["power_mw"] for s in samples if "power_mw" in s]
    gr3d = [s["gr3d_pct"] for s in samples if "gr3d_pct" in s]
    out: dict[str, Any] = {"samples": len(samples), "ram_total_mb": samples[0]["ram_total_mb"],
                           "ram_used_peak_mb": max(s["ram_used_mb"] for s in samples),
                           "ram_used_start_mb": samples[0]["ram_used_mb"]}
    if power:
        out.update(power_rail=next(s["power_rail"] for s in samples if "power_rail" in s),
                   power_mean_mw=sum(power) / len(power), power_peak_mw=max(power))
    if gr3d:
        out.update(gr3d_mean_pct=sum(gr3d) / len(gr3d), gr3d_peak_pct=max(gr3d))
    return out


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """``nvpmodel -q``: ``NV Power Mode: MODE_20W_6CORE`` then the mode id on the next line."""
    m = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*([0-9]+)", text)
    if m:
        return {"mode": m.group(1), "id": int(m.group(2))}
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    return {"mode": m.group(1), "id": None} if m else {}


def parse_jetson_clocks(text: str) -> dict[str, Any]:
    """``jetson_clocks --show``: per-clock min/max/current; ``locked`` when CPUs and GPU run at max.

    ``locked`` is None when the text holds no clock lines (jetson_clocks missing, or not run as root).
    """
    cpus = re.findall(r"^cpu[0-9]+:\s*Online=1.*?MinFreq=([0-9]+)\s+MaxFreq=([0-9]+)\s+CurrentFreq=([0-9]+)",
                      text, re.M)
    gpu = re.search(r"^GPU\s+MinFreq=([0-9]+)\s+MaxFreq=([0-9]+)\s+CurrentFreq=([0-9]+)", text, re.M)
    emc = re.search(r"^EMC\s+MinFreq=([0-9]+)\s+MaxFreq=([0-9]+)\s+CurrentFreq=([0-9]+)", text, re.M)
    if not cpus and not gpu:
        return {"locked": None}
    pinned = [mn == mx for mn, mx, _ in cpus] + ([gpu.group(1) == gpu.group(2)] if gpu else [])
    out: dict[str, Any] = {"locked": all(pinned), "online_cpus": len(cpus)}
    if gpu:
        out["gpu_hz"] = {"min": int(gpu.group(1)), "max": int(gpu.group(2)), "current": int(gpu.group(3))}
    if emc:
        out["emc_hz"] = {"min": int(emc.group(1)), "max": int(emc.group(2)), "current": int(emc.group(3))}
    return out


#: L4T release -> JetPack, for the releases this table knows; others are recorded as L4T only.
L4T_TO_JETPACK = {"32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
                  "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "36.3.0": "6.0", "36.4.0": "6.1",
                  "36.4.3": "6.2"}


def parse_nv_tegra_release(text: str) -> dict[str, Any]:
    """``# R35 (release), REVISION: 4.1, ...`` -> {"l4t": "35.4.1", "jetpack": "5.1.2", "board": ...}."""
    m = re.search(r"#\s*R([0-9]+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    if not m:
        return {}
    rev = m.group(2)
    l4t = f"{m.group(1)}.{rev}" + (".0" if rev.count(".") == 0 else "")
    board = re.search(r"BOARD:\s*([^,\s]+)", text)
    return {"l4t": l4t, "jetpack": L4T_TO_JETPACK.get(l4t), "board": board.group(1) if board else None}


def split_sections(text: str) -> dict[str, str]:
    """Split output that marks sections with ``@@qtool:section NAME@@`` lines into {NAME: text}."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        m = re.match(r"@@qtool:section ([a-z_]+)@@\s*$", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out
