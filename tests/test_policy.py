"""The numerics policy of chapter 2, for every architecture: parameters are stored in `param_dtype` — norm scales
included, whether the model is built fresh or loaded from a checkpoint — matmuls run in `dtype`, logits are float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, AutoModelForCausalLM

import llmjax
from llmjax.gemma import GemmaConfig
from llmjax.gpt2 import GPT2Config
from llmjax.llama import LlamaConfig
from llmjax.mistral import MistralConfig, MixtralConfig
from llmjax.models import ARCHITECTURES

CASES = {"gpt2": ("gpt2", GPT2Config.tiny()), "llama": ("llama", LlamaConfig.tiny()),
         "gemma": ("gemma", GemmaConfig.tiny(1)), "gemma2": ("gemma2", GemmaConfig.tiny(2)),
         "gemma3": ("gemma3_text", GemmaConfig.tiny(3)), "mistral": ("mistral", MistralConfig.tiny()),
         "mixtral": ("mixtral", MixtralConfig.tiny())}


def stored(model) -> set:
    return {str(p.dtype) for p in jax.tree.leaves(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case saved by transformers (random weights), once."""
    directories = {}
    for name, (arch, config) in CASES.items():
        directory = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        hf = ARCHITECTURES[arch].config_to_hf(config)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf)).save_pretrained(directory)
        directories[name] = directory
    return directories


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype, param_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                ("bfloat16", "float32"), ("float16", "float16")])
def test_fresh_and_loaded_models_store_and_compute_alike(saved, name, dtype, param_dtype):
    arch, config = CASES[name]
    model_class = ARCHITECTURES[arch].model
    fresh = model_class(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), rngs=nnx.Rngs(0))
    loaded, _ = llmjax.load(saved[name], dtype=dtype, param_dtype=param_dtype)
    assert stored(fresh) == stored(loaded) == {param_dtype}, (stored(fresh), stored(loaded))
    attention = next(m for _, m in nnx.iter_modules(loaded) if type(m).__name__ == "Attention")
    assert jnp.dtype(attention.dtype) == jnp.dtype(dtype) and jnp.dtype(attention.q_proj.dtype) == jnp.dtype(dtype)
    ids = np.array([[3, 5, 7, 11, 13]])
    logits = loaded(ids)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    out = loaded(ids, return_hidden_states=True)
    assert {str(h.dtype) for h in out.hidden_states} == {dtype}   # the residual stream is in the compute dtype
