"""PTQ on the shared tiny STFPM ONNX: what ONNX Runtime fuses, policy parts, profiles, bit widths, SQNR.

Structural checks name the offending node. One entropy/cpu run comes from ``qtool ptq`` (shared with
the CLI tests); the others call :func:`qtool.ptq.run_ptq` with minmax (fast) calibration.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers.kd_run import cli_ptq, lib_ptq, shared
from helpers.ort_utils import optimized_ops, session
from helpers.tiny_models import calib_batches, tiny_model
from onnx import TensorProto, numpy_helper

from calibrators import MinMaxCalibrator
from qtool.calib_data import normal_pool
from qtool.calibrate import calibrate
from qtool.data import ImageTransform, load_splits
from qtool.errors import CalibrationError
from qtool.graph import lint

PARTS = ("teacher", "student")


@pytest.fixture(scope="module")
def kd(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def float_convs(kd) -> dict[str, int]:
    nodes = onnx.load(str(kd.onnx)).graph.node
    counts = {p: sum(n.op_type == "Conv" and n.name.startswith(f"/{p}/") for n in nodes) for p in PARTS}
    assert all(counts.values()), counts
    return counts


@pytest.fixture(scope="module")
def entropy_cpu(tmp_path_factory):
    result, out = cli_ptq(tmp_path_factory, "entropy-cpu", "--calib", "entropy", "--target", "cpu")
    assert result.exit_code == 0, result.output
    return out


def _by_part(ops: list[tuple[str, str]], part: str) -> Counter:
    return Counter(op for op, name in ops if name.startswith(f"/{part}/"))


def test_every_teacher_and_student_conv_runs_as_qlinearconv(entropy_cpu, float_convs, tmp_path):
    ops = optimized_ops(onnx.load(str(entropy_cpu / "model.onnx")), tmp_path, "ORT_ENABLE_EXTENDED")
    for part in PARTS:
        still_float = [name for op, name in ops if name.startswith(f"/{part}/") and op in ("Conv", "FusedConv")]
        assert not still_float, f"{part} Convs not fused to QLinearConv: {still_float[:5]}"
        assert _by_part(ops, part)["QLinearConv"] == float_convs[part], _by_part(ops, part)


def test_head_stays_float(entropy_cpu, tmp_path):
    report_plan = json.loads((entropy_cpu / "report.json").read_text())["plan"]
    assert not [k for k in report_plan["quantized_nodes"] if k.startswith("head/")]
    assert any(k.startswith("head") for k in report_plan["float_nodes"])
    model = onnx.load(str(entropy_cpu / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert any(n.name.startswith("/head/") for n in model.graph.node)
    quantized_head_outputs = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"
                              and n.input[0] in producer and producer[n.input[0]].name.startswith("/head/")]
    assert not quantized_head_outputs, quantized_head_outputs
    ops = optimized_ops(model, tmp_path, "ORT_ENABLE_EXTENDED")
    integer_head = [n for op, n in ops if n.startswith("/head/") and op.startswith("QLinear")]
    assert not integer_head, integer_head


def test_student_only_leaves_teacher_convs_float(tmp_path_factory, float_convs, tmp_path):
    report, out = lib_ptq(tmp_path_factory, "student-minmax", "ptq.quantize=student", "ptq.calib=minmax")
    assert report["plan"]["quantized_nodes"]
    assert all(k.startswith("student/") for k in report["plan"]["quantized_nodes"]), report["plan"]
    ops = optimized_ops(onnx.load(str(out / "model.onnx")), tmp_path, "ORT_ENABLE_EXTENDED")
    teacher, student = _by_part(ops, "teacher"), _by_part(ops, "student")
    quantized_teacher = [n for op, n in ops if n.startswith("/teacher/") and op.startswith("QLinear")]
    assert not quantized_teacher, f"teacher nodes quantized: {quantized_teacher[:5]}"
    assert teacher["Conv"] + teacher["FusedConv"] == float_convs["teacher"], teacher
    assert student["QLinearConv"] == float_convs["student"], student


def _zero_points(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            out[n.name] = inits[n.input[2]]
    return out


def test_tensorrt_profile_lints_clean_with_zero_points_zero(tmp_path_factory):
    report, out = lib_ptq(tmp_path_factory, "tensorrt", "ptq.target=tensorrt", "ptq.calib=minmax")
    model = onnx.load(str(out / "model.onnx"))
    issues = lint(model, "tensorrt")
    assert issues == [], [str(i) for i in issues[:5]]
    assert report["lint"] == []
    zps = _zero_points(model)
    assert len(zps) > 10
    for name, t in zps.items():
        assert t.data_type in (TensorProto.INT8, TensorProto.INT32), f"{name}: zero point type {t.data_type}"
        assert not np.any(numpy_helper.to_array(t)), f"{name}: zero point not 0"
    # activations are int8 too: no uint8 Q output anywhere
    assert not [n for n, t in zps.items() if t.data_type == TensorProto.UINT8]


def test_cpu_profile_lints_clean_with_uint8_activations(entropy_cpu):
    model = onnx.load(str(entropy_cpu / "model.onnx"))
    assert lint(model, "cpu") == []
    q_types = {t.data_type for n, t in _zero_points(model).items() if "QuantizeLinear" in n}
    assert TensorProto.UINT8 in q_types


def test_four_bit_is_emulated_and_uses_the_narrow_range(tmp_path_factory):
    report, out = lib_ptq(tmp_path_factory, "4bit", "ptq.activation_bits=4", "ptq.weight_bits=4", "ptq.calib=minmax")
    assert report["plan"]["emulated"] is True
    assert report["quantization"]["emulated"] is True
    assert report["plan"]["activation_bits"] == report["plan"]["weight_bits"] == 4
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8]
    assert weights
    for w in weights:
        arr = numpy_helper.to_array(inits[w])
        assert arr.min() >= -7 and arr.max() <= 7, f"{w}: 4-bit weight outside [-7, 7]"
    eight, _ = lib_ptq(tmp_path_factory, "minmax", "ptq.calib=minmax")
    assert report["sqnr_db"]["anomaly_map"] < eight["sqnr_db"]["anomaly_map"]


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return 10 * math.log10(float((ref**2).sum()) / float(((ref - test) ** 2).sum()))


def test_minmax_8bit_sqnr_is_high_and_reported_correctly(tmp_path_factory, kd):
    report, out = lib_ptq(tmp_path_factory, "minmax", "ptq.calib=minmax")
    assert report["plan"]["emulated"] is False
    for key in ("anomaly_map", "score"):
        v = report["sqnr_db"][key]
        assert math.isfinite(v) and v > 10, f"{key} SQNR {v} dB"
    # independent recomputation on the same images (the normal pool: held-out normals, then training normals), with
    # ORT's default optimisations (integer QLinear kernels, as deployed); on x86 without VNNI these lose
    # several dB against the float QDQ simulation (u8s8 saturation), so the two are not interchangeable
    recipe = kd.recipe()
    splits = load_splits(recipe.data)
    samples = normal_pool(splits, report["sqnr_db"]["images"])
    transform = ImageTransform(recipe.data)
    ref_sess, q_sess = session(kd.onnx), session(out / "model.onnx", "ORT_ENABLE_ALL")
    maps_r, maps_q = [], []
    for s in samples:
        x = transform.image(s.path)[None]
        maps_r.append(ref_sess.run(["anomaly_map"], {"image": x})[0])
        maps_q.append(q_sess.run(["anomaly_map"], {"image": x})[0])
    mine = _sqnr(np.concatenate(maps_r), np.concatenate(maps_q))
    assert mine > 10
    assert mine == pytest.approx(report["sqnr_db"]["anomaly_map"], abs=0.05)


# ---------------------------------------------------------------- calibration driver, bad data


def test_calibrate_refuses_nan_input(tmp_path):
    model = tiny_model(tmp_path)
    batches = [b["input"] for b in calib_batches(3)]
    batches[1] = batches[1].copy()
    batches[1][0, 0, 2, 3] = np.nan
    names = [model.graph.node[0].output[0]]
    with pytest.raises(CalibrationError, match="NaN") as e:
        calibrate(model, names, batches, MinMaxCalibrator(), threads=1)
    assert "batch 1" in str(e.value)


def test_calibrate_refuses_an_empty_set(tmp_path):
    model = tiny_model(tmp_path)
    names = [model.graph.node[0].output[0]]
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(model, names, [], MinMaxCalibrator(), threads=1)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(model, names, iter(()), MinMaxCalibrator(), threads=1)


class _Recorder(MinMaxCalibrator):
    """Min/max that records how many images each observe call held and when the search images began."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def observe(self, name, array):
        self.events.append(("observe", len(array)))
        super().observe(name, array)

    def begin_search_images(self):
        self.events.append(("search", 0))


def test_calibrate_observes_every_source_image_before_announcing_the_search_images(tmp_path):
    """A group never spans the two: 3 source images with group 2 leave one buffered when the source ends.

    Oracle: the source images observed before ``begin_search_images`` are counted from the events;
    with only the first tensor probed, one event per group.
    """
    model = tiny_model(tmp_path)
    names = [model.graph.node[0].output[0]]
    source = [f["input"] for f in calib_batches(3)]
    search = [f["input"] for f in calib_batches(3, seed=1)]
    rec = _Recorder()
    calibrate(model, names, source, rec, threads=1, group=2, search_batches=search)
    cut = rec.events.index(("search", 0))
    assert sum(n for _, n in rec.events[:cut]) == 3 and sum(n for _, n in rec.events[cut + 1:]) == 3
    assert [n for _, n in rec.events[:cut]] == [2, 1]
    plain = _Recorder()  # no search batches: never announced
    calibrate(model, names, source, plain, threads=1, group=2)
    assert ("search", 0) not in plain.events


def test_calibrate_ranges_match_numpy_minmax(tmp_path):
    from helpers.ort_utils import minmax_ranges

    model = tiny_model(tmp_path)
    feeds = calib_batches(4)
    names = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Relu")][:4]
    got = calibrate(model, names, [f["input"] for f in feeds], MinMaxCalibrator(), threads=1, group=2)
    want = minmax_ranges(model, names, feeds)
    for n in names:
        assert (got[n].lo, got[n].hi) == pytest.approx(want[n], rel=1e-6), n


# ---------------------------------------------------------------- weight rounding


def _weight_codes(path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{weight DequantizeLinear: (int codes, scale, zero point)} of a saved QDQ model."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: tuple(inits[i] for i in n.input) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8}


def test_gptq_rounding_moves_integers_on_the_same_grid_and_cuts_each_layers_output_error(tmp_path_factory):
    method = "gptq"
    bits = ("ptq.activation_bits=4", "ptq.weight_bits=4", "ptq.calib=minmax")
    near, near_out = lib_ptq(tmp_path_factory, "4bit", *bits)
    report, out = lib_ptq(tmp_path_factory, f"4bit-{method}", *bits, f"ptq.weight_rounding={method}")
    assert near["weight_rounding"] == {"method": "nearest"}
    wr = report["weight_rounding"]
    assert wr["method"] == method and wr["layers"]
    assert wr["images"] == report["calibration"]["images"]
    # every quantized weight is either rounded or listed with why not (the tiny model has only Convs)
    assert sorted([*wr["layers"], *wr["skipped"]]) == sorted(report["quantization"]["weights"])
    assert not wr["skipped"]
    for w, e in wr["layers"].items():
        assert e[method] <= e["nearest"] + 1e-12, (w, e)
        assert report["quantization"]["weights"][w]["rounding"] == "given"
    assert wr["mean_relative_error"][method] < 0.8 * wr["mean_relative_error"]["nearest"]
    a, b = _weight_codes(near_out / "model.onnx"), _weight_codes(out / "model.onnx")
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=f"{name}: scale differs")
        np.testing.assert_array_equal(a[name][2], b[name][2], err_msg=f"{name}: zero point differs")
        assert b[name][0].min() >= -7 and b[name][0].max() <= 7, name
        moved += int((a[name][0] != b[name][0]).sum())
    assert moved > 0
