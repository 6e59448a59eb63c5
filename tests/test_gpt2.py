"""GPT-2 beyond the chapter: other shapes and options against transformers, and dtype behaviour."""
import dataclasses

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llmjax.gpt2 import GPT2, GPT2Config, config_from_hf, config_to_hf, from_hf_directory
from conftest import assert_parity


@pytest.mark.parametrize("overrides", [
    dict(n_embd=24, n_head=3, n_layer=2, n_inner=None, activation_function="gelu_new"),
    dict(n_embd=28, n_head=7, n_layer=1, n_inner=53, activation_function="gelu"),
    dict(n_embd=16, n_head=1, n_layer=4, n_inner=31, activation_function="relu", layer_norm_epsilon=1e-3),
])
def test_parity_other_shapes(tmp_path, overrides):
    config = GPT2Config(vocab_size=131, n_positions=40, **overrides)
    torch.manual_seed(1)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config))).eval()
    reference.config._attn_implementation = "eager"
    with torch.no_grad():   # non-trivial LayerNorm parameters, so a swapped scale/bias would show
        for name, p in reference.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    model = from_hf_directory(tmp_path)
    assert_parity(model, reference, vocab_size=131, length=29, pad=11, seed=2)


def test_unsupported_variants_are_refused():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


@pytest.mark.parametrize("eos, expected", [(None, ()), (7, (7,)), ([7, 9], (7, 9)), ("absent", (50256,))])
def test_eos_ids_in_every_spelling(eos, expected):
    """config.json's eos_token_id: null means no EOS token (not an id of None), a list keeps every id."""
    hf = {"model_type": "gpt2"} | ({} if eos == "absent" else {"eos_token_id": eos})
    config = config_from_hf(hf)
    assert config.eos_token_ids == expected
    if expected == ():      # and such a model generates: no stop id, every token made
        from llmjax.generation import generate_ids

        model = GPT2(dataclasses.replace(GPT2Config.tiny(), eos_token_ids=()), rngs=nnx.Rngs(0))
        assert generate_ids(model, np.array([[1, 2, 3]]), max_new_tokens=5).shape == (1, 8)


def test_learned_positions_follow_real_tokens():
    """A left-padded row's first real token gets position 0: its logits equal the unpadded row's."""
    model = GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))
    row = np.arange(5, 12, dtype=np.int32)[None]
    padded = np.concatenate([np.zeros((1, 4), np.int32), row], axis=1)
    mask = np.r_[np.zeros(4), np.ones(7)][None].astype(np.int32)
    np.testing.assert_allclose(model(padded, attention_mask=mask)[:, 4:], model(row), rtol=1e-5, atol=1e-5)
