"""QAT learning-rate schedules (``qat.lr_schedule``, ``qat.warmup_epochs``): the factor per step, every learning rate
following it, a resumed run continuing it, and bad names refused."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers.kd_run import shared
from test_qat_objectives import RANGES, _clipped, _setup

from qtool.cli import main
from qtool.errors import RegistryError
from qtool.qat.insert import prepare_qat
from qtool.qat.objectives import LEARN_SETS, MapDistillation, select_parameters
from qtool.qat.schedule import step_schedule
from qtool.qat.train import QatOptimizer, build_optimizer, qat_train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_constant_without_warmup_is_one_at_every_step():
    s = step_schedule("constant", epochs=3, steps_per_epoch=5)
    assert [s.factor(i) for i in range(15)] == [1.0] * 15


def test_cosine_warms_up_linearly_then_decays_towards_zero():
    s = step_schedule("cosine", epochs=4, steps_per_epoch=5, warmup_epochs=1)
    f = [s.factor(i) for i in range(20)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # warm-up: (step + 1) / 5, ending at the base lr
    assert f[5] == 1.0 and all(a > b for a, b in zip(f[5:], f[6:], strict=False))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15))) and 0 < f[-1] < 0.02
    assert step_schedule("cosine", 2, 5, warmup_epochs=9).warmup_steps == 10  # never longer than the run
    with pytest.raises(RegistryError, match="unknown qat.lr_schedule 'step'; available: constant, cosine"):
        step_schedule("step", 2, 5)


def test_every_learning_rate_of_both_optimizers_follows_the_schedule():
    w, s = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    seen = []
    opt = QatOptimizer(torch.optim.SGD([w], lr=0.1), torch.optim.Adam([s], lr=0.01),
                       after_step=lambda: seen.append((opt.weights.param_groups[0]["lr"],
                                                       opt.scales.param_groups[0]["lr"])))
    schedule = step_schedule("cosine", epochs=2, steps_per_epoch=4, warmup_epochs=0.5)
    opt.set_schedule(schedule, steps_done=1)  # a run resumed after one step
    for _ in range(7):
        (w.sum() + s.sum()).backward()
        opt.step()
    want = [schedule.factor(i) for i in range(1, 8)]
    assert seen == [pytest.approx((0.1 * f, 0.01 * f)) for f in want]
    assert opt.lr_factor() == schedule.factor(7)


def _run(images, model, graph, spec, ranges, cfg, start_epoch=0, resume_from=None, save_after=None):
    """A map-distillation run from clipped ranges; ``resume_from``: a state saved by a run with ``save_after``
    (the model and optimizer after that epoch, returned in the third item)."""
    qm = prepare_qat(model, graph, spec, _clipped(ranges), learnable=True, ranges_only=True)
    opt = build_optimizer(qm, cfg, select_parameters(qm, LEARN_SETS.get("ranges")))
    if resume_from is not None:
        qm.model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optimizer"])
    saved = {}

    def on_epoch(epoch, history, optimizer):
        if epoch == save_after:
            saved.update(model={k: v.clone() for k, v in qm.model.state_dict().items()},
                         optimizer=copy.deepcopy(optimizer.state_dict()))  # not live tensors

    history = qat_train(qm, images, cfg, None, optimizer=opt, objective=MapDistillation(qm.model, model, images[:8]),
                        start_epoch=start_epoch, on_epoch=on_epoch)
    return qm, history, saved


def test_a_cosine_run_records_its_factors_and_a_resumed_run_continues_the_same_schedule(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    cfg = RANGES.model_copy(update={"epochs": 3, "lr_schedule": "cosine", "warmup_epochs": 1.0})
    qm, history, saved = _run(images, model, graph, spec, ranges, cfg, save_after=1)
    steps = len(images) // cfg.batch_size
    schedule = step_schedule("cosine", 3, steps, 1.0)
    assert [h["lr_factor"] for h in history] == [schedule.factor(e * steps - 1) for e in (1, 2, 3)]
    assert history[0]["lr_factor"] == 1.0 and history[-1]["lr_factor"] < 0.3

    resumed, rest, _ = _run(images, model, graph, spec, ranges, cfg, start_epoch=1, resume_from=saved)
    assert [h["train_loss"] for h in rest] == pytest.approx([h["train_loss"] for h in history[1:]], rel=1e-6)
    for (k, a), b in zip(qm.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)

    _, constant, _ = _run(images, model, graph, spec, ranges, RANGES.model_copy(update={"epochs": 3}))
    assert [h["lr_factor"] for h in constant] == [1.0, 1.0, 1.0]
    assert constant[0]["train_loss"] != pytest.approx(history[0]["train_loss"], rel=1e-4)  # the warm-up's smaller steps


def refused_qat(tmp_path_factory, tmp_path, setting: list[str], key: str) -> None:
    """``qtool qat`` with a bad ``setting``: exit 2, one line naming ``key``, no run folder."""
    kd = shared(tmp_path_factory)
    out = tmp_path / "qat"
    res = CliRunner().invoke(main, ["qat", "--model", str(kd.checkpoint), "--recipe", str(kd.recipe_file),
                                    "--out", str(out), *setting])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and key in res.stderr, res.stderr
    assert not out.exists()


@pytest.mark.parametrize("setting", [["--lr-schedule", "step"], ["--set", "qat.lr_schedule=step"],
                                     ["--set", "qat.warmup_epochs=-1"]])
def test_a_bad_schedule_is_a_one_line_error_and_no_folder(tmp_path_factory, tmp_path, setting):
    refused_qat(tmp_path_factory, tmp_path, setting,
                "qat.warmup_epochs" if "warmup" in setting[1] else "qat.lr_schedule")


def test_qat_cli_runs_a_cosine_schedule_and_records_it(tmp_path_factory, tmp_path):
    from test_qat_start import _bias_corrected_ptq, _qat

    kd = shared(tmp_path_factory)
    _, ptq_dir = _bias_corrected_ptq(tmp_path_factory)
    res = _qat(kd, tmp_path / "qat", ptq_dir, "--epochs", "2", "--lr-schedule", "cosine",
               "--set", "qat.warmup_epochs=1")
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    report = json.loads((tmp_path / "qat" / "report.json").read_text())
    assert report["qat"]["lr_schedule"] == "cosine" and report["qat"]["warmup_epochs"] == 1.0
    steps = -(-report["train_images"] // 4)  # batch size 4 (MAP_RANGES)
    schedule = step_schedule("cosine", 2, steps, 1.0)
    assert [h["lr_factor"] for h in report["history"] if h["epoch"] > 0] == [schedule.factor(steps - 1),
                                                                             schedule.factor(2 * steps - 1)]
    assert schedule.factor(steps - 1) == 1.0 > schedule.factor(2 * steps - 1)  # warmed up, then decayed
