"""Calibrator tests: each against an independent numpy oracle, plus contract and bad-input tests."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import scipy.stats

from calibrators import CALIBRATORS, Calibrator, HistogramCollector, TensorRange, get_calibrator
from calibrators.entropy import kl_divergences
from qtool.errors import CalibrationError, RegistryError


def batches(seed: int = 0, n: int = 5, size: int = 4000, grow: bool = True) -> list[np.ndarray]:
    """Float32 batches whose range grows on both sides from batch to batch (exercises re-binning)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scale = (1.0 + i) if grow else 1.0
        out.append((rng.laplace(0.3 * i, scale, size)).astype(np.float32))
    return out


# ---- min/max -----------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_matches_numpy(symmetric: bool) -> None:
    data = batches()
    cal = get_calibrator("minmax", symmetric=symmetric)
    for b in data:
        cal.observe("x", b.reshape(4, -1))
    r = cal.compute()["x"]
    lo, hi = float(np.min(np.concatenate(data))), float(np.max(np.concatenate(data)))
    if symmetric:
        m = max(-lo, hi)
        assert (r.lo, r.hi) == (-m, m)
    else:
        assert (r.lo, r.hi) == (lo, hi)


def test_minmax_moving_average() -> None:
    data = batches()
    cal = get_calibrator("minmax", moving_average=True, averaging_constant=0.25)
    for b in data:
        cal.observe("x", b)
    lo, hi = float(data[0].min()), float(data[0].max())
    for b in data[1:]:
        lo += 0.25 * (float(b.min()) - lo)
        hi += 0.25 * (float(b.max()) - hi)
    r = cal.compute()["x"]
    assert r.lo == pytest.approx(lo, rel=1e-12) and r.hi == pytest.approx(hi, rel=1e-12)


# ---- histogram collector -----------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True])
def test_histogram_streaming_equals_one_shot(absolute: bool) -> None:
    """Streamed counts == np.histogram of all data over the collector's final edges, exactly: merged
    bins nest exactly and the data extremes are kept off the edges (only a value within ~1e-15
    relative of an interior edge could move one bin), with the exact total and min/max."""
    data = [np.zeros(7, np.float32), *batches(seed=1)]  # a degenerate start, then growth both ways
    col = HistogramCollector(num_bins=256, absolute=absolute)
    for b in data:
        col.add("x", b)
    everything = np.concatenate(data).astype(np.float64)
    counts, edges = col.histogram("x", trim=False)
    oracle, _ = np.histogram(np.abs(everything) if absolute else everything, bins=edges)
    assert counts.sum() == everything.size
    np.testing.assert_array_equal(counts, oracle)
    assert col.stats("x") == (everything.size, everything.min(), everything.max())
    trimmed, tedges = col.histogram("x")
    assert trimmed.sum() == everything.size and trimmed[-1] > 0
    assert tedges[0] == (0.0 if absolute else edges[np.flatnonzero(counts)[0]])


def test_histogram_memory_is_bounded() -> None:
    col = HistogramCollector(num_bins=128)
    rng = np.random.default_rng(2)
    for i in range(100):
        col.add("x", rng.normal(0, 1 + i, 50))
    assert [a.shape for a in col.state_arrays("x")] == [(128,)]
    assert col.histogram("x", trim=False)[0].sum() == 5000


def test_histogram_range_covers_data_and_stays_tight() -> None:
    col = HistogramCollector(num_bins=64)
    col.add("x", np.array([0.0, 1.0]))
    col.add("x", np.array([1.51]))  # grows by k=2: [0, 2]
    counts, edges = col.histogram("x", trim=False)
    assert edges[0] < 0.0 < -edges[0] < 1e-6 and edges[-1] == pytest.approx(2.0, abs=1e-6)
    assert counts[0] == 1 and counts[31] == 1 and counts[48] == 1


# ---- percentile --------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_matches_numpy_within_one_bin(symmetric: bool) -> None:
    data = batches(seed=3)
    cal = get_calibrator("percentile", percentile=99.9, num_bins=512, symmetric=symmetric)
    for b in data:
        cal.observe("x", b)
    r = cal.compute()["x"]
    x = np.concatenate(data).astype(np.float64)
    edges = cal.collector.histogram("x", trim=False)[1]
    width = edges[1] - edges[0]
    if symmetric:
        t = np.percentile(np.abs(x), 99.9)
        assert abs(r.hi - t) <= width and r.lo == -r.hi
    else:
        assert abs(r.hi - np.percentile(x, 99.9)) <= width
        assert abs(r.lo - np.percentile(x, 0.1)) <= width
    assert r.meta["percentile"] == 99.9


# ---- entropy -----------------------------------------------------------------------------------


def reference_entropy(hist: np.ndarray, num_levels: int, start: int, stride: int = 1):
    """Plain-loop transcription of pytorch-quantization's ``_compute_amax_entropy``."""
    bins = hist.astype(np.int64).copy()
    bins[0] = bins[1]
    divergences, arguments = [], []
    for i in range(start, len(bins) + 1, stride):
        space = np.linspace(0, i, num=num_levels + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        quant = np.zeros(num_levels)
        for idx, d in enumerate(digitized):
            if d != -1:
                quant[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                quant[key] /= val
        expanded = np.zeros(i)
        for idx, d in enumerate(digitized):
            if d != -1:
                expanded[idx] = quant[d]
        reference = bins[:i].astype(np.float64)
        reference[-1] += bins[i:].sum()
        divergences.append(scipy.stats.entropy(reference / reference.sum(), expanded / expanded.sum()))
        arguments.append(i)
    divergences = np.array(divergences)
    return arguments[len(divergences) - 1 - int(np.argmin(divergences[::-1]))], divergences


@pytest.mark.parametrize(("nbins", "levels", "stride"), [(400, 128, 1), (160, 8, 3), (300, 32, 2)])
def test_entropy_search_matches_reference_loop(nbins: int, levels: int, stride: int) -> None:
    rng = np.random.default_rng(nbins)
    hist = rng.poisson(3000 * np.exp(-np.arange(nbins) / (nbins / 5))) + rng.integers(0, 3, nbins)
    hist[rng.choice(nbins, nbins // 10, replace=False)] = 0  # empty bins take the "-1" path
    expected_bin, expected_kl = reference_entropy(hist, levels, levels, stride)
    cal = get_calibrator("entropy", stride=stride)
    chosen, _ = cal.search(hist, levels)
    assert chosen == expected_bin
    candidates = np.arange(levels, nbins + 1, stride)
    ours = kl_divergences(hist, levels, candidates)
    assert np.array_equal(np.isinf(ours), np.isinf(expected_kl))
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], expected_kl[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_threshold_ignores_far_outliers(symmetric: bool) -> None:
    """A dense block in [-a, a] plus 5 values at 5a: the KL threshold is the block edge, not 5a."""
    rng = np.random.default_rng(4)
    a = 2.0
    block = rng.triangular(0, 0, a, 100_000)
    block[::2] *= -1
    cal = get_calibrator("entropy", symmetric=symmetric)
    cal.observe("x", block[:50_000])
    cal.observe("x", np.concatenate([block[50_000:], np.full(5, 5 * a)]))
    r = cal.compute()["x"]
    width = 5 * a / 2048
    assert a - 5 * width <= r.hi <= a + width
    # asymmetric, mixed signs: the |x| threshold clipped to the observed range
    assert r.lo == (-r.hi if symmetric else max(block.min(), -r.meta["threshold"]))


def test_entropy_fewer_bits_give_smaller_threshold() -> None:
    x = np.random.default_rng(5).normal(size=100_000)
    thresholds = {}
    for bits in (4, 6, 8):
        cal = get_calibrator("entropy", symmetric=True, num_bits=bits)
        cal.observe("x", x)
        r = cal.compute()["x"]
        assert r.meta["num_levels"] == 2 ** (bits - 1)
        thresholds[bits] = r.hi
    assert thresholds[4] < 0.9 * thresholds[8] and thresholds[4] < thresholds[6] < thresholds[8]


def test_entropy_asymmetric_non_negative_uses_all_levels() -> None:
    x = np.maximum(np.random.default_rng(6).normal(size=50_000), 0.0)
    cal = get_calibrator("entropy", symmetric=False)
    cal.observe("relu", x)
    r = cal.compute()["relu"]
    assert r.meta["num_levels"] == 256 and r.lo == 0.0 and 0.0 < r.hi <= x.max()


def test_entropy_compute_is_fast() -> None:
    rng = np.random.default_rng(7)
    cal = get_calibrator("entropy", symmetric=True)
    for t in range(20):
        cal.observe(f"t{t}", rng.normal(size=2000))
    start = time.perf_counter()
    cal.compute()
    assert time.perf_counter() - start < 10.0  # about 0.3 s; a Python-loop search would take minutes


# ---- mse ---------------------------------------------------------------------------------------


def brute_force_mse(x: np.ndarray, los: np.ndarray, his: np.ndarray, bits: int, symmetric: bool):
    errors = []
    for lo, hi in zip(los, his, strict=True):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = hi / qmax
            xq = np.clip(np.round(x / s), -qmax, qmax) * s
        else:
            qmax = 2**bits - 1
            rmin, rmax = min(lo, 0.0), max(hi, 0.0)
            s = (rmax - rmin) / qmax
            zp = np.round(-rmin / s)
            xq = (np.clip(np.round(x / s) + zp, 0, qmax) - zp) * s
        errors.append(np.mean((x - xq) ** 2))
    return np.array(errors)


@pytest.mark.parametrize(("symmetric", "bits"), [(True, 8), (True, 4), (False, 8), (False, 4)])
def test_mse_matches_brute_force(symmetric: bool, bits: int) -> None:
    x = np.random.default_rng(8).laplace(0.2, 1.0, 40_000)
    cal = get_calibrator("mse", symmetric=symmetric, num_bits=bits, num_candidates=128)
    cal.observe("x", x[:20_000])
    cal.observe("x", x[20_000:])
    r = cal.compute()["x"]
    f = cal.fractions()
    if symmetric:
        m = np.abs(x).max()
        los, his = -f * m, f * m
    else:
        los, his = f * x.min(), f * x.max()
    errors = brute_force_mse(x, los, his, bits, symmetric)
    best = int(np.argmin(errors))
    chosen = int(np.argmin(np.abs(his - r.hi)))
    assert r.lo == pytest.approx(los[chosen]) and r.hi == pytest.approx(his[chosen])
    assert abs(chosen - best) <= 2, (chosen, best)
    assert errors[chosen] <= 1.02 * errors[best]


# ---- contract and bad input --------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", CALIBRATORS.names())
def test_contract(name: str, symmetric: bool) -> None:
    cal = get_calibrator(name, symmetric=symmetric)
    assert isinstance(cal, Calibrator)
    rng = np.random.default_rng(9)
    for i in range(3):
        cal.observe("conv", rng.normal(0.5, 1 + i, (2, 3, 4, 4)).astype(np.float32))
        cal.observe("relu", np.maximum(rng.normal(size=(2, 8)), 0).astype(np.float32))
    ranges = cal.compute()
    assert set(ranges) == {"conv", "relu"}
    for r in ranges.values():
        assert isinstance(r, TensorRange) and r.lo <= r.hi
        if symmetric:
            assert r.lo == -r.hi


@pytest.mark.parametrize("name", CALIBRATORS.names())
@pytest.mark.parametrize(
    ("value", "symmetric", "expected"), [(0.0, False, (0, 0)), (3.0, False, (3, 3)), (-3.0, True, (-3, 3))]
)
def test_constant_tensor(name: str, value: float, symmetric: bool, expected: tuple) -> None:
    cal = get_calibrator(name, symmetric=symmetric)
    cal.observe("c", np.full(10, value))
    cal.observe("c", np.full(3, value))
    r = cal.compute()["c"]
    assert (r.lo, r.hi) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("name", CALIBRATORS.names())
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_tensor(name: str, bad: float) -> None:
    cal = get_calibrator(name)
    cal.observe("fine", np.ones(4))
    with pytest.raises(CalibrationError, match="'/student/conv1'.*NaN/Inf"):
        cal.observe("/student/conv1", np.array([1.0, bad, 2.0], np.float32))


@pytest.mark.parametrize("name", CALIBRATORS.names())
def test_compute_without_data(name: str) -> None:
    cal = get_calibrator(name)
    cal.observe("empty", np.zeros((0, 3)))
    with pytest.raises(CalibrationError, match="no calibration data observed"):
        cal.compute()


def test_unknown_option_lists_allowed() -> None:
    with pytest.raises(CalibrationError, match="unknown option 'percentil'.*allowed:.*percentile"):
        get_calibrator("percentile", percentil=99.0)


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("percentile", {"percentile": 20.0}, "percentile"),
        ("entropy", {"num_bins": "many"}, "num_bins"),
        ("entropy", {"stride": 0}, "stride"),
        ("minmax", {"averaging_constant": 2.0}, "averaging_constant"),
        ("mse", {"num_bits": 1}, "num_bits"),
        ("minmax", {"symmetric": "yes"}, "symmetric"),
    ],
)
def test_bad_option_values(name: str, options: dict, key: str) -> None:
    with pytest.raises(CalibrationError, match=f"option {key}="):
        get_calibrator(name, **options)


def test_unknown_calibrator_lists_available() -> None:
    with pytest.raises(RegistryError, match="unknown calibrator 'kl'.*entropy, map-aware, minmax, mse, percentile"):
        get_calibrator("kl")


def test_third_party_calibrator_is_a_small_class() -> None:
    class Fixed(Calibrator):
        OPTIONS = {"bound": 1.0}

        def observe(self, name: str, array: np.ndarray) -> None:
            self.name = name

        def compute(self) -> dict[str, TensorRange]:
            return {self.name: TensorRange(-self.options["bound"], self.options["bound"])}

    cal = Fixed(bound=2)
    assert cal.options == {"bound": 2.0} and not cal.symmetric and cal.num_bits == 8
    cal.observe("t", np.ones(1))
    assert cal.compute() == {"t": TensorRange(-2.0, 2.0)}
    with pytest.raises(CalibrationError, match="unknown option 'bond'"):
        Fixed(bond=2)


def test_tensor_range_rejects_inverted_bounds() -> None:
    with pytest.raises(CalibrationError, match="lo <= hi"):
        TensorRange(1.0, 0.0)
