"""--parallel fsdp: two CPU processes (gloo) under torchrun, each holding a shard of the model (FSDP2).

One torchrun launch runs, in one process group: a pretraining run on the Triton kernels (the custom ops,
in the interpreter); the same run crashed after its checkpoint of step 3 and resumed by the two processes;
a run of one process (made by this test before the launch) resumed by two; a classifier finetuning run
(the last block trains, the rest is frozen) and an instruction run with LoRA; and a sharded step of the
model compiled (aot_eager: the graphs inductor would get, run eagerly), and one recomputing its blocks in
the backward (--recompute blocks), against the eager one, with a frozen block. Run as a script, this
file is that worker; the first process writes each run's losses and evaluations, and each run directory
holds the model whole (gathered on the first process) and the optimizer's shards.

Checked against one process that accumulates the same micro-batches (as tests/gpt/test_ddp.py does for
DDP): the losses, the evaluations and the weights agree within float rounding; the run resumed by the
same two processes is bit-identical to the straight one; resumed by one process (and a one-process run
by two) it continues within float rounding. Dropout is 0: each process draws its own masks.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt import GPT, load_checkpoint
from gpt.classify import finetune_classifier
from gpt.cli import main
from gpt.finetune import FinetuneConfig, load_finetuned
from gpt.instruct import finetune_instruct
from gpt.pretrain import TrainConfig, train
from gpt.trainer_state import OPTIMIZER_DIR, STATE_FILE

REPO = Path(__file__).resolve().parents[2]
CTX = 16


class Crash(Exception):
    """Stands for a kill -9: the run ends with no save."""


def crash_at(step: int):
    def on_step(s, loss):
        if s == step:
            raise Crash
    return on_step


def pretraining(out: Path, processes: int, **kw) -> TrainConfig:
    """6 steps of 4 windows (2 processes x 2, or one process accumulating 2 x 2), a checkpoint at step 3."""
    return TrainConfig(**{**dict(preset="tiny", context_length=CTX, batch_size=2, tokens_per_step=4 * CTX, max_steps=6,
                                 eval_every=3, eval_batches=4 // processes, save_every=3, sample_tokens=2, dropout=0.0,
                                 kernels="triton", device="cpu", out=str(out),
                                 parallel="fsdp" if processes > 1 else None), **kw})


def finetuning(name: str, out: Path, processes: int) -> tuple:
    """(job, config): 5 steps of 4 examples; the classifier trains its last block, the instruction model LoRA."""
    common = dict(preset="tiny", batch_size=2, examples_per_step=4, eval_batches=2 // processes, lr=1e-3, max_steps=5,
                  eval_every=2, device="cpu", dropout=0.0, out=str(out), parallel="fsdp" if processes > 1 else None)
    if name == "classifier":
        return finetune_classifier, FinetuneConfig(**common, limit=30)
    return finetune_instruct, FinetuneConfig(**common, limit=20, max_new_tokens=2, lora_rank=2, mask_prompt=True)


def summary(result) -> dict:
    return {"losses": result.losses, "metrics": result.metrics, "evals": drop_clock(result.evals)}


def drop_clock(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "speed")} for r in records]


class BackwardOps(TorchDispatchMode):
    """Counts the ops dispatched while active, by name (``gpt_triton.attention``...)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def sharded_steps(rank: int) -> None:
    """A sharded step of the tiny model on the Triton kernels equals the eager one keeping every activation
    when compiled, and when it recomputes each block in the backward (FSDP gathers a block's weights again
    for the replay: its attention runs in the backward, once a block); a frozen block gets no gradient (its
    weights stay as they were)."""
    from gpt.model import set_recompute
    from gpt.parallel import Parallel
    from gpt.runtime import Processes

    runs = {}
    for compiled, recompute in ((False, "none"), (True, "none"), (False, "blocks")):
        torch.manual_seed(0)
        model = GPT.from_preset("tiny", dropout=0.0, context_length=CTX, kernel_backend="triton")
        model.blocks[0].requires_grad_(False)
        Parallel("fsdp", Processes("cpu")).shard(model)
        set_recompute(model, recompute)  # once sharded, as the trainer does
        g = torch.Generator().manual_seed(rank)  # each process its own batch
        x, y = (torch.randint(0, 50257, (2, CTX), generator=g) for _ in range(2))
        step = torch.compile(model, backend="aot_eager", fullgraph=False) if compiled else model
        _, loss = step(x, y)
        with BackwardOps() as ops:
            loss.backward()
        replayed = ops.counts["gpt_triton.attention"]
        assert replayed == (len(model.blocks) if recompute == "blocks" else 0), (recompute, ops.counts)
        assert all(p.grad is None for p in model.blocks[0].parameters())  # frozen: no gradient, sharded or not
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == len(list(model.parameters())) - len(list(model.blocks[0].parameters()))
        runs[compiled, recompute] = (loss.detach(), grads)
    loss, grads = runs[False, "none"]
    for key, (other_loss, other_grads) in runs.items():
        torch.testing.assert_close(other_loss, loss, rtol=1e-6, atol=1e-6, msg=str(key))
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


def worker(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    done = {}
    done["straight"] = summary(train(pretraining(out / "straight", 2)))
    try:
        train(pretraining(out / "crashed", 2), on_step=crash_at(4))
    except Crash:
        pass
    # (a resume takes this machine's kernels: the same here; under torchrun, its run's parallel mode unless told)
    done["resumed"] = summary(train(TrainConfig(resume=str(out / "crashed"), out=str(out / "resumed"),
                                                kernels="triton")))
    done["one-resumed"] = summary(train(TrainConfig(resume=str(out / "one-crashed"), out=str(out / "one-resumed"),
                                                    kernels="triton", parallel="fsdp")))
    for name in ("classifier", "lora"):
        job, cfg = finetuning(name, out / name, 2)
        done[name] = summary(job(cfg))
    sharded_steps(rank)
    if rank == 0:
        (out / "runs.json").write_text(json.dumps(done))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """The worker's runs (and the one-process run it resumes, crashed after its checkpoint of step 3)."""
    out = tmp_path_factory.mktemp("fsdp")
    with pytest.raises(Crash):
        train(pretraining(out / "one-crashed", 1), on_step=crash_at(4))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, json.loads((out / "runs.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The pretraining run of one process that accumulates the two processes' micro-batches: (its summary, its
    run directory)."""
    out = tmp_path_factory.mktemp("one") / "run"
    return summary(train(pretraining(out, 1))), out


def close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=atol)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, exact: bool) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_sharded_pretraining_matches_one_process_and_its_run_is_whole_on_disk(fsdp, one_process):
    out, runs = fsdp
    (one, one_dir), fsdp_run = one_process, runs["straight"]
    assert len(fsdp_run["losses"]) == 6
    close(fsdp_run["losses"], one["losses"])
    assert [r["step"] for r in fsdp_run["evals"]] == [r["step"] for r in one["evals"]] == [0, 3, 6]
    for a, b in zip(fsdp_run["evals"], one["evals"]):
        assert a == pytest.approx(b, abs=1e-5)
    # the run directory: the model whole (model.safetensors from the first process), the optimizer sharded
    state = torch.load(out / "straight" / STATE_FILE, weights_only=True)
    assert state["optimizer"] is None and state["optimizer_dir"] == OPTIMIZER_DIR and state["world_size"] == 2
    assert sorted(p.name for p in (out / "straight" / OPTIMIZER_DIR).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its shard
    same_weights(load_checkpoint(out / "straight"), load_checkpoint(one_dir), exact=False)


def test_a_sharded_run_loads_wherever_a_run_does(fsdp, tmp_path, capsys):
    out, _ = fsdp
    assert main(["generate", "--checkpoint", str(out / "straight"), "--prompt", "Every effort", "--max-new-tokens",
                 "3", "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Every effort")
    spam = finetune_classifier(FinetuneConfig(checkpoint=str(out / "straight"), limit=20, max_steps=1, eval_batches=1,
                                              device="cpu", out=str(tmp_path / "spam")))
    assert spam.step == 1


def test_a_sharded_run_resumed_by_the_same_processes_is_bit_identical(fsdp):
    out, runs = fsdp
    assert runs["resumed"]["losses"] == runs["straight"]["losses"][3:]  # exactly
    assert runs["resumed"]["evals"] == runs["straight"]["evals"]
    same_weights(load_checkpoint(out / "resumed"), load_checkpoint(out / "straight"), exact=True)


def test_a_sharded_run_resumed_by_one_process_continues(fsdp, tmp_path, capsys):
    out, runs = fsdp
    crashed = shutil.copytree(out / "crashed", tmp_path / "crashed")
    one = train(TrainConfig(resume=str(crashed), kernels="triton"))  # in place: the shards read, the state saved whole
    assert "saved with 2 process(es), not 1: the data order continues exactly" in capsys.readouterr().out
    close(one.losses, runs["straight"]["losses"][3:])
    same_weights(load_checkpoint(crashed), load_checkpoint(out / "straight"), exact=False)
    state = torch.load(crashed / STATE_FILE, weights_only=True)
    assert state["optimizer"] is not None and state["world_size"] == 1
    assert not (crashed / OPTIMIZER_DIR).exists()  # the shards of the state it replaced are gone


def test_a_one_process_run_resumed_by_two_sharded_processes_continues(fsdp, one_process):
    out, runs = fsdp
    close(runs["one-resumed"]["losses"], one_process[0]["losses"][3:])
    assert (out / "one-resumed" / OPTIMIZER_DIR).is_dir()  # now sharded


@pytest.mark.parametrize("name", ["classifier", "lora"])
def test_sharded_finetuning_matches_one_process(fsdp, tmp_path, name):
    out, runs = fsdp
    job, cfg = finetuning(name, tmp_path / name, 1)
    one = job(cfg)
    close(runs[name]["losses"], one.losses)
    assert runs[name]["metrics"].keys() == one.metrics.keys()
    for key, value in one.metrics.items():
        assert runs[name]["metrics"][key] == pytest.approx(value, abs=1e-5), key
    sharded, _ = load_finetuned(out / name)
    same_weights(sharded, one.model.cpu(), exact=False)
    if name == "classifier":  # all but the last block and the final norm stayed frozen
        torch.manual_seed(cfg.seed)
        fresh = GPT.from_preset("tiny", dropout=0.0)
        for key, p in fresh.blocks[0].state_dict().items():
            assert torch.equal(sharded.gpt.blocks[0].state_dict()[key], p), key


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
