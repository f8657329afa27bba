"""The float64 FFN oracle: gradients (including the L1 term) against finite differences."""

import numpy as np
import pytest

from twell import reference as ref


def _weights(rng, d, h, layout):
    wg = rng.standard_normal((h, d)) / np.sqrt(d)
    wu = rng.standard_normal((h, d)) / np.sqrt(d)
    wd = rng.standard_normal((h, d)) / np.sqrt(h)
    return wg, wu, (wd if layout == "hd" else wd.T.copy())


def _loss(x, wg, wu, wd, dy, c, **kw):
    y, cache = ref.ffn_forward(x, wg, wu, wd, **kw)
    return float((y * dy).sum() + c * np.abs(cache["h"]).sum())


def _numeric_grad(f, a, eps=1e-6):
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + eps
        fp = f()
        a[i] = old - eps
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("layout", ["hd", "dh"])
@pytest.mark.parametrize("l1", [0.0, 0.37])
def test_gradients_match_finite_differences(rng, gated, activation, layout, l1):
    m, d, h = 5, 6, 7
    wg, wu, wd = _weights(rng, d, h, layout)
    if not gated:
        wg = None
    dy = rng.standard_normal((m, d))
    kw = dict(gated=gated, activation=activation, w_down_layout=layout)
    # keep finite differences away from the kinks of relu(g) and |h| (g = 0 or u = 0)
    for _ in range(1000):
        x = rng.standard_normal((m, d))
        y, cache = ref.ffn_forward(x, wg, wu, wd, **kw)
        kinks = [cache["u"]] + ([cache["g"]] if gated else [])
        if min(float(np.abs(k).min()) for k in kinks) > 1e-3:
            break
    else:
        pytest.fail("could not draw inputs away from the kinks")
    dx, grads = ref.ffn_backward(dy, cache, l1_coeff=l1)
    f = lambda: _loss(x, wg, wu, wd, dy, l1, **kw)  # noqa: E731
    np.testing.assert_allclose(dx, _numeric_grad(f, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["w_up"], _numeric_grad(f, wu), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["w_down"], _numeric_grad(f, wd), rtol=1e-5, atol=1e-7)
    if gated:
        np.testing.assert_allclose(grads["w_gate"], _numeric_grad(f, wg), rtol=1e-5, atol=1e-7)
    else:
        assert grads["w_gate"] is None


def test_forward_matches_the_definition(rng):
    m, d, h = 4, 8, 16
    x = rng.standard_normal((m, d))
    wg, wu, wd = _weights(rng, d, h, "hd")
    y, cache = ref.ffn_forward(x, wg, wu, wd)
    g = x @ wg.T
    np.testing.assert_allclose(y, (np.maximum(g, 0) * (x @ wu.T)) @ wd)
    y2, _ = ref.ffn_forward(x, wg, wu, wd.T.copy(), w_down_layout="dh")
    np.testing.assert_allclose(y, y2)
    assert ref.l1_sum(cache["h"]) == pytest.approx(np.abs(cache["h"]).sum())
    np.testing.assert_array_equal(ref.active_per_row(cache["h"]), (cache["h"] != 0).sum(axis=1))


def test_shape_errors_name_the_argument(rng):
    x = rng.standard_normal((3, 8))
    wg, wu, wd = _weights(rng, 8, 16, "hd")
    with pytest.raises(ValueError, match=r"w_down has shape \[16, 8\], expected \[8, 16\]"):
        ref.ffn_forward(x, wg, wu, wd, w_down_layout="dh")
    with pytest.raises(ValueError, match="w_up has shape"):
        ref.ffn_forward(x, wg, wu[:, :4], wd)
    with pytest.raises(ValueError, match="w_gate is required"):
        ref.ffn_forward(x, None, wu, wd)
    with pytest.raises(ValueError, match="w_down_layout"):
        ref.ffn_forward(x, wg, wu, wd, w_down_layout="xx")
