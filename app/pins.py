"""The pin store: reference certificates, learned on first contact.

:class:`PinStore` is the one interface the pin check on each connection, the
live pick-up of changes, the status page, the probes and the ``pins``
commands use. It has two implementations, chosen by the configuration's
``<PinStore type>``: :class:`DirectoryStore` (CertDirPath, the default,
below) and :class:`app.fleet.EtcdStore` (one store for a fleet of balancers,
docs/design.md, "Fleet").

In the directory store, a reference is ``<CertDirPath>/<host>_<matching_port>.pem``: the instance's
leaf certificate in PEM, DER-equal to what it presented. The store

* keeps each reference in memory, so checking a new connection costs no disk
  read, and re-stats its file at most every :data:`RECHECK_INTERVAL` seconds
  (lazily, on use): a file replaced (``pins trust``, or by hand) or deleted
  (``pins forget``) bumps the reference's *generation*, and connections
  checked against an older generation are dropped by the pool
  (docs/design.md, "Reference certificates" and "Traps");
* saves a first-seen certificate atomically and only if no file exists:
  written to a temporary file, then ``os.link``-ed to its final name, which
  fails if another worker won the race; the loser compares against the
  winner's file (docs/design.md, "Reference certificates"). A saver killed half-way leaves at most a
  dot-file ending in ``.tmp``, removed by the next save of that reference;
* serialises first contacts per reference with an in-process lock (one
  greenlet or thread at a time) and, across workers and with the ``pins``
  commands, a ``filelock`` lock file created per use (:func:`reference_lock`);
* never overwrites, repairs or deletes a reference itself: only an operator
  does, through :func:`replace_reference` and :func:`delete_reference`.
"""

from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import filelock

from .errors import CertificateMismatch, ReferenceUnreadable, ReferenceUnsaved
from .settings import Config, InstanceSpec

log = logging.getLogger(__name__)

#: How long a first contact waits for another process saving the same reference.
LOCK_TIMEOUT = 10.0

#: Seconds between two looks at a reference file by one worker: a change is
#: picked up within this time, and serving costs at most one stat per
#: reference per interval, never a read per request.
RECHECK_INTERVAL = 0.5

#: The command an operator runs to accept a new certificate (shown in logs).
TRUST_COMMAND = "flask --app wsgi pins trust"

#: What the operator should do when a first certificate cannot be saved, by errno
#: (docs/design.md, "Hostile clients": a 500 must say what to fix; "make it writable" does not free a disk).
UNSAVED_HINTS = {
    errno.ENOSPC: "free space on the file system that holds CertDirPath",
    errno.EDQUOT: "the balancer's user is over its disk quota there",
    errno.EROFS: "that file system is mounted read-only: remount it read-write or set CertDirPath elsewhere",
    errno.ENOTDIR: "a part of that path is a file, not a directory: move it or set CertDirPath elsewhere",
    errno.EACCES: "the balancer's user may not write there: make it the owner of CertDirPath (mode 0700)",
    errno.EPERM: "the balancer's user may not write there: make it the owner of CertDirPath (mode 0700)",
}

_PEM_BLOCK = re.compile(
    rb"\A\s*-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+?)-----END CERTIFICATE-----\s*\Z"
)

#: What identifies one version of a file: (st_mtime_ns, st_size, st_ino).
Signature = Tuple[int, int, int]


class NotACertificate(ValueError):
    """A reference file's content is not exactly one PEM certificate."""


class StoreUnavailable(Exception):
    """The store could not be asked (etcd unreachable or without quorum); ``str()`` says why."""


def sha256(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate."""
    return hashlib.sha256(der).hexdigest()


def same_fingerprint(expected: str, received: str) -> bool:
    """Whether two hex SHA-256 fingerprints are equal, compared in constant time."""
    return hmac.compare_digest(expected.lower(), received.lower())


def der_to_pem(der: bytes) -> bytes:
    """PEM encoding of a DER certificate (64-column base64, RFC 7468)."""
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def pem_to_der(data: bytes) -> bytes:
    """The DER certificate in *data*, which must hold exactly one PEM certificate.

    Anything else (empty, truncated, two certificates, a private key, stray
    text) raises :class:`NotACertificate` with the reason.
    """
    if not data.strip():
        raise NotACertificate("the file is empty")
    if data.count(b"-----BEGIN ") > 1:
        raise NotACertificate("the file holds more than one PEM block; expected one certificate")
    match = _PEM_BLOCK.match(data)
    if not match:
        raise NotACertificate("the file is not one PEM certificate (BEGIN/END CERTIFICATE)")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error as exc:
        raise NotACertificate(f"the base64 content is damaged ({exc})") from exc
    try:
        _parse(der)
    except ValueError as exc:
        raise NotACertificate(f"the certificate cannot be parsed ({exc})") from exc
    return der


def _parse(der: bytes) -> None:
    """Raise ValueError unless *der* is exactly one X.509 certificate.

    OpenSSL, which parses the certificate an instance presents, parses the
    reference too, through the ssl module. A worker thus never loads the
    cryptography package, 8 MB of every worker's memory; the
    ``pins`` commands still use it to describe a certificate. OpenSSL would
    accept several certificates one after the other: the outer DER length
    must cover the whole of *der*.
    """
    if _der_size(der) != len(der):
        raise ValueError("not one DER certificate: its length does not match its content")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
    except ssl.SSLError as exc:
        raise ValueError(exc.reason or str(exc)) from exc


def _der_size(der: bytes) -> int:
    """The size the first DER SEQUENCE in *der* claims (tag, length and content), -1 if there is none."""
    if len(der) < 2 or der[0] != 0x30:
        return -1
    first = der[1]
    if first < 0x80:
        return 2 + first
    octets = first & 0x7F
    if not 0 < octets <= 4 or len(der) < 2 + octets:
        return -1
    return 2 + octets + int.from_bytes(der[2 : 2 + octets], "big")


def read_reference(path: Path) -> bytes:
    """DER of the reference at *path*.

    Raises :class:`FileNotFoundError` when there is none (file or directory
    missing), :class:`NotACertificate` or :class:`OSError` when it exists but
    cannot be used.
    """
    return _read_signed(path)[0]


def inspect_reference(path: Path) -> tuple[bytes | None, str | None]:
    """(DER, None) for a usable reference, (None, None) when there is none, (None, why) when it cannot be used.

    The one classification of a reference file, shared by the status page,
    the probes and the ``pins`` commands.
    """
    try:
        return read_reference(path), None
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except NotACertificate as exc:
        return None, str(exc)
    except OSError as exc:
        return None, exc.strerror or str(exc)


def _read_signed(path: Path) -> tuple[bytes, Signature]:
    """DER of the reference at *path* and the signature of the file version read."""
    with open(path, "rb") as f:
        # Signature first: a write after it changes the mtime, so the next
        # look sees a change even if this read caught the new content.
        signature = _signature(os.fstat(f.fileno()))
        data = f.read(64 * 1024 + 1)
    if len(data) > 64 * 1024:
        raise NotACertificate("the file is larger than 64 KiB; expected one certificate")
    return pem_to_der(data), signature


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def open_store(config: Config) -> "PinStore":
    """The store the configuration names: CertDirPath, or etcd when ``<PinStore type="etcd">``."""
    if config.pin_store.type == "etcd":
        from .fleet import EtcdStore  # here: a directory store never loads the etcd client

        return EtcdStore(config.pin_store)
    return DirectoryStore(config.cert_dir)


# -- operator changes, shared by the server and the ``pins`` commands ---------


def lock_path(path: Path) -> Path:
    """The lock file that serialises every change of the reference at *path*."""
    return path.parent / f".{path.name}.lock"


def acquire_reference_lock(path: Path, timeout: float = LOCK_TIMEOUT) -> filelock.BaseFileLock:
    """Take the lock file beside the reference at *path*, creating CertDirPath (0700) if needed.

    The lock object is created per use (docs/design.md, "Traps"): filelock polls a
    non-blocking ``flock`` and sleeps between tries, so under gevent a
    waiting greenlet yields instead of blocking the hub. Raises
    :class:`filelock.Timeout` or :class:`OSError`; the caller releases it.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_path(path), timeout=timeout, mode=0o600)
    lock.acquire()
    return lock


@contextlib.contextmanager
def reference_lock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock that the server's first contacts and the ``pins`` commands share."""
    lock = acquire_reference_lock(path, timeout)
    try:
        yield
    finally:
        lock.release()


def replace_reference(path: Path, der: bytes) -> None:
    """Make *path* hold *der* in one step, whatever it held before; call under :func:`reference_lock`.

    Written to a temporary file in the same directory, fsync-ed, then
    ``os.replace``-d over the old file: a reader sees the old certificate or
    the new one, never a partial file. Running workers notice the new file
    within :data:`RECHECK_INTERVAL`.
    """
    _publish(path, der, os.replace)


def link_new(path: Path, der: bytes) -> None:
    """Create *path* holding *der*, only if it does not exist (FileExistsError), never partly; under the lock.

    A fsync-ed temporary file ``os.link``-ed to its final name: the link fails
    if another worker won the race (docs/design.md, "Reference certificates").
    """
    _publish(path, der, os.link)


def _publish(path: Path, der: bytes, place: Callable[[Path, Path], None]) -> None:
    """Write *der* to a fsync-ed temporary file beside *path*, *place* it there (rename or link), fsync the directory."""
    tmp = _write_temporary(path, der)
    try:
        place(tmp, path)
    finally:
        _unlink_quietly(tmp)
    fsync_dir(path.parent)


def delete_reference(path: Path) -> bool:
    """Delete the reference at *path*, so the next contact learns again; call under :func:`reference_lock`.

    Returns False when there was no file.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def _write_temporary(path: Path, der: bytes) -> Path:
    """A fsync-ed temporary file beside *path* holding *der* in PEM; the caller links or removes it.

    Called under the reference's lock, so it first removes what savers of
    *path* that died left behind (:func:`remove_stale_temporaries`).
    """
    remove_stale_temporaries(path.parent, re.escape(path.name))
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(der_to_pem(der))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def remove_stale_temporaries(directory: Path, name_pattern: str) -> None:
    """Delete the ``.<name>.<pid>.<hex>.tmp`` files in *directory* whose process is gone; call under the lock.

    *name_pattern* is a regular expression for ``<name>``. A writer killed
    between creating its temporary file and renaming or unlinking it
    (SIGKILL, the OOM killer) leaves one behind. Its name is a dot-file
    ending in ``.tmp``, so nothing takes it for a reference or a journal
    record; removing it at the next write keeps them from piling up
    (docs/design.md, "Hostile clients"). A file whose process still runs is
    left alone.
    """
    stale = re.compile(rf"\.({name_pattern})\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return  # the write that follows reports what is wrong with the directory
    for name in names:
        match = stale.fullmatch(name)
        if match is None or _running(int(match.group(2))):
            continue
        try:
            os.unlink(directory / name)
        except OSError:
            continue  # removed by someone else, or not ours to remove
        log.warning("removed %s, left by process %s that died while saving %s", directory / name, match.group(2),
                    directory / match.group(1))


def _running(pid: int) -> bool:
    """Whether a process *pid* exists (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def loose_permissions(cert_dir: Path) -> list[str]:
    """CertDirPath and reference files that group or others may write, each with its mode.

    Whoever can write there can make the balancer trust another certificate.
    """
    found = []
    try:
        st = os.stat(cert_dir)
    except OSError:
        return found  # created 0700 at the first contact
    if st.st_mode & 0o022:
        found.append(f"{cert_dir} (mode {stat.S_IMODE(st.st_mode):04o})")
    with contextlib.suppress(OSError):
        for path in sorted(cert_dir.glob("*.pem")):
            mode = path.lstat().st_mode
            if mode & 0o022:
                found.append(f"{path} (mode {stat.S_IMODE(mode):04o})")
    return found


# -- the store a worker checks connections against ------------------------------


@dataclass(frozen=True)
class Reference:
    """A reference certificate held in memory by one worker.

    ``name`` is the reference's name in its store (``<host>_<matching_port>.pem``),
    ``location`` where it is kept, for people (a path, or an etcd key).
    ``generation`` counts the changes of the reference this worker has seen; a
    connection keeps the Reference it was checked against and asks
    :meth:`is_current` before it is reused.
    """

    name: str
    location: str
    der: bytes
    sha256: str
    generation: int = 0
    store: Optional["PinStore"] = field(default=None, repr=False, compare=False)

    def is_current(self) -> bool:
        """False once the reference was replaced or deleted (seen within a second)."""
        return self.store is None or self.store.generation(self.name) == self.generation


@dataclass(frozen=True)
class Entry:
    """What a store holds for one reference now, as the ``pins`` commands and the status page show it.

    ``der`` is None when there is no reference or it cannot be used; then
    ``problem`` says why it cannot (None: there is none). ``version``
    identifies this state of the reference: :meth:`PinStore.replace` and
    :meth:`PinStore.delete` act only if it still holds.
    """

    der: bytes | None
    problem: str | None = None
    version: Any = None

    @property
    def state(self) -> str:
        if self.problem is not None:
            return f"unreadable: {self.problem}"
        return "pinned" if self.der is not None else "not yet pinned"


class PinStore(abc.ABC):
    """Reference certificates of the instances, checked per connection (docs/design.md, "Reference certificates").

    A reference is named ``<host>_<matching_port>.pem`` (``InstanceSpec.reference_name``).
    """

    #: "directory" or "etcd", as in ``<PinStore type>``.
    kind: str

    @abc.abstractmethod
    def location(self, name: str) -> str:
        """Where reference *name* is kept, for people: a path, or ``etcd:<key>``."""

    @abc.abstractmethod
    def check(self, instance: InstanceSpec, der: bytes) -> Reference:
        """Accept *der* for *instance*, learning it when no reference exists.

        Raises a :class:`~app.errors.InstanceError` (certificate mismatch,
        reference unreadable or unsaved, store unavailable); the caller must
        then not send anything.
        """

    @abc.abstractmethod
    def generation(self, name: str) -> int:
        """How many changes of reference *name* this process has seen; cheap, called per reused connection."""

    @abc.abstractmethod
    def known(self, name: str) -> Entry:
        """The reference a new connection would be checked against now, without waiting on a remote store."""

    @abc.abstractmethod
    def look(self, name: str) -> Entry:
        """What the store holds for *name* now; raises :class:`StoreUnavailable`."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """The names of every reference in the store; raises :class:`StoreUnavailable`."""

    @abc.abstractmethod
    def create(self, name: str, der: bytes) -> tuple[bool, Entry]:
        """Make *name* hold *der* if it holds nothing: (created, what it holds now)."""

    @abc.abstractmethod
    def replace(self, name: str, der: bytes, seen: Entry) -> bool:
        """Make *name* hold *der*, only if it is still as *seen* (from :meth:`look`); False if it changed."""

    @abc.abstractmethod
    def delete(self, name: str, seen: Entry) -> bool:
        """Delete *name*, only if it is still as *seen*; False if it changed."""

    def state(self) -> dict[str, Any]:
        """The store itself, for the status page."""
        return {"type": self.kind}

    def start(self) -> None:
        """Start what keeps this worker's view current, once gevent has patched (nothing for a directory)."""

    def close(self) -> None:
        """Stop what :meth:`start` started and let go of connections (nothing for a directory)."""

    def mismatch(self, instance: InstanceSpec, ref: Reference, der: bytes, whose: str = "") -> CertificateMismatch:
        """Log the refusal of *der* at ERROR and return the error for the client (docs/design.md, "Reference certificates")."""
        received = sha256(der)
        log.error(
            "certificate mismatch for instance %s:%s: expected sha256 %s (reference %s%s), received %s; "
            "if the instance's certificate was changed on purpose, accept it with: %s %s --sha256 %s",
            instance.host,
            instance.api_port,
            ref.sha256,
            ref.location,
            whose,
            received,
            TRUST_COMMAND,
            instance.name,
            received,
        )
        return CertificateMismatch(instance.host, instance.api_port, ref.sha256, received, ref.location)


class _Watch:
    """What one worker knows about one reference file; changed only by its own greenlets."""

    __slots__ = ("reference", "signature", "checked_at", "generation")

    def __init__(self) -> None:
        self.reference: Reference | None = None
        self.signature: Signature | None = None
        self.checked_at = float("-inf")
        self.generation = 0


class DirectoryStore(PinStore):
    """Reference certificates as files in CertDirPath, one per instance."""

    kind = "directory"

    def __init__(
        self,
        cert_dir: Path,
        recheck_interval: float = RECHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cert_dir = cert_dir
        self.recheck_interval = recheck_interval
        self._clock = clock
        self._watches: dict[str, _Watch] = {}
        self._guards: dict[str, threading.Lock] = {}

    def path_for(self, instance: InstanceSpec) -> Path:
        return self.cert_dir / instance.reference_name

    def location(self, name: str) -> str:
        return str(self.cert_dir / name)

    def state(self) -> dict[str, Any]:
        return {"type": self.kind, "path": str(self.cert_dir)}

    def check(self, instance: InstanceSpec, der: bytes) -> Reference:
        ref = self._current(instance.reference_name) or self._load_or_learn(instance, der)
        if not same_fingerprint(ref.sha256, sha256(der)):
            raise self.mismatch(instance, ref, der)
        return ref

    # -- what the pins commands and the status page read and change ----------------

    def known(self, name: str) -> Entry:
        return self.look(name)

    def look(self, name: str) -> Entry:
        path = self.cert_dir / name
        try:
            der, signature = _read_signed(path)
            return Entry(der, None, signature)
        except (FileNotFoundError, NotADirectoryError):
            return Entry(None, None, None)
        except NotACertificate as exc:
            problem = str(exc)
        except OSError as exc:
            problem = exc.strerror or str(exc)
        try:
            version: Any = _signature(os.stat(path))
        except OSError:
            version = None
        return Entry(None, problem, version)

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.cert_dir.iterdir() if p.name.endswith(".pem") and not p.name.startswith("."))
        except OSError:
            return []

    def create(self, name: str, der: bytes) -> tuple[bool, Entry]:
        path = self.cert_dir / name
        with reference_lock(path):
            current = self.look(name)
            if current.der is not None or current.problem is not None:
                return False, current
            link_new(path, der)
            return True, self.look(name)

    def replace(self, name: str, der: bytes, seen: Entry) -> bool:
        path = self.cert_dir / name
        with reference_lock(path):
            if self.look(name).version != seen.version:
                return False
            replace_reference(path, der)
        return True

    def delete(self, name: str, seen: Entry) -> bool:
        path = self.cert_dir / name
        with reference_lock(path):
            if self.look(name).version != seen.version:
                return False
            return delete_reference(path)

    def generation(self, name: str) -> int:
        """The generation of reference *name*, after a look at its file if the last is old enough."""
        watch = self._watches.get(name)
        if watch is None:
            return 0
        self._recheck(name, watch)
        return watch.generation

    # -- noticing operator changes ---------------------------------------------

    def _current(self, name: str) -> Reference | None:
        """The reference in memory if its file has not changed since it was read."""
        watch = self._watches.get(name)
        if watch is None:
            return None
        self._recheck(name, watch)
        return watch.reference

    def _recheck(self, name: str, watch: _Watch) -> None:
        """Stat the file if RECHECK_INTERVAL has passed; a change starts a new generation.

        Runs without yielding under gevent (stat and a small read are plain
        syscalls), so greenlets never see a half-updated watch.
        """
        now = self._clock()
        if now - watch.checked_at < self.recheck_interval:
            return
        watch.checked_at = now
        path = self.cert_dir / name
        try:
            signature: Signature | None = _signature(os.stat(path))
        except OSError:
            signature = None
        if signature == watch.signature:
            return
        old = watch.reference
        if signature is not None and old is not None:
            # Rewritten with the same certificate (touched, copied again):
            # connections checked against it stay valid.
            with contextlib.suppress(NotACertificate, OSError):
                der, signature = _read_signed(path)
                if der == old.der:
                    watch.signature = signature
                    return
        watch.signature = signature
        watch.reference = None
        watch.generation += 1
        if old is not None:
            log.info(
                "reference certificate %s was %s; connections checked against sha256 %s will be closed",
                path,
                "deleted: the next contact learns again" if signature is None else "replaced",
                old.sha256,
            )

    # -- loading and learning --------------------------------------------------

    def _remember(self, name: str, path: Path, der: bytes, signature: Signature | None) -> Reference:
        watch = self._watches.get(name)
        if watch is None:
            watch = self._watches.setdefault(name, _Watch())
        ref = Reference(name, str(path), der, sha256(der), watch.generation, self)
        watch.reference = ref
        watch.signature = signature
        watch.checked_at = self._clock()
        return ref

    def _read(self, instance: InstanceSpec, path: Path) -> Reference:
        """The reference on disk; FileNotFoundError when there is none."""
        try:
            der, signature = _read_signed(path)
        except NotADirectoryError as exc:
            # CertDirPath (or a parent) is a file: there is no reference, and
            # learning one will fail with the reason the operator must fix.
            raise FileNotFoundError(exc.errno, exc.strerror, exc.filename) from exc
        except FileNotFoundError:
            raise
        except (NotACertificate, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("reference certificate %s of instance %s is unusable: %s", path, instance.name, reason)
            raise ReferenceUnreadable(instance.host, instance.api_port, str(path), reason) from exc
        return self._remember(instance.reference_name, path, der, signature)

    def _load_or_learn(self, instance: InstanceSpec, der: bytes) -> Reference:
        path = self.path_for(instance)
        try:
            return self._read(instance, path)
        except FileNotFoundError:
            pass
        with self._guard(instance.reference_name):
            # Another greenlet of this worker may have learned it meanwhile.
            cached = self._current(instance.reference_name)
            if cached is not None:
                return cached
            with self._file_lock(instance, path):
                try:
                    return self._read(instance, path)
                except FileNotFoundError:
                    return self._save(instance, path, der)

    def _guard(self, name: str) -> threading.Lock:
        # Created at first use, inside the worker, after gevent has patched
        # threading: a greenlet waiting here yields to the others.
        guard = self._guards.get(name)
        if guard is None:
            guard = self._guards.setdefault(name, threading.Lock())
        return guard

    @contextlib.contextmanager
    def _file_lock(self, instance: InstanceSpec, path: Path) -> Iterator[None]:
        """:func:`acquire_reference_lock`, its failures turned into ReferenceUnsaved."""
        try:
            lock = acquire_reference_lock(path)
        except filelock.Timeout as exc:
            raise ReferenceUnsaved(
                instance.host, instance.api_port, str(path), f"timed out waiting for the lock {exc.lock_file}"
            ) from exc
        except OSError as exc:
            raise self._unsaved(instance, path, exc) from exc
        try:
            yield
        finally:
            lock.release()

    def _save(self, instance: InstanceSpec, path: Path, der: bytes) -> Reference:
        """Create *path* holding *der*, only if absent; never a partial file."""
        try:
            link_new(path, der)
            signature = _signature(os.stat(path))
        except FileExistsError:
            # Created by someone who does not take our lock (an operator, or
            # another host sharing the directory): compare against theirs.
            return self._read(instance, path)
        except OSError as exc:
            raise self._unsaved(instance, path, exc) from exc
        ref = self._remember(instance.reference_name, path, der, signature)
        log.info(
            "learned reference certificate of instance %s:%s: %s sha256 %s",
            instance.host,
            instance.api_port,
            path,
            ref.sha256,
        )
        from . import metrics  # here: app.metrics reads references through this module

        metrics.PIN_LEARNED.labels(instance.name).inc()
        return ref

    def _unsaved(self, instance: InstanceSpec, path: Path, exc: OSError) -> ReferenceUnsaved:
        reason = f"{exc.strerror or exc} ({exc.filename or path})"
        if exc.errno in UNSAVED_HINTS:
            reason += f"; {UNSAVED_HINTS[exc.errno]}"
        log.error("cannot save reference certificate %s of instance %s: %s", path, instance.name, reason)
        return ReferenceUnsaved(instance.host, instance.api_port, str(path), reason)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make the names created, renamed or removed in directory *path* durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
