"""LLaMA beyond the chapter: other options against transformers, and the torch-free runtime on the real SmolLM2."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from llmjax.attention import RoPE
from llmjax.llama import LlamaConfig, config_from_hf, config_to_hf, from_hf_directory
from conftest import assert_parity


@pytest.mark.parametrize("overrides", [
    dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    dict(num_key_value_heads=1, head_dim=12, rope=RoPE(10000.0, "linear", factor=4.0)),
    dict(num_key_value_heads=2, rope=RoPE(500000.0, "llama3", 8.0, 1.0, 4.0, 64), max_position_embeddings=512),
])
def test_parity_other_options(tmp_path, overrides):
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=67, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=overrides.pop("num_key_value_heads", 6), rms_norm_eps=1e-5,
                         max_position_embeddings=overrides.pop("max_position_embeddings", 256), **overrides)
    torch.manual_seed(3)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(config), attn_implementation="eager")).eval()
    reference.save_pretrained(tmp_path)
    model = from_hf_directory(tmp_path)
    assert_parity(model, reference, vocab_size=97, length=40, pad=13, seed=4)


@pytest.mark.parametrize("eos, expected", [(None, ()), (2, (2,)), ([128001, 128009], (128001, 128009)),
                                           ("absent", (2,))])
def test_eos_ids_in_every_spelling(eos, expected):
    """config.json's eos_token_id: null means no EOS token (not an id of None); a list keeps every id."""
    hf = config_to_hf(LlamaConfig.tiny())
    hf = {k: v for k, v in hf.items() if k != "eos_token_id"} | ({} if eos == "absent" else {"eos_token_id": eos})
    assert config_from_hf(hf).eos_token_ids == expected
    assert config_from_hf(config_to_hf(config_from_hf(hf))) == config_from_hf(hf)


def test_real_model_runs_without_torch():
    """The runtime path — load the GGUF by name, tokenize, generate — in a process where importing torch fails."""
    code = """
import sys
sys.modules["torch"] = None
import llmjax
model, tokenizer = llmjax.load("smollm2-135m-instruct")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=False)
print(llmjax.generate(model, tokenizer, prompt, max_new_tokens=12)[0])
assert not any(name == "torch" or name.startswith("torch.") for name, mod in sys.modules.items() if mod is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout
