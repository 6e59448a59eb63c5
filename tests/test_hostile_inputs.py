"""Careless and hostile input to the model call, generate_ids, generate and Sampling: each is refused on the host
with a one-line TypeError or ValueError that names the argument, while valid input (and anything traced under jit)
runs as before."""
import numpy as np
import pytest
from flax import nnx

from llmjax.attention import KVCache, cache_layout
from llmjax.generation import Sampling, generate, generate_ids
from llmjax.gpt2 import GPT2, GPT2Config

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model():
    return GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(0))   # vocab_size 257 (EOS 256), context_length 61


class ByteTokenizer:
    """Just what generate reads from a tokenizer: one id per UTF-8 byte, and EOS 256, as GPT2Config.tiny has."""

    eos_token_id, pad_token_id = 256, None

    def __call__(self, text):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def refused(error, match, call):
    with pytest.raises(error, match=match) as caught:
        call()
    assert "\n" not in str(caught.value), f"not one line: {caught.value}"


IDS = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
ZERO_ROW = np.array([[1, 1, 1], [0, 0, 0]], np.int32)

MODEL_CASES = {   # name: (kwargs for model(...), error, message must match)
    "id = vocab_size": (dict(tokens=[[1, 257]]), ValueError, "id 257 .* 257 rows"),
    "negative id": (dict(tokens=[[-1, 3]]), ValueError, "id -1 "),
    "id past int32": (dict(tokens=np.array([[2**40]])), ValueError, f"id {2**40} "),
    "float ids": (dict(tokens=IDS.astype(np.float32)), TypeError, "tokens must be integer"),
    "bool ids": (dict(tokens=IDS > 6), TypeError, "tokens must be integer"),
    "1-D ids": (dict(tokens=IDS[0]), ValueError, r"tokens must be \[batch, length\].*tokens\[None\]"),
    "3-D ids": (dict(tokens=IDS[None]), ValueError, r"tokens must be \[batch, length\]"),
    "mask of another shape": (dict(tokens=IDS, attention_mask=np.ones((2, 4))), ValueError, "attention_mask has shape"),
    "1-D mask": (dict(tokens=IDS, attention_mask=np.ones(3)), ValueError, "attention_mask has shape"),
    "mask with a 2": (dict(tokens=IDS, attention_mask=np.full((2, 3), 2)), ValueError, "attention_mask must hold only"),
    "mask with -1": (dict(tokens=IDS, attention_mask=-ZERO_ROW), ValueError, "attention_mask must hold only"),
    "mask with NaN": (dict(tokens=IDS, attention_mask=np.full((2, 3), NAN)), ValueError, "attention_mask must hold"),
    "mask of strings": (dict(tokens=IDS, attention_mask=np.full((2, 3), "1")), TypeError, "attention_mask must hold"),
    "mask row of padding": (dict(tokens=IDS, attention_mask=ZERO_ROW), ValueError, "attention_mask row 1 is all zeros"),
    "past the position table": (dict(tokens=np.ones((1, 62), np.int32)), ValueError, "id 61 .* 61 rows.*context"),
    "positions past the table": (dict(tokens=IDS, positions=np.full((2, 3), 61)), ValueError, "61 rows"),
    "negative positions": (dict(tokens=IDS, positions=np.full((2, 3), -1)), ValueError, "id -1 "),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_call_refuses(model, case):
    kwargs, error, match = MODEL_CASES[case]
    refused(error, match, lambda: model(**kwargs))


GENERATE_IDS_CASES = {   # name: (kwargs for generate_ids(model, ...), error, message must match)
    "id = vocab_size": (dict(input_ids=[[5, 257]]), ValueError, "input_ids holds token id 257.*257 ids"),
    "negative id": (dict(input_ids=[[-1, 5]]), ValueError, "input_ids holds token id -1"),
    "id past int32": (dict(input_ids=np.array([[2**40]])), ValueError, f"token id {2**40}"),
    "float ids": (dict(input_ids=[[5.0, 6.5]]), TypeError, "input_ids must be integer"),
    "string ids": (dict(input_ids=[["a", "b"]]), TypeError, "input_ids must be integer"),
    "1-D ids": (dict(input_ids=[5, 6]), ValueError, r"input_ids must be \[batch, length\].*input_ids\[None\]"),
    "no ids": (dict(input_ids=None), ValueError, r"input_ids must be \[batch, length\]"),
    "empty rows": (dict(input_ids=np.zeros((1, 0), np.int32)), ValueError, "at least one token"),
    "no rows": (dict(input_ids=np.zeros((0, 3), np.int32)), ValueError, "at least one prompt"),
    "ragged rows": (dict(input_ids=[[5, 6], [7]]), ValueError, "input_ids must be a rectangular"),
    "mask of another shape": (dict(attention_mask=[[1, 1]]), ValueError, "attention_mask has shape"),
    "mask with a 2": (dict(attention_mask=[[1, 2, 1], [1, 1, 1]]), ValueError, "attention_mask must hold only"),
    "mask row of padding": (dict(attention_mask=ZERO_ROW), ValueError, "attention_mask row 1 is all zeros"),
    "past the context": (dict(input_ids=np.ones((1, 50), np.int32), max_new_tokens=12), ValueError,
                         r"prompt \(50 tokens\) plus max_new_tokens \(12\) is 62 .* context_length of 61"),
    "prompt alone past the context": (dict(input_ids=np.ones((1, 70), np.int32)), ValueError, "context_length of 61"),
    "huge max_new_tokens": (dict(max_new_tokens=10**9), ValueError, "context_length"),
    "max_new_tokens 0": (dict(max_new_tokens=0), ValueError, "max_new_tokens must be at least 1"),
    "max_new_tokens 2.5": (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    "max_new_tokens 2.0": (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
    "max_new_tokens True": (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
    "max_new_tokens '4'": (dict(max_new_tokens="4"), TypeError, "max_new_tokens must be an int"),
    "temperature NaN": (dict(temperature=NAN), ValueError, "temperature must be a finite number"),
    "temperature inf": (dict(temperature=INF), ValueError, "temperature must be a finite number"),
    "temperature -1": (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    "temperature '0.7'": (dict(temperature="0.7"), TypeError, "temperature must be a number"),
    "top_k 2.5": (dict(temperature=1.0, top_k=2.5), TypeError, "top_k must be an int"),
    "top_k 0": (dict(temperature=1.0, top_k=0), ValueError, "top_k must be at least 1"),
    "top_p NaN": (dict(temperature=1.0, top_p=NAN), ValueError, "top_p must be a finite number"),
    "min_p inf": (dict(temperature=1.0, min_p=INF), ValueError, "min_p must be a finite number"),
    "seed 2**64": (dict(seed=2**64), ValueError, "seed must fit in 32 bits"),
    "seed 2**32": (dict(seed=2**32), ValueError, "seed must fit in 32 bits"),
    "seed -2**31 - 1": (dict(seed=-2**31 - 1), ValueError, "seed must fit in 32 bits"),
    "seed 1.5": (dict(seed=1.5), TypeError, "seed must be an int"),
    "seed True": (dict(seed=True), TypeError, "seed must be an int"),
    "seed None": (dict(seed=None), TypeError, "seed must be an int"),
    "stop id = vocab_size": (dict(stop_ids=[257]), ValueError, "stop_ids entry 257 is not a token id.*257 ids"),
    "negative stop id": (dict(stop_ids=[3, -1]), ValueError, "stop_ids entry -1"),
    "stop_ids an int": (dict(stop_ids=5), TypeError, r"stop_ids must be a list.*\[id\]"),
    "stop_ids a string": (dict(stop_ids="5"), TypeError, "stop_ids must be a list"),
    "float stop id": (dict(stop_ids=[5.0]), TypeError, "stop_ids entry must be an int"),
    "pad_id = vocab_size": (dict(pad_id=257), ValueError, "pad_id 257 is not a token id"),
    "negative pad_id": (dict(pad_id=-1), ValueError, "pad_id -1 is not a token id"),
    "float pad_id": (dict(pad_id=0.0), TypeError, "pad_id must be an int"),
}


@pytest.mark.parametrize("case", GENERATE_IDS_CASES)
def test_generate_ids_refuses(model, case):
    kwargs, error, match = GENERATE_IDS_CASES[case]
    kwargs = dict(input_ids=IDS, max_new_tokens=4) | kwargs
    refused(error, match, lambda: generate_ids(model, **kwargs))


GENERATE_CASES = {   # name: (prompts, kwargs for generate, error, message must match)
    "no prompts (None)": (None, {}, TypeError, "prompts must be a string or a list of strings"),
    "an int": (3, {}, TypeError, "prompts must be a string or a list"),
    "bytes": (b"hi", {}, TypeError, "prompts must be a string or a list"),
    "an empty list": ([], {}, ValueError, "prompts is an empty list"),
    "a non-string in the list": (["hi", 3], {}, TypeError, r"prompts\[1\] is a int, not a string"),
    "None in the list": (["hi", None], {}, TypeError, r"prompts\[1\] is a NoneType"),
    "an empty prompt": ("", {}, ValueError, "prompt 0 .* empty after tokenization"),
    "an empty prompt in a batch": (["hi", ""], {}, ValueError, "prompt 1 .* empty after tokenization"),
    "stream with a list": (["hi"], dict(stream=True), ValueError, r"stream=True takes one prompt"),
    "stream with None": (None, dict(stream=True), ValueError, r"stream=True takes one prompt"),
    "stream, empty prompt": ("", dict(stream=True), ValueError, "empty after tokenization"),
    "stream, past the context": ("x" * 60, dict(stream=True, max_new_tokens=4), ValueError, "context_length of 61"),
    "stream, seed 2**40": ("hi", dict(stream=True, seed=2**40), ValueError, "seed must fit in 32 bits"),
    "past the context": ("x" * 58, dict(max_new_tokens=4), ValueError, r"\(58 tokens\) plus max_new_tokens \(4\)"),
    "temperature NaN": ("hi", dict(temperature=NAN), ValueError, "temperature must be a finite number"),
    "top_k True": ("hi", dict(temperature=1.0, top_k=True), TypeError, "top_k must be an int"),
    "max_new_tokens 2.5": ("hi", dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    "max_new_tokens -3": ("hi", dict(max_new_tokens=-3), ValueError, "max_new_tokens must be at least 1"),
    "seed 2**64": ("hi", dict(seed=2**64), ValueError, "seed must fit in 32 bits"),
    "stop id past the vocabulary": ("hi", dict(stop_ids=[999]), ValueError, "stop_ids entry 999"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_refuses(model, case):
    """Refused at the call, before a stream is iterated: the error comes from generate itself."""
    prompts, kwargs, error, match = GENERATE_CASES[case]
    refused(error, match, lambda: generate(model, ByteTokenizer(), prompts, **{"max_new_tokens": 3, **kwargs}))


def test_generate_refuses_a_tokenizer_that_does_not_fit(model):
    class BigTokenizer(ByteTokenizer):
        eos_token_id = 50256
    refused(ValueError, "the tokenizer's eos_token_id 50256 is not a token id of this model",
            lambda: generate(model, BigTokenizer(), "hi", max_new_tokens=3))


SAMPLING_CASES = {   # name: (kwargs for Sampling, error, message must match)
    "temperature NaN": (dict(temperature=NAN), ValueError, r"temperature must be a finite number >= 0 \(0 is greedy\)"),
    "temperature inf": (dict(temperature=INF), ValueError, "temperature must be a finite number"),
    "temperature -inf": (dict(temperature=-INF), ValueError, "temperature must be a finite number"),
    "temperature -0.5": (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    "temperature None": (dict(temperature=None), TypeError, "temperature must be a number"),
    "temperature True": (dict(temperature=True), TypeError, "temperature must be a number"),
    "temperature complex": (dict(temperature=1j), TypeError, "temperature must be a number"),
    "top_k 0": (dict(top_k=0), ValueError, "top_k must be at least 1"),
    "top_k -2": (dict(top_k=-2), ValueError, "top_k must be at least 1"),
    "top_k 2.5": (dict(top_k=2.5), TypeError, "top_k must be an int"),
    "top_k 2.0": (dict(top_k=2.0), TypeError, "top_k must be an int"),
    "top_k True": (dict(top_k=True), TypeError, "top_k must be an int"),
    "top_k '3'": (dict(top_k="3"), TypeError, "top_k must be an int"),
    "top_k NaN": (dict(top_k=NAN), TypeError, "top_k must be an int"),
    "top_p 0": (dict(top_p=0.0), ValueError, r"top_p must be a finite number in \(0, 1\]"),
    "top_p 1.2": (dict(top_p=1.2), ValueError, r"top_p must be a finite number in \(0, 1\]"),
    "top_p NaN": (dict(top_p=NAN), ValueError, "top_p must be a finite number"),
    "top_p inf": (dict(top_p=INF), ValueError, "top_p must be a finite number"),
    "top_p '0.9'": (dict(top_p="0.9"), TypeError, "top_p must be a number"),
    "min_p -0.1": (dict(min_p=-0.1), ValueError, r"min_p must be a finite number in \[0, 1\]"),
    "min_p 1.5": (dict(min_p=1.5), ValueError, r"min_p must be a finite number in \[0, 1\]"),
    "min_p NaN": (dict(min_p=NAN), ValueError, "min_p must be a finite number"),
    "min_p -inf": (dict(min_p=-INF), ValueError, "min_p must be a finite number"),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_refuses(case):
    kwargs, error, match = SAMPLING_CASES[case]
    refused(error, match, lambda: Sampling(**kwargs))


def test_valid_variants_give_the_same_tokens(model):
    """What is not refused behaves as before: NumPy scalars, lists, bool or float 0/1 masks, tuples of stop ids,
    negative and 32-bit seeds, and a prompt that exactly fills the context."""
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    base = generate_ids(model, IDS, mask, max_new_tokens=5, stop_ids=[3])
    for variant in [dict(input_ids=IDS.tolist()), dict(input_ids=IDS.astype(np.int64)),
                    dict(attention_mask=mask.astype(bool)), dict(attention_mask=mask.astype(np.float32)),
                    dict(stop_ids=(np.int64(3),)), dict(max_new_tokens=np.int64(5)), dict(pad_id=np.int32(3))]:
        kwargs = dict(input_ids=IDS, attention_mask=mask, max_new_tokens=5, stop_ids=[3]) | variant
        np.testing.assert_array_equal(generate_ids(model, **kwargs), base)
    sampled = dict(temperature=1.0, top_k=np.int64(5), top_p=np.float32(0.9), min_p=0)
    for seed in (-1, 0, 2**31, 2**32 - 1, -2**31, np.uint32(7)):
        assert generate_ids(model, IDS, max_new_tokens=3, seed=seed, **sampled).shape == (2, 6)
    np.testing.assert_array_equal(generate_ids(model, IDS, max_new_tokens=3, seed=-1, temperature=1.0),
                                  generate_ids(model, IDS, max_new_tokens=3, seed=2**32 - 1, temperature=1.0))
    assert generate_ids(model, np.ones((1, 57), np.int32), max_new_tokens=4).shape == (1, 61)   # exactly 61
    assert model(np.ones((1, 61), np.int32)).shape == (1, 61, 257)
    assert len(generate(model, ByteTokenizer(), ("hi", "there"), max_new_tokens=3)) == 2   # any iterable of str


def test_traced_calls_are_not_checked(model):
    """Under jit the values are unknown: the checks skip them (and cost nothing), and compiled paths run as before."""
    run = nnx.jit(lambda m, t, a: m(t, attention_mask=a))
    assert run(model, IDS, ZERO_ROW).shape == (2, 3, 257)
    assert np.isnan(run(model, np.array([[5, 257]], np.int32), None)[0, 1]).all()   # what the host check prevents
    with pytest.raises(TypeError, match="tokens must be integer"):                     # dtypes are known while tracing
        run(model, IDS.astype(np.float32), None)


def test_a_padding_only_chunk_is_fine_with_a_cache(model):
    """With a cache a row has earlier tokens to attend to, so a chunk of padding only (chunked prefill of a left-padded
    batch, a padded decode step) is allowed."""
    cache = KVCache.create(cache_layout(model), batch=2, capacity=8)
    out = model(IDS, cache=cache)
    out = model(IDS[:, :1], attention_mask=ZERO_ROW[:, :1], cache=out.cache)
    assert out.logits.shape == (2, 1, 257)
