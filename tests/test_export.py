"""Chapter 15's export, judged by the reference's own loader: transformers' `from_pretrained` on each exported folder
gives llmjax's logits, llmjax reads its own export back bit for bit, real GGUFs become folders that transformers
runs, and a refused or failed export leaves nothing behind."""
import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import llmjax
from llmjax import gemma, gpt2, llama, mistral
from llmjax.cli import main
from llmjax.export import export
from llmjax.models import REGISTRY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.disable_progress_bar()

# Two libraries summing the same float32 products in different orders differ by rounding: float32 keeps 24 bits
# (a relative 6e-8), and a few layers of sums over tens of terms gather tens of such roundings. Measured: 4e-7 to
# 2.9e-6 of the largest logit on the tiny models (Gemma 3: 1.6e-5 of 5.5), 2.9e-6 on SmolLM2 (1.1e-4 of 37.6) and
# 1.6e-6 on Gemma 3 270M (3.6e-5 of 22.4): the bound is relative, as the logits of trained models are tens. A
# tensor written under the wrong name, transposed or to the wrong layer moves the logits by their own size (a
# swapped q_norm/k_norm in Gemma 3's key map: 1.9 of 5.5).
RELATIVE = 1e-5


def randomized(model, seed: int, std: float = 0.1):
    """Every parameter redrawn: norm scales N(1, 0.2²) (so a scale written to the wrong layer shows), the rest
    N(0, std²)."""
    rng = np.random.default_rng(seed)
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(param.shape).astype(np.float32)
        param[...] = jnp.asarray(1 + 0.2 * noise if path[-1] == "scale" else std * noise, param.dtype)
    return model


def parameters(model) -> dict:
    return {path: np.asarray(p[...]) for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_parameters(a, b):
    ours, theirs = parameters(a), parameters(b)
    assert ours.keys() == theirs.keys()
    for path in ours:
        assert ours[path].dtype == theirs[path].dtype, path
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=str(path))


def reference(folder, dtype=None):
    """transformers' model of a folder: safetensors only, no code from the folder, eager attention, experts one by one
    (its grouped kernel refuses the tiny models' widths)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, use_safetensors=True,
                                                             dtype=dtype or torch.float32, attn_implementation="eager",
                                                             experts_implementation="eager").eval()


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).long()).logits.float().numpy()


def assert_close_logits(ours, theirs, relative=RELATIVE):
    ours = np.asarray(ours, np.float64)
    error, scale = np.abs(ours - theirs).max(), np.abs(ours).max()
    print(f"max|Δlogit| {error:.1e} = {error / scale:.1e} of the largest logit, {scale:.1f}")
    assert error <= relative * scale, f"max|Δlogit| {error:.2e} over logits up to {scale:.1f}"


TINY = {
    "gpt2": (gpt2.GPT2, gpt2.GPT2Config.tiny()),
    "llama": (llama.Llama, llama.LlamaConfig.tiny()),
    "llama-tied": (llama.Llama, dataclasses.replace(llama.LlamaConfig.tiny(), tie_word_embeddings=True)),
    "gemma": (gemma.Gemma, gemma.GemmaConfig.tiny(1)),
    "gemma2": (gemma.Gemma, gemma.GemmaConfig.tiny(2)),
    "gemma3": (gemma.Gemma, gemma.GemmaConfig.tiny(3)),
    "mistral": (mistral.Mistral, mistral.MistralConfig.tiny()),
    "mixtral": (mistral.Mixtral, mistral.MixtralConfig.tiny()),
}
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM",
           "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}


def tiny(name: str, seed: int = 0):
    model_cls, config = TINY[name]
    return randomized(model_cls(config, rngs=nnx.Rngs(seed)), seed)


def tokens(vocab_size: int, seed: int = 0, length: int = 13):
    return np.random.default_rng(seed).integers(0, vocab_size, (2, length))   # longer than the windows of 8


@pytest.mark.parametrize("name", TINY)
def test_transformers_and_llmjax_read_the_export(tmp_path, name):
    model = tiny(name, seed=len(name))
    folder = export(model, None, tmp_path / name)
    theirs = reference(folder)
    assert type(theirs).__name__ == CLASSES[name]
    ids = tokens(model.config.vocab_size, seed=len(name))
    assert_close_logits(model(ids), reference_logits(theirs, ids))

    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    tied = getattr(model.config, "tie_word_embeddings", True)
    assert ("lm_head.weight" in tensors) == (not tied)
    assert (theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()) == tied
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_same_parameters(model, llmjax.load(folder)[0])


def test_sharded_export_reads_the_same(tmp_path):
    model = tiny("mixtral", seed=3)
    whole = export(model, None, tmp_path / "whole")
    cut = export(model, None, tmp_path / "cut", max_shard_size="20KB")
    index = json.loads((cut / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in cut.glob("*.safetensors"))
    assert not (cut / "model.safetensors").exists() and len(files) > 5
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    written = {}
    for file in files:
        shard = safetensors.numpy.load_file(cut / file)
        assert len(shard) == 1 or sum(t.nbytes for t in shard.values()) <= 20_000, file
        assert all(index["weight_map"][name] == file for name in shard)
        written |= shard
    single = safetensors.numpy.load_file(whole / "model.safetensors")
    assert written.keys() == single.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())

    ids = tokens(model.config.vocab_size)
    assert_close_logits(model(ids), reference_logits(reference(cut), ids))
    assert_same_parameters(model, llmjax.load(cut)[0])


def test_bfloat16_is_written_as_bfloat16(tmp_path):
    model = randomized(llama.Llama(llama.LlamaConfig.tiny(), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                                   rngs=nnx.Rngs(0)), 0)
    folder = export(model, None, tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    header_size = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_size])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert_same_parameters(model, llmjax.load(folder, dtype="bfloat16")[0])
    theirs = reference(folder, dtype=torch.bfloat16)
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16


def test_merged_lora_exports_and_unmerged_is_refused(tmp_path):
    from llmjax.training import add_lora, merge_lora

    model = add_lora(tiny("llama", seed=5), rank=4)
    rng = np.random.default_rng(5)
    for _, param in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        param[...] = jnp.asarray(0.1 * rng.standard_normal(param.shape), param.dtype)
    with pytest.raises(ValueError, match="merge them first"):
        export(model, None, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    ids = tokens(model.config.vocab_size)
    adapted = np.asarray(model(ids))
    folder = export(merge_lora(model), None, tmp_path / "merged")
    assert_close_logits(adapted, reference_logits(reference(folder), ids))


# --- real weights: GGUF -> Hugging Face folder -> transformers ---------------------------------------------------

def real(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(REGISTRY[name].locate() is None,
                                                        reason=f"needs {REGISTRY[name].files.requirement}"))


@pytest.mark.parametrize("name", [real("smollm2-135m-instruct"), real("gemma-3-270m")])
def test_a_real_gguf_becomes_a_folder_transformers_runs(tmp_path, name):
    model, tokenizer = llmjax.load(name)
    folder = export(model, tokenizer, tmp_path / name)
    text = "The capital of France is"
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, tokenize=False)
        assert (folder / "chat_template.jinja").exists()
    ids = tokenizer(text)["input_ids"]
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert theirs_tokenizer(text)["input_ids"] == ids and theirs_tokenizer.chat_template == tokenizer.chat_template

    ours = np.asarray(model(np.asarray(ids)[None]))
    theirs = reference_logits(reference(folder), [ids])
    assert_close_logits(ours, theirs)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["bos_token_id"] == tokenizer.bos_token_id
    assert generation["eos_token_id"] in (tokenizer.eos_token_id, [tokenizer.eos_token_id])


# --- refusals, and failures halfway ------------------------------------------------------------------------------

def test_an_existing_folder_is_refused_and_kept(tmp_path):
    model = tiny("gpt2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    (tmp_path / "a-file").write_text("keep me too")
    for target in ("full", "a-file"):
        with pytest.raises(ValueError, match="already exists; export into a new folder, or remove it first") as info:
            export(model, None, tmp_path / target)
        assert "\n" not in str(info.value)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me" and len(list((tmp_path / "full").iterdir())) == 1
    assert (tmp_path / "a-file").read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    export(model, None, tmp_path / "empty")   # an empty folder is filled
    assert (tmp_path / "empty" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty", "full"]


class MyLlama(llama.Llama):
    """A model class llmjax has no checkpoint layout for."""


@pytest.mark.parametrize("model, expected", [
    (lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)), "can't export a Linear"),
    (lambda: MyLlama(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(0)), "can't export a MyLlama"),
])
def test_an_unknown_model_type_is_refused(tmp_path, model, expected):
    with pytest.raises(ValueError, match=expected) as info:
        export(model(), None, tmp_path / "out" / "deeper")
    assert "GPT2" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, error, expected", [
    (dict(max_shard_size="lots"), ValueError, "not a size"), (dict(max_shard_size=0), ValueError, "not a size"),
    (dict(max_shard_size=True), ValueError, "not a size"), (dict(tokenizer="gpt2"), TypeError, "not a str"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, setting, error, expected):
    with pytest.raises(error, match=expected):
        export(tiny("gpt2"), setting.get("tokenizer"), tmp_path / "out", **{k: v for k, v in setting.items()
                                                                              if k != "tokenizer"})
    assert list(tmp_path.iterdir()) == []


class FailingTokenizer:
    """Writes a file, then fails: the last step of an export, after every weight is on the disk."""

    def save_pretrained(self, directory):
        (directory / "tokenizer.json").write_text("{")
        raise OSError("No space left on device")


def test_a_failure_halfway_leaves_nothing(tmp_path, monkeypatch):
    model = tiny("llama")
    with pytest.raises(OSError, match="No space left"):
        export(model, FailingTokenizer(), tmp_path / "made" / "for" / "it")
    assert list(tmp_path.iterdir()) == []   # no folder, no .partial, not even the parents made for it

    calls = []

    def fail_on_the_third_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt   # not even an Exception: Ctrl-C halfway through the weights
        return save_file(tensors, path, metadata=metadata)

    save_file = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", fail_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        export(model, None, tmp_path / "cut", max_shard_size="20KB")
    assert len(calls) == 3 and calls[0].parent.name.endswith(".partial") and calls[0].parent.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_exports_a_folder_transformers_reads(tmp_path, tiny_gpt2_dir, capsys):
    source, original = tiny_gpt2_dir   # saved by transformers
    assert main(["export", "--model", str(source), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'out'}: ") and "model.safetensors" in out and out.count("\n") == 1
    ids = tokens(original.config.vocab_size)
    np.testing.assert_array_equal(reference_logits(reference(tmp_path / "out"), ids),
                                  reference_logits(reference(source), ids))   # the same weights, the same code
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=False)
    theirs = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    assert ours("hello world")["input_ids"] == theirs("hello world")["input_ids"]


@pytest.mark.parametrize("args, expected", [
    (["--out", "{tmp}/full"], "already exists"), (["--model", "nope", "--out", "{tmp}/new"], "unknown model"),
    (["--out", "{tmp}/new", "--max-shard-size", "2XB"], "not a size"),
])
def test_cli_refuses_in_one_line(tmp_path, tiny_gpt2_dir, capsys, args, expected):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    argv = ["export", "--model", str(tiny_gpt2_dir[0])] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmjax: error:") and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_cli_in_its_own_process_without_torch(tmp_path, tiny_gpt2_dir):
    """The runtime as installed without the reference: export a folder, then refuse to write over it, in a process
    where importing torch fails."""
    code = f"""
import sys
sys.modules["torch"] = None
from llmjax.cli import main
for _ in range(2):
    print(main(["export", "--model", {str(tiny_gpt2_dir[0])!r}, "--out", {str(tmp_path / "out")!r}]), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines()[1:] == ["0", "2"], out.stdout + out.stderr[-2000:]
    ours = [line for line in out.stderr.splitlines() if not line.startswith("[transformers] PyTorch was not found")]
    assert len(ours) == 1 and ours[0].startswith("llmjax: error:") and "already exists" in ours[0], out.stderr
    assert (tmp_path / "out" / "tokenizer.json").exists()
