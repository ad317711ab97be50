"""The GPT-2 byte-pair encoding through tiktoken, built from the BPE files bundled in the package.

No network: ``encoder.json`` and ``vocab.bpe`` ship in ``gpt/assets`` (see its NOTICE) and tiktoken
builds the encoding from them, checking their SHA-256 against the published GPT-2 files.

    >>> tok = get_tokenizer()
    >>> tok.encode("Hello, world")
    [15496, 11, 995]
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by get_tokenizer() on first use, not with `gpt`: see there
    import tiktoken

from .errors import UserError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256  # the last id of GPT-2's 50,257-token vocabulary
VOCAB_SIZE = 50257

# GPT-2's pre-tokenisation pattern: contractions, letters, digits, other (tiktoken's own copy, a faster
# possessive form of the same pattern, is used where the installed tiktoken has it)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def asset_path(name: str) -> str:
    """Path of a file bundled in ``gpt/assets`` (BPE files, The Verdict, SMS Spam, instruction data)."""
    return str(resources.files("gpt").joinpath("assets").joinpath(name))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (a ``tiktoken.Encoding``); ``<|endoftext|>`` is id 50256.

    tiktoken is imported here, on first use, not when ``gpt`` is imported: the model, the kernels and their
    tests run without it (a GPU host missing it still runs every kernel test)."""
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError as e:
        raise ImportError(f"the GPT-2 tokenizer needs tiktoken, which does not import here ({e}): "
                          "pip install tiktoken") from e
    try:
        from tiktoken_ext.openai_public import r50k_pat_str as pattern
    except ImportError:  # older tiktoken
        pattern = GPT2_PATTERN
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=asset_path("vocab.bpe"),
        encoder_json_file=asset_path("encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(name="gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


class NotUTF8Error(UserError):
    """Text that is not UTF-8. GPT-2's BPE works on UTF-8 bytes, so text in another encoding is refused
    rather than decoded with U+FFFD in place of every byte that does not fit (which trains on garbage)."""


def not_utf8(source: str, data: bytes, err: UnicodeDecodeError, offset: int = 0, line: int = 1) -> NotUTF8Error:
    """The error for ``err``, raised decoding ``data``, which starts at byte ``offset`` (on line ``line``) of
    ``source`` (a file's path, "stdin", an option)."""
    line += data[:err.start].count(b"\n")
    return NotUTF8Error(f"{source} is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset "
                        f"{offset + err.start:,} (line {line}) is not valid UTF-8. Convert it "
                        f"to UTF-8 first (from Latin-1, say: iconv -f latin1 -t utf-8 OLD > NEW)")


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped); :class:`NotUTF8Error` naming ``source``
    and the first bad byte's offset if it is not UTF-8."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise not_utf8(source, data, e) from None


def read_utf8(path) -> str:
    """The text of a UTF-8 file (see :func:`decode_utf8`)."""
    return decode_utf8(Path(path).read_bytes(), str(path))


def check_utf8_arg(text: str, source: str) -> str:
    """``text`` from the command line, refused if its bytes were not UTF-8 (Python keeps such bytes as lone
    surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        decode_utf8(os.fsencode(text), source)
    return text


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
        raise UserError(f"token id {bad[0]} is outside GPT-2's vocabulary [0, {VOCAB_SIZE}): the model's "
                         "vocabulary is larger than the tokenizer's (padded?) or the ids are corrupt")
    return get_tokenizer().decode([int(i) for i in ids])


def visible(text: str) -> str:
    """``text`` on one line with its line breaks shown as ``\\n`` (a sample made of newlines would otherwise
    print as blank space, or break up the progress output; an answer of ``gpt chat``, its one line)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")
