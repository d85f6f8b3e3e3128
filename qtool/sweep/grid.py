"""Grid expansion of ``qtool sweep``: the recipe's ``sweep`` axes -> validated cells, each with its own recipe.

A float precision (fp32, fp16) ignores the quantization axes, so it yields one cell per model;
``exclude`` drops matching cells and ``include`` adds partial cells (unset axes take each axis's
first value, the precision the first quantized one when a quantization axis is set), as in a CI
matrix. Every model gets an fp32 cell: it is the reference of the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qtool.errors import RecipeError
from qtool.recipe import ModelConfig, Recipe
from qtool.recipe_sweep import SWEEP_AXES, SweepCellFilter, SweepModelConfig
from qtool.registry import Registry
from qtool.sweep.precisions import PRECISIONS

AXIS_FIELDS = {"model": "models", "precision": "precisions", "method": "methods", "calibrator": "calibrators",
               "calib_source": "calib_sources", "part": "parts", "target": "targets",
               "mixed_precision": "mixed_precisions", "bias_correction": "bias_corrections"}
QUANT_AXES = ("method", "calibrator", "calib_source", "part", "target", "mixed_precision", "bias_correction")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def axis_text(axis: str, value: Any) -> str:
    """An axis value as it appears in cell ids and labels.

    A mixed-precision budget as ``mp0.01``; bias correction as ``bc``, off as empty (cells without it keep their ids).
    """
    if axis == "bias_correction":
        return "bc" if value else ""
    return f"mp{value:g}" if axis == "mixed_precision" and value is not None else str(value)


@dataclass(frozen=True)
class Cell:
    """One point of the grid; the quantization axes are None for float precisions."""

    model: str
    precision: str
    method: str | None = None
    calibrator: str | None = None
    calib_source: str | None = None
    part: str | None = None
    target: str | None = None
    mixed_precision: float | None = None  # budget of the proxy drop; None: no layer kept float
    bias_correction: bool | None = None  # ptq.bias_correction of a quantized cell

    @property
    def id(self) -> str:
        """Stable, readable name: ``model:precision-method-calibrator-source-part-target[-mpBUDGET][-bc]``."""
        texts = (axis_text(a, getattr(self, a)) for a in QUANT_AXES if getattr(self, a) is not None)
        return f"{self.model}:" + "-".join([self.precision, *(t for t in texts if t)])

    @property
    def quantized(self) -> bool:
        """True when PTQ or QAT builds this cell."""
        return PRECISIONS.get(self.precision).quantized

    @property
    def builder(self) -> str:
        """Name of the builder that makes this cell's model (fp32, fp16, ptq, qat)."""
        return PRECISIONS.get(self.precision).builder or str(self.method)

    def axes(self) -> dict[str, str | None]:
        """The axis values as a dict."""
        return dataclasses.asdict(self)

    def reference(self) -> Cell:
        """The fp32 cell of the same model."""
        return Cell(self.model, "fp32")


@dataclass
class Grid:
    """The expanded grid: cells to run (fp32 references first), cells that cannot run and why, model entries."""

    cells: list[Cell]
    skipped: list[tuple[Cell, str]]
    models: dict[str, SweepModelConfig]
    notes: list[str] = field(default_factory=list)


def _registries() -> dict[str, Callable[[], Registry]]:
    """Axis -> the registry its values must be found in (imported lazily: calibrators load plugins)."""
    def calibrators() -> Registry:
        from calibrators import CALIBRATORS

        return CALIBRATORS

    def sources() -> Registry:
        from qtool.calib_data import SOURCES

        return SOURCES

    def profiles() -> Registry:
        from qtool.graph.profiles import PROFILES

        return PROFILES

    return {"precision": lambda: PRECISIONS, "calibrator": calibrators, "calib_source": sources, "target": profiles}


def model_entries(recipe: Recipe) -> dict[str, SweepModelConfig]:
    """Label -> model entry of the model axis (default label: the file's stem, or the model name).

    Raises:
        RecipeError: two entries with one label, or model overrides that do not validate.
    """
    out: dict[str, SweepModelConfig] = {}
    for i, entry in enumerate(recipe.sweep.models):
        key = f"sweep.models.{i}"
        if entry.path is not None and entry.model:
            raise RecipeError(f"recipe key {key}: give either path (a model file) or model (overrides to train)")
        merged_model(recipe, entry, key)
        default = _path_label(entry.path) if entry.path else str(entry.model.get("name", recipe.model.name))
        label = entry.label or default
        if label in out:
            raise RecipeError(f"recipe key {key}: model label {label!r} is used twice; set {key}.label")
        out[label] = entry
    return out


def _path_label(path: str) -> str:
    """``runs/x/model.pt`` -> ``x`` (run folders hold ``model.*``), ``a/stfpm_int.onnx`` -> ``stfpm_int``."""
    p = Path(path)
    if p.stem == "model" and p.parent.name:
        return p.parent.name
    return p.stem


def merged_model(recipe: Recipe, entry: SweepModelConfig, key: str = "sweep.models") -> ModelConfig:
    """The recipe's model section with ``entry.model`` overrides applied.

    Raises:
        RecipeError: naming the bad override key under ``key``.
    """
    try:
        return ModelConfig.model_validate({**recipe.model.model_dump(mode="json"), **entry.model})
    except ValidationError as e:
        err = e.errors()[0]
        sub = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise RecipeError(f"recipe key {key}.model.{sub}: {msg}") from None


def axis_values(recipe: Recipe, axis: str) -> list[Any]:
    """The values of one sweep axis (not ``model``); ``bias_corrections`` unset is the recipe's ptq value."""
    values = getattr(recipe.sweep, AXIS_FIELDS[axis])
    return [recipe.ptq.bias_correction] if values is None and axis == "bias_correction" else values


def validate_axes(recipe: Recipe, labels: list[str]) -> None:
    """Check every axis value (grid lists and include/exclude entries) against its registry.

    Raises:
        RecipeError: naming the key path and listing the allowed values.
    """
    sw = recipe.sweep
    places: list[tuple[str, str, str]] = []  # (axis, key path, value)
    for axis, name in AXIS_FIELDS.items():
        if axis != "model":
            places += [(axis, f"sweep.{name}", v) for v in axis_values(recipe, axis)]
    for kind in ("include", "exclude"):
        for i, f in enumerate(getattr(sw, kind)):
            places += [(a, f"sweep.{kind}.{i}.{a}", v) for a, v in f.model_dump(exclude_none=True).items()]
    registries = _registries()
    for axis, key, value in places:
        if axis == "model":
            if value not in labels:
                raise RecipeError(f"recipe key {key}: unknown model label {value!r}; models: {', '.join(labels)}")
        elif axis in registries:
            reg = registries[axis]()
            if value not in reg:
                raise RecipeError(f"recipe key {key}: unknown {reg.kind} {value!r}; "
                                  f"available: {', '.join(reg.names())}")
    from qtool.backends import BACKENDS

    if sw.bench.device not in BACKENDS:
        raise RecipeError(f"recipe key sweep.bench.device: unknown backend {sw.bench.device!r}; "
                          f"available: {', '.join(BACKENDS.names())}")


def _normalise(values: dict[str, Any]) -> Cell:
    """A cell from axis values; a float precision drops the quantization axes, QAT drops bias correction."""
    if not PRECISIONS.get(values["precision"]).quantized:
        return Cell(values["model"], values["precision"])
    if values["method"] == "qat":  # QAT trains its biases: the axis does not apply
        values = {**values, "bias_correction": None}
    return Cell(**{a: values[a] for a in SWEEP_AXES})


def _matches(f: SweepCellFilter, cell: Cell) -> bool:
    want = f.model_dump(exclude_none=True)
    return bool(want) and all(getattr(cell, a) == v for a, v in want.items())


def expand_grid(recipe: Recipe) -> Grid:
    """Expand ``recipe.sweep`` into cells (fp32 references first, then grid order, then includes).

    Raises:
        RecipeError: an unknown axis value, a duplicate model label, or a grid with no cell.
    """
    sw = recipe.sweep
    models = model_entries(recipe)
    validate_axes(recipe, list(models))
    lists = {a: (list(models) if a == "model" else axis_values(recipe, a)) for a in SWEEP_AXES}
    cells = [_normalise(dict(zip(SWEEP_AXES, combo, strict=True))) for combo in product(*lists.values())]
    cells = [c for c in cells if not any(_matches(f, c) for f in sw.exclude)]
    for inc in sw.include:
        given = inc.model_dump(exclude_none=True)
        first = {a: lists[a][0] for a in SWEEP_AXES}
        if "precision" not in given and any(a in given for a in QUANT_AXES):  # a quantization cell was meant
            first["precision"] = next((p for p in sw.precisions if PRECISIONS.get(p).quantized), "int8")
        cells.append(_normalise(first | given))
    cells = list(dict.fromkeys(cells))
    notes = []
    if recipe.ptq.mixed_precision is not None and recipe.ptq.mixed_precision not in sw.mixed_precisions:
        notes.append(f"ptq.mixed_precision={recipe.ptq.mixed_precision} is not used: the sweep axis "
                     f"sweep.mixed_precisions={sw.mixed_precisions} sets it per cell")
    if sw.bias_corrections is not None and recipe.ptq.bias_correction not in sw.bias_corrections:
        notes.append(f"ptq.bias_correction={str(recipe.ptq.bias_correction).lower()} is not used: the sweep axis "
                     f"sweep.bias_corrections={sw.bias_corrections} sets it per cell")
    for label in models:
        ref = Cell(label, "fp32")
        if ref not in cells:
            notes.append(f"{ref.id} added: it is the reference of the other cells of model {label}")
            cells.insert(0, ref)
    cells.sort(key=lambda c: c.precision != "fp32")  # stable: references first
    skipped = []
    for c in cells:
        entry = models[c.model]
        if c.method == "qat" and entry.path is not None and Path(entry.path).suffix not in CHECKPOINT_SUFFIXES:
            skipped.append((c, f"QAT needs a qtool checkpoint; model {c.model} is {entry.path}"))
        elif c.method == "qat" and c.mixed_precision is not None:
            skipped.append((c, "QAT does not choose precisions: mixed precision is a PTQ axis"))
    runnable = [c for c in cells if c not in {s for s, _ in skipped}]
    if len(runnable) < 1:
        raise RecipeError("recipe key sweep: the grid has no runnable cell")
    return Grid(runnable, skipped, models, notes)


def cell_recipe(recipe: Recipe, cell: Cell, model: ModelConfig | None = None) -> Recipe:
    """The resolved recipe one cell runs with: the sweep's axis values written into ``ptq``.

    ``ptq.calib_options`` are ``sweep.calib_options[calibrator]`` when given, the recipe's own when
    the calibrator is the recipe's ``ptq.calib``, else none (options are calibrator-specific).
    """
    tree = recipe.model_dump(mode="json")
    if model is not None:
        tree["model"] = model.model_dump(mode="json")
    if cell.quantized:
        p = PRECISIONS.get(cell.precision)
        ptq = tree["ptq"]
        if cell.calibrator in recipe.sweep.calib_options:
            ptq["calib_options"] = dict(recipe.sweep.calib_options[cell.calibrator])
        elif cell.calibrator != recipe.ptq.calib:
            ptq["calib_options"] = {}
        ptq.update({"calib": cell.calibrator, "quantize": cell.part, "target": cell.target,
                    "weight_bits": p.weight_bits, "activation_bits": p.activation_bits})
        ptq["calib_data"]["source"] = cell.calib_source
        ptq["mixed_precision"] = cell.mixed_precision
        ptq["bias_correction"] = bool(cell.bias_correction)
    return Recipe.model_validate(tree)
