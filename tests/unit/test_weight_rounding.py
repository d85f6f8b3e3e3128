"""Weight rounding (qtool.weight_rounding): Conv patches, the OPTQ rounding on its grid, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtool.errors import RegistryError
from qtool.graph.profiles import QuantParams
from qtool.weight_rounding import (
    ROUNDINGS,
    ConvLayer,
    gptq_values,
    gram,
    nearest_values,
    output_error,
    patches,
    round_conv,
    round_weights,
)


@pytest.mark.parametrize("group,kernel,pads,strides,dilations", [
    (1, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1)),
    (4, (3, 3), (1, 0, 2, 1), (2, 1), (1, 1)),  # grouped, uneven pads, strided
    (8, (5, 3), (2, 1, 2, 1), (1, 2), (2, 1)),  # depthwise, dilated
    (2, (1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),
])
def test_patches_times_weight_rows_is_the_conv(group, kernel, pads, strides, dilations):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 11, 10)).astype(np.float32)
    w = rng.normal(size=(16, 8 // group, *kernel)).astype(np.float32)
    layer = ConvLayer("c", "x", "w", group, kernel, pads, strides, dilations)
    p = patches(x, layer)  # (positions, groups, cols)
    rows = w.reshape(group, 16 // group, -1)
    mine = np.einsum("pgi,gri->pgr", p, rows).reshape(p.shape[0], 16)
    t, left, b, r = pads
    xt = torch.nn.functional.pad(torch.from_numpy(x), (left, r, t, b))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(w), stride=strides, dilation=dilations, groups=group)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 16).numpy()
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4)


def _correlated(seed: int, groups: int = 1, rows: int = 12, cols: int = 24, n: int = 400):
    """Weights and a Gram of strongly correlated inputs (where rounding each weight alone is far from best)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(groups, cols, cols)) * 0.3 + np.eye(cols)
    x = np.einsum("gnc,gcd->ngd", rng.normal(size=(groups, n, 4)) @ rng.normal(size=(groups, 4, cols)), mix)
    x = x + 0.05 * rng.normal(size=x.shape)
    w = rng.normal(size=(groups, rows, cols))
    return w, gram(x.astype(np.float32))


def _grid(w: np.ndarray, qmax: int = 7) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=2, keepdims=True) / qmax  # symmetric per row
    return scale, np.zeros_like(scale)


@pytest.mark.parametrize("groups", [1, 3])
def test_gptq_values_lie_on_the_grid_and_cut_the_output_error_at_4_bits(groups):
    w, h = _correlated(1, groups)
    scale, zp = _grid(w)
    near = nearest_values(w, scale, zp, -7, 7)
    rounded = gptq_values(w, h, scale, zp, -7, 7)
    codes = rounded / scale + zp
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)
    assert np.round(codes).min() >= -7 and np.round(codes).max() <= 7
    assert output_error(w, rounded, h) < 0.5 * output_error(w, near, h)
    # deterministic: a second call gives the same values, bit for bit
    np.testing.assert_array_equal(rounded, gptq_values(w, h, scale, zp, -7, 7))


def test_gptq_is_nearest_when_the_inputs_are_uncorrelated_and_equal():
    w, _ = _correlated(2)
    h = np.eye(w.shape[2])[None] * 100.0  # orthogonal inputs: no other column can absorb an error
    scale, zp = _grid(w)
    np.testing.assert_allclose(gptq_values(w, h, scale, zp, -7, 7), nearest_values(w, scale, zp, -7, 7))


def test_a_column_whose_input_is_always_zero_passes_no_error_on():
    w, h = _correlated(3)
    h[:, 5, :] = 0.0
    h[:, :, 5] = 0.0
    scale, zp = _grid(w)
    rounded = gptq_values(w, h, scale, zp, -7, 7)
    assert np.isfinite(rounded).all()
    # the columns before it do not move column 5 (their error does not reach it): it is rounded as it was
    np.testing.assert_allclose(rounded[:, :, 5], nearest_values(w[:, :, 5], scale[:, :, 0], zp[:, :, 0], -7, 7))
    assert not np.allclose(rounded, nearest_values(w, scale, zp, -7, 7))  # the other columns did move


def test_round_conv_reports_both_errors_and_keeps_the_weight_shape():
    w, h = _correlated(4, groups=2, rows=6, cols=18)
    weight = w.reshape(12, 2, 3, 3).astype(np.float32)  # 2 groups of 6 output channels, 2 x 3 x 3 columns
    scale = (np.abs(weight).reshape(12, -1).max(axis=1) / 7).astype(np.float32)
    values, errors = round_conv(weight, h, scale, np.zeros(12, np.int8), -7, 7)
    assert values.shape == weight.shape and values.dtype == np.float32
    assert 0 < errors["gptq"] < errors["nearest"]
    p = QuantParams("int8", 4, True, 0)
    from qtool.graph.profiles import quantize_array

    codes = quantize_array(values, scale, np.zeros(12, np.int8), p).astype(np.float64)
    np.testing.assert_allclose(codes * scale[:, None, None, None], values, rtol=1e-6, atol=1e-7)


def test_registry_lists_both_methods_and_names_an_unknown_one():
    assert set(ROUNDINGS.names()) == {"nearest", "gptq"}
    with pytest.raises(RegistryError, match="weight rounding"):
        round_weights("stochastic", None, None, {}, list)


def test_output_grid_matches_the_patch_rows():
    from qtool.weight_rounding import output_grid

    x = np.zeros((2, 4, 13, 11), np.float32)
    for layer in (ConvLayer("c", "x", "w", 1, (3, 3), (1, 1, 1, 1), (2, 2), (1, 1)),
                  ConvLayer("c", "x", "w", 4, (5, 3), (2, 0, 1, 1), (1, 2), (2, 1))):
        ho, wo = output_grid(x, layer)
        assert patches(x, layer).shape[0] == 2 * ho * wo
