"""What a QAT run learns (``qat.learn``) and what it learns from (``qat.loss``): two registries.

``qat.learn``:

* ``student`` (default): the student's weights and its quantizers' scales; the teacher and its ranges
  stay as calibrated (quantization-aware distillation).
* ``ranges``: no weight changes. Every quantizer's scale (teacher and student, activations and
  per-channel weights) and the bias of every quantized layer is learned: post-training range
  learning, the end-to-end counterpart of a calibrator plus bias correction.

``qat.loss``:

* ``kd`` (default): the model's own KD loss on the training split.
* ``map``: map distillation. The fake-quantized model's anomaly map and image score against the fp32
  model's on the same images (:class:`MapDistillation`), trained on the search set (the normal
  pool's normals plus synthetic anomalies made from them; never the test split), validated on the
  check set when ``ptq.search.check_normals`` > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qtool.qat.insert import QatModel
from qtool.registry import Registry


@dataclass(frozen=True)
class LearnSet:
    """Which quantizers and parameters a QAT run trains.

    ``ranges_only``: no weight is trained and the quantizers of every part learn (else the frozen
    teacher's keep their ranges); see :func:`qtool.qat.insert.prepare_qat`.
    ``parameters(qm)``: the parameters besides the scales the optimizer updates; the others get
    ``requires_grad`` off.
    """

    ranges_only: bool
    parameters: Callable[[QatModel], list[nn.Parameter]]


def _student_parameters(qm: QatModel) -> list[nn.Parameter]:
    from qtool.qat.train import trainable_parameters

    scales = {id(p) for p in qm.quantizer_parameters()}
    return [p for p in trainable_parameters(qm.model) if id(p) not in scales]


def quantized_biases(qm: QatModel) -> list[nn.Parameter]:
    """The bias of every quantized layer that has one in the ONNX graph (one entry per parameter)."""
    out: dict[int, nn.Parameter] = {}
    for w, site in qm.smap.weights.items():
        bias = qm.latent_bias(w)
        if site.bias is not None and isinstance(bias, nn.Parameter):
            out.setdefault(id(bias), bias)
    return list(out.values())


LEARN_SETS: Registry[LearnSet] = Registry("qat.learn")
LEARN_SETS.add("student", LearnSet(ranges_only=False, parameters=_student_parameters))
LEARN_SETS.add("ranges", LearnSet(ranges_only=True, parameters=quantized_biases))


def select_parameters(qm: QatModel, learn: LearnSet) -> list[nn.Parameter]:
    """Turn gradients on for ``learn``'s parameters and the scales only; return ``learn``'s parameters."""
    chosen = learn.parameters(qm)
    keep = {id(p) for p in chosen} | {id(p) for p in qm.quantizer_parameters()}
    for p in qm.model.parameters():
        p.requires_grad_(id(p) in keep)
    return chosen


def _relative(err: torch.Tensor, ref: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squared error over sum of squared reference (over ``where`` when given); 0 where empty."""
    if where is not None:
        err, ref = err[where], ref[where]
    den = (ref**2).sum()
    return err.sum() / den if den > 0 else err.sum() * 0.0


@dataclass(frozen=True)
class Targets:
    """Images with the fp32 model's anomaly map and score of each, computed once.

    Indexed like a tensor (an index tensor or a slice picks the same rows of all three), so the
    training loop batches it as it batches images, and each step reads its targets instead of
    running the fp32 model again.
    """

    images: torch.Tensor
    maps: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Any) -> Targets:
        return Targets(self.images[index], self.maps[index], self.scores[index])


@torch.no_grad()
def fp32_targets(reference: nn.Module, images: torch.Tensor, batch_size: int) -> Targets:
    """``images`` with ``reference``'s (map, score) of each, run in eval mode in batches of ``batch_size``."""
    reference.eval()
    outs = [reference(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if not outs:
        raise ValueError("no images to compute fp32 targets of")
    return Targets(images, torch.cat([m for m, _ in outs]), torch.cat([s for _, s in outs]))


class MapDistillation(nn.Module):
    """The quantized model's anomaly map and score against the fp32 model's on the same images.

    ``loss = map + tail + score``, each a relative squared error (sum of squared differences over the
    fp32 values' sum of squares): over all map pixels, over the pixels above the ``tail_quantile`` of
    the fp32 maps of ``normals`` (where detections are decided), and over the image scores.

    The fp32 model is kept outside the module tree, so ``train()`` on this module never moves it out
    of eval mode. Its outputs are computed once per image with :meth:`targets`; a batch of plain
    images still works (the fp32 model then runs on it).
    """

    def __init__(self, quantized: nn.Module, reference: nn.Module, normals: torch.Tensor | Targets,
                 tail_quantile: float = 0.99, batch_size: int = 8) -> None:
        super().__init__()
        self.quantized = quantized
        self.batch_size = batch_size
        self._reference = (reference.eval(),)
        for p in reference.parameters():
            p.requires_grad_(False)
        maps = (normals if isinstance(normals, Targets) else self.targets(normals)).maps
        flat = maps.flatten().double()
        k = max(1, min(flat.numel(), int(round(tail_quantile * flat.numel()))))
        self.register_buffer("threshold", flat.kthvalue(k).values.float())

    def targets(self, images: torch.Tensor) -> Targets:
        """``images`` with the fp32 model's outputs (see :func:`fp32_targets`)."""
        return fp32_targets(self._reference[0], images, self.batch_size)

    def training_loss(self, x: torch.Tensor | Targets) -> dict[str, torch.Tensor]:
        """``{"loss", "map", "tail", "score"}`` of a batch (see the class docstring)."""
        return self.outputs_and_loss(x)[1]

    def outputs_and_loss(self, x: torch.Tensor | Targets) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                  dict[str, torch.Tensor]]:
        """The quantized model's (map, score) of a batch, and the batch's loss terms (:meth:`training_loss`)."""
        batch = x if isinstance(x, Targets) else self.targets(x)
        ref_map, ref_score = batch.maps, batch.scores
        q_map, q_score = self.quantized(batch.images)
        err = (q_map - ref_map) ** 2
        terms = {"map": _relative(err, ref_map), "tail": _relative(err, ref_map, ref_map > self.threshold),
                 "score": _relative((q_score - ref_score) ** 2, ref_score)}
        return (q_map, q_score), {"loss": terms["map"] + terms["tail"] + terms["score"], **terms}


@dataclass
class QatData:
    """What a QAT loss trains on: the module whose ``training_loss`` is minimised, its images, a holdout.

    ``check``: the holdout's masks and labels, when the holdout is a check set with synthetic anomalies.
    """

    objective: nn.Module
    images: torch.Tensor | Targets
    holdout: torch.Tensor | Targets | None
    description: dict[str, Any] = field(default_factory=dict)
    check: Any = None


@dataclass(frozen=True)
class QatInputs:
    """What a loss builder may use: the QAT model, the fp32 model, the recipe, the data and its transform."""

    qm: QatModel
    reference: nn.Module
    recipe: Any
    splits: Any
    transform: Any


def _kd(inputs: QatInputs) -> QatData:
    from qtool.train import load_images

    splits = inputs.splits
    holdout = load_images(splits.holdout, inputs.transform) if splits.holdout else None
    return QatData(inputs.qm.model, load_images(splits.train, inputs.transform), holdout,
                   {"loss": "kd", "images": "the training split's normals"})


def _map(inputs: QatInputs) -> QatData:
    from qtool.search import build_check_set, build_search_set

    cfg = inputs.recipe.ptq.search
    search = build_search_set(inputs.splits, inputs.transform, cfg)
    batch = inputs.recipe.qat.batch_size
    images = fp32_targets(inputs.reference, torch.from_numpy(search.images), batch)
    objective = MapDistillation(inputs.qm.model, inputs.reference, images[torch.from_numpy(search.labels == 0)],
                                batch_size=batch)
    holdout = check = None
    described = {"loss": "map", "images": {k: v for k, v in search.description.items() if k != "anomaly_records"},
                 "tail_threshold": float(objective.threshold)}
    if cfg.check_normals > 0:
        check = build_check_set(inputs.splits, inputs.transform, cfg)
        holdout = objective.targets(torch.from_numpy(check.images))
        described["holdout"] = {k: v for k, v in check.description.items() if k != "anomaly_records"}
    return QatData(objective, images, holdout, described, check)


@dataclass(frozen=True)
class QatLoss:
    """A ``qat.loss``: how its training data is built and whether it will have a holdout, or a check set.

    ``build`` makes its :class:`QatData`; ``has_holdout(recipe, splits)`` says, before any image is read,
    whether that data will have a holdout (what ``qat.keep: best`` judges on); ``has_check`` whether that holdout
    will be a check set with masks (what ``qat.keep: guarded`` also judges on).
    """

    build: Callable[[QatInputs], QatData]
    has_holdout: Callable[[Any, Any], bool]
    has_check: Callable[[Any, Any], bool] = lambda recipe, splits: False

    def provides(self, needs: str | None, recipe: Any, splits: Any) -> bool:
        """Whether this loss's data will carry what a keep rule ``needs`` (None, "holdout" or "check")."""
        return needs is None or {"holdout": self.has_holdout, "check": self.has_check}[needs](recipe, splits)


def _has_check_set(recipe: Any, splits: Any) -> bool:
    return recipe.ptq.search.check_normals > 0


QAT_LOSSES: Registry[QatLoss] = Registry("qat.loss")
QAT_LOSSES.add("kd", QatLoss(_kd, lambda recipe, splits: bool(splits.holdout)))
QAT_LOSSES.add("map", QatLoss(_map, _has_check_set, _has_check_set))
