"""The fan-out journal: each fan-out write, on disk, until every instance has it (docs/design.md, "Fan-out writes").

One directory per balancer machine (``<Journal directory>``, by default
``journal`` beside CertDirPath), mode 0700::

    lock                  the node's fan-out lock: one write or replay at a time, all workers together
    sequence              the last sequence number given
    <seq>.body            the body of write <seq>, as the client sent it
    <seq>.json            method, target, headers, the status the instances agreed on, and the
                          instances that still owe it ("owed"), in the order writes were accepted
    diverged.json         instances whose replay was answered otherwise, with the write and the answer

A write is recorded before it is sent (body first, then its record, each
written to a temporary file, fsync-ed and renamed, then the directory
fsync-ed), so a balancer killed at any moment after that finds it at start-up
and replays it. Its record is rewritten (the same way) when instances have
it, and removed when none owes it any more. Every change is made under the
node's fan-out lock, so sequence numbers, records and the instances' order
agree. Nothing here sends anything: :mod:`app.fanout` does.

Workers ask :meth:`Journal.withheld` on every request: one ``stat`` of the
directory, and a new look at the records only when it changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import filelock

from .pins import fsync_dir, remove_stale_temporaries

log = logging.getLogger(__name__)

CATCHING_UP = "catching up"
DIVERGED = "diverged"

_RECORD = re.compile(r"(\d{12})\.json")


class JournalUnavailable(Exception):
    """The journal could not be locked or written; ``str()`` says why."""


@dataclass
class Write:
    """One fan-out write as the journal keeps it."""

    seq: int
    method: str
    target: str
    headers: list[list[str]]
    size: int
    accepted_at: float
    #: Instances (``HOST:PORT``) that still owe it.
    owed: list[str]
    #: The status the instances that answered agreed on; None until it was sent.
    status: int | None = None
    path: Path = field(default=Path(), repr=False, compare=False)

    @property
    def body_path(self) -> Path:
        return self.path.with_suffix(".body")

    def record(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "method": self.method,
            "target": self.target,
            "headers": self.headers,
            "size": self.size,
            "accepted_at": self.accepted_at,
            "status": self.status,
            "owed": self.owed,
        }


class Journal:
    """The journal directory of one balancer machine."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: tuple[int, int, int] | None = None
        self._states: dict[str, str] = {}

    # -- the node's order --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        """Hold the node's fan-out lock; :class:`JournalUnavailable` after *timeout* seconds.

        A ``filelock`` created per use (docs/design.md, "Traps"): it polls a
        non-blocking ``flock``, so a waiting greenlet yields to the others.
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = filelock.FileLock(self.directory / "lock", timeout=timeout, mode=0o600)
            lock.acquire()
        except filelock.Timeout:
            raise JournalUnavailable(
                f"another fan-out write or replay held the journal {self.directory} for {timeout:g} s"
            ) from None
        except OSError as exc:
            raise JournalUnavailable(f"the journal {self.directory} cannot be used: {exc.strerror or exc}") from None
        try:
            yield
        finally:
            lock.release()

    # -- writes ------------------------------------------------------------------------------

    def begin(self, method: str, target: str, headers: list[tuple[str, str]], body: IO[bytes] | bytes | None,
              owed: list[str]) -> Write:
        """Record a new write, owed by *owed*, durably; call under :meth:`lock`. Raises JournalUnavailable."""
        try:
            remove_stale_temporaries(self.directory, r"[^/]+")
            seq = self._last_sequence() + 1
            path = self.directory / f"{seq:012d}.json"
            write = Write(seq, method, target, [list(h) for h in headers], 0, time.time(), list(owed), None, path)
            tmp = self._temporary(write.body_path)
            with open(tmp, "wb") as f:
                if isinstance(body, bytes):
                    f.write(body)
                elif body is not None:
                    body.seek(0)
                    shutil.copyfileobj(body, f, 1024 * 1024)
                write.size = f.tell()
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, write.body_path)
            self._save(write)
            self._replace_text(self.directory / "sequence", f"{seq}\n")
            return write
        except OSError as exc:
            raise JournalUnavailable(f"the write could not be journaled in {self.directory}: {exc.strerror or exc}") from None

    def settle(self, write: Write, delivered: list[str], status: int | None = None) -> None:
        """*delivered* have *write* now (with *status*, the first time); removed once nobody owes it."""
        if status is not None:
            write.status = status
        write.owed = [name for name in write.owed if name not in delivered]
        try:
            if write.owed:
                self._save(write)
            else:
                self.discard(write)
        except OSError as exc:
            raise JournalUnavailable(f"the journal {self.directory} cannot be written: {exc.strerror or exc}") from None

    def discard(self, write: Write) -> None:
        """Forget *write*: nobody owes it (or it was never accepted)."""
        for path in (write.path, write.body_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fsync_dir(self.directory)

    def writes(self) -> list[Write]:
        """Every write still owed by someone, oldest first."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if _RECORD.fullmatch(n))
        except OSError:
            return []
        found = []
        for name in names:
            path = self.directory / name
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read())
            except FileNotFoundError:
                continue  # delivered meanwhile
            except (OSError, ValueError) as exc:
                log.error("journal record %s cannot be read (%s); it is left for the operator", path, exc)
                continue
            found.append(Write(
                int(data["seq"]), data["method"], data["target"], data["headers"], int(data["size"]),
                float(data["accepted_at"]), list(data["owed"]), data.get("status"), path,
            ))
        return found

    def counts(self) -> dict[str, int]:
        """How many writes each instance owes (instances that owe none are absent)."""
        counts: dict[str, int] = {}
        for write in self.writes():
            for name in write.owed:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def owed(self, name: str) -> list[Write]:
        """The writes instance *name* still owes, oldest first."""
        return [w for w in self.writes() if name in w.owed]

    # -- instances that may take no other request ---------------------------------------------

    def withheld(self, name: str) -> str | None:
        """``"diverged"``, ``"catching up"`` (it owes writes), or None when *name* may take requests.

        One ``stat`` of the directory per call; the records are read again only after a change.
        """
        try:
            st = os.stat(self.directory)
            seen = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:  # no journal yet, or none possible there: nothing is owed (writes get 503)
            seen = None
        if seen != self._seen:
            self._seen = seen
            self._states = self._scan() if seen is not None else {}
        return self._states.get(name)

    def _scan(self) -> dict[str, str]:
        states = {name: CATCHING_UP for write in self.writes() for name in write.owed}
        states.update({name: DIVERGED for name in self.diverged()})
        return states

    def diverged(self) -> dict[str, dict[str, Any]]:
        """Instances left out of rotation by a replay they answered otherwise, with what happened."""
        try:
            with open(self.directory / "diverged.json", "rb") as f:
                data = json.loads(f.read())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("journal file %s cannot be read (%s)", self.directory / "diverged.json", exc)
            return {}

    def mark_diverged(self, name: str, write: Write, answer: str) -> None:
        """Keep *name* out of rotation: it answered the replay of *write* with *answer*; call under :meth:`lock`."""
        states = self.diverged()
        states[name] = {"seq": write.seq, "method": write.method, "target": write.target,
                        "expected": write.status, "answer": answer, "at": time.time()}
        self._replace_text(self.directory / "diverged.json", json.dumps(states, sort_keys=True) + "\n")

    def clear_diverged(self, name: str) -> bool:
        """Let *name* be replayed again; call under :meth:`lock`. False when it was not diverged."""
        states = self.diverged()
        if states.pop(name, None) is None:
            return False
        self._replace_text(self.directory / "diverged.json", json.dumps(states, sort_keys=True) + "\n")
        return True

    # -- files ---------------------------------------------------------------------------------

    def _last_sequence(self) -> int:
        """The last sequence number given: the ``sequence`` file, or the newest record if that is older."""
        last = 0
        with contextlib.suppress(FileNotFoundError, ValueError):
            last = int((self.directory / "sequence").read_text().strip() or 0)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.directory):
                match = _RECORD.fullmatch(name)
                if match:
                    last = max(last, int(match.group(1)))
        return last

    def _save(self, write: Write) -> None:
        self._replace_text(write.path, json.dumps(write.record(), sort_keys=True) + "\n")

    def _replace_text(self, path: Path, text: str) -> None:
        """*path* holds *text* in one step, durably: temporary file, fsync, rename, directory fsync."""
        tmp = self._temporary(path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.directory)

    def _temporary(self, path: Path) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
