"""A GPT-2-class language model whose hot operations run on handwritten Triton kernels.

    from gpt import GPT, get_tokenizer, generate
    model = GPT.from_preset("gpt2-small")
    tok = get_tokenizer()
    ids = generate(model, tok.encode("Every effort moves you"), max_new_tokens=20)

    from gpt import TrainConfig, train, FinetuneConfig, finetune_classifier, finetune_instruct
    run = train(TrainConfig(preset="tiny", max_steps=20))           # what `gpt train` runs
    spam = finetune_classifier(FinetuneConfig(checkpoint=str(run.out_dir), max_steps=20))
    spam.metrics["test_accuracy"], spam.out_dir

How the package is built; calls go one way, from the command line to the jobs to the engine to the model
(and the job support) to ``gpt_kernels``:

- the model: ``config`` (GPTConfig and presets), ``model`` (GPT and the classifier head, on the ``gpt_kernels``
  API), ``kv_cache``, ``lora``, ``tokenizer``, ``generate``, ``weights`` (checkpoints, Hugging Face GPT-2,
  ``load_model`` for any of them plus presets);
- what jobs run on: ``runtime`` (device, precision, process group, RNG, signals), ``rundir`` (run
  directories, atomic writes, the log, staged checkpoints), ``optim`` (the one optimizer rule and schedule),
  ``data``, ``plot``;
- the one training engine, ``engine`` (RunConfig, the Task protocol, the loop) with ``checks`` (the
  settings' checks) and ``clock`` (the estimate of a run's length), and ``job`` (how a run starts: settings
  checked, resume resolved, task built, engine run);
- the jobs, each a function taking a config dataclass: ``pretrain`` (TrainConfig, train), ``finetune``
  (what finetuning shares: FinetuneConfig, trainable weights, finetuned models on disk), ``classify`` and
  ``instruct`` (the two finetuning tasks);
- the command line, ``cli`` (imported only by ``__main__``), which turns options into configs and calls
  the jobs.

``import gpt`` loads the model layer only; the jobs and their configs load when first used.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import PRESETS, GPTConfig
from .generate import generate
from .model import GPT, GPTClassifier
from .tokenizer import get_tokenizer
from .weights import CheckpointError, load_checkpoint, load_hf, load_model, save_checkpoint

try:
    __version__ = version("gpt-triton")  # what `gpt --version` says
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "(not installed)"

_JOBS = {"TrainConfig": "pretrain", "train": "pretrain", "RunResult": "engine", "FinetuneConfig": "finetune",
         "finetune_classifier": "classify", "finetune_instruct": "instruct"}

__all__ = ["GPT", "PRESETS", "CheckpointError", "GPTClassifier", "GPTConfig", "generate", "get_tokenizer",
           "load_checkpoint", "load_hf", "load_model", "save_checkpoint", *_JOBS]


def __getattr__(name: str):
    """The jobs and their configs, imported on first use (so ``import gpt`` stays light)."""
    if name in _JOBS:
        import importlib

        return getattr(importlib.import_module(f".{_JOBS[name]}", __name__), name)
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
