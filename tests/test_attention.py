"""Property sweeps for llmjax.attention beyond the chapter's worked examples."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.attention import (Attention, CacheLayout, KVCache, RoPE, attend, make_attention_mask, model_output,
                              prepare_inputs, run_blocks)
from llmjax.layers import Embedding, RMSNorm

TOL = dict(rtol=2e-5, atol=2e-5)


def brute_force_mask(q_pos, k_pos, k_valid, window):
    B, T = q_pos.shape
    S = k_pos.shape[1]
    out = np.zeros((B, T, S), bool)
    for b, i, j in itertools.product(range(B), range(T), range(S)):
        ok = k_valid[b, j] and k_pos[b, j] <= q_pos[b, i]
        if window is not None:
            ok = ok and q_pos[b, i] - window < k_pos[b, j]
        out[b, i, j] = ok
    return out


@pytest.mark.parametrize("window", [None, 1, 2, 5])
def test_mask_matches_definition(window):
    rng = np.random.default_rng(window or 0)
    q_pos = rng.integers(0, 9, (2, 4))
    k_pos = rng.integers(0, 9, (2, 7))
    k_valid = rng.random((2, 7)) < 0.7
    got = np.asarray(make_attention_mask(q_pos, k_pos, k_valid, window))
    np.testing.assert_array_equal(got, brute_force_mask(q_pos, k_pos, k_valid, window))


@pytest.mark.parametrize("H,K,cap", [(5, 5, None), (6, 3, None), (4, 1, 2.0), (6, 2, 30.0)])
def test_attend_matches_numpy(H, K, cap):
    rng = np.random.default_rng(H * 10 + K)
    B, T, S, d = 2, 3, 7, 5
    q = rng.standard_normal((B, T, H, d)).astype(np.float32)
    k, v = rng.standard_normal((2, B, K, S, d)).astype(np.float32)      # head-major, as the cache holds them
    mask = rng.random((B, T, S)) < 0.6
    mask[..., 0] = True
    got = np.asarray(attend(q, k, v, mask, scale=0.37, logit_cap=cap))
    want = np.zeros_like(got)
    for b, t, h in itertools.product(range(B), range(T), range(H)):
        kh = h // (H // K)
        logits = k[b, kh] @ q[b, t, h] * 0.37
        if cap:
            logits = cap * np.tanh(logits / cap)
        logits = np.where(mask[b, t], logits, -np.inf)
        p = np.exp(logits - logits.max())
        want[b, t, h] = (p / p.sum()) @ v[b, kh]
    np.testing.assert_allclose(got, want, **TOL)


def test_rope_refuses_unknown_scaling():
    from llmjax.checkpoints import rope_from_hf

    with pytest.raises(ValueError, match="yarn"):
        RoPE(1e4, "yarn")
    with pytest.raises(ValueError, match="yarn"):
        rope_from_hf({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})


def test_rope_matches_definition():
    d, theta = 12, 500.0
    inv = RoPE(theta).inverse_frequencies(d)
    np.testing.assert_allclose(inv, theta ** -(np.arange(0, d, 2) / d), rtol=1e-6)
    from llmjax.attention import apply_rope

    x = np.random.default_rng(0).standard_normal((1, 1, 1, d)).astype(np.float32)
    t = 37
    got = np.asarray(apply_rope(x, np.array([[t]]), inv))[0, 0, 0]
    half = d // 2
    for i in range(half):
        c, s = np.cos(t * inv[i]), np.sin(t * inv[i])
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + half]
        np.testing.assert_allclose([got[i], got[i + half]], [a * c - b * s, a * s + b * c], rtol=1e-5, atol=1e-6)


class Block(nnx.Module):
    def __init__(self, D, H, K, d, window, rngs):
        self.norm = RMSNorm(D)
        self.attn = Attention(features=D, num_heads=H, num_kv_heads=K, head_dim=d, rope=RoPE(1000.0), window=window,
                              rngs=rngs)

    def __call__(self, x, positions, valid, cache, layer):
        h, cache = self.attn(self.norm(x), positions, valid, cache, layer)
        return x + h, cache


class Decoder(nnx.Module):
    def __init__(self, H, K, window, L=2, V=31, D=24, d=6, *, rngs):
        self.embed = Embedding(V, D, rngs=rngs)
        self.layers = nnx.List([Block(D, H, K, d, window, rngs) for _ in range(L)])
        self.norm = RMSNorm(D)
        self.shape = (L, K, d)

    def __call__(self, tokens, *, positions=None, attention_mask=None, cache=None, return_hidden_states=False):
        positions, valid, cache = prepare_inputs(tokens, positions, attention_mask, cache)
        x, cache, hidden = run_blocks(self.layers, self.embed(tokens), positions, valid, cache, self.norm,
                                      return_hidden_states)
        return model_output(self.embed.attend(x), cache, hidden, return_hidden_states)


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("H,K,window", [(4, 4, None), (4, 2, 3), (6, 1, 1), (6, 3, 8), (2, 1, 2)])
def test_chunked_decode_with_padding_equals_rows_alone(H, K, window, ring):
    """Left-padded rows, a prompt in two chunks, then single tokens: every real logit equals the row run alone —
    with windowed layers' keys in full-length buffers, or in rings of `window` slots (wrapped by either chunk)."""
    rng = np.random.default_rng(H + K)
    model = Decoder(H, K, window, rngs=nnx.Rngs(H * K))
    L, _, d = model.shape
    lengths = [9, 4, 6]
    T = max(lengths)
    rows = [rng.integers(0, 31, n).astype(np.int32) for n in lengths]
    extra = rng.integers(0, 31, (len(rows), 5)).astype(np.int32)
    tokens = np.stack([np.r_[np.zeros(T - len(r), np.int32), r] for r in rows])
    mask = np.stack([np.r_[np.zeros(T - len(r)), np.ones(len(r))] for r in rows]).astype(np.int32)

    layout = CacheLayout(num_kv_heads=K, head_dim=d, dtype=jnp.float32, windows=(window if ring else None,) * L)
    cache = KVCache.create(layout, batch=len(rows), capacity=T + 5 + 2)
    if ring and window:
        assert cache.layers[0].keys.shape[2] == min(window, T + 7)
    step = jax.jit(lambda m, t, a, c: m(t, attention_mask=a, cache=c))
    graph, state = nnx.split(model)
    run = lambda t, a, c: step(nnx.merge(graph, state), t, a, c)
    out1 = run(tokens[:, :4], mask[:, :4], cache)
    out2 = run(tokens[:, 4:], mask[:, 4:], out1.cache)
    got = [np.concatenate([out1.logits, out2.logits], axis=1)]
    cache = out2.cache
    for t in range(extra.shape[1]):
        out = run(extra[:, t:t + 1], None, cache)
        cache = out.cache
        got.append(out.logits)
    got = np.concatenate(got, axis=1)
    for b, row in enumerate(rows):
        alone = model(np.r_[row, extra[b]][None])[0]
        np.testing.assert_allclose(got[b, T - len(row):], alone, **TOL)


def test_hidden_states_follow_transformers_layout():
    model = Decoder(4, 2, None, L=3, rngs=nnx.Rngs(0))
    tokens = np.arange(6, dtype=np.int32)[None] % 31
    out = model(tokens, return_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1
    np.testing.assert_allclose(out.hidden_states[0], model.embed(tokens), **TOL)
    np.testing.assert_allclose(model.embed.attend(out.hidden_states[-1]), out.logits, **TOL)
    assert isinstance(model(tokens), jax.Array)


def test_tokens_must_be_2d():
    with pytest.raises(ValueError, match="batch, length"):
        prepare_inputs(jnp.zeros((3,), jnp.int32), None, None, None)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_ring_ignores_padding_anywhere(window):
    """Padding after real tokens (a later chunk padded for a shorter row, a padded decode step) must not push real
    keys out of a ring: the ring cache gives what the full-length cache gives, and each row what it gives alone."""
    rng = np.random.default_rng(window)
    model = Decoder(4, 2, window, rngs=nnx.Rngs(window))
    L, K, d = model.shape
    chunk1 = rng.integers(0, 31, (2, 4)).astype(np.int32)
    chunk2 = rng.integers(0, 31, (2, 4)).astype(np.int32)
    mask2 = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)          # row 0: padding after its first chunk
    steps = rng.integers(0, 31, (2, 4)).astype(np.int32)
    step_masks = np.array([[1, 0, 1, 1], [1, 1, 1, 1]], np.int32)    # and a padded decode step
    outs = {}
    for ring in (False, True):
        layout = CacheLayout(num_kv_heads=K, head_dim=d, dtype=jnp.float32, windows=(window if ring else None,) * L)
        cache = KVCache.create(layout, batch=2, capacity=16)
        got = []
        out = model(chunk1, cache=cache)
        got.append(out.logits)
        out = model(chunk2, attention_mask=mask2, cache=out.cache)
        got.append(out.logits)
        for t in range(steps.shape[1]):
            out = model(steps[:, t:t + 1], attention_mask=step_masks[:, t:t + 1], cache=out.cache)
            got.append(out.logits)
        outs[ring] = np.concatenate(got, axis=1)
    real = np.concatenate([np.ones((2, 4), bool), mask2.astype(bool), step_masks.astype(bool)], axis=1)
    np.testing.assert_allclose(outs[True][real], outs[False][real], **TOL)
    for b in range(2):   # and the full-length cache equals the row alone, real tokens only
        alone = model(np.concatenate([chunk1[b], chunk2[b], steps[b]])[real[b]][None])[0]
        np.testing.assert_allclose(outs[False][b][real[b]], alone, **TOL)
