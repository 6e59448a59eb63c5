"""Training beyond the chapter: for every architecture the loss and every parameter's gradient equal transformers'
(right padding with token 0, a prompt, Mixtral's balancing loss), and agree with float64 finite differences of
llmjax's own function; padding never reaches the gradient; Gemma's zero padding row;
segment ids (masks, positions, refusals); packed rows equal to each document alone for every architecture; chat
labels, data files and their refusals; resumable batches; the schedule, the weight-decay mask and clipping;
micro-batches equal to one batch; a step that compiles once, donates its state and trains only `wrt`; remat's
gradients equal the plain run's, and the compiled step's memory falls."""
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import llmjax
from llmjax import gemma, gpt2, llama, mistral
from llmjax.attention import KVCache, cache_layout, document_positions, make_attention_mask, prepare_inputs
from llmjax.checkpoints import GGUFCheckpoint, gguf_tokenizer
from llmjax.gemma import GemmaConfig
from llmjax.gpt2 import GPT2Config
from llmjax.llama import Llama, LlamaConfig
from llmjax.mistral import MistralConfig, Mixtral, MixtralConfig
from llmjax.models import ARCHITECTURES, REGISTRY
from llmjax.training import LORA_TARGETS, LoRALinear, _children, add_lora, load_adapters, merge_lora, save_adapters
from llmjax.training import (IGNORE, Batch, DataState, Document, TrainConfig, best_fit, chat_document,
                             checkpoint_gradients, cross_entropy, decayed, epoch_order, gradients,
                             learning_rate_schedule, load_rows, loss_terms, make_optimizer, model_loss, next_batch,
                             next_token_targets, pack, read_records, saved_bytes, text_document, token_losses,
                             train_state, train_step)
from llmjax.validation import randomize

# name: (transformers model_type, tiny config, key map)
CASES = {"gpt2": ("gpt2", GPT2Config.tiny(), lambda c: gpt2.KEY_MAP),
         "llama": ("llama", LlamaConfig.tiny(), llama.hf_key_map),
         "gemma": ("gemma", GemmaConfig.tiny(1), gemma.hf_key_map),
         "gemma2": ("gemma2", GemmaConfig.tiny(2), gemma.hf_key_map),
         "gemma3": ("gemma3_text", GemmaConfig.tiny(3), gemma.hf_key_map),
         "mistral": ("mistral", MistralConfig.tiny(), llama.hf_key_map),
         "mixtral": ("mixtral", MixtralConfig.tiny(), mistral.hf_key_map)}
BALANCE = 0.1     # Mixtral's balancing-loss weight here: large enough that a wrong balancing gradient would show
# Per tensor, max|Δ| / max|reference gradient|: float32 rounding through 3 to 7 layers is ~1e-6 of it (seen: 5e-7 to
# 4e-6, and 1.7e-5 for Gemma 3's seven layers); a wrong mask, tie, scale or transpose moves a tensor's gradient by
# 1e-2 or more.
GRAD_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return gguf_tokenizer(GGUFCheckpoint(REGISTRY["smollm2-135m-instruct"].fetch()))


@functools.cache
def random_models(name: str, seed: int = 0, std: float | None = 0.1):
    """(llmjax model, transformers model) of CASES[name], every weight redrawn (std None: transformers' init); made
    once per module and shared by the tests, which only read them (a backward pass zeroes the reference's grads)."""
    model_type, config, _ = CASES[name]
    hf = ARCHITECTURES[model_type].config_to_hf(config)
    if name == "mixtral":
        hf |= dict(router_aux_loss_coef=BALANCE, experts_implementation="eager")
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf),
                                                              attn_implementation="eager")
    if std is not None:
        randomize(reference, seed, std=std)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model, _ = llmjax.load(directory)
    return model, reference.eval()


def padded_batch(vocab_size: int, seed: int = 0, pad_id: int = 0) -> Batch:
    """Four rows of 16: full; right-padded after 11 and after 6; a prompt of 5 (not learned), padded after 13."""
    tokens = np.random.default_rng(seed).integers(1, vocab_size, (4, 16)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[1, 11:] = segments[2, 6:] = segments[3, 13:] = 0
    tokens = np.where(segments > 0, tokens, pad_id).astype(np.int32)
    labels = np.where(segments > 0, tokens, IGNORE)
    labels[3, :5] = IGNORE
    return Batch(tokens, segments, labels)


def reference_loss(reference, batch: Batch):
    as_torch = lambda a: torch.from_numpy(np.array(a)).long()
    moe = dict(output_router_logits=True) if hasattr(reference.config, "router_aux_loss_coef") else {}
    return reference(input_ids=as_torch(batch.tokens), attention_mask=as_torch(batch.segments),
                     labels=as_torch(batch.labels), **moe).loss


# Compiled: one XLA program per architecture and shape, where an eager call dispatches (and compiles) every
# operation on its own — several times slower for a first call, which is most calls here.
loss_and_gradients = nnx.jit(nnx.value_and_grad(model_loss), static_argnums=2)
forward = nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask))


def balance_weight(name: str) -> float:
    return BALANCE if name == "mixtral" else 0.0


# --- loss and gradients against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, "bfloat16", np.float16])
def test_cross_entropy_equals_transformers_loss_function(dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss

    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 9, 37)) * 4, dtype)
    labels = rng.integers(0, 37, (4, 9))
    labels[0, :4] = labels[1, 6:] = labels[3, :] = IGNORE        # a prompt, padding, a row with nothing counted
    as_float = torch.from_numpy(np.array(jnp.asarray(logits, jnp.float32)))
    theirs = ForCausalLMLoss(as_float, torch.from_numpy(labels), vocab_size=37).item()
    ours = cross_entropy(logits, labels)
    assert ours.dtype == jnp.float32 and abs(float(ours) - theirs) < 1e-6
    losses, counted = token_losses(logits, labels)
    np.testing.assert_array_equal(counted, next_token_targets(labels) != IGNORE)
    assert not losses[~np.asarray(counted)].any() and not counted[:, -1].any()


@pytest.mark.parametrize("name", CASES)
def test_loss_and_every_gradient_equal_transformers(name):
    """Right padding with token 0 (Gemma's padding_idx: transformers sends no gradient to row 0's lookups, and in
    llmjax padding reaches no gradient either), a prompt, sliding windows, soft-caps, Mixtral's balancing loss."""
    model, reference = random_models(name)
    batch = padded_batch(model.config.vocab_size)
    reference.zero_grad()
    theirs = reference_loss(reference, batch)
    theirs.backward()
    loss, grads = loss_and_gradients(model, batch, balance_weight(name))
    assert abs(float(loss) - theirs.item()) < 1e-5 * theirs.item()
    ours = checkpoint_gradients(model, grads, CASES[name][2](model.config))
    reference_grads = {n: p.grad.numpy() for n, p in reference.named_parameters()}
    assert ours.keys() == reference_grads.keys()
    errors = {n: float(np.abs(ours[n] - g).max() / np.abs(g).max()) for n, g in reference_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, (worst, errors[worst])


@contextlib.contextmanager
def float64_twin():
    """llmjax computing in float64 where its numerics policy says float32 (64-bit JAX, jnp.float32 rebound)."""
    float32 = jnp.float32
    with jax.enable_x64(True):
        jnp.float32 = jnp.float64
        try:
            yield
        finally:
            jnp.float32 = float32


def twin_loss(model, batch: Batch, weight: float = 0.0):
    """Inside float64_twin: (the float64 loss as a function of the parameters, the parameters in float64)."""
    twin = type(model)(model.config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, _, rest = nnx.split(twin, nnx.Param, ...)
    params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), nnx.state(model, nnx.Param))
    return jax.jit(lambda p: model_loss(nnx.merge(graphdef, p, rest), batch, weight)), params


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_float64_finite_differences(name):
    """Per tensor, a direction half along the gradient and half random: the float64 twin's central difference at
    ε = 1e-5 (truncation and rounding ~1e-10) against the float32 gradient, as |Δ| / |g| (seen: at most 1e-6) — or
    |Δ| / (|G| / 1000), G the whole gradient, for a tensor whose gradient is zero in exact arithmetic and float32
    noise in practice (GPT-2's key bias: softmax is unchanged when every key moves by the same vector)."""
    model, _ = random_models(name)
    batch = padded_batch(model.config.vocab_size, seed=1)
    weight = balance_weight(name)
    _, grads = loss_and_gradients(model, batch, weight)
    floor = 1e-3 * float(optax.tree.norm(grads))
    directions, eps, errors = np.random.default_rng(2), 1e-5, {}
    with float64_twin():
        loss, params = twin_loss(model, batch, weight)
        flat = list(nnx.to_flat_state(params))
        for path, g in nnx.to_flat_state(grads):
            g = np.asarray(g[...], np.float64)
            noise = directions.standard_normal(g.shape)
            u = g / np.linalg.norm(g) + noise / np.linalg.norm(noise)
            u /= np.linalg.norm(u)
            moved = lambda step: nnx.from_flat_state([(q, p.replace(p[...] + step * u) if q == path else p)
                                                      for q, p in flat])
            slope = (float(loss(moved(eps))) - float(loss(moved(-eps)))) / (2 * eps)
            errors[path] = abs(slope - float((g * u).sum())) / max(np.linalg.norm(g), floor)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "mixtral"])
def test_padding_reaches_no_gradient(name):
    """What padding tokens are (their ids) changes neither the loss nor any gradient: bit for bit — but for Mixtral's
    experts, whose sums run in another order when the padding routes elsewhere (rounding: 1e-6 of the tensor)."""
    model, _ = random_models(name)
    with_zeros, with_fives = (padded_batch(model.config.vocab_size, pad_id=pad) for pad in (0, 5))
    results = [loss_and_gradients(model, b, balance_weight(name)) for b in (with_zeros, with_fives)]
    assert float(results[0][0]) == float(results[1][0])
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        if name == "mixtral":
            assert float(jnp.abs(a - b).max()) <= 1e-6 * float(jnp.abs(a).max())
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])     # Gemma 1: the chapter's own
def test_gemma_zero_padding_row(name):
    """transformers initialises Gemma's row 0 to zeros and sends no gradient to its lookups. With token 0 as a real
    token, llmjax's row-0 gradient is the true derivative (the float64 twin's central difference agrees, at a step
    far below RMSNorm's scale √eps = 1e-3 — 1e-9: Gemma 3's QK-norm is a second norm at zero, whose linear range is
    smaller still), transformers' is the output side alone, and float32 steps of 1e-2 are far off."""
    model, reference = random_models(name, std=None)
    assert not reference.model.embed_tokens.weight[0].any()
    tokens = np.random.default_rng(3).integers(1, model.config.vocab_size, (2, 12)).astype(np.int32)
    tokens[:, [2, 7]] = 0
    batch = Batch(tokens, np.ones_like(tokens), tokens)
    reference.zero_grad()
    reference_loss(reference, batch).backward()
    _, grads = loss_and_gradients(model, batch, 0.0)
    ours = np.asarray(grads["embed_tokens"]["embedding"][...])[0].astype(np.float64)
    u = np.random.default_rng(4).standard_normal(ours.shape)
    u /= np.linalg.norm(u)
    graphdef, table, others = nnx.split(model, nnx.PathContains("embed_tokens"), ...)

    def slope(loss, table, eps):
        row = table["embed_tokens"]["embedding"][...][0]
        at = lambda step: jax.tree.map(lambda e: e.at[0].set(row + step * u.astype(row.dtype)), table)
        return float(loss(at(eps)) - loss(at(-eps))) / (2 * eps)

    float32_loss = jax.jit(lambda t: model_loss(nnx.merge(graphdef, t, others), batch))
    with float64_twin():
        twin = type(model)(model.config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        twin_graphdef, _, _ = nnx.split(twin, nnx.PathContains("embed_tokens"), ...)
        table64, others64 = (jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), s) for s in (table, others))
        exact = slope(jax.jit(lambda t: model_loss(nnx.merge(twin_graphdef, t, others64), batch)), table64, 1e-9)
    assert abs(ours @ u - exact) < 1e-4 * abs(exact)
    assert abs(reference.model.embed_tokens.weight.grad[0].numpy() @ u - exact) > 0.1 * abs(exact)
    assert abs(slope(float32_loss, table, 1e-2) - exact) > 0.3 * abs(exact)


# --- segment ids ---------------------------------------------------------------------------------------------

def test_document_positions_as_literals():
    segments = np.array([[0, 0, 1, 1, 1, 0],        # left padding: as always
                         [1, 1, 0, 1, 0, 0],        # a hole inside one document: it keeps counting
                         [1, 1, 2, 2, 2, 3],        # three documents
                         [1, 0, 2, 2, 0, 3]])       # documents with padding between them: at the last position
    np.testing.assert_array_equal(document_positions(jnp.asarray(segments)), [[0, 0, 0, 1, 2, 2],
                                                                               [0, 1, 1, 2, 2, 2],
                                                                               [0, 1, 0, 1, 2, 0],
                                                                               [0, 0, 0, 1, 1, 0]])


def test_one_document_masks_give_the_positions_they_always_gave():
    masks = np.random.default_rng(0).integers(0, 2, (200, 13))
    np.testing.assert_array_equal(document_positions(jnp.asarray(masks)),
                                  np.maximum(np.cumsum(masks, -1) - 1, 0))


def test_document_mask_as_literal_matrix():
    segments = np.array([[1, 1, 2, 2, 2, 0]])
    positions = np.asarray(document_positions(jnp.asarray(segments)))
    np.testing.assert_array_equal(make_attention_mask(positions, positions, segments, window=2,
                                                      q_segments=segments)[0], np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 1, 0, 1, 1, 0]], bool))   # the pad, at the position before it, sees what that position allows


@pytest.mark.parametrize("mask, message", [
    ([[2, 2, 2]], "row 0 has 2 after 0"), ([[1, 3, 3]], "row 0 has 3 after 1"), ([[1, 2, 1]], "has 1 after 2"),
    ([[1, -1, 1]], "got -1"), ([[1, 1.5, 2]], "got 1.5")])
def test_segment_ids_out_of_order_are_refused(mask, message):
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"attention_mask must hold only.*{message}"):
        model(np.ones((1, 3), np.int32), attention_mask=np.array(mask))


def test_a_cache_refuses_packed_documents():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    cache = KVCache.create(cache_layout(model), batch=1, capacity=8)
    with pytest.raises(ValueError, match="one document per row"):
        model(np.ones((1, 4), np.int32), attention_mask=[[1, 1, 2, 2]], cache=cache)
    traced = jax.jit(lambda mask, cache: prepare_inputs(jnp.ones((1, 4), jnp.int32), None, mask, cache)[:2])
    positions, valid = traced(jnp.asarray([[1, 1, 2, 2]]), cache)      # values unknown: read as one document
    assert valid.tolist() == [[1, 1, 1, 1]] and positions.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("name", CASES)
def test_packed_rows_equal_each_document_alone(name):
    model_type, config, _ = CASES[name]
    model = ARCHITECTURES[model_type].model(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    documents = [Document(rng.integers(1, config.vocab_size, n).astype(np.int32), np.ones(n, bool))
                 for n in (7, 3, 12, 5, 9, 2, 11)]
    rows = pack(documents, 20)
    logits = forward(model, rows.tokens, rows.segments)
    # Each document alone in a row of its own, padded on the right: causal attention never reads what follows a
    # token, so its logits are the document's alone — and one call of one shape instead of a compilation per length.
    longest = max(len(d) for d in documents)
    alone_tokens = np.stack([np.pad(d.tokens, (0, longest - len(d))) for d in documents])
    alone_mask = (np.arange(longest) < np.array([len(d) for d in documents])[:, None]).astype(np.int32)
    alone = forward(model, alone_tokens, alone_mask)
    for row, members in enumerate(best_fit([len(d) for d in documents], 20)):
        at = 0
        for d in members:
            n = len(documents[d])
            np.testing.assert_allclose(logits[row, at:at + n], alone[d, :n], atol=2e-5, rtol=1e-5)
            at += n
    separately, counted = token_losses(alone, np.where(alone_mask > 0, alone_tokens, IGNORE))
    assert abs(float(cross_entropy(logits, rows.labels)) - float(separately.sum() / counted.sum())) < 1e-5


# --- data ----------------------------------------------------------------------------------------------------

def test_best_fit_places_every_item_once_within_capacity():
    sizes = np.random.default_rng(6).integers(1, 100, 500).tolist()
    bins = best_fit(sizes, 100)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(sizes[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= 1.05 * sum(sizes) / 100 + 1


def test_pack_cuts_long_documents_and_ignores_each_first_label():
    document = Document(np.arange(10, 30, dtype=np.int32), np.ones(20, bool))
    rows = pack([document], 8)
    assert rows.tokens.tolist() == [list(range(10, 18)), list(range(18, 26)), [26, 27, 28, 29, 0, 0, 0, 0]]
    assert rows.labels[:, 0].tolist() == [IGNORE] * 3 and rows.labels[0, 1:].tolist() == list(range(11, 18))
    assert rows.segments[2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_chat_labels_are_the_assistant_turns(tokenizer):
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6, of course."}]
    document = chat_document(tokenizer, chat)
    learned = tokenizer.decode(document.tokens[document.learned])
    assert learned == "4<|im_end|>\n6, of course.<|im_end|>\n"
    assert tokenizer.decode(document.tokens) == tokenizer.apply_chat_template(chat, tokenize=False)


def test_a_template_that_rewrites_turns_is_refused(tokenizer):
    class Rewriting:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"[{len(messages)}]{m['content']}" for m in messages)   # every turn knows the count

    with pytest.raises(ValueError, match="chat template doesn't write a conversation as its turns"):
        chat_document(Rewriting(), [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_text_documents_end_with_one_eos(tokenizer):
    document = text_document(tokenizer, "Rivers run to the sea.")
    assert document.tokens[-1] == tokenizer.eos_token_id and document.learned.all()
    again = text_document(tokenizer, "Rivers run to the sea.<|im_end|>")
    assert again.tokens.tolist() == document.tokens.tolist()


def test_read_records_from_files_folders_and_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("first text")
    (tmp_path / "folder" / "deeper").mkdir(parents=True)
    (tmp_path / "folder" / "b.txt").write_text("b")
    (tmp_path / "folder" / "deeper" / "a.txt").write_text("a")
    (tmp_path / "folder" / "blank.txt").write_text("  \n")
    (tmp_path / "folder" / "notes.md").write_text("not read")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(chat) + "\n\n" + json.dumps({"text": "plain"}) + "\n")
    assert read_records(tmp_path / "one.txt") == ["first text"]
    assert read_records(tmp_path / "folder") == ["b", "a"]     # sorted by path: folder/b.txt < folder/deeper/a.txt
    assert read_records(tmp_path / "data.jsonl") == [chat["messages"], "plain"]


def bad_data(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    files = {"empty.txt": "", "blank.jsonl": "\n\n", "latin1.txt": b"caf\xe9", "list.jsonl": "[1, 2]\n",
             "unknown.jsonl": '{"prompt": "x"}\n', "roles.jsonl": '{"messages": [{"role": "user"}]}\n',
             "no answer.jsonl": json.dumps({"messages": chat["messages"][:1]}) + "\n",
             "text number.jsonl": '{"text": 3}\n', "cut.jsonl": json.dumps(chat) + "\n" + json.dumps(chat)[:-5]}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (tmp_path / "no text").mkdir()
    (tmp_path / "no text" / "x.md").write_text("markdown is not read")


@pytest.mark.parametrize("source, error, message", [
    ("missing.txt", FileNotFoundError, "does not exist"), ("no text", ValueError, "no .txt files"),
    ("empty.txt", ValueError, "holds no text"), ("blank.jsonl", ValueError, "holds no text"),
    ("latin1.txt", ValueError, "not UTF-8"), ("list.jsonl", ValueError, "list.jsonl:1: each line must be a JSON obj"),
    ("unknown.jsonl", ValueError, '"messages" .* or "text"'), ("roles.jsonl", ValueError, "with string values"),
    ("no answer.jsonl", ValueError, "no assistant message"), ("text number.jsonl", ValueError, "must be a string"),
    ("cut.jsonl", ValueError, "cut.jsonl:2: not valid JSON")])
def test_bad_data_is_refused_in_one_line(tmp_path, source, error, message):
    bad_data(tmp_path)
    with pytest.raises(error, match=message) as caught:
        read_records(tmp_path / source)
    assert "\n" not in str(caught.value)


def test_load_rows_refuses_rows_the_model_cant_take(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("Rivers run to the sea.")
    small = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))                         # 211 ids, context 128
    big = Llama(dataclasses.replace(LlamaConfig.tiny(), vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    for length in (129, 1, 8.0, True):
        with pytest.raises(ValueError, match="rows must hold 2 to 128 tokens"):
            load_rows(tmp_path / "a.txt", tokenizer, big, length)
    with pytest.raises(ValueError, match="the model has 211 ids: use the model's own tokenizer"):
        load_rows(tmp_path / "a.txt", tokenizer, small, 16)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    no_eos = type("NoEOS", (), {"eos_token_id": None, "__call__": lambda self, text: {"input_ids": [5]}})()
    with pytest.raises(ValueError, match="nothing to learn"):
        load_rows(tmp_path / "one.jsonl", no_eos, big, 16)
    rows = load_rows(tmp_path / "a.txt", tokenizer, big, 16)
    assert rows.tokens.shape == (1, 16) and rows.tokens.dtype == np.int32


def test_batches_are_deterministic_resumable_and_reshuffled_each_epoch():
    rows = pack([Document(np.full(n, i, np.int32), np.ones(n, bool)) for i, n in enumerate(range(1, 60))], 32)
    states, batches, state = [], [], DataState(seed=3)
    for _ in range(20):
        states.append(state)
        batch, state = next_batch(rows, state, 5)
        batches.append(np.asarray(batch.tokens))
    for k in (0, 7, 13):
        resumed = states[k]
        for expected in batches[k:]:
            batch, resumed = next_batch(rows, resumed, 5)
            np.testing.assert_array_equal(batch.tokens, expected)
    per_epoch = len(rows) // 5
    assert state == DataState(epoch=19 // per_epoch, index=(19 % per_epoch + 1) * 5, seed=3)
    epoch_rows = np.concatenate([epoch_order(len(rows), 3, 0)[:per_epoch * 5]])
    assert len(set(epoch_rows.tolist())) == per_epoch * 5
    assert not np.array_equal(epoch_order(len(rows), 3, 0), epoch_order(len(rows), 3, 1))
    assert not np.array_equal(epoch_order(len(rows), 3, 0), epoch_order(len(rows), 4, 0))
    for size in (0, len(rows) + 1, 2.0):
        with pytest.raises(ValueError, match="batch_size must be"):
            next_batch(rows, DataState(), size)


# --- the optimizer -------------------------------------------------------------------------------------------

def test_schedule_warms_up_then_follows_a_cosine():
    config = TrainConfig(learning_rate=2e-3, warmup_steps=10, total_steps=110, final_learning_rate=2e-4)
    rates = np.array([float(learning_rate_schedule(config)(s)) for s in range(0, 131)])
    np.testing.assert_allclose(rates[:11], np.linspace(0, 2e-3, 11), rtol=1e-5, atol=1e-10)
    cosine = 2e-4 + 1.8e-3 * 0.5 * (1 + np.cos(np.pi * (np.arange(10, 111) - 10) / 100))
    np.testing.assert_allclose(rates[10:111], cosine, rtol=1e-5)
    np.testing.assert_allclose(rates[111:], 2e-4, rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_weight_decay_applies_to_matrices_only(name):
    model_type, config, _ = CASES[name]
    model = ARCHITECTURES[model_type].model(config, rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    flags = {jax.tree_util.keystr(p, simple=True, separator="/"): f
             for p, f in jax.tree_util.tree_leaves_with_path(decayed(params))}
    vectors = {k for k, f in flags.items() if not f}
    assert vectors and all(k.endswith(("scale", "bias")) for k in vectors)
    assert all(not f for k, f in flags.items() if k.endswith(("scale", "bias")))
    train = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.5)
    tx = make_optimizer(train)
    update = jax.jit(tx.update)                                        # one compilation, not one per tensor shape
    updates, _ = update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)   # no gradient: decay only
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        key, param = jax.tree_util.keystr(path, simple=True, separator="/"), params
        for k in path:
            param = param[k.key]
        expected = -1e-2 * 0.5 * np.asarray(param) if flags[key] else np.zeros(param.shape)
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-12)


def test_clipping_scales_the_gradient_to_max_norm():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    tx = make_optimizer(TrainConfig(max_grad_norm=0.5, b1=0.9))
    grads = {"w": jnp.full((3, 4), 10.0), "b": jnp.full(4, -20.0)}
    _, state = tx.update(grads, tx.init(params), params)
    first_moment = state[1][0].mu                   # (1 - b1) * the clipped gradient
    assert abs(float(optax.tree.norm(first_moment)) - 0.1 * 0.5) < 1e-6


# --- the step ------------------------------------------------------------------------------------------------

def uneven_batch(vocab_size: int, rows: int = 8, seed: int = 7) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (rows, 16)).astype(np.int32)
    segments = (np.arange(16) < rng.integers(3, 17, (rows, 1))).astype(np.int32)
    segments[:, 9:] *= 1 + (np.arange(rows)[:, None] % 2)              # half the rows hold two documents
    return Batch(tokens, segments, np.where(segments > 0, tokens, IGNORE))


@pytest.mark.parametrize("model_class, config, splits", [(Llama, LlamaConfig.tiny(), (2, 8)),
                                                          (Mixtral, MixtralConfig.tiny(), (2,))])
def test_micro_batches_give_the_whole_batch_gradient(model_class, config, splits):
    """Each split is a compilation (a few seconds, Mixtral's the most): two for LLaMA, one for Mixtral — whose
    balancing loss, a statistic of each forward pass, is the mean of the micro-batches' (reported whatever its
    weight)."""
    model = model_class(config, rngs=nnx.Rngs(0))
    batch = uneven_batch(config.vocab_size)
    whole, whole_metrics = gradients(model, batch)
    for micro_batches in splits:
        parts, metrics = gradients(model, batch, micro_batches=micro_batches)
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
            assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(a).max())
        assert abs(float(metrics["loss"]) - float(whole_metrics["loss"])) < 1e-5
    if model_class is Mixtral:
        terms = nnx.jit(loss_terms)                                     # compiled once for both halves
        halves = [float(terms(model, jax.tree.map(lambda a: a[i:i + 4], batch)).balance) for i in (0, 4)]
        assert abs(float(metrics["balance"]) - np.mean(halves)) < 1e-6 and float(metrics["balance"]) > 0
    with pytest.raises(ValueError, match="can't be split into 3 equal micro-batches"):
        gradients(model, batch, micro_batches=3)


def test_steps_compile_once_donate_their_state_and_learn():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(2))
    config = TrainConfig(learning_rate=1e-2, warmup_steps=3, total_steps=40, final_learning_rate=1e-3,
                         micro_batches=2)
    documents = [Document(np.random.default_rng(i).integers(3, 211, 10).astype(np.int32), np.ones(10, bool))
                 for i in range(12)]
    rows = pack(documents, 32)
    graphdef, state = train_state(model, config)
    data, losses = DataState(), []
    for step in range(config.total_steps):
        if step == 1:
            compiled = train_step._cache_size()
        batch, data = next_batch(rows, data, 2)
        before = jax.tree.leaves(state)
        state, metrics = train_step(graphdef, state, batch, config)
        assert all(x.is_deleted() for x in before)
        losses.append(float(metrics["loss"]))
    assert train_step._cache_size() == compiled
    assert np.mean(losses[-4:]) < 0.2 * np.mean(losses[:4])
    assert int(nnx.merge(graphdef, state)[1].step[...]) == config.total_steps


def test_only_wrt_is_trained():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(3))
    frozen = np.asarray(model.embed_tokens.embedding[...]).copy()
    layer = np.asarray(model.layers[0].mlp.up_proj.kernel[...]).copy()
    config = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=5)
    graphdef, state = train_state(model, config, wrt=nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed_tokens"))))
    for _ in range(3):
        state, _ = train_step(graphdef, state, uneven_batch(211), config)
    trained = nnx.merge(graphdef, state)[0]
    np.testing.assert_array_equal(trained.embed_tokens.embedding[...], frozen)
    assert np.abs(np.asarray(trained.layers[0].mlp.up_proj.kernel[...]) - layer).max() > 1e-3


# --- LoRA ----------------------------------------------------------------------------------------------------

def fill_adapters(model, seed: int = 0):
    """Give every adapter's B random values, as training would: a new adapter (B = 0) changes nothing."""
    rng = np.random.default_rng(seed)
    for _, _, _, lora in _children(model, LoRALinear):
        lora.lora_b[...] = jnp.asarray(rng.standard_normal(lora.lora_b.shape) * 0.1, lora.lora_b.dtype)


@pytest.mark.parametrize("name, targets", [("gpt2", ("q_proj", "v_proj", "c_fc", "c_proj")),
                                           ("gemma3", (*LORA_TARGETS, "gate_proj", "up_proj", "down_proj")),
                                           ("mixtral", LORA_TARGETS)])
def test_lora_starts_as_the_base_saves_apart_and_merges(tmp_path, name, targets):
    model_type, config, _ = CASES[name]
    make = lambda: ARCHITECTURES[model_type].model(config, rngs=nnx.Rngs(0))
    model, batch = make(), padded_batch(config.vocab_size)
    base = forward(model, batch.tokens, batch.segments)
    add_lora(model, rank=3, alpha=6, targets=targets)
    wrapped = {key.rsplit(".", 1)[1] for key, *_ in _children(model, LoRALinear)}
    assert wrapped == set(targets) and not {name for *_, name, _ in _children(model, nnx.Linear)} & wrapped
    np.testing.assert_array_equal(forward(model, batch.tokens, batch.segments), base)
    fill_adapters(model)
    unmerged = forward(model, batch.tokens, batch.segments)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2
    file = save_adapters(model, tmp_path / "adapters.safetensors")
    model_bytes = 4 * sum(p.size for p in jax.tree.leaves(nnx.state(make(), nnx.Param)))
    assert file.stat().st_size < 0.25 * model_bytes
    np.testing.assert_array_equal(forward(load_adapters(make(), file), batch.tokens, batch.segments), unmerged)
    merged = merge_lora(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(nnx.state(make()))
    # float32: x(W + sAB) and xW + s(xA)B round differently; seen ~2e-6 of the largest logit
    difference = float(jnp.abs(forward(merged, batch.tokens, batch.segments) - unmerged).max())
    assert difference < 1e-5 * float(jnp.abs(unmerged).max())


def test_lora_trains_the_adapters_alone():
    model = ARCHITECTURES["gpt2"].model(GPT2Config.tiny(), rngs=nnx.Rngs(1))     # biases in the wrapped linears
    add_lora(model, rank=2, targets=("q_proj", "c_fc"))
    base_kind = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    frozen = jax.tree.map(np.asarray, nnx.state(model, base_kind))
    config = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=5)
    graphdef, state = train_state(model, config, wrt=nnx.LoRAParam)
    for _ in range(3):
        state, metrics = train_step(graphdef, state, uneven_batch(257), config)
    model, optimizer = nnx.merge(graphdef, state)
    for was, now in zip(jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(model, base_kind))):
        np.testing.assert_array_equal(was, now)
    assert all(float(jnp.abs(lora.lora_b[...]).max()) > 0 for *_, lora in _children(model, LoRALinear))
    moments = sum(x.size for x in jax.tree.leaves(nnx.as_pure(optimizer.opt_state)))
    assert moments <= 2 * sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) + 10


def test_lora_over_a_bfloat16_base():
    """The base stored and run in bfloat16 and frozen (half the memory of float32); the adapters stay float32 —
    trained, they are updated the way float32 master weights are — and the update is computed in the base's dtype."""
    model = Llama(LlamaConfig.tiny(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
    add_lora(model, rank=4)
    base_kind = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    assert {w.dtype for w in jax.tree.leaves(nnx.state(model, base_kind))} == {jnp.dtype(jnp.bfloat16)}
    assert {w.dtype for w in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {jnp.dtype(jnp.float32)}
    frozen = jax.tree.map(np.asarray, nnx.state(model, base_kind))
    config = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=8)
    graphdef, state = train_state(model, config, wrt=nnx.LoRAParam)
    batch, losses = uneven_batch(211), []
    for _ in range(8):
        state, metrics = train_step(graphdef, state, batch, config)
        losses.append(float(metrics["loss"]))
    model, _ = nnx.merge(graphdef, state)
    for was, now in zip(jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(model, base_kind))):
        np.testing.assert_array_equal(was, now)
    assert losses[-1] < losses[0] - 0.1
    assert model(np.ones((1, 4), np.int32)).dtype == jnp.float32          # logits in float32, as always


def test_lora_refuses_bad_settings_in_one_line(tmp_path):
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    for rank in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="rank must be a whole number above 0"):
            add_lora(model, rank)
    with pytest.raises(ValueError, match="no linear named qproj in this model; its linears are down_proj, "):
        add_lora(model, 2, targets=("q_proj", "qproj"))
    with pytest.raises(ValueError, match="no adapters to save"):
        save_adapters(model, tmp_path / "none.safetensors")
    assert not _children(model, LoRALinear)                      # refused settings left the model as it was
    add_lora(model, 2)
    with pytest.raises(ValueError, match="has adapters already"):
        add_lora(model, 2)
    file = save_adapters(model, tmp_path / "a.safetensors")
    other = Llama(dataclasses.replace(LlamaConfig.tiny(), hidden_size=60), rngs=nnx.Rngs(0))
    misfit = r"does not fit this model: layers\.0\.self_attn\.k_proj\.lora_a is \(54, 2\) in the file, \(60, 2\)"
    with pytest.raises(ValueError, match=misfit):
        load_adapters(other, file)
    assert not _children(other, LoRALinear)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not an adapters file"):
        load_adapters(other, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapters(other, tmp_path / "missing.safetensors")


# --- remat -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "gemma3", "mixtral"])
@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_less_and_changes_no_gradient(name, remat):
    """A recomputed block gives the plain run's loss (Mixtral's balancing loss included) and gradients, to float32
    rounding, while JAX keeps fewer bytes for the backward pass."""
    model, _ = random_models(name)
    batch = padded_batch(model.config.vocab_size)
    loss, grads = loss_and_gradients(model, batch, balance_weight(name))
    kept = saved_bytes(model, batch)
    model.remat = remat
    try:
        loss_again, grads_again = loss_and_gradients(model, batch, balance_weight(name))
        kept_again = saved_bytes(model, batch)
    finally:
        model.remat = None
    assert abs(float(loss_again) / float(loss) - 1) < 1e-6
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_again)):
        assert float(jnp.abs(a - b).max()) <= GRAD_RTOL * float(jnp.abs(a).max())    # recomputed: rounded anew
    assert kept_again < kept


def test_remat_refuses_an_unknown_policy():
    model, _ = random_models("llama")
    model.remat = "everything"
    try:
        with pytest.raises(ValueError, match="remat must be None or one of block, dots"):
            model(np.ones((1, 4), np.int32))
    finally:
        model.remat = None


REMAT_MEMORY = """
import dataclasses, jax.numpy as jnp, numpy as np
from flax import nnx
from llmjax.llama import Llama, LlamaConfig
from llmjax.training import Batch, TrainConfig, train_state, train_step
config = dataclasses.replace(LlamaConfig.tiny(), vocab_size=4096, hidden_size=128, intermediate_size=384,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=6,
                             max_position_embeddings=1024)
tokens = jnp.asarray(np.random.default_rng(0).integers(1, 4096, (2, 512)), jnp.int32)
batch = Batch(tokens, jnp.ones_like(tokens), tokens)
for remat in (None, "block"):
    model = Llama(config, rngs=nnx.Rngs(0))
    model.remat = remat
    graphdef, state = train_state(model, TrainConfig())
    print(train_step.lower(graphdef, state, batch, TrainConfig()).compile().memory_analysis().temp_size_in_bytes)
"""


def test_remat_lowers_the_compiled_steps_memory():
    """Under XLA:CPU's memory-minimising scheduler (a flag read when JAX starts: a process of its own), recomputing
    each block lowers the compiled train step's peak temporary memory by a quarter or more at 512 tokens (measured:
    38%, book/data/remat-cpu.json); the activations it drops are half of what the plain step holds."""
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
    if jax.default_backend() != "cpu":
        pytest.skip("the flag is XLA:CPU's")
    run = subprocess.run([sys.executable, "-c", REMAT_MEMORY], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    plain, recomputed = map(int, run.stdout.split())
    assert recomputed < 0.75 * plain
