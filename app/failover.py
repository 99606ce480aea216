"""One request's way through the instances: which is tried next, what is sent again, and the deadline.

The rules (docs/design.md, "Failover", README "High availability"):

* Nothing sent (connection refused or reset while opening, connect timeout,
  TLS handshake failure, and a certificate mismatch when ``on_mismatch`` is
  ``failover``): the request goes to the next instance, whatever its method.
* Sent, then the instance failed before answering: the request goes to the
  next instance only when it is *repeatable* (GET, HEAD, or
  ``repeatable="true"``) and its body is held; otherwise 502. A connection
  closed with no answer (a keep-alive race) also gets a second chance on the
  same instance, over a new connection.
* A read timeout is 504 and is not retried: the instance may still be working
  on the request, and a slow query is likely slow everywhere.
* An answer in ``retry_statuses`` (425, 429, 503): a repeatable request goes
  to the next instance; the last such answer is relayed when none is left.
* ``Timeouts connect`` is the budget for reaching an instance, shared by the
  instances one request tries, so that a request whose instances are all
  unreachable gets its 503 within about that long; ``total`` bounds the whole
  chain, and each attempt reads for at most what is left of it.

Nothing here touches Flask; the caller relays the :class:`~app.upstream.Answer`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .config import Timeouts
from .errors import CertificateMismatch, InstanceError, InstanceTimeout
from .health import Ticket
from .upstream import AfterSend, Answer, Balancer, NotSent, Outgoing

log = logging.getLogger(__name__)


class Deadline:
    """The time one request may spend: its total deadline, queue wait and connect budget."""

    def __init__(self, timeouts: Timeouts, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        now = clock()
        self.end = now + timeouts.total
        self.queue_end = min(now + timeouts.queue, self.end)
        self.read = timeouts.read
        self.connect_budget = timeouts.connect

    def left(self) -> float:
        return max(self.end - self.clock(), 0.0)

    def attempt(self, others: int) -> tuple[float, float]:
        """(connect, read) timeouts for one attempt, with *others* instances still to try after it.

        The connect budget is shared fairly: an unreachable instance tried
        first leaves the others their part of it.
        """
        left = self.left()
        return min(self.connect_budget / (others + 1), left), min(self.read, left)

    def spent_connecting(self, seconds: float) -> None:
        self.connect_budget = max(self.connect_budget - seconds, 0.0)


def exchange(balancer: Balancer, outgoing: Outgoing, repeatable: bool) -> Answer:
    """Send *outgoing* to the instances in turn until one answers, and return the answer to relay.

    *repeatable* says that the request may reach a second instance after a
    first one received it (the method or the configuration allows it, and
    its body is held). Raises the :class:`~app.errors.BalancerError` the
    client must get when no answer can be relayed.
    """
    policy = balancer.config.failover
    deadline = Deadline(balancer.config.timeouts)
    queue = balancer.candidates()
    reasons: list[str] = []
    held: Answer | None = None  # a "try another instance" answer, relayed if nothing better comes
    failure: InstanceError | None = None  # what the last instance that received the request did
    second_chances: set[int] = set()
    try:
        while True:
            choice = balancer.take(queue, deadline.queue_end, reasons, deadline.clock)
            if choice is None:
                break
            upstream, ticket = choice
            connect, read = deadline.attempt(balancer.admissible(queue))
            if connect <= 0 or read <= 0:
                ticket.release()
                upstream.slots.release()
                reasons.append("the request's deadline (Timeouts total or connect) passed")
                break
            started = deadline.clock()
            try:
                outgoing.rewind()
                response = upstream.send(outgoing.prepare(upstream), (connect, read))
                body = upstream.read_small(response, policy.buffer_bytes)
            except NotSent as exc:
                deadline.spent_connecting(deadline.clock() - started)
                upstream.slots.release()
                ticket.failed(exc.reason)
                log.info("instance %s not reached (%s); trying the next", upstream.spec.name, exc.reason)
                reasons.append(f"{upstream.spec.name}: {exc.reason}")
                continue
            except CertificateMismatch as exc:
                deadline.spent_connecting(deadline.clock() - started)
                upstream.slots.release()
                ticket.mismatched(f"certificate mismatch (received sha256 {exc.fields['received_sha256']})")
                if policy.on_mismatch != "failover":
                    raise
                reasons.append(f"{upstream.spec.name}: certificate mismatch")
                continue
            except AfterSend as exc:
                upstream.slots.release()
                retried = id(upstream) in second_chances
                _judge(ticket, exc, retried)
                if held is not None and isinstance(exc.error, InstanceTimeout):
                    break  # an instance's own "try another" answer beats a 504 of ours
                if not repeatable or isinstance(exc.error, InstanceTimeout):
                    raise exc.error from exc
                failure = exc.error
                if exc.dropped and not retried:
                    second_chances.add(id(upstream))
                    queue.append(upstream)
                log.info("instance %s failed after the request was sent (%s); trying the next", upstream.spec.name, exc.reason)
                continue
            except BaseException as exc:
                if isinstance(exc, InstanceError):  # reference unreadable or unsaved
                    ticket.health.noted(exc.code)
                ticket.release()
                upstream.slots.release()
                raise
            ticket.succeeded()
            answer = Answer(response, upstream, body)
            if body is not None:
                answer.close()  # read whole: the slot and the connection go back now
            if repeatable and response.status_code in policy.retry_statuses:
                log.info("instance %s answered %s; trying another instance", upstream.spec.name, response.status_code)
                _discard(held)
                held = answer
                continue
            _discard(held)
            return answer
    except BaseException:
        _discard(held)
        raise
    if held is not None:
        return held
    if failure is not None:
        raise failure
    raise balancer.no_instance(reasons)


def _judge(ticket: Ticket, exc: AfterSend, retried: bool) -> None:
    """What a failure after sending says about the instance's health.

    A read timeout is a failure. A connection closed with no answer is one
    only when it happens again on the second chance: once, it is the shape
    of a keep-alive race. A malformed answer is still an answer: the
    instance is reachable, and one bad endpoint must not take it out of
    rotation for every request.
    """
    if isinstance(exc.error, InstanceTimeout) or (exc.dropped and retried):
        ticket.failed(exc.reason)
    elif exc.dropped:
        ticket.release()
    else:
        ticket.succeeded()


def _discard(answer: Answer | None) -> None:
    """Close an answer that will not be relayed, freeing its slot; a failure to close changes nothing."""
    if answer is None:
        return
    try:
        answer.close()
    except Exception as exc:  # the connection is dropped either way
        log.debug("closing a discarded answer of %s failed: %s", answer.upstream.spec.name, exc)
