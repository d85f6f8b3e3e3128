"""Weight range rules (minmax, mse) and how insert_qdq applies them or a range given per weight."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.ort_utils import minmax_ranges
from helpers.tiny_models import calib_batches, tiny_model
from onnx import numpy_helper

from qtool.errors import GraphError, RecipeError
from qtool.graph import build_spec, insert_qdq_report, prepare
from qtool.graph.profiles import QuantParams, quantize_array, scale_zero_point
from qtool.graph.weight_ranges import WEIGHT_RANGES, weight_bounds
from qtool.recipe import PtqConfig, build_recipe

W4 = QuantParams("int8", 4, symmetric=True, axis=0)


def channel_errors(w: np.ndarray, lo, hi, p: QuantParams) -> np.ndarray:
    """Squared quantize-dequantize error per channel (axis 0) of ``w`` with bounds ``lo``/``hi``."""
    scale, zp = scale_zero_point(lo, hi, p)
    q = quantize_array(w, scale, zp, p).astype(np.float64)
    shape = (-1,) + (1,) * (w.ndim - 1)
    deq = (q - zp.reshape(shape)) * scale.reshape(shape)
    return ((deq - w) ** 2).reshape(w.shape[0], -1).sum(axis=1)


def test_registry_lists_both_rules():
    assert {"minmax", "mse"} <= set(WEIGHT_RANGES.names())


def test_minmax_is_each_channels_min_and_max():
    w = np.random.default_rng(0).normal(size=(5, 3, 2, 2)).astype(np.float32)
    lo, hi = weight_bounds("minmax", w, W4)
    np.testing.assert_array_equal(lo, w.reshape(5, -1).min(axis=1))
    np.testing.assert_array_equal(hi, w.reshape(5, -1).max(axis=1))
    lo_t, hi_t = weight_bounds("minmax", w, W4.with_axis(None))
    assert np.ndim(lo_t) == 0 and float(lo_t) == w.min() and float(hi_t) == w.max()


def test_mse_clips_an_outlier_channel_and_never_errs_more_than_minmax():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 64, 3, 3)).astype(np.float32)
    w[2, 0, 0, 0] = 9.0  # one weight about 2.5x the channel's other extremes
    lo_m, hi_m = weight_bounds("minmax", w, W4)
    lo, hi = weight_bounds("mse", w, W4)
    err_m, err = channel_errors(w, lo_m, hi_m, W4), channel_errors(w, lo, hi, W4)
    assert np.all(err <= err_m * (1 + 1e-6))
    assert hi[2] <= 0.6 * hi_m[2]  # the outlier is clipped ...
    assert err[2] < 0.5 * err_m[2]  # ... and the channel's error at least halves
    again = weight_bounds("mse", w, W4)
    np.testing.assert_array_equal(again[0], lo)  # deterministic
    np.testing.assert_array_equal(again[1], hi)


def test_mse_works_for_asymmetric_uint8_and_per_tensor():
    w = np.random.default_rng(2).uniform(-1, 3, size=(3, 50)).astype(np.float32)
    p = QuantParams("uint8", 4, symmetric=False, axis=0)
    lo, hi = weight_bounds("mse", w, p)
    assert lo.shape == (3,) and np.all(lo <= 0) and np.all(hi > 0)
    assert np.all(channel_errors(w, lo, hi, p) <= channel_errors(w, *weight_bounds("minmax", w, p), p) * (1 + 1e-6))
    lo_t, hi_t = weight_bounds("mse", w, p.with_axis(None))
    assert np.ndim(lo_t) == 0 and float(hi_t) <= w.max()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def ranges(prepared):
    spec = build_spec(prepared, PtqConfig(), "cpu")
    return minmax_ranges(prepared, spec.tensors_to_calibrate(), calib_batches(2))


def _dequantized_weights(q, report) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    out = {}
    for w in report["weights"]:
        ints, scale = inits[f"{w}_quantized"].astype(np.float64), inits[f"{w}_scale"].astype(np.float64)
        out[w] = ints * scale.reshape((-1,) + (1,) * (ints.ndim - 1))
    return out


def test_insert_qdq_applies_the_spec_rule_and_mse_weights_are_closer_at_4_bits(prepared, ranges):
    floats = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    built = {}
    for rule in ("minmax", "mse"):
        spec = build_spec(prepared, PtqConfig(weight_bits=4, weight_range=rule), "cpu")
        assert spec.weight_range == rule and spec.to_dict()["weight_range"] == rule
        q, report = insert_qdq_report(prepared, spec, ranges)
        assert {r["range"] for r in report["weights"].values()} == {rule}
        built[rule] = _dequantized_weights(q, report)
    errs = {rule: sum(((d - floats[w]) ** 2).sum() for w, d in deq.items()) for rule, deq in built.items()}
    assert errs["mse"] < errs["minmax"]


def test_a_range_given_for_a_weight_wins_and_a_wrong_one_is_one_error(prepared, ranges):
    spec = build_spec(prepared, PtqConfig(weight_bits=4), "cpu")
    w = next(iter(spec.weights))
    data = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}[w]
    lo, hi = weight_bounds("mse", data, spec.weights[w])
    q, report = insert_qdq_report(prepared, spec, {**ranges, w: (lo, hi)})
    assert report["weights"][w]["range"] == "given"
    mse_spec = build_spec(prepared, PtqConfig(weight_bits=4, weight_range="mse"), "cpu")
    _, mse_report = insert_qdq_report(prepared, mse_spec, ranges)
    assert report["weights"][w]["scale_max"] == mse_report["weights"][w]["scale_max"]
    with pytest.raises(GraphError, match=f"range given for weight '{w}'"):
        insert_qdq_report(prepared, spec, {**ranges, w: (lo[:1], hi[:1])})


def test_recipe_refuses_an_unknown_weight_range_rule():
    with pytest.raises(RecipeError, match="weight range rule 'kl' unknown; allowed: minmax, mse"):
        build_recipe({}, ["ptq.weight_range=kl"])
