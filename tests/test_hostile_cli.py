"""Careless and hostile input at the front doors — `llmjax.load` and the command line: every case ends in one line
that names the problem (exit status 2 from the CLI), never a traceback, never code from a model folder."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import llmjax
from llmjax.cli import main
from llmjax.models import REGISTRY, resolve


def cli(*argv, stdin: bytes | None = None, cwd=None):
    """Run the installed command line in its own process: (exit status, stdout, stderr)."""
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", *argv], input=stdin, capture_output=True, timeout=600,
                         cwd=cwd)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def one_line_error(code: int, err: str, expected: str):
    assert code == 2, (code, err)
    assert err.startswith("llmjax: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err


@pytest.fixture
def broken_dirs(tmp_path, tiny_gpt2_dir):
    """Copies of a tiny GPT-2 folder, each broken one way."""
    directory, _ = tiny_gpt2_dir
    made = {}

    def copy(name, config=None):
        target = tmp_path / name
        shutil.copytree(directory, target)
        if config is not None:
            (target / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        made[name] = target
        return target

    settings = json.loads((directory / "config.json").read_text())
    copy("list-config", [1, 2, 3])
    copy("string-config", '"gpt2"')
    copy("not-json", "{model_type: gpt2")
    copy("no-model-type", {k: v for k, v in settings.items() if k != "model_type"})
    copy("number-model-type", settings | {"model_type": 7})
    renamed = copy("renamed-weights")            # weights under another name, and a pickle beside them
    (renamed / "model.safetensors").rename(renamed / "weights.safetensors")
    (renamed / "pytorch_model.bin").write_bytes(b"not a pickle llmjax or the reference may read")
    return made


@pytest.mark.parametrize("case, expected", [
    ("list-config", "JSON list"), ("string-config", "JSON str"), ("not-json", "not valid JSON"),
    ("no-model-type", "unsupported architecture None"), ("number-model-type", "unsupported architecture 7"),
])
def test_load_refuses_broken_folders_in_one_line(broken_dirs, case, expected):
    with pytest.raises(ValueError, match=expected) as info:
        llmjax.load(broken_dirs[case])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source, error, expected", [(None, TypeError, "source must be"), ("", ValueError, "empty"),
                                                     ("   ", ValueError, "empty"), (3, TypeError, "got int")])
def test_load_names_a_bad_source(source, error, expected):
    with pytest.raises(error, match=expected):
        llmjax.load(source)


def test_a_registered_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    name = next(n for n, info in REGISTRY.items() if info.files is not None and info.locate() is not None)
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve(name) == REGISTRY[name].locate()           # the registry, not ./name
    assert resolve(f"./{name}").resolve() == (tmp_path / name).resolve()     # ./name is the folder


def test_a_folder_is_never_executed(tmp_path, tiny_gpt2_dir):
    """A tokenizer_config.json whose auto_map names the folder's own Python code: loaded without running it, and
    without asking anything on standard input (a piped 'y' would otherwise say yes)."""
    directory, _ = tiny_gpt2_dir
    planted = tmp_path / "planted"
    shutil.copytree(directory, planted)
    settings = json.loads((planted / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (planted / "tokenizer_config.json").write_text(json.dumps(settings))
    mark = tmp_path / "the-code-ran"
    (planted / "evil.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    code, out, err = cli("validate", "--model", str(planted), "--steps", "2", stdin=b"y\ny\ny\n")
    assert not mark.exists(), "the folder's code ran"
    assert code == 0 and "PASS" in out and "[y/N]" not in out + err, (code, out, err)


@pytest.mark.parametrize("argv, stdin, expected", [
    (["generate"], b"\xff\xfe not UTF-8", "standard input is not UTF-8"),
    (["generate", "--model", ""], None, "empty"),
    (["generate", "--model", "./nowhere", "hello"], None, "doesn't exist"),
    (["validate", "--model", "./nowhere"], None, "doesn't exist"),
])
def test_cli_errors_are_one_line(argv, stdin, expected):
    code, _, err = cli(*argv, stdin=stdin)
    one_line_error(code, err, expected)


def test_cli_refuses_a_prompt_that_is_not_utf8(capsys):
    assert main(["generate", "bad \udcff bytes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err


@pytest.mark.parametrize("case, expected", [("list-config", "JSON list"), ("no-model-type", "unsupported architecture")])
def test_cli_refuses_broken_folders(broken_dirs, case, expected, capsys):
    assert main(["generate", "--model", str(broken_dirs[case]), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_validate_reads_safetensors_only(broken_dirs, capsys):
    """Weights under another name beside a pytorch_model.bin: transformers is told to read safetensors only, so it
    can't silently fall back to the pickle and compare other weights — the validation stops with one line."""
    assert main(["validate", "--model", str(broken_dirs["renamed-weights"]), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "safetensors" in err.lower(), err


def test_validate_says_which_files_it_compared(tiny_gpt2_dir, capsys):
    directory, _ = tiny_gpt2_dir
    assert main(["validate", "--model", str(directory), "--steps", "2"]) == 0
    assert "model.safetensors" in capsys.readouterr().out


def test_an_internal_error_is_one_line_too(monkeypatch, capsys):
    import llmjax.cli

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(llmjax.cli, "models_table", broken)
    monkeypatch.delenv("LLMJAX_DEBUG", raising=False)
    assert main(["models"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "LLMJAX_DEBUG" in err
    monkeypatch.setenv("LLMJAX_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["models"])


@pytest.mark.parametrize("argv, expected", [(["--seed", str(10**20)], "seed must fit in 32 bits"),
                                            (["--seed", "-99999999999"], "seed must fit in 32 bits"),
                                            (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                                            (["--temperature", "nan"], "temperature"),
                                            (["--top-p", "inf"], "top_p")])
def test_cli_refuses_bad_numbers_before_loading(argv, expected, capsys, monkeypatch):
    import llmjax.cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llmjax.cli, "load", no_load)
    assert main(["generate", "hello", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_models_lists_without_joining(tmp_path, monkeypatch, capsys):
    """`llmjax models` says a model made of parts is installed without joining them (253 MB) into the cache."""
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    parts = [name for name, info in REGISTRY.items() if info.files is not None and info.files.parts]
    for name in parts:
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert row.rstrip().endswith("yes" if REGISTRY[name].files.installed() else "no")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
