"""The pin store: reference certificates in CertDirPath, learned on first contact.

A reference is ``<CertDirPath>/<host>_<matching_port>.pem``: the instance's
leaf certificate in PEM, DER-equal to what it presented. The store

* reads a reference once per worker and keeps it in memory, so checking a new
  connection costs no disk read;
* saves a first-seen certificate atomically and only if no file exists:
  written to a temporary file, then ``os.link``-ed to its final name, which
  fails if another worker won the race; the loser compares against the
  winner's file (DESIGN section 7);
* serialises first contacts per reference with an in-process lock (one
  greenlet or thread at a time) and, across workers, a ``filelock`` lock file
  created per use;
* never overwrites, repairs or deletes a reference.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import filelock
from cryptography import x509

from .config import InstanceSpec
from .errors import CertificateMismatch, ReferenceUnreadable, ReferenceUnsaved

log = logging.getLogger(__name__)

#: How long a first contact waits for another process saving the same reference.
LOCK_TIMEOUT = 10.0

_PEM_BLOCK = re.compile(
    rb"\A\s*-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+?)-----END CERTIFICATE-----\s*\Z"
)


class NotACertificate(ValueError):
    """A reference file's content is not exactly one PEM certificate."""


def sha256(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate."""
    return hashlib.sha256(der).hexdigest()


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
        x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise NotACertificate(f"the certificate cannot be parsed ({exc})") from exc
    return der


def read_reference(path: Path) -> bytes:
    """DER of the reference at *path*.

    Raises :class:`FileNotFoundError` when there is none (file or directory
    missing), :class:`NotACertificate` or :class:`OSError` when it exists but
    cannot be used.
    """
    with open(path, "rb") as f:
        data = f.read(64 * 1024 + 1)
    if len(data) > 64 * 1024:
        raise NotACertificate("the file is larger than 64 KiB; expected one certificate")
    return pem_to_der(data)


@dataclass(frozen=True)
class Reference:
    """A reference certificate held in memory."""

    path: Path
    der: bytes
    sha256: str


class PinStore:
    """Reference certificates of the instances, checked per connection."""

    def __init__(self, cert_dir: Path) -> None:
        self.cert_dir = cert_dir
        self._references: dict[str, Reference] = {}
        self._guards: dict[str, threading.Lock] = {}

    def path_for(self, instance: InstanceSpec) -> Path:
        return self.cert_dir / instance.reference_name

    def check(self, instance: InstanceSpec, der: bytes) -> Reference:
        """Accept *der* for *instance*, learning it when no reference exists.

        Raises :class:`CertificateMismatch`, :class:`ReferenceUnreadable` or
        :class:`ReferenceUnsaved`; the caller must then not send anything.
        """
        ref = self._references.get(instance.reference_name) or self._load_or_learn(instance, der)
        received = sha256(der)
        if not hmac.compare_digest(ref.sha256, received):
            log.error(
                "certificate mismatch for instance %s:%s: expected sha256 %s (reference %s), received %s",
                instance.host,
                instance.api_port,
                ref.sha256,
                ref.path,
                received,
            )
            raise CertificateMismatch(instance.host, instance.api_port, ref.sha256, received, str(ref.path))
        return ref

    # -- loading and learning --------------------------------------------------

    def _remember(self, name: str, path: Path, der: bytes) -> Reference:
        ref = Reference(path=path, der=der, sha256=sha256(der))
        self._references[name] = ref
        return ref

    def _read(self, instance: InstanceSpec, path: Path) -> Reference:
        """The reference on disk; FileNotFoundError when there is none."""
        try:
            der = read_reference(path)
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
        return self._remember(instance.reference_name, path, der)

    def _load_or_learn(self, instance: InstanceSpec, der: bytes) -> Reference:
        path = self.path_for(instance)
        try:
            return self._read(instance, path)
        except FileNotFoundError:
            pass
        with self._guard(instance.reference_name):
            # Another greenlet of this worker may have learned it meanwhile.
            cached = self._references.get(instance.reference_name)
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
        """Hold the lock file beside the reference, created per use (DESIGN section 7).

        filelock polls a non-blocking ``flock`` and sleeps between tries: under
        gevent the sleep yields, so a waiting greenlet never blocks the hub.
        """
        lock = filelock.FileLock(self.cert_dir / f".{path.name}.lock", timeout=LOCK_TIMEOUT, mode=0o600)
        try:
            self.cert_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock.acquire()
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
        tmp = self.cert_dir / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(der_to_pem(der))
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)
            finally:
                _unlink_quietly(tmp)
            _fsync_dir(self.cert_dir)
        except FileExistsError:
            # Created by someone who does not take our lock (an operator, or
            # another host sharing the directory): compare against theirs.
            return self._read(instance, path)
        except OSError as exc:
            raise self._unsaved(instance, path, exc) from exc
        ref = self._remember(instance.reference_name, path, der)
        log.info(
            "learned reference certificate of instance %s:%s: %s sha256 %s",
            instance.host,
            instance.api_port,
            path,
            ref.sha256,
        )
        return ref

    def _unsaved(self, instance: InstanceSpec, path: Path, exc: OSError) -> ReferenceUnsaved:
        reason = f"{exc.strerror or exc} ({exc.filename or path})"
        log.error("cannot save reference certificate %s of instance %s: %s", path, instance.name, reason)
        return ReferenceUnsaved(instance.host, instance.api_port, str(path), reason)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
