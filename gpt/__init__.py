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
- meeting transformers: ``hf_export`` (``export_hf``: a model as a Hugging Face GPT-2 directory) and
  ``hf_accelerate`` (``accelerate_hf``: a transformers GPT-2 on our kernels);
- what jobs run on: ``runtime`` (device, precision, process group, RNG, signals), ``rundir`` (run
  directories, atomic writes, the log, staged checkpoints), ``optim`` (the one optimizer rule and schedule),
  ``data``, ``sources`` (which examples each step takes, and each process's position), ``plot``;
- corpora and benchmarks: ``corpus`` (text, JSON-lines and Parquet sources read document by document),
  ``shards`` (``gpt prepare-data``: a corpus tokenized into uint16 shards and an index), ``stream`` (those
  shards as training windows, by memory map), ``hellaswag`` (HellaSwag scored completion-style: ``gpt eval``);
- the one training engine: ``plan`` (RunConfig, and ``plan_run``, the one place a run's settings are
  resolved, into a frozen Plan), ``engine`` (the Task protocol, the loop), ``trainer_state`` (the one module
  that writes, reads and puts back a run's trainer state), with ``checks`` (the settings' checks) and
  ``clock`` (the estimate of a run's length, its speed), and ``job`` (how a run starts: settings checked, the
  run to resume read, the plan made with its task, the engine run);
- ``errors`` (UserError: a user's mistake, which the command line prints as one line);
- the jobs, each a function taking a config dataclass: ``pretrain`` (TrainConfig, train), ``finetune``
  (what finetuning shares: FinetuneConfig, trainable weights, finetuned models on disk), ``classify`` and
  ``instruct`` (the two finetuning tasks);
- the command line, ``cli`` (imported only by ``__main__``; ``cli_tools`` holds prepare-data's, eval's and export's
  options), which turns options into configs and calls the jobs.

``import gpt`` loads the model layer only; the jobs and their configs load when first used.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import PRESETS, GPTConfig
from .generate import generate
from .model import GPT, GPTClassifier
from .tokenizer import get_tokenizer
from .weights import CheckpointError, load_checkpoint, load_hf, load_hf_classifier, load_model, save_checkpoint

try:
    __version__ = version("gpt-triton")  # what `gpt --version` says
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "(not installed)"

# imported on first use: the jobs and their configs, and the Hugging Face export and acceleration
_LAZY = {"TrainConfig": "pretrain", "train": "pretrain", "RunResult": "engine", "FinetuneConfig": "finetune",
         "finetune_classifier": "classify", "finetune_instruct": "instruct", "export_hf": "hf_export",
         "accelerate_hf": "hf_accelerate"}

__all__ = ["GPT", "PRESETS", "CheckpointError", "GPTClassifier", "GPTConfig", "generate", "get_tokenizer",
           "load_checkpoint", "load_hf", "load_hf_classifier", "load_model", "save_checkpoint", *_LAZY]


def __getattr__(name: str):
    """The names of ``_LAZY``, imported on first use (so ``import gpt`` stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
