"""State shared by all workers of one balancer: its runtime directory, node-wide slots and health.

``scanners_count`` caps the requests the whole node has in flight to one
instance (docs/design.md, "One balancer per machine"). Slot *i* of an
instance is a POSIX record lock on byte *i* of the instance's slot file in
the runtime directory: the kernel drops a process's record locks when it
exits, however it exits, so a worker killed with SIGKILL in the middle of
requests frees its slots without anyone's help. A counter that a process
decrements on its way out would leak exactly then.

Record locks belong to a process, not to a thread or greenlet, and locking
a byte the process already holds succeeds: each worker keeps the set of
bytes it holds and tries only the others. The worker keeps its slot files
open for its whole life, because closing any descriptor of a file drops all
of the process's locks on it.

The runtime directory is created by the gunicorn master (``gunicorn.conf.py``,
:func:`runtime_directory`) and named to the workers in :data:`ENV_VAR`;
without it (``flask run``, one process) slots are the process's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

#: The environment variable that names the runtime directory to the workers.
ENV_VAR = "CTBALANCER_RUNTIME_DIR"

#: How often a request waiting for a slot looks again for one that another worker freed.
POLL_SECONDS = 0.02

# struct flock on Linux (64-bit off_t): l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
_FLOCK = "hh4xqqi4x"


def runtime_directory(environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """The directory for this node's shared files, created private (mode 0700); raises OSError.

    systemd's ``RuntimeDirectory=`` gives ``$RUNTIME_DIRECTORY`` (the unit
    sets it); elsewhere a new directory under the temporary directory.
    """
    environ = os.environ if environ is None else environ
    given = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if given:
        path = Path(given) / "shared"
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path
    return Path(tempfile.mkdtemp(prefix="ctbalancer-"))


def node_directory() -> Path | None:
    """The runtime directory the master named to this worker, if any."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


def open_shared(path: Path) -> int:
    """A descriptor of the shared file *path*, created if missing, kept open by the caller.

    The runtime directory may have been removed under a running balancer (a
    temporary-files cleaner, a careless ``rm``): it is made again, private,
    and said in the log, rather than every request failing.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        log.warning("the runtime directory %s was removed; making it again (use systemd's RuntimeDirectory=)", path.parent)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(path, flags, 0o600)


class NodeSlots:
    """``scanners_count`` slots of one instance, shared by every worker of the node.

    The same interface as :class:`app.selection.Slots`; *freed* is still
    notified on release, for the requests of this worker that wait.
    """

    def __init__(self, path: Path, count: int, freed: threading.Condition) -> None:
        self.path = path
        self.count = count
        self._freed = freed
        self._fd: int | None = None
        self._mine: list[int] = []
        self.poll = POLL_SECONDS
        # Where to look first: a random place at start, then the byte this worker freed
        # last; the bytes other workers hold are mostly elsewhere, and each failed try is
        # a system call.
        self._start = random.randrange(count)

    def _file(self) -> int:
        if self._fd is None:  # opened in the worker, on first use, and kept open (see the module docstring)
            self._fd = open_shared(self.path)
        return self._fd

    def try_acquire(self) -> bool:
        with self._freed:
            fd = self._file()
            for offset in range(self.count):
                byte = (self._start + offset) % self.count
                if byte in self._mine:
                    continue
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte, os.SEEK_SET)
                except (BlockingIOError, PermissionError):
                    continue
                self._mine.append(byte)
                self._start = (byte + 1) % self.count
                return True
            return False

    def release(self) -> None:
        with self._freed:
            byte = self._mine.pop()
            fcntl.lockf(self._file(), fcntl.LOCK_UN, 1, byte, os.SEEK_SET)
            self._start = byte  # free now, and likely still free at this worker's next request
            self._freed.notify_all()

    @property
    def in_flight(self) -> int:
        """Requests in flight to the instance from the whole node: this worker's and the others' locks."""
        with self._freed:
            fd = self._file()
            held = len(self._mine)
            for byte in range(self.count):
                if byte in self._mine:
                    continue
                probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
                answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
                if struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK:
                    held += 1
            return held


#: Health files whose trial this process holds (see NodeState.claim_trial).
_TRIALS_HERE: set[Path] = set()


class NodeState:
    """The health fields of one instance (:class:`app.health.LocalState`'s), kept for the whole node.

    A fixed record at the start of the instance's health file, with a CRC so
    that a read racing a write is read again. Changes are made under a record
    lock on one byte beyond the record (held for a read, a change and a write,
    never across a request); the half-open trial is a lock on the next byte,
    taken without waiting and held by the worker whose request is the trial:
    if that worker dies, the kernel drops it and another request becomes the
    trial. Like the slots, the file stays open for the worker's life.
    """

    _RECORD = struct.Struct("<BdBd240s")
    _UPDATE_BYTE = 4096
    _TRIAL_BYTE = 4097
    _STATES = ("up", "failed", "mismatch")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._trial_mine = False
        self._prober_mine = False
        self.state = "up"
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = open_shared(self.path)
        return self._fd

    def read(self) -> None:
        size = self._RECORD.size + 4
        for _ in range(5):
            data = os.pread(self._file(), size, 0)
            if len(data) < size or not any(data):
                return  # nothing written yet: up
            payload, crc = data[:-4], int.from_bytes(data[-4:], "little")
            if zlib.crc32(payload) == crc:
                break
        else:
            return  # kept changing under us: keep what was read last
        state, retry_at, has_error, error_at, error = self._RECORD.unpack(payload)
        self.state = self._STATES[state] if state < len(self._STATES) else "up"
        self.retry_at = retry_at
        self.last_error = error.rstrip(b"\0").decode("utf-8", "replace") if has_error else None
        self.last_error_at = error_at if has_error else None

    def _write(self) -> None:
        error = (self.last_error or "").encode("utf-8")[:240]
        payload = self._RECORD.pack(
            self._STATES.index(self.state),
            self.retry_at,
            self.last_error is not None,
            self.last_error_at or 0.0,
            error,
        )
        os.pwrite(self._file(), payload + zlib.crc32(payload).to_bytes(4, "little"), 0)

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        fd = self._file()
        # Blocking, but only for another worker's read-change-write of a few microseconds;
        # the caller holds its Health's in-process lock, so no greenlet of this worker waits here.
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, self._UPDATE_BYTE, os.SEEK_SET)
        try:
            self.read()
            yield
            self._write()
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, self._UPDATE_BYTE, os.SEEK_SET)

    _PROBER_BYTE = 4098

    def claim_prober(self) -> bool:
        """Whether this worker probes the instance for the node: the first to lock a byte, until it dies."""
        if not self._prober_mine:
            try:
                fcntl.lockf(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._PROBER_BYTE, os.SEEK_SET)
            except (BlockingIOError, PermissionError):
                return False
            self._prober_mine = True
        return True

    def claim_trial(self) -> bool:
        # Record locks do not exclude within one process: this process's trials are kept here too.
        if self._trial_mine or self.path in _TRIALS_HERE:
            return False
        try:
            fcntl.lockf(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._TRIAL_BYTE, os.SEEK_SET)
        except (BlockingIOError, PermissionError):
            return False
        self._trial_mine = True
        _TRIALS_HERE.add(self.path)
        return True

    def end_trial(self) -> None:
        if self._trial_mine:
            self._trial_mine = False
            _TRIALS_HERE.discard(self.path)
            fcntl.lockf(self._file(), fcntl.LOCK_UN, 1, self._TRIAL_BYTE, os.SEEK_SET)

    def trial_taken(self) -> bool:
        if self._trial_mine or self.path in _TRIALS_HERE:
            return True
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, self._TRIAL_BYTE, 1, 0)
        answer = fcntl.fcntl(self._file(), fcntl.F_GETLK, probe)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


# -- the node's live workers ------------------------------------------------------------------

_registration: int | None = None


def register_worker(directory: Path) -> None:
    """Say that this process is a live worker: a lock on its ``worker-<pid>`` file, held for its life."""
    global _registration
    if _registration is not None:
        return
    fd = open_shared(directory / f"worker-{os.getpid()}")
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
    _registration = fd


def live_workers(directory: Path) -> list[int]:
    """The pids of the node's live workers; the files of dead ones (their lock dropped) are removed."""
    live = []
    for entry in directory.glob("worker-*"):
        try:
            pid = int(entry.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            live.append(pid)
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
            held = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK
        finally:
            os.close(fd)  # a file this process never locks: closing it drops nothing
        if held:
            live.append(pid)
        else:
            try:
                entry.unlink()
            except FileNotFoundError:
                pass
    return sorted(live)
