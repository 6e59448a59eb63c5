"""Sampling without sorting the vocabulary: the fast filters against their full-sort definitions, bit for bit, on
random and adversarial logits; the pieces (candidates, radix select, float keys, the two-stage draw) against brute
force; and the sampler's distribution by chi-square."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import chisquare

from llmjax.generation import (CANDIDATES, Sampling, categorical, filter_min_p, filter_top_k, filter_top_p,
                               filter_top_p_reference, float_keys, key_floats, mass_cut, nucleus_cut, sample,
                               stream_ids)
from llmjax.llama import Llama, LlamaConfig

# p is an argument here, not a constant as in the sampler: one compiled filter per shape serves every p (compiling one
# per (p, shape) took most of this file's minutes). test_sample_* and test_a_rows_sample_* run the sampler as it is.
top_p = jax.jit(filter_top_p, static_argnames="candidates")
top_p_reference = jax.jit(filter_top_p_reference)
paths = jax.jit(jax.vmap(lambda row, p, candidates: nucleus_cut(row, p, candidates)[1], (0, None, None)),
                static_argnums=2)


@pytest.fixture(autouse=True)
def free_compiled_programs_per_test():
    """This file compiles a sampler for each of ~200 settings and shapes: let each test's go (see conftest.py)."""
    yield
    jax.clear_caches()


def assert_same_filter(logits, p, candidates=CANDIDATES):
    """filter_top_p == filter_top_p_reference: the same kept set and the same values, bit for bit, and so the same
    renormalised probabilities. Row by row: where float32 rounding decides the cut, the reference itself can cut a
    row differently alone and in a batch (XLA compiles its sums differently for another shape), and a row's result
    must not depend on its neighbours."""
    logits = jnp.asarray(logits, jnp.float32)
    fast = np.asarray(top_p(logits, p=p, candidates=candidates))
    reference = np.concatenate([np.asarray(top_p_reference(logits[b:b + 1], p=p)) for b in range(len(logits))])
    np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(reference))
    np.testing.assert_array_equal(fast, reference)
    np.testing.assert_array_equal(jax.nn.softmax(fast, -1), jax.nn.softmax(reference, -1))
    return np.asarray(paths(jnp.asarray(logits), p, candidates))


def exact_threshold(row: np.ndarray, p: float) -> float:
    """Top-p's threshold in float64 arithmetic on the float32 logits: the largest value whose mass-at-or-above
    reaches p."""
    values = np.sort(row.astype(np.float64))[::-1]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    return values[(np.cumsum(probs) - probs < p).sum() - 1]


@pytest.mark.parametrize("V", [7, 300, 5000, 49_152])
def test_top_p_equals_the_reference_on_random_logits(V):
    """Four rows at each of three temperatures in one batch: each row is filtered on its own (and checked alone
    against the reference), so one compiled filter per (V, p) covers flat, middling and peaked rows."""
    scales = np.repeat([0.5, 2.0, 6.0], 4)[:, None]
    logits = jnp.asarray(np.random.default_rng(V).normal(size=(12, V)) * scales, jnp.float32)
    seen = set()
    for p in (1e-6, 0.05, 0.5, 0.9, 0.95, 0.999):
        seen |= set(assert_same_filter(logits, p).tolist())
        seen |= set(assert_same_filter(logits, p, candidates=4).tolist())   # radix select far more often
    assert seen & {0, 1}                                                  # not everything went to the reference


def test_certified_cuts_are_the_exact_nucleus():
    """Where the fast path trusts its cut (path 0 or 1), the cut is the nucleus of exact (float64) arithmetic."""
    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(size=(8, 20_000)) * s for s in (1.0, 2.0, 4.0)]).astype(np.float32)
    logits[:8, rng.integers(0, 20_000, 500)] += 6
    trusted = 0
    cuts_of_rows = jax.jit(jax.vmap(nucleus_cut, in_axes=(0, None)))     # as the sampler runs it: compiled
    for p in (0.5, 0.9, 0.95):
        cuts, paths = map(np.asarray, cuts_of_rows(jnp.asarray(logits), p))
        for row, cut, path in zip(logits, cuts, paths):
            if path < 2:
                assert float(cut) == exact_threshold(row, p)
                trusted += 1
    assert trusted > 0.8 * 3 * len(logits)


@pytest.mark.parametrize("V", [10, 1000, 262_144])
@pytest.mark.parametrize("p", [0.01, 0.5, 0.99])
def test_flat_rows_keep_everything(V, p):
    """All logits equal: one tie group, kept whole whatever p."""
    logits = jnp.full((2, V), 1.5, jnp.float32)
    assert_same_filter(logits, p)
    assert np.isfinite(np.asarray(top_p(logits, p=p))).all()


def test_ties_at_the_cut_and_at_the_edge_of_the_candidates():
    groups = [(3, 5.0), (10, 4.0), (500, 3.0), (20_000, 0.0)]        # (count, value): cuts fall inside groups
    row = np.concatenate([np.full(n, v) for n, v in groups]).astype(np.float32)
    rng = np.random.default_rng(0)
    rows = np.stack([rng.permutation(row) for _ in range(3)])
    for p in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        assert_same_filter(rows, p)
    edge = np.r_[np.linspace(9, 8, 250), np.full(60, 7.5), rng.normal(size=5000)].astype(np.float32)
    edge_rows = np.stack([rng.permutation(edge) for _ in range(2)])       # a tie group across position 256
    for p in (0.3, 0.6, 0.8, 0.9, 0.95):
        assert_same_filter(edge_rows, p)


def test_p_exactly_at_a_cumulative_mass_goes_to_the_reference():
    """p equal to the reference's own mass before a token (and the floats either side): too close to call."""
    row = np.random.default_rng(5).normal(size=3000).astype(np.float32) * 3
    ordered = np.sort(row)[::-1]
    probs = jax.nn.softmax(jnp.asarray(ordered))
    before = np.asarray(jnp.cumsum(probs) - probs)
    for position in (1, 5, 40, 300):
        at = float(before[position])
        for p in (at, float(np.nextafter(np.float32(at), 0)), float(np.nextafter(np.float32(at), 1))):
            assert 2 in assert_same_filter(row[None], p)


@pytest.mark.parametrize("p", [1e-12, 1e-7, 0.999_99, 1 - 2**-24, 1.0])
def test_p_near_0_and_near_1(p):
    rng = np.random.default_rng(7)
    logits = np.concatenate([rng.normal(size=(3, 4000)) * 2, np.full((1, 4000), -1.0)]).astype(np.float32)
    logits[0, 17] = 30.0                                                   # one dominant token
    assert_same_filter(logits, p)
    if p < 1e-6:
        assert np.isfinite(np.asarray(top_p(logits, p=p)))[:3].sum(-1).tolist() == [1, 1, 1]


def test_after_top_k_minus_infinity_and_huge_k():
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(4, 3000)) * 2, jnp.float32)
    masked = logits.at[:, rng.choice(3000, 1000, replace=False)].set(-jnp.inf)      # a masked vocabulary
    for k in (1, 2, 50, 2999, 3000, 3001, 10**9):
        kept = filter_top_k(logits, k)
        for p in (0.3, 0.9, 0.97):
            assert_same_filter(kept, p)
            assert_same_filter(filter_top_k(masked, k), p)
    np.testing.assert_array_equal(filter_top_k(logits, 10**9), logits)


def test_one_dominant_token():
    logits = np.zeros((2, 262_144), np.float32)
    logits[:, 12345] = 40.0
    for p in (0.5, 0.95, 0.999_999):
        assert_same_filter(logits, p)
    assert np.isfinite(np.asarray(top_p(logits, p=0.95))).sum() == 2


def test_rows_of_one_batch_take_different_paths():
    """Each row is filtered on its own: a batch that mixes the three paths equals the reference, and each row equals
    that row alone."""
    rng = np.random.default_rng(1)
    peaked = rng.normal(size=20_000) * 2
    peaked[rng.choice(20_000, 12, replace=False)] += 14
    wide = rng.normal(size=20_000)
    wide[rng.choice(20_000, 2000, replace=False)] += 8
    close = np.log(np.r_[0.5, 0.45, np.full(19_998, 0.05 / 19_998)])         # mass before token 2: 0.95
    batch = np.stack([peaked, wide, close, wide[::-1], peaked[::-1]]).astype(np.float32)
    assert sorted(set(assert_same_filter(batch, 0.95).tolist())) == [0, 1, 2]
    together = np.asarray(top_p(batch, p=0.95))
    for b in range(len(batch)):
        np.testing.assert_array_equal(together[b], np.asarray(top_p(batch[b:b + 1], p=0.95))[0])


def test_top_k_equals_a_sort():
    rng = np.random.default_rng(2)
    logits = np.round(rng.normal(size=(5, 1000)) * 3, 1).astype(np.float32)     # ties, including at the k-th
    for k in (1, 3, 50, 999, 1000, 5000):
        kth = np.sort(logits, -1)[:, ::-1][:, min(k, 1000) - 1:min(k, 1000)]
        np.testing.assert_array_equal(filter_top_k(jnp.asarray(logits), k), np.where(logits < kth, -np.inf, logits))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU top-k rewrite")
def test_top_k_compiles_to_top_k_not_a_sort():
    text = jax.jit(lambda x: filter_top_k(x, 40)).lower(jnp.ones((2, 50_000))).compile().as_text()
    assert "TopK" in text and " sort(" not in text


def test_float_keys_order_like_floats():
    rng = np.random.default_rng(4)
    special = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38, np.inf], np.float32)
    x = np.concatenate([special, (rng.normal(size=2000) * 10.0 ** rng.integers(-20, 20, 2000)).astype(np.float32)])
    keys = np.asarray(float_keys(jnp.asarray(x))).astype(np.int64)
    a, b = rng.integers(0, len(x), (2, 20_000))
    np.testing.assert_array_equal(keys[a] < keys[b], x[a] < x[b])
    np.testing.assert_array_equal(keys[a] == keys[b], x[a] == x[b])
    np.testing.assert_array_equal(key_floats(jnp.asarray(keys.astype(np.uint32))), x)


def test_mass_cut_is_the_largest_value_whose_mass_at_or_above_reaches_the_target():
    rng = np.random.default_rng(8)
    for trial in range(30):
        x = np.round(rng.normal(size=800) * 4, int(trial % 3)).astype(np.float32)
        w = (rng.random(800) * (rng.random(800) < 0.7)).astype(np.float32)          # zero weights too
        target = float(rng.random() * w.sum())
        brute = max(v for v in np.unique(x) if w[x >= v].sum() >= target)
        assert float(mass_cut(jnp.asarray(x), jnp.asarray(w), target)) == brute


def test_min_p_unchanged_and_in_order_after_top_p():
    """min-p keeps its one-pass definition; composed after top-k and top-p it sees what they left."""
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(3, 2000)) * 3, jnp.float32)
    fast = filter_min_p(filter_top_p(filter_top_k(logits, 300), 0.9), 0.05)
    reference = filter_min_p(filter_top_p_reference(filter_top_k(logits, 300), 0.9), 0.05)
    np.testing.assert_array_equal(fast, reference)


def test_two_stage_draw_is_the_softmax():
    rng = np.random.default_rng(6)
    probs = rng.random(1300) ** 8                                   # 1,300 tokens: 3 blocks, the last one padded
    probs[rng.choice(1300, 400, replace=False)] = 0                 # -inf logits
    probs /= probs.sum()
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    draws = np.asarray(jax.jit(jax.vmap(categorical, (0, None)))(jax.random.split(jax.random.key(1), 40_000),
                                                                      logits))
    counts = np.bincount(draws, minlength=1300)
    assert counts[probs == 0].sum() == 0
    order = np.argsort(probs)[::-1]
    bins = np.array_split(order[:(probs > 0).sum()], 25)            # 25 groups of tokens of similar probability
    observed = np.array([counts[b].sum() for b in bins])
    expected = np.array([probs[b].sum() for b in bins]) * len(draws)
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


@pytest.mark.parametrize("sampling", [Sampling(0.8, top_p=0.9), Sampling(1.0, top_k=100, top_p=0.95, min_p=0.02),
                                      Sampling(1.3)])
def test_sample_draws_the_reference_distribution(sampling):
    """The fast sampler against the probabilities the full-sort filters define, on a 5,000-token row."""
    rng = np.random.default_rng(12)
    row = np.float32(rng.normal(size=5000) * 2)
    x = jnp.asarray(row)[None] / sampling.temperature
    if sampling.top_k:
        x = filter_top_k(x, sampling.top_k)
    if sampling.top_p:
        x = filter_top_p_reference(x, sampling.top_p)
    if sampling.min_p:
        x = filter_min_p(x, sampling.min_p)
    probs = np.asarray(jax.nn.softmax(x[0]), np.float64)
    draws = np.asarray(sample(jnp.asarray(np.tile(row, (30_000, 1))), jax.random.key(3), sampling))
    counts = np.bincount(draws, minlength=5000)
    assert counts[probs == 0].sum() == 0
    order = np.argsort(probs)[::-1][:(probs > 0).sum()]
    bins = [b for b in np.array_split(order, 20) if len(b)]
    observed = np.array([counts[b].sum() for b in bins])
    expected = np.array([probs[b].sum() for b in bins])
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


def test_a_rows_sample_ignores_which_path_its_neighbour_took():
    rng = np.random.default_rng(13)
    batch = rng.normal(size=(3, 30_000)).astype(np.float32)
    batch[1, rng.choice(30_000, 10, replace=False)] += 12                   # candidates
    batch[2, rng.choice(30_000, 3000, replace=False)] += 8                  # radix select
    changed = batch.copy()
    changed[0] = np.log(np.r_[0.5, 0.45, np.full(29_998, 0.05 / 29_998)])    # row 0 now goes to the reference
    key, sampling = jax.random.key(4), Sampling(1.0, top_p=0.95)
    for seed in range(5):
        a = np.asarray(sample(jnp.asarray(batch), jax.random.fold_in(key, seed), sampling))
        b = np.asarray(sample(jnp.asarray(changed), jax.random.fold_in(key, seed), sampling))
        np.testing.assert_array_equal(a[1:], b[1:])


def test_streaming_chunks_sample_the_same_tokens():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(5))
    ids = np.random.default_rng(2).integers(3, 200, (2, 7)).astype(np.int32)
    sampling = Sampling(0.9, top_k=40, top_p=0.9)
    runs = [np.concatenate([np.asarray(t) for t, _ in stream_ids(model, ids, max_new_tokens=21, sampling=sampling,
                                                                   seed=3, chunk=chunk)], axis=1) for chunk in (4, 16)]
    np.testing.assert_array_equal(runs[0], runs[1])
