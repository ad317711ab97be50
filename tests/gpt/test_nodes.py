"""Several machines: two torchrun "nodes" on 127.0.0.1 (``--nnodes 2``, one process each, a static
rendezvous at ``--master-addr``/``--master-port``, as the README's several-machine commands) train as one
torchrun of two processes does: the same losses, evaluations and weights, to the bit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["-m", "gpt", "train", "--preset", "tiny", "--context-length", "16", "--batch-size", "2", "--max-steps", "3",
         "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "0", "--dropout", "0", "--device", "cpu"]


def torchrun(args: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, *TRAIN, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluations(run: Path) -> list[dict]:
    records = map(json.loads, (run / "log.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k not in ("time", "speed")} for r in records if r["event"] == "eval"]


def test_two_nodes_of_one_process_train_as_one_node_of_two(tmp_path):
    port = free_port()
    nodes = [torchrun(["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
                       "127.0.0.1", "--master-port", str(port)], tmp_path / "nodes") for rank in (0, 1)]
    outputs = [finish(node) for node in nodes]
    assert "x 2 process(es) (ddp)" in outputs[0]  # the first node's process is the run's first: it reports
    finish(torchrun(["--standalone", "--nproc-per-node", "2"], tmp_path / "one-node"))
    assert evaluations(tmp_path / "nodes") == evaluations(tmp_path / "one-node")
    assert [r["step"] for r in evaluations(tmp_path / "nodes")] == [0, 3]
    two, one = (load_file(tmp_path / run / "model.safetensors") for run in ("nodes", "one-node"))
    assert two.keys() == one.keys() and all(two[k].equal(one[k]) for k in one)
