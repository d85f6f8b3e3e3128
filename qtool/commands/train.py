"""``qtool train``, ``qtool export`` and ``qtool eval``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qtool.commands.common import TqdmProgress, build_recipe, fail_cleanly, recipe_options

DATA_OPTIONS = [
    click.option("--data", "data_root", type=click.Path(), default=None, help="Dataset root (recipe data.root)."),
    click.option("--format", "data_format", default=None, help="Dataset layout: mvtec, mtd or synth."),
]


def data_options(fn):  # noqa: D103 - decorator
    for opt in reversed(DATA_OPTIONS):
        fn = opt(fn)
    return fn


@click.command("train")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--epochs", type=int, default=None, help="Epochs (recipe train.epochs).")
@click.option("--mode", type=click.Choice(["unified", "one-class"]), default=None, help="Multi-class or per-category.")
@click.option("--export/--no-export", default=True, show_default=True, help="Also write model.onnx.")
@data_options
@recipe_options
@fail_cleanly
def train_cmd(out: str, epochs: int | None, mode: str | None, export: bool, data_root: str | None,
              data_format: str | None, recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Train a KD anomaly model on normal images; resumes from OUT/last.pt when re-run."""
    from qtool.runs import run_train

    r = build_recipe(recipe, overrides, {"data.root": data_root, "data.format": data_format,
                                         "train.epochs": epochs, "train.mode": mode})
    with TqdmProgress("train") as bar:
        summary = run_train(r, Path(out), export=export, progress=bar)
    for m in summary["models"]:
        click.echo(f"{m['category']}: {m['checkpoint']} ({m['epochs']} epochs, {m['train_seconds']} s)"
                   + (f", {m['onnx']}" if "onnx" in m else ""))


@click.command("export")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), required=True, help="qtool checkpoint.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--batch-size", type=int, default=None, help="Fixed batch size of the graph.")
@click.option("--opset", type=int, default=None, help="ONNX opset (>= 17).")
@recipe_options
@fail_cleanly
def export_cmd(model_path: str, out: str, batch_size: int | None, opset: int | None, recipe: str | None,
               overrides: tuple[str, ...]) -> None:
    """Export a checkpoint to ONNX (outputs anomaly_map, score) and check ORT/torch parity."""
    from qtool.runs import run_export

    r = build_recipe(recipe, overrides, {"export.batch_size": batch_size, "export.opset": opset})
    res = run_export(Path(model_path), Path(out), r)
    click.echo(f"{res['onnx']}: parity vs torch {json.dumps(res['parity'])}")


@click.command("eval")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), required=True,
              help="qtool checkpoint (.pt) or ONNX model (.onnx).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the full result as JSON.")
@data_options
@recipe_options
@fail_cleanly
def eval_cmd(model_path: str, out: str | None, data_root: str | None, data_format: str | None,
             recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate a model: image/pixel AUROC, AUPRO, F1 per category and mean."""
    from qtool.runs import run_eval

    r = build_recipe(recipe, overrides, {"data.root": data_root, "data.format": data_format})
    with TqdmProgress("eval") as bar:
        res = run_eval(Path(model_path), r, Path(out) if out else None, progress=bar)
    m = res["metrics"]
    for cat, row in {**m["per_category"], "mean": m["mean"]}.items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_at_threshold")}
        click.echo(f"{cat}: {shown}")


@click.command("run")
@click.argument("recipe_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable).")
@fail_cleanly
def run_cmd(recipe_file: str, out: str | None, overrides: tuple[str, ...]) -> None:
    """Run a recipe end to end: train, export, PTQ, evaluate fp32 vs int8; print the summary table."""
    from qtool.runs import run_pipeline

    r = build_recipe(recipe_file, overrides)
    out_dir = Path(out or f"runs/{r.name}")
    with TqdmProgress(r.name) as bar:
        run_pipeline(r, out_dir, progress=bar)
    click.echo((out_dir / "summary.md").read_text())
    click.echo(f"report: {out_dir / 'summary.md'}")
