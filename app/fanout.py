"""Fan-out writes: a ``fanout="true"`` request sent to every enabled instance, and replayed to those that missed it.

docs/design.md, "Fan-out writes"; README "Keeping instances identical".

Under the node's fan-out lock (:meth:`app.journal.Journal.lock`), one write
at a time for all workers of the machine:

1. the write is journaled, owed by every enabled instance (durable before anything is sent);
2. it is sent at once, concurrently, each over its own pinned connection, to
   every instance that owes nothing older; the others get it later, in order;
3. the instances that answered must agree on the status: then they no longer
   owe it, the client gets the answer of the first of them in configuration
   order with ``X-CTBalancer-Fanout: applied=N; pending=M``, and the
   instances that did not receive it (nothing sent, or no answer) still owe
   it. Different statuses: 502 ``fanout_inconsistent`` and the write is
   dropped from the journal. No answer at all: 503 and the write is dropped.

One worker of the node (the holder of a lock on ``replayer`` in the journal)
replays, oldest first, what each instance owes, one write at a time under the
same lock; an instance that owes writes takes no other request. A replay
answered with another status than the one the instances agreed on leaves the
instance ``diverged``, out of rotation, until ``flask --app wsgi journal``
settles it.
"""

from __future__ import annotations

import fcntl
import http.client
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import urllib3.exceptions

from . import metrics
from .errors import FanoutInconsistent, JournalFailed, NoInstanceAvailable
from .failover import MISMATCH, NOT_SENT, REFERENCE, count, send_once
from .headers import response_headers
from .journal import CATCHING_UP, Journal, JournalUnavailable, Write
from .upstream import Outgoing, Upstream

if TYPE_CHECKING:
    from .upstream import Balancer

log = logging.getLogger(__name__)

HEADER = "X-CTBalancer-Fanout"

#: The largest answer to a fan-out write that is read and relayed; a write's answer is a few bytes.
ANSWER_LIMIT = 16 * 1024 * 1024

#: Seconds between two rounds of the replayer.
REPLAY_INTERVAL = 0.5


@dataclass
class Delivery:
    """What one instance did with one write: answered (``status``), or did not receive it (``reason``)."""

    upstream: Upstream
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    reason: str = ""

    @property
    def received(self) -> bool:
        return self.status is not None

    def describe(self) -> dict[str, Any]:
        spec = self.upstream.spec
        if self.received:
            return {"host": spec.host, "port": spec.api_port, "status": self.status}
        return {"host": spec.host, "port": spec.api_port, "error": self.reason}


def deliver(upstream: Upstream, write: Write, connect: float, read: float) -> Delivery:
    """Send *write*, its body read from the journal, to *upstream* over its own pinned connection.

    Classified and counted as any attempt (:func:`app.failover.send_once`,
    :func:`app.failover.count`), without a ``scanners_count`` slot. A
    certificate mismatch, an unreadable reference or an unreachable pin
    store refuse the connection before any byte: the write was not received.
    So were writes sent to an instance that then failed without a complete
    answer; replaying them must be safe (docs/design.md, "Fan-out writes").
    """
    with open(write.body_path, "rb") as body:
        outgoing = Outgoing(
            method=write.method,
            target=write.target,
            headers=[(name, value) for name, value in write.headers],
            body=body if write.size else None,
        )
        outcome = send_once(upstream, outgoing, (connect, read), ANSWER_LIMIT, slot_with_answer=False)
    count(upstream.name, outcome)
    answer = outcome.answer
    if answer is None:
        if outcome.kind == NOT_SENT:
            upstream.health.failed(outcome.reason)
        refused = outcome.kind in (MISMATCH, REFERENCE) and outcome.error is not None
        return Delivery(upstream, reason=outcome.error.code if refused else outcome.reason)  # type: ignore[union-attr]
    response = answer.response
    try:
        data = answer.body
        if data is None:  # length unknown (chunked) or over the limit
            data = response.raw.read(ANSWER_LIMIT + 1, decode_content=False)
            if len(data) > ANSWER_LIMIT:
                return Delivery(upstream, reason=f"answer larger than {ANSWER_LIMIT} bytes")
    except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
        return Delivery(upstream, reason=f"answer cut off ({type(exc).__name__})")
    finally:
        answer.close()
    upstream.health.succeeded()
    log.debug("write %s delivered to %s: %s", write.seq, upstream.name, response.status_code)
    return Delivery(upstream, response.status_code, response_headers(response.raw.headers.items()), data)


@dataclass
class Result:
    """The answer a fan-out write gets: the first answering instance's, and the counts for the header."""

    delivery: Delivery
    applied: int
    pending: int

    @property
    def header(self) -> str:
        return f"applied={self.applied}; pending={self.pending}"


def fan_out(balancer: "Balancer", journal: Journal, outgoing: Outgoing) -> Result:
    """Journal *outgoing*, send it to every enabled instance that owes nothing older, and settle it.

    Raises :class:`~app.errors.FanoutInconsistent`, :class:`~app.errors.NoInstanceAvailable`
    or :class:`~app.errors.JournalFailed`; nothing is then owed to anyone.
    """
    config = balancer.config
    upstreams = balancer.upstreams
    if not upstreams:
        raise balancer.no_instance([])
    timeouts = config.timeouts
    try:
        with journal.lock(timeouts.total):
            behind = {u.name for u in upstreams if journal.withheld(u.name) is not None}
            write = journal.begin(outgoing.method, outgoing.target, outgoing.headers, outgoing.body,
                                  [u.name for u in upstreams])
            now = [u for u in upstreams if u.name not in behind]
            deliveries = _send_all(now, write, timeouts.connect, timeouts.read)
            answered = [d for d in deliveries if d.received]
            if not answered:
                journal.discard(write)
                reasons = [f"{d.upstream.name}: {d.reason}" for d in deliveries]
                reasons += [f"{name} is {journal.withheld(name) or CATCHING_UP}" for name in sorted(behind)]
                raise NoInstanceAvailable(
                    f"No instance received the write, so none applied it: {'; '.join(reasons)}.",
                    retry_after=balancer.selection.retry_after(config.failover.cooldown),
                )
            if len({d.status for d in answered}) > 1:
                journal.discard(write)
                log.error(
                    "fan-out %s %s answered differently: %s; not journaled",
                    write.method,
                    write.target,
                    ", ".join(f"{d.upstream.name} {d.status if d.received else d.reason}" for d in deliveries),
                )
                raise FanoutInconsistent([d.describe() for d in deliveries])
            journal.settle(write, [d.upstream.name for d in answered], answered[0].status)
    except JournalUnavailable as exc:
        log.error("fan-out write refused: %s", exc)
        raise JournalFailed(str(exc)) from None
    for name in write.owed:
        log.warning("fan-out write %s (%s %s) journaled for %s", write.seq, write.method, write.target, name)
    return Result(answered[0], applied=len(answered), pending=len(write.owed))


def _send_all(upstreams: list[Upstream], write: Write, connect: float, read: float) -> list[Delivery]:
    """:func:`deliver` to every one of *upstreams* at once (threads are greenlets in a gevent worker); in their order."""
    results: list[Delivery | None] = [None] * len(upstreams)

    def one(i: int, upstream: Upstream) -> None:
        try:
            results[i] = deliver(upstream, write, connect, read)
        except Exception as exc:  # a bug must not count as delivered
            log.exception("fan-out to %s failed unexpectedly", upstream.name)
            results[i] = Delivery(upstream, reason=f"internal error ({type(exc).__name__})")

    threads = [threading.Thread(target=one, args=(i, u), daemon=True) for i, u in enumerate(upstreams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


# -- replaying what instances owe -------------------------------------------------------------------


def start_replayer(balancer: "Balancer") -> None:
    """Start this worker's replay loop, once; only the worker holding the ``replayer`` lock replays."""
    journal = balancer.journal
    if journal is None or balancer.replaying:
        return
    balancer.replaying = True
    threading.Thread(target=_replay_loop, args=(balancer, journal), name="journal replayer", daemon=True).start()


def _replay_loop(balancer: "Balancer", journal: Journal) -> None:
    claim: int | None = None
    while True:
        try:
            if claim is None:
                claim = _claim(journal)
            if claim is not None:
                for upstream in balancer.upstreams:
                    if journal.withheld(upstream.name) == CATCHING_UP:
                        replay(balancer, journal, upstream)
        except Exception:  # a bug here must not end the replays
            log.exception("journal replay failed unexpectedly")
        time.sleep(REPLAY_INTERVAL)


def _claim(journal: Journal) -> int | None:
    """A lock on ``<journal>/replayer``, held for this worker's life; None while another worker holds it."""
    try:
        journal.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(journal.directory / "replayer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        return None
    return fd


def replay(balancer: "Balancer", journal: Journal, upstream: Upstream) -> str:
    """Deliver what *upstream* owes, oldest first, until it owes nothing or one is not received.

    Returns ``"caught up"``, ``"missed"`` (try again later) or ``"diverged"``.
    """
    name = upstream.name
    timeouts = balancer.config.timeouts
    spec = upstream.spec
    # Not under the node's lock: an instance that is cooling down, or does not accept a
    # connection now, must not hold up the client writes waiting for that lock.
    if not upstream.health.admissible():
        return "missed"
    try:
        socket.create_connection((spec.host, spec.api_port), timeout=timeouts.connect).close()
    except OSError as exc:
        upstream.health.failed(f"replay: {exc.strerror or exc}")
        return "missed"
    while True:
        with journal.lock(timeouts.total):
            if name in journal.diverged():
                return "diverged"
            owed = journal.owed(name)
            if not owed:
                return "caught up"
            write = owed[0]
            delivery = deliver(upstream, write, timeouts.connect, timeouts.read)
            if not delivery.received:
                metrics.JOURNAL_REPLAYS.labels(name, "missed").inc()
                log.debug("replay of write %s to %s not received: %s", write.seq, name, delivery.reason)
                return "missed"
            if write.status is None:
                # Journaled by a balancer killed before any answer was recorded: the first answer sets the status.
                write.status = delivery.status
            if delivery.status != write.status:
                metrics.JOURNAL_REPLAYS.labels(name, "refused").inc()
                metrics.JOURNAL_DIVERGENCES.labels(name).inc()
                journal.mark_diverged(name, write, str(delivery.status))
                log.error(
                    "instance %s diverged: it answered %s to the replay of write %s (%s %s) that the other instances "
                    "answered %s; it takes no requests until an operator settles it: flask --app wsgi journal show %s",
                    name, delivery.status, write.seq, write.method, write.target, write.status, name,
                )
                return "diverged"
            journal.settle(write, [name])
            metrics.JOURNAL_REPLAYS.labels(name, "delivered").inc()
            if len(owed) == 1:
                log.warning("instance %s caught up: it received every write it missed and takes requests again", name)
