"""The failover decision and instance selection as plain functions, with a fake clock (no network, no gunicorn).

Every row of the README's "What fails over, and what does not" table is a row of
``DECISIONS``.
"""

from __future__ import annotations

import threading

import pytest

from app.failover import (
    ANSWER,
    DROPPED,
    FAIL,
    FAILED,
    FAILED_HEALTH,
    HOLD,
    MISMATCH,
    MISMATCHED,
    NEXT,
    NEXT_THEN_SAME,
    NOT_SENT,
    NOTED,
    REFERENCE,
    RELAY,
    RELAY_HELD,
    RELEASED,
    RETRY,
    SUCCEEDED,
    TIMEOUT,
    Decision,
    decide,
)
from app.health import COOLING_DOWN, Health
from app.selection import Selection, Slots

pytestmark = pytest.mark.unit

# (outcome, repeatable, second chance used, holding an answer, quarantine) -> (verdict, action)
DECISIONS = [
    # nothing was sent: connection refused or reset while connecting, connect timeout, TLS failure
    ((NOT_SENT, True, False, False, False), (FAILED_HEALTH, NEXT)),
    ((NOT_SENT, False, False, False, False), (FAILED_HEALTH, NEXT)),
    # certificate differs from the reference: 500, or the next instance with on_mismatch="failover"
    ((MISMATCH, True, False, False, False), (MISMATCHED, FAIL)),
    ((MISMATCH, False, False, False, False), (MISMATCHED, FAIL)),
    ((MISMATCH, True, False, False, True), (MISMATCHED, NEXT)),
    ((MISMATCH, False, False, False, True), (MISMATCHED, NEXT)),
    # the reference cannot be read or saved: its own 500, nothing sent, the instance not blamed
    ((REFERENCE, True, False, False, False), (NOTED, FAIL)),
    # connection closed before any answer byte: sent again (next, then the same once more) when repeatable
    ((DROPPED, True, False, False, False), (RELEASED, NEXT_THEN_SAME)),
    ((DROPPED, True, True, False, False), (FAILED_HEALTH, NEXT)),
    ((DROPPED, False, False, False, False), (RELEASED, FAIL)),
    # other failure before the answer, or a small answer cut off: next instance when repeatable, else 502
    ((FAILED, True, False, False, False), (SUCCEEDED, NEXT)),
    ((FAILED, False, False, False, False), (SUCCEEDED, FAIL)),
    # no answer within Timeouts read: 504, never retried; an instance's own "try another" answer wins
    ((TIMEOUT, True, False, False, False), (FAILED_HEALTH, FAIL)),
    ((TIMEOUT, False, False, False, False), (FAILED_HEALTH, FAIL)),
    ((TIMEOUT, True, False, True, False), (FAILED_HEALTH, RELAY_HELD)),
    # an answer in retry_statuses: next instance when repeatable, else relayed
    ((RETRY, True, False, False, False), (SUCCEEDED, HOLD)),
    ((RETRY, False, False, False, False), (SUCCEEDED, RELAY)),
    # any other answer, whatever its status: relayed
    ((ANSWER, True, False, False, False), (SUCCEEDED, RELAY)),
    ((ANSWER, False, False, True, False), (SUCCEEDED, RELAY)),
]


@pytest.mark.parametrize(("given", "expected"), DECISIONS, ids=[f"{g[0]}-{i}" for i, (g, _) in enumerate(DECISIONS)])
def test_decision_table(given, expected) -> None:
    outcome, repeatable, used, holding, quarantine = given
    assert decide(
        outcome, repeatable=repeatable, second_chance_used=used, holding=holding, quarantine=quarantine
    ) == Decision(*expected)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Fake:
    def __init__(self, name: str, clock: Clock, freed: threading.Condition, count: int = 1) -> None:
        self.name = name
        self.health = Health(name, 443, cooldown=10.0, clock=clock, wall_clock=clock)
        self.slots = Slots(count, freed)


def make(n: int, count: int = 1):
    clock, freed = Clock(), threading.Condition()
    instances = [Fake(chr(ord("a") + i), clock, freed, count) for i in range(n)]
    return clock, Selection(instances, freed, start=0), instances


def test_queues_take_the_instances_in_turn() -> None:
    _, selection, _ = make(3)
    orders = [[i.name for i in selection.queue()._order] for _ in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_take_skips_a_cooling_instance_and_says_why() -> None:
    clock, selection, (a, b) = make(2)
    a.health.failed("connection refused")
    queue = selection.queue()
    instance, ticket = queue.take(wait_until=clock.now, clock=clock)
    assert instance is b and not ticket.trial
    assert queue.reasons == ["a is cooling down"]
    assert (b.slots.in_flight, a.slots.in_flight) == (1, 0)
    assert queue.take(wait_until=clock.now, clock=clock) is None


def test_after_the_cooldown_exactly_one_request_is_the_trial() -> None:
    clock, selection, (a,) = make(1, count=5)
    a.health.failed("connection refused")
    assert a.health.state == COOLING_DOWN
    clock.now += 10
    first = selection.queue().take(wait_until=clock.now, clock=clock)
    assert first is not None and first[1].trial
    second = selection.queue()
    assert second.take(wait_until=clock.now, clock=clock) is None
    assert second.reasons == ["a is down"]
    first[1].succeeded()
    assert selection.queue().take(wait_until=clock.now, clock=clock) is not None


def test_busy_instances_leave_the_queue_when_the_wait_is_over() -> None:
    clock, selection, (a, b) = make(2)
    assert a.slots.try_acquire() and b.slots.try_acquire()
    queue = selection.queue()
    assert queue.take(wait_until=clock.now, clock=clock) is None
    assert queue.reasons == ["a has 1 requests in flight (scanners_count)", "b has 1 requests in flight (scanners_count)"]


def test_a_slot_freed_by_another_request_ends_the_wait() -> None:
    clock, selection, (a,) = make(1)
    assert a.slots.try_acquire()
    threading.Timer(0.05, a.slots.release).start()
    got = selection.queue().take(wait_until=clock.now + 5, clock=clock)
    assert got is not None and got[0] is a


def test_retry_after_is_the_first_cooldown_end_or_one_second() -> None:
    clock, selection, (a, b) = make(2)
    assert selection.retry_after(cooldown=10) == 1
    a.health.failed("x")
    clock.now += 3
    b.health.failed("y")
    assert selection.retry_after(cooldown=10) == 7
    assert Selection([], threading.Condition()).retry_after(cooldown=10) == 10
