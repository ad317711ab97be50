"""Every job under torchrun: two CPU processes (gloo) train exactly like one process that accumulates the
same micro-batches into the same global batch.

One torchrun launch runs the three jobs (pretraining, the classifier, the instruction model) in turn, in
one process group. Run as a script, this file is that worker: each process trains, then writes its own
copy of the weights so the test can check that both processes ended with identical ones.

The one process takes the same micro-batches of 2 as the two processes (accumulating 2 of them), so every
text is padded alike: a batch of 4 pads to its longest text, which changes the matmul shapes and so the
rounding, and Adam turns that noise in near-zero gradients into differences of 1e-5 in a few weights
(test_train and test_finetune compare accumulation with one big batch).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt.classify import finetune_classifier
from gpt.finetune import FinetuneConfig
from gpt.instruct import finetune_instruct
from gpt.pretrain import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


def jobs(out: Path, processes: int) -> dict:
    """name -> (job, config). Dropout 0: each process draws its own dropout masks, which one process could
    not reproduce. The finetuning data have examples of different lengths, so the loss of a step must be
    the mean over all its tokens or texts, not a mean of the processes' means, for the two to agree."""
    common = dict(preset="tiny", batch_size=2, device="cpu", dropout=0.0)
    step = 4  # examples per optimizer step: 2 processes x 2, or 2 x 2 accumulated by one process
    finetune = dict(common, examples_per_step=step, eval_batches=2 // processes, lr=1e-3)
    return {
        "pretraining": (train, TrainConfig(**common, context_length=32, tokens_per_step=step * 32, max_steps=4,
                                           eval_every=2, eval_batches=4 // processes, sample_tokens=3,
                                           out=str(out / "pretraining"))),
        "classifier": (finetune_classifier, FinetuneConfig(**finetune, limit=20, epochs=2, trainable="all",
                                                           out=str(out / "classifier"))),
        "instruct": (finetune_instruct, FinetuneConfig(**finetune, limit=12, epochs=2, max_new_tokens=2,
                                                       mask_prompt=True, out=str(out / "instruct"))),
    }


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}  # clones: tied weights save apart


def worker(out: Path) -> None:
    torch.distributed.init_process_group("gloo")  # one group for the three jobs
    rank = int(os.environ["RANK"])
    for name, (job, cfg) in jobs(out / "ddp", processes=2).items():
        result = job(cfg)
        save_file(weights(result.model), str(out / f"{name}-rank{rank}.safetensors"))
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps({"losses": result.losses, "metrics": result.metrics}))
        else:
            assert result.out_dir is None
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", ["pretraining", "classifier", "instruct"])
def test_two_processes_match_one_process_accumulating_the_same_batches(ddp_runs, tmp_path, name):
    rank0 = load_file(ddp_runs / f"{name}-rank0.safetensors")
    rank1 = load_file(ddp_runs / f"{name}-rank1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP kept the processes in step
    ddp = json.loads((ddp_runs / f"{name}.json").read_text())

    job, cfg = jobs(tmp_path, processes=1)[name]
    single = job(cfg)
    assert len(ddp["losses"]) == len(single.losses) >= 4
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single.losses), rtol=0, atol=1e-5)
    for key, p in weights(single.model).items():
        torch.testing.assert_close(rank0[key], p, rtol=0, atol=1e-5, msg=key)
    assert ddp["metrics"].keys() == single.metrics.keys()
    for key, value in single.metrics.items():  # the evaluations (and the test set) shared out among processes
        assert ddp["metrics"][key] == pytest.approx(value, abs=1e-5), key

    log = (ddp_runs / "ddp" / name / "log.jsonl").read_text()  # written once, by process 0
    ddp_evals = [json.loads(x) for x in log.splitlines() if '"eval"' in x]
    assert [r["step"] for r in ddp_evals] == [r["step"] for r in single.evals]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
