"""Precision sweeps (``qtool sweep``): a grid of compilations, each evaluated and timed, written as one report.

``grid`` expands the recipe's ``sweep`` section into cells, ``cache`` keys and stores them by
content, ``models`` resolves the model axis, ``cells`` builds/evaluates/times one cell, ``run``
drives it all (``run_sweep``).
"""

from qtool.sweep.grid import Cell, Grid, cell_recipe, expand_grid
from qtool.sweep.precisions import PRECISIONS, Precision

__all__ = ["PRECISIONS", "Cell", "Grid", "Precision", "cell_recipe", "expand_grid"]
