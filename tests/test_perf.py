"""Chapter 17's harness on tiny models (`Suite.quick()`, through `llmjax bench --suite perf --quick`): the
structure of every measurement and the invariants that hold whatever the machine — results equal across the
compared versions, ratios positive, remat's compiled peak no higher than without it — never a speed."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.cli import main
from llmjax.gemma import Gemma, GemmaConfig, interleaved
from llmjax.gpt2 import GPT2Config
from llmjax.perf import PRODUCTS, SECTIONS, Suite, run_suite, scan_layers, stack_layers, unrolled_layers


def _refuse_nan(constant):
    raise ValueError(f"{constant} in the JSON: not portable")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite, run once through the command line: (exit status, the JSON it wrote). Its tiny programs
    each run a few times, so they are compiled fast: by the child processes, and by this one if JAX has not
    started yet."""
    path = tmp_path_factory.mktemp("perf") / "perf.json"
    flags = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{flags or ''} --xla_backend_optimization_level=0".strip()
    try:
        code = main(["bench", "--suite", "perf", "--quick", "--output", str(path)])
    finally:
        if flags is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = flags
    return code, json.loads(path.read_text(), parse_constant=_refuse_nan)


def test_cli_writes_every_section(quick):
    code, results = quick
    assert code == 0
    assert set(SECTIONS) <= set(results) and set(results["seconds"]) == set(SECTIONS)
    assert results["suite"] == json.loads(json.dumps(dataclasses.asdict(Suite.quick())))
    assert {"platform", "cpus", "jax", "device"} <= set(results["machine"])
    assert len(results["load_before"]) == len(results["load_after"]) == 3


def test_jit(quick):
    jit = quick[1]["jit"]
    forward, step = jit["costs"]["forward"], jit["costs"]["train_step"]
    assert forward["speedup"] == pytest.approx(forward["eager_s"] / forward["jit_s"])
    assert min(forward["eager_s"], forward["jit_s"], forward["compile_s"], step["jit_s"]) > 0
    assert step["eager_s"] is None and step["speedup"] is None      # the quick suite leaves it out
    assert step["compile_in_steps"] == pytest.approx(step["compile_s"] / step["jit_s"])
    traced = [row["traced"] for row in jit["retraces"]]
    assert traced == [True, False, True, True, True, True, False]
    assert jit["retraces"][-1]["traces"] == sum(traced)


def test_vmap_equals_the_loop(quick):
    vmap = quick[1]["vmap"]
    assert vmap["shape"]["batch"] == Suite.quick().vmap_batch
    assert vmap["loss_max_diff"] < 1e-5 and vmap["grad_max_diff"] < 1e-5
    assert vmap["speedup"] == pytest.approx(vmap["loop_s"] / vmap["vmap_s"]) and vmap["speedup"] > 0


def test_scan_equals_the_unrolled_stack(quick):
    rows = quick[1]["scan"]
    assert [row["depth"] for row in rows] == list(Suite.quick().scan_depths)
    for row in rows:
        assert row["loss_diff"] < 1e-5
        assert min(row["compile_ratio"], row["step_ratio"], row["scan_compile_s"]) > 0


def test_remat_lowers_the_compiled_peak(quick):
    rows = {(row["length"], row["remat"]): row for row in quick[1]["remat"]}
    assert set(rows) == {(length, setting) for length in Suite.quick().remat_lengths
                         for setting in ("none", "block", "dots")}
    for length in Suite.quick().remat_lengths:
        assert rows[length, "block"]["temp_bytes"] <= rows[length, "none"]["temp_bytes"]
        assert all(rows[length, s]["seconds"] > 0 for s in ("none", "block", "dots"))


def test_precision(quick):
    rows = {row["dtype"]: row for row in quick[1]["precision"]}
    assert set(rows) == {"float32", *Suite.quick().precision_dtypes}
    for dtype, row in rows.items():
        assert row["finite"] and row["perplexity"] > 1
        assert len(row["activations"]["peaks"]) == GPT2Config.tiny().n_layer + 1   # + the embedding
        assert row["activations"]["first_over"] is None
        if dtype != "float32":
            assert 0 <= row["kl"] <= row["kl_max"] < 1 and 0 <= row["top1"] <= 1
            assert row["forward_ratio"] > 0 and row["decode_ratio"] > 0
            assert row["train_ratio"] is None                      # no train step in the quick suite


def test_quantize_section(quick):
    """The int8 section's rows: llmjax in float32 and the quick suite's formats, transformers in float32 and
    int8; a rate per batch size; each compared with its own library's float32; products timed per format."""
    suite, section = Suite.quick(), quick[1]["quantize"]
    assert [p["rows"] for p in section["products"]] == list(suite.quantize_rows)
    assert all(set(p["seconds"]) == set(PRODUCTS) and min(p["seconds"].values()) > 0
               for p in section["products"])
    found = [(r["library"], r["weights"]) for r in section["costs"]]
    assert found == [("llmjax", w) for w in ("float32", *suite.quantize_formats)] + [
        ("transformers", "float32"), ("transformers", "int8")]
    for row in section["costs"]:
        assert row["batches"] == list(suite.quantize_batches)
        assert len(row["decode_tok_s"]) == len(row["batches"]) and min(row["decode_tok_s"]) > 0
        assert 0 <= row["kl"] <= row["kl_max"] and 0 <= row["top1"] <= 1
        if row["weights"] == "float32":
            assert row["kl"] == 0 and row["top1"] == 1
    llmjax_rows = {r["weights"]: r for r in section["costs"] if r["library"] == "llmjax"}
    assert llmjax_rows["int8"]["weight_bytes"] < 0.3 * llmjax_rows["float32"]["weight_bytes"]


def test_parallel_gives_one_loss(quick):
    rows = quick[1]["parallel"]
    assert [row["devices"] for row in rows] == list(Suite.quick().device_counts)
    assert rows[0]["jit_ratio"] == rows[0]["pmap_ratio"] == 1.0
    for row in rows:
        np.testing.assert_allclose([row["jit_loss"], row["pmap_loss"]], rows[0]["jit_loss"], rtol=1e-5)


def test_unknown_sections_are_refused():
    with pytest.raises(ValueError, match="unknown sections"):
        run_suite(Suite.quick(), sections=("jit", "nope"))


def test_gemma3_scans_in_groups_of_six():
    config = dataclasses.replace(GemmaConfig.tiny(3), num_hidden_layers=12, layer_types=interleaved(12, 6))
    layers = Gemma(config, rngs=nnx.Rngs(0)).layers
    for group in (1, 2, 5):     # local and global blocks differ; 12 blocks aren't groups of 5
        with pytest.raises(ValueError):
            stack_layers(layers, group=group)
    graphdefs, states = stack_layers(layers, group=6)
    assert len(graphdefs) == 6 and jax.tree.leaves(states[0])[0].shape[0] == 2
    x = jax.random.normal(jax.random.key(0), (1, 12, config.hidden_size))
    positions, valid = jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32)
    scanned = jax.jit(scan_layers, static_argnums=0)(graphdefs, states, x, positions, valid)
    # values of ~10 through 12 blocks, compiled against op by op: float32 rounding, ~1e-5
    np.testing.assert_allclose(scanned, unrolled_layers(layers, x, positions, valid), rtol=1e-4, atol=1e-4)
