"""``GET /_balancer/metrics``: the whole node's numbers in the Prometheus text format (docs/design.md, "Metrics").

Counters and the response-time histogram use prometheus_client's
multiprocess mode: each worker writes its own memory-mapped file in
``<runtime directory>/metrics`` (``PROMETHEUS_MULTIPROC_DIR``, set by the
master before it forks), so a count survives its worker's SIGKILL, and a
scrape adds up every file. Files of workers that are gone (their
registration lock dropped, app.shared) are folded into a ``*_retired.db``
file and removed, under a lock, by the first scrape or new worker that sees
them: counters never go down, and the directory holds one file per type per
live worker plus the retired ones, however many workers came and went.
Gauges (in flight, up, reference expiry, pin store up, workers) are read from the node's
state at scrape time.

prometheus_client loads ``ssl``: this module is imported in workers only,
after gevent has patched, never by ``gunicorn.conf.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from .health import UP
from .shared import live_workers, node_directory

if TYPE_CHECKING:
    from .upstream import Balancer

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Where the metrics live in a single process (flask run); with gunicorn, the files.
_LOCAL = CollectorRegistry()

REQUESTS = Counter("ctbalancer_requests", "Answers given to clients, the balancer's own errors included.", ["status"], registry=_LOCAL)
ERRORS = Counter("ctbalancer_errors", "The balancer's own error answers, by error code.", ["error"], registry=_LOCAL)
INSTANCE_REQUESTS = Counter(
    "ctbalancer_instance_requests", "Answers received from an instance.", ["instance", "status"], registry=_LOCAL
)
INSTANCE_FAILURES = Counter(
    "ctbalancer_instance_failures", "Failed attempts on an instance, by reason.", ["instance", "reason"], registry=_LOCAL
)
RESPONSE_SECONDS = Histogram(
    "ctbalancer_instance_response_seconds",
    "Seconds from the request sent to the instance's answer head.",
    ["instance"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=_LOCAL,
)
PIN_LEARNED = Counter("ctbalancer_pin_learned", "References learned on first contact.", ["instance"], registry=_LOCAL)
PIN_MISMATCH = Counter(
    "ctbalancer_pin_mismatch", "Connections refused for a certificate mismatch.", ["instance"], registry=_LOCAL
)
JOURNAL_REPLAYS = Counter(
    "ctbalancer_journal_replays",
    "Fan-out writes replayed to an instance that missed them, by result (delivered, missed, refused).",
    ["instance", "result"],
    registry=_LOCAL,
)
JOURNAL_DIVERGENCES = Counter(
    "ctbalancer_journal_divergences",
    "Replays an instance answered otherwise than the other instances, leaving it diverged.",
    ["instance"],
    registry=_LOCAL,
)
PIN_STORE_FAILURES = Counter(
    "ctbalancer_pin_store_failures",
    "Requests to the shared pin store (etcd) that no endpoint could carry out, by operation.",
    ["operation"],
    registry=_LOCAL,
)


def count_answer(status: str, error: str | None) -> None:
    """One answer given to a client (*status* as WSGI gives it), and the balancer's error code if it was its own."""
    REQUESTS.labels(status[:3]).inc()
    if error is not None:
        ERRORS.labels(error).inc()


def directory() -> Path | None:
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


def fold_dead_workers() -> int:
    """Fold the files of workers that are gone into the retired totals; how many files were folded."""
    metrics, shared = directory(), node_directory()
    if metrics is None or shared is None:
        return 0
    lock = os.open(metrics / "fold.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return 0  # another worker is folding
        live = set(live_workers(shared))
        folded = 0
        for path in sorted(metrics.glob("*_*.db")):
            kind, _, rest = path.name.partition("_")
            pid = rest[: -len(".db")]
            if not pid.isdigit() or int(pid) in live:
                continue
            retired = MmapedDict(str(metrics / f"{kind}_retired.db"))
            try:
                for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
                    total, _ = retired.read_value(key)
                    retired.write_value(key, total + value, timestamp)
            finally:
                retired.close()
            path.unlink()
            folded += 1
        return folded
    finally:
        os.close(lock)  # drops this process's lock on fold.lock, which nothing else here holds


class _NodeGauges:
    """The gauges, read from the node's state when scraped."""

    def __init__(self, balancer: "Balancer") -> None:
        self.balancer = balancer

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("ctbalancer_instance_in_flight", "Requests in flight to the instance now.", labels=["instance"])
        up = GaugeMetricFamily("ctbalancer_instance_up", "1 when requests may go to the instance now, else 0.", labels=["instance"])
        expiry = GaugeMetricFamily(
            "ctbalancer_pin_expiry_timestamp_seconds", "notAfter of the instance's reference certificate.", labels=["instance"]
        )
        journal = self.balancer.journal
        owed = journal.counts() if journal is not None else {}
        pending = GaugeMetricFamily(
            "ctbalancer_journal_pending", "Fan-out writes the instance still owes (journal length).", labels=["instance"]
        )
        for upstream in self.balancer.upstreams:
            in_flight.add_metric([upstream.name], upstream.slots.in_flight)
            withheld = journal is not None and journal.withheld(upstream.name) is not None
            up.add_metric([upstream.name], 1.0 if upstream.health.state == UP and not withheld else 0.0)
            if journal is not None:
                pending.add_metric([upstream.name], owed.get(upstream.name, 0))
            der = self.balancer.store.known(upstream.spec.reference_name).der
            if der is not None:
                expiry.add_metric([upstream.name], _not_after(der))
        shared = node_directory()
        workers = len(live_workers(shared)) if shared is not None else 1
        yield in_flight
        yield up
        yield expiry
        if journal is not None:
            yield pending
        store = self.balancer.store.state()
        yield GaugeMetricFamily(
            "ctbalancer_pin_store_up",
            "1 when the pin store answered the serving worker's last request (always 1 for a directory), else 0.",
            value=0.0 if store.get("state") == "unreachable" else 1.0,
        )
        yield GaugeMetricFamily("ctbalancer_workers", "Live workers.", value=workers)


def _not_after(der: bytes) -> float:
    # Imported on a scrape only: a worker that is never scraped does not load it (8 MB).
    from cryptography import x509

    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


def instance_answers() -> dict[str, float]:
    """Answers received from each instance by the whole node (``HOST:PORT`` -> count), for the status page."""
    metrics = directory()
    if metrics is None:
        families = _LOCAL.collect()
    else:
        fold_dead_workers()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics))
        families = _read_locked(metrics, registry)
    answers: dict[str, float] = {}
    for family in families:
        if family.name != "ctbalancer_instance_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                instance = sample.labels["instance"]
                answers[instance] = answers.get(instance, 0.0) + sample.value
    return answers


def _read_locked(metrics: Path, registry: CollectorRegistry) -> list[Metric]:
    """The registry's families, read under the shared fold lock (see :func:`_files_stay`)."""
    with _files_stay(metrics):
        return list(registry.collect())


@contextlib.contextmanager
def _files_stay(metrics: Path) -> Iterator[None]:
    """A shared lock while the files are read: a fold (exclusive, never waiting) cannot remove
    one between the collector's listing and its reading."""
    lock = os.open(metrics / "fold.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(lock, fcntl.LOCK_SH)
        yield
    finally:
        os.close(lock)


def exposition(balancer: "Balancer") -> bytes:
    """The node's metrics in the Prometheus text format."""
    registry = CollectorRegistry()
    metrics = directory()
    if metrics is None:
        registry.register(_Local())
        registry.register(_NodeGauges(balancer))
        return generate_latest(registry)
    fold_dead_workers()
    MultiProcessCollector(registry, path=str(metrics))
    registry.register(_NodeGauges(balancer))
    with _files_stay(metrics):
        return generate_latest(registry)


class _Local:
    def collect(self) -> Iterator[Metric]:
        return _LOCAL.collect()
