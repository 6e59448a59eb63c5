"""Compiled programs kept on disk (chapter 8's `compilation_cache`): damaged entries are removed before JAX reads
them, a folder others may write to is refused, an unusable folder costs a warning and never a generation, and a
second process reads what the first compiled."""
import os
import subprocess
import sys
import zlib

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from llmjax.generation import compilation_cache


@pytest.fixture(autouse=True)
def no_cache_after():
    """Each test leaves this process without a persistent compilation cache, as it found it."""
    yield
    jax_cache.set_cache_dir(None)
    jax_cache.reset_cache()


def test_damaged_entries_are_removed_and_whole_ones_kept(tmp_path):
    whole = zlib.compress(os.urandom(3000) * 20)
    entries = {"whole-cache": whole, "truncated-cache": whole[: len(whole) // 2], "empty-cache": b"",
               "garbage-cache": b"\x78\x9c" + os.urandom(500), "trailing-cache": whole + b"junk",
               "unknown-cache": b"PK\x03\x04 a format llmjax doesn't know", "whole-atime": b"\x00" * 8}
    for name, data in entries.items():
        (tmp_path / name).write_bytes(data)
    assert compilation_cache(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unknown-cache", "whole-atime", "whole-cache"]


def test_damaged_zstd_entries_are_removed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    whole = zstandard.ZstdCompressor().compress(os.urandom(3000) * 20)
    (tmp_path / "whole-cache").write_bytes(whole)
    (tmp_path / "truncated-cache").write_bytes(whole[:-10])
    compilation_cache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole-cache"]


def test_a_folder_others_may_write_is_refused(tmp_path):
    folder = tmp_path / "xla"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.warns(UserWarning, match="someone else owns it or may write to it"):
        assert compilation_cache(folder) is None
    assert jax.config.jax_compilation_cache_dir is None      # nothing was switched on


def test_an_unusable_folder_costs_a_warning(tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    with pytest.warns(UserWarning, match="can't be used"):
        assert compilation_cache(in_the_way / "xla") is None
    with pytest.warns(UserWarning, match="can't be used"):
        assert compilation_cache(in_the_way) is None


SCRIPT = """
import jax, jax.numpy as jnp
from llmjax.generation import compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
compilation_cache()
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(len(hits))
"""


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    env = dict(os.environ, LLMJAX_CACHE=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    written = len(list((tmp_path / "xla").glob("*-cache")))    # the matmul, and the small programs around it
    assert written >= 1 and [int(r.stdout.split()[-1]) for r in runs] == [0, written]


def test_the_cli_warns_in_one_line_and_still_generates(tmp_path, tiny_gpt2_dir):
    directory, _ = tiny_gpt2_dir
    (tmp_path / "xla").mkdir(mode=0o700)
    (tmp_path / "xla").chmod(0o777)
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", "generate", "--model", str(directory),
                          "--max-new-tokens", "4", "hello"], env=dict(os.environ, LLMJAX_CACHE=str(tmp_path)),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("llmjax: warning: compiled programs are not kept"), out.stderr
    assert "Traceback" not in out.stderr and "4 tokens" in out.stderr


def test_main_in_process_leaves_jax_as_it_found_it(tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    """`llmjax generate` through `main` (as a notebook or a test calls it) switches the cache on for its own run only."""
    from llmjax.cli import main

    directory, _ = tiny_gpt2_dir
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path))
    assert main(["generate", "--model", str(directory), "--max-new-tokens", "4", "hello"]) == 0
    assert (tmp_path / "xla").is_dir() and "4 tokens" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir is None
