"""Training runs that survive a kill (chapter 14): Orbax checkpoints of what is trained, the optimizer, the step and
the data position; a run killed in the middle of a save resumes from the last complete checkpoint and repeats the
uninterrupted run's losses bit for bit."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import llmjax
from llmjax.llama import Llama, LlamaConfig
from llmjax.training import (DataState, Document, TrainConfig, add_lora, fit, next_batch, pack, saved_steps,
                             train_state, train_step)

CONFIG = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=12, final_learning_rate=1e-3)
BATCH = 4
ADAPTERS = dict(rank=2, targets=("q_proj", "v_proj"))


def build(seed: int = 0) -> Llama:
    """One layer of the tiny LLaMA: a step compiles in about a second."""
    return Llama(dataclasses.replace(LlamaConfig.tiny(), num_hidden_layers=1), rngs=nnx.Rngs(seed))


def practice_rows():
    documents = [Document(np.random.default_rng(n).integers(3, 211, 5 + n % 17).astype(np.int32),
                          np.ones(5 + n % 17, bool)) for n in range(40)]
    return pack(documents, 24)


def reference_run(model, steps: int, wrt=nnx.Param):
    """The chapter's plain loop, no checkpoints: next_batch, train_step -> (losses, the trained model)."""
    rows, (graphdef, state) = practice_rows(), train_state(model, CONFIG, wrt=wrt)
    data, losses = DataState(), []
    for _ in range(steps):
        batch, data = next_batch(rows, data, BATCH)
        state, metrics = train_step(graphdef, state, batch, CONFIG)
        losses.append(float(metrics["loss"]))
    return losses, nnx.merge(graphdef, state)[0]


def losses_of(reports) -> list[float]:
    return [r.loss for r in reports]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Stop(Exception):
    pass


def stop_at(step: int):
    def on_step(report):
        if report.step == step:
            raise Stop
    return on_step


# --- a real kill, in another process -----------------------------------------------------------------------

def main(out: str, resume: bool, kill_at: int):
    """A training process: each step's (step, loss) as a JSON line on stdout. With kill_at, it SIGKILLs itself when
    Orbax has written every file of step kill_at's checkpoint, just before the rename that makes it complete."""
    if kill_at:
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def killed_in_finalize(self):
            if self._final_path.name == str(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = killed_in_finalize
    fit(build(seed=5 if resume else 0), practice_rows(), CONFIG, batch_size=BATCH, out=out, save_every=3,
        resume=resume, on_step=lambda r: print(json.dumps([r.step, r.loss]), flush=True))


def training_process(out: Path, *, resume: bool = False, kill_at: int = 0) -> subprocess.Popen:
    root = str(Path(llmjax.__file__).parents[1])      # the llmjax this test imports, first on the path
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, __file__, str(out), str(int(resume)), str(kill_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": path})


def finished(process: subprocess.Popen) -> tuple[int, dict[int, float], str]:
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, dict(json.loads(line) for line in stdout.splitlines()), stderr


def test_a_run_killed_in_the_middle_of_a_save_resumes_bit_for_bit(tmp_path):
    killed = training_process(tmp_path, kill_at=9)                # checkpoints at 3 and 6 complete, 9 cut short
    reference, _ = reference_run(build(), CONFIG.total_steps)      # meanwhile, the run that is never stopped
    code, before, stderr = finished(killed)
    assert code == -signal.SIGKILL, stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    assert saved_steps(tmp_path) == [3, 6]
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("9.orbax-checkpoint-tmp")], \
        listing(checkpoints)                                        # the save of step 9 was begun, not finished
    assert min(before) == 1 and max(before) >= 9
    assert [before[s] for s in sorted(before)] == reference[:max(before)]

    code, after, stderr = finished(training_process(tmp_path, resume=True))
    assert code == 0, stderr[-2000:]
    assert sorted(after) == list(range(7, 13))                     # from step 6, the last complete checkpoint
    assert [after[s] for s in sorted(after)] == reference[6:]       # bit for bit
    assert sorted(p.name for p in checkpoints.iterdir()) == ["12", "6", "9"]   # keep=3; the cut save is gone


# --- in this process -----------------------------------------------------------------------------------------

def test_fit_is_the_plain_loop_and_keeps_the_last_n(tmp_path):
    reference, trained = reference_run(build(), 8)
    model, seen = build(), []
    reports = fit(model, practice_rows(), CONFIG, batch_size=BATCH, steps=8, out=tmp_path, save_every=2, keep=2,
                  on_step=seen.append)
    assert losses_of(reports) == reference and reports == seen and [r.step for r in reports] == list(range(1, 9))
    assert all(r.tokens > 0 and r.seconds > 0 for r in reports)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6", "8"]
    for want, got in zip(jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(got, want)                    # the model is trained in place


def saved_arrays(step_folder: Path, item: str) -> dict[str, tuple]:
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(step_folder / item)
    finally:
        handler.close()
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_checkpoints_hold_the_adapters_alone_and_resume_bit_for_bit(tmp_path):
    reference, _ = reference_run(add_lora(build(), **ADAPTERS), 8, wrt=nnx.LoRAParam)
    with pytest.raises(Stop):
        fit(add_lora(build(), **ADAPTERS), practice_rows(), CONFIG, batch_size=BATCH, steps=8, out=tmp_path,
            save_every=2, wrt=nnx.LoRAParam, on_step=stop_at(5))
    assert saved_steps(tmp_path) == [2, 4]

    step = tmp_path / "checkpoints" / "4"
    trained, optimizer = saved_arrays(step, "trained"), saved_arrays(step, "optimizer")
    assert trained and all("['lora_a']" in k or "['lora_b']" in k for k in trained), sorted(trained)
    model_bytes = 4 * sum(p.size for p in jax.tree.leaves(nnx.state(build(), nnx.Param)))
    stored = 4 * sum(int(np.prod(s)) for s in (*trained.values(), *optimizer.values()))
    assert stored < 0.05 * model_bytes, (stored, model_bytes)
    assert sum(f.stat().st_size for f in step.rglob("*") if f.is_file()) < model_bytes

    reports = fit(add_lora(build(), **ADAPTERS), practice_rows(), CONFIG, batch_size=BATCH, steps=8, out=tmp_path,
                  save_every=2, wrt=nnx.LoRAParam, resume=True)
    assert [r.step for r in reports] == [5, 6, 7, 8]
    assert losses_of(reports) == reference[4:]


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    rows = practice_rows()
    run = lambda out, **changes: fit(**dict(model=build(), rows=rows, config=CONFIG, batch_size=BATCH, steps=2,
                                            out=out, save_every=2) | changes)
    refused = [(tmp_path / "none", dict(resume=True), "nothing to resume: .* holds no complete checkpoint"),
               (tmp_path / "none", dict(keep=0), "keep must be a whole number above 0, got 0"),
               (tmp_path / "none", dict(batch_size=len(rows) + 1), "batch_size must be a whole number from 1"),
               (None, dict(resume=True), "resume=True needs the out folder")]
    for out, changes, message in refused:
        with pytest.raises(ValueError, match=message) as caught:
            run(out, **changes)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "none").exists()

    cut = tmp_path / "cut" / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"   # all a killed first save leaves
    cut.mkdir(parents=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        run(tmp_path / "cut", resume=True)
    assert cut.is_dir()

    run(tmp_path / "done")
    before = listing(tmp_path)
    other_rows = dataclasses.replace(rows, tokens=np.roll(rows.tokens, 1, axis=1))
    other_base = add_lora(build(seed=3), **ADAPTERS)
    refused = [(dict(), "holds another run's checkpoints \\(up to step 2\\): continue it with resume=True"),
               (dict(resume=True, batch_size=2), "holds a run with batch_size=4, not 2: resume with that run's"),
               (dict(resume=True, config=dataclasses.replace(CONFIG, learning_rate=2e-2)),
                "learning_rate=0.01, not 0.02"),
               (dict(resume=True, seed=1), "seed=0, not 1"),
               (dict(resume=True, rows=other_rows), "other training rows"),
               (dict(resume=True, model=other_base, wrt=nnx.LoRAParam), "trained='Param', not 'LoRAParam'")]
    for changes, message in refused:
        with pytest.raises(ValueError, match=message) as caught:
            run(tmp_path / "done", **changes)
        assert "\n" not in str(caught.value)
        assert listing(tmp_path) == before


def test_lora_resume_refuses_another_base(tmp_path):
    run = lambda seed, **kw: fit(add_lora(build(seed), **ADAPTERS), practice_rows(), CONFIG, batch_size=BATCH,
                                 steps=2, out=tmp_path, save_every=2, wrt=nnx.LoRAParam, **kw)
    run(0)
    with pytest.raises(ValueError, match=r"other frozen weights \(another base model\)"):
        run(3, resume=True)
    assert run(0, resume=True) == []                                 # the same base: nothing left to do


if __name__ == "__main__":
    main(sys.argv[1], bool(int(sys.argv[2])), int(sys.argv[3]))
