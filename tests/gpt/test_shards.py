"""gpt prepare-data on corpora the tests write: text, JSON lines, Parquet, gzip; a few hundred KB each.

The shards decode back to the documents with a separator before each; the same inputs give the same bytes
(whatever the number of threads); a run killed with SIGKILL resumes without touching its finished shards
and ends equal to a straight run; memory does not grow with the corpus; each bad input gets one line.
"""

import gzip
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gpt.cli import main
from gpt.corpus import text_pieces
from gpt.shards import INDEX_FILE, PrepareConfig, prepare_data
from gpt.tokenizer import EOT_TOKEN, get_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the a of and to in is was for on that with as by it from at he she they über naïve café 東京 日本語 "
         "🙂 — “quoted” don't it's we've 1234 3.14 $5 #tag <|endoftext|> e-mail").split()
SPACES = [" ", " ", " ", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u3000", "\x1c", "   "]


def document(rng: random.Random, words: int) -> str:
    parts = []
    for _ in range(words):
        parts += [rng.choice(WORDS), rng.choice(SPACES)]
    return "".join(parts)[:rng.randint(0, 10 * words + 1)]


def write_corpus(root: Path, rng: random.Random, scale: int = 1) -> tuple[list[str], list[str]]:
    """Sources of every kind under ``root`` (names sort in the order written); their documents in order."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    texts = [document(rng, rng.randint(200, 3000)) for _ in range(3)]
    for i, t in enumerate(texts):
        (root / f"a{i}.txt").write_text(t, encoding="utf-8")
    docs += texts
    lines = [document(rng, rng.randint(0, 120)) for _ in range(300 * scale)]
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for t in lines:
            f.write(json.dumps({"id": rng.random(), "text": t}, ensure_ascii=rng.random() < 0.5) + "\n")
    docs += lines
    gz = [document(rng, rng.randint(0, 120)) for _ in range(200)]
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in gz))  # no newline at the end
    docs += gz
    gz_text = document(rng, 2000)
    with gzip.open(root / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write(gz_text)
    docs.append(gz_text)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [document(rng, rng.randint(0, 120)) for _ in range(300)]
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), root / "e.parquet", row_group_size=70)
    docs += rows
    return [str(root)], docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sources, docs = write_corpus(root / "src", random.Random(1))
    return root, sources, docs


def shard_tokens(out: Path) -> np.ndarray:
    index = json.loads((out / INDEX_FILE).read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in index["shards"]])


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_shards_decode_to_the_documents_each_after_a_separator(corpus):
    root, sources, docs = corpus
    out = root / "out"
    index = prepare_data(PrepareConfig(sources=sources, out=str(out), shard_tokens=7_000, val_tokens=3_001,
                                       workers=2), say=lambda *a: None)
    enc = get_tokenizer()
    tokens = shard_tokens(out)
    assert enc.decode(tokens.tolist()) == "".join(EOT_TOKEN + d for d in docs)
    assert (tokens == enc.eot_token).sum() == len(docs)  # "<|endoftext|>" inside a document is plain text
    expected = np.concatenate([np.concatenate([[enc.eot_token], enc.encode_ordinary(d)]) for d in docs])
    assert np.array_equal(tokens, expected)  # each document tokenized as a whole, text files in pieces too
    shards = index["shards"]
    assert [s["split"] for s in shards] == ["val"] + ["train"] * (len(shards) - 1)
    assert shards[0]["tokens"] == 3_001 and all(s["tokens"] == 7_000 for s in shards[1:-1])
    assert index["tokens"] == {"val": 3_001, "train": len(tokens) - 3_001} and index["documents"] == len(docs)
    for s in shards:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    kinds = {Path(s["path"]).name: (s["format"], s["compression"]) for s in index["sources"]}
    assert kinds == {"a0.txt": ("text", None), "a1.txt": ("text", None), "a2.txt": ("text", None),
                     "b.jsonl": ("jsonl", None), "c.jsonl.gz": ("jsonl", ".gz"), "d.txt.gz": ("text", ".gz"),
                     "e.parquet": ("parquet", None)}
    for s in index["sources"]:
        data = Path(s["path"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert index["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert index["settings"] == {"field": "text", "shard_tokens": 7_000, "val_tokens": 3_001, "strict": False}


def test_text_pieces_tokenize_as_the_whole_text():
    """The cut between two pieces is never inside a pre-token: the pieces' tokens are the whole text's."""
    rng = random.Random(7)
    text = document(rng, 5000)
    raw = io.BytesIO(text.encode("utf-8"))
    pieces = [u.text for u in text_pieces(raw, raw, piece_chars=300)]
    assert len(pieces) > 20 and "".join(pieces) == text
    enc = get_tokenizer()
    assert sum((enc.encode_ordinary(p) for p in pieces), []) == enc.encode_ordinary(text)
    raw = io.BytesIO(text.encode("utf-8"))  # read again from piece 7 on (a resume): the same pieces
    assert [u.text for u in text_pieces(raw, raw, start=7, piece_chars=300)] == pieces[7:]


def test_a_run_resumed_after_any_finished_shard_equals_a_straight_run(corpus, tmp_path):
    """Resume points inside every kind of source: text, JSON lines, gzip, Parquet row groups. The half-written
    files that a kill leaves are gone afterwards (the folder equals a straight run's, byte for byte)."""
    root, sources, _ = corpus
    cfg = dict(sources=sources, shard_tokens=3_000, val_tokens=1_000, workers=2)
    straight = tmp_path / "straight"
    index = prepare_data(PrepareConfig(out=str(straight), **cfg), say=lambda *a: None)
    shards = index["shards"]
    ends = {Path(index["sources"][s["end"]["source"]]["path"]).name for s in shards}
    assert {"a0.txt", "b.jsonl", "c.jsonl.gz", "d.txt.gz", "e.parquet"} <= ends
    assert any(0 < s["end"]["offset"] for s in shards)  # shards that end inside a document
    for k in range(1, len(shards), 3):
        out = tmp_path / f"after{k}"
        out.mkdir()
        for s in shards[:k]:
            (out / s["file"]).write_bytes((straight / s["file"]).read_bytes())
        partial = {key: v for key, v in index.items() if key not in ("tokens", "documents", "skipped")}
        (out / INDEX_FILE).write_text(json.dumps({**partial, "complete": False, "shards": shards[:k]}))
        # what a kill leaves too: the next shard half written, and the index's next version never renamed
        (out / f".{shards[k]['file']}.partial").write_bytes((straight / shards[k]["file"]).read_bytes()[:999])
        (out / f".{INDEX_FILE}.tmp-{4_194_305 + k}").write_text(json.dumps(index)[:k * 100])
        said = []
        prepare_data(PrepareConfig(out=str(out), **cfg), say=said.append)
        assert said[0] == f"resuming after {k} finished shard(s) in {out}"
        assert files(out) == files(straight), k


def test_the_same_inputs_give_the_same_bytes_whatever_the_threads(corpus, tmp_path):
    root, sources, _ = corpus
    runs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        prepare_data(PrepareConfig(sources=sources, out=str(out), shard_tokens=5_000, val_tokens=2_000,
                                   workers=workers), say=lambda *a: None)
        runs.append(files(out))
    assert runs[0] == runs[1] and len(runs[0]) > 5


def test_a_finished_folder_is_left_alone_and_other_settings_are_refused(corpus, tmp_path, capsys):
    root, sources, _ = corpus
    out = tmp_path / "out"
    cfg = PrepareConfig(sources=sources, out=str(out), shard_tokens=20_000, val_tokens=1_000, workers=1)
    prepare_data(cfg, say=lambda *a: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["prepare-data", *sources, "--out", str(out), "--shard-tokens", "20000", "--val-tokens", "1000"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["prepare-data", *sources, "--out", str(out), "--shard-tokens", "30000", "--val-tokens", "1000"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "shard_tokens: 20000 before, 30000 now" in err and "another --out" in err


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *(env or {}).pop("PYTHONPATH", "").split(
        os.pathsep), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "gpt", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_killed_run_resumes_without_redoing_its_finished_shards(tmp_path):
    sources, _ = write_corpus(tmp_path / "src", random.Random(3), scale=6)
    args = [*sources, "--shard-tokens", "4000", "--val-tokens", "1000", "--workers", "1"]
    straight = tmp_path / "straight"
    assert _cli(["prepare-data", *args, "--out", str(straight)]).wait(timeout=300) == 0

    out = tmp_path / "killed"
    proc = _cli(["prepare-data", *args, "--out", str(out)])
    deadline = time.time() + 120
    kept = {}
    while time.time() < deadline and proc.poll() is None:
        try:
            index = json.loads((out / INDEX_FILE).read_text())
        except (OSError, ValueError):
            continue
        if len(index["shards"]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    index = json.loads((out / INDEX_FILE).read_text())  # as the kill left it: only whole shards are listed
    assert not index["complete"] and 3 <= len(index["shards"]) < len(json.loads((straight / INDEX_FILE).read_text())
                                                                    ["shards"])
    kept = {s["file"]: (out / s["file"]).stat() for s in index["shards"]}

    rerun = _cli(["prepare-data", *args, "--out", str(out)])
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-2000:]
    assert f"resuming after {len(kept)} finished shard(s)" in stdout
    assert "tokenizing" in stderr and "tokens/s" in stderr  # the progress bar: bytes (with an ETA) and tokens/s
    for name, st in kept.items():  # the same files, never rewritten
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert files(out) == files(straight)  # shards and index byte for byte


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from gpt.shards import PrepareConfig, prepare_data
    corpus, out = sys.argv[2:]
    def run(source, out):
        prepare_data(PrepareConfig(sources=[source], out=out, shard_tokens=50_000, val_tokens=0, workers=2),
                     say=lambda *a: None, batch_chars=16_384)  # 6 tasks in flight: about 100,000 characters
    with open(corpus) as f, open(out + ".warm.jsonl", "w") as g:
        g.writelines(line for _, line in zip(range(200), f))
    run(out + ".warm.jsonl", out + "-warm")  # everything imported and allocated once, on a small corpus
    base = int(open("/proc/self/statm").read().split()[1]) * 4096
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    run(corpus, out)
    peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(json.dumps({"growth": peak - base}))
""")


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
    """Peak memory of a corpus 8 times as big grows by less than 2x (after imports and first allocations)."""
    rng = random.Random(5)
    growth = {}
    for scale in (1, 8):
        src = tmp_path / f"src{scale}.jsonl"
        with open(src, "w") as f:
            for _ in range(1_500 * scale):  # ~0.5 MB of text per scale
                f.write(json.dumps({"text": document(rng, 100)}) + "\n")
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(REPO), str(src), str(tmp_path / f"o{scale}")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[scale] = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    floor = 2 << 20  # allocator noise (a run that keeps its batches grows by ~20 MB at 8x, ~2 MB at 1x)
    assert growth[8] < 2 * max(growth[1], floor), growth


def one_line(err: str, command: str) -> bool:
    """The error is one line on stderr (after any progress bar), with no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"gpt {command}: error: ")]
    return len(lines) == 1 and err.endswith(lines[0] + "\n") and "Traceback" not in err


def _bad_inputs(d: Path) -> dict:
    """name -> (sources, extra options, what the one line says)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "ok.jsonl").write_text('{"text": "fine"}\n' * 3)
    (d / "gone.txt").symlink_to(d / "nowhere.txt")
    data = gzip.compress(b'{"text": "hello"}\n' * 5000)
    (d / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), d / "body.parquet")
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')
    (d / "latin1.txt").write_bytes(b"one line\ncaf\xe9 au lait\n")
    (d / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    (d / "late.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    (d / "array.json").write_text('[{"text": "a"}]\n')
    return {
        "missing file": ([str(d / "nope.jsonl")], [], "nope.jsonl' does not exist"),
        "unreadable file": ([str(d / "gone.txt")], [], "cannot read"),
        "truncated gzip": ([str(d / "cut.jsonl.gz")], [], "is not a readable gzip file (it ends early"),
        "parquet without the field": ([str(d / "body.parquet")], [], "has no column 'text' (its columns: id, body)"),
        "not UTF-8, strict": ([str(d / "latin1.jsonl")], ["--strict"], "latin1.jsonl:2: not UTF-8 (byte 0xe9"),
        "text not UTF-8, strict": ([str(d / "latin1.txt")], ["--strict"], "latin1.txt is not UTF-8 text: byte 0xe9 "
                                   "at byte offset 12 (line 2)"),
        "not JSON": ([str(d / "broken.jsonl")], [], "broken.jsonl:2: not valid JSON"),
        "no field on a later line": ([str(d / "ok.jsonl"), str(d / "late.jsonl")], [], "late.jsonl:3: no field 'text' "
                                     "(its fields: body)"),
        "a JSON array": ([str(d / "array.json")], [], "array.json:1: a JSON list, not an object"),
        "zstd": ([str(d / "x.jsonl.zst")], [], ".zst files cannot be read"),
        "unknown tokenizer": ([str(d / "ok.jsonl")], ["--tokenizer", "gpt5"], "'gpt5' is not a tiktoken encoding"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "unreadable file", "truncated gzip", "parquet without the field", "not UTF-8, strict",
    "text not UTF-8, strict", "not JSON", "no field on a later line", "a JSON array", "zstd", "unknown tokenizer"])
def test_each_bad_input_gets_one_line(tmp_path, capsys, case):
    (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    sources, options, says = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    assert main(["prepare-data", *sources, "--out", str(out), "--val-tokens", "0", *options]) == 1
    err = capsys.readouterr().err
    assert one_line(err, "prepare-data") and says in err, err
    assert not out.exists()  # refused before anything was written (or cleaned up: no shard was finished)


def test_documents_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    _bad_inputs(tmp_path)
    out = tmp_path / "out"
    index = prepare_data(PrepareConfig(sources=[str(tmp_path / "latin1.jsonl"), str(tmp_path / "latin1.txt"),
                                                str(tmp_path / "ok.jsonl")], out=str(out), val_tokens=0),
                         say=lambda *a: None)
    assert index["skipped"] == {"not_utf8": 2, "null": 0} and index["documents"] == 5
    text = get_tokenizer().decode(shard_tokens(out).tolist())
    assert text == EOT_TOKEN + "ok" + EOT_TOKEN + "fine" + (EOT_TOKEN + "fine") * 3


def test_without_pyarrow_parquet_gets_one_line_naming_the_extra(tmp_path):
    fake = tmp_path / "fake"
    (fake / "pyarrow").mkdir(parents=True)
    (fake / "pyarrow" / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    proc = _cli(["prepare-data", str(tmp_path / "data.parquet"), "--out", str(tmp_path / "out")],
                env={"PYTHONPATH": str(fake)})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and one_line(err, "prepare-data"), err
    assert "reading Parquet needs pyarrow, which is not installed: pip install 'gpt-triton[parquet]'" in err


def test_a_tokenizer_whose_ids_do_not_fit_uint16_gets_one_line(tmp_path):
    """A tiktoken plugin encoding (as a user would install one) with ids past 65,535."""
    plugin = tmp_path / "plugin" / "tiktoken_ext"
    plugin.mkdir(parents=True)
    (plugin / "big_ids.py").write_text(textwrap.dedent("""
        def big():
            from gpt.tokenizer import GPT2_PATTERN, get_tokenizer
            return {"name": "big", "pat_str": GPT2_PATTERN, "mergeable_ranks": get_tokenizer()._mergeable_ranks,
                    "special_tokens": {"<|endoftext|>": 100_276}}
        ENCODING_CONSTRUCTORS = {"big": big}
    """))
    (tmp_path / "a.txt").write_text("hello")
    proc = _cli(["prepare-data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "big"],
                env={"PYTHONPATH": str(plugin.parent)})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and one_line(err, "prepare-data"), err
    assert "tokenizer 'big' has token ids up to 100,276, which do not fit the uint16 shards" in err
