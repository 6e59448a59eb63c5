"""Chapter 14's memory table: a train step's peak temporary memory (XLA's compiled memory analysis) and its median
step time, for each remat setting at three row lengths, under XLA:CPU's default scheduler and its memory-minimising
one. Writes book/data/remat-cpu.json.    python book/scripts/remat.py [--out book/data/remat-cpu.json]"""
import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
LENGTHS, BATCH = (256, 512, 1024), 2


def measure() -> list[dict]:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llmjax.llama import Llama, LlamaConfig
    from llmjax.training import REMAT_SETTINGS, Batch, TrainConfig, step_costs

    config = dataclasses.replace(LlamaConfig.tiny(), vocab_size=4096, hidden_size=128, intermediate_size=384,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=6,
                                 max_position_embeddings=4096)
    rows = []
    for length in LENGTHS:
        tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (BATCH, length)), jnp.int32)
        batch = Batch(tokens, jnp.ones_like(tokens), tokens)
        for remat in REMAT_SETTINGS:
            model = Llama(config, rngs=nnx.Rngs(0))
            model.remat = remat
            rows.append(dict(length=length, remat=remat, **step_costs(model, batch, TrainConfig())))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "data" / "remat-cpu.json"))
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        sys.exit()
    results = {}
    for scheduler, flags in (("default", ""), ("memory", SCHEDULER_FLAG)):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        child = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True, capture_output=True,
                               text=True)
        results[scheduler] = json.loads(child.stdout)
    import jax
    Path(args.out).write_text(json.dumps(dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                                              jax=jax.__version__, batch=BATCH, layers=6, schedulers=results),
                                         indent=1) + "\n")
    print(f"wrote {args.out}")
