"""The run directory (``output_dir``): the files unialign owns in it, one run at a time, safe writes.

This module is the one place that knows which names unialign writes in a run directory
(:data:`OWNED_NAMES`, :func:`is_owned`). A run first claims the folder (:func:`claim_run_dir`):

- the folder must be new, empty, or already a unialign run folder (it holds :data:`RUN_MARKER`);
  any other folder is refused unless ``overwrite_output_dir`` is set, and even then a file unialign
  did not write is never replaced or deleted;
- an exclusive lock (``fcntl.flock`` on :data:`LOCK_FILE`, which records the holder's pid, host and
  start time) keeps a second run out for as long as the first one lives. The operating system drops
  the lock when its process dies, so a killed run's lock is simply taken over.

Writes that fail because the disk is full or a permission is missing become a :class:`StorageError`,
one line naming the file (:func:`storage_errors`). The final model is written to
:data:`PARTIAL_MODEL_DIR` and renamed into place once complete (:func:`publish_model_dir`).
Imports only the standard library and safetensors, so every other module may use it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from safetensors import SafetensorError

from unialign import jsonfile

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs cannot be locked against each other there
    fcntl = None

logger = logging.getLogger(__name__)

RUN_MARKER = "unialign_run.json"
LOCK_FILE = ".unialign.lock"
RUN_CONFIG = "config.json"
DATA_REPORT = "data_report.txt"
METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
REF_LOGPS_FILE = "ref_logps.safetensors"
MODEL_DIR = "model"
PARTIAL_MODEL_DIR = ".model.partial"
PREVIOUS_MODEL_DIR = ".model.previous"
PLOTS_DIR = "plots"
CHECKPOINT_MARKER = "unialign_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
OWNED_NAMES = frozenset(
    {RUN_MARKER, LOCK_FILE, RUN_CONFIG, DATA_REPORT, METRICS_FILE, COMPLETIONS_FILE, REF_LOGPS_FILE, MODEL_DIR,
     PARTIAL_MODEL_DIR, PREVIOUS_MODEL_DIR, PLOTS_DIR}
)
_TEMP_RE = re.compile(r"^\..+\.tmp$")  # the temporary files of checkpoints.atomic_write_bytes

# A write that fails with an error carrying no errno (torch.save's RuntimeError, safetensors' SafetensorError)
# while less than this is free on the device is reported as out of space.
LOW_SPACE_BYTES = 64 * 2**20


class RunDirError(OSError):
    """``output_dir`` cannot be used: another run holds it, or it holds files unialign did not write.

    Nothing was written. The CLI prints the message as one line and exits with :attr:`exit_code` (3).
    """

    exit_code = 3


class StorageError(RunDirError):
    """Writing the run directory failed: no space left on the device, or permission denied.

    The message names the file and says which checkpoint is the last complete one. Exit code 4.
    """

    exit_code = 4


def is_owned(name: str) -> bool:
    """Whether unialign writes an entry called ``name`` directly under a run directory."""
    return name in OWNED_NAMES or bool(CHECKPOINT_RE.match(name) or _TEMP_RE.match(name))


# ----------------------------------------------------------------------------- which folders may be used
def check_output_dir(output_dir: Path, overwrite: bool = False) -> None:
    """Raise :class:`RunDirError` (writing nothing) unless a run may write into ``output_dir``.

    Usable: a folder that does not exist, an empty one (a left-over lock file counts as nothing), or a
    unialign run folder (it holds :data:`RUN_MARKER`, or, from versions before it, unialign's run config
    and metrics file and no weights). Any other folder holds files unialign did not
    write (a model, a tokenizer, anything) and is refused; with ``overwrite`` it is used, unless one of
    its entries has a name unialign writes (it would be overwritten).
    """
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise RunDirError(f"output_dir {output_dir} is a file, not a folder")
    names = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_FILE)
    if not names or RUN_MARKER in names or _earlier_unialign_run(output_dir):
        return
    kind = "a model" if _looks_like_model(output_dir) else "files unialign did not write"
    if not overwrite:
        raise RunDirError(
            f"output_dir {output_dir} already holds {kind} ({_listing(names)}) and is not a unialign run folder "
            f"(it has no {RUN_MARKER}); choose a new or empty folder, or set overwrite_output_dir: true to write "
            "the run beside these files"
        )
    clashes = [name for name in names if is_owned(name)]
    if clashes:
        raise RunDirError(
            f"output_dir {output_dir} holds {kind} that unialign did not write, and the run would overwrite "
            f"{_listing(clashes)}; even with overwrite_output_dir: true unialign never replaces files it did not "
            "write: choose a new or empty folder"
        )


def _earlier_unialign_run(folder: Path) -> bool:
    """A run folder of a unialign version that wrote no :data:`RUN_MARKER`: its run config, no weights beside it."""
    try:
        config = json.loads((folder / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    run_config = isinstance(config, dict) and {"loss_type", "output_dir"} <= config.keys()
    return run_config and (folder / METRICS_FILE).is_file() and not _looks_like_model(folder)


def _looks_like_model(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    weights = any(n.endswith((".safetensors", ".bin", ".pt", ".gguf")) for n in names)
    return weights or any(n.startswith("tokenizer") for n in names)


def _listing(names: list[str], shown: int = 5) -> str:
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head}, … ({len(names)} in all)"


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive, non-blocking lock on a run directory, held by one process at a time.

    The lock file is never deleted while anyone may use it, and an acquired lock is checked to be on
    the file that is at the path now, so a lock on an unlinked file never counts.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirError` naming the process that holds it."""
        if fcntl is None:
            logger.warning("file locks are not available here: %s is not protected from a second run", self.path)
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd, wait=True)
                os.close(fd)
                raise RunDirError(
                    f"output_dir {self.path.parent} is in use by another unialign run ({_describe(holder)}); wait "
                    "for it to finish or choose another output_dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd, wait=False)
        if previous and previous.get("host") == socket.gethostname() and not _alive(previous.get("pid")):
            logger.info("taking over the lock of %s: pid %s is no longer running", self.path, previous.get("pid"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (jsonfile.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the next run in (the file stays; its content is the last holder's)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int, wait: bool) -> dict | None:
    # The holder writes its details right after locking: give it a moment.
    for _ in range(20 if wait else 1):
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            holder = None
        if isinstance(holder, dict):
            return holder
        if wait:
            time.sleep(0.05)
    return None


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "pid unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


_HELD: set[str] = set()


@contextmanager
def claim_run_dir(output_dir: str | Path, overwrite: bool = False, main_process: bool = True) -> Iterator[None]:
    """Hold ``output_dir`` for a run: check it may be used, lock it, mark it as a unialign run folder.

    Only the process that writes the run folder (``main_process``; process 0 under torchrun) claims it;
    the others pass through. Claiming a folder this process already holds does nothing, so the offline
    and online entry points can both claim. On the way in it also tidies what a killed final save left
    (:func:`recover_model_dir`). On the way out the lock is released; a folder this call created and in
    which nothing else was written is removed again.
    """
    output_dir = Path(output_dir)
    key = os.path.realpath(output_dir)
    if not main_process or key in _HELD:
        yield
        return
    check_output_dir(output_dir, overwrite)
    created = not output_dir.exists()
    lock = RunLock(output_dir)
    with storage_errors(f"creating {output_dir}", output_dir, "nothing was written"):
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        with storage_errors(f"starting the run in {output_dir}", output_dir, "nothing was trained"):
            if not (output_dir / RUN_MARKER).exists():
                info = {"written_by": "unialign", "created": _now(), "host": socket.gethostname(), "pid": os.getpid()}
                (output_dir / RUN_MARKER).write_text(jsonfile.dumps(info) + "\n", encoding="utf-8")
            recover_model_dir(output_dir)
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        try:
            untouched = created and {p.name for p in output_dir.iterdir()} <= {RUN_MARKER, LOCK_FILE}
        except OSError:
            untouched = False
        if untouched:
            (output_dir / RUN_MARKER).unlink(missing_ok=True)
            (output_dir / LOCK_FILE).unlink(missing_ok=True)  # still locked: a run that opened it retries
            lock.release()
            try:
                output_dir.rmdir()
            except OSError:
                pass
        else:
            lock.release()


# ----------------------------------------------------------------------------- the final model folder
def publish_model_dir(output_dir: Path) -> Path:
    """Move the completely written :data:`PARTIAL_MODEL_DIR` to :data:`MODEL_DIR`; returns the latter.

    The files are flushed to disk first. An earlier run's ``model/`` is moved aside and deleted only
    after the new folder is in place; a kill between the two renames leaves it in
    :data:`PREVIOUS_MODEL_DIR`, which the next claim puts back.
    """
    output_dir = Path(output_dir)
    partial, final, previous = (output_dir / n for n in (PARTIAL_MODEL_DIR, MODEL_DIR, PREVIOUS_MODEL_DIR))
    for path in sorted(partial.rglob("*")):
        if path.is_file():
            _fsync(path)
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(partial, final)
    _fsync(output_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def recover_model_dir(output_dir: Path) -> None:
    """Undo what a killed final save left: a half-written :data:`PARTIAL_MODEL_DIR`, a model moved aside."""
    output_dir = Path(output_dir)
    partial, final, previous = (output_dir / n for n in (PARTIAL_MODEL_DIR, MODEL_DIR, PREVIOUS_MODEL_DIR))
    if previous.is_dir() and not final.exists():
        os.replace(previous, final)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- write errors
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)


def storage_problem(err: BaseException, where: Path) -> tuple[str, str | None] | None:
    """``(problem, file)`` when ``err`` is a full disk or a refused permission, else ``None``.

    ``OSError`` says so by its errno. torch and safetensors report a failed write as a ``RuntimeError``
    or ``SafetensorError`` with no errno: those count as a full disk when less than
    :data:`LOW_SPACE_BYTES` is free where ``where`` lives.
    """
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in _NO_SPACE:
            return "no space left on device", err.filename
        if err.errno in _DENIED:
            return "permission denied", err.filename
        if err.errno == errno.EROFS:
            return "permission denied (read-only file system)", err.filename
    if isinstance(err, (OSError, RuntimeError, SafetensorError)) and free_bytes(where) < LOW_SPACE_BYTES:
        return "no space left on device", None
    return None


def free_bytes(where: Path) -> int:
    """Bytes free to this user on the device holding ``where`` (or its nearest existing parent)."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return LOW_SPACE_BYTES  # unknown: do not call it a full disk


@contextmanager
def storage_errors(
    doing: str, where: Path, consequence: str | Callable[[], str], cleanup: Path | None = None
) -> Iterator[None]:
    """Turn a full disk or a refused permission inside the block into one :class:`StorageError` line.

    ``doing`` says what was being written (``"saving checkpoint-4"``), ``where`` is the folder written to,
    ``consequence`` (text, or a function called after the clean-up) says what state that leaves;
    ``cleanup`` is a folder of unialign's removed first, so no half-written copy stays behind. Any other
    error passes through unchanged.
    """
    try:
        yield
    except RunDirError:
        raise
    except Exception as err:
        found = storage_problem(err, where)
        if found is None:
            raise
        problem, filename = found
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        target = f"could not write {filename}" if filename else f"could not write into {where}"
        detail = "" if filename else f" ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        after = consequence() if callable(consequence) else consequence
        raise StorageError(f"{problem}: {target} while {doing}{detail}; {after}") from err
