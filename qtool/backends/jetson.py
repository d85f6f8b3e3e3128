"""``jetson`` backend: trtexec on a Jetson over SSH, with tegrastats sampled during the run.

Makes a remote temp dir (``mktemp -d``), uploads the ONNX through ``ssh cat >`` (hash checked),
records the board (device-tree model, L4T, nvpmodel, jetson_clocks), builds and times the engine
with the device's trtexec while tegrastats samples RAM, GR3D and power, and removes the temp dir
(killing what still runs) in every case. Nothing is written locally.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from qtool.backends.base import BenchOptions, BenchResult, LatencyStats, ModelFacts, default_precision, model_facts
from qtool.backends.jetson_logs import (
    STANDIN_MARKER,
    parse_jetson_clocks,
    parse_nv_tegra_release,
    parse_nvpmodel,
    parse_trtexec,
    split_sections,
    summarize_tegrastats,
    trtexec_error_line,
)
from qtool.backends.ssh import RemoteTimeout, SshClient
from qtool.errors import BackendError

log = logging.getLogger(__name__)

#: The seed paper's STFPM on a Jetson Xavier NX with TensorRT (latency per image, ms). Added as a
#: reference row when the board is a Xavier NX: their model and input size, so compare ratios.
SEED_PAPER_XAVIER_NX = [
    {"source": "seed paper", "device": "Jetson Xavier NX", "model": "STFPM", "runtime": "TensorRT",
     "precision": "int8", "latency_ms": 24.87},
    {"source": "seed paper", "device": "Jetson Xavier NX", "model": "STFPM", "runtime": "TensorRT",
     "precision": "fp16", "latency_ms": 24.98},
    {"source": "seed paper", "device": "Jetson Xavier NX", "model": "STFPM", "runtime": "TensorRT",
     "precision": "fp32", "latency_ms": 52.14},
]

SETUP_TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 300.0

_INFO_SCRIPT = r"""
echo "@@qtool:section model@@"; tr -d '\000' < /proc/device-tree/model 2>/dev/null; echo
echo "@@qtool:section compatible@@"; tr '\000' ' ' < /proc/device-tree/compatible 2>/dev/null; echo
echo "@@qtool:section release@@"; cat /etc/nv_tegra_release 2>/dev/null
echo "@@qtool:section nvpmodel@@"; nvpmodel -q 2>&1
echo "@@qtool:section clocks@@"; { jetson_clocks --show || sudo -n jetson_clocks --show; } 2>&1
echo "@@qtool:section packages@@"
dpkg-query -W -f='${Package} ${Version}\n' tensorrt libnvinfer-bin 2>/dev/null
echo "@@qtool:section uname@@"; uname -srm
"""

_RUN_SCRIPT = r"""
d={dir}
cd "$d" || exit 1
echo $$ > run.pid; cut -d' ' -f5 /proc/$$/stat > run.pgid 2>/dev/null
mkdir -p {cache} || exit 1
T=$(command -v trtexec)
if [ -z "$T" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then T=/usr/src/tensorrt/bin/trtexec; fi
if [ -z "$T" ]; then echo "trtexec not found on PATH or in /usr/src/tensorrt/bin" >&2; exit 127; fi
tp=
if command -v tegrastats >/dev/null 2>&1; then tegrastats --interval 100 > tegrastats.log 2>&1 & tp=$!; fi
"$T" {args} > trtexec.log 2>&1
rc=$?
if [ -n "$tp" ]; then kill "$tp" 2>/dev/null; wait "$tp" 2>/dev/null; fi
echo "@@qtool:section trtexec@@"; cat trtexec.log
echo "@@qtool:section tegrastats@@"; cat tegrastats.log 2>/dev/null
rm -f run.pid run.pgid
exit $rc
"""

# Kill the run's process group (trtexec, tegrastats) if it never finished, then remove the dir.
_CLEANUP_SCRIPT = r"""
d={dir}
g=$(cat "$d/run.pgid" 2>/dev/null)
if [ "$g" -gt 1 ] 2>/dev/null && kill -TERM "-$g" 2>/dev/null; then
  for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "-$g" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "-$g" 2>/dev/null
fi
[ -s "$d/run.pid" ] && kill -TERM "$(cat "$d/run.pid")" 2>/dev/null
rm -rf -- "$d"
"""

_TEMP_DIR = re.compile(r"^/[\w./-]*/qtool-bench\.[\w]+$")


def trtexec_args(onnx: str, engine: str, timing_cache: str, precision: str, has_qdq: bool, iterations: int,
                 duration_s: float, warmup_ms: float, shapes: str | None = None, avg_runs: int = 10) -> list[str]:
    """Command-line arguments of trtexec (paths are remote paths).

    fp32 adds no precision flag; fp16 adds ``--fp16``; a QDQ model always gets ``--int8`` (explicit
    quantization needs it), plus ``--fp16`` when fp16 is asked for the float parts.

    Raises:
        BackendError: int8 asked of a model without Q/DQ nodes (trtexec would calibrate on random data).
    """
    if precision == "int8" and not has_qdq:
        raise BackendError("int8 needs a QDQ model (explicit quantization); run qtool ptq --target tensorrt first")
    args = [f"--onnx={onnx}", f"--saveEngine={engine}", f"--timingCacheFile={timing_cache}"]
    if precision == "fp16":
        args.append("--fp16")
    if has_qdq:
        args.append("--int8")
    if shapes:
        args.append(f"--shapes={shapes}")
    args += [f"--iterations={int(iterations)}", f"--duration={max(0, math.ceil(duration_s))}",
             f"--warmUp={int(warmup_ms)}", f"--avgRuns={int(avg_runs)}"]
    return args


def device_facts(info: dict[str, str]) -> dict[str, Any]:
    """Board facts from the info sections: model, L4T/JetPack, power mode, clocks, packages."""
    model = info.get("model", "").strip()
    packages = dict(ln.split(" ", 1) for ln in info.get("packages", "").splitlines() if " " in ln)
    return {"device_model": model or None, "compatible": info.get("compatible", "").strip() or None,
            **parse_nv_tegra_release(info.get("release", "")), "nvpmodel": parse_nvpmodel(info.get("nvpmodel", "")),
            "clocks": parse_jetson_clocks(info.get("clocks", "")), "packages": packages,
            "uname": info.get("uname", "").strip() or None}


def is_xavier_nx(facts: dict[str, Any]) -> bool:
    """True when the device-tree model or compatible string names a Xavier NX (module p3668)."""
    text = f"{facts.get('device_model') or ''} {facts.get('compatible') or ''}".lower()
    return "xavier nx" in text or "jetson-xavier-nx" in text or "p3668" in text


class JetsonBackend:
    """Build and time a TensorRT engine on a Jetson reached over SSH (``options.host``)."""

    name: ClassVar[str] = "jetson"

    def __init__(self, options: BenchOptions) -> None:
        self.options = options

    def run(self, model: Path, batches: Sequence[int | None]) -> list[BenchResult]:
        """Measure ``model`` at each batch on the remote Jetson; see :class:`~qtool.backends.base.Backend`.

        Raises:
            BackendError: no host, unreachable host, authentication failure, trtexec failure, timeout.
        """
        opts = self.options
        if not opts.host:
            raise BackendError("the jetson backend needs --host user@address")
        facts = model_facts(Path(model))
        precision = default_precision(opts.precision, facts.has_qdq)
        if precision == "int8" and not facts.has_qdq:
            raise BackendError("int8 needs a QDQ model (explicit quantization); run qtool ptq --target tensorrt first")
        ssh = SshClient(opts.host, opts.ssh_options, opts.ssh_config)
        # section markers, so a login banner printed by a shell startup file cannot be taken for the path
        made = split_sections(ssh.run_script(
            'echo "@@qtool:section dir@@"; mktemp -d "${TMPDIR:-/tmp}/qtool-bench.XXXXXXXX" || exit 1\n'
            'echo "@@qtool:section home@@"; echo "$HOME"', timeout=SETUP_TIMEOUT_S).stdout)
        remote_dir, home = made.get("dir", "").strip(), made.get("home", "").strip()
        if not _TEMP_DIR.match(remote_dir):
            raise BackendError(f"mktemp on {opts.host} returned an unexpected path {remote_dir!r}")
        try:
            info = self._upload_and_probe(ssh, facts, remote_dir)
            cache = opts.remote_cache_dir or f"{home or '/tmp'}/.cache/qtool"
            return [self._run_batch(ssh, facts, precision, remote_dir, cache, info, b) for b in batches]
        finally:
            try:
                ssh.run_script(_CLEANUP_SCRIPT.format(dir=shlex.quote(remote_dir)), timeout=30, check=False)
            except BackendError as e:  # never hide the original error behind a cleanup failure
                log.warning("could not remove %s on %s: %s", remote_dir, opts.host, e)

    def _upload_and_probe(self, ssh: SshClient, facts: ModelFacts, remote_dir: str) -> dict[str, str]:
        """Upload the model (SHA-256 checked when the device has sha256sum) and read the board facts."""
        dest = f"{remote_dir}/model.onnx"
        script = (f"cat > {shlex.quote(dest)} || exit 1\necho '@@qtool:section sha@@'\n"
                  f"sha256sum {shlex.quote(dest)} 2>/dev/null\n{_INFO_SCRIPT}")
        with open(facts.path, "rb") as model_file:
            # the upload gets its own allowance: --timeout is for the engine build and timing
            done = ssh.run_script(script, timeout=max(self.options.timeout_s, UPLOAD_TIMEOUT_S), stdin=model_file)
        info = split_sections(done.stdout)
        remote_sha = (info.get("sha", "").split() or [""])[0]
        if remote_sha and remote_sha != facts.sha256:
            raise BackendError(f"upload of {facts.path} to {ssh.host} is corrupt (sha256 {remote_sha[:12]}... "
                               f"!= {facts.sha256[:12]}...)")
        info["_raw"] = done.stdout
        return info

    def _run_batch(self, ssh: SshClient, facts: ModelFacts, precision: str, remote_dir: str, cache: str,
                   info: dict[str, str], batch: int | None) -> BenchResult:
        """One trtexec run (engine build + timing) with tegrastats sampling; parse it into a result."""
        opts = self.options
        batch = batch or facts.inputs[0].fixed_batch or 1
        dynamic = any(s.fixed_batch is None for s in facts.inputs)
        shapes = ",".join(f"{s.name}:{'x'.join(map(str, s.concrete_shape(batch)))}" for s in facts.inputs) \
            if dynamic else None
        if not dynamic:
            facts.inputs[0].concrete_shape(batch)  # a fixed-batch model asked for another batch: one-line error
        args = trtexec_args(f"{remote_dir}/model.onnx", f"{remote_dir}/model.engine",
                            f"{cache}/trtexec-timing.cache", precision, facts.has_qdq,
                            opts.iterations or opts.min_iterations, opts.min_time_s, opts.warmup_ms, shapes)
        script = _RUN_SCRIPT.format(dir=shlex.quote(remote_dir), cache=shlex.quote(cache),
                                    args=" ".join(shlex.quote(a) for a in args))
        try:
            done = ssh.run_script(script, timeout=opts.timeout_s, check=False)
        except RemoteTimeout:
            raise BackendError(f"jetson bench on {ssh.host} timed out after {opts.timeout_s:g} s "
                               "(engine build and timing); raise --timeout") from None
        out = split_sections(done.stdout)
        log_text = out.get("trtexec", "")
        if done.returncode == 127 and "trtexec not found" in done.stderr:
            raise BackendError(f"trtexec not found on {ssh.host} (PATH or /usr/src/tensorrt/bin); install TensorRT")
        if done.returncode != 0:
            raise BackendError(f"trtexec failed on {ssh.host} (exit {done.returncode}): "
                               f"{trtexec_error_line(log_text or done.stderr)}")
        summary = parse_trtexec(log_text)
        tegra = summarize_tegrastats(out.get("tegrastats", ""))
        return self._result(facts, precision, batch, summary, tegra, info, log_text + out.get("tegrastats", ""))

    def _result(self, facts: ModelFacts, precision: str, batch: int, summary: Any, tegra: dict[str, Any],
                info: dict[str, str], run_text: str) -> BenchResult:
        """Assemble the :class:`BenchResult` for one trtexec run."""
        board = device_facts(info)
        trt = summary.tensorrt_version or board["packages"].get("tensorrt") or board["packages"].get("libnvinfer-bin")
        lat = summary.latency
        stats = LatencyStats(p50=lat.get("median", lat.get("mean", math.nan)), p90=lat.get("p90"), p99=lat.get("p99"),
                             mean=lat.get("mean", math.nan), std=None, min=lat.get("min"), max=lat.get("max"))
        ips = summary.throughput_qps * batch
        notes = ["latency is trtexec's per-query host latency (H2D + compute + D2H); "
                 "throughput = trtexec qps x batch"]
        stand_ins = [name for name, text in (("info tools", info.get("_raw", "")), ("trtexec/tegrastats", run_text))
                     if STANDIN_MARKER in text]
        if stand_ins:
            notes.append("trtexec/tegrastats were stand-ins: simulated numbers, not a Jetson measurement")
        locked = board["clocks"].get("locked")
        if locked is False:
            notes.append("clocks not locked (jetson_clocks not applied): latency varies with DVFS; "
                         "run sudo jetson_clocks before benchmarking")
        elif locked is None:
            notes.append("clock state unknown (jetson_clocks --show needs root or is missing)")
        if tegra.get("samples", 0) == 0:
            notes.append("no tegrastats samples (tegrastats missing or the run was shorter than 100 ms)")
        else:
            notes.append("device_memory_mb is the peak system RAM in use on the Jetson (CPU and GPU share it)")
        extra: dict[str, Any] = {"gpu_compute_ms": summary.gpu_compute, "trtexec_queries": summary.queries,
                                 "trtexec_seconds": summary.seconds, "tegrastats": tegra}
        if tegra.get("power_mean_mw") and ips > 0:
            extra["energy_mj_per_image"] = tegra["power_mean_mw"] / ips
        is_nx = is_xavier_nx(board)
        return BenchResult(
            device=self.name, device_name=board["device_model"] or "Jetson (model unknown)", model=str(facts.path),
            model_size_bytes=facts.size_bytes, model_sha256=facts.sha256, precision=precision, batch=batch,
            threads=None, iterations=summary.queries or (self.options.iterations or self.options.min_iterations),
            warmup_iterations=None, warmup_ms=self.options.warmup_ms, latency_ms=stats, throughput_ips=ips,
            device_memory_mb=tegra.get("ram_used_peak_mb"), host=self.options.host,
            environment={**board, "tensorrt": trt, "ssh_options": self.options.ssh_options},
            extra=extra, reference=list(SEED_PAPER_XAVIER_NX) if is_nx else [], notes=notes,
            simulated=bool(stand_ins))
