"""gpt train under torchrun: two CPU processes (gloo) train exactly like one process with the same global batch.

Run as a script, this file is the worker that torchrun starts: each process trains, then writes its own
copy of the weights so the test can check that both processes ended with identical ones.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpt.pretrain import TrainConfig, train
from gpt.weights import model_state_for_saving

REPO = Path(__file__).resolve().parents[2]


def config(out, batch_size) -> TrainConfig:
    # dropout 0: each process draws its own dropout masks, which one process could not reproduce
    return TrainConfig(preset="tiny", context_length=32, batch_size=batch_size, max_steps=4, eval_every=2,
                       eval_batches=2, dropout=0.0, sample_tokens=3, device="cpu", out=str(out))


def worker(out: Path) -> None:
    result = train(config(out / "ddp", batch_size=2))  # 2 processes x 2 windows = a global batch of 4
    rank = int(os.environ["RANK"])
    save_file(model_state_for_saving(result.model), str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(result.losses))
    else:
        assert result.out_dir is None


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP kept the processes in step
    ddp_losses = json.loads((tmp_path / "losses.json").read_text())
    ddp_log = (tmp_path / "ddp" / "log.jsonl").read_text()  # written once, by process 0
    assert ddp_log.count('"step": 0,') == 1

    single = train(config(tmp_path / "single", batch_size=4))
    assert len(ddp_losses) == len(single.losses) == 4
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single.losses), rtol=0, atol=1e-5)
    for name, p in model_state_for_saving(single.model).items():
        torch.testing.assert_close(rank0[name], p, rtol=0, atol=1e-5, msg=name)
    ddp_evals = [json.loads(x) for x in ddp_log.splitlines() if '"eval"' in x]
    assert [r["step"] for r in ddp_evals] == [r["step"] for r in single.evals] == [0, 2, 4]
    for a, b in zip(ddp_evals, single.evals):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
