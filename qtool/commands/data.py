"""``qtool data``: generate synthetic data, show a dataset's split."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qtool.commands.common import build_recipe, fail_cleanly, recipe_options


@click.group("data")
def data_group() -> None:
    """Datasets: synthetic generator and split inspection."""


@data_group.command("synth")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder to write (MVTec layout).")
@click.option("--categories", default=None, help="Comma-separated generator kinds (default: the recipe's).")
@click.option("--n-train", type=int, default=None, help="Normal training images per category.")
@click.option("--size", type=int, default=None, help="Image side in pixels.")
@click.option("--seed", type=int, default=None, help="Generator seed.")
@recipe_options
@fail_cleanly
def synth(out: str, categories: str | None, n_train: int | None, size: int | None, seed: int | None,
          recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Write a seeded synthetic multi-category anomaly dataset with pixel masks (MVTec layout)."""
    from qtool.data import generate_synthetic

    cats = categories.split(",") if categories else None
    r = build_recipe(recipe, overrides, {"data.synth.categories": cats, "data.synth.n_train": n_train,
                                         "data.synth.size": size, "data.synth.seed": seed})
    root = generate_synthetic(Path(out), r.data.synth)
    click.echo(f"synthetic data ({', '.join(r.data.synth.categories)}) in {root}")


@data_group.command("split")
@click.option("--data", "data_root", type=click.Path(), default=None, help="Dataset root.")
@click.option("--format", "data_format", default=None, help="Dataset layout: mvtec, mtd or synth.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the split as JSON here.")
@recipe_options
@fail_cleanly
def split(data_root: str | None, data_format: str | None, out: str | None, recipe: str | None,
          overrides: tuple[str, ...]) -> None:
    """Show (and optionally save) the deterministic train/holdout/test split of a dataset."""
    from qtool.artifacts import write_json
    from qtool.data import load_splits

    r = build_recipe(recipe, overrides, {"data.root": data_root, "data.format": data_format})
    splits = load_splits(r.data)
    record = splits.to_json()
    if out:
        write_json(Path(out), record)
    for cat in splits.categories():
        sub = splits.filter(cat)
        n_bad = sum(s.label for s in sub.test)
        click.echo(f"{cat}: train {len(sub.train)}, holdout {len(sub.holdout)}, "
                   f"test {len(sub.test)} ({n_bad} anomalous)")
    if not out:
        click.echo(json.dumps({k: v for k, v in record.items() if k != "files"}, default=str)[:2000])
