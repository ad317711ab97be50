"""The GPT-2 byte-pair encoding through tiktoken, built from the BPE files bundled in the package.

No network: ``encoder.json`` and ``vocab.bpe`` ship in ``gpt/assets`` (see its NOTICE) and tiktoken
builds the encoding from them, checking their SHA-256 against the published GPT-2 files.

    >>> tok = get_tokenizer()
    >>> tok.encode("Hello, world")
    [15496, 11, 995]
"""

from __future__ import annotations

import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256  # the last id of GPT-2's 50,257-token vocabulary
VOCAB_SIZE = 50257

# GPT-2's pre-tokenisation pattern: contractions, letters, digits, other. tiktoken's own copy (a faster
# possessive form of the same pattern) where this tiktoken has it.
try:
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN
except ImportError:  # older tiktoken
    GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def asset_path(name: str) -> str:
    """Path of a file bundled in ``gpt/assets`` (BPE files, The Verdict, SMS Spam, instruction data)."""
    return str(resources.files("gpt").joinpath("assets").joinpath(name))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (a ``tiktoken.Encoding``); ``<|endoftext|>`` is id 50256."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=asset_path("vocab.bpe"),
        encoder_json_file=asset_path("encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


def encode(text: str, allow_special: bool = True) -> list[int]:
    """Token ids of ``text``. ``<|endoftext|>`` in the text becomes 50256 when ``allow_special``, else it is
    encoded as the plain characters it is made of (for untrusted text and corpora)."""
    if allow_special:
        return get_tokenizer().encode(text, allowed_special={EOT_TOKEN})
    return get_tokenizer().encode(text, disallowed_special=())


def decode(ids) -> str:
    """Text of a sequence of token ids (a list or a 1-D tensor)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    bad = [i for i in ids if not 0 <= int(i) < VOCAB_SIZE]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside GPT-2's vocabulary [0, {VOCAB_SIZE}): the model's "
                         "vocabulary is larger than the tokenizer's (padded?) or the ids are corrupt")
    return get_tokenizer().decode([int(i) for i in ids])
