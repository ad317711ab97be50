"""gpt train --data DIR on gpt prepare-data's shards: windows streamed in order from memory maps.

Two gloo processes under torchrun (run as a script, this file is the worker): their windows are disjoint
and together cover the epoch (all but the few that do not fill a step), read in the shards' order; a
run stopped by Ctrl-C, or crashed after a checkpoint, and resumed ends bit-identical to one never stopped
(weights, losses, log, and the windows each process reads after the stop), dropout on. One process:
evaluation reads the validation shard; the command line trains on a folder; a resume with other shards
is refused.
"""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt.cli import main
from gpt.pretrain import TrainConfig, train
from gpt.shards import PrepareConfig, prepare_data
from gpt.stream import ShardCorpus

REPO = Path(__file__).resolve().parents[2]
CTX, BATCH, ACCUM = 16, 2, 2  # 2 processes: 8 windows a step
STOP_AT = {"sigint": 5, "crash": (9, 10)}  # (checkpoint, crash) steps: mid-epoch, between evaluations


class Crash(Exception):
    """Stands for a kill -9: the run ends with no save."""


def prepare(out: Path, seed: int = 0, shard_tokens: int = 600) -> Path:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)]  # random words: every window of 16 tokens is different
    src = out.parent / f"{out.name}.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 80)))}) + "\n"
                           for _ in range(20)))  # ~2,300 tokens: 4 shards
    prepare_data(PrepareConfig(sources=[str(src)], out=str(out), shard_tokens=shard_tokens, val_tokens=300,
                               workers=1), say=lambda *a: None)
    return out


def epoch(data: Path) -> tuple[int, int]:
    """(windows, steps per epoch) of the training shards: each step reads 8 windows."""
    windows = len(ShardCorpus(data, CTX).train)
    return windows, windows // (BATCH * 2 * ACCUM)


def config(data: Path, out: Path, **kw) -> TrainConfig:
    steps = epoch(data)[1] + 3  # into the second epoch
    return TrainConfig(**{**dict(preset="tiny", data=str(data), context_length=CTX, batch_size=BATCH,
                                 tokens_per_step=BATCH * 2 * ACCUM * CTX, max_steps=steps, eval_every=4,
                                 eval_batches=2, save_every=1000, sample_tokens=0, dropout=0.1, device="cpu",
                                 out=str(out)), **kw})


def worker(data: Path, out: Path) -> None:
    """Each process: a straight run; one stopped by SIGINT, resumed; one crashed after a checkpoint, resumed.
    Every training batch that reaches the token embedding is recorded (a global forward hook)."""
    torch.distributed.init_process_group("gloo")
    rank, inputs, runs = int(os.environ["RANK"]), [], {}

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and module.training and module.num_embeddings >= 50257:
            inputs.append(args[0].tolist())  # (B, T): one micro-batch of this process

    torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def run(name, cfg, stop=None):
        inputs.clear()

        def on_step(step, loss):
            if stop and step == stop[1]:
                if stop[0] == "sigint":
                    signal.raise_signal(signal.SIGINT)  # the step finishes, a checkpoint, then KeyboardInterrupt
                else:
                    raise Crash
        try:
            result = train(cfg, on_step=on_step)
            save_file({k: v.clone() for k, v in result.model.state_dict().items()},
                      str(out / f"{name}-rank{rank}.safetensors"))
            losses = result.losses
        except (KeyboardInterrupt, Crash):
            losses = None
        runs[name] = {"inputs": list(inputs), "losses": losses}

    run("straight", config(data, out / "straight"))
    run("sigint", config(data, out / "sigint"), ("sigint", STOP_AT["sigint"]))
    run("sigint-resumed", TrainConfig(resume=str(out / "sigint")))
    save, crash = STOP_AT["crash"]
    run("crash", config(data, out / "crash", save_every=save), ("crash", crash))
    run("crash-resumed", TrainConfig(resume=str(out / "crash")))
    (out / f"rank{rank}.json").write_text(json.dumps(runs))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    data = prepare(base / "data")
    out = base / "runs"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(data), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    windows = ShardCorpus(data, CTX).train
    number = {tuple(windows[i][0].tolist()): i for i in range(len(windows))}
    assert len(number) == len(windows)  # every window tells itself apart
    assert epoch(data)[1] > STOP_AT["crash"][1] and len(windows) % 8  # an epoch longer than the stops, and a rest

    def steps(rank: int, name: str) -> list[list[int]]:
        """The windows process ``rank`` read at each step of run ``name``."""
        rows = [number[tuple(row)] for batch in runs[rank][name]["inputs"] for row in batch]
        return [rows[i:i + BATCH * ACCUM] for i in range(0, len(rows), BATCH * ACCUM)]

    return out, runs, steps, epoch(data)


def test_two_processes_read_disjoint_windows_that_cover_the_epoch_in_order(ddp):
    _, _, steps, (windows, per_epoch) = ddp
    ranks = [steps(r, "straight") for r in range(2)]
    assert all(len(s) == per_epoch + 3 for s in ranks)
    for s in range(per_epoch + 3):
        first = (s % per_epoch) * 8  # the step's 8 windows: micro-step m, process r: its r-th 2 of 4
        for r in range(2):
            assert ranks[r][s] == [first + m * 4 + r * 2 + i for m in range(ACCUM) for i in range(BATCH)]
    seen = [[w for s in ranks[r][:per_epoch] for w in s] for r in range(2)]
    assert not set(seen[0]) & set(seen[1])  # disjoint ...
    assert sorted(seen[0] + seen[1]) == list(range(per_epoch * 8))  # ... and all but the < 8 left over
    assert windows - per_epoch * 8 < 8


@pytest.mark.parametrize("stop", ["sigint", "crash"])
def test_two_processes_stopped_at_any_step_resume_bit_identical(ddp, stop):
    out, runs, steps, _ = ddp
    saved = STOP_AT[stop] if stop == "sigint" else STOP_AT[stop][0]
    for r in range(2):
        assert runs[r][f"{stop}-resumed"]["losses"] == runs[r]["straight"]["losses"][saved:]
        assert steps(r, f"{stop}-resumed") == steps(r, "straight")[saved:]  # each process's windows continue
        straight = load_file(str(out / f"straight-rank{r}.safetensors"))
        resumed = load_file(str(out / f"{stop}-resumed-rank{r}.safetensors"))
        for key, p in straight.items():
            assert torch.equal(p, resumed[key]), key
    state = torch.load(out / stop / "trainer_state.pt", weights_only=True)
    assert [d["rank"] for d in state["data"]] == [0, 1]  # every process's position was saved
    log = [{k: v for k, v in json.loads(x).items() if k not in ("time", "speed")}  # (wall-clock figures)
           for x in (out / stop / "log.jsonl").open()]
    assert log == [{k: v for k, v in json.loads(x).items() if k not in ("time", "speed")}
                   for x in (out / "straight" / "log.jsonl").open()]


def test_evaluation_reads_the_validation_shard(tmp_path, capsys):
    data = prepare(tmp_path / "data")
    assert main(["train", "--data", str(data), "--preset", "tiny", "--context-length", str(CTX), "--max-steps", "2",
                 "--eval-every", "2", "--eval-batches", "1000", "--sample-tokens", "0", "--device", "cpu",
                 "--out", str(tmp_path / "run")]) == 0
    assert "300 validation tokens" in capsys.readouterr().out
    last = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").open()) if r["event"] == "eval"][-1]
    from gpt.weights import load_checkpoint

    model = load_checkpoint(tmp_path / "run").eval()
    val = ShardCorpus(data, CTX).val
    assert len(val) == (300 - 1) // CTX
    with torch.no_grad():
        x = torch.stack([val[i][0] for i in range(len(val))])  # (N, T): every window of the validation shard
        y = torch.stack([val[i][1] for i in range(len(val))])
        _, loss = model(x, y)
    assert last["val_loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_a_resume_with_other_shards_is_refused(tmp_path):
    data = prepare(tmp_path / "data")
    cfg = config(data, tmp_path / "run", max_steps=2, batch_size=1, tokens_per_step=None, eval_every=None)
    train(cfg)
    import shutil

    shutil.rmtree(data)
    prepare(data, seed=1)
    with pytest.raises(ValueError, match="the training data changed since the run was saved"):
        train(TrainConfig(resume=str(tmp_path / "run"), max_steps=3))


def test_an_unfinished_folder_is_refused(tmp_path):
    data = prepare(tmp_path / "data")
    index = json.loads((data / "index.json").read_text())
    (data / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="is not finished: run the same gpt prepare-data command again"):
        train(config(data, tmp_path / "run"))


@pytest.mark.parametrize("damage", ["cut", "deleted"])
def test_a_cut_or_missing_shard_is_refused_before_training(tmp_path, damage):
    data = prepare(tmp_path / "data")
    shard = data / json.loads((data / "index.json").read_text())["shards"][1]["file"]
    if damage == "cut":
        shard.write_bytes(shard.read_bytes()[:-2])  # one token short
    else:
        shard.unlink()
    with pytest.raises(ValueError, match=f"shard {shard} is missing or has the wrong size .*prepare the data again"):
        train(config(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
