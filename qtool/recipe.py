"""Typed recipe schema: one section per pipeline stage, unknown keys rejected.

A recipe is YAML. ``load_recipe`` reads it, applies ``key.path=value`` overrides and
validates; ``dump_recipe`` writes the resolved recipe next to every run's artifacts. The ``sweep``
section's schema is in ``qtool.recipe_sweep``; the sections' common base in ``qtool.recipe_section``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from qtool.errors import RecipeError
from qtool.recipe_section import Section
from qtool.recipe_sweep import SweepConfig

RECIPE_VERSION = 1


class SynthConfig(Section):
    """Synthetic MVTec-layout data generated on the fly (the embedded default)."""

    categories: list[str] = Field(default_factory=lambda: ["grid", "stripes", "disc"])
    n_train: int = Field(40, ge=1)
    n_test_good: int = Field(10, ge=1)
    n_test_defect: int = Field(10, ge=1)
    size: int = Field(128, ge=32)
    seed: int = 0


class DataConfig(Section):
    """Which dataset, how it is split, and how images become tensors."""

    format: Literal["synth", "mvtec", "mtd"] = "synth"
    root: str = "runs/data/synth"
    categories: list[str] | None = None
    image_size: int = Field(256, ge=32)
    resize: Literal["stretch", "pad", "crop", "scale"] = "stretch"
    scale_ref: int = Field(640, ge=1)
    normalize: Literal["imagenet", "per-image"] = "imagenet"
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    synth: SynthConfig = Field(default_factory=SynthConfig)
    include: list[DataConfig] = Field(default_factory=list)


DataConfig.model_rebuild()


class DcamConfig(Section):
    """DCAM attention (training only) and its losses; weights and temperature are our choice."""

    enabled: bool = False
    variant: Literal["channel", "spatial", "both"] = "channel"
    reduction: int = Field(8, ge=1)
    kernel_size: int = Field(7, ge=1)
    kl_weight: float = Field(1.0, ge=0.0)
    cos_weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)


class ModelConfig(Section):
    """Which bundled model and teacher backbone."""

    name: str = "stfpm"
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3])
    dcam: DcamConfig = Field(default_factory=DcamConfig)
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Section):
    """KD training loop settings."""

    mode: Literal["unified", "one-class"] = "unified"
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.4, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    num_workers: int = Field(0, ge=0)
    threads: int = Field(2, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    # Label-free validation: every ``proxy_every`` epochs (and at the last), the image and pixel AUROC of
    # synthetic anomalies made from the held-out normals (kinds and seed of ``ptq.search``); 0: off.
    proxy_every: int = Field(0, ge=0)
    # ``proxy``: model.pt is the epoch with the best proxy (pixel AUROC, ties by image AUROC), not the last.
    select: Literal["last", "proxy"] = "last"

    @model_validator(mode="after")
    def _select_needs_proxy(self) -> TrainConfig:
        if self.select == "proxy" and self.proxy_every == 0:
            raise ValueError("train.select=proxy needs train.proxy_every >= 1")
        return self


class ExportConfig(Section):
    """torch -> ONNX export."""

    opset: int = Field(17, ge=17)
    batch_size: int = Field(1, ge=1)


class CalibDataConfig(Section):
    """Where calibration inputs come from: held-out normals, Gaussian noise, or a mix."""

    source: str = "train"
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    noise_mean: float = 0.0
    noise_std: float = Field(1.0, gt=0.0)
    mix_noise_fraction: float = Field(0.5, ge=0.0, le=1.0)
    allow_anomalies: bool = False
    seed: int = 0
    # > 1: calibrate on that many disjoint windows of the normal pool (train source) and keep the one whose
    # quantized graph distorts the anomaly map least on the search set (qtool.calib_draws)
    draws: int = Field(1, ge=1)

    @field_validator("draws")
    @classmethod
    def _draws_need_the_pool(cls, v: int, info: ValidationInfo) -> int:
        if v > 1 and info.data.get("source") != "train":
            raise ValueError(f"draws {v} need the train source (windows of the normal pool), not "
                             f"{info.data.get('source')!r}")
        return v


class SearchConfig(Section):
    """The search set of map-aware calibration, mixed precision and the proxy AD metric.

    Normal pool images (categories in turn, held-out then training normals; never the test split) plus one
    synthetic anomaly (pasted patch, scratch or noise blob, with its mask) made from each.
    """

    normals: int = Field(32, ge=2)  # the search runs every candidate graph on 2 x normals images
    kinds: list[str] = Field(default_factory=lambda: ["patch", "scratch", "noise"], min_length=1)
    seed: int = 0
    check_normals: int = Field(0, ge=0)  # > 0: map-aware's final check runs on that many other normals (README)
    # the check set's anomaly kinds; null: ``kinds``. Other families than the search set's test whether a move
    # holds beyond the anomalies it was chosen on (map-aware's ``confirm``, README)
    check_kinds: list[str] | None = Field(None, min_length=1)
    proxy: bool = False  # report the proxy (search-set AUROC) of every run, e.g. to correlate it with test AUROC
    time_budget_s: float = Field(600.0, ge=0.0)  # of the mixed-precision sensitivity scan and fallback
    latency_iterations: int = Field(10, ge=1)  # timed runs per model when costing fallbacks


def _known(kind: str, names: list[str], value: str) -> str:
    """``value`` if it is one of a registry's ``names``, else a ValueError naming the allowed ones."""
    if value not in names:
        raise ValueError(f"{kind} {value!r} unknown; allowed: {', '.join(names)}")
    return value


def _registered(value: str, module: str, name: str) -> str:
    """``value`` if registry ``module.name`` (imported only when a recipe sets the field) knows it, else ValueError."""
    registry = getattr(importlib.import_module(module), name)
    return _known(registry.kind, registry.names(), value)


class PtqConfig(Section):
    """Post-training quantization: calibrator, target profile, policy."""

    calib: str = "mse"  # not entropy: the fewest shortfalls in every paired-bootstrap grid (README, "Calibrators")
    calib_options: dict[str, Any] = Field(default_factory=dict)
    calib_data: CalibDataConfig = Field(default_factory=CalibDataConfig)
    target: str = "cpu"
    activation_bits: int = 8
    weight_bits: int = 8
    # the graph input's width (the image's Q/DQ); null: activation_bits. README, input width
    input_bits: int | None = None
    # how each weight's float range is chosen (qtool.graph.weight_ranges): "minmax" (onnxruntime's), "mse"
    weight_range: str = "minmax"
    # how weights are rounded onto that grid (qtool.weight_rounding): "nearest" (each on its own, onnxruntime's)
    # or "gptq" (Conv weights rounded to keep each layer's output on the calibration images: OPTQ)
    weight_rounding: str = "nearest"
    # shift each quantized layer's float bias so its per-channel output mean on the calibration images is
    # fp32's (qtool.bias_correction); only bias values change. On by default: bench/results/bias_correction_*
    bias_correction: bool = True
    # the most MB of activations bias correction keeps between its levels (qtool.graph.frontier); beyond it, it
    # recomputes from the calibration images instead (slower, same result). null: no cap
    bias_correction_max_mb: float | None = Field(2048.0, ge=0.0)
    quantize: Literal["student", "teacher", "both"] = "both"
    part_globs: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "teacher": ["/teacher/*"],
            "student": ["/student/*"],
            "head": ["/head/*"],
        }
    )
    exclude_nodes: list[str] = Field(default_factory=list)
    exclude_op_types: list[str] = Field(default_factory=list)
    quantize_head: bool = False
    # where the float head reads the features it compares: "float" (before their Q/DQ: the anomaly map sees no
    # rounding of its inputs; a producer read in float runs unfused on ONNX Runtime) or "quantized" (the
    # dequantized tensor the next layer reads: onnxruntime's placement). README, head inputs
    head_inputs: Literal["quantized", "float"] = "float"
    strict: bool = False
    input_shape: dict[str, list[int]] = Field(default_factory=dict)  # calibration shape of dynamic inputs
    # None, or the budget of mixed precision: the most sensitive layers stay float (fp16 on TensorRT) until
    # the quantized model is within it
    mixed_precision: float | None = Field(None, ge=0.0, le=1.0)
    # what that budget bounds (qtool.mixed_precision.CRITERIA): "separation" (the largest drop of the proxy
    # AUROC, image or pixel, on the search set, e.g. 0.005) or "distortion" (the share of the all-quantized
    # graph's map distortion on the search set that may remain, e.g. 0.25); README, mixed precision
    mixed_precision_criterion: str = "separation"
    # the order in which layers go float (qtool.mixed_precision.RANKS): "sensitivity" (the fewest layers) or
    # "per-mac" (sensitivity per share of the model's MACs: a cheaper float share)
    mixed_precision_rank: str = "sensitivity"
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("activation_bits", "weight_bits", "input_bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and v not in (4, 6, 8):
            raise ValueError(f"bit width {v} not supported; allowed: 4, 6, 8")
        return v

    @field_validator("weight_range", "weight_rounding", "mixed_precision_criterion", "mixed_precision_rank")
    @classmethod
    def _registry_name(cls, v: str, info: ValidationInfo) -> str:
        return _registered(v, *{"weight_range": ("qtool.graph.weight_ranges", "WEIGHT_RANGES"),
                                "weight_rounding": ("qtool.weight_rounding", "ROUNDINGS"),
                                "mixed_precision_criterion": ("qtool.mixed_precision", "CRITERIA"),
                                "mixed_precision_rank": ("qtool.mixed_precision", "RANKS")}[info.field_name])


class QatConfig(Section):
    """Quantization-aware distillation (``qtool qat``): the student fine-tuned under the PTQ spec's fake-quant."""

    epochs: int = Field(3, ge=0)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.004, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    freeze_epochs: int = Field(1, ge=0)
    # every learning rate's shape over the run's steps (qtool.qat.schedule): constant or cosine (down to 0 at the
    # last step), after warmup_epochs of linear warm-up
    lr_schedule: str = "constant"
    warmup_epochs: float = Field(0.0, ge=0.0)
    # each epoch's state (evaluated, kept, exported) is the mean of the trained parameters over the last
    # average_epochs epoch ends (qtool.qat.average); 1: the epoch's own state
    average_epochs: int = Field(1, ge=1)
    learnable_scales: bool = True
    scale_lr: float = Field(1e-3, gt=0.0)
    observer_momentum: float = Field(0.01, ge=0.0, le=1.0)
    init_from: str | None = None  # a PTQ run folder: start from its graph (ranges and biases)
    # the state exported (qtool.qat.keep): last (the last epoch's), best (the lowest holdout loss among the start
    # and every epoch; needs a holdout: the training split's, or with qat.loss map the check set) or guarded (best
    # among the states whose check-set proxy AUROCs are at least the start's; qat.loss map with a check set)
    keep: str = "last"
    checkpoint_every: int = Field(1, ge=1)
    # also export the QDQ ONNX of the start and of every epoch (snapshots/epoch_NNN.onnx): each state a keep could
    # choose, to evaluate after the run (bench/qat_trajectory.py)
    snapshots: bool = False
    loss: str = "kd"  # kd: the model's KD loss on the training split; map: map distillation on the search set
    learn: str = "student"  # student: its weights and ranges; ranges: every scale and quantized bias, no weights

    @field_validator("loss", "learn", "keep", "lr_schedule")
    @classmethod
    def _registry_name(cls, v: str, info: ValidationInfo) -> str:
        return _registered(v, *{"loss": ("qtool.qat.objectives", "QAT_LOSSES"),
                                "learn": ("qtool.qat.objectives", "LEARN_SETS"),
                                "keep": ("qtool.qat.keep", "KEEP_RULES"),
                                "lr_schedule": ("qtool.qat.schedule", "LR_SCHEDULES")}[info.field_name])


class EvalConfig(Section):
    """Evaluation settings."""

    batch_size: int = Field(8, ge=1)
    max_fpr: float = Field(0.3, gt=0.0, le=1.0)
    threads: int = Field(2, ge=1)


class Recipe(Section):
    """A whole run: every stage reads its own section."""

    version: int = RECIPE_VERSION
    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    ptq: PtqConfig = Field(default_factory=PtqConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    qat: QatConfig = Field(default_factory=QatConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"recipe version {v} not supported; this qtool reads version {RECIPE_VERSION}")
        return v


def _format_validation(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: recipe key {key}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value.

    Raises:
        RecipeError: if the text has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: value is not valid YAML") from e
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``key.path=value`` override set."""
    import copy

    out = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def build_recipe(tree: dict[str, Any] | None, overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe tree (after overrides) into a :class:`Recipe`.

    Raises:
        RecipeError: naming the first bad key path.
    """
    tree = apply_overrides(tree or {}, overrides or [])
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(_format_validation(e, source)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        RecipeError: unreadable file, invalid YAML, or an invalid key (named by its path).
    """
    if path is None:
        return build_recipe({}, overrides, source="defaults")
    p = Path(path)
    try:
        tree = yaml.safe_load(p.read_text())
    except OSError as e:
        raise RecipeError(f"cannot read recipe {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {p}{where}: invalid YAML") from None
    if tree is not None and not isinstance(tree, dict):
        raise RecipeError(f"recipe {p}: top level must be a mapping, got {type(tree).__name__}")
    return build_recipe(tree, overrides, source=str(p))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from qtool.artifacts import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
