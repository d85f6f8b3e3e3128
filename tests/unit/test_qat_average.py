"""Tail averaging of the QAT state (``qat.average_epochs``): the window's mean, the raw trajectory untouched, the
averaged state evaluated, kept and exported, a resumed run keeping its window, and bad values refused."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from helpers.kd_run import shared
from onnx import numpy_helper
from test_qat_objectives import RANGES, _clipped, _setup
from test_qat_schedule import _run, refused_qat

from qtool.qat.average import TailAverage
from qtool.qat.insert import prepare_qat
from qtool.qat.objectives import LEARN_SETS, MapDistillation, select_parameters
from qtool.qat.train import build_optimizer, qat_train
from qtool.train import mean_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_the_window_slides_and_the_raw_values_come_back_bit_for_bit():
    p, q = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor(10.0))
    avg = TailAverage([p, q], window=2)
    for value in (0.0, 3.0, 7.0):  # the first drops out of a window of 2
        with torch.no_grad():
            p.add_(value)
            q.add_(value)
        avg.push()
    torch.testing.assert_close(avg.mean()[0], torch.tensor([7.5, 8.5]))  # mean of (4, 5) and (11, 12)
    raw = p.detach().clone()
    with avg.applied():
        torch.testing.assert_close(p.detach(), torch.tensor([7.5, 8.5]))
        assert q.detach().item() == 16.5  # mean of 13 and 20
    assert torch.equal(p.detach(), raw) and q.detach().item() == 20.0
    other = TailAverage([p, q], window=2)
    other.load_state_dict(avg.state_dict())
    torch.testing.assert_close(other.mean()[1], avg.mean()[1])
    with pytest.raises(ValueError, match="averages over 2 epochs, this run over 3"):
        TailAverage([p, q], window=3).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="at least 1 epoch"):
        TailAverage([p], window=0)


def test_the_run_trains_on_the_raw_state_and_ends_at_the_mean_of_the_last_epochs(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    cfg = RANGES.model_copy(update={"epochs": 3, "average_epochs": 2})
    raw_states = []

    qm = prepare_qat(model, graph, spec, _clipped(ranges), learnable=True, ranges_only=True)
    opt = build_optimizer(qm, cfg, select_parameters(qm, LEARN_SETS.get("ranges")))
    names = {id(p): n for n, p in qm.model.named_parameters()}
    averaged = [names[id(p)] for p in opt.average.params]
    history = qat_train(qm, images, cfg, None, optimizer=opt, objective=MapDistillation(qm.model, model, images[:8]),
                        on_epoch=lambda e, h, o: raw_states.append({n: qm.model.state_dict()[n].clone()
                                                                    for n in averaged}))
    assert averaged and len(raw_states) == 3
    final = qm.model.state_dict()
    for n in averaged:  # the export: the mean of epochs 2 and 3 (the hook saw the raw states)
        torch.testing.assert_close(final[n], (raw_states[1][n] + raw_states[2][n]) / 2, msg=n)
    assert any(not torch.equal(final[n], raw_states[2][n]) for n in averaged)
    # the trajectory is the same as without an average: the average never feeds back into training
    _, plain, _ = _run(images, model, graph, spec, ranges, cfg.model_copy(update={"average_epochs": 1}))
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in plain]


def test_the_averaged_state_is_the_one_evaluated_and_kept(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    cfg = RANGES.model_copy(update={"epochs": 3, "average_epochs": 3, "keep": "best"})
    qm = prepare_qat(model, graph, spec, _clipped(ranges), learnable=True, ranges_only=True)
    opt = build_optimizer(qm, cfg, select_parameters(qm, LEARN_SETS.get("ranges")))
    objective = MapDistillation(qm.model, model, images[:8])
    holdout = images[8:]
    history = qat_train(qm, images, cfg, holdout, optimizer=opt, objective=objective)
    kept = next(h for h in history if h.get("kept"))
    assert mean_loss(objective, holdout, cfg.batch_size) == pytest.approx(kept["holdout_loss"], rel=1e-6)
    _, plain, _ = _run(images, model, graph, spec, ranges, cfg.model_copy(update={"average_epochs": 1, "keep": "last"}))
    assert history[1]["train_loss"] == plain[0]["train_loss"]  # epoch 1 averages itself alone


def test_a_resumed_run_keeps_its_window(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    cfg = RANGES.model_copy(update={"epochs": 3, "average_epochs": 3})
    qm, _, saved = _run(images, model, graph, spec, ranges, cfg, save_after=2)
    assert len(saved["optimizer"]["average"]["states"]) == 2
    resumed, _, _ = _run(images, model, graph, spec, ranges, cfg, start_epoch=2, resume_from=saved)
    for (k, a), b in zip(qm.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def _initializers(path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_qat_cli_exports_and_snapshots_the_averaged_state(tmp_path_factory, tmp_path):
    from test_qat_start import _bias_corrected_ptq, _qat

    kd = shared(tmp_path_factory)
    _, ptq_dir = _bias_corrected_ptq(tmp_path_factory)
    out = tmp_path / "qat"
    res = _qat(kd, out, ptq_dir, "--epochs", "2", "--average-epochs", "2", "--keep", "last",
               "--set", "qat.snapshots=true")
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert json.loads((out / "report.json").read_text())["qat"]["average_epochs"] == 2
    final, last_snapshot = _initializers(out / "model.onnx"), _initializers(out / "snapshots" / "epoch_002.onnx")
    assert final.keys() == last_snapshot.keys()
    assert all((final[k] == last_snapshot[k]).all() for k in final)  # the snapshot is the exported (averaged) state
    first = _initializers(out / "snapshots" / "epoch_001.onnx")
    assert any((first[k] != final[k]).any() for k in final)


@pytest.mark.parametrize("setting", [["--average-epochs", "0"], ["--set", "qat.average_epochs=0"]])
def test_a_bad_window_is_a_one_line_error_and_no_folder(tmp_path_factory, tmp_path, setting):
    refused_qat(tmp_path_factory, tmp_path, setting, "average")
