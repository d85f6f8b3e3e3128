"""``qtool ptq``: post-training quantization of an ONNX model or a qtool checkpoint."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import click

from qtool.artifacts import removed_on_error
from qtool.commands.common import TqdmProgress, build_recipe, fail_cleanly, recipe_options
from qtool.commands.train import data_options


@click.command("ptq")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), required=True,
              help="Float ONNX model, or a qtool checkpoint (.pt) which is exported first.")
@click.option("--calib", default=None,
              help="Calibrator: minmax, percentile, entropy, mse, map-aware, or a plugin's name.")
@click.option("--mixed-precision", "mixed_precision", type=float, default=None, metavar="BUDGET",
              help="Keep the fewest, most sensitive layers float until the model is within BUDGET (--mp-criterion).")
@click.option("--mp-criterion", "mp_criterion", default=None, metavar="NAME",
              help="What --mixed-precision bounds: separation (default; the proxy AUROC drop, e.g. 0.005) or "
                   "distortion (the share of the all-quantized graph's map distortion left, e.g. 0.25).")
@click.option("--mp-rank", "mp_rank", default=None, metavar="NAME",
              help="Order in which layers go float: sensitivity (default; the fewest layers) or per-mac "
                   "(sensitivity per share of the MACs: a cheaper float share).")
@click.option("--calib-source", default=None, help="Calibration data: train (held-out normals), random-normal, mix.")
@click.option("--num-calib", type=int, default=None, help="Number of calibration samples.")
@click.option("--calib-draws", type=int, default=None, metavar="K",
              help="Calibrate on K disjoint windows of the normal pool (train source) and keep the one whose "
                   "quantized graph distorts the anomaly map least on the search set.")
@click.option("--target", default=None, help="Target profile: cpu or tensorrt.")
@click.option("--bits", type=int, default=None, help="Bit width of weights and activations (8, 6, 4).")
@click.option("--input-bits", type=int, default=None,
              help="Bit width of the graph input, the image (default: --bits); e.g. 8 with --bits 4.")
@click.option("--weight-range", default=None, help="Weight range rule: minmax (default) or mse (per-channel clip).")
@click.option("--weight-rounding", default=None, metavar="NAME",
              help="Weight rounding: nearest (default) or gptq (Conv weights rounded to keep each layer's output).")
@click.option("--bias-correction/--no-bias-correction", "bias_correction", default=None,
              help="Shift quantized layers' biases so their output means match fp32 on the calibration images.")
@click.option("--head-inputs", type=click.Choice(["quantized", "float"]), default=None,
              help="Where the float head reads its features: float (default; before their Q/DQ, so the map sees "
                   "no rounding of them) or quantized (dequantized, as the next layer does: onnxruntime's placement).")
@click.option("--quantize", "part", type=click.Choice(["student", "teacher", "both"]), default=None,
              help="Which part of the KD model is quantized.")
@click.option("--strict", is_flag=True, default=None, help="Unsupported ops and lint findings are errors.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Calibration shape of an input with dynamic dims, e.g. image=1,3,256,256 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (required unless --dry-run).")
@click.option("--dry-run", is_flag=True, help="Print the plan (what would be quantized) and stop.")
@data_options
@recipe_options
@fail_cleanly
def ptq_cmd(model_path: str, calib: str | None, mixed_precision: float | None, mp_criterion: str | None,
            mp_rank: str | None,
            calib_source: str | None, num_calib: int | None, calib_draws: int | None,
            target: str | None, bits: int | None, input_bits: int | None, weight_range: str | None,
            weight_rounding: str | None,
            bias_correction: bool | None, head_inputs: str | None, part: str | None, strict: bool | None,
            input_shapes: tuple[str, ...], out: str | None,
            dry_run: bool, data_root: str | None, data_format: str | None, recipe: str | None,
            overrides: tuple[str, ...]) -> None:
    """Quantize a model to QDQ ONNX with a pluggable calibrator and a target profile."""
    from qtool.errors import RecipeError
    from qtool.ptq import run_ptq

    if out is None and not dry_run:
        raise click.UsageError("--out is required unless --dry-run")
    r = build_recipe(recipe, overrides, {
        "data.root": data_root, "data.format": data_format, "ptq.calib": calib,
        "ptq.calib_data.source": calib_source, "ptq.calib_data.num_samples": num_calib,
        "ptq.calib_data.draws": calib_draws, "ptq.target": target,
        "ptq.activation_bits": bits, "ptq.weight_bits": bits, "ptq.input_bits": input_bits,
        "ptq.weight_range": weight_range,
        "ptq.weight_rounding": weight_rounding,
        "ptq.bias_correction": bias_correction, "ptq.head_inputs": head_inputs,
        "ptq.quantize": part, "ptq.strict": strict,
        "ptq.input_shape": parse_input_shapes(input_shapes) or None, "ptq.mixed_precision": mixed_precision,
        "ptq.mixed_precision_criterion": mp_criterion, "ptq.mixed_precision_rank": mp_rank})
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not dry_run:
        if not (Path(out) / "report.json").exists():
            raise RecipeError(f"output folder {out} exists and is not a qtool PTQ run; choose another --out")
    with (removed_on_error(Path(out)) if out is not None and not dry_run else nullcontext(),
          TqdmProgress("calibrate") as bar, TqdmProgress("search", unit="step") as search_bar):
        report = run_ptq(Path(model_path), r, Path(out or "."), dry_run=dry_run, progress=bar,
                         search_progress=search_bar)
    if dry_run:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['output']}: {sum(report['plan']['quantized_nodes'].values())} nodes quantized, "
               f"SQNR map {report['sqnr_db']['anomaly_map']:.1f} dB, score {report['sqnr_db']['score']:.1f} dB, "
               f"lint issues {len(report['lint'])}, stages {report['stage_seconds']}")
    if report.get("weight_rounding", {}).get("layers"):
        wr = report["weight_rounding"]
        err = wr["mean_relative_error"]
        click.echo(f"weight rounding {wr['method']}: {len(wr['layers'])} weights, mean relative layer output error "
                   f"{err['nearest']:.4g} (nearest) -> {err[wr['method']]:.4g}, {len(wr['skipped'])} kept nearest")
    if "calibration_draws" in report:
        cd = report["calibration_draws"]
        click.echo(f"calibration draws: kept draw {cd['chosen']} of {len(cd['draws'])}, map distortion "
                   + ", ".join(f"{r['loss']:.4f}" for r in cd["draws"]))
    if "bias_correction" in report:
        bc = report["bias_correction"]
        shift = bc.get("relative_shift", {})
        click.echo(f"bias correction: {len(bc['layers'])} layers in {bc['levels']} levels, mean relative shift "
                   f"{shift.get('before', 0):.4f} -> {shift.get('after', 0):.4f}, {len(bc['skipped'])} without a bias")
    if "mixed_precision" in report:
        mp = report["mixed_precision"]
        click.echo(f"mixed precision: {len(mp['fallback'])} of {mp['layers']} layers kept {mp['precision_kept']}, "
                   f"{mp['criterion']} {mp['all_quantized']['value']:.4f} -> {mp['final']['value']:.4f} "
                   f"(budget {mp['budget']})")


def parse_input_shapes(items: tuple[str, ...]) -> dict[str, list[int]]:
    """``("image=1,3,256,256", ...)`` -> ``{"image": [1, 3, 256, 256]}``.

    Raises:
        click.BadParameter: an item that is not NAME=positive,integers.
    """
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shape = [int(d) for d in dims.replace("x", ",").split(",")]
        except ValueError:
            shape = []
        if not name or not shape or min(shape) < 1:
            raise click.BadParameter(f"{item!r} is not NAME=D0,D1,... with positive dims", param_hint="--input-shape")
        shapes[name] = shape
    return shapes
