"""The benchmark's bookkeeping: bytes a decode step reads, and a bench run end to end (tiny, so only the machinery)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.attention import CacheLayout, KVCache
from llmjax.bench import cache_bytes, run, table, weight_bytes_per_token
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


def test_run_end_to_end(tmp_path):
    results = run(["random:gpt2:tiny"], batches=(1, 3), prompt_tokens=5, new_tokens=17, repeats=1)
    assert [r["batch"] for r in results["rows"]] == [1, 3]
    for row in results["rows"]:
        assert row["step_s"] > 0 and row["hf_step_s"] > 0
        np.testing.assert_allclose(row["speedup"], row["hf_step_s"] / row["step_s"])
        np.testing.assert_allclose(row["decode_tok_s"], row["batch"] / row["step_s"])
        assert 0 < row["roofline"] and results["bandwidth_bytes_s"] > 1e8
    json.dumps(results)   # the CLI stores it as JSON
    assert table(results).count("random:gpt2:tiny") == 2
