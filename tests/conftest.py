import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# PyTorch's OpenMP threads spin at each barrier while they wait for one another. With more busy threads than cores
# (two pytest workers on two cores: XLA in one, PyTorch in the other) a spinning thread keeps the one it waits for
# off the core: 32 greedy steps of a 135M transformers model took 40-120 s instead of 2. Passive waiting sleeps instead.
# Set here, before any worker, notebook kernel or subprocess starts (they inherit it) and before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def overwrite(path, at: int, data: bytes):
    """Damage a file in place: `data` written over its bytes from offset `at`."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def append(path, data: bytes):
    """Damage a file by adding `data` after its end."""
    with open(path, "ab") as f:
        f.write(data)


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs():
    """XLA's CPU client maps memory for every program it compiles (a top-p sampler: about 230 mappings) and keeps it
    while JAX's jit caches hold the program. The whole suite in one process passed Linux's limit of 65,530 mappings
    (vm.max_map_count) and crashed inside the compiler, so each test module's programs are let go when it ends."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers, with a byte-level tokenizer: (directory, reference model)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llmjax.gpt2 import GPT2Config, config_to_hf

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(GPT2Config.tiny()))).eval()
    reference.save_pretrained(directory)
    byte_level = Tokenizer(models.BPE({chr(c): i for i, c in enumerate(range(33, 127))}, []))
    byte_level.pre_tokenizer, byte_level.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level).save_pretrained(directory)
    return directory, reference


def assert_parity(model, reference, vocab_size: int, length: int, pad: int, seed: int, atol: float = 1e-5):
    """Forward (two rows, the first left-padded by `pad`) and 8 greedy steps (second row) within atol of transformers."""
    import numpy as np

    from llmjax.validation import compare_forward, compare_greedy

    ids = np.random.default_rng(seed).integers(0, vocab_size, (2, length))
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    report = compare_forward(model, reference, ids, mask)
    assert report.logits_diff < atol and max(report.hidden_diffs) < atol, report
    greedy = compare_greedy(model, reference, ids[1:], steps=8)
    assert greedy.tokens_equal and max(greedy.step_logit_diffs) < atol, greedy
