"""The stable schema of a sweep's ``report.json`` (``qtool.sweep/1``), as pydantic models.

Every report is validated against it before it is written; ``docs/sweep-report.schema.json`` is its
JSON Schema, and a test keeps the two equal, so a schema change is always a deliberate one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_SCHEMA = "qtool.sweep/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metrics(_Strict):
    """Accuracy of one cell: AUROCs, AUPRO (to ``eval.max_fpr``), F1-max, and F1 at two thresholds.

    ``f1_at_threshold`` uses this cell's own threshold, fitted on held-out normals;
    ``f1_at_fp32_threshold`` uses the fp32 model's (quantization shifts scores).
    """

    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    f1_max: float | None
    f1_at_threshold: float | None
    f1_at_fp32_threshold: float | None


class CategoryMetrics(Metrics):
    """Metrics of one category, with its image counts (a metric its data cannot define is None)."""

    n_images: int
    n_anomalous: int
    note: str | None = None


class Fidelity(_Strict):
    """How closely the cell's maps and scores follow fp32's on the test split (``qtool.fidelity.map_fidelity``)."""

    pixel_pearson: float | None
    map_max_abs_diff: float | None
    score_max_abs_shift: float | None
    score_max_rel_shift: float | None
    score_spearman: float | None


class Latency(_Strict):
    """The backend's timing of the cell's model (milliseconds, images per second, MB)."""

    device: str
    device_name: str
    batch: int
    threads: int | None
    iterations: int
    p50_ms: float
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float
    throughput_ips: float
    peak_rss_mb: float | None
    model_rss_mb: float | None
    simulated: bool
    notes: list[str]


class Overlay(_Strict):
    """The test images whose maps differ most from fp32's (index in the test split, file, max |diff|)."""

    indices: list[int]
    files: list[str]
    max_abs_diff: list[float]


class Proxy(_Strict):
    """The proxy AD metric of a quantized cell (image/pixel AUROC of synthetic anomalies on the search set).

    Present when the build ran a search stage (``ptq.search.proxy``, map-aware calibration or mixed
    precision); ``drop`` is the larger of the two AUROC drops from ``fp32``. ``quantized`` also has
    the map distortion against fp32 (``loss``, ``map_rel_rms``, ``order_flips``:
    :class:`qtool.proxy.MapDistortion` at its default weights).
    """

    fp32: dict[str, float | None]
    quantized: dict[str, float | None]
    drop: float | None


class Fallback(_Strict):
    """Mixed precision of a cell: the layers kept float within the budget (of ``criterion``) and their cost.

    ``latency_cost_ms``: the model with them float minus the all-quantized one, timed on the 8-bit stand-in
    (``latency_stand_in``) when the cell's width is emulated; ``float_macs_share``: their share of the MACs.
    """

    budget: float
    criterion: str = "separation"  # reports written before the criterion existed (read_report) were separation
    rank: str = "sensitivity"  # the order layers went float in (qtool.mixed_precision.RANKS); before it existed
    layers: list[str]
    precision: str
    latency_cost_ms: float | None
    latency_stand_in: bool = False  # reports written before the stand-in timed the emulated widths' own graph
    float_macs_share: float | None = None  # None in reports written before it was counted


class ProxyCorrelation(_Strict):
    """Spearman rank correlation, across the quantized cells with a proxy, of proxy and test metric."""

    image_auroc: float | None
    pixel_auroc: float | None
    n_cells: int


class CellEntry(_Strict):
    """One cell: its axis values, status, and (when ok) everything measured."""

    id: str
    label: str
    model: str
    precision: str
    method: str | None
    calibrator: str | None
    calib_source: str | None
    part: str | None
    target: str | None
    mixed_precision: float | None = None
    bias_correction: bool | None = None
    status: Literal["ok", "failed", "skipped"]
    cached: bool
    error: str | None = None
    key: str | None = None
    build_key: str | None = None
    entry: str | None = None
    reference_entry: str | None = None
    metrics: Metrics | None = None
    per_category: dict[str, CategoryMetrics] | None = None
    deltas: dict[str, dict[str, float | None]] | None = None
    threshold: float | None = None
    fp32_threshold: float | None = None
    fidelity: Fidelity | None = None
    latency: Latency | None = None
    model_size_bytes: int | None = None
    sqnr_db: dict[str, float | None] | None = None
    stage_seconds: dict[str, float] | None = None
    overlay: Overlay | None = None
    proxy: Proxy | None = None
    fallback: Fallback | None = None
    pareto: bool = False


class ModelEntry(_Strict):
    """One value of the model axis as resolved: files, hashes, where it came from."""

    label: str
    onnx: str
    checkpoint: str | None
    onnx_sha256: str
    checkpoint_sha256: str | None
    origin: Literal["file", "exported", "trained"]
    train_seconds: float | None
    cached: bool


class SweepReport(_Strict):
    """The whole report of one ``qtool sweep`` run."""

    schema_id: Literal["qtool.sweep/1"] = Field(REPORT_SCHEMA, alias="schema")
    qtool: str
    recipe: str
    created: str
    command: list[str]
    axes: dict[str, list[str]]
    pareto_metric: str
    categories: list[str]
    models: list[ModelEntry]
    cells: list[CellEntry]
    notes: list[str]
    cache_dir: str
    machine: dict[str, Any]
    stage_seconds: dict[str, float]
    wall_seconds: float
    proxy_correlation: ProxyCorrelation | None = None


def validate_report(report: dict[str, Any]) -> dict[str, Any]:
    """Check ``report`` against the schema; return it as plain JSON data (aliases as keys).

    Raises:
        pydantic.ValidationError: the report does not follow the schema (a bug, not user input).
    """
    return SweepReport.model_validate(report).model_dump(mode="json", by_alias=True)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json``."""
    return SweepReport.model_json_schema(by_alias=True)
