"""State shared by all workers of one balancer: its runtime directory, and node-wide instance slots.

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

import fcntl
import os
import random
import struct
import tempfile
import threading
from pathlib import Path

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
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
