"""Hostile and careless input to chapter 4's readers, one table per surface: safetensors headers and shard indexes,
config.json and GGUF metadata as the architectures' loaders read them, damaged Orbax checkpoints, and the cache of
joined model files. Every case ends in a one-line CheckpointError that names what is wrong — or, for good input,
in exactly the tensors, model or file that was written. A fuzz test corrupts real safetensors headers at random."""
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import threading

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from safetensors.numpy import save_file

from llmjax import gemma, gpt2, llama, mistral
from llmjax.checkpoints import (CheckpointError, GGUFCheckpoint, PackagedFile, SafetensorsCheckpoint, SafetensorsFile,
                                checkpoint_tensors, join_parts, restore_model, save_model)
from llmjax.layers import MLP
from conftest import append, overwrite

# the cache's record lives in an extended attribute, some checks read /proc: Linux's
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux only")


def one_line_error(call, *expected: str) -> str:
    """The message of the CheckpointError `call()` raises: one line, holding every `expected` piece."""
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(piece in message for piece in expected), message
    return message


# --- safetensors files ------------------------------------------------------------------------------------------

def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """One tensor of every dtype the reader supports, and the odd shapes: a scalar, an empty one, a prime-sized one."""
    rng = np.random.default_rng(seed)
    return {"f64": rng.standard_normal((2, 3)), "f32": rng.standard_normal((5, 7)).astype(np.float32),
            "f16": rng.standard_normal(11).astype(np.float16),
            "bf16": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
            "i64": rng.integers(-9, 9, 4), "i32": rng.integers(-9, 9, (2, 2), dtype=np.int32),
            "i16": rng.integers(-9, 9, 3, dtype=np.int16), "i8": rng.integers(-9, 9, 5, dtype=np.int8),
            "u8": rng.integers(0, 255, 6, dtype=np.uint8), "bool": rng.integers(0, 2, 7).astype(bool),
            "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's bytes -> its header and its data."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def joined(header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "good.safetensors"
    save_file(tensors(), path, metadata={"format": "np"})
    return path.read_bytes()


def test_every_dtype_reads_exactly(good_file, tmp_path):
    (tmp_path / "good.safetensors").write_bytes(good_file)
    file = SafetensorsFile(tmp_path / "good.safetensors")
    for name, value in tensors().items():
        assert file.read(name).dtype == value.dtype and file.read(name).shape == value.shape, name
        np.testing.assert_array_equal(file.read(name), value)


def test_sharded_reads_exactly(tmp_path):
    values = tensors(1)
    names = sorted(values)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: values[k] for k in keys}, tmp_path / shard)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    checkpoint = SafetensorsCheckpoint.from_directory(tmp_path)
    assert checkpoint.shapes() == {k: v.shape for k, v in values.items()}
    for name, value in values.items():
        np.testing.assert_array_equal(checkpoint.read(name), value)


def entry(name, **changes):
    """A header change: tensor `name`'s entry updated with `changes` (None removes a field)."""
    def change(header):
        header[name] = {k: v for k, v in {**header[name], **changes}.items() if v is not None}
        return header
    return change


def offsets_of(name, to):
    """A header change: tensor `name`'s data_offsets set from the header by `to(header)`."""
    def change(header):
        header[name]["data_offsets"] = to(header)
        return header
    return change


f32 = lambda h: h["f32"]["data_offsets"]   # noqa: E731   f32 is 5 x 7 float32: 140 bytes
HEADERS = {   # case: (header change, or the header's raw bytes; what the message says)
    "a JSON array": (lambda h: list(h), "JSON array, not an object"),
    "a JSON string": (lambda h: "tensors", "JSON string, not an object"),
    "a JSON number": (lambda h: 7, "JSON number, not an object"),
    "not JSON": (b"{not json", "corrupt safetensors header"),
    "not UTF-8": (b'{"\xff": 1}', "corrupt safetensors header"),
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),
    "a name twice": (None, "appears twice"),
    "an entry that is a number": (lambda h: h | {"f32": 5}, "lacks its dtype, shape or data_offsets"),
    "no data_offsets": (entry("f32", data_offsets=None), "lacks its dtype, shape or data_offsets"),
    "no dtype": (entry("f32", dtype=None), "lacks its dtype"),
    "no shape": (entry("f32", shape=None), "lacks its dtype"),
    "shape a string": (entry("f32", shape="5x7"), "has shape '5x7'"),
    "shape negative": (entry("f32", shape=[-5, -7]), "has shape [-5, -7]"),
    "shape of floats": (entry("f32", shape=[5.0, 7.0]), "has shape [5.0, 7.0]"),
    "shape of booleans": (entry("bool", shape=[True] * 7), "has shape [True"),
    "shape null": (entry("f32", shape=[None]), "has shape [None]"),
    "offsets a string": (entry("f32", data_offsets="0-140"), "data_offsets '0-140'"),
    "offsets of three": (entry("f32", data_offsets=[0, 70, 140]), "data_offsets [0, 70, 140]"),
    "offsets negative": (offsets_of("f32", lambda h: [-140, 0]), "data_offsets [-140, 0]"),
    "offsets of floats": (offsets_of("f32", lambda h: [float(f32(h)[0]), float(f32(h)[1])]), "data_offsets ["),
    "offsets reversed": (offsets_of("f32", lambda h: f32(h)[::-1]), "begin ≤ end"),
    "offsets too short": (offsets_of("f32", lambda h: [f32(h)[0], f32(h)[1] - 4]),
                          "but its shape [5, 7] of F32 takes 140"),
    "offsets too long": (offsets_of("f32", lambda h: [f32(h)[0], f32(h)[1] + 4]), "144 bytes"),
    "shape larger than offsets": (entry("f32", shape=[5, 8]), "takes 160"),
    "dtype of another size": (entry("f32", dtype="F64"), "takes 280"),
    "offsets past the end": (offsets_of("f32", lambda h: [10**6, 10**6 + 140]), "is truncated: tensor 'f32'"),
    "offsets past 2**64": (offsets_of("f32", lambda h: [2**70, 2**70 + 140]), "is truncated"),
    "two tensors on the same bytes": (offsets_of("i32", lambda h: [f32(h)[0], f32(h)[0] + 16]), "share bytes"),
    "overlapping by one byte": (lambda h: offsets_of("f16", lambda _: [f32(h)[1] - 1, f32(h)[1] + 21])(h),
                                "share bytes"),
    "an unknown dtype": (entry("f32", dtype="F8_E4M3"), "dtype 'F8_E4M3', which llmjax can't read"),
    "dtype a list": (entry("f32", dtype=["F32"]), "dtype ['F32'], which llmjax can't read"),
    "dtype a number": (entry("f32", dtype=4), "dtype 4"),
    "a name with a newline": (lambda h: h | {"a\nb": {**h.pop("f32"), "dtype": "X"}}, "tensor 'a\\nb' has dtype 'X'"),
}


def write_header(path, good_file: bytes, change) -> None:
    header, body = split(good_file)
    if change is None:   # json.dumps can't write a name twice
        raw = json.dumps(header).encode()
        raw = raw[:-1] + b', "f32": ' + json.dumps(header["f32"]).encode() + b"}"
        path.write_bytes(joined(raw, body))
    else:
        path.write_bytes(joined(change if isinstance(change, bytes) else change(header), body))


@pytest.mark.parametrize("case", HEADERS)
def test_damaged_header_is_refused(case, good_file, tmp_path):
    change, expected = HEADERS[case]
    write_header(tmp_path / "bad.safetensors", good_file, change)
    one_line_error(lambda: SafetensorsFile(tmp_path / "bad.safetensors"), "bad.safetensors", expected)
    (tmp_path / "model").mkdir()
    (tmp_path / "bad.safetensors").rename(tmp_path / "model" / "model.safetensors")
    one_line_error(lambda: SafetensorsCheckpoint.from_directory(tmp_path / "model"), expected)


FILES = {   # case: (the file's bytes from the good file's, what the message says)
    "empty": (lambda d: b"", "header cut short"),
    "seven bytes": (lambda d: d[:7], "header cut short"),
    "header cut": (lambda d: d[:20], "header cut short"),
    "data cut": (lambda d: d[:-3], "is truncated"),
    "header length past 2**63": (lambda d: struct.pack("<Q", 2**63) + d[8:], "header cut short"),
}


@pytest.mark.parametrize("case", FILES)
def test_cut_file_is_refused(case, good_file, tmp_path):
    damage, expected = FILES[case]
    (tmp_path / "bad.safetensors").write_bytes(damage(good_file))
    one_line_error(lambda: SafetensorsFile(tmp_path / "bad.safetensors"), "bad.safetensors", expected)


def test_huge_header_is_refused_without_reading_it(tmp_path):
    with open(tmp_path / "huge.safetensors", "wb") as f:    # sparse: 200 MB that take no disk
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(200_000_000)
    one_line_error(lambda: SafetensorsFile(tmp_path / "huge.safetensors"), "header of 150000000 bytes")


def test_unreadable_file_is_refused(tmp_path):
    one_line_error(lambda: SafetensorsFile(tmp_path / "absent.safetensors"), "can't be read")
    one_line_error(lambda: SafetensorsFile(tmp_path), "can't be read")


# --- shard indexes ----------------------------------------------------------------------------------------------

INDEXES = {   # case: (the index's content, what the message says)
    "a shard in the parent folder": ({"weight_map": {"f32": "../outside/x.safetensors"}}, "'../outside/x.safetensors'"),
    "an absolute shard": ("absolute", "which is not a file in"),
    "a shard climbing out of a subfolder": ({"weight_map": {"f32": "sub/../../outside/x.safetensors"}},
                                            "not a file in"),
    "a Windows parent": ({"weight_map": {"f32": "..\\outside\\x.safetensors"}}, "not a file in"),
    "a Windows drive": ({"weight_map": {"f32": "C:\\x.safetensors"}}, "not a file in"),
    "an empty shard name": ({"weight_map": {"f32": ""}}, "names the shard ''"),
    "an array": ([["f32", "model.safetensors"]], "no weight_map"),
    "a string": ("model.safetensors", "no weight_map"),
    "no weight_map": ({"metadata": {}}, "no weight_map"),
    "weight_map an array": ({"weight_map": ["model.safetensors"]}, "no weight_map"),
    "weight_map to numbers": ({"weight_map": {"f32": 1}}, "no weight_map"),
    "weight_map to lists": ({"weight_map": {"f32": ["model.safetensors"]}}, "no weight_map"),
    "weight_map empty": ({"weight_map": {}}, "no weight_map"),
    "not JSON": ("{not json", "not valid JSON"),
    "a missing shard": ({"weight_map": {"f32": "model-2.safetensors"}}, "lacks shards model-2.safetensors"),
}


@pytest.mark.parametrize("case", INDEXES)
def test_bad_index_is_refused(case, good_file, tmp_path):
    content, expected = INDEXES[case]
    model, outside = tmp_path / "model", tmp_path / "outside"
    model.mkdir()
    outside.mkdir()
    for folder in (model, outside):   # a real file wherever the index may point
        (folder / "model.safetensors").write_bytes(good_file)
        (folder / "x.safetensors").write_bytes(good_file)
    if content == "absolute":
        content = {"weight_map": {"f32": str(outside / "x.safetensors")}}
    text = content if isinstance(content, str) and content.startswith("{") else json.dumps(content)
    (model / "model.safetensors.index.json").write_text(text)
    one_line_error(lambda: SafetensorsCheckpoint.from_directory(model), expected)


def test_shard_in_a_subfolder_is_read(good_file, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "a.safetensors").write_bytes(good_file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "./weights/a.safetensors" for name in tensors()}}))
    np.testing.assert_array_equal(SafetensorsCheckpoint.from_directory(tmp_path).read("f32"), tensors()["f32"])


# --- fuzz: random damage to a real header -------------------------------------------------------------------------

def like(byte: int, rng) -> int:
    """Another byte of the same class — digit for digit, letter for letter — that often leaves valid JSON."""
    for group in (b"0123456789", b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
        if byte in group:
            return rng.choice(list(group))
    return byte


@pytest.mark.parametrize("seed", [0, 1])
def test_random_header_damage_is_refused_or_read(seed, good_file, tmp_path):
    """A few bytes of the length prefix or header overwritten at random: a one-line CheckpointError, or a file whose
    every tensor reads — the bytes its entry names, as the safetensors package reads them where it accepts the file
    too — and writes back to the same tensors."""
    rng = np.random.default_rng(seed)
    end = 8 + struct.unpack("<Q", good_file[:8])[0]
    outcomes = {"refused": 0, "read": 0}
    for _ in range(200):
        data = bytearray(good_file)
        for at in rng.integers(0, end, rng.integers(1, 4)):
            data[at] = rng.choice([rng.integers(0, 256), rng.choice(list(b'{}[]",:-e.')), like(data[at], rng)])
        (tmp_path / "model.safetensors").write_bytes(data)
        try:
            checkpoint = SafetensorsCheckpoint.from_directory(tmp_path)
            ours = {name: np.array(checkpoint.read(name)) for name in checkpoint.shapes()}
        except CheckpointError as e:
            assert "\n" not in str(e), str(e)
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        try:
            theirs = safetensors.numpy.load(bytes(data))
        except Exception:   # the safetensors package is stricter (it refuses gaps between tensors)
            theirs = None
        if theirs is not None:
            assert theirs.keys() == ours.keys()
            for name in ours:
                assert theirs[name].dtype == ours[name].dtype
                np.testing.assert_array_equal(theirs[name], ours[name])
        save_file(ours, tmp_path / "again.st")
        again = SafetensorsFile(tmp_path / "again.st")
        for name, value in ours.items():
            np.testing.assert_array_equal(again.read(name), value)
    print(outcomes)
    assert outcomes["refused"] > 50 and outcomes["read"] > 5, outcomes


# --- config.json, as the architectures' loaders read it ------------------------------------------------------------

HF_MODELS = {   # loader name: (config, model class, the HF key map, config -> config.json, from_hf_directory)
    "gpt2": (gpt2.GPT2Config.tiny(), gpt2.GPT2, lambda c: gpt2.KEY_MAP, gpt2.config_to_hf, gpt2.from_hf_directory),
    "llama": (llama.LlamaConfig.tiny(), llama.Llama, llama.hf_key_map, llama.config_to_hf, llama.from_hf_directory),
    "gemma3": (gemma.GemmaConfig.tiny(3), gemma.Gemma, gemma.hf_key_map, gemma.config_to_hf, gemma.from_hf_directory),
    "mistral": (mistral.MistralConfig.tiny(), mistral.Mistral, llama.hf_key_map, mistral.config_to_hf,
                mistral.from_hf_directory),
    "mixtral": (mistral.MixtralConfig.tiny(), mistral.Mixtral, mistral.hf_key_map, mistral.config_to_hf,
                mistral.from_hf_directory),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    """A tiny random model of each architecture, saved as transformers would: config.json + model.safetensors."""
    dirs = {}
    for name, (config, model_cls, key_map, to_hf, _) in HF_MODELS.items():
        directory = dirs[name] = tmp_path_factory.mktemp(name)
        save_file(checkpoint_tensors(model_cls(config, rngs=nnx.Rngs(0)), key_map(config)),
                  directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(to_hf(config)))
    return dirs


HF_CONFIGS = {   # case: (loaders it applies to, config.json -> the bad one (or its text), what the message says)
    "an array": ("*", lambda hf: [hf], "holds a JSON array"),
    "a string": ("*", lambda hf: "config", "holds a JSON string"),
    "null": ("*", lambda hf: None, "holds a JSON null"),
    "not JSON": ("*", "{not json", "not valid JSON"),
    "nested 100,000 deep": ("*", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "hidden_size a string": ("llama gemma3 mistral mixtral", lambda hf: hf | {"hidden_size": "abc"},
                             "hidden_size is 'abc', but it must be a whole number ≥ 1"),
    "hidden_size zero": ("llama gemma3 mistral mixtral", lambda hf: hf | {"hidden_size": 0}, "hidden_size is 0"),
    "hidden_size negative": ("llama gemma3", lambda hf: hf | {"hidden_size": -54}, "hidden_size is -54"),
    "hidden_size a float": ("llama gemma3", lambda hf: hf | {"hidden_size": 54.0}, "hidden_size is 54.0"),
    "hidden_size true": ("llama", lambda hf: hf | {"hidden_size": True}, "hidden_size is True"),
    "hidden_size null": ("llama gemma3", lambda hf: hf | {"hidden_size": None}, "hidden_size is None"),
    "n_embd a string": ("gpt2", lambda hf: hf | {"n_embd": "abc"}, "n_embd is 'abc'"),
    "n_embd zero": ("gpt2", lambda hf: hf | {"n_embd": 0}, "n_embd is 0"),
    "n_head zero": ("gpt2", lambda hf: hf | {"n_head": 0}, "n_head is 0"),
    "n_head not dividing n_embd": ("gpt2", lambda hf: hf | {"n_head": 6}, "n_embd 35 is not a multiple of n_head 6"),
    "n_layer a list": ("gpt2", lambda hf: hf | {"n_layer": [3]}, "n_layer is [3]"),
    "n_inner a string": ("gpt2", lambda hf: hf | {"n_inner": "83"}, "n_inner is '83'"),
    "heads zero": ("llama gemma3 mistral mixtral", lambda hf: hf | {"num_attention_heads": 0},
                   "num_attention_heads is 0"),
    "kv heads zero": ("llama gemma3 mistral", lambda hf: hf | {"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    "kv heads not dividing heads": ("llama gemma3 mistral mixtral", lambda hf: hf | {"num_key_value_heads": 4},
                                    "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    "heads not dividing the width": ("llama mistral", lambda hf: hf | {"head_dim": None, "num_attention_heads": 4,
                                                                       "num_key_value_heads": 2},
                                     "hidden_size 54 is not a multiple of num_attention_heads 4"),
    "head_dim zero": ("llama gemma3", lambda hf: hf | {"head_dim": 0}, "head_dim is 0"),
    "vocab_size a string": ("*", lambda hf: hf | {"vocab_size": "211"}, "vocab_size is '211'"),
    "layers zero": ("llama gemma3 mistral", lambda hf: hf | {"num_hidden_layers": 0}, "num_hidden_layers is 0"),
    "layers missing": ("gemma3", lambda hf: {k: v for k, v in hf.items()
                                             if k not in ("num_hidden_layers", "layer_types")},
                       "lacks 'num_hidden_layers'"),
    "intermediate_size a string": ("llama gemma3 mixtral", lambda hf: hf | {"intermediate_size": "x"},
                                   "intermediate_size is 'x'"),
    "max_position_embeddings zero": ("llama gemma3", lambda hf: hf | {"max_position_embeddings": 0},
                                     "max_position_embeddings is 0"),
    "rms_norm_eps a string": ("llama gemma3 mistral", lambda hf: hf | {"rms_norm_eps": "1e-6"},
                              "rms_norm_eps is '1e-6'"),
    "rms_norm_eps negative": ("llama", lambda hf: hf | {"rms_norm_eps": -1e-6}, "rms_norm_eps is -1e-06"),
    "layer_norm_epsilon a string": ("gpt2", lambda hf: hf | {"layer_norm_epsilon": "x"}, "layer_norm_epsilon is 'x'"),
    "rope_theta a string": ("llama mistral", lambda hf: {k: v for k, v in hf.items() if k != "rope_parameters"}
                            | {"rope_theta": "abc"}, "rope_theta is 'abc'"),
    "rope_theta zero": ("llama", lambda hf: hf | {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
                        "rope_parameters.rope_theta is 0"),
    "rope_parameters a string": ("llama gemma3", lambda hf: hf | {"rope_parameters": "default"},
                                 "rope_parameters is 'default'"),
    "a layer type's rope_theta a string": ("gemma3", lambda hf: hf | {"rope_parameters": {
        **hf["rope_parameters"], "sliding_attention": {"rope_type": "default", "rope_theta": "1e4"}}},
        "rope_parameters.sliding_attention.rope_theta is '1e4'"),
    "linear rope without its factor": ("llama", lambda hf: hf | {"rope_parameters": {"rope_type": "linear",
                                                                                     "rope_theta": 1e4}},
                                       "lacks 'factor'"),
    "rope factor a string": ("llama", lambda hf: hf | {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4,
                                                                           "factor": "8"}},
                             "rope_parameters.factor is '8'"),
    "eos a string": ("*", lambda hf: hf | {"eos_token_id": "</s>"}, "eos_token_id is '</s>'"),
    "eos negative": ("llama", lambda hf: hf | {"eos_token_id": [2, -1]}, "eos_token_id is [2, -1]"),
    "sliding_window zero": ("gemma3 mistral", lambda hf: hf | {"sliding_window": 0}, "sliding_window is 0"),
    "sliding_window a string": ("gemma3 mistral", lambda hf: hf | {"sliding_window": "8"}, "sliding_window is '8'"),
    "layer_types a string": ("gemma3", lambda hf: hf | {"layer_types": "sliding"}, "layer_types is 'sliding'"),
    "layer_types too short": ("gemma3", lambda hf: hf | {"layer_types": hf["layer_types"][:2]},
                              "layer_types has 2 entries for 7 layers"),
    "a softcap a string": ("gemma3", lambda hf: hf | {"attn_logit_softcapping": "5"}, "attn_logit_softcapping is '5'"),
    "query_pre_attn_scalar zero": ("gemma3", lambda hf: hf | {"query_pre_attn_scalar": 0},
                                   "query_pre_attn_scalar is 0"),
    "tie_word_embeddings a string": ("llama", lambda hf: hf | {"tie_word_embeddings": "no"},
                                     "tie_word_embeddings is 'no'"),
    "hidden_act a number": ("llama", lambda hf: hf | {"hidden_act": 1}, "hidden_act is 1"),
    "experts zero": ("mixtral", lambda hf: hf | {"num_local_experts": 0}, "num_local_experts is 0"),
    "more experts per token than experts": ("mixtral", lambda hf: hf | {"num_experts_per_tok": 6},
                                            "num_experts_per_tok 6 is more than the 5 experts"),
}
HF_CASES = [(loader, case) for case, (loaders, _, _) in HF_CONFIGS.items()
            for loader in (HF_MODELS if loaders == "*" else loaders.split())]


def test_good_configs_load(hf_dirs):
    for name, (config, *_, load) in HF_MODELS.items():
        assert load(hf_dirs[name]).config == config, name


@pytest.mark.parametrize("loader, case", HF_CASES)
def test_bad_config_is_refused(loader, case, hf_dirs, tmp_path):
    _, change, expected = HF_CONFIGS[case]
    load = HF_MODELS[loader][-1]
    shutil.copy(hf_dirs[loader] / "model.safetensors", tmp_path)
    hf = json.loads((hf_dirs[loader] / "config.json").read_text())
    (tmp_path / "config.json").write_text(change if isinstance(change, str) else json.dumps(change(hf)))
    one_line_error(lambda: load(tmp_path), "config.json", expected)


# --- GGUF metadata, as the architectures' loaders read it ------------------------------------------------------

V = gguf.GGUFValueType


def gguf_metadata(arch: str, config) -> dict:
    """{key: (value, type[, item type])}: what llama.cpp's converter writes for `config`, tokenizer included."""
    n = config.vocab_size
    meta = {f"{arch}.{k}": v for k, v in {
        "context_length": (config.max_position_embeddings, V.UINT32),
        "embedding_length": (config.hidden_size, V.UINT32), "block_count": (config.num_hidden_layers, V.UINT32),
        "feed_forward_length": (config.intermediate_size, V.UINT32),
        "attention.head_count": (config.num_attention_heads, V.UINT32),
        "attention.head_count_kv": (config.num_key_value_heads, V.UINT32),
        "attention.key_length": (config.head_dim, V.UINT32), "attention.value_length": (config.head_dim, V.UINT32),
        "attention.layer_norm_rms_epsilon": (config.rms_norm_eps, V.FLOAT32),
        "rope.freq_base": (config.rope.theta, V.FLOAT32)}.items()}
    if arch == "gemma3":
        meta |= {f"gemma3.{k}": v for k, v in {
            "rope.freq_base_swa": (config.rope_local.theta, V.FLOAT32),
            "attention.sliding_window": (config.sliding_window, V.UINT32),
            "attention.sliding_window_pattern": ([t == gemma.SLIDING for t in config.layer_types], V.ARRAY, V.BOOL),
            "rope.scaling.type": ("linear", V.STRING), "rope.scaling.factor": (config.rope.factor, V.FLOAT32)}.items()}
    tokens = ["<unk>", "<s>", "</s>"] + [f"▁w{i}" for i in range(n - 3)]
    return meta | {"tokenizer.ggml.model": ("llama", V.STRING), "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
                   "tokenizer.ggml.scores": ([0.0] * 3 + [-float(i) for i in range(n - 3)], V.ARRAY, V.FLOAT32),
                   "tokenizer.ggml.token_type": ([2, 3, 3] + [1] * (n - 3), V.ARRAY, V.INT32),
                   "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32)}


def write_gguf(path, arch: str, metadata: dict, weights: dict):
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, kind, *item) in metadata.items():
        writer.add_key_value(key, value, kind, sub_type=item[0] if item else None)
    for name, array in weights.items():
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_MODELS = {   # loader: (architecture in the file, config, model class, GGUF key map, from_gguf)
    "llama": ("llama", llama.LlamaConfig.tiny(), llama.Llama, llama.gguf_key_map, llama.from_gguf),
    "mistral": ("llama", llama.LlamaConfig.tiny(), llama.Llama, llama.gguf_key_map, mistral.from_gguf),
    "gemma3": ("gemma3", dataclasses.replace(gemma.GemmaConfig.tiny(3), query_pre_attn_scalar=10, eos_token_ids=(2,)),
               gemma.Gemma, gemma.gguf_key_map, gemma.from_gguf),
}


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory) -> dict:
    """{loader: (its good metadata, its weights)} for a tiny random model of each."""
    models = {}
    for name, (arch, config, model_cls, key_map, _) in GGUF_MODELS.items():
        config = dataclasses.replace(config, tie_word_embeddings=True) if arch == "llama" else config
        weights = checkpoint_tensors(model_cls(config, rngs=nnx.Rngs(0)), key_map(config))
        models[name] = gguf_metadata(arch, config), weights
    return models


def setting(key: str, value, kind=None, *item):
    """A metadata change: `key` set to `value` of GGUF type `kind` (as written by llama.cpp if not given)."""
    return lambda meta: meta | {key: (value, kind or meta[key][1], *item)}


def without(key: str):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


A = "{arch}."
GGUF_CASES_TABLE = {   # case: (loaders, metadata change, what the message says); "{arch}." is the file's architecture
    "width a string": ("*", setting(A + "embedding_length", "abc", V.STRING), A + "embedding_length is 'abc'"),
    "width zero": ("*", setting(A + "embedding_length", 0), A + "embedding_length is 0"),
    "width a float": ("*", setting(A + "embedding_length", 54.0, V.FLOAT32), A + "embedding_length is 54.0"),
    "width an array": ("*", setting(A + "embedding_length", [54], V.ARRAY, V.UINT32), A + "embedding_length is [54]"),
    "width missing": ("*", without(A + "embedding_length"), "lacks the metadata {arch}.embedding_length"),
    "layers missing": ("*", without(A + "block_count"), "lacks the metadata {arch}.block_count"),
    "layers a bool": ("*", setting(A + "block_count", True, V.BOOL), A + "block_count is True"),
    "heads zero": ("*", setting(A + "attention.head_count", 0), A + "attention.head_count is 0"),
    "heads a string": ("*", setting(A + "attention.head_count", "6", V.STRING), A + "attention.head_count is '6'"),
    "kv heads not dividing": ("*", setting(A + "attention.head_count_kv", 4),
                              A + "attention.head_count 6 is not a multiple of {arch}.attention.head_count_kv 4"),
    "heads not dividing the width": ("llama mistral", lambda m: without(A + "attention.key_length")(
        setting(A + "attention.head_count", 4)(setting(A + "attention.head_count_kv", 2)(m))),
        A + "embedding_length 54 is not a multiple of {arch}.attention.head_count 4"),
    "head width zero": ("*", setting(A + "attention.key_length", 0), A + "attention.key_length is 0"),
    "context a string": ("*", setting(A + "context_length", "128", V.STRING), A + "context_length is '128'"),
    "epsilon a string": ("*", setting(A + "attention.layer_norm_rms_epsilon", "1e-6", V.STRING),
                         A + "attention.layer_norm_rms_epsilon is '1e-6'"),
    "epsilon NaN": ("*", setting(A + "attention.layer_norm_rms_epsilon", float("nan")),
                    A + "attention.layer_norm_rms_epsilon is nan"),
    "rope base a string": ("*", setting(A + "rope.freq_base", "1e4", V.STRING), A + "rope.freq_base is '1e4'"),
    "rope base zero": ("*", setting(A + "rope.freq_base", 0.0), A + "rope.freq_base is 0.0"),
    "vocab_size zero": ("*", setting(A + "vocab_size", 0, V.UINT32), A + "vocab_size is 0"),
    "no vocabulary at all": ("*", lambda m: {k: v for k, v in m.items() if not k.startswith("tokenizer.")},
                             "neither {arch}.vocab_size nor a tokenizer's tokens"),
    "tokens a string": ("*", setting("tokenizer.ggml.tokens", "abc", V.STRING), "tokenizer.ggml.tokens is 'abc'"),
    "eos a string": ("*", setting("tokenizer.ggml.eos_token_id", "</s>", V.STRING),
                     "tokenizer.ggml.eos_token_id is '</s>'"),
    "eos negative": ("*", setting("tokenizer.ggml.eos_token_id", -1, V.INT32), "tokenizer.ggml.eos_token_id is -1"),
    "bos past the vocabulary": ("*", setting("tokenizer.ggml.bos_token_id", 5000),
                                "tokenizer.ggml.bos_token_id is 5000, past the 211 tokens"),
    "no token scores": ("llama mistral", without("tokenizer.ggml.scores"), "embedded tokenizer can't be built"),
    "sliding window a string": ("gemma3", setting(A + "attention.sliding_window", "8", V.STRING),
                                A + "attention.sliding_window is '8'"),
    "sliding window zero": ("gemma3", setting(A + "attention.sliding_window", 0), A + "attention.sliding_window is 0"),
    "layer pattern a string": ("gemma3", setting(A + "attention.sliding_window_pattern", "6", V.STRING),
                               A + "attention.sliding_window_pattern is '6'"),
    "layer pattern too short": ("gemma3", setting(A + "attention.sliding_window_pattern", [True, False], V.ARRAY,
                                                  V.BOOL), "layer_types has 2 entries for 7 layers"),
    "layer pattern of numbers": ("gemma3", setting(A + "attention.sliding_window_pattern", [1] * 7, V.ARRAY, V.UINT8),
                                 A + "attention.sliding_window_pattern is [1, 1"),
    "linear rope without its factor": ("gemma3", without(A + "rope.scaling.factor"), "can't build"),
    "rope factor a string": ("gemma3", setting(A + "rope.scaling.factor", "8", V.STRING),
                             A + "rope.scaling.factor is '8'"),
    "rope scaling type a number": ("gemma3", setting(A + "rope.scaling.type", 1, V.UINT32),
                                   A + "rope.scaling.type is 1"),
    "local rope base a string": ("gemma3", setting(A + "rope.freq_base_swa", "1e4", V.STRING),
                                 A + "rope.freq_base_swa is '1e4'"),
    "softcap a string": ("gemma3", setting(A + "attn_logit_softcapping", "50", V.STRING),
                         A + "attn_logit_softcapping is '50'"),
    "softcap negative": ("gemma3", setting(A + "final_logit_softcapping", -30.0, V.FLOAT32),
                         A + "final_logit_softcapping is -30.0"),
}
GGUF_CASES = [(loader, case) for case, (loaders, _, _) in GGUF_CASES_TABLE.items()
              for loader in (GGUF_MODELS if loaders == "*" else loaders.split())]


def arch_keys(change, arch: str):
    """`change` with "{arch}." in its keys made the file's architecture."""
    return lambda meta: {k.replace(A, f"{arch}."): v for k, v in
                         change({k.replace(f"{arch}.", A): v for k, v in meta.items()}).items()}


def test_good_ggufs_load(gguf_models, tmp_path):
    for name, (arch, config, *_, load) in GGUF_MODELS.items():
        metadata, weights = gguf_models[name]
        model, tokenizer = load(GGUFCheckpoint(write_gguf(tmp_path / f"{name}.gguf", arch, metadata, weights)))
        assert model.config.hidden_size == config.hidden_size and tokenizer.convert_tokens_to_ids("▁w7") == 10


@pytest.mark.parametrize("loader, case", GGUF_CASES)
def test_bad_gguf_metadata_is_refused(loader, case, gguf_models, tmp_path):
    arch, *_, load = GGUF_MODELS[loader]
    _, change, expected = GGUF_CASES_TABLE[case]
    metadata, weights = gguf_models[loader]
    path = write_gguf(tmp_path / "bad.gguf", arch, arch_keys(change, arch)(metadata), weights)
    one_line_error(lambda: load(GGUFCheckpoint(path)), "bad.gguf", expected.replace(A, f"{arch}."))


# --- Orbax checkpoints --------------------------------------------------------------------------------------------

def mlp(width: int = 10, dtype=jnp.float32):
    return nnx.eval_shape(lambda: MLP(6, width, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(an MLP, the Orbax checkpoint save_model wrote of it)."""
    model = MLP(6, 10, rngs=nnx.Rngs(1))
    return model, save_model(model, tmp_path_factory.mktemp("orbax") / "saved")


def damage_files(pattern: str, how: str):
    """A damage: every file under the checkpoint matching `pattern` removed, emptied, halved or overwritten."""
    def damage(directory):
        files = [p for p in directory.glob(pattern) if p.is_file()]
        assert files, pattern
        for path in files:
            data = path.read_bytes()
            {"removed": lambda: path.unlink(), "emptied": lambda: path.write_bytes(b""),
             "halved": lambda: path.write_bytes(data[: len(data) // 2]),
             "garbage": lambda: path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, len(data),
                                                                                          dtype=np.uint8)))}[how]()
    return damage


ORBAX = {   # case: (damage to a copy of the checkpoint, or another target model; what the message says)
    "no folder": (lambda d: shutil.rmtree(d), "there is no such folder"),
    "a file": (lambda d: shutil.rmtree(d) or d.write_text("x"), "is a file, not a folder"),
    "an empty folder": (lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in d.iterdir()],
                        "is not an Orbax checkpoint"),
    "a folder of other files": (lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in d.iterdir()]
                                and (d / "model.safetensors").write_bytes(b"x"), "is not an Orbax checkpoint"),
    **{f"_METADATA {how}": (damage_files("_METADATA", how),
                            "is not an Orbax checkpoint" if how == "removed" else "is a damaged Orbax checkpoint")
       for how in ("removed", "emptied", "halved", "garbage")},
    **{f"manifest.ocdbt {how}": (damage_files("manifest.ocdbt", how), "is a damaged Orbax checkpoint")
       for how in ("removed", "emptied", "halved", "garbage")},
    **{f"array data {how}": (damage_files("d/*", how), "is a damaged Orbax checkpoint")
       for how in ("removed", "emptied", "halved", "garbage")},
    **{f"array metadata {how}": (damage_files("array_metadatas/*", how), "is a damaged Orbax checkpoint")
       for how in ("emptied", "halved", "garbage")},
    **{f"sharding {how}": (damage_files("_sharding", how), "is a damaged Orbax checkpoint")
       for how in ("emptied", "garbage")},
    "the array data folder removed": (lambda d: shutil.rmtree(d / "d"), "is a damaged Orbax checkpoint"),
    "a wider model": (mlp(12), "another shape (c_fc.bias is [10] there but [12] here"),
    "another structure": (nnx.eval_shape(lambda: nnx.Sequential(MLP(6, 10, rngs=nnx.Rngs(0)))),
                          "another shape (it lacks layers.0.c_fc.bias"),
    "a bfloat16 model": (mlp(dtype=jnp.bfloat16), "holds float32 parameters (c_fc.bias) but this model's are bfloat16; "
                                                  "build the model with param_dtype=float32"),
    "a float16 model": (mlp(dtype=jnp.float16), "but this model's are float16"),
}


@pytest.mark.parametrize("case", ORBAX)
def test_damaged_orbax_checkpoint_is_refused(case, saved, tmp_path):
    model, path = saved
    damage, expected = ORBAX[case]
    copy = shutil.copytree(path, tmp_path / "copy")
    target = mlp()
    if isinstance(damage, nnx.Module):
        target = damage
    else:
        damage(copy)
    message = one_line_error(lambda: restore_model(target, copy), expected)
    assert ("another shape" in message) == ("another shape" in expected), message


def test_orbax_round_trip_of_every_dtype(tmp_path):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        model = MLP(6, 10, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(2))
        restored = restore_model(mlp(dtype=dtype), save_model(model, tmp_path / jnp.dtype(dtype).name))
        jax.tree.map(np.testing.assert_array_equal, nnx.state(restored), nnx.state(model))
        assert restored.c_fc.kernel.dtype == dtype


# --- the cache of joined files ------------------------------------------------------------------------------------

PARTS = [bytes([i]) * (3000 + i) for i in range(3)]
WHOLE = b"".join(PARTS)


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """A PackagedFile in three parts, in a package made for the test; the cache in tmp_path/cache."""
    package = tmp_path / "site" / "hostileparts"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for i, part in enumerate(PARTS):
        (package / f"p{i}").write_bytes(part)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    return PackagedFile("hostileparts==1", "whole.gguf", parts=tuple(f"hostileparts/p{i}" for i in range(3)),
                        sha256=hashlib.sha256(WHOLE).hexdigest())



def replace_with(path, data: bytes):
    (path.parent / "other").write_bytes(data)
    os.replace(path.parent / "other", path)


CACHE_DAMAGE = {   # case: what happens to the joined file in the cache after the first join
    "overwritten in place": lambda p: overwrite(p, 100, b"garbage"),
    "its last byte flipped": lambda p: overwrite(p, len(WHOLE) - 1, bytes([WHOLE[-1] ^ 1])),
    "truncated": lambda p: os.truncate(p, 1000),
    "emptied": lambda p: os.truncate(p, 0),
    "appended to": lambda p: append(p, b"more"),
    "replaced by another file": lambda p: replace_with(p, b"x" * len(WHOLE)),
    "removed": lambda p: p.unlink(),
    "its record removed": lambda p: os.removexattr(p, "user.llmjax.verified"),
    "its record garbled": lambda p: os.setxattr(p, "user.llmjax.verified", b"{not json"),
    "its record of another hash": lambda p: os.setxattr(p, "user.llmjax.verified", json.dumps(
        json.loads(os.getxattr(p, "user.llmjax.verified")) | {"sha256": "0" * 64}).encode()),
}


@pytest.mark.parametrize("case", CACHE_DAMAGE)
def test_damaged_cache_file_is_joined_again(case, packaged, tmp_path):
    path = packaged.locate()
    assert path == tmp_path / "cache" / "whole.gguf" and path.read_bytes() == WHOLE
    CACHE_DAMAGE[case](path)
    assert packaged.locate().read_bytes() == WHOLE
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["whole.gguf"]
    from llmjax.checkpoints import recorded
    assert recorded(path, packaged.sha256)


@pytest.mark.parametrize("case", CACHE_DAMAGE)
def test_damaged_cache_file_without_parts_is_not_used(case, packaged, tmp_path):
    path = packaged.locate()
    CACHE_DAMAGE[case](path)
    shutil.rmtree(tmp_path / "site" / "hostileparts")      # the parts uninstalled
    good = case.startswith("its record")                    # the file itself is still right: hashing says so
    assert (packaged.locate() == path) == good
    if not good:
        one_line_error(packaged.fetch, "pip install hostileparts==1")


def test_cached_file_is_trusted_by_its_record_without_reading(packaged, tmp_path, monkeypatch):
    path = packaged.locate()
    shutil.rmtree(tmp_path / "site" / "hostileparts")
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("a recorded file must not be hashed"))
    assert packaged.installed() and packaged.locate() == path


def test_installed(packaged, tmp_path):
    assert packaged.installed() and not (tmp_path / "cache").exists()           # parts installed, nothing joined
    assert PackagedFile("hostileparts==1", "hostileparts/p0").installed()      # a file inside an installed package
    path = packaged.locate()
    shutil.rmtree(tmp_path / "site" / "hostileparts")
    assert packaged.installed()                                                 # joined, and its record holds
    overwrite(path, 0, b"x")
    assert not packaged.installed()                                             # changed since: not without hashing
    single = PackagedFile("absentpackage==1", "absentpackage/model.gguf")
    assert not single.installed() and single.locate() is None


def test_stale_partial_files_are_removed(packaged, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = [cache / ".whole.gguf.abc123.partial", cache / ".whole.gguf.killed.partial"]
    for path in stale:
        path.write_bytes(b"half a join")
    (cache / ".other.gguf.x.partial").write_bytes(b"another file's")            # not this file's: left alone
    assert packaged.locate().read_bytes() == WHOLE
    assert sorted(p.name for p in cache.iterdir()) == [".other.gguf.x.partial", "whole.gguf"]


def test_join_flushes_to_disk_before_renaming(packaged, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or
                        fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", str(a))) or replace(a, b))
    packaged.locate()
    (_, synced), (_, renamed) = [c for c in calls if c[1].endswith(".partial")]
    assert [c[0] for c in calls if c[1].endswith(".partial")] == ["fsync", "replace"] and synced == renamed


def test_concurrent_joins_end_with_one_good_file(packaged, tmp_path):
    results, errors = [], []

    def join():
        try:
            results.append(packaged.locate())
        except Exception as e:   # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=join) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4 and all(r.read_bytes() == WHOLE for r in results)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["whole.gguf"]


def test_cache_folder_that_is_a_file(packaged, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "afile"))
    for call in (packaged.locate, packaged.installed, packaged.fetch):
        one_line_error(call, "afile is a file, not a folder", "LLMJAX_CACHE")
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "afile" / "below"))
    one_line_error(packaged.locate, "can't make the cache folder", "LLMJAX_CACHE")


def test_failed_join_leaves_nothing(tmp_path):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for part, data in zip(parts, PARTS):
        part.write_bytes(data)
    target = tmp_path / "cache" / "whole.gguf"
    one_line_error(lambda: join_parts(parts[::-1], target, hashlib.sha256(WHOLE).hexdigest()), "reinstall")
    with pytest.raises(FileNotFoundError):
        join_parts([*parts, tmp_path / "absent"], target, hashlib.sha256(WHOLE).hexdigest())
    assert not any((tmp_path / "cache").iterdir())

