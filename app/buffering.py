"""Bodies held by the balancer so that instance slots serve instances, not slow clients.

A ``scanners_count`` slot is taken only once the request body has been
received whole (:class:`HeldBody`), and given back as soon as the instance
has sent its answer, which :class:`BufferedAnswer` reads off the instance at
the instance's pace while the client reads at its own (nginx's
``proxy_request_buffering`` and ``proxy_buffering``; docs/design.md,
"Hostile clients"). Both keep up to a memory bound in memory and the rest in
temporary files, whose bytes count against the worker's :class:`DiskBudget`.

Threads here are greenlets under gevent's patch; under ``flask run`` they are
threads. Nothing imports gevent or Flask.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import threading
from typing import IO, Callable, Iterator

log = logging.getLogger(__name__)


class DiskBudget:
    """The bytes of temporary files one worker may hold at once (``Limits spool_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Reserve *size* bytes; False, and nothing reserved, when that would pass the limit."""
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size


class NoRoom(Exception):
    """The worker's disk budget cannot hold more of this body now."""


class HeldBody:
    """A request body received whole: in memory up to *memory_bytes*, beyond that in a temporary file.

    Readable from its start as often as it is sent (:meth:`rewind`).
    """

    def __init__(self, memory_bytes: int, budget: DiskBudget) -> None:
        self._memory_bytes = memory_bytes
        self._budget = budget
        self._file: IO[bytes] | None = None
        self._parts: list[bytes] = []
        self._charged = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append *data*; raises :class:`NoRoom` when the disk budget cannot take it."""
        size = self.size + len(data)
        if self._file is None and size <= self._memory_bytes:
            self._parts.append(data)
        else:
            if not self._budget.take(size - self._charged):
                raise NoRoom(size)
            self._charged = size
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="ctbalancer-body-")
                self._file.writelines(self._parts)
                self._parts = []
            self._file.write(data)
        self.size = size

    def content(self) -> bytes | IO[bytes]:
        """The body to send: bytes when it fits in memory, else the file at its start."""
        if self._file is None:
            return b"".join(self._parts)
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._budget.give(self._charged)
        self._charged = 0


class BufferedAnswer:
    """An answer body as a WSGI iterable, read off the instance ahead of the client.

    A drain thread pulls *chunks* as fast as the instance sends them: into
    memory up to *memory_bytes*, then into a temporary file up to
    *disk_bytes* (and only while the worker's *budget* allows). When the
    instance has sent everything, *done* runs (the slot and connection go
    back) even though the client may still be reading. Beyond both bounds the
    drain waits for the client: the answer then streams at the client's
    pace, holding its slot, as nginx does past ``proxy_max_temp_file_size``.

    An instance error while draining is raised to the server when the client
    reaches that point, so the client sees a cut connection rather than a
    complete-looking short answer. ``close()`` (the server's, when the
    client is done or gone) stops the drain.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        done: Callable[[], None],
        memory_bytes: int,
        disk_bytes: int,
        budget: DiskBudget,
    ) -> None:
        self._chunks = chunks
        self._done_callback = done
        self._memory_bytes = memory_bytes
        self._disk_bytes = disk_bytes
        self._budget = budget
        self._ready = threading.Condition()
        self._memory: collections.deque[bytes] = collections.deque()
        self._memory_size = 0
        self._file: IO[bytes] | None = None
        self._written = 0  # bytes in the file
        self._read = 0  # bytes of the file already given to the client
        self._charged = 0
        self._finished = False
        self._closed = False
        self._error: BaseException | None = None
        self._drain = threading.Thread(target=self._pull, name="ctbalancer-answer", daemon=True)
        self._drain.start()

    # -- the drain (instance side) ---------------------------------------------------

    def _pull(self) -> None:
        try:
            for chunk in self._chunks:
                with self._ready:
                    while not self._closed and not self._store(chunk):
                        self._ready.wait()
                    if self._closed:
                        return
                    self._ready.notify_all()
        except BaseException as exc:  # handed to the client side, which raises it
            self._error = exc
        finally:
            try:
                self._done_callback()
            except Exception as exc:
                log.debug("releasing a drained answer failed: %s", exc)
            with self._ready:
                self._finished = True
                self._ready.notify_all()

    def _store(self, chunk: bytes) -> bool:
        """Keep *chunk* in memory or on disk; False when neither has room now."""
        file_unread = self._written - self._read
        if not file_unread and self._memory_size + len(chunk) <= self._memory_bytes:
            self._memory.append(chunk)
            self._memory_size += len(chunk)
            return True
        if not file_unread and self._written:
            self._rewind_file()  # the client has read all of it: reuse the space
        size = self._written + len(chunk)
        if size > self._disk_bytes or not self._budget.take(size - self._charged):
            # No room: wait for the client, unless nothing is waiting for it,
            # in which case this chunk is the next it reads anyway.
            if not self._memory and not file_unread:
                self._memory.append(chunk)
                self._memory_size += len(chunk)
                return True
            return False
        self._charged = size
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="ctbalancer-answer-")
        self._file.seek(self._written)
        self._file.write(chunk)
        self._written = size
        return True

    def _rewind_file(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self._budget.give(self._charged)
        self._charged = self._written = self._read = 0

    # -- the client side -------------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._ready:
            while True:
                if self._memory:
                    chunk = self._memory.popleft()
                    self._memory_size -= len(chunk)
                    self._ready.notify_all()
                    return chunk
                if self._read < self._written:
                    assert self._file is not None
                    self._file.seek(self._read)
                    chunk = self._file.read(min(self._written - self._read, 256 * 1024))
                    self._read += len(chunk)
                    self._ready.notify_all()
                    return chunk
                if self._finished:
                    if self._error is not None:
                        raise self._error
                    raise StopIteration
                self._ready.wait()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
            if self._file is not None:
                self._file.close()
                self._file = None
            self._budget.give(self._charged)
            self._charged = 0
            self._written = self._read = 0
