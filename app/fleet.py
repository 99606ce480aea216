"""The shared pin store: reference certificates in etcd, one trust for a fleet of balancers.

docs/design.md, "Fleet". Each reference is one key,
``<prefix>/pins/<host>_<matching_port>``, whose value is a JSON object with
``pem`` (the certificate) and ``sha256`` (hex of its DER), plus who learned
it and when. Every worker of every balancer

* keeps every reference in memory and checks new connections against it,
  with no request to etcd; a background watcher keeps that copy current:
  a full read, then a watch from the revision after it, for
  :data:`RESYNC_INTERVAL` seconds, then again. A watch is only a hint (it can
  miss changes around compaction or a lost leader): whatever happens to it,
  the next full read puts the copy right. A change bumps the reference's
  generation, and pooled connections checked against the old certificate
  are closed before their next request, as with files;
* learns a first contact with one transaction that creates the key only if
  it does not exist; the losers of the race, on this machine or another,
  get the winner's certificate in the same answer and compare against it.
  A transaction that timed out may have been applied: it is sent again to
  the next endpoint, where the same condition makes it harmless, and the
  certificate it returns is compared like any other;
* goes on checking against the references it holds while etcd cannot be
  reached; an instance it holds none for gets 503 ``pin_store_unavailable``
  and nothing is sent. Nothing is ever learned locally instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from .errors import PinStoreUnavailable, ReferenceUnreadable
from .etcd import Compacted, Etcd, EtcdRefused, EtcdUnavailable, Event, KeyValue
from .pins import Entry, NotACertificate, PinStore, Reference, StoreUnavailable, der_to_pem, pem_to_der, same_fingerprint, sha256
from .settings import InstanceSpec, PinStoreSpec

log = logging.getLogger(__name__)

#: Seconds between two full reads of the store by one worker's watcher; the
#: watch in between brings changes within a fraction of a second.
RESYNC_INTERVAL = 5.0

#: Seconds the watcher waits before trying again after etcd could not be reached.
RETRY_DELAY = 0.5

#: The largest value accepted as a reference (a certificate is a few KiB).
MAX_VALUE_BYTES = 64 * 1024


def encode(der: bytes) -> bytes:
    """The value stored for the certificate *der*."""
    return json.dumps(
        {
            "pem": der_to_pem(der).decode("ascii"),
            "sha256": sha256(der),
            "learned_by": f"{socket.gethostname()} pid {os.getpid()}",
            "learned_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        },
        sort_keys=True,
    ).encode()


def decode(value: bytes) -> tuple[bytes, str]:
    """(DER, who learned it) of a stored value; :class:`NotACertificate` when it cannot be used."""
    if len(value) > MAX_VALUE_BYTES:
        raise NotACertificate(f"the value is larger than {MAX_VALUE_BYTES // 1024} KiB; expected one certificate")
    try:
        data = json.loads(value)
    except ValueError:
        raise NotACertificate("the value is not JSON; expected an object with pem and sha256") from None
    if not isinstance(data, dict) or not isinstance(data.get("pem"), str) or not isinstance(data.get("sha256"), str):
        raise NotACertificate("the value has no pem and sha256 strings; expected an object with both")
    der = pem_to_der(data["pem"].encode("ascii", "replace"))
    if not same_fingerprint(data["sha256"], sha256(der)):
        raise NotACertificate(f"its sha256 {data['sha256'][:64]!r} is not the fingerprint of its pem ({sha256(der)})")
    return der, str(data.get("learned_by", "an unknown balancer"))


class EtcdStore(PinStore):
    """Reference certificates in etcd, shared by every balancer that names the same endpoints and prefix."""

    kind = "etcd"

    def __init__(
        self,
        spec: PinStoreSpec,
        resync_interval: float = RESYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.resync_interval = resync_interval
        self._clock = clock
        self.etcd = Etcd(
            spec.endpoints,
            spec.timeout,
            ca_file=str(spec.ca_file) if spec.ca_file else None,
            cert_file=str(spec.cert_file) if spec.cert_file else None,
            key_file=str(spec.key_file) if spec.key_file else None,
            user=spec.user,
            password=spec.password,
        )
        #: What this worker checks against, by reference name.
        self._refs: dict[str, Reference] = {}
        #: References whose stored value cannot be used, with the reason.
        self._problems: dict[str, str] = {}
        #: Who learned each reference (from its value), for the mismatch log.
        self._origins: dict[str, str] = {}
        #: The etcd revision at which each name's state above was seen.
        self._seen: dict[str, int] = {}
        self._generations: dict[str, int] = {}
        self._guards: dict[str, threading.Lock] = {}
        #: The last failed attempt to learn each name: (when, why).
        self._failed: dict[str, tuple[float, str]] = {}
        self._started = False
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        #: None until etcd was first asked; then whether the last request succeeded.
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.revision = 0

    # -- names -----------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.spec.pins_prefix + name.removesuffix(".pem")

    def name(self, key: str) -> str:
        return key[len(self.spec.pins_prefix) :] + ".pem"

    def location(self, name: str) -> str:
        return f"etcd:{self.key(name)}"

    def state(self) -> dict[str, Any]:
        state = "unknown" if self.reachable is None else "reachable" if self.reachable else "unreachable"
        return {
            "type": self.kind,
            "endpoints": list(self.spec.endpoints),
            "prefix": self.spec.prefix,
            "state": state,
            "revision": self.revision,
            "references": len(self._refs),
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }

    # -- the check on each new connection ------------------------------------------------

    def check(self, instance: InstanceSpec, der: bytes) -> Reference:
        self.start()
        name = instance.reference_name
        ref = self._refs.get(name) or self._learn(instance, der)
        if not same_fingerprint(ref.sha256, sha256(der)):
            whose = f", learned first by {self._origins.get(name, 'another balancer')} and shared by the fleet"
            raise self.mismatch(instance, ref, der, whose)
        return ref

    def generation(self, name: str) -> int:
        return self._generations.get(name, 0)

    def _learn(self, instance: InstanceSpec, der: bytes) -> Reference:
        """The stored reference of *instance*, created holding *der* if there is none."""
        name = instance.reference_name
        if name in self._problems:
            raise ReferenceUnreadable(instance.host, instance.api_port, self.location(name), self._problems[name])
        waiting_since = self._clock()
        guard = self._guards.get(name) or self._guards.setdefault(name, threading.Lock())
        with guard:  # one request to etcd per worker and reference; the others wait for its answer
            ref = self._refs.get(name)
            if ref is not None:
                return ref
            failed = self._failed.get(name)
            if failed is not None and failed[0] >= waiting_since:
                # Asked while this greenlet waited, and failed: do not make each waiting request wait again.
                raise self._unavailable(instance, failed[1])
            try:
                created, kv = self.etcd.create(self.key(name), encode(der))
            except (EtcdUnavailable, EtcdRefused) as exc:
                self._failed[name] = (self._clock(), str(exc))
                self._lost(f"first contact with {instance.name}: {exc}", "learn")
                raise self._unavailable(instance, str(exc)) from exc
            self._found()
            self._apply(name, kv)
            if name in self._problems:
                raise ReferenceUnreadable(instance.host, instance.api_port, self.location(name), self._problems[name])
            ref = self._refs[name]
            if created:
                log.info(
                    "learned reference certificate of instance %s:%s for the fleet: %s sha256 %s",
                    instance.host,
                    instance.api_port,
                    self.location(name),
                    ref.sha256,
                )
                from . import metrics  # here: app.metrics reads references through app.pins

                metrics.PIN_LEARNED.labels(instance.name).inc()
            return ref

    def _unavailable(self, instance: InstanceSpec, reason: str) -> PinStoreUnavailable:
        log.error(
            "no reference certificate of instance %s known and the pin store cannot be reached: %s; nothing sent",
            instance.name,
            reason,
        )
        retry_after = max(1, math.ceil(self.spec.timeout * len(self.spec.endpoints)))
        return PinStoreUnavailable(instance.host, instance.api_port, self.location(instance.reference_name), reason, retry_after)

    # -- this worker's copy --------------------------------------------------------------

    def _apply(self, name: str, kv: KeyValue | None, revision: int = 0, deleted: bool = False) -> None:
        """Record what *name* holds as of *kv*'s revision (or, deleted, as of *revision*); older news is ignored.

        Runs without yielding, so greenlets never see a half-updated copy.
        """
        at = kv.mod_revision if kv is not None else revision
        if at < self._seen.get(name, 0):
            return
        self._seen[name] = at
        der: bytes | None = None
        if kv is not None and not deleted:
            try:
                der, origin = decode(kv.value)
                self._origins[name] = origin
                self._problems.pop(name, None)
            except NotACertificate as exc:
                if self._problems.get(name) != str(exc):
                    log.error("reference %s in the pin store is unusable: %s", self.location(name), exc)
                self._problems[name] = str(exc)
        else:
            self._problems.pop(name, None)
        old = self._refs.get(name)
        if (old.der if old else None) == der:
            return
        generation = self._generations.get(name, 0) + 1
        self._generations[name] = generation
        if der is None:
            self._refs.pop(name, None)
        else:
            self._refs[name] = Reference(name, self.location(name), der, sha256(der), generation, self)
        if old is not None:
            log.info(
                "reference certificate %s was %s in the pin store; connections checked against sha256 %s will be closed",
                self.location(name),
                "deleted: the next contact learns again" if der is None else f"replaced by sha256 {sha256(der)}",
                old.sha256,
            )

    def resync(self) -> int:
        """Read every reference of the store into this worker's copy; the revision read."""
        kvs, revision = self.etcd.range(self.spec.pins_prefix, prefix=True)
        present = {self.name(kv.key): kv for kv in kvs}
        for name, kv in present.items():
            self._apply(name, kv)
        for name in list(self._refs) + list(self._problems):
            if name not in present:
                self._apply(name, None, revision=revision, deleted=True)
        self.revision = max(self.revision, revision)
        return revision

    def _watched(self, events: list[Event]) -> None:
        for event in events:
            self._apply(self.name(event.kv.key), event.kv, deleted=event.deleted)
            self.revision = max(self.revision, event.kv.mod_revision)

    def start(self) -> None:
        """Start this worker's watcher, once (after gevent has patched threading: it is then a greenlet)."""
        if self._started:
            return
        self._started = True
        self._watcher = threading.Thread(target=self._watch_loop, name="pin store watcher", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher (within one watch period) and close the connections to etcd."""
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(self.resync_interval + 2 * self.spec.timeout * len(self.spec.endpoints))
        self.etcd.close()

    def _watch_loop(self) -> None:
        while not self._closed.is_set():
            try:
                revision = self.resync()
                self._found()
                for events in self.etcd.watch(self.spec.pins_prefix, revision + 1, self.resync_interval):
                    self._watched(events)
                    if self._closed.is_set():
                        break
            except Compacted as exc:
                log.info("pin store watch restarted: %s", exc)
            except (EtcdUnavailable, EtcdRefused) as exc:
                self._lost(str(exc), "watch")
                self._closed.wait(RETRY_DELAY)
            except Exception:  # a bug here must not stop this worker from seeing changes
                log.exception("pin store watcher failed unexpectedly")
                self._closed.wait(1.0)

    def _found(self) -> None:
        if self.reachable is False:
            log.warning("pin store reachable again (%s)", " ".join(self.spec.endpoints))
        self.reachable = True

    def _lost(self, reason: str, operation: str) -> None:
        if self.reachable is not False:
            log.error("pin store unreachable: %s; references already known are still enforced", reason)
        self.reachable = False
        self.last_error, self.last_error_at = reason, time.time()
        from . import metrics  # here: app.metrics reads references through app.pins

        metrics.PIN_STORE_FAILURES.labels(operation).inc()

    # -- what the pins commands and the status page read and change ----------------

    def known(self, name: str) -> Entry:
        ref = self._refs.get(name)
        return Entry(ref.der if ref else None, self._problems.get(name), self._seen.get(name, 0))

    def look(self, name: str) -> Entry:
        kvs, _revision = self._ask(self.etcd.range, self.key(name))
        if not kvs:
            return Entry(None, None, 0)
        try:
            der, _origin = decode(kvs[0].value)
        except NotACertificate as exc:
            return Entry(None, str(exc), kvs[0].mod_revision)
        return Entry(der, None, kvs[0].mod_revision)

    def names(self) -> list[str]:
        kvs, _revision = self._ask(self.etcd.range, self.spec.pins_prefix, True)
        return sorted(self.name(kv.key) for kv in kvs)

    def create(self, name: str, der: bytes) -> tuple[bool, Entry]:
        created, _kv = self._ask(self.etcd.create, self.key(name), encode(der))
        return created, self.look(name)

    def create_all(self, references: dict[str, bytes]) -> bool:
        """Create every reference of *references* in one transaction, only if none of them exists."""
        return self._ask(self.etcd.create_all, {self.key(n): encode(d) for n, d in references.items()})

    def replace(self, name: str, der: bytes, seen: Entry) -> bool:
        if self._ask(self.etcd.replace, self.key(name), encode(der), seen.version or 0):
            return True
        # A first try that timed out may have been applied before the one that failed the condition.
        return self.look(name).der == der

    def delete(self, name: str, seen: Entry) -> bool:
        if self._ask(self.etcd.delete, self.key(name), seen.version or 0):
            return True
        now = self.look(name)
        return now.der is None and now.problem is None

    def _ask(self, operation: Callable[..., Any], *args: Any) -> Any:
        try:
            return operation(*args)
        except (EtcdUnavailable, EtcdRefused) as exc:
            raise StoreUnavailable(f"etcd at {' '.join(self.spec.endpoints)}: {exc}") from exc


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
