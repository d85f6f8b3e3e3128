"""Shared pieces of the CLI commands: recipe flags, clean error exits, tqdm progress."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from qtool.errors import QtoolError
from qtool.recipe import Recipe, load_recipe


def fail_cleanly(fn: Callable) -> Callable:
    """Turn a QtoolError into a one-line ``error:`` message and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QtoolError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def recipe_options(fn: Callable) -> Callable:
    """Add ``--recipe`` and repeatable ``--set key=value`` to a command."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a recipe value, e.g. --set train.epochs=5 (repeatable).")(fn)
    return click.option("--recipe", type=click.Path(dir_okay=False), default=None,
                        help="YAML recipe; defaults apply where it is silent.")(fn)


def build_recipe(recipe: str | None, overrides: tuple[str, ...], flags: dict[str, Any] | None = None) -> Recipe:
    """Load the recipe, apply --set overrides, then explicit flags (keyed by dotted path; they win)."""
    flag_overrides = [f"{k}={json.dumps(v)}" for k, v in (flags or {}).items() if v is not None]
    return load_recipe(recipe, [*overrides, *flag_overrides])


class TqdmProgress:
    """A progress callback backed by tqdm (the library only ever sees a callable)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "img") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)

    def __call__(self, n: int) -> None:
        """Advance by ``n`` items."""
        self.bar.update(n)

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
