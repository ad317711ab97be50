"""Reading a corpus for ``gpt prepare-data``: which files, what each holds, and its documents one by one.

A source is a text file (one document), a JSON-lines file (one document per line, in the field ``field``)
or a Parquet file (one document per row, in the column ``field``; FineWeb's format, read with pyarrow, an
optional dependency); text and JSON lines may be compressed (``.gz``, ``.bz2``, ``.xz``). A folder stands
for every such file under it, in sorted order.

Each file is read as a sequence of *units*, numbered from 0 within the file: a JSON line, a Parquet row,
or a piece of a text file. A text file is one document, read in pieces of about ``PIECE_CHARS`` characters
so that memory stays bounded whatever its size; the pieces are cut only where a non-space character is
followed by a space character, which GPT-2's pre-tokenizer never joins, so the tokens of the pieces are
those of the whole text (tested). A unit's number is where ``prepare-data`` resumes: the same file read
again gives the same units.

Before anything is tokenized every file is checked once (:func:`inspect`): it can be read to its end
(a truncated gzip fails here, not after hours of work), its size and SHA-256 go into the index, a text
file is UTF-8 (or it is skipped whole), a Parquet file has the column.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import json
import lzma
import re
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .tokenizer import not_utf8

KINDS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
         ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
UNSUPPORTED = (".zst", ".zstd", ".lz4", ".zip", ".7z", ".tar", ".br", ".snappy")
READ_BYTES = 1 << 18  # bytes read at a time
PIECE_CHARS = 1 << 20  # a text file's pieces are about this long (the cut is at the last space before it)
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space: the pre-tokenizer's \s (Python's isspace also
# counts \x1c-\x1f, which the pre-tokenizer may join with the character before)
_CUT = re.compile(f"[^{WHITESPACE}](?=[{WHITESPACE}])")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate


class CorpusError(UserError):
    """A source that cannot be used as it is: the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text", "jsonl" or "parquet"
    compression: str | None  # ".gz", ".bz2", ".xz" or None

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.kind, "compression": self.compression}


@dataclass(frozen=True)
class SourceInfo:
    """What :func:`inspect` found out about a source."""

    size: int  # bytes on disk
    sha256: str
    bad_text: str | None = None  # a text file that is not UTF-8: why (it is skipped whole, or refused)
    row_groups: tuple[int, ...] = ()  # a Parquet file's rows per row group


def _kind(path: Path) -> tuple[str | None, str | None]:
    """(kind, compression) from a file name; kind None for a file that is none of the kinds."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    if suffixes and suffixes[-1] in UNSUPPORTED:
        raise CorpusError(f"{path}: {suffixes[-1]} files cannot be read: decompress it first (or recompress it "
                          f"with gzip)")
    kind = KINDS.get(suffixes[-1]) if suffixes else None
    if kind == "parquet" and compression:
        raise CorpusError(f"{path}: a compressed Parquet file cannot be read: decompress it (Parquet compresses "
                          f"its columns itself)")
    return kind, compression


def find_sources(paths) -> list[Source]:
    """The sources named by ``paths``: files as given (a file of another name is read as text) and, for a
    folder, every text, JSON-lines and Parquet file under it (hidden ones left out), sorted."""
    if not paths:
        raise CorpusError("no sources given: name text, JSON-lines or Parquet files, or folders of them")
    found: list[Source] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            inside = [(q, *_kind(q)) for q in files]
            inside = [Source(q.resolve(), kind, comp) for q, kind, comp in inside if kind]
            if not inside:
                raise CorpusError(f"folder {str(p)!r} holds no text (.txt), JSON-lines (.jsonl, .json) or Parquet "
                                  f"(.parquet) files")
            found.extend(inside)
        elif p.exists() or p.is_symlink():
            kind, comp = _kind(p)
            found.append(Source(p.resolve(), kind or "text", comp))
        else:
            raise CorpusError(f"source {str(p)!r} does not exist: check the path")
    seen = set()
    for s in found:
        if s.path in seen:
            raise CorpusError(f"{s.path} is named twice among the sources: give each file once")
        seen.add(s.path)
    return found


# ------------------------------------------------------------------------------------------ checking


def _open_raw(path: Path):
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise CorpusError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror or e}") from None


def _stream(src: Source, raw):
    """The decompressed bytes of a source as a binary file object (the raw file itself if not compressed)."""
    return COMPRESSIONS[src.compression](fileobj=raw) if src.compression else raw


def _corrupt(src: Source, e: Exception) -> CorpusError:
    what = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}.get(src.compression or "", "")
    why = "it ends early (truncated)" if isinstance(e, EOFError) else str(e) or type(e).__name__
    return CorpusError(f"{src.path} is not a readable {what} file ({why}): download or compress it again")


def inspect(src: Source, field: str, strict: bool) -> SourceInfo:
    """Check a source before anything is tokenized (see the module's doc); its size and SHA-256."""
    digest, size = hashlib.sha256(), 0
    with _open_raw(src.path) as raw:
        while block := raw.read(READ_BYTES):
            digest.update(block)
            size += len(block)
    bad, groups = None, ()
    if src.kind == "parquet":
        groups = _parquet_groups(src, field)
    if src.kind == "jsonl":  # the first record has the field (a wrong --field fails now, not after a shard)
        with _open_raw(src.path) as raw:
            try:
                next(_json_units(src, _stream(src, raw), raw, field, strict, 0), None)
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
                raise _corrupt(src, e) from None
    if src.compression or src.kind == "text":
        bad = _read_through(src)
        if bad and strict:
            raise CorpusError(f"{bad}; --strict refuses it (without --strict it is skipped and counted)")
    return SourceInfo(size=size, sha256=digest.hexdigest(), bad_text=bad, row_groups=groups)


def _read_through(src: Source) -> str | None:
    """Decompress the whole source (a corrupt file fails here); for a text file, why it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")() if src.kind == "text" else None
    offset, lines = 0, 1
    with _open_raw(src.path) as raw:
        f = _stream(src, raw)
        try:
            while block := f.read(READ_BYTES):
                if decoder is not None:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as e:  # e.object: the bytes held back + this block
                        decoder = None
                        held = len(e.object) - len(block)
                        return str(not_utf8(str(src.path), e.object, e, offset - held, lines)).split(". Convert")[0]
                    offset, lines = offset + len(block), lines + block.count(b"\n")
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise _corrupt(src, e) from None
    if decoder is not None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"{src.path} is not UTF-8 text: it ends in the middle of a character"
    return None


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow, which is not installed: pip install 'gpt-triton[parquet]' "
                          "(or pip install pyarrow)") from None
    return pq


def _parquet_groups(src: Source, field: str) -> tuple[int, ...]:
    pq = _parquet()
    import pyarrow as pa

    try:
        f = pq.ParquetFile(src.path)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{src.path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = f.schema_arrow
    if field not in schema.names:
        raise CorpusError(f"{src.path} has no column {field!r} (its columns: {', '.join(schema.names)}): name the "
                          f"text column with --field")
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        raise CorpusError(f"{src.path}: column {field!r} holds {t}, not text: name the text column with --field")
    return tuple(f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups))


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Unit:
    """One unit of a source (see the module's doc)."""

    index: int  # its number within the file
    text: str | None  # None: a document skipped (``skipped`` says why)
    first: bool  # starts a document (gets the separator)
    position: int  # how far into the file (bytes on disk) reading has come, for the progress bar
    skipped: str | None = None  # "not_utf8" or "null"


def read_units(src: Source, info: SourceInfo, field: str, strict: bool, start: int = 0) -> Iterator[Unit]:
    """The units of ``src`` numbered ``start`` and on (see the module's doc)."""
    if src.kind == "parquet":
        yield from _parquet_units(src, info, field, strict, start)
        return
    if src.kind == "text" and info.bad_text:
        if start == 0:
            yield Unit(0, None, True, info.size, "not_utf8")
        return
    with _open_raw(src.path) as raw:
        f = _stream(src, raw)
        try:
            if src.kind == "text":
                yield from text_pieces(f, raw, start)
            else:
                yield from _json_units(src, f, raw, field, strict, start)
        except (EOFError, zlib.error, lzma.LZMAError) as e:
            raise _corrupt(src, e) from None


def text_pieces(f, raw, start: int = 0, piece_chars: int = PIECE_CHARS) -> Iterator[Unit]:
    """A UTF-8 text file's pieces (its units), cut where the tokens of the pieces are those of the whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, index = "", 0
    while True:
        block = f.read(READ_BYTES)
        text += decoder.decode(block, final=not block)
        if index == 0:
            text = text.removeprefix("\ufeff")  # a byte-order mark is no text
        while cut := len(text) if not block else _cut(text, piece_chars):
            if index >= start:
                yield Unit(index, text[:cut], index == 0, raw.tell())
            index, text = index + 1, text[cut:]
        if not block:
            if index == 0 and start == 0:  # an empty file: an empty document
                yield Unit(0, "", True, raw.tell())
            return


def _cut(text: str, piece_chars: int) -> int:
    """Where to end the next piece of ``text``, once it is ``piece_chars`` long: after the last non-space
    character followed by a space up to there (or else the first one after); 0 to read on."""
    if len(text) < piece_chars:
        return 0
    for lo, hi in ((max(0, piece_chars - 4096), piece_chars), (0, piece_chars)):
        last = deque(_CUT.finditer(text, lo, hi + 1), maxlen=1)  # hi + 1: the space may be the next character
        if last:
            return last[0].end()
    m = _CUT.search(text, piece_chars)
    return m.end() if m else 0


def _json_units(src: Source, f, raw, field: str, strict: bool, start: int) -> Iterator[Unit]:
    for index, line in enumerate(f):
        if index < start or not line.strip():
            continue
        where = f"{src.path}:{index + 1}"
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise CorpusError(f"{where}: not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                  f"--strict refuses it (without --strict it is skipped and counted)") from None
            yield Unit(index, None, True, raw.tell(), "not_utf8")
            continue
        try:
            record = json.loads(s)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): each line must be one JSON "
                              f"object") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: a JSON {type(record).__name__}, not an object: each line must be one JSON "
                              f"object with a {field!r} field")
        if field not in record:
            raise CorpusError(f"{where}: no field {field!r} (its fields: {', '.join(map(str, record)) or 'none'}): "
                              f"name the text field with --field")
        text = record[field]
        if text is None:
            yield Unit(index, None, True, raw.tell(), "null")
            continue
        if not isinstance(text, str):
            raise CorpusError(f"{where}: field {field!r} holds a JSON {type(text).__name__}, not a string")
        if _SURROGATE_ESCAPE.search(line) and not _encodes(text):
            if strict:
                raise CorpusError(f"{where}: field {field!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                                  f"which is not UTF-8 text; --strict refuses it (without --strict it is skipped "
                                  f"and counted)")
            yield Unit(index, None, True, raw.tell(), "not_utf8")
            continue
        yield Unit(index, text, True, raw.tell())


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parquet_units(src: Source, info: SourceInfo, field: str, strict: bool, start: int) -> Iterator[Unit]:
    pq = _parquet()
    total = max(1, sum(info.row_groups))
    first_group, row = 0, 0  # the first row group holding a row >= start, and its first row
    while first_group < len(info.row_groups) and row + info.row_groups[first_group] <= start:
        row += info.row_groups[first_group]
        first_group += 1
    f = pq.ParquetFile(src.path)
    groups = list(range(first_group, len(info.row_groups)))
    for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[field]):
        for value in _binary(batch.column(0)):
            index, row = row, row + 1
            if index < start:
                continue
            position = info.size * row // total
            if value is None:
                yield Unit(index, None, True, position, "null")
                continue
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as e:
                if strict:
                    raise CorpusError(f"{src.path}: row {index}: not UTF-8 (byte 0x{value[e.start]:02x} at offset "
                                      f"{e.start}); --strict refuses it (without --strict it is skipped and "
                                      f"counted)") from None
                yield Unit(index, None, True, position, "not_utf8")
                continue
            yield Unit(index, text, True, position)


def _binary(column) -> list:
    """A Parquet text column's values as bytes (None for nulls): decoded here, one by one, so that a row that
    is not UTF-8 is skipped alone."""
    import pyarrow as pa

    return column.cast(pa.large_binary()).to_pylist()
