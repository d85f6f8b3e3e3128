"""The recipe's ``sweep`` section: the grid's axes, its filters, and how cells are timed and reported."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from qtool.recipe_section import Section

Budget = Annotated[float, Field(ge=0.0, le=1.0)]
"""A mixed-precision budget (``ptq.mixed_precision``; what it bounds: ``ptq.mixed_precision_criterion``)."""

SWEEP_AXES = ("model", "precision", "method", "calibrator", "calib_source", "part", "target", "mixed_precision",
              "bias_correction")
"""The axes of a sweep grid; ``SweepConfig`` holds one list per axis (plural field names)."""


class SweepBenchConfig(Section):
    """How each sweep cell is timed: a ``qtool bench`` backend with small, fixed iteration counts."""

    device: str = "cpu"
    iterations: int = Field(50, ge=1)
    warmup: int = Field(5, ge=0)
    threads: int | None = Field(None, ge=1)
    batch: int | None = Field(None, ge=1)
    timeout_s: float = Field(900.0, gt=0.0)
    host: str | None = None
    ssh_options: list[str] = Field(default_factory=list)


class SweepModelConfig(Section):
    """One value of the model axis: an existing model file, or the recipe's model (with overrides) trained."""

    label: str | None = None
    path: str | None = None  # qtool checkpoint (.pt) or ONNX file; None: train per the recipe
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of the model section when training


class SweepCellFilter(Section):
    """A partial cell: ``exclude`` drops the cells it matches, ``include`` adds one (unset axes: first value)."""

    model: str | None = None
    precision: str | None = None
    method: Literal["ptq", "qat"] | None = None
    calibrator: str | None = None
    calib_source: str | None = None
    part: Literal["student", "teacher", "both"] | None = None
    target: str | None = None
    mixed_precision: Budget | None = None
    bias_correction: bool | None = None


class SweepConfig(Section):
    """``qtool sweep``: the grid (one list per axis), its filters, and how cells are timed and reported."""

    models: list[SweepModelConfig] = Field(default_factory=lambda: [SweepModelConfig()])
    precisions: list[str] = Field(default_factory=lambda: ["fp32", "int8"], min_length=1)
    methods: list[Literal["ptq", "qat"]] = Field(default_factory=lambda: ["ptq"], min_length=1)
    calibrators: list[str] = Field(default_factory=lambda: ["mse"], min_length=1)
    calib_sources: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    parts: list[Literal["student", "teacher", "both"]] = Field(default_factory=lambda: ["both"], min_length=1)
    targets: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    # budgets of ``ptq.mixed_precision`` (null: every quantizable layer quantized); replaces the ptq value
    mixed_precisions: list[Budget | None] = Field(default_factory=lambda: [None], min_length=1)
    # values of ``ptq.bias_correction`` (PTQ cells; QAT trains its biases); null: the recipe's ptq value
    bias_corrections: list[bool] | None = Field(None, min_length=1)
    include: list[SweepCellFilter] = Field(default_factory=list)
    exclude: list[SweepCellFilter] = Field(default_factory=list)
    calib_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # calibrator name -> its options
    bench: SweepBenchConfig = Field(default_factory=SweepBenchConfig)
    overlays: int = Field(3, ge=0, le=16)  # images per quantized cell in the fp32-vs-cell overlay figure
    pareto_metric: Literal["image_auroc", "pixel_auroc", "aupro", "f1_at_threshold"] = "image_auroc"
    jobs: int = Field(1, ge=1)
    cache_dir: str = "runs/sweep-cache"

    @field_validator("models", mode="before")
    @classmethod
    def _model_paths(cls, v: Any) -> Any:
        """A bare string in ``models`` is the path of a model file."""
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v
