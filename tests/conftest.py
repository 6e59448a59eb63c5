import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers, with a byte-level tokenizer: (directory, reference model)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llmjax.gpt2 import GPT2Config

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2Config.tiny().to_hf())).eval()
    reference.save_pretrained(directory)
    byte_level = Tokenizer(models.BPE({chr(c): i for i, c in enumerate(range(33, 127))}, []))
    byte_level.pre_tokenizer, byte_level.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level).save_pretrained(directory)
    return directory, reference
