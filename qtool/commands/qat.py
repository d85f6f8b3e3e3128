"""``qtool qat``: quantization-aware distillation of a checkpoint into a QDQ ONNX model."""

from __future__ import annotations

from pathlib import Path

import click

from qtool.artifacts import removed_on_error
from qtool.commands.common import TqdmProgress, build_recipe, fail_cleanly, recipe_options
from qtool.commands.train import data_options


@click.command("qat")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), required=True,
              help="qtool checkpoint (.pt) of a trained KD model.")
@click.option("--target", default=None, help="Target profile: cpu or tensorrt.")
@click.option("--bits", type=int, default=None, help="Bit width of weights and activations (8, 6, 4).")
@click.option("--epochs", type=int, default=None, help="QAT epochs (recipe qat.epochs).")
@click.option("--init-from", "init_from", type=click.Path(), default=None,
              help="PTQ run folder (or its report.json) whose ranges start QAT, instead of calibrating.")
@click.option("--calib", default=None, help="Calibrator for the initial ranges (recipe ptq.calib).")
@click.option("--quantize", "part", type=click.Choice(["student", "teacher", "both"]), default=None,
              help="Which part of the KD model is quantized.")
@click.option("--loss", default=None,
              help="What QAT minimises (recipe qat.loss): kd (the model's KD loss on the training split) or map "
                   "(map distillation against fp32 on the search set: normals plus synthetic anomalies).")
@click.option("--learn", default=None,
              help="What QAT trains (recipe qat.learn): student (its weights and ranges) or ranges (every scale and "
                   "quantized bias, no weight: post-training range learning).")
@click.option("--keep", default=None,
              help="The state exported (recipe qat.keep): last (the last epoch's), best (the lowest holdout loss "
                   "among the start and every epoch) or guarded (best among the states whose check-set proxy image "
                   "and pixel AUROC are at least the start's; --loss map).")
@click.option("--lr-schedule", "lr_schedule", default=None,
              help="Learning-rate shape over the run (recipe qat.lr_schedule): constant or cosine; a linear warm-up "
                   "first with --set qat.warmup_epochs=N.")
@click.option("--average-epochs", "average_epochs", type=int, default=None,
              help="Evaluate, keep and export the mean of the trained parameters over the last N epoch ends "
                   "(recipe qat.average_epochs; 1: each epoch's own state).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@data_options
@recipe_options
@fail_cleanly
def qat_cmd(model_path: str, target: str | None, bits: int | None, epochs: int | None, init_from: str | None,
            calib: str | None, part: str | None, loss: str | None, learn: str | None, keep: str | None,
            lr_schedule: str | None, average_epochs: int | None, out: str,
            data_root: str | None, data_format: str | None,
            recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Fine-tune a KD model under the PTQ spec's fake quantization and export the same QDQ ONNX."""
    from qtool.errors import RecipeError
    from qtool.qat.run import run_qat

    r = build_recipe(recipe, overrides, {
        "data.root": data_root, "data.format": data_format, "ptq.target": target, "ptq.activation_bits": bits,
        "ptq.weight_bits": bits, "ptq.calib": calib, "ptq.quantize": part, "qat.epochs": epochs,
        "qat.init_from": init_from, "qat.loss": loss, "qat.learn": learn,
        "qat.keep": keep, "qat.lr_schedule": lr_schedule, "qat.average_epochs": average_epochs})
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "report.json").exists():
        raise RecipeError(f"output folder {out} exists and is not a qtool QAT run; choose another --out")
    with removed_on_error(out_dir), TqdmProgress("qat") as bar:  # a failed run leaves no partial folder
        report = run_qat(Path(model_path), r, out_dir, progress=bar)
    losses = {h["epoch"]: h["holdout_loss"] for h in report["history"] if "holdout_loss" in h}
    kept = report["kept_epoch"]
    shown = f"holdout loss {losses[0]:.4g} -> {losses[kept]:.4g} (epoch {kept}), " if 0 in losses and kept in losses \
        else ""
    click.echo(f"{report['output']}: {report['plan']['weights']} weights, {shown}"
               f"{report['mean_epoch_seconds']:.1f} s/epoch, SQNR map {report['sqnr_db']['anomaly_map']:.1f} dB, "
               f"lint issues {len(report['lint'])}")
