"""``gpt prepare-data``: a corpus tokenized once into ``uint16`` token shards that training memory-maps.

    from gpt.shards import PrepareConfig, prepare_data
    index = prepare_data(PrepareConfig(sources=["fineweb-edu/sample/10BT"], out="data/edu10b"))

The output folder holds

    val_000000.bin       the first ``val_tokens`` tokens of the corpus: the validation split
    train_000000.bin...  the rest, ``shard_tokens`` tokens a shard (the last one shorter)
    index.json           the shards (tokens, SHA-256), the sources (path, size, SHA-256), the tokenizer and
                         the settings, the documents written and those skipped

A shard is raw little-endian ``uint16`` token ids, nothing else (``numpy.memmap(path, dtype="<u2")``).
Every document starts with ``<|endoftext|>``, as in build-nanogpt's and llm.c's FineWeb shards, so a
shard's tokens decode to ``"<|endoftext|>" + doc1 + "<|endoftext|>" + doc2 ...``; a document can straddle
two shards. Documents are tokenized with tiktoken by ``workers`` threads (tiktoken releases the GIL while
it encodes) while the main thread reads the sources and writes the shards, a bounded number of batches
ahead, so memory stays the same whatever the corpus size.

**Resume.** A shard is written under a temporary name and renamed when full, and the index is rewritten
after each one with where its last token came from (source, unit, tokens of that unit). Run the same
command again after a crash or Ctrl-C: the finished shards are kept as they are and the work goes on from
the end of the last one. The output depends only on the sources and the settings (not on ``workers``):
a resumed run writes the same bytes as a straight one. One command at a time writes a folder
(:func:`gpt.rundir.hold_run_dir`): a second one started on it is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .corpus import CorpusError, Source, SourceInfo, find_sources, inspect, read_units
from .errors import UserError
from .rundir import atomic_write, hold_run_dir
from .tokenizer import EOT_TOKEN, get_tokenizer

FORMAT = "gpt-triton-shards-1"
INDEX_FILE = "index.json"
DTYPE = "<u2"  # little-endian uint16: ids below 65,536
BATCH_CHARS = 1 << 18  # characters of text per tokenizing task (a few tens of ms of work)
MAX_ID = np.iinfo(np.uint16).max


@dataclass
class PrepareConfig:
    """The settings of ``gpt prepare-data``: all but ``workers`` decide the output (and are in the index)."""

    sources: list[str] = field(default_factory=list)  # files and folders (see gpt.corpus)
    out: str = ""  # the output folder: new, empty, or an earlier run of the same settings (which resumes)
    field: str = "text"  # the JSON field / Parquet column holding a document's text
    tokenizer: str = "gpt2"  # a tiktoken encoding whose ids fit 16 bits (gpt2: the bundled files, no download)
    shard_tokens: int = 100_000_000  # tokens per training shard (200 MB), as build-nanogpt's FineWeb shards
    val_tokens: int = 10_000_000  # the first tokens of the corpus, held out for validation; 0: none
    strict: bool = False  # refuse a document that is not UTF-8 instead of skipping (and counting) it
    workers: int | None = None  # tokenizing threads; None: every core this process may use

    def check(self) -> None:
        if not self.out:
            raise UserError("give the output folder with --out DIR")
        if not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            raise UserError(f"--shard-tokens must be a positive integer, got {self.shard_tokens!r}")
        if not isinstance(self.val_tokens, int) or self.val_tokens < 0:
            raise UserError(f"--val-tokens must be >= 0, got {self.val_tokens!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise UserError(f"--workers must be a positive integer, got {self.workers!r}")
        if not self.field:
            raise UserError("--field must name a field")

    def settings(self) -> dict:
        """What the output depends on besides the sources and the tokenizer."""
        return {"field": self.field, "shard_tokens": self.shard_tokens, "val_tokens": self.val_tokens,
                "strict": self.strict}


def load_encoding(name: str):
    """The tiktoken encoding ``name`` (``gpt2`` from the bundled files), refused if an id needs more than 16 bits."""
    if name == "gpt2":
        return get_tokenizer()
    import tiktoken

    try:
        enc = tiktoken.get_encoding(name)
    except ValueError:  # tiktoken's "Unknown encoding"
        known = ", ".join(tiktoken.list_encoding_names())
        raise UserError(f"{name!r} is not a tiktoken encoding: give one of {known} (gpt2 needs no download)") from None
    except Exception as e:  # its files could not be downloaded
        raise UserError(f"tokenizer {name!r} cannot be loaded: its files could not be downloaded "
                        f"({type(e).__name__}; no network?): use gpt2, which is bundled") from None
    if enc.max_token_value > MAX_ID:
        raise UserError(f"tokenizer {name!r} has token ids up to {enc.max_token_value:,}, which do not fit the "
                        f"uint16 shards (ids up to {MAX_ID:,}): use a tokenizer of at most 65,536 tokens (gpt2, "
                        f"r50k_base, p50k_base)")
    return enc


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------------------ the run


def prepare_data(cfg: PrepareConfig, *, say=print, batch_chars: int = BATCH_CHARS) -> dict:
    """Tokenize ``cfg.sources`` into shards in ``cfg.out`` (see the module's doc); returns the index.

    Raises ValueError (CorpusError) or OSError, in one line, for bad settings and bad input, before any
    shard is written where it can be found out beforehand (a missing field, a corrupt gzip, a text file
    that is not UTF-8 under ``strict``). Memory holds about ``2 * workers + 2`` tasks of ``batch_chars``
    characters at a time."""
    cfg.check()
    enc = load_encoding(cfg.tokenizer)
    out = Path(cfg.out)
    sources = find_sources(cfg.sources)
    sources = [s for s in sources if out.resolve() not in s.path.parents]  # a rerun never reads its own output
    if not sources:
        raise CorpusError(f"the sources hold nothing but the output folder {out}")
    workers = cfg.workers or default_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        infos = list(tqdm(pool.map(lambda s: inspect(s, cfg.field, cfg.strict), sources), total=len(sources),
                          desc="checking sources", unit="file", disable=len(sources) < 2, leave=False))
        header = {"format": FORMAT, "tokenizer": {"name": cfg.tokenizer, "vocab_size": enc.n_vocab,
                                                  "eot_id": enc.eot_token},
                  "dtype": "uint16", "separator": f"{EOT_TOKEN} before every document", "settings": cfg.settings(),
                  "sources": [{**s.describe(), "bytes": i.size, "sha256": i.sha256} for s, i in zip(sources, infos)]}
        done = _resume(out, header)  # a folder refused here is left as it was
        if not _finished(done, out, say):
            with _held_folder(out):  # one command at a time writes the folder
                done = _resume(out, header)  # again: another run may have written it since
                if not _finished(done, out, say):
                    done = _prepare(pool, enc, cfg, sources, infos, _Writer(out, header, cfg, done), say,
                                    batch_chars, workers)
                    say(f"wrote {_summary(done)} to {out}")
    return done


def _finished(done: dict | None, out: Path, say) -> bool:
    """Whether the index ``done`` of the folder ``out`` is complete (which is said)."""
    if done is None or not done.get("complete"):
        return False
    say(f"{out} already holds these shards ({_summary(done)}): nothing to do")
    return True


@contextlib.contextmanager
def _held_folder(out: Path):
    """Create ``out`` if needed and hold it (:func:`gpt.rundir.hold_run_dir`) for the block; a folder this
    made is removed again if the block leaves nothing in it (refused, or failed before its first shard)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with hold_run_dir(out):
            yield
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()


def _prepare(pool, enc, cfg: PrepareConfig, sources, infos, writer: _Writer, say, batch_chars: int,
             workers: int) -> dict:
    """Write the shards that ``writer`` does not have yet; the complete index."""
    if writer.shards:
        say(f"resuming after {len(writer.shards)} finished shard(s) in {writer.out}")
    try:
        _tokenize(pool, enc, _batches(_units(sources, infos, cfg, writer.position), batch_chars), writer,
                  workers, sum(i.size for i in infos))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _tokenize(pool, enc, batches, writer: _Writer, workers: int, total_bytes: int) -> None:
    """Tokenize ``batches`` in the pool, a bounded number ahead, into ``writer``; a progress bar."""
    t0, tokens0 = time.perf_counter(), writer.total
    with tqdm(total=total_bytes, initial=writer.position.bytes, unit="B", unit_scale=True, desc="tokenizing",
              dynamic_ncols=True) as bar:
        for batch, tokens in _ahead(pool, lambda b: _encode(enc, b), batches, 2 * workers + 2):
            writer.add(batch, tokens)
            bar.update(writer.position.bytes - bar.n)
            rate = (writer.total - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{writer.total:,} tokens, {rate:,.0f} tokens/s", refresh=False)


def _summary(index: dict) -> str:
    t, sk = index["tokens"], index["skipped"]
    skipped = "; skipped " + ", ".join(f"{n:,} {why.replace('_', '-')}" for why, n in sk.items() if n) \
        if any(sk.values()) else ""
    return (f"{index['documents']:,} documents, {t['train']:,} training tokens in "
            f"{sum(s['split'] == 'train' for s in index['shards'])} shard(s), {t['val']:,} validation tokens{skipped}")


def _resume(out: Path, header: dict) -> dict | None:
    """The index of an earlier run of the same settings in ``out`` (its finished shards checked), or None
    for a new or empty folder; an error for a folder that holds anything else."""
    path = out / INDEX_FILE
    if not path.exists():
        if out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if not p.name.startswith("."))):
            raise UserError(f"--out {out} is not empty and holds no {INDEX_FILE} of gpt prepare-data: give a new or "
                            f"empty folder")
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}): delete {out} or give another --out") from None
    for key in ("format", "tokenizer", "settings", "sources"):
        if index.get(key) != header[key]:
            raise UserError(f"{out} holds shards made from other sources or settings ({key} differs: "
                            f"{_differs(index.get(key), header[key])}): give another --out, or delete {out} to "
                            f"start again")
    check_shards(out, index, f"delete {out} to start again")
    return index


def check_shards(directory: Path, index: dict, advice: str) -> None:
    """Raise a UserError (ending in `advice`) if a shard the index lists is missing or not its listed size."""
    itemsize = np.dtype(DTYPE).itemsize
    for s in index["shards"]:
        p = directory / s["file"]
        if not p.is_file() or p.stat().st_size != itemsize * s["tokens"]:
            raise UserError(f"shard {p} is missing or has the wrong size ({itemsize * s['tokens']:,} bytes "
                            f"expected): {advice}")


def _differs(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return f"{k}: {old.get(k)!r} before, {new.get(k)!r} now"
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for a, b in zip(old, new):
            if a != b:
                return _differs(a, b)
    return f"{str(old)[:120]} before, {str(new)[:120]} now"


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Position:
    """Where a shard ends in the corpus, and the counts up to there (kept in the index for each shard)."""

    source: int = 0  # the source (in index order) ...
    unit: int = 0  # ... and its unit holding the shard's last token (see gpt.corpus)
    offset: int = 0  # that unit's tokens written so far (the rest go into the next shard)
    documents: int = 0  # documents started (their separator written)
    skipped: dict = field(default_factory=lambda: {"not_utf8": 0, "null": 0})
    bytes: int = 0  # source bytes read (on disk), for the progress bar


def _units(sources: list[Source], infos: list[SourceInfo], cfg: PrepareConfig,
           start: Position) -> Iterator[tuple[int, int, object]]:
    """(source number, bytes of the sources before it, unit) from ``start`` on."""
    before = sum(i.size for i in infos[:start.source])
    for k in range(start.source, len(sources)):
        first = start.unit if k == start.source else 0
        for unit in read_units(sources[k], infos[k], cfg.field, cfg.strict, first):
            yield k, before, unit
        before += infos[k].size


def _batches(units, batch_chars: int) -> Iterator[list]:
    batch, chars = [], 0
    for item in units:
        batch.append(item)
        chars += len(item[2].text or "")
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(enc, batch: list) -> tuple[np.ndarray, list[int]]:
    """The uint16 tokens of a batch's units, one after the other (a separator before each document), and
    how many each unit has."""
    parts, lengths = [], []
    for _, _, unit in batch:
        n = 0
        if unit.text is not None and unit.first:
            parts.append(np.array([enc.eot_token], dtype=np.uint32))
            n += 1
        if unit.text:
            parts.append(enc.encode_to_numpy(unit.text, disallowed_special=()))
            n += len(parts[-1])
        lengths.append(n)
    return (np.concatenate(parts).astype(DTYPE) if parts else np.empty(0, DTYPE)), lengths


def _ahead(pool, fn, items, depth: int):
    """(item, fn(item)) in order, with up to ``depth`` items in the pool at once (so memory stays bounded)."""
    pending = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= depth:
            item, fut = pending.popleft()
            yield item, fut.result()
    while pending:
        item, fut = pending.popleft()
        yield item, fut.result()


# ------------------------------------------------------------------------------------------ writing


class _Writer:
    """Appends tokens to the current shard; renames it into place when full and rewrites the index."""

    def __init__(self, out: Path, header: dict, cfg: PrepareConfig, done: dict | None):
        """Writes into the held folder ``out``, after the shards of the earlier run's index ``done``."""
        self.out, self.header, self.shards = out, header, list(done["shards"] if done else [])
        self.val_tokens, self.shard_tokens = cfg.val_tokens, cfg.shard_tokens
        last = self.shards[-1]["end"] if self.shards else None
        self.position = Position(**{**last, "skipped": dict(last["skipped"])}) if last else Position()
        self.resume_at = (last["source"], last["unit"], last["offset"]) if last else None
        self.total = sum(s["tokens"] for s in self.shards)
        self.file = None
        for p in out.glob(".*.partial"):  # a shard that a crash cut short
            p.unlink()

    def _name(self) -> tuple[str, str, int]:
        """(file, split, capacity) of the next shard."""
        if self.val_tokens and not self.shards:
            return "val_000000.bin", "val", self.val_tokens
        k = len(self.shards) - (1 if self.val_tokens else 0)
        return f"train_{k:06d}.bin", "train", self.shard_tokens

    def add(self, batch: list, encoded: tuple[np.ndarray, list[int]]) -> None:
        tokens, lengths = encoded
        at, pos = 0, self.position
        for (k, before, unit), n in zip(batch, lengths):
            pos.source, pos.bytes = k, before + unit.position
            if unit.text is None:
                pos.skipped[unit.skipped] += 1
                continue
            mine, at, done = tokens[at:at + n], at + n, 0
            if self.resume_at is not None and self.resume_at[:2] == (k, unit.index):
                done, self.resume_at = self.resume_at[2], None  # written before the restart
            elif unit.first:
                pos.documents += 1
            pos.unit = unit.index
            while done < n:
                done += self._write(mine[done:], done)
            pos.offset = n

    def _write(self, tokens: np.ndarray, done: int) -> int:
        """Write what fits of ``tokens`` (a unit's, after its first ``done``) into the current shard."""
        if self.file is None:
            self.name, self.split, self.capacity = self._name()
            self.tmp = self.out / f".{self.name}.partial"
            self.file, self.hash, self.count = open(self.tmp, "wb"), hashlib.sha256(), 0
        part = tokens[:self.capacity - self.count]
        data = part.tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.count, self.total = self.count + len(part), self.total + len(part)
        if self.count == self.capacity:
            self.position.offset = done + len(part)
            self._close()
        return len(part)

    def _close(self) -> None:
        self.file.close()
        self.file = None
        os.replace(self.tmp, self.out / self.name)
        self.shards.append({"file": self.name, "split": self.split, "tokens": self.count,
                            "sha256": self.hash.hexdigest(), "end": asdict(self.position)})
        self._write_index({"complete": False})

    def abort(self) -> None:
        """After an error or Ctrl-C: drop the unfinished shard (the finished ones stay for a resume)."""
        if self.file is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)

    def _write_index(self, extra: dict) -> dict:
        index = {**self.header, **extra, "shards": self.shards}
        atomic_write(self.out / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=1) + "\n"))
        return index

    def finish(self) -> dict:
        """Close the last shard; the complete index (refused if nothing is left for training)."""
        if self.file is not None:
            self._close()
        tokens = {split: sum(s["tokens"] for s in self.shards if s["split"] == split) for split in ("train", "val")}
        if tokens["train"] == 0:
            n = tokens["val"]
            hint = (f"give --val-tokens {n // 10} (a tenth) and delete {self.out} or give another --out" if n
                    else "give sources with some text in them")
            raise CorpusError(f"the corpus has {n:,} tokens, none left for training after the {self.val_tokens:,} "
                              f"validation tokens (--val-tokens): {hint}")
        pos = self.position
        return self._write_index({"complete": True, "tokens": tokens, "documents": pos.documents,
                                  "skipped": pos.skipped})
