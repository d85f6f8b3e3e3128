"""``qat.keep``: the keep rules' choice (``guarded`` never exports a state whose check-set proxy AUROCs fell below
the start's), the proxy AUROCs of the holdout pass, and the refusals when a rule's data is missing."""

from __future__ import annotations

import pytest
import torch
from helpers.kd_run import shared
from pydantic import ValidationError
from test_qat_objectives import RANGES, _clipped, _setup
from torch import nn

from qtool.evaluate import TorchPredictor
from qtool.proxy import separation
from qtool.qat.insert import prepare_qat
from qtool.qat.keep import KEEP_RULES, Kept, mean_loss
from qtool.qat.objectives import LEARN_SETS, MapDistillation, select_parameters
from qtool.qat.trace import QatError
from qtool.qat.train import build_optimizer, qat_train
from qtool.recipe import QatConfig
from qtool.search import search_set_from_arrays

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _row(loss: float, image: float, pixel: float) -> dict[str, float]:
    return {"holdout_loss": loss, "proxy_image_auroc": image, "proxy_pixel_auroc": pixel}


@pytest.mark.parametrize(("rule", "kept"), [("guarded", 2.0), ("best", 1.0)])
def test_guarded_keeps_the_lowest_loss_among_states_whose_proxies_did_not_fall(rule, kept):
    """Offered in turn: a lower loss with a lower pixel proxy (best takes it, guarded does not), an eligible
    lower loss, a still lower loss with a lower image proxy. The restored state is the chosen row's."""
    module = nn.Linear(1, 1, bias=False)
    rows = [_row(1.0, 0.9, 0.9), _row(0.5, 0.95, 0.85), _row(0.7, 0.9, 0.95), _row(0.6, 0.89, 0.99)]
    with torch.no_grad():
        module.weight.fill_(0.0)
    keeper = Kept(module, KEEP_RULES.get(rule), rows[0])
    for i, row in enumerate(rows[1:], start=1):
        with torch.no_grad():
            module.weight.fill_(float(i))
        keeper.offer(row)
    keeper.restore()
    assert float(module.weight.detach()) == kept
    assert keeper.row is rows[int(kept)]


def _map_run(tmp_path, keep: str, epochs: int = 4):
    """A map-distillation run of a tiny STFPM from clipped ranges, its holdout the check set of 4 normals."""
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    qm = prepare_qat(model, graph, spec, _clipped(ranges), learnable=True, ranges_only=True)
    params = select_parameters(qm, LEARN_SETS.get("ranges"))
    objective = MapDistillation(qm.model, model, images[:8])
    check = search_set_from_arrays(images[8:].numpy(), ["patch", "noise"], 1)
    holdout = objective.targets(torch.from_numpy(check.images))
    cfg = RANGES.model_copy(update={"keep": keep, "epochs": epochs})
    history = qat_train(qm, images[:8], cfg, holdout, optimizer=build_optimizer(qm, cfg, params),
                        objective=objective, check=check)
    return qm, objective, check, holdout, history


def test_a_guarded_run_exports_the_eligible_state_with_the_lowest_loss_and_its_proxies_are_the_models(tmp_path):
    qm, objective, check, holdout, history = _map_run(tmp_path, "guarded")
    start = history[0]
    assert all(0.0 <= h[f"proxy_{k}"] <= 1.0 for h in history for k in ("image_auroc", "pixel_auroc"))
    eligible = [h for h in history
                if h["proxy_image_auroc"] >= start["proxy_image_auroc"]
                and h["proxy_pixel_auroc"] >= start["proxy_pixel_auroc"]]
    chosen = min(eligible, key=lambda h: h["holdout_loss"])
    assert [h["epoch"] for h in history if h.get("kept")] == [chosen["epoch"]]
    # the exported (restored) state is that epoch's: its loss, and proxies recomputed from a separate pass
    assert mean_loss(objective, holdout, 4) == pytest.approx(chosen["holdout_loss"], rel=1e-6)
    maps, scores = TorchPredictor(qm.model)(check.images)
    sep = separation(maps, scores, check.masks, check.labels)
    assert sep["pixel_auroc"] == pytest.approx(chosen["proxy_pixel_auroc"], abs=1e-9)
    assert sep["image_auroc"] == pytest.approx(chosen["proxy_image_auroc"], abs=1e-9)


def test_guarded_without_the_check_sets_masks_is_an_error(tmp_path):
    model, graph, spec, ranges, images = _setup("stfpm", tmp_path)
    qm = prepare_qat(model, graph, spec, ranges, learnable=True, ranges_only=True)
    with pytest.raises(QatError, match="keep guarded needs .* the check set's masks"):
        qat_train(qm, images[:8], RANGES.model_copy(update={"keep": "guarded"}), images[8:],
                  objective=MapDistillation(qm.model, model, images[:4]))


@pytest.mark.parametrize("check_normals", [0, 2])
def test_guarded_with_the_kd_loss_or_no_check_set_is_refused_before_anything_is_written(tmp_path_factory, tmp_path,
                                                                                         check_normals):
    """The kd loss has a holdout split but no check set with masks; map without check normals has neither."""
    from qtool.qat.run import run_qat
    from qtool.recipe import load_recipe

    kd = shared(tmp_path_factory)
    recipe = load_recipe(kd.recipe_file)
    recipe.ptq.search.check_normals = check_normals
    recipe.qat.loss = "kd" if check_normals else "map"
    recipe.qat.keep = "guarded"
    out = tmp_path / "qat"
    with pytest.raises(QatError, match=f"keep guarded needs a check set with synthetic anomalies: "
                                       f"qat.loss {recipe.qat.loss}"):
        run_qat(kd.checkpoint, recipe, out)
    assert not out.exists()


def test_an_unknown_keep_rule_is_a_recipe_error_naming_the_known_ones():
    with pytest.raises(ValidationError, match="guarded"):
        QatConfig(keep="worst")


def test_replaying_a_guarded_runs_history_gives_each_rules_choice(tmp_path):
    """The guarded run's kept row is what replay picks; replay of best picks the lowest loss; last the last row."""
    from qtool.qat.keep import replay

    *_, history = _map_run(tmp_path, "guarded", epochs=3)
    assert replay(KEEP_RULES.get("guarded"), history)["epoch"] == next(h["epoch"] for h in history if h.get("kept"))
    losses = [h["holdout_loss"] for h in history]
    assert replay(KEEP_RULES.get("best"), history)["epoch"] == history[losses.index(min(losses))]["epoch"]
    assert replay(KEEP_RULES.get("last"), history) is history[-1]
