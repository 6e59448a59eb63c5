"""The benchmark's bookkeeping: bytes a decode step reads, and a bench run end to end (tiny, so only the machinery)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.attention import CacheLayout, KVCache
from llmjax.bench import (anatomy_table, cache_bytes, end_to_end_table, matmul_floor, run,
                          step_flops, step_ops, step_weights, table, weight_bytes_per_token)
from llmjax.gpt2 import GPT2, GPT2Config
from llmjax.llama import Llama, LlamaConfig


def param_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_weight_bytes_tied_and_untied():
    config = LlamaConfig.tiny()
    assert not config.tie_word_embeddings
    untied_model = Llama(config, rngs=nnx.Rngs(0))   # separate lm_head: the embedding table is only indexed
    assert weight_bytes_per_token(untied_model) == param_bytes(untied_model) - 4 * config.vocab_size * config.hidden_size
    tied_model = Llama(dataclasses.replace(config, tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert weight_bytes_per_token(tied_model) == param_bytes(tied_model)   # the table is the head: read once
    gpt2 = GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))   # tied, plus a position table that is only indexed
    c = GPT2Config.tiny()
    assert weight_bytes_per_token(gpt2) == param_bytes(gpt2) - 4 * c.n_positions * c.n_embd


def test_cache_bytes_match_the_cache():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    c = LlamaConfig.tiny()
    layout = CacheLayout(num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=jnp.float32,
                         windows=(None,) * c.num_hidden_layers)
    cache = KVCache.create(layout, batch=3, capacity=40)
    assert cache_bytes(model, 3, 40) == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_step_weights_are_the_products_of_a_step():
    c = LlamaConfig.tiny()
    untied = Llama(c, rngs=nnx.Rngs(0))
    weights = step_weights(untied)        # q, k, v, o, gate, up, down per layer; lm_head
    assert len(weights) == 7 * c.num_hidden_layers + 1 and not any(t for _, t in weights)
    assert weights[-1][0].shape == (c.hidden_size, c.vocab_size)
    tied = GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))
    (head, transposed), g = step_weights(tied)[-1], GPT2Config.tiny()
    assert transposed and head.shape == (g.vocab_size, g.n_embd)   # the token table, not positions
    # every weight a step reads, less the norms and biases
    vectors = sum(x.nbytes for x in jax.tree.leaves(nnx.state(untied, nnx.Param)) if x.ndim == 1)
    assert sum(w.nbytes for w, _ in weights) == weight_bytes_per_token(untied) - vectors
    assert step_flops(untied, 3) == 3 * 2 * sum(w.size for w, _ in weights)
    assert matmul_floor(untied, 2, repeats=2) > 0


def test_step_ops_counts_the_compiled_step():
    model, c = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)), LlamaConfig.tiny()
    for batch in (1, 2):
        ops = step_ops(model, batch=batch, capacity=32)
        assert ops["dot"] >= 7 * c.num_hidden_layers        # the products, fused or not
        assert ops["kernels"] >= ops["fusion"] + ops.get("copy", 0) > 0
        assert "parameter" not in ops and "constant" not in ops


def test_run_end_to_end(tmp_path):
    results = run(["random:gpt2:tiny"], batches=(1, 3), prompt_tokens=5, new_tokens=17, repeats=1,
                  end_to_end=9, long_prompt=20)
    assert [r["batch"] for r in results["rows"]] == [1, 3]
    for row in results["rows"]:
        assert row["step_s"] > 0 and row["hf_step_s"] > 0
        np.testing.assert_allclose(row["speedup"], row["hf_step_s"] / row["step_s"])
        np.testing.assert_allclose(row["decode_tok_s"], row["batch"] / row["step_s"])
        assert 0 < row["roofline"] and results["bandwidth_bytes_s"] > 1e8
        assert row["matmul_s"] > 0 and row["hlo_ops"]["dot"] > 0
        assert row["e2e_new_tokens"] == 9 and row["long_prompt_tokens"] == 20
        np.testing.assert_allclose(row["e2e_speedup"], row["hf_e2e_s"] / row["e2e_s"])
        assert row["long_prefill_tok_s"] > 0 and row["hf_long_prefill_tok_s"] > 0
    assert results["gemm_flop_s"] > 1e8
    json.dumps(results)   # the CLI stores it as JSON
    assert table(results).count("random:gpt2:tiny") == 2
    assert anatomy_table(results).count("gpt2:tiny") == 2
    assert end_to_end_table(results).count("gpt2:tiny") == 2 and "–" not in end_to_end_table(results)
