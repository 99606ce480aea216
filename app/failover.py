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
from dataclasses import dataclass
from typing import Callable

from .errors import BalancerError, CertificateMismatch, InstanceError, InstanceTimeout
from .health import Ticket
from . import metrics
from .settings import Failover, Timeouts
from .upstream import AfterSend, Answer, Balancer, NotSent, Outgoing, Upstream

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


# -- what happened in one attempt, and what follows ------------------------------------------

#: Outcomes of one attempt.
NOT_SENT = "not sent"  # connection refused, connect or TLS failure: nothing left the balancer
MISMATCH = "mismatch"  # the certificate differs from the reference: nothing was sent
REFERENCE = "reference"  # the reference cannot be read or saved: nothing was sent
DROPPED = "dropped"  # sent; the connection closed before any byte of an answer
FAILED = "failed"  # sent; the answer was malformed or cut off
TIMEOUT = "timeout"  # sent; no answer within the read timeout
RETRY = "retry status"  # an answer in Failover retry_statuses
ANSWER = "answer"  # any other answer

#: Verdicts on the instance's health (app.health.Ticket).
SUCCEEDED, FAILED_HEALTH, MISMATCHED, RELEASED, NOTED = "succeeded", "failed", "mismatched", "released", "noted"

#: What the request does next.
NEXT = "next instance"
NEXT_THEN_SAME = "next instance, then the same over a new connection"
FAIL = "fail"  # the client gets this attempt's error
HOLD = "hold the answer, next instance"
RELAY = "relay"
RELAY_HELD = "relay the held answer"


@dataclass(frozen=True)
class Decision:
    verdict: str
    action: str


def decide(outcome: str, *, repeatable: bool, second_chance_used: bool, holding: bool, quarantine: bool) -> Decision:
    """What an attempt's *outcome* says about the instance, and what the request does next.

    The README's "What fails over" table, row by row. A request that reached
    an instance goes to another only when it is *repeatable*. A connection
    closed before any answer is the shape of a keep-alive race: once, it says
    nothing about the instance and the request may try the same instance
    again (*second_chance_used* says it already did). A malformed answer is
    still an answer: the instance is reachable. A read timeout is not
    retried, but an instance's own "try another" answer already *holding*
    beats a 504 of ours.
    """
    if outcome == NOT_SENT:
        return Decision(FAILED_HEALTH, NEXT)
    if outcome == MISMATCH:
        return Decision(MISMATCHED, NEXT if quarantine else FAIL)
    if outcome == REFERENCE:
        return Decision(NOTED, FAIL)
    if outcome == DROPPED:
        verdict = FAILED_HEALTH if second_chance_used else RELEASED
        if not repeatable:
            return Decision(verdict, FAIL)
        return Decision(verdict, NEXT if second_chance_used else NEXT_THEN_SAME)
    if outcome == FAILED:
        return Decision(SUCCEEDED, NEXT if repeatable else FAIL)
    if outcome == TIMEOUT:
        return Decision(FAILED_HEALTH, RELAY_HELD if holding else FAIL)
    if outcome == RETRY:
        return Decision(SUCCEEDED, HOLD if repeatable else RELAY)
    return Decision(SUCCEEDED, RELAY)


@dataclass
class Outcome:
    """What one attempt produced: its kind, and the answer or the error and its reason."""

    kind: str
    answer: Answer | None = None
    error: BalancerError | None = None
    reason: str = ""


def send_once(
    upstream: Upstream, outgoing: Outgoing, timeout: tuple[float, float], limit: int, slot_with_answer: bool
) -> Outcome:
    """Send *outgoing* to *upstream* once and classify what happened; no slot, no verdict.

    An answer's body is read whole inside the attempt when its length is
    known and at most *limit* (``Answer.body``), else left on the connection;
    with *slot_with_answer* the answer then gives the instance's slot back
    when it is closed. The one classification of an attempt, for requests
    (:class:`Attempt`) and fan-out writes (:func:`app.fanout.deliver`).
    """
    try:
        outgoing.rewind()
        response = upstream.send(outgoing.prepare(upstream), timeout)
        body = upstream.read_small(response, limit)
    except NotSent as exc:
        return Outcome(NOT_SENT, reason=exc.reason)
    except CertificateMismatch as exc:
        return Outcome(MISMATCH, error=exc, reason=f"certificate mismatch (received sha256 {exc.fields['received_sha256']})")
    except InstanceError as exc:  # the reference cannot be read or saved: the pin check refused
        return Outcome(REFERENCE, error=exc, reason=exc.code)
    except AfterSend as exc:
        kind = TIMEOUT if isinstance(exc.error, InstanceTimeout) else DROPPED if exc.dropped else FAILED
        return Outcome(kind, error=exc.error, reason=exc.reason)
    return Outcome(ANSWER, answer=Answer(response, upstream, body, holds_slot=slot_with_answer and body is None))


class Attempt:
    """One try of one instance, holding its ``scanners_count`` slot and health ticket.

    Both go back on every way out of the ``with`` block, unless the slot went
    with the answer (:meth:`run` made one whose body is still on the
    connection: the answer gives it back when it is closed). The ticket takes
    the first verdict only, so releasing it after a verdict does nothing.
    """

    def __init__(self, upstream: Upstream, ticket: Ticket) -> None:
        self.upstream = upstream
        self.ticket = ticket
        self._holds_slot = True

    def __enter__(self) -> "Attempt":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.ticket.release()
        if self._holds_slot:
            self._holds_slot = False
            self.upstream.slots.release()

    def run(self, outgoing: Outgoing, timeout: tuple[float, float], policy: Failover) -> Outcome:
        """Send *outgoing* and classify what happened."""
        upstream = self.upstream
        outcome = send_once(upstream, outgoing, timeout, policy.buffer_bytes, slot_with_answer=True)
        if outcome.answer is None:
            return outcome
        self._holds_slot = False
        if outcome.answer.body is not None:
            upstream.slots.release()  # read whole: the slot and the connection go back now
        # else the answer's body is still on the connection: its close() frees the slot
        if outcome.answer.response.status_code in policy.retry_statuses:
            outcome.kind = RETRY
        return outcome

    def judge(self, verdict: str, reason: str) -> None:
        ticket = self.ticket
        if verdict == SUCCEEDED:
            ticket.succeeded()
        elif verdict == FAILED_HEALTH:
            ticket.failed(reason)
        elif verdict == MISMATCHED:
            ticket.mismatched(reason)
        elif verdict == NOTED:
            ticket.health.noted(reason)
            ticket.release()
        else:
            ticket.release()


# -- one request through the instances -----------------------------------------------------


def exchange(balancer: Balancer, outgoing: Outgoing, repeatable: bool) -> Answer:
    """Send *outgoing* to the instances in turn until one answers, and return the answer to relay.

    *repeatable* says that the request may reach a second instance after a
    first one received it. Raises the :class:`~app.errors.BalancerError` the
    client must get when no answer can be relayed.
    """
    policy = balancer.config.failover
    deadline = Deadline(balancer.config.timeouts)
    queue = balancer.selection.queue()
    quarantine = policy.on_mismatch == "failover"
    held: Answer | None = None  # a "try another instance" answer, relayed if nothing better comes
    failure: BalancerError | None = None  # what the last instance that received the request did
    second_chances: set[int] = set()
    attempts = 0
    try:
        while (choice := queue.take(deadline.queue_end, deadline.clock)) is not None:
            upstream, ticket = choice
            with Attempt(upstream, ticket) as attempt:
                connect, read = deadline.attempt(queue.admissible())
                if connect <= 0 or read <= 0:
                    queue.reasons.append("the request's deadline (Timeouts total or connect) passed")
                    break
                started = deadline.clock()
                attempts += 1
                outcome = attempt.run(outgoing, (connect, read), policy)
                if outcome.answer is not None:
                    outcome.answer.attempts = attempts
                    outcome.answer.head_seconds = deadline.clock() - started
                    metrics.RESPONSE_SECONDS.labels(upstream.name).observe(outcome.answer.head_seconds)
                if outcome.error is not None:
                    outcome.error.attempts = attempts
                count(upstream.name, outcome)
                if outcome.kind in (NOT_SENT, MISMATCH):
                    deadline.spent_connecting(deadline.clock() - started)
                used = id(upstream) in second_chances
                decision = decide(
                    outcome.kind, repeatable=repeatable, second_chance_used=used, holding=held is not None,
                    quarantine=quarantine,
                )
                attempt.judge(decision.verdict, outcome.reason)
                action = decision.action
                if action == RELAY:
                    assert outcome.answer is not None
                    _discard(held)
                    held = None
                    return outcome.answer
                if action == HOLD:
                    log.info("instance %s answered %s; trying another instance", upstream.name, outcome.answer.response.status_code)  # type: ignore[union-attr]
                    _discard(held)
                    held = outcome.answer
                    continue
                if action == RELAY_HELD:
                    break
                if action == FAIL:
                    assert outcome.error is not None
                    raise outcome.error
                # NEXT, NEXT_THEN_SAME
                if outcome.kind in (NOT_SENT, MISMATCH):
                    log.info("instance %s not reached (%s); trying the next", upstream.name, outcome.reason)
                    queue.reasons.append(f"{upstream.name}: {outcome.reason}" if outcome.kind == NOT_SENT else f"{upstream.name}: certificate mismatch")
                else:
                    failure = outcome.error
                    log.info("instance %s failed after the request was sent (%s); trying the next", upstream.name, outcome.reason)
                if action == NEXT_THEN_SAME:
                    second_chances.add(id(upstream))
                    queue.again(upstream)
    except BaseException:
        _discard(held)
        raise
    if held is not None:
        return held
    if failure is not None:
        raise failure
    refusal = balancer.no_instance(queue.reasons)
    refusal.attempts = attempts
    raise refusal


#: The ``reason`` label of ctbalancer_instance_failures_total for each failed outcome.
_FAILURE_REASONS = {DROPPED: "dropped", FAILED: "invalid_answer", TIMEOUT: "timeout", MISMATCH: "mismatch"}


def count(instance: str, outcome: Outcome) -> None:
    """The metrics of one attempt's outcome: the answer's status, or the failure's reason."""
    if outcome.answer is not None:
        metrics.INSTANCE_REQUESTS.labels(instance, str(outcome.answer.response.status_code)).inc()
        return
    if outcome.kind == NOT_SENT:
        reason = "tls" if "TLS" in outcome.reason else "connect"
    else:
        reason = _FAILURE_REASONS.get(outcome.kind)
    if reason is not None:
        metrics.INSTANCE_FAILURES.labels(instance, reason).inc()
    if outcome.kind == MISMATCH:
        metrics.PIN_MISMATCH.labels(instance).inc()


def _discard(answer: Answer | None) -> None:
    """Close an answer that will not be relayed, freeing its slot; a failure to close changes nothing."""
    if answer is None:
        return
    try:
        answer.close()
    except Exception as exc:  # the connection is dropped either way
        log.debug("closing a discarded answer of %s failed: %s", answer.upstream.name, exc)
