"""Attention and the pieces of the block against plain textbook formulas.

The end-to-end tests compare whole models with transformers on short prompts;
these make sure the blocked causal attention (ATTENTION_BLOCK queries at a
time) is exact for long prompts, for prompts that continue a cache, and for
grouped-query layouts.
"""

import numpy as np
import pytest

from llamanp import model as M


def reference_attention(q, keys, values, start):
    """softmax(q k^T / sqrt(d) + causal mask) v, head by head, in float64."""
    T, n_heads, hd = q.shape
    n_kv, S, _ = keys.shape
    group = n_heads // n_kv
    out = np.zeros((T, n_heads, hd))
    for h in range(n_heads):
        k, v = keys[h // group].astype(np.float64), values[h // group].astype(np.float64)
        for t in range(T):
            s = k[: start + t + 1] @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[: start + t + 1]
    return out.reshape(T, n_heads * hd)


@pytest.mark.parametrize("T,start,n_heads,n_kv", [
    (1, 0, 4, 2), (1, 37, 6, 2), (5, 0, 4, 4), (300, 0, 6, 2),
    (M.ATTENTION_BLOCK, 3, 3, 1), (M.ATTENTION_BLOCK + 1, 0, 4, 2), (260, 50, 4, 1)])
def test_blocked_attention_equals_reference(T, start, n_heads, n_kv):
    rng = np.random.default_rng(T + start)
    hd = 8
    q = rng.standard_normal((T, n_heads, hd), dtype=np.float32)
    keys = rng.standard_normal((n_kv, start + T, hd), dtype=np.float32)
    values = rng.standard_normal((n_kv, start + T, hd), dtype=np.float32)
    # llamanp.kvcache's layout: [n_kv, hd, positions]
    got = M.attention(q, keys.transpose(0, 2, 1), values.transpose(0, 2, 1), start)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_attention(q, keys, values, start),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,start", [(1, 20), (40, 0), (M.ATTENTION_BLOCK + 9, 30)])
@pytest.mark.parametrize("case", ["overflow", "underflow"])
def test_attention_with_scores_beyond_float32_exp(T, start, case):
    """Scores far outside exp's float32 range (the softmax first tries
    without subtracting the row maxima, and must notice and redo it)."""
    rng = np.random.default_rng(7)
    n_heads, n_kv, hd = 4, 2, 8
    q = rng.standard_normal((T, n_heads, hd), dtype=np.float32)
    keys = rng.standard_normal((n_kv, start + T, hd), dtype=np.float32)
    if case == "overflow":      # scores of several thousand, either sign
        q *= 300
    else:                       # every score near -300: each power underflows to 0
        q[:] = 10
        keys[:] = -11 + rng.standard_normal(keys.shape, dtype=np.float32) * 0.3
    values = rng.standard_normal((n_kv, start + T, hd), dtype=np.float32)
    got = M.attention(q, keys.transpose(0, 2, 1), values.transpose(0, 2, 1), start,
                      M.Workspace())
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_attention(q, keys, values, start),
                               rtol=1e-4, atol=1e-4)


def test_swiglu_and_rmsnorm_formulas():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 10), dtype=np.float32) * 30   # exp overflows for some
    want = (g[:, :5] / (1 + np.exp(-g[:, :5].astype(np.float64)))) * g[:, 5:]
    np.testing.assert_allclose(M.swiglu(g, 5), want, rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((4, 16), dtype=np.float32)
    w = rng.standard_normal(16, dtype=np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(M.rmsnorm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)


def test_linear_one_row_equals_matrix_product():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((7, 5), dtype=np.float32)
    for rows in (1, 3):
        x = rng.standard_normal((rows, 5), dtype=np.float32)
        np.testing.assert_allclose(M.linear(x, W.T), x.astype(np.float64) @ W.T, rtol=1e-5)
