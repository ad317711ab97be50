"""Turning text into training batches: sliding windows over token ids, in memory or memory-mapped.

Small texts (The Verdict) are tokenized in memory. Corpora bigger than memory are tokenized once into a
flat ``uint16`` token file (GPT-2's ids fit in 16 bits) that :class:`SlidingWindowDataset` windows over
through ``numpy.memmap``, so only the windows in use are ever read.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .errors import UserError
from .rundir import atomic_write, need
from .tokenizer import EOT_ID, VOCAB_SIZE, asset_path, encode, not_utf8, read_utf8

TOKEN_FILE_SUFFIX = ".tokens.u16"


def default_text_path() -> str:
    """The bundled default corpus: Edith Wharton's "The Verdict" (public domain)."""
    return asset_path("the-verdict.txt")


class SlidingWindowDataset(Dataset):
    """Windows of ``context_length`` tokens, ``stride`` apart; the targets are the inputs shifted by one.

    ``tokens`` is anything 1-D that slices: a list, a tensor, a numpy array or a ``numpy.memmap``.
    Window ``i`` covers tokens ``[i * stride, i * stride + context_length]`` (inputs and next-token targets).
    """

    def __init__(self, tokens, context_length: int, stride: int | None = None):
        if context_length < 1:
            raise UserError(f"context_length must be >= 1, got {context_length}")
        stride = context_length if stride is None else stride
        if stride < 1:
            raise UserError(f"stride must be >= 1, got {stride}")
        if isinstance(tokens, list):
            tokens = np.asarray(tokens, dtype=np.int64)
        self.tokens, self.context_length, self.stride = tokens, context_length, stride
        n = len(tokens)
        if n < context_length + 1:
            raise UserError(f"the text has {n} tokens, fewer than one window needs ({context_length} + 1 for "
                            f"the shifted targets): use a longer text or a smaller context length")
        self.num_windows = (n - context_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        start = i * self.stride
        chunk = self.tokens[start:start + self.context_length + 1]
        chunk = torch.as_tensor(np.asarray(chunk, dtype=np.int64))  # (L + 1,)
        return chunk[:-1], chunk[1:]  # inputs (L,), targets (L,)


def split_tokens(tokens, val_ratio: float):
    """Split a token sequence into (train, validation) at ``1 - val_ratio`` of its length."""
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"val_ratio must be in [0, 1), got {val_ratio}")
    cut = int(round(len(tokens) * (1.0 - val_ratio)))
    return tokens[:cut], tokens[cut:]


# ------------------------------------------------------------------------------ corpora bigger than memory


def list_text_files(source) -> list[Path]:
    """The text files named by ``source``: a file, a directory (every *.txt, recursively) or a list of them."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    files: list[Path] = []
    for s in source:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise FileNotFoundError(f"directory {str(p)!r} holds no .txt files")
            files.extend(found)
        else:
            files.append(need(p, "file", "data path", "give a text file or a directory of .txt files"))
    return files


def tokenize_to_file(source: str | os.PathLike | Sequence, out_path, chunk_bytes: int = 1 << 20) -> Path:
    """Tokenize UTF-8 text files into one flat ``uint16`` token file (documents separated by <|endoftext|>).

    Reads each file in chunks of about ``chunk_bytes`` bytes, split at a newline so no word is cut, and
    shows a progress bar in bytes. A file that is not UTF-8 stops it with :class:`NotUTF8Error` naming the
    file and the byte, and no token file is left behind. A ``<out>.json`` beside it records the sources and
    the token count. Returns the path of the token file.
    """
    files = list_text_files(source)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: _write_tokens(files, tmp, chunk_bytes))
    n_tokens = out_path.stat().st_size // 2  # two bytes a token
    meta = {"sources": [str(f) for f in files], "tokens": n_tokens, "dtype": "uint16", "vocab_size": VOCAB_SIZE}
    out_path.with_name(out_path.name + ".json").write_text(json.dumps(meta, indent=1))
    return out_path


def read_utf8_chunks(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of about ``chunk_bytes`` bytes (a character split between two
    reads is held back until it is whole); :class:`NotUTF8Error` at the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict
    offset, lines, started = 0, 1, False  # where the bytes held back plus the next block start
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            held = decoder.getstate()[0]  # the start of a character cut off by the previous block
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as e:  # e.object is held + block
                raise not_utf8(str(path), e.object, e, offset - len(held), lines) from None
            if text and not started:  # a byte-order mark at the start is no text
                text, started = text.removeprefix("\ufeff"), True
            yield text
            offset, lines = offset + len(block), lines + block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:  # the file ends in the middle of a character
        raise not_utf8(str(path), e.object, e, offset - len(e.object), lines) from None


def _write_tokens(files: list[Path], path: Path, chunk_bytes: int) -> None:
    """Tokenize ``files`` into ``path`` (uint16 ids, each file ending in <|endoftext|>)."""
    total = sum(f.stat().st_size for f in files)
    with open(path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for f in files:
            carry = ""
            for block in read_utf8_chunks(f, chunk_bytes):
                bar.update(len(block.encode("utf-8")))
                text = carry + block
                cut = text.rfind("\n")
                if cut == -1:
                    carry = text
                    continue
                text, carry = text[:cut + 1], text[cut + 1:]
                out.write(np.asarray(encode(text, allow_special=False), dtype=np.uint16).tobytes())
            out.write(np.asarray(encode(carry, allow_special=False) + [EOT_ID], dtype=np.uint16).tobytes())


def load_token_file(path) -> np.memmap:
    """Memory-map a token file written by :func:`tokenize_to_file` (nothing is read until sliced)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist: create it with tokenize_to_file")
    if path.stat().st_size % 2:
        raise UserError(f"{path} has an odd number of bytes: not a uint16 token file (or truncated)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_tokens(source, cache_dir=None, max_in_memory_bytes: int = 64 << 20):
    """Token ids of a UTF-8 text file or directory: in memory for small data, else through a cached token file.

    A source bigger than ``max_in_memory_bytes`` (or any directory) is tokenized once into
    ``<cache_dir>/<name>.tokens.u16`` and memory-mapped; later calls reuse the file while it is newer than
    its sources. Without ``cache_dir`` the file goes beside the data or, where that is not writable (a
    read-only data directory), into :func:`user_cache_dir`.
    """
    files = list_text_files(source)
    size = sum(f.stat().st_size for f in files)
    if size == 0:
        raise UserError(f"the data at {source!s} is empty: give a text file with some text in it")
    if len(files) == 1 and size <= max_in_memory_bytes and Path(source).is_file():
        return np.asarray(encode(read_utf8(files[0]), allow_special=False), dtype=np.int64)
    name = "corpus" if isinstance(source, (list, tuple)) else Path(source).name
    places = [Path(cache_dir) if cache_dir else Path(files[0]).parent]
    if not cache_dir:
        where = hashlib.sha256(str(Path(files[0]).resolve()).encode()).hexdigest()[:12]  # one per source
        places.append(user_cache_dir() / where)
    outs = [place / (name + TOKEN_FILE_SUFFIX) for place in places]
    newest = max(f.stat().st_mtime for f in files)
    for out in outs:
        if out.exists() and out.stat().st_mtime >= newest:
            return load_token_file(out)
    try:
        return load_token_file(tokenize_to_file(files, outs[0]))
    except OSError as e:
        if len(outs) == 1 or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        first = e
    print(f"note: cannot write the token file beside the data ({places[0]}: {first.strerror}); it goes to "
          f"{outs[1]}", file=sys.stderr)
    try:
        return load_token_file(tokenize_to_file(files, outs[1]))
    except OSError as e:
        raise OSError(f"cannot write the token file of {source}: not beside it ({places[0]}: {first.strerror}), nor "
                      f"in the cache directory {places[1]} ({e.strerror or e}): set XDG_CACHE_HOME to a writable "
                      f"directory") from None


def user_cache_dir() -> Path:
    """Where token files go when the data's own directory is read-only: ``$XDG_CACHE_HOME/gpt-triton/tokens``
    (``~/.cache/gpt-triton/tokens`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-triton" / "tokens"
