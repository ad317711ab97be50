"""A GPT-2-class language model whose hot operations run on handwritten Triton kernels.

    from gpt import GPT, get_tokenizer, generate
    model = GPT.from_preset("gpt2-small")
    tok = get_tokenizer()
    ids = generate(model, tok.encode("Every effort moves you"), max_new_tokens=20)
"""

from .config import PRESETS, GPTConfig
from .generate import generate
from .model import GPT
from .tokenizer import get_tokenizer
from .train import TrainConfig, train
from .weights import CheckpointError, load_checkpoint, load_hf, save_checkpoint

__all__ = ["GPT", "PRESETS", "CheckpointError", "GPTConfig", "generate", "get_tokenizer", "load_checkpoint",
           "load_hf", "save_checkpoint"]
__all__ += ["TrainConfig", "train"]
