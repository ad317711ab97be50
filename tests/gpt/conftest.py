"""Fixtures the gpt tests share."""

import pytest

from gpt.classify import finetune_classifier
from gpt.finetune import FinetuneConfig
from gpt.instruct import finetune_instruct
from gpt.pretrain import TrainConfig, train


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """One-step tiny runs, made once per test process: "pretraining", "classifier", "instruct" and "lora" (an
    instruction model with LoRA adapters). Tests read them, never change them (copy one to change it)."""
    base = tmp_path_factory.mktemp("tiny-runs")
    common = dict(preset="tiny", max_steps=1, eval_batches=1, device="cpu")
    train(TrainConfig(**common, context_length=32, sample_tokens=0, out=str(base / "pretraining")))
    finetune_classifier(FinetuneConfig(**common, limit=20, out=str(base / "classifier")))
    finetune_instruct(FinetuneConfig(**common, limit=10, max_new_tokens=2, out=str(base / "instruct")))
    finetune_instruct(FinetuneConfig(**common, limit=10, max_new_tokens=2, lora_rank=2, out=str(base / "lora")))
    return base
