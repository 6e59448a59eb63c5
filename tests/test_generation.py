"""Generation: samplers' guarantees, padded batches on two architectures, seeds, and the CLI's error handling."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.generation import Sampling, filter_top_k, filter_top_p, generate_ids, sample
from llmjax.gpt2 import GPT2, GPT2Config
from llmjax.llama import Llama, LlamaConfig


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 50))
    np.testing.assert_array_equal(sample(logits, jax.random.key(1), Sampling()), np.argmax(logits, -1))


def test_top_k_and_top_p_never_leave_their_set():
    logits = jax.random.normal(jax.random.key(2), (64, 40)) * 2
    probs = np.asarray(jax.nn.softmax(logits))
    for seed in range(20):
        key = jax.random.key(seed)
        k_tokens = np.asarray(sample(logits, key, Sampling(1.0, top_k=5)))
        top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
        assert all(t in row for t, row in zip(k_tokens, top5))
        p_tokens = np.asarray(sample(logits, key, Sampling(1.0, top_p=0.5)))
        for b, t in enumerate(p_tokens):   # the smallest set of most likely tokens with mass >= 0.5
            order = np.argsort(-probs[b])
            size = np.searchsorted(np.cumsum(probs[b][order]), 0.5) + 1
            assert t in order[:size]


def test_sampled_frequencies_match_the_distribution():
    """Chi-square goodness of fit at temperature 1 on a fixed 6-token distribution (and its top-k=3 renormalisation)."""
    from scipy.stats import chisquare

    target = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(target))[None].repeat(4000, 0)
    for sampling, expected in [(Sampling(1.0), target), (Sampling(1.0, top_k=3), np.r_[target[:3], 0, 0, 0] / target[:3].sum())]:
        draws = np.asarray(sample(logits, jax.random.key(5), sampling))
        counts = np.bincount(draws, minlength=6)
        keep = expected > 0
        assert counts[~keep].sum() == 0
        assert chisquare(counts[keep], expected[keep] * len(draws)).pvalue > 1e-3


@pytest.mark.parametrize("make", [lambda: GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(1)),
                                  lambda: Llama(LlamaConfig.tiny(num_key_value_heads=2), rngs=nnx.Rngs(1))],
                         ids=["gpt2", "llama"])
def test_padded_batch_equals_rows_alone(make):
    model = make()
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 200, n).astype(np.int32) for n in (3, 11, 7)]
    T = max(len(r) for r in rows)
    batch = np.stack([np.r_[np.zeros(T - len(r), np.int32), r] for r in rows])
    mask = np.stack([np.r_[np.zeros(T - len(r)), np.ones(len(r))] for r in rows]).astype(np.int32)
    out = generate_ids(model, batch, mask, max_new_tokens=12, stop_ids=[])
    for b, row in enumerate(rows):
        alone = generate_ids(model, row[None], max_new_tokens=12, stop_ids=[])
        np.testing.assert_array_equal(out[b, T:], alone[0, len(row):])


def _every_family():
    from llmjax.gemma import Gemma, GemmaConfig
    from llmjax.mistral import Mistral, MistralConfig, Mixtral, MixtralConfig
    return {"gpt2": lambda: GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(1)),
            "llama": lambda: Llama(LlamaConfig.tiny(num_key_value_heads=2), rngs=nnx.Rngs(1)),
            **{f"gemma{g}": (lambda g=g: Gemma(GemmaConfig.tiny(g), rngs=nnx.Rngs(1)))
               for g in (1, 2, 3)},
            "mistral": lambda: Mistral(MistralConfig.tiny(), rngs=nnx.Rngs(1)),
            "mixtral": lambda: Mixtral(MixtralConfig.tiny(), rngs=nnx.Rngs(1))}


@pytest.mark.parametrize("name", list(_every_family()))
def test_logits_to_keep_are_the_full_calls_last_rows(name):
    """Keeping the last k logits computes the same rows as the full call (float32, 1e-5: a product of
    fewer rows may sum in another order), with and without a cache; the cache and hidden states don't change."""
    from llmjax.attention import KVCache, cache_layout

    model = _every_family()[name]()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 200, (2, 13)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, :4] = 0                                          # a left-padded row
    full = model(tokens, attention_mask=mask)
    for keep in (1, 5):
        kept = model(tokens, attention_mask=mask, logits_to_keep=keep)
        assert kept.shape == (2, keep, full.shape[-1])
        np.testing.assert_allclose(kept, full[:, -keep:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model(tokens, logits_to_keep=0), model(tokens))
    cache = lambda: KVCache.create(cache_layout(model), batch=2, capacity=32)
    whole = model(tokens, attention_mask=mask, cache=cache(), return_hidden_states=True)
    last = model(tokens, attention_mask=mask, cache=cache(), return_hidden_states=True,
                 logits_to_keep=1)
    np.testing.assert_allclose(last.logits, whole.logits[:, -1:], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves((whole.cache, whole.hidden_states)),
                    jax.tree.leaves((last.cache, last.hidden_states))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(tokens, logits_to_keep=-1)


def test_seed_reproduces_and_rows_are_independent():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(2))
    ids = np.random.default_rng(1).integers(3, 200, (3, 6)).astype(np.int32)
    a = generate_ids(model, ids, max_new_tokens=10, temperature=1.5, seed=11)
    assert (a == generate_ids(model, ids, max_new_tokens=10, temperature=1.5, seed=11)).all()
    assert (a != generate_ids(model, ids, max_new_tokens=10, temperature=1.5, seed=12)).any()
    changed = ids.copy()
    changed[0] = (changed[0] + 1) % 200
    b = generate_ids(model, changed, max_new_tokens=10, temperature=1.5, seed=11)
    np.testing.assert_array_equal(a[1:], b[1:])


def test_generate_ids_shape_and_bad_arguments():
    model = GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))
    ids = np.ones((2, 4), np.int32)
    assert generate_ids(model, ids, max_new_tokens=5).shape == (2, 9)
    for kwargs in [dict(max_new_tokens=0), dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.2), dict(top_k=0)]:
        with pytest.raises(ValueError):
            generate_ids(model, ids, **{"max_new_tokens": 3, **kwargs})


@pytest.mark.parametrize("args,expected", [
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--model", "/no/such/dir"], "doesn't exist"),
    (["validate", "--model", "nothing-registered"], "unknown model"),
])
def test_cli_errors_are_one_line(args, expected):
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("llmjax: error:") and expected in out.stderr and out.stderr.count("\n") == 1


def test_cli_generate_reads_stdin():
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", "generate", "--temperature", "0", "--max-new-tokens", "6"],
                         input="The Eiffel Tower is located in the city of", capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout and " tokens; " in out.stderr


@pytest.mark.parametrize("make", [lambda: GPT2(GPT2Config(vocab_size=257, n_positions=128, n_embd=35, n_layer=3, n_head=5,
                                                      n_inner=83), rngs=nnx.Rngs(3)),
                                  lambda: Llama(LlamaConfig.tiny(num_key_value_heads=2), rngs=nnx.Rngs(3))],
                         ids=["gpt2", "llama"])
def test_greedy_equals_transformers_generate(make, tmp_path):
    """64 greedy tokens: identical to transformers' generate(do_sample=False), logits at every step within 1e-5."""
    import torch
    import transformers

    from llmjax.validation import reference_greedy

    from llmjax import gpt2, llama

    model = make()
    config = (gpt2.config_to_hf if isinstance(model, GPT2) else llama.config_to_hf)(model.config)
    hf_class = transformers.GPT2LMHeadModel if config["model_type"] == "gpt2" else transformers.LlamaForCausalLM
    config_class = transformers.GPT2Config if config["model_type"] == "gpt2" else transformers.LlamaConfig
    torch.manual_seed(0)
    reference = hf_class(config_class(**config, attn_implementation="eager")).eval()
    reference.save_pretrained(tmp_path)
    import llmjax

    model, _ = llmjax.load(tmp_path)
    prompt = np.random.default_rng(9).integers(3, 200, (1, 11))
    ids, logits = generate_ids(model, prompt, max_new_tokens=64, stop_ids=[], return_logits=True)
    ref_tokens, ref_logits = reference_greedy(reference, prompt, 64)
    if model.config.eos_token_ids[0] in ref_tokens[0]:   # llmjax stops at EOS; compare up to it
        end = list(ref_tokens[0]).index(model.config.eos_token_ids[0]) + 1
    else:
        end = 64
    np.testing.assert_array_equal(ids[0, 11:11 + end], ref_tokens[0, :end])
    np.testing.assert_allclose(logits[0, :end], ref_logits[0, :end], atol=1e-5)


def test_streaming_never_splits_a_character(monkeypatch):
    """Byte-level tokens that cut multi-byte characters apart: no piece holds half a character."""
    from pathlib import Path

    import llmjax.generation as generation
    from llmjax.gpt2 import tokenizer_from_files

    data = Path(__file__).resolve().parents[1] / ".data" / "gpt2"
    tokenizer = tokenizer_from_files(data / "encoder.json", data / "vocab.bpe")
    text = " Owls 🦉 say hé — 日本語!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)   # some tokens are partial characters

    def fake_stream_ids(*args, **kwargs):
        for i in ids:
            yield np.array([[i]]), None

    monkeypatch.setattr(generation, "stream_ids", fake_stream_ids)
    model = GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))
    pieces = list(generation.stream_text(model, tokenizer, "x", len(ids), Sampling()))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
