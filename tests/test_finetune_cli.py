"""`llmjax finetune` (chapter 18) on a tiny random LLaMA folder: a run ends in a folder `llmjax generate` runs, LoRA
adds its adapters alone, a run killed mid-training or mid-write resumes to the uninterrupted run's weights byte for
byte, and every bad input is one line, exit status 2, and the file system as it was."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

import llmjax
import llmjax.cli
from llmjax.cli import main
from llmjax.export import export
from llmjax.llama import Llama, LlamaConfig
from llmjax.training import load_adapters, merge_lora, saved_steps

TEXT = """The river starts in the hills, where rain gathers in small streams. The streams meet and grow, and by the
time the water reaches the plain it carries boats. Towns were built on its banks because the river brought trade,
and bridges were built because people wanted to cross it. In spring the river floods the fields, and the mud it
leaves behind makes them rich. In summer it runs low and slow, and children swim in it. At its mouth it meets the
sea, and the fresh water and the salt water mix for miles."""
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n'
RUN = ["--steps", "6", "--batch", "2", "--seq-len", "32", "--save-every", "2", "--lr", "1e-2"]


def byte_tokenizer():
    """A byte-level tokenizer (256 ids, one per byte, and an EOS) with a chat template that writes the turns' text
    alone."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The base model (one layer of the tiny LLaMA, context 128, random) as a Hugging Face folder, and data."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = byte_tokenizer()
    config = dataclasses.replace(LlamaConfig.tiny(), vocab_size=len(tokenizer), num_hidden_layers=1)
    export(Llama(config, rngs=nnx.Rngs(0)), tokenizer, root / "base")
    (root / "river.txt").write_text(TEXT)
    (root / "empty.txt").write_text("  \n")
    (root / "silent.jsonl").write_text(CHAT)        # the assistant says nothing: nothing to learn
    return dict(root=root, base=root / "base", data=root / "river.txt")


def finetune(files, out, *flags) -> int:
    return main(["finetune", "--model", str(files["base"]), "--data", str(files["data"]), "--out", str(out), *RUN,
                 *flags])


@pytest.fixture(scope="module")
def full_run(files) -> Path:
    out = files["root"] / "full"
    assert finetune(files, out) == 0
    return out


def tensors(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(folder / "model.safetensors")


def listing(*folders: Path) -> dict[str, int | None]:
    """Every path under the folders, with each file's size."""
    return {str(p): p.stat().st_size if p.is_file() else None for f in folders for p in [f, *f.rglob("*")]
            if p.exists()}


def test_a_full_run_writes_a_model_that_generate_runs(files, full_run, capsys):
    base_files = {p.name for p in files["base"].iterdir()}     # config, weights, tokenizer
    assert {p.name for p in full_run.iterdir()} == base_files | {"checkpoints", "finetune.json"}   # no staging left
    assert saved_steps(full_run) == [2, 4, 6]
    trained, base = tensors(full_run), tensors(files["base"])
    assert trained.keys() == base.keys()
    assert all(not np.array_equal(trained[k], base[k]) for k in base), \
        [k for k in base if np.array_equal(trained[k], base[k])]   # every tensor moved
    capsys.readouterr()
    assert main(["generate", "--model", str(full_run), "--temperature", "0", "--max-new-tokens", "8", "The river"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and " tokens; " in err


def test_the_progress_bar_shows_loss_tokens_per_second_and_time_left(files, tmp_path, capsys):
    assert finetune(files, tmp_path / "run", "--steps", "3") == 0
    out, err = capsys.readouterr()
    assert re.search(r"3/3 \[\d\d:\d\d<\d\d:\d\d, .*loss \d+\.\d{4}, [\d,]+ tokens/s\]", err), err
    assert out.startswith(f"wrote {tmp_path / 'run'}: steps 1-3, loss ") and out.count("\n") == 1, out


def test_a_lora_run_writes_the_adapters_alone_and_the_merged_model(files, tmp_path):
    out = tmp_path / "lora"
    assert finetune(files, out, "--lora-rank", "2", "--lora-targets", "q_proj,v_proj") == 0
    adapters = out / "adapters.safetensors"
    with safetensors.safe_open(adapters, "np") as f:
        names, metadata = sorted(f.keys()), f.metadata()
    assert metadata["rank"] == "2" and metadata["targets"] == "q_proj,v_proj"
    assert names == [f"layers.0.self_attn.{p}.{part}" for p in ("q_proj", "v_proj") for part in ("lora_a", "lora_b")]
    assert adapters.stat().st_size < 0.02 * (out / "model.safetensors").stat().st_size
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}   # the loader reads no other .safetensors

    merged, _ = llmjax.load(out)           # the merged model is the base with the saved adapters merged into it
    expected, _ = llmjax.load(files["base"])
    merge_lora(load_adapters(expected, adapters))
    ours, theirs = nnx.to_flat_state(nnx.state(merged, nnx.Param)), dict(nnx.to_flat_state(nnx.state(expected)))
    for path, param in ours:
        np.testing.assert_array_equal(param[...], theirs[path][...], err_msg=str(path))
    trained, base = tensors(out), tensors(files["base"])
    moved = sorted(k for k in base if not np.array_equal(trained[k], base[k]))
    assert moved == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]


KILLER = """
import os, signal, sys, time
import llmjax.training as training
from llmjax.cli import main

fit = training.fit


def killed_after_the_first_checkpoint(*args, on_step, out, save_every, **kwargs):
    def step(report):
        on_step(report)
        if report.step > save_every:                     # once the first checkpoint is complete, SIGKILL
            while not training.saved_steps(out):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
    return fit(*args, on_step=step, out=out, save_every=save_every, **kwargs)


training.fit = killed_after_the_first_checkpoint
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_training_resumes_to_the_same_weights(files, full_run, tmp_path, capsys):
    out = tmp_path / "killed"
    root = str(Path(llmjax.__file__).parents[1])          # the llmjax this test imports, first on the path
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    argv = ["finetune", "--model", str(files["base"]), "--data", str(files["data"]), "--out", str(out), *RUN]
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"PYTHONPATH": path})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert saved_steps(out) == [2] and not (out / "config.json").exists()
    capsys.readouterr()
    assert finetune(files, out, "--resume") == 0
    out_text, err = capsys.readouterr()
    assert "steps 3-6" in out_text and re.search(r"6/6 \[", err), (out_text, err)
    assert (out / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()


def test_a_run_stopped_while_writing_the_model_is_finished_by_resume(files, full_run, tmp_path, monkeypatch,
                                                                    capsys):
    """A kill between the renames that move the model into --out, simulated: the folder is no model until
    --resume, which has nothing left to train, writes it again."""
    out, replace, moved = tmp_path / "cut", os.replace, []

    def cut_short(source, target):
        if Path(target).parent == out:
            if moved:
                raise KeyboardInterrupt
            moved.append(target)
        replace(source, target)

    monkeypatch.setattr(llmjax.cli.os, "replace", cut_short)
    assert finetune(files, out) == 130
    monkeypatch.undo()
    assert len(moved) == 1 and not (out / "config.json").exists() and (out / ".model.partial").exists()
    with pytest.raises(ValueError, match="no config.json"):
        llmjax.load(out)
    assert finetune(files, out, "--resume") == 0
    assert "no steps left to train" in capsys.readouterr().out
    assert not (out / ".model.partial").exists()
    assert (out / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()
    llmjax.load(out)


@pytest.mark.parametrize("at, left", [(1, False), (3, True)])
def test_an_interrupted_run_keeps_its_checkpoints_or_nothing(files, tmp_path, monkeypatch, capsys, at, left):
    """Ctrl-C before the first checkpoint takes away all the run made; after it, the run is kept for --resume."""
    import llmjax.training

    fit = llmjax.training.fit

    def interrupted(*args, on_step, **kwargs):
        def step(report):
            on_step(report)
            if report.step == at:
                raise KeyboardInterrupt
        return fit(*args, on_step=step, **kwargs)

    monkeypatch.setattr(llmjax.training, "fit", interrupted)
    assert finetune(files, tmp_path / "new" / "out") == 130
    err = capsys.readouterr().err
    if left:
        assert saved_steps(tmp_path / "new" / "out") == [2]
        assert "saved up to step 2; continue it with the same flags and --resume" in err, err
    else:
        assert list(tmp_path.iterdir()) == [] and "--resume" not in err, err


def cut_save(root: Path) -> Path:
    """All that a run killed during its first save leaves."""
    (root / "cut" / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    return root / "cut"


def occupied(root: Path, what: str) -> Path:
    (root / what).mkdir()
    (root / what / ("checkpoints" if what == "run" else "notes.txt")).mkdir()
    return root / what


# (flags, the message, whether it is refused before the model loads)
BAD = [
    (["--data", "{root}/nope.txt"], "nope.txt does not exist", True),
    (["--data", "{root}/empty.txt"], "holds no text to train on", True),
    (["--data", "{root}/silent.jsonl"], "has nothing to learn", False),
    (["--seq-len", "129"], "rows must hold 2 to 128 tokens", False),
    (["--seq-len", "1"], "--seq-len must be at least 2", True),
    (["--lora-rank", "-1"], "--lora-rank must be at least 0", True),
    (["--lora-rank", "2", "--lora-targets", "q_proj,qkv"], "no linear named qkv in this model; its linears are", False),
    (["--lora-targets", "q_proj"], "give --lora-rank above 0 too", True),
    (["--lora-rank", "2", "--lora-targets", "q_proj,"], "has an empty name", True),
    (["--out", "{run}"], "already holds another run (continue it with --resume)", True),
    (["--out", "{other}"], "already holds other files", True),
    (["--out", "{root}/river.txt"], "already holds a file", True),
    (["--resume"], "nothing to resume", True),
    (["--resume", "--out", "{cut}"], "nothing to resume", True),
    (["--resume", "--out", "{full}", "--lr", "2e-2"], "--lr 0.01, not 0.02", True),
    (["--resume", "--out", "{full}", "--lora-rank", "2"], "--lora-rank 0, not 2", True),
    (["--steps", "0"], "--steps must be at least 1", True),
    (["--batch", "0"], "--batch must be at least 1", True),
    (["--batch", "17"], "--batch 17 is more than the 16 rows of 32 tokens", False),
    (["--resume", "--out", "{full}", "--data", "{root}/river.txt"], "--data", True),
    (["--lr", "0"], "--lr must be a number above 0", True),
    (["--lr", "nan"], "--lr must be a number above 0", True),
    (["--warmup", "6"], "--warmup must be from 0 to --steps - 1", True),
    (["--seed", str(2**40)], "seed must fit in 32 bits", True),
    (["--model", "{root}/nope"], "doesn't exist", False),
]


@pytest.mark.parametrize("flags, expected, early", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_leaves_nothing_behind(files, full_run, tmp_path, monkeypatch, capsys, flags,
                                                         expected, early):
    places = dict(root=tmp_path, run=occupied(tmp_path, "run"), other=occupied(tmp_path, "other"),
                  cut=cut_save(tmp_path), full=full_run)
    (tmp_path / "river.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "silent.jsonl").write_text(CHAT)
    flags = [f.format(**places) for f in flags]
    if early:
        def no_load(*args, **kwargs):
            raise AssertionError("the model was loaded before the flags were checked")
        monkeypatch.setattr(llmjax.cli, "load", no_load)
    before = listing(tmp_path, full_run, files["root"])
    code = main(["finetune", "--model", str(files["base"]), "--data", str(tmp_path / "river.txt"),
                 "--out", str(tmp_path / "new" / "out"), *RUN, *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("llmjax: error:") and err.count("\n") == 1 and expected in err, err
    assert listing(tmp_path, full_run, files["root"]) == before


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert all(f"--{flag}" in text for flag in ("model", "data", "out", "steps", "lr", "warmup", "batch", "seq-len",
                                                "lora-rank", "lora-targets", "resume", "save-every", "seed", "dtype",
                                                "param-dtype"))
