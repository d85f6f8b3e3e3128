"""``qtool bench``: time a model on a backend (cpu, cuda, jetson) and print a small table."""

from __future__ import annotations

from pathlib import Path

import click

from qtool.commands.common import fail_cleanly


def _batches(text: str | None) -> list[int | None]:
    """``"1,8"`` -> [1, 8]; None -> [None] (the model's own batch)."""
    if not text:
        return [None]
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint="--batch") from None
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"{text!r}: batch sizes must be >= 1", param_hint="--batch")
    return list(values)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_table(results: list) -> str:
    """Results as a fixed-width table, then notes and reference rows."""
    head = f"{'device':<8} {'precision':<9} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} " \
           f"{'img/s':>9} {'mem MB':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        mem = r.peak_rss_mb if r.peak_rss_mb is not None else r.device_memory_mb
        lat = r.latency_ms
        lines.append(f"{r.device:<8} {r.precision:<9} {r.batch:>5} {_fmt(lat.p50):>9} {_fmt(lat.p90):>9} "
                     f"{_fmt(lat.p99):>9} {_fmt(lat.mean):>9} {_fmt(r.throughput_ips, 1):>9} {_fmt(mem, 1):>8}"
                     + ("  SIMULATED" if r.simulated else ""))
    if results:
        lines.append(f"on {results[0].device_name}" + (f" ({results[0].host})" if results[0].host else ""))
    notes = dict.fromkeys(n for r in results for n in r.notes)
    lines += [f"note: {n}" for n in notes]
    refs = {(d["precision"], d["latency_ms"]): d for r in results for d in r.reference}
    lines += [f"reference ({d['source']}, {d['device']}, {d['model']} {d['runtime']}): {d['precision']} "
              f"{d['latency_ms']} ms" for d in refs.values()]
    return "\n".join(lines)


@click.command("bench")
@click.option("--device", required=True,
              help="Backend: cpu (ONNX Runtime), cuda (TensorRT), jetson (trtexec over SSH).")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), required=True,
              help="ONNX model (fp32 or QDQ).")
@click.option("--batch", default=None, help="Batch size(s), comma-separated (e.g. 1,8); default: the model's.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="cpu: intra-op threads (default: all usable CPUs).")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Timed runs (default: >= 100 runs and >= 2 s).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed warm-up runs (cpu, cuda; jetson: trtexec --warmUp=500 ms).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="cuda/jetson engine precision (default: int8 for a QDQ model, else fp32).")
@click.option("--host", default=None, help="jetson: user@address (or an ~/.ssh/config alias).")
@click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE",
              help="jetson: extra ssh -o option, e.g. Port=2222 or IdentityFile=~/.ssh/jetson (repeatable).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Seconds allowed for one measurement (jetson: engine build + timing).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="cuda: engine/timing cache folder.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
@fail_cleanly
def bench_cmd(device: str, model_path: str, batch: str | None, threads: int | None, iterations: int | None,
              warmup: int, precision: str | None, host: str | None, ssh_options: tuple[str, ...], timeout_s: float,
              cache_dir: str | None, out: str | None) -> None:
    """Time a model on a device: latency percentiles, throughput, memory, environment."""
    from qtool.backends import BenchOptions
    from qtool.backends.runner import run_bench

    opts = BenchOptions(threads=threads, iterations=iterations, warmup=warmup, precision=precision,
                        timeout_s=timeout_s, host=host, ssh_options=list(ssh_options),
                        cache_dir=Path(cache_dir) if cache_dir else None)
    results = run_bench(device, Path(model_path), _batches(batch), opts, Path(out) if out else None)
    click.echo(render_table(results))
    if out:
        click.echo(f"results: {out}")
