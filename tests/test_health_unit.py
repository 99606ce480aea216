"""Passive health rules (app.health) as plain functions with a fake clock."""

from __future__ import annotations

import logging

import pytest

from app.health import COOLING_DOWN, DOWN, MISMATCH, UP, Health

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def health(clock: Clock, quarantine: bool = False) -> Health:
    return Health("192.0.2.10", 443, cooldown=10.0, quarantine_mismatch=quarantine, clock=clock, wall_clock=lambda: 5.0)


def test_a_failed_instance_is_skipped_for_the_cooldown_then_tried_by_one_request(clock, caplog):
    h = health(clock)
    caplog.set_level(logging.INFO, "app.health")
    ticket = h.admit()
    assert ticket is not None and not ticket.trial
    ticket.failed("connection failed")
    assert (h.state, h.admit(), h.retry_in()) == (COOLING_DOWN, None, 10.0)
    assert (h.last_error, h.last_error_at) == ("connection failed", 5.0)
    clock.now += 9.9
    assert h.admit() is None
    clock.now += 0.1
    assert h.state == DOWN
    trial = h.admit()
    assert trial is not None and trial.trial
    # The trial is in flight: every other request still skips the instance.
    assert [h.admit() for _ in range(3)] == [None, None, None]
    assert h.state == DOWN
    trial.succeeded()
    assert h.state == UP
    again = h.admit()
    assert again is not None and not again.trial
    assert [r.getMessage() for r in caplog.records] == [
        "instance 192.0.2.10:443 is down (connection failed); skipping it for 10 s",
        "instance 192.0.2.10:443 is back up (it was down: connection failed)",
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]


def test_a_failed_trial_starts_another_cooldown_and_logs_no_second_warning(clock, caplog):
    h = health(clock)
    caplog.set_level(logging.INFO, "app.health")
    h.admit().failed("connection failed")  # type: ignore[union-attr]
    clock.now += 10
    h.admit().failed("connection timed out")  # type: ignore[union-attr]
    assert (h.state, h.retry_in(), h.last_error) == (COOLING_DOWN, 10.0, "connection timed out")
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_a_trial_released_without_verdict_lets_the_next_request_try(clock):
    h = health(clock)
    h.failed("connection failed")
    clock.now += 10
    trial = h.admit()
    assert trial is not None and trial.trial
    trial.release()
    trial.failed("ignored: released first")
    assert h.state == DOWN and h.last_error == "connection failed"
    assert h.admit() is not None


def test_only_the_first_verdict_of_a_ticket_counts(clock):
    h = health(clock)
    ticket = h.admit()
    assert ticket is not None
    ticket.succeeded()
    ticket.failed("too late")
    ticket.release()
    assert (h.state, h.last_error) == (UP, None)


def test_a_probe_success_brings_an_instance_back_before_the_cooldown_ends(clock):
    h = health(clock)
    h.failed("connection failed")
    assert h.state == COOLING_DOWN
    h.succeeded()
    assert h.state == UP and h.admit() is not None


def test_mismatch_with_refuse_keeps_sending_requests_so_that_they_get_the_500(clock, caplog):
    h = health(clock)
    caplog.set_level(logging.INFO, "app.health")
    h.admit().mismatched("certificate mismatch")  # type: ignore[union-attr]
    assert h.state == MISMATCH
    ticket = h.admit()
    assert ticket is not None and not ticket.trial
    # pins.py logs the mismatch at ERROR; health adds nothing when it does not quarantine.
    assert caplog.records == []


def test_mismatch_with_failover_quarantines_until_a_check_passes(clock, caplog):
    h = health(clock, quarantine=True)
    caplog.set_level(logging.INFO, "app.health")
    h.admit().mismatched("certificate mismatch")  # type: ignore[union-attr]
    assert (h.state, h.admit()) == (MISMATCH, None)
    clock.now += 10
    trial = h.admit()
    assert trial is not None and trial.trial
    trial.mismatched("certificate mismatch")
    assert (h.state, h.admit(), h.retry_in()) == (MISMATCH, None, 10.0)
    clock.now += 10
    h.admit().succeeded()  # type: ignore[union-attr]
    assert h.state == UP
    assert [r.getMessage() for r in caplog.records] == [
        "instance 192.0.2.10:443 quarantined: certificate mismatch; requests go to the other instances, "
        "and it is tried again every 10 s until its reference is fixed",
        "instance 192.0.2.10:443 is back up (it was certificate mismatch: certificate mismatch)",
    ]


def test_noted_errors_change_no_state(clock):
    h = health(clock)
    h.noted("reference certificate unreadable")
    assert (h.state, h.last_error, h.admit() is not None) == (UP, "reference certificate unreadable", True)


def test_zero_cooldown_retries_at_once_but_still_one_trial_at_a_time(clock):
    h = Health("h", 1, cooldown=0.0, clock=clock)
    h.failed("connection failed")
    assert h.state == DOWN
    trial = h.admit()
    assert trial is not None and trial.trial
    assert h.admit() is None
