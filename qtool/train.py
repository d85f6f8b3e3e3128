"""KD training loop: unified (one model, categories mixed in each batch) or one model per category.

Checkpoints every ``train.checkpoint_every`` epochs to ``last.pt`` (with optimizer state and the
learning curve) and resumes from it when the same recipe is run again into the same folder.
With ``train.proxy_every`` the curve also records a label-free proxy (image and pixel AUROC of
synthetic anomalies made from the held-out normals); ``train.select=proxy`` keeps the best such
epoch (``best.pt``) as ``model.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtool.artifacts import write_json
from qtool.data import ImageTransform, Sample, Splits
from qtool.errors import ModelError
from qtool.evaluate import TorchPredictor
from qtool.models import MODELS, KDModel, build_model, save_checkpoint
from qtool.models.checkpoint import read_checkpoint
from qtool.proxy import SELECTION_RULE, proxy_rank, separation
from qtool.recipe import Recipe, TrainConfig
from qtool.registry import Registry
from qtool.search import SearchSet, search_set_from_arrays

log = logging.getLogger(__name__)
Progress = Callable[[int], None] | None

OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.add(
    "sgd", lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
)
OPTIMIZERS.add(
    "adam",
    lambda params, c: torch.optim.Adam(params, lr=c.lr, betas=(0.5, 0.999), weight_decay=c.weight_decay),
)


@dataclass
class TrainResult:
    """Where a trained model landed and how training went."""

    checkpoint: Path
    category: str
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    selected_epoch: int | None = None  # the best-proxy epoch model.pt holds (train.select=proxy), else None


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of the sections that determine a training run (resume only continues an identical run).

    Left out: the epoch count (a run may be extended), the validation settings (``proxy_every``,
    ``select``: they read the model, never change its trajectory) and the model's map-only options
    (``MAP_OPTIONS``: they change the anomaly map, not what is trained, so a trained run can be
    re-mapped by resuming it).
    """
    model = recipe.model.model_dump(mode="json")
    map_only = getattr(MODELS.get(recipe.model.name), "MAP_OPTIONS", ())
    model["options"] = {k: v for k, v in model["options"].items() if k not in map_only}
    keys = {"seed": recipe.seed, "data": recipe.data.model_dump(mode="json"), "model": model,
            "train": recipe.train.model_dump(mode="json", exclude={"epochs", "num_workers", "threads",
                                                                    "proxy_every", "select"})}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def load_images(samples: list[Sample], transform: ImageTransform, progress: Progress = None) -> torch.Tensor:
    """Decode and preprocess ``samples`` once into one float tensor (N,3,S,S)."""
    out = torch.empty((len(samples), 3, transform.size, transform.size), dtype=torch.float32)
    for i, s in enumerate(samples):
        out[i] = torch.from_numpy(transform.image(s.path))
        if progress:
            progress(1)
    return out


@torch.no_grad()
def mean_loss(model: torch.nn.Module, images: Any, batch_size: int) -> float:
    """Mean ``training_loss`` of ``model`` (in eval mode) over ``images`` (a tensor, or anything batched like one)."""
    model.eval()
    losses = [float(model.training_loss(images[i : i + batch_size])["loss"]) * len(images[i : i + batch_size])
              for i in range(0, len(images), batch_size)]
    return sum(losses) / max(1, len(images))


def proxy_metrics(model: KDModel, search: SearchSet, batch_size: int) -> dict[str, float]:
    """``{"proxy_image_auroc", "proxy_pixel_auroc"}`` of ``model`` (eval mode) on a search set."""
    predict = TorchPredictor(model)
    maps, scores = zip(*(predict(batch) for batch in search.batches(batch_size)), strict=True)
    sep = separation(np.concatenate(maps), np.concatenate(scores), search.masks, search.labels)
    return {f"proxy_{k}": v for k, v in sep.items()}


class _Best:
    """The best-proxy epoch so far (its learning-curve row); its weights are ``best.pt``, which a resumed run keeps."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.row = path, None
        if path.is_file():
            extra = read_checkpoint(path)["extra"]
            if extra.get("fingerprint") == fingerprint:
                self.row = extra["row"]

    def offer(self, model: KDModel, row: dict[str, float], recipe: Recipe, fingerprint: str) -> None:
        """Keep ``model`` in ``best.pt`` if its ``row`` ranks above the best so far (ties keep the earlier)."""
        if self.row is None or proxy_rank(row) > proxy_rank(self.row):
            self.row = row
            save_checkpoint(model, self.path, recipe, {"row": row, "fingerprint": fingerprint})


def _resume(path: Path, fingerprint: str, model: torch.nn.Module,
            opt: torch.optim.Optimizer) -> tuple[int, list, dict]:
    if not path.is_file():
        return 0, [], {}
    payload = read_checkpoint(path)
    extra = payload["extra"]
    if extra.get("fingerprint") != fingerprint:
        raise ModelError(f"{path} belongs to a different recipe; use a new output folder or delete it")
    model.load_state_dict(payload["state_dict"])
    opt.load_state_dict(extra["optimizer"])
    log.info("resumed %s at epoch %d", path, extra["epoch"])
    return int(extra["epoch"]), list(extra["history"]), dict(extra.get("prepare", {}))


def train_epoch(model: torch.nn.Module, images: torch.Tensor, order: torch.Tensor, batch_size: int,
                opt: torch.optim.Optimizer, progress: Progress = None) -> dict[str, float]:
    """One pass over ``images[order]`` in batches of the model's ``training_loss``.

    Returns:
        ``{"train_<term>": mean over images}`` for every loss term the model reports.
    """
    parts: dict[str, float] = {}
    seen = 0
    for i in range(0, len(order), batch_size):
        batch = images[order[i : i + batch_size]]
        terms = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) * len(batch)
        seen += len(batch)
        if progress:
            progress(len(batch))
    return {f"train_{k}": v / max(1, seen) for k, v in parts.items()}


def fit(recipe: Recipe, train: list[Sample], holdout: list[Sample], out_dir: Path, category: str,
        progress: Progress = None) -> TrainResult:
    """Train one model on ``train`` normals; holdout normals give the validation loss curve.

    Returns:
        The final checkpoint ``out_dir/model.pt`` and the learning curve.
    Raises:
        ModelError: a ``last.pt`` from another recipe is in the way; ``train.proxy_every`` without
            at least 2 held-out normals (checked before anything is written).
    """
    cfg: TrainConfig = recipe.train
    _check_holdout(cfg, holdout, category)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = ImageTransform(recipe.data)
    model = build_model(recipe.model, recipe.data.image_size)
    opt = OPTIMIZERS.get(cfg.optimizer)(list(model.trainable_parameters()), cfg)
    fingerprint = recipe_fingerprint(recipe)
    start, history, prepared = _resume(out_dir / "last.pt", fingerprint, model, opt)
    images = load_images(train, transform)
    val_images = load_images(holdout, transform) if holdout else None
    search = _proxy_set(recipe, val_images)
    best = _Best(out_dir / "best.pt", fingerprint) if cfg.select == "proxy" else None
    if start == 0:  # a model-specific stage before KD (US: distil the descriptor teacher); resumed runs have it
        prepared = model.prepare_training(images, cfg, recipe.seed)
        if prepared:
            log.info("prepared %s", prepared)
    gen = torch.Generator().manual_seed(recipe.seed)
    for _ in range(start):  # keep the shuffling stream identical to an uninterrupted run
        torch.randperm(len(images), generator=gen)
    t_total = sum(h["seconds"] for h in history)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(images), generator=gen)
        row = {"epoch": epoch + 1, **train_epoch(model, images, order, cfg.batch_size, opt, progress)}
        if val_images is not None:
            row["holdout_loss"] = mean_loss(model, val_images, cfg.batch_size)
        if search is not None and ((epoch + 1) % cfg.proxy_every == 0 or epoch + 1 == cfg.epochs):
            row.update(proxy_metrics(model, search, cfg.batch_size))
            if best is not None:
                best.offer(model, row, recipe, fingerprint)
        row["seconds"] = time.perf_counter() - t0
        t_total += row["seconds"]
        history.append(row)
        log.info("epoch %d %s", epoch + 1, row)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            extra = {"epoch": epoch + 1, "history": history, "optimizer": opt.state_dict(),
                     "fingerprint": fingerprint, "category": category, "prepare": prepared}
            save_checkpoint(model, out_dir / "last.pt", recipe, extra)
    selected = {}
    if best is not None and best.row is not None:
        model.load_state_dict(read_checkpoint(best.path)["state_dict"])
        selected = {"selected_epoch": best.row["epoch"], "selected_by": SELECTION_RULE}
        log.info("selected epoch %d by the proxy %s", best.row["epoch"], proxy_rank(best.row))
    # model-specific statistics of normal data (US: map normalisation); holdout normals when there are any
    finished = model.finish_training(val_images if val_images is not None else images, cfg)
    final = save_checkpoint(model.eval(), out_dir / "model.pt", recipe,
                            {"epoch": cfg.epochs, "history": history, "fingerprint": fingerprint,
                             "category": category, "train_seconds": t_total, "prepare": prepared,
                             "finish": finished, **selected})
    write_json(out_dir / "history.json", history)
    return TrainResult(final, category, cfg.epochs, t_total, history, selected.get("selected_epoch"))


def _proxy_set(recipe: Recipe, val_images: torch.Tensor | None) -> SearchSet | None:
    """The held-out normals plus a synthetic anomaly from each, when ``train.proxy_every`` asks for it."""
    if not recipe.train.proxy_every or val_images is None:
        return None
    cfg = recipe.ptq.search
    return search_set_from_arrays(val_images.numpy(), cfg.kinds, cfg.seed)


def _check_holdout(cfg: TrainConfig, holdout: list[Sample], category: str) -> None:
    if cfg.proxy_every and len(holdout) < 2:
        raise ModelError(f"train.proxy_every needs at least 2 held-out normals, the split has {len(holdout)} "
                         f"for {category!r} (raise data.holdout_fraction)")


def check_splits(recipe: Recipe, splits: Splits) -> None:
    """Refuse, before anything is written, a split the recipe cannot train on (the proxy's held-out normals).

    Raises:
        ModelError: ``train.proxy_every`` and a model (unified, or one category) with under 2 held-out normals.
    """
    if recipe.train.mode == "unified":
        _check_holdout(recipe.train, splits.holdout, "all")
    else:
        for cat in splits.categories():
            _check_holdout(recipe.train, splits.filter(cat).holdout, cat)


def train(recipe: Recipe, splits: Splits, out_dir: Path, progress: Progress = None) -> list[TrainResult]:
    """Train per ``recipe.train.mode``: one unified model, or one model per category in ``out_dir/<cat>``."""
    out_dir = Path(out_dir)
    if recipe.train.mode == "unified":
        return [fit(recipe, splits.train, splits.holdout, out_dir, "all", progress)]
    results = []
    for cat in splits.categories():
        sub = splits.filter(cat)
        results.append(fit(recipe, sub.train, sub.holdout, out_dir / cat, cat, progress))
    return results
