"""The sampler (engine/models/sampling.py): distributions, per-row parameters in one call equal to
each row alone, greedy and temperature-0 rows, top-k per row, keys and noise."""
from __future__ import annotations

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from engine.errors import ConfigError
from engine.models.sampling import gumbel, sample, site_key, split_keys

P = np.array([0.4, 0.3, 0.2, 0.1], np.float32)


def _freq(tok: mx.array, v: int = 4) -> np.ndarray:
    t = np.array(tok)
    return np.bincount(t, minlength=v) / len(t)


def test_distribution_top_k_and_temperature_one_key():
    key = mx.random.key(0)
    logits = mx.broadcast_to(mx.array(np.log(P)), (20000, 4))
    np.testing.assert_allclose(_freq(sample(logits, 1.0, 0, False, key)), P, atol=0.015)
    tok2 = sample(logits, 1.0, 2, False, key)
    assert set(np.unique(np.array(tok2))) == {0, 1}
    np.testing.assert_allclose(_freq(tok2)[:2], [4 / 7, 3 / 7], atol=0.015)
    p4 = P.astype(np.float64) ** 4                                          # temperature 0.25: p ** 4 renormalised
    np.testing.assert_allclose(_freq(sample(logits, 0.25, 0, False, key)), p4 / p4.sum(), atol=0.015)
    assert (np.array(sample(logits, 0.7, 25, True, key)) == 0).all()       # greedy
    assert (np.array(sample(logits, 0.0, 25, False, key)) == 0).all()      # temperature 0


def test_distribution_per_row_parameters_and_keys():
    """Three groups of rows in ONE call (the per-row top-k path): each keeps its own distribution."""
    n = 10000
    logits = mx.broadcast_to(mx.array(np.log(P)), (3 * n, 4))
    temp = np.repeat(np.array([1.0, 1.0, 0.25], np.float32), n)
    top_k = np.repeat(np.array([0, 2, 0], np.int32), n)
    keys = mx.random.split(mx.random.key(1), 3 * n)
    tok = np.array(sample(logits, temp, top_k, np.zeros(3 * n, bool), keys))
    np.testing.assert_allclose(_freq(mx.array(tok[:n])), P, atol=0.015)
    f2 = _freq(mx.array(tok[n:2 * n]))
    assert f2[2:].sum() == 0
    np.testing.assert_allclose(f2[:2], [4 / 7, 3 / 7], atol=0.015)
    p4 = P.astype(np.float64) ** 4
    np.testing.assert_allclose(_freq(mx.array(tok[2 * n:])), p4 / p4.sum(), atol=0.015)


# Rows with their own temperature, top-k and greedy flag: greedy, temperature 0, top-k 1, top-k past
# the vocabulary, no top-k, equal and different temperatures.
TEMP = np.array([0.7, 1.3, 0.0, 0.9, 0.7, 2.0, 0.7, 1.0], np.float32)
TOP_K = np.array([5, 0, 10, 7, 3, 1, 5, 100], np.int32)
GREEDY = np.array([False, False, False, True, False, False, False, False])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rows_in_one_call_equal_each_row_alone(dtype):
    v, b = 64, len(TEMP)
    rng = np.random.default_rng(0)
    seen = [set() for _ in range(b)]
    for trial in range(40):
        logits = mx.array(rng.normal(0, 2, (b, v)).astype(np.float32)).astype(dtype)
        keys = mx.random.split(mx.random.key(trial), b)
        got = np.array(sample(logits, TEMP, TOP_K, GREEDY, keys))
        alone = [int(sample(logits[r:r + 1], float(TEMP[r]), int(TOP_K[r]), bool(GREEDY[r]), keys[r])[0])
                 for r in range(b)]
        np.testing.assert_array_equal(got, alone)
        arg = np.array(mx.argmax(logits, axis=-1))
        x = np.array(logits.astype(mx.float32))
        for r in range(b):
            seen[r].add(int(got[r]))
            if GREEDY[r] or TEMP[r] == 0 or TOP_K[r] == 1:
                assert got[r] == arg[r]
            elif 0 < TOP_K[r] < v:                                        # never outside the k best
                assert x[r, got[r]] >= np.sort(x[r])[v - TOP_K[r]]
    # the sampled rows really sample (the checks above would pass on argmax everywhere)
    for r in (0, 1, 4, 6, 7):
        assert len(seen[r]) > 3, (r, seen[r])


def test_scalars_equal_uniform_rows_and_a_noise_argument():
    """Every row with the same parameters: scalars and (B,) arrays are the same call; one key for
    all rows draws the logits' shape, and passing that noise gives the same tokens."""
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(0, 2, (5, 300)).astype(np.float32))
    key = mx.random.key(7)
    a = np.array(sample(logits, 0.8, 25, False, key))
    b = np.array(sample(logits, np.full(5, 0.8, np.float32), np.full(5, 25), np.zeros(5, bool), key))
    c = np.array(sample(logits, 0.8, 25, False, noise=mx.random.gumbel((5, 300), key=key)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # one key per row: row r draws what a batch of one with that key draws
    keys = mx.random.split(key, 5)
    d = np.array(sample(logits, 0.8, 25, False, keys))
    np.testing.assert_array_equal(d, [int(sample(logits[r:r + 1], 0.8, 25, False, keys[r])[0]) for r in range(5)])
    assert (a != d).any()


def test_split_keys_and_gumbel_per_row_equal_alone():
    keys = mx.random.split(mx.random.key(3), 4)
    nxt, sites = split_keys(keys, 9)
    assert nxt.shape == (4, 2) and sites.shape == (4, 9, 2)
    for r in range(4):
        n1, s1 = split_keys(keys[r], 9)
        np.testing.assert_array_equal(np.array(nxt[r]), np.array(n1))
        np.testing.assert_array_equal(np.array(sites[r]), np.array(s1))
        np.testing.assert_array_equal(np.array(site_key(sites, 2)[r]), np.array(site_key(s1, 2)))
    g = gumbel(sites[:, 1:4], (1, 50))
    assert g.shape == (4, 3, 1, 50)
    np.testing.assert_array_equal(np.array(g[2, 1]), np.array(mx.random.gumbel((1, 50), key=sites[2, 2])))
    assert np.array(g).std() > 0.5


def test_errors():
    logits = mx.zeros((3, 10))
    with pytest.raises(ConfigError, match=r"shape \(2,\)"):
        sample(logits, np.ones(2, np.float32), 0, False, mx.random.key(0))
    with pytest.raises(ConfigError, match="needs a key or the noise"):
        sample(logits, 1.0, 0, False)
    assert np.array(sample(logits, 1.0, 0, True)).tolist() == [0, 0, 0]   # greedy needs no key
