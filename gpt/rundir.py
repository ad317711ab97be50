"""Files on disk: run directories, atomic writes, the JSON-lines log and staged checkpoints.

A *run directory* is what one training job writes (``gpt train``, ``gpt finetune-*``; also what
``gpt lora-merge`` writes). Its rules, the same for every job:

- a new run goes into a directory that does not exist yet or is empty: a run never mixes its files with
  another run's or with anything else (:func:`gpt.trainer_state.check_new_run_dir`, which knows a run's
  checkpoint when it sees one);
- ``--resume DIR`` continues the run in DIR (or copies it on into a new ``--out`` directory);
- nothing is created before every setting has been checked (:func:`create_run_dir` comes last);
- one command at a time writes a run directory: it holds the directory (:func:`hold_run_dir`) from the
  moment it creates or resumes it until it ends, and a second command is refused, naming the first's
  process; a new run's directory is checked once more once held (:func:`gpt.trainer_state.claim_run_dir`),
  since another run may have started in it after the first check;
- a run that fails before its first checkpoint leaves nothing behind (:func:`discard_run_dir`), so the
  same ``--out`` can be given again.

Checkpoints are *staged* (:func:`save_staged`): every file is first written whole into ``DIR/.saving``;
once all are there a manifest commits the set, and only then are they renamed over the previous ones. A
full disk or a crash while writing leaves the previous checkpoint as it was; a crash during the renames
(after the commit) is finished on the next resume by :func:`recover_staged`. So a checkpoint's files
always belong to one and the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock(2); run directories are not guarded there
    fcntl = None

LOG_FILE = "log.jsonl"  # one JSON record per line: evaluations, samples
STAGING_DIR = ".saving"
_TMP_MARK = ".tmp-"  # atomic_write's temporary file beside NAME: .NAME.tmp-PID
MANIFEST = "COMMITTED"  # written into the staging directory once every file of a save is there
_held: dict[tuple[int, int], int] = {}  # (device, inode) of each run directory this process holds -> depth


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``: a reader (or a
    crash) never sees half a file. The temporary file is removed if ``write`` fails. The file gets the
    permissions any new file gets (0644 under the usual umask), whoever wrote it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() makes files: some writers (safetensors) make them 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_writes(directory) -> list[str]:
    """Delete the temporary files that :func:`atomic_write` left in ``directory`` when its process was killed
    between writing and renaming (``.NAME.tmp-PID``); returns their names. Only the holder of the directory
    (:func:`hold_run_dir`) may call it: no other process is writing there then."""
    gone = []
    for p in Path(directory).glob(f".*{_TMP_MARK}*"):
        if p.name.rpartition(_TMP_MARK)[2].isdigit() and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


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
    raise UserError(f"{what} {str(path)!r} is {other}, not a {kind}{hint}")


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



@contextlib.contextmanager
def hold_run_dir(path):
    """Hold the existing run directory ``path`` for the block: an exclusive flock(2) on the directory itself,
    so nothing is written for it and it ends with the process (a killed run leaves no stale lock). Another
    process asking for it meanwhile gets a ValueError naming this one. Re-entrant within a process. Once
    held, the half-written temporary files of a killed earlier holder are removed (:func:`remove_stale_writes`)."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino)
    if fcntl is None or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path} is being written by {_lock_holder(st)}, another command still running: wait "
                        f"for it to end, or give another directory") from None
    _held[key] = 1
    try:
        remove_stale_writes(path)
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def _lock_holder(st: os.stat_result) -> str:
    """"process N", the holder of the flock on the file with status ``st`` (from Linux's /proc/locks)."""
    me = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2370423 0 EOF"
                fields = line.split()
                if "FLOCK" in fields and me in fields and "->" not in fields:
                    return f"process {fields[fields.index(me) - 1]}"
    except OSError:
        pass
    return "another process"


def discard_run_dir(path: Path, created: bool) -> None:
    """Remove what a run wrote into ``path``, and ``path`` itself if the run ``created`` it."""
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if created:
        with contextlib.suppress(OSError):
            path.rmdir()


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


def save_staged(run_dir, write: Callable[[Path], object], what: str, size: int | None = None,
                fresh: bool = True) -> None:
    """Write a checkpoint's files through ``DIR/.saving`` (see the module's doc); ``write(staging)`` puts
    every file of the checkpoint into the staging directory. ``what`` names the checkpoint in errors, and
    ``size`` (bytes, about) is what a full disk is told it needs. ``fresh=False``: the staging directory
    exists and already holds part of the checkpoint (written by other processes), kept."""
    run_dir = Path(run_dir)
    staging = run_dir / STAGING_DIR
    if fresh:
        shutil.rmtree(staging, ignore_errors=True)
    committed = False
    try:
        staging.mkdir(exist_ok=not fresh)
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        atomic_write(staging / MANIFEST, lambda p: p.write_text(json.dumps(names)))
        committed = True
        _move_staged(run_dir)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's "[enforce fail at inline_container.cc]"
        if committed:
            raise OSError(f"could not finish saving {what} in {run_dir} ({_reason(e)}); it is complete in "
                          f"{staging} and is put in place when the run is resumed with --resume {run_dir}") from None
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free
        full = getattr(e, "errno", None) == errno.ENOSPC
        if full or (size and free < size):  # torch.save says only "unexpected pos": the free space tells
            need = f", and a checkpoint takes about {size / 1e6:,.1f} MB" if size else ""
            raise OSError(f"could not save {what} in {run_dir}: the disk is full ({e.strerror + '; ' if full else ''}"
                          f"{free / 1e6:,.1f} MB free{need}); the previous checkpoint there is intact. Free some "
                          f"space, then continue with --resume {run_dir}") from None
        if not isinstance(e, OSError):
            raise
        raise OSError(f"could not save {what} in {run_dir} ({_reason(e)}); the previous checkpoint there "
                      f"is intact. Free some disk space or fix the permissions, then continue with "
                      f"--resume {run_dir}") from None
    finally:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested in dicts, lists and tuples): about what saving them takes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def _move_staged(run_dir: Path) -> None:
    staging = run_dir / STAGING_DIR
    for name in json.loads((staging / MANIFEST).read_text()):
        if (staging / name).exists():  # absent: moved before a crash
            if (staging / name).is_dir() and (run_dir / name).is_dir():  # (a directory is not renamed over one)
                shutil.rmtree(run_dir / name)
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
