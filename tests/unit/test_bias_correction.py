"""Empirical bias correction: corrected layers keep fp32's per-channel output means, within the int32 bias grid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers.ort_utils import minmax_ranges, session
from helpers.tiny_models import calib_batches, tiny_model
from onnx import numpy_helper

from qtool.bias_correction import correct_biases, levels, targets
from qtool.graph import build_spec, insert_qdq, prepare
from qtool.graph.probe import add_outputs, upstream_of
from qtool.recipe import PtqConfig

FEEDS = calib_batches(6, seed=3)


def images():
    return [f["input"] for f in FEEDS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    prepared = prepare(tiny_model(tmp_path_factory.mktemp("tiny")))
    spec = build_spec(prepared, PtqConfig(activation_bits=4, weight_bits=4), "cpu")
    ranges = minmax_ranges(prepared, spec.tensors_to_calibrate(), FEEDS)
    corrected, report = correct_biases(prepared, spec, ranges, images, threads=1)
    return prepared, spec, ranges, corrected, report


def channel_means(model: onnx.ModelProto, tensors: list[str]) -> dict[str, np.ndarray]:
    """Plain ORT and numpy: each tensor's mean over batch and space, per channel, over FEEDS."""
    sess = session(add_outputs(model, tensors))
    outs = [sess.run(tensors, f) for f in FEEDS]
    return {t: np.mean([o[i].astype(np.float64).mean(axis=(0, 2, 3)) for o in outs], axis=0)
            for i, t in enumerate(tensors)}


def reachable(model: onnx.ModelProto, start: str) -> set[str]:
    """Names of the nodes downstream of node ``start``."""
    seen, frontier = set(), {o for n in model.graph.node if n.name == start for o in n.output}
    while frontier:
        nxt = [n for n in model.graph.node if n.name not in seen and frontier.intersection(n.input)]
        seen |= {n.name for n in nxt}
        frontier = {o for n in nxt for o in n.output}
    return seen


def test_levels_hold_every_layer_once_and_no_layer_feeds_another_of_its_level(setup):
    prepared, spec, _, _, _ = setup
    moved, skipped = targets(prepared, spec)
    assert len(moved) >= 4 and not skipped  # the tiny model's convs all have biases
    grouped = levels(prepared, moved)
    assert sorted(n for level in grouped for n in level) == sorted(moved)
    for level in grouped:
        for a in level:
            assert not reachable(prepared, a).intersection(level)
    for earlier, later in zip(grouped, grouped[1:]):  # a level is needed: something upstream in the one before
        assert any(reachable(prepared, a).intersection(later) for a in earlier)


def test_corrected_layers_keep_fp32_means_within_the_bias_grid_and_only_biases_change(setup):
    prepared, spec, ranges, corrected, report = setup
    moved, _ = targets(prepared, spec)
    outputs = [o for o, _ in moved.values()]
    ref = channel_means(prepared, outputs)
    plain = channel_means(insert_qdq(prepared, spec, ranges), outputs)
    qdq = insert_qdq(corrected, spec, ranges)
    fixed = channel_means(qdq, outputs)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    before = after = 0.0
    for node, (out, bias) in moved.items():
        step = inits[f"{bias}_quantized_scale"].astype(np.float64)  # the int32 bias grid: input x weight scale
        residual = np.abs(ref[out] - fixed[out])
        assert np.all(residual <= step / 2 + 1e-4 * (1 + np.abs(ref[out]))), node
        before += float(np.abs(ref[out] - plain[out]).sum())
        after += float(residual.sum())
    assert after < 0.5 * before  # the uncorrected 4-bit graph was shifted: the check above is not vacuous
    assert report["relative_shift"]["after"] < report["relative_shift"]["before"]
    assert report["graph_runs"] == report["levels"] + 2 and set(report["layers"]) == set(moved)
    old = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in corrected.graph.initializer}
    biases = {b for _, b in moved.values()}
    assert old.keys() == new.keys()
    assert all(np.array_equal(old[k], new[k]) for k in old if k not in biases)
    assert any(not np.array_equal(old[b], new[b]) for b in biases)
    assert [n.SerializeToString() for n in prepared.graph.node] == [n.SerializeToString() for n in corrected.graph.node]


def test_correction_is_deterministic_and_a_layer_without_bias_is_skipped(setup):
    prepared, spec, ranges, corrected, _ = setup
    again, _ = correct_biases(prepared, spec, ranges, images, threads=1)
    assert again.SerializeToString() == corrected.SerializeToString()
    cut = onnx.ModelProto()
    cut.CopyFrom(prepared)
    conv = next(n for n in cut.graph.node if n.name in spec.nodes and n.op_type == "Conv")
    del conv.input[2]
    cut_spec = build_spec(cut, PtqConfig(activation_bits=4, weight_bits=4), "cpu")
    moved, skipped = targets(cut, cut_spec)
    assert skipped == [conv.name] and conv.name not in moved


def test_running_only_the_upstream_cut_changes_no_value(setup, monkeypatch):
    prepared, spec, ranges, corrected, _ = setup
    qdq = insert_qdq(prepared, spec, ranges)
    moved, _ = targets(prepared, spec)
    early = [o for o, _ in moved.values()][:2]
    cut = upstream_of(qdq, early)
    assert [o.name for o in cut.graph.output] == early and len(cut.graph.node) < len(qdq.graph.node)
    full = session(add_outputs(qdq, early))
    part = session(cut)
    for f in FEEDS[:2]:
        for a, b in zip(full.run(early, f), part.run(early, f)):
            np.testing.assert_array_equal(a, b)
    import qtool.bias_correction as bc

    monkeypatch.setattr(bc, "upstream_of", add_outputs)  # the whole graph, probed, every level
    whole, _ = correct_biases(prepared, spec, ranges, images, threads=1)
    assert whole.SerializeToString() == corrected.SerializeToString()
