"""Files on disk: run directories, atomic writes, the JSON-lines log and staged checkpoints.

A *run directory* is what one training job writes (``gpt train``, ``gpt finetune-*``; also what
``gpt lora-merge`` writes). Its rules, the same for every job:

- a new run goes into a directory that does not exist yet or is empty: a run never mixes its files with
  another run's or with anything else (:func:`check_new_run_dir`);
- ``--resume DIR`` continues the run in DIR (or copies it on into a new ``--out`` directory);
- nothing is created before every setting has been checked (:func:`create_run_dir` comes last).

Checkpoints are *staged* (:func:`save_staged`): every file is first written whole into ``DIR/.saving``;
once all are there a manifest commits the set, and only then are they renamed over the previous ones. A
full disk or a crash while writing leaves the previous checkpoint as it was; a crash during the renames
(after the commit) is finished on the next resume by :func:`recover_staged`. So a checkpoint's files
always belong to one and the same step.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

STATE_FILE = "trainer_state.pt"  # the engine's state (optimizer, step, RNG): what --resume needs
LOG_FILE = "log.jsonl"  # one JSON record per line: evaluations, samples
STAGING_DIR = ".saving"
MANIFEST = "COMMITTED"  # written into the staging directory once every file of a save is there


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``: a reader (or a
    crash) never sees half a file. The temporary file is removed if ``write`` fails. The file gets the
    permissions any new file gets (0644 under the usual umask), whoever wrote it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() makes files: some writers (safetensors) make them 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def need(path, kind: str, what: str, hint: str = "") -> Path:
    """``path``, checked to be an existing ``kind`` ("file" or "directory"). The errors name it as ``what``
    and end with ``hint`` (what to give instead): FileNotFoundError when it does not exist, ValueError when
    it is there but another kind of thing (a directory for a file, a file for a directory)."""
    path = Path(path)
    hint = f": {hint}" if hint else ""
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: check the path")
    if (path.is_file() if kind == "file" else path.is_dir()):
        return path
    other = "a directory" if path.is_dir() else "a file" if path.is_file() else "a special file (device, pipe)"
    raise ValueError(f"{what} {str(path)!r} is {other}, not a {kind}{hint}")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ run directories


def fresh_run_dir(prefix: str = "") -> Path:
    """A new ``runs/<prefix->date-time>`` path that does not exist yet (``-2``, ``-3``... on a collision)."""
    base = Path("runs") / f"{prefix + '-' if prefix else ''}{datetime.datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_new_run_dir(path, option: str = "--out") -> Path:
    """Refuse ``path`` as the directory of a new run unless it is absent or empty; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a directory: give a new directory for the run")
    if not path.exists():
        return path
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    if STATE_FILE in entries:
        raise ValueError(f"{path} already holds a training run: continue it with --resume {path}, or give "
                         f"another {option}")
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise ValueError(f"{path} is not empty (it holds {shown}): writing there could overwrite those files; "
                     f"give a new or empty directory with {option}")


def create_run_dir(path) -> Path:
    """Create the run directory and check that it is writable now, not after an hour of training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the run directory {str(path)!r} ({e.strerror or e}): "
                      f"choose another --out") from None
    return path


# ------------------------------------------------------------------------------------------ the log


class RunLog:
    """``log.jsonl``: one JSON record per line, appended as the run goes."""

    def __init__(self, path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self, up_to_step: int | None = None) -> list[dict]:
        """The records (those of steps <= ``up_to_step``); a line cut short by a crash is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to_step is None or r.get("step", 0) <= up_to_step:
                records.append(r)
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replace the log with ``records`` (a resumed run drops what came after its checkpoint)."""
        atomic_write(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in records)))


# ------------------------------------------------------------------------------------------ staged saves


def save_staged(run_dir, write: Callable[[Path], object], what: str) -> None:
    """Write a checkpoint's files through ``DIR/.saving`` (see the module's doc); ``write(staging)`` puts
    every file of the checkpoint into the staging directory. ``what`` names the checkpoint in errors."""
    run_dir = Path(run_dir)
    staging = run_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    committed = False
    try:
        staging.mkdir()
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        atomic_write(staging / MANIFEST, lambda p: p.write_text(json.dumps(names)))
        committed = True
        _move_staged(run_dir)
    except OSError as e:
        if committed:
            raise OSError(f"could not finish saving {what} in {run_dir} ({e.strerror or e}); it is complete in "
                          f"{staging} and is put in place when the run is resumed with --resume {run_dir}") from None
        raise OSError(f"could not save {what} in {run_dir} ({e.strerror or e}); the previous checkpoint there "
                      f"is intact. Free some disk space or fix the permissions, then continue with "
                      f"--resume {run_dir}") from None
    finally:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)


def _move_staged(run_dir: Path) -> None:
    staging = run_dir / STAGING_DIR
    for name in json.loads((staging / MANIFEST).read_text()):
        if (staging / name).exists():  # absent: moved before a crash
            os.replace(staging / name, run_dir / name)
    shutil.rmtree(staging)


def recover_staged(run_dir) -> bool:
    """Finish a save that was committed but cut short while renaming; drop one that never committed.
    Returns True when a committed save was put in place."""
    staging = Path(run_dir) / STAGING_DIR
    if not staging.exists():
        return False
    if (staging / MANIFEST).exists():
        _move_staged(Path(run_dir))
        return True
    shutil.rmtree(staging, ignore_errors=True)
    return False
