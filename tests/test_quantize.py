"""Chapter 17's weight formats (`llmjax.perf.quantize`): the integer product is exact, every architecture runs
quantized — full forward and generation with a cache and left padding — close to float32, and the real SmolLM2
keeps its answers in int8."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
from llmjax.bench import weight_bytes_per_token
from llmjax.gemma import GemmaConfig
from llmjax.gpt2 import GPT2Config
from llmjax.llama import LlamaConfig
from llmjax.mistral import MistralConfig, MixtralConfig
from llmjax.models import ARCHITECTURES
from llmjax.perf import (PARAGRAPH, WEIGHT_FORMATS, Int8Linear, agreement, int8_product, quantize,
                         quantize_rows)

CASES = {"gpt2": ("gpt2", GPT2Config.tiny()), "llama": ("llama", LlamaConfig.tiny()),
         "gemma": ("gemma", GemmaConfig.tiny(1)), "gemma2": ("gemma2", GemmaConfig.tiny(2)),
         "gemma3": ("gemma3_text", GemmaConfig.tiny(3)), "mistral": ("mistral", MistralConfig.tiny()),
         "mixtral": ("mixtral", MixtralConfig.tiny())}


@pytest.mark.parametrize("shape", [(1, 40), (2, 40), (3, 5, 40), (1, 1, 40), (7, 40)])
def test_integer_product_equals_numpy_integers(shape):
    """int8 × int8 sums are exact: the same integers multiplied in int64 by numpy, scaled after, agree to float32
    rounding of the two scalings — for one row (padded to two inside), several, and 3-D inputs."""
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    w = rng.normal(size=(24, 40)).astype(np.float32) * rng.uniform(0.1, 10, size=(24, 1)).astype(np.float32)
    x = rng.normal(size=shape).astype(np.float32)
    q, s = quantize_rows(w)
    xq, xs = quantize_rows(x)
    expected = (np.asarray(xq, np.int64) @ np.asarray(q, np.int64).T) * np.asarray(xs) * np.asarray(s)[:, 0]
    got = int8_product(jnp.asarray(x), q, s[:, 0])
    assert got.shape == (*shape[:-1], 24) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


def test_rows_are_quantized_alone():
    """A row's product doesn't depend on the other rows (nor on the padding row a single row gets): exactly."""
    rng = np.random.default_rng(3)
    q, s = quantize_rows(rng.normal(size=(16, 32)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(5, 32)).astype(np.float32)) * jnp.arange(1, 6)[:, None]
    together = int8_product(x, q, s[:, 0])
    for i in range(5):
        np.testing.assert_array_equal(int8_product(x[i:i + 1], q, s[:, 0]), together[i:i + 1])


def test_zero_rows_stay_zero():
    q, s = quantize_rows(jnp.zeros((3, 8)))
    assert (q == 0).all() and (s == 0).all()
    q, s = quantize_rows(jnp.ones((4, 8)))
    assert (int8_product(jnp.zeros((2, 8)), q, s[:, 0]) == 0).all()


@pytest.fixture(scope="module")
def tiny_models():
    return {name: ARCHITECTURES[arch].model(config, rngs=nnx.Rngs(0)) for name, (arch, config) in CASES.items()}


@pytest.mark.parametrize("family", CASES)
def test_every_family_runs_quantized(tiny_models, family):
    """Each format's logits stay close to float32's (the median over positions of the RMS error relative to the
    logits' spread < 10%; a wrong product is off by ~100%), the weight bytes shrink, the float32 model it was
    made from is untouched; generation in int8 with a cache and a left-padded row runs."""
    model = tiny_models[family]
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 10)), jnp.int32)
    logits = model(ids)
    before = weight_bytes_per_token(model)
    for weights, most in zip(WEIGHT_FORMATS, (0.55, 0.3, 0.3)):
        twin = quantize(nnx.merge(*nnx.split(model)), weights)
        error = jnp.sqrt(jnp.mean((twin(ids) - logits) ** 2, -1)) / jnp.std(logits, axis=-1)
        assert float(jnp.median(error)) < 0.1, weights
        assert weight_bytes_per_token(twin) < (0.95 if family == "mixtral" else most) * before, weights
    np.testing.assert_array_equal(model(ids), logits)
    assert weight_bytes_per_token(model) == before
    mask = jnp.ones_like(ids).at[1, :4].set(0)
    out = llmjax.generate_ids(twin, ids, attention_mask=mask, max_new_tokens=3)
    assert out.shape == (2, 13) and (out[:, :10] == ids).all()


def test_refusals(tiny_models):
    model = quantize(nnx.merge(*nnx.split(tiny_models["llama"])), "int8")
    assert any(isinstance(m, Int8Linear) for _, m in nnx.iter_modules(model))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int8")
    with pytest.raises(ValueError, match="unknown weight format 'int4': use one of bfloat16"):
        quantize(tiny_models["gpt2"], "int4")


def test_real_smollm2_in_int8():
    """Real weights: int8 × int8 stays near float32 on the book's paragraph (the stored run measured KL ≈ 0.04
    nats and 94% top-1; the bounds leave room for another CPU). Chapter 18 checks that it still answers."""
    model, tokenizer = llmjax.load("smollm2-135m-instruct")
    ids = jnp.asarray(tokenizer(PARAGRAPH)["input_ids"], jnp.int32)[None]
    reference = model(ids)
    found = agreement(reference, quantize(model, "int8")(ids))
    assert found["kl"] < 0.1 and found["top1"] > 0.85, found
