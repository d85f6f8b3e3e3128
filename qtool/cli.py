"""The ``qtool`` command line: a click group whose commands live in :mod:`qtool.commands`.

Commands only turn flags into recipe overrides, call the library and print a summary.
"""

from __future__ import annotations

import logging

import click

from qtool.artifacts import ISA_CAPS, cap_isa
from qtool.commands import COMMANDS
from qtool.commands.common import fail_cleanly


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--isa-cap", type=click.Choice(sorted(ISA_CAPS)), default=None,
              help="Cap torch's, oneDNN's and MKL's float kernels at this ISA, so that training and torch "
                   "evaluation reproduce bit for bit a machine that has only it (recorded in the manifest).")
@click.version_option(package_name="qtool")
@fail_cleanly
def main(verbose: int, isa_cap: str | None) -> None:
    """qtool: train, export, quantize and benchmark knowledge-distillation anomaly detectors."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if isa_cap:
        cap_isa(isa_cap)


for _command in COMMANDS:
    main.add_command(_command)
