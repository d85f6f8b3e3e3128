"""Empirical bias correction: corrected layers keep fp32's per-channel output means, within the int32 bias grid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers.ort_utils import minmax_ranges, session
from helpers.tiny_models import calib_batches, tiny_model
from onnx import numpy_helper

from qtool.bias_correction import BiasCorrector, bias_in_use, correct_biases, corrected_biases, levels, targets
from qtool.graph import build_spec, insert_qdq, prepare
from qtool.graph._index import GraphIndex
from qtool.graph.frontier import FrontierRunner
from qtool.graph.probe import add_outputs, probe_session, upstream_of
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
    assert report["levels"] == 3 and set(report["layers"]) == set(moved)
    assert 0 < report["node_runs"] < 4 * report["graph_nodes"] and report["frontier_mb"] >= 0
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


def test_corrector_gives_correct_biases_result_and_reuses_it_only_for_the_same_qdq_graph(setup):
    prepared, spec, ranges, corrected, report = setup
    reads = []

    def counted():
        reads.append(1)
        return images()

    corrector = BiasCorrector(prepared, spec, counted, threads=1)
    got, got_report = corrector.correct(spec, ranges)
    assert got.SerializeToString() == corrected.SerializeToString()
    assert got_report["reused"] is False and got_report["layers"] == report["layers"]
    assert corrector.computed == 1 and len(reads) == 1
    # the search's call for the same ranges (a copy) is a lookup with the same biases
    biases = corrector({k: tuple(v) for k, v in ranges.items()})
    assert corrector.computed == 1
    expected = corrected_biases(corrected, report)
    assert biases.keys() == expected.keys()
    assert all(biases[n][0] == expected[n][0] and np.array_equal(biases[n][1], expected[n][1]) for n in expected)
    again, again_report = corrector.correct(spec, ranges)
    assert again_report["reused"] is True and again.SerializeToString() == corrected.SerializeToString()
    # other ranges (one tensor's range halved) or another spec: a new correction, equal to correct_biases' own
    name = spec.tensors_to_calibrate()[1]
    other = {**ranges, name: (ranges[name][0] / 2, ranges[name][1] / 2)}
    got_other, other_report = corrector.correct(spec, other)
    want_other, _ = correct_biases(prepared, spec, other, images, threads=1)
    assert other_report["reused"] is False and corrector.computed == 2
    assert got_other.SerializeToString() == want_other.SerializeToString() != corrected.SerializeToString()
    spec8 = build_spec(prepared, PtqConfig(activation_bits=8, weight_bits=8), "cpu")
    got8, report8 = corrector.correct(spec8, ranges)
    assert report8["reused"] is False and corrector.computed == 3
    assert got8.SerializeToString() == correct_biases(prepared, spec8, ranges, images, threads=1)[0].SerializeToString()
    assert len(reads) == 1  # the calibration images were read once


def reference_correction(prepared: onnx.ModelProto, spec, ranges) -> onnx.ModelProto:
    """Independent of the frontier: level by level, the whole Q/DQ graph in plain ORT, numpy means."""
    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    moved, _ = targets(out, spec)
    ref = channel_means(prepared, [o for o, _ in moved.values()])
    inits = {t.name: t for t in out.graph.initializer}
    for level in levels(out, moved):
        qdq = insert_qdq(out, spec, ranges)
        means = channel_means(qdq, [moved[n][0] for n in level])
        idx = GraphIndex(qdq)
        for n in level:
            o, b = moved[n]
            new = bias_in_use(idx, o) + ref[o] - means[o]
            inits[b].CopyFrom(numpy_helper.from_array(new.astype(np.float32), b))
    return out


def test_frontier_steps_give_the_whole_graph_values_and_run_each_node_about_once(setup):
    prepared, spec, ranges, corrected, report = setup
    qdq = insert_qdq(prepared, spec, ranges)
    moved, _ = targets(prepared, spec)
    runner = FrontierRunner(images(), "input", None, threads=1)
    whole = probe_session(add_outputs(qdq, [o for o, _ in moved.values()]), 1)
    for level in levels(prepared, moved):
        outs = [o for o, _ in (moved[n] for n in level)]
        stepped = list(runner.run(qdq, outs, moving=set(level)))
        assert len(stepped) == len(FEEDS)
        for f, values in zip(FEEDS, stepped):
            for a, b in zip(whole.run(outs, f), values):
                np.testing.assert_array_equal(a, b)  # same nodes, same arithmetic, whichever cut ran them
    held = sorted(runner.chunks[0][1])  # a tensor the frontier holds is answered from it
    for f, values in zip(FEEDS, runner.run(qdq, held, moving=())):
        for a, b in zip(probe_session(add_outputs(qdq, held), 1).run(held, f), values):
            np.testing.assert_array_equal(a, b)
    assert runner.node_runs < 2 * len(qdq.graph.node)  # re-running every level's upstream: far more
    assert sum(len(upstream_of(qdq, [moved[n][0] for n in level]).graph.node)
               for level in levels(prepared, moved)) > runner.node_runs
    expected = reference_correction(prepared, spec, ranges)
    got = {t.name: numpy_helper.to_array(t) for t in corrected.graph.initializer}
    for node, layer in report["layers"].items():
        want = numpy_helper.to_array(next(t for t in expected.graph.initializer if t.name == layer["bias"]))
        np.testing.assert_allclose(got[layer["bias"]], want, rtol=1e-5, atol=1e-6, err_msg=node)


def test_frontier_cap_drops_activations_and_changes_no_value(setup):
    """Capped at 0 MB the frontier is dropped after every step that keeps something: same biases, more node runs."""
    prepared, spec, ranges, corrected, report = setup
    capped, capped_report = correct_biases(prepared, spec, ranges, images, threads=1, max_frontier_mb=0.0)
    assert report["frontier_drops"] == 0 and capped_report["frontier_drops"] > 0
    assert capped_report["node_runs"] > report["node_runs"]
    for a, b in zip(corrected.graph.initializer, capped.graph.initializer):
        assert a.name == b.name and a.SerializeToString() == b.SerializeToString(), a.name
    qdq = insert_qdq(prepared, spec, ranges)
    moved, _ = targets(prepared, spec)
    runner = FrontierRunner(images(), "input", None, threads=1, max_bytes=0)
    whole = probe_session(add_outputs(qdq, [o for o, _ in moved.values()]), 1)
    for level in levels(prepared, moved):
        outs = [o for o, _ in (moved[n] for n in level)]
        for f, values in zip(FEEDS, runner.run(qdq, outs, moving=set(level))):
            for a, b in zip(whole.run(outs, f), values):
                np.testing.assert_array_equal(a, b)
        assert runner.activation_bytes() == 0  # nothing past the images survives a step under a 0-byte cap
    assert runner.drops > 0
