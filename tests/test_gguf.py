"""llmjax's GGUF reader beyond the chapter: both real GGUFs against the gguf package's reader and dequantisers (every
metadata value, every tensor, bit for bit), random blocks of every type, files of every value and tensor type, and
hostile files — cut short, garbage, absurd counts — refused at open in one line."""
import struct
import time

import gguf
import numpy as np
import pytest

from llmjax.checkpoints import (DEQUANTIZERS, GGML_BLOCKS, CheckpointError, GGUFCheckpoint, GGUFTensor, dequantize,
                                read_gguf_header)
from llmjax.models import REGISTRY

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def same_bits(ours: np.ndarray, theirs: np.ndarray):
    """Equal float32 arrays, bit for bit (NaN payloads and signed zeros included)."""
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def random_blocks(ggml_type: str, n: int, rng) -> np.ndarray:
    """n random blocks' bytes: every bit pattern, except float16 scales that aren't finite (made finite)."""
    layout = np.dtype(GGML_BLOCKS[ggml_type][1])
    blocks = rng.integers(0, 256, n * layout.itemsize, dtype=np.uint8).view(layout)
    for scale in {"d", "dmin", "m"} & set(layout.names):
        bad = ~np.isfinite(blocks[scale])
        blocks[scale][bad] = rng.standard_normal(bad.sum())
    return blocks.view(np.uint8)


def write(path, metadata=(), tensors=(), alignment=None):
    """A GGUF written by the gguf package: metadata [(key, value, type[, item type])], tensors [(name, array, type)]."""
    writer = gguf.GGUFWriter(path, "test")
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value, kind, *item in metadata:
        writer.add_key_value(key, value, kind, sub_type=item[0] if item else None)
    for name, array, qtype in tensors:
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_like_gguf(checkpoint: GGUFCheckpoint, reader: gguf.GGUFReader):
    """Every metadata value (same Python types too) and every tensor as the gguf package reads them."""
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert checkpoint.metadata_keys() == list(fields)
    for key, field in fields.items():
        assert repr(checkpoint.metadata(key)) == repr(field.contents()), key
    assert list(checkpoint.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        assert checkpoint.tensors[t.name] == GGUFTensor(shape, t.tensor_type.name, t.data_offset, t.n_bytes)
        assert checkpoint.tensor_type(t.name) == t.tensor_type.name and checkpoint.shapes()[t.name] == shape
        same_bits(checkpoint.read(t.name), gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))


# --- the real files ---------------------------------------------------------------------------------------------

REAL = {name: REGISTRY[name].locate() for name in ("gemma-3-270m", "smollm2-135m-instruct")}


@pytest.mark.parametrize("name", REAL)
def test_real_gguf_equals_the_gguf_package(name):
    if REAL[name] is None:
        pytest.skip(f"{name} is not installed (`make install`)")
    start = time.perf_counter()
    checkpoint = GGUFCheckpoint(REAL[name])
    assert time.perf_counter() - start < 3     # gguf's reader takes ~10 s for gemma's 262,144-token vocabulary
    assert_like_gguf(checkpoint, gguf.GGUFReader(REAL[name]))
    types = {checkpoint.tensor_type(n) for n in checkpoint.tensors}
    assert types <= {"F32", *DEQUANTIZERS}, types     # nothing fell back to gguf's dequantisers
    assert checkpoint.architecture in ("gemma3", "llama")


# --- dequantisation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", GGML_BLOCKS)
def test_random_blocks_equal_gguf(ggml_type):
    """Every bit pattern a block can hold (scales finite), bit for bit as gguf's dequantiser, in one call and in
    pieces (a block's weights don't depend on its neighbours)."""
    rng = np.random.default_rng(sum(map(ord, ggml_type)))
    data = random_blocks(ggml_type, 4099, rng)
    qtype = Q[ggml_type]
    ours = dequantize(data, ggml_type)
    same_bits(ours, gguf.quants.dequantize(data, qtype).reshape(-1))
    size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    assert ours.shape == (4099 * size,) and np.dtype(GGML_BLOCKS[ggml_type][1]).itemsize == block_bytes
    same_bits(dequantize(data[: 7 * block_bytes], ggml_type), ours[: 7 * size])


def test_extreme_scales_equal_gguf():
    """Subnormal, largest and signed-zero float16 scales; infinities and NaNs too: the same operations give the
    same bits."""
    rng = np.random.default_rng(1)
    specials = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504.0, -65504.0, np.inf, -np.inf, np.nan], np.float16)
    for ggml_type in GGML_BLOCKS:
        data = random_blocks(ggml_type, 1000, rng)
        blocks = data.view(np.dtype(GGML_BLOCKS[ggml_type][1]))
        for scale in {"d", "dmin", "m"} & set(blocks.dtype.names):
            blocks[scale] = rng.choice(specials, len(blocks))
        with np.errstate(invalid="ignore", over="ignore"):
            same_bits(dequantize(data, ggml_type), gguf.quants.dequantize(data, Q[ggml_type]).reshape(-1))


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantised_weights_equal_gguf(ggml_type):
    """Real quantisations (gguf's quantisers) of weights with outliers, as gguf dequantises them."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((37, 160)) * rng.gamma(1.0, size=(37, 1))).astype(np.float32)
    w[3, 17] = 40.0
    data = gguf.quants.quantize(w, Q[ggml_type]).view(np.uint8)
    ours = dequantize(data.reshape(-1), ggml_type)
    same_bits(ours, gguf.quants.dequantize(data, Q[ggml_type]).reshape(-1).astype(np.float32))


def test_float_types():
    rng = np.random.default_rng(3)
    w = rng.standard_normal(96)
    np.testing.assert_array_equal(dequantize(w.astype("<f8").view(np.uint8), "F64"), w.astype(np.float32))
    np.testing.assert_array_equal(dequantize(w.astype("<f2").view(np.uint8), "F16"), w.astype(np.float16))
    f32 = w.astype("<f4").view(np.uint8)
    assert np.shares_memory(dequantize(f32, "F32"), f32)    # float32 bytes are only viewed


def test_types_without_numpy_code():
    """IQ4_NL falls back to gguf's dequantiser; a type gguf can't dequantise either is a clear error at read."""
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, 18 * 8, dtype=np.uint8)
    raw.view(np.dtype([("d", "<f2"), ("qs", "u1", 16)]))["d"] = 0.5
    same_bits(dequantize(raw, "IQ4_NL"), gguf.quants.dequantize(raw, Q.IQ4_NL).reshape(-1))
    with pytest.raises(CheckpointError, match="can't dequantise ggml type Q8_1"):
        dequantize(np.zeros(36 * 2, np.uint8), "Q8_1")


# --- files of every type ------------------------------------------------------------------------------------------

def test_every_value_type(tmp_path):
    scalars = [(V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -32768), (V.UINT32, 2**32 - 1),
               (V.INT32, -2**31), (V.UINT64, 2**64 - 1), (V.INT64, -2**63), (V.FLOAT32, 1 / 3), (V.FLOAT64, 1 / 3),
               (V.BOOL, False)]
    metadata = [(f"s.{kind.name}", value, kind) for kind, value in scalars]
    metadata += [(f"a.{kind.name}", [value, value, value], V.ARRAY, kind) for kind, value in scalars]
    metadata += [("s.str", "", V.STRING), ("s.str2", "日本語 ✓", V.STRING),
                 ("a.str", ["", "a", "▁the", "\x00", "日本"], V.ARRAY, V.STRING)]
    path = write(tmp_path / "values.gguf", metadata)
    checkpoint = GGUFCheckpoint(path)
    assert_like_gguf(checkpoint, gguf.GGUFReader(path))
    assert checkpoint.metadata("s.BOOL") is False and checkpoint.metadata("a.FLOAT32") == [np.float32(1 / 3)] * 3
    assert checkpoint.metadata("s.UINT64") == 2**64 - 1 and checkpoint.metadata("absent", "x") == "x"
    tokens = checkpoint.metadata("a.str")
    tokens.append("changed")                                  # the caller's copy
    assert checkpoint.metadata("a.str") == ["", "a", "▁the", "\x00", "日本"]


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_every_tensor_type(tmp_path, alignment):
    """Tensors of every type with prime-ish shapes (rows of whole blocks), with the default and other alignments."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 5, 96)).astype(np.float32)
    tensors = [("w.f32", w, None), ("w.scalar", np.float32([2.5]), None), ("w.f16", w.astype(np.float16), None)]
    for t in ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        tensors.append((f"w.{t.lower()}", gguf.quants.quantize(w, Q[t]), Q[t]))
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        tensors.append((f"w.{t.lower()}", random_blocks(t, 7 * 2, rng).reshape(7, -1), Q[t]))
    path = write(tmp_path / "tensors.gguf", tensors=tensors, alignment=alignment)
    checkpoint = GGUFCheckpoint(path)
    assert_like_gguf(checkpoint, gguf.GGUFReader(path))
    assert checkpoint.shapes()["w.q4_k"] == (7, 512) and checkpoint.shapes()["w.q8_0"] == (3, 5, 96)
    assert all(t.start % (alignment or 32) == 0 for t in checkpoint.tensors.values())
    assert "w.f32" in checkpoint.tensors and "w.absent" not in checkpoint.tensors


def test_version_2(tmp_path):
    data = bytearray(write(tmp_path / "v3.gguf", [("k", 7, V.UINT32)], [("w", np.ones((2, 32), np.float32), None)])
                     .read_bytes())
    data[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(data)
    checkpoint = GGUFCheckpoint(tmp_path / "v2.gguf")
    assert checkpoint.metadata("k") == 7 and np.all(checkpoint.read("w") == 1)


# --- hostile files -----------------------------------------------------------------------------------------------

def string(s: str | bytes) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def kv(key, kind: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", kind) + payload


def info(name, dims, ggml_type=0, offset=0) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_file(kvs=(), infos=(), data=b"", version=3, n_kv=None, n_tensors=None, magic=b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


GOOD = gguf_file([kv("general.architecture", 8, string("llama"))], [info("w", [32, 2])], b"\0" * 256)

HOSTILE = {
    "empty": (b"", "not a GGUF file"),
    "wrong magic": (b"GGML" + GOOD[4:], "not a GGUF file"),
    "version 1": (GOOD[:4] + struct.pack("<I", 1) + GOOD[8:], "version 1"),
    "version 4": (GOOD[:4] + struct.pack("<I", 4) + GOOD[8:], "version 4"),
    "big-endian": (GOOD[:4] + struct.pack(">I", 3) + GOOD[8:], "little-endian"),
    "header cut": (GOOD[:12], "cut short"),
    "huge key count": (gguf_file(n_kv=2**63), "cut short"),
    "huge tensor count": (gguf_file(n_tensors=2**64 - 1), "cut short"),
    "huge key length": (gguf_file([struct.pack("<Q", 2**62) + b"k"]), "cut short"),
    "huge string": (gguf_file([kv("k", 8, struct.pack("<Q", 2**63))]), "cut short"),
    "huge array": (gguf_file([kv("k", 9, struct.pack("<IQ", 6, 2**61))]), "cut short"),
    "huge string array": (gguf_file([kv("k", 9, struct.pack("<IQ", 8, 2**60))]), "cut short"),
    "string past the end": (gguf_file([kv("k", 9, struct.pack("<IQ", 8, 2) + string("a") + struct.pack("<Q", 99))]),
                            "cut short"),
    "unknown value type": (gguf_file([kv("k", 13, b"\0" * 8)]), "value type 13"),
    "array of arrays": (gguf_file([kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))]),
                        "array of 9"),
    "array of unknown": (gguf_file([kv("k", 9, struct.pack("<IQ", 99, 1) + b"\0" * 8)]), "array of 99"),
    "duplicate key": (gguf_file([kv("k", 4, b"\0" * 4), kv("k", 4, b"\0" * 4)]), "key k twice"),
    "non-UTF-8 key": (gguf_file([kv(b"\xff\xfe", 4, b"\0" * 4)]), "UTF-8"),
    "non-UTF-8 token": (gguf_file([kv("t", 9, struct.pack("<IQ", 8, 1) + string(b"\xc3"))]), "UTF-8"),
    "alignment 0": (gguf_file([kv("general.alignment", 4, struct.pack("<I", 0))]), "power of two"),
    "alignment 48": (gguf_file([kv("general.alignment", 4, struct.pack("<I", 48))]), "power of two"),
    "alignment a string": (gguf_file([kv("general.alignment", 8, string("32"))]), "power of two"),
    "alignment a bool": (gguf_file([kv("general.alignment", 7, b"\1")]), "power of two"),
    "duplicate tensor": (gguf_file(infos=[info("w", [32]), info("w", [32], offset=128)], data=b"\0" * 256),
                         "tensor w twice"),
    "five dimensions": (gguf_file(infos=[info("w", [1, 1, 1, 1, 1])], data=b"\0" * 64), "5 > 4 dimensions"),
    "huge dimension count": (gguf_file(infos=[string("w") + struct.pack("<I", 2**31)]), "dimensions"),
    "unknown tensor type": (gguf_file(infos=[info("w", [32], ggml_type=4)], data=b"\0" * 128), "ggml type 4"),
    "tensor past the end": (gguf_file(infos=[info("w", [32, 3])], data=b"\0" * 256), "doesn't lie whole"),
    "tensor offset past the end": (gguf_file(infos=[info("w", [1], offset=2**63)]), "doesn't lie whole"),
    "huge dims": (gguf_file(infos=[info("w", [2**40, 2**40])], data=b"\0" * 64), "doesn't lie whole"),
    "misaligned tensor": (gguf_file(infos=[info("w", [8], offset=4)], data=b"\0" * 64), "aligned"),
    "partial block": (gguf_file(infos=[info("w", [16, 2], ggml_type=8)], data=b"\0" * 64), "whole"),
}


def test_the_hostile_builder_makes_a_good_file(tmp_path):
    (tmp_path / "good.gguf").write_bytes(GOOD)
    checkpoint = GGUFCheckpoint(tmp_path / "good.gguf")
    assert checkpoint.architecture == "llama" and checkpoint.shapes() == {"w": (2, 32)}
    assert np.all(checkpoint.read("w") == 0)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_is_refused_in_one_line(case, tmp_path):
    data, expected = HOSTILE[case]
    (tmp_path / "bad.gguf").write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        GGUFCheckpoint(tmp_path / "bad.gguf")
    assert time.perf_counter() - start < 1
    message = str(error.value)
    assert expected in message and "\n" not in message and "bad.gguf" in message, message


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="can't be read"):
        GGUFCheckpoint(tmp_path / "absent.gguf")


def test_every_truncation_is_refused(tmp_path):
    """A real (small) GGUF cut after every byte of its header and at points in its data: always a CheckpointError."""
    rng = np.random.default_rng(6)
    metadata = [("a.str", ["x", "yz", ""], V.ARRAY, V.STRING), ("a.f32", [1.0, 2.0], V.ARRAY, V.FLOAT32),
                ("s", "hello", V.STRING), ("n", 3, V.UINT32)]
    tensors = [("w.q8_0", gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0),
               ("w.f32", rng.standard_normal(8).astype(np.float32), None)]
    data = write(tmp_path / "whole.gguf", metadata, tensors).read_bytes()
    tensors = GGUFCheckpoint(tmp_path / "whole.gguf").tensors.values()
    header_end, data_end = min(t.start for t in tensors), max(t.start + t.size for t in tensors)
    for cut in [*range(header_end + 1), *range(header_end + 1, data_end, 7)]:
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            GGUFCheckpoint(tmp_path / "cut.gguf")


def test_random_damage_is_refused_or_read(tmp_path):
    """Random bytes overwritten in the header: the file is refused with a CheckpointError, or it still reads — never
    another exception, never a long wait."""
    rng = np.random.default_rng(7)
    tensors = [("w", gguf.quants.quantize(rng.standard_normal((4, 256)).astype(np.float32), Q.Q4_0), Q.Q4_0)]
    whole = write(tmp_path / "whole.gguf", [("a.str", ["ab", "c"], V.ARRAY, V.STRING), ("n", 1, V.INT64)],
                  tensors).read_bytes()
    header_end = GGUFCheckpoint(tmp_path / "whole.gguf").tensors["w"].start
    start, outcomes = time.perf_counter(), {"refused": 0, "read": 0}
    for _ in range(500):
        data = bytearray(whole)
        for at in rng.integers(0, header_end, rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        (tmp_path / "damaged.gguf").write_bytes(data)
        try:
            checkpoint = GGUFCheckpoint(tmp_path / "damaged.gguf")
            for name in checkpoint.tensors:
                checkpoint.read(name)
            outcomes["read"] += 1
        except CheckpointError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and time.perf_counter() - start < 60, outcomes


def test_empty_arrays(tmp_path):
    """Arrays of no items, of every item type (gguf's writer can't write them; llama.cpp's can)."""
    data = gguf_file([kv(f"e{kind}", 9, struct.pack("<IQ", kind, 0)) for kind in [*range(9), 10, 11, 12]])
    (tmp_path / "empty.gguf").write_bytes(data)
    checkpoint = GGUFCheckpoint(tmp_path / "empty.gguf")
    assert len(checkpoint.metadata_keys()) == 12
    assert all(checkpoint.metadata(key) == [] for key in checkpoint.metadata_keys())
    assert_like_gguf(checkpoint, gguf.GGUFReader(tmp_path / "empty.gguf"))


def test_read_gguf_header_of_bytes():
    """The header reader takes any buffer: bytes, a memory map."""
    metadata, tensors = read_gguf_header(GOOD, "good.gguf")
    assert metadata == {"general.architecture": "llama"}
    assert tensors == {"w": GGUFTensor((2, 32), "F32", 128, 256)}      # 110 bytes of header, padded to 32
