"""The ``qtool`` command line: a click group whose commands live in :mod:`qtool.commands`.

Commands only turn flags into recipe overrides, call the library and print a summary.
"""

from __future__ import annotations

import logging

import click

from qtool.commands import COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="qtool")
def main(verbose: int) -> None:
    """qtool: train, export, quantize and benchmark knowledge-distillation anomaly detectors."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _command in COMMANDS:
    main.add_command(_command)
