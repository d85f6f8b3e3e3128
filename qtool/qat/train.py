"""Quantization-aware distillation: the student learns under fake quantization with its model's own KD loss.

The loss is ``model.training_loss`` on the QAT model, whose teacher/student are the fake-quantized
GraphModules: a quantized teacher gives fake-quantized targets (its ranges stay as calibrated), a
float teacher gives float ones; DCAM, when the model has it, trains as in ``qtool train``. Activation
and weight scales are frozen for the last ``freeze_epochs`` epochs (observers stop, LSQ scales stop). The
learning rates follow ``qat.lr_schedule`` after ``qat.warmup_epochs`` of linear warm-up (:mod:`qtool.qat.schedule`).
``qat.keep`` chooses the state restored at the end (:mod:`qtool.qat.keep`: the last epoch's, the lowest holdout
loss among the start and every epoch, or that among the states whose check-set proxy AUROCs did not fall).
With ``qat.average_epochs`` K > 1 each epoch's state (evaluated, offered to the keep rule, exported) is the mean
of the trained parameters over the last K epoch ends (:mod:`qtool.qat.average`); training goes on from the raw one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from qtool.qat.average import TailAverage
from qtool.qat.insert import QatModel, grow_for_biases
from qtool.qat.keep import KEEP_RULES, Kept, holdout_row
from qtool.qat.schedule import StepSchedule, step_schedule
from qtool.recipe import QatConfig
from qtool.train import train_epoch

log = logging.getLogger(__name__)
Progress = Callable[[int], None] | None
EpochHook = Callable[[int, list[dict[str, float]], "QatOptimizer"], None] | None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients (its ``trainable_parameters()`` when it has one)."""
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters()
    return [p for p in params if p.requires_grad]


class QatOptimizer:
    """The recipe's optimizer over the trained weights, plus Adam (lr ``qat.scale_lr``) over the log-scales.

    Adam normalises the scale gradients, so a step changes a scale by about ``scale_lr`` relative,
    whatever its magnitude (a 1e-3 weight scale and a 10.0 activation scale alike). With a schedule
    (:meth:`set_schedule`) each step first sets every learning rate to its base value times the step's factor.
    ``average_epochs`` > 1 keeps a :class:`~qtool.qat.average.TailAverage` of every parameter of both over that
    many epoch ends (:meth:`end_epoch`, :meth:`averaged`).
    """

    def __init__(self, weights: torch.optim.Optimizer | None, scales: torch.optim.Optimizer | None,
                 after_step: Callable[[], Any] | None = None, average_epochs: int = 1) -> None:
        self.weights, self.scales, self.after_step = weights, scales, after_step
        optimizers = [opt for opt in (weights, scales) if opt is not None]
        self.base_lrs = [[g["lr"] for g in opt.param_groups] if opt is not None else [] for opt in (weights, scales)]
        self.schedule: StepSchedule | None = None
        self.steps = 0
        self.average = (TailAverage([p for opt in optimizers for g in opt.param_groups for p in g["params"]],
                                    average_epochs) if average_epochs > 1 else None)

    def set_schedule(self, schedule: StepSchedule, steps_done: int = 0) -> None:
        """Scale the learning rates per step by ``schedule``, the next step being ``steps_done``."""
        self.schedule, self.steps = schedule, steps_done

    def lr_factor(self) -> float:
        """The factor of the last step taken (of step 0 before any; 1.0 without a schedule)."""
        return self.schedule.factor(max(0, self.steps - 1)) if self.schedule is not None else 1.0

    def end_epoch(self) -> None:
        """Add the state at an epoch's end to the tail average (nothing without one)."""
        if self.average is not None:
            self.average.push()

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The tail average in the parameters inside the block (then ``after_step``'s bias floor); raw after it.

        Without an average the block sees the raw state.
        """
        with self.average.applied() if self.average is not None else nullcontext():
            if self.average is not None and self.after_step is not None:
                self.after_step()
            yield

    def apply_average(self) -> None:
        """Load the tail average into the parameters for good (then ``after_step``); nothing without one."""
        if self.average is not None:
            self.average.apply()
            if self.after_step is not None:
                self.after_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of both."""
        for opt in (self.weights, self.scales):
            if opt is not None:
                opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One step of both at the schedule's learning rates, then ``after_step`` (keeps the int32 biases in range)."""
        factor = self.schedule.factor(self.steps) if self.schedule is not None else 1.0
        for opt, bases in zip((self.weights, self.scales), self.base_lrs, strict=True):
            if opt is not None:
                for group, base in zip(opt.param_groups, bases, strict=True):
                    group["lr"] = base * factor
                opt.step()
        self.steps += 1
        if self.after_step is not None:
            self.after_step()

    def state_dict(self) -> dict:
        """Both states and the tail average's (for checkpoints)."""
        return {"weights": self.weights.state_dict() if self.weights else None,
                "scales": self.scales.state_dict() if self.scales else None,
                "average": self.average.state_dict() if self.average is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore both states."""
        if self.weights is not None and state.get("weights") is not None:
            self.weights.load_state_dict(state["weights"])
        if self.scales is not None and state.get("scales") is not None:
            self.scales.load_state_dict(state["scales"])
        if self.average is not None and state.get("average") is not None:
            self.average.load_state_dict(state["average"])


def build_optimizer(qm: QatModel, cfg: QatConfig, parameters: list[nn.Parameter] | None = None) -> QatOptimizer:
    """The recipe's optimizer (``qat.optimizer``, ``lr``, ``momentum``, ``weight_decay``) and the scales' Adam.

    ``parameters``: what the recipe's optimizer trains (default: the model's trainable parameters but the
    scales); none (``qat.learn: ranges`` on a model without biases) leaves only the scales' Adam.
    """
    from qtool.train import OPTIMIZERS

    scales = qm.quantizer_parameters()
    ids = {id(s) for s in scales}
    weights = [p for p in (trainable_parameters(qm.model) if parameters is None else parameters) if id(p) not in ids]
    scale_opt = torch.optim.Adam(scales, lr=cfg.scale_lr) if scales else None
    return QatOptimizer(OPTIMIZERS.get(cfg.optimizer)(weights, cfg) if weights else None, scale_opt,
                        after_step=lambda: grow_for_biases(qm), average_epochs=cfg.average_epochs)


def qat_train(qm: QatModel, images: torch.Tensor, cfg: QatConfig, holdout: torch.Tensor | None = None,
              seed: int = 0, on_epoch: EpochHook = None, progress: Progress = None,
              optimizer: QatOptimizer | None = None, start_epoch: int = 0,
              objective: nn.Module | None = None, check: Any = None) -> list[dict[str, float]]:
    """Fine-tune ``qm`` for ``cfg.epochs`` epochs on ``images`` (N,3,S,S): normals, or the loss's own images.

    Args:
        qm: the QAT model (from :func:`qtool.qat.insert.prepare_qat`).
        images: preprocessed training images.
        cfg: the recipe's qat section.
        holdout: held-out normals for a validation loss per epoch (and before training).
        seed: shuffling seed.
        on_epoch: called after each epoch with (epoch, history, optimizer), e.g. to checkpoint.
        progress: called with the number of images of each step.
        optimizer: an optimizer to continue with (default: a new one from ``cfg``).
        start_epoch: epochs already done (the shuffling stream skips them).
        objective: the module whose ``training_loss`` is minimised (default: ``qm.model``'s KD loss;
            see :mod:`qtool.qat.objectives`).
        check: the holdout's masks and labels (a :class:`qtool.search.SearchSet` of the same images): each
            holdout row then also has the proxy image and pixel AUROC (what ``keep: guarded`` judges on).

    Returns:
        The history: one row per epoch (loss terms, holdout loss and proxy AUROCs, seconds, frozen), after a
        row ``epoch 0`` with those of the fake-quantized model before training; the row of the state kept
        (``cfg.keep``) has ``kept: True``.

    Raises:
        QatError: the model has no ``training_loss``; a ``keep`` rule without the holdout (or check set) it needs.
    """
    from qtool.qat.trace import QatError

    model = qm.model if objective is None else objective
    if not hasattr(model, "training_loss"):
        raise QatError(f"{type(model).__name__} has no training_loss; QAT needs a KD model")
    has_holdout = holdout is not None and len(holdout) > 0
    rule = KEEP_RULES.get(cfg.keep)
    if rule.needs and not (has_holdout and start_epoch == 0 and (rule.needs != "check" or check is not None)):
        raise QatError(f"qat.keep {cfg.keep} needs a holdout loss from the start (a holdout split, or with qat.loss "
                       "map ptq.search.check_normals > 0)"
                       + (" and the check set's masks" if rule.needs == "check" else "")
                       + " and a run that starts at epoch 0")
    opt = optimizer or build_optimizer(qm, cfg)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    opt.set_schedule(step_schedule(cfg.lr_schedule, cfg.epochs, steps_per_epoch, cfg.warmup_epochs),
                     start_epoch * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start_epoch):
        torch.randperm(len(images), generator=gen)
    history: list[dict[str, float]] = []
    if has_holdout and start_epoch == 0:
        history.append({"epoch": 0, **holdout_row(model, holdout, cfg.batch_size, check), "seconds": 0.0})
    best = Kept(qm.model, rule, history[0]) if rule.better is not None else None
    for epoch in range(start_epoch, cfg.epochs):
        frozen = epoch >= cfg.epochs - cfg.freeze_epochs
        qm.set_frozen(frozen)
        t0 = time.perf_counter()
        qm.train_mode()
        order = torch.randperm(len(images), generator=gen)
        row: dict[str, float] = {"epoch": epoch + 1,
                                 **train_epoch(model, images, order, cfg.batch_size, opt, progress)}
        row["seconds"] = time.perf_counter() - t0
        row["frozen"] = frozen
        row["lr_factor"] = opt.lr_factor()
        opt.end_epoch()
        with opt.averaged():  # the state this epoch offers: the tail average (the raw state without one)
            if holdout is not None and len(holdout):
                row.update(holdout_row(model, holdout, cfg.batch_size, check))
            if best is not None:
                best.offer(row)
        history.append(row)
        log.info("qat epoch %d %s", epoch + 1, row)
        if on_epoch is not None:  # with the raw state: a checkpoint resumes training from it
            on_epoch(epoch + 1, history, opt)
    qm.set_frozen(True)
    if best is not None:
        best.restore()
    else:
        opt.apply_average()
    if history:
        (best.row if best is not None else history[-1])["kept"] = True
    model.eval()
    return history
