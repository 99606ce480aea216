"""Passive health of one instance as one worker sees it: up, cooling down, down, or quarantined.

::

    up ──request or probe failed──▶ cooling down ──cooldown over──▶ down
     ▲                                   ▲                          │ one request: the trial
     │                                   └────── trial failed ──────┤
     └──────────── trial, another request or a probe succeeded ─────┘

A failed instance is skipped for ``Failover cooldown`` seconds; then exactly
one request (the half-open trial) may try it, and only its success, or a
successful probe, brings the instance back. A certificate mismatch is its own
state: with ``on_mismatch="failover"`` the instance is quarantined (skipped
like a failed one, tried again after each cooldown, since the pin check
refuses before any byte is sent); with the default ``refuse`` requests still
go to it and get the 500 that names it.

One :class:`Health` per instance per worker, shared by all its greenlets.
This module is pure (standard library only), so the rules are tested as plain
functions with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

UP = "up"
COOLING_DOWN = "cooling down"
DOWN = "down"
MISMATCH = "certificate mismatch"
#: Reported by the status page for an instance that is up but has no reference file yet.
NOT_PINNED = "not yet pinned"
#: Reported by the status page for ``enabled="false"`` instances.
DISABLED = "disabled"

# Internal states; COOLING_DOWN and DOWN are _FAILED seen before and after retry_at.
_UP, _FAILED, _MISMATCH = "up", "failed", "mismatch"


class Health:
    """Whether requests may go to one instance now, and what happened to it last."""

    def __init__(
        self,
        host: str,
        port: int,
        cooldown: float,
        quarantine_mismatch: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.port = port
        self.cooldown = cooldown
        self.quarantine_mismatch = quarantine_mismatch
        self._clock = clock
        self._wall_clock = wall_clock
        # Created in the worker, after gevent has patched threading; the
        # critical sections never block, so greenlets only pass through.
        self._lock = threading.Lock()
        self._state = _UP
        self._retry_at = 0.0
        self._trial = False
        #: The last failure's reason and its wall-clock time (seconds since the epoch).
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # -- what requests see ----------------------------------------------------------

    @property
    def state(self) -> str:
        """UP, COOLING_DOWN, DOWN or MISMATCH."""
        if self._state == _UP:
            return UP
        if self._state == _MISMATCH:
            return MISMATCH
        return COOLING_DOWN if self._clock() < self._retry_at else DOWN

    def admissible(self) -> bool:
        """Whether a request could be sent now (without claiming the trial)."""
        if self._state == _UP or self._refusing_mismatch():
            return True
        return not self._trial and self._clock() >= self._retry_at

    def admit(self) -> Ticket | None:
        """A ticket to send one request, or None while the instance must be skipped.

        Past the cooldown, the first caller gets the trial and every other
        caller is refused until the trial has a verdict.
        """
        with self._lock:
            if not self.admissible():
                return None
            trial = not (self._state == _UP or self._refusing_mismatch())
            self._trial = self._trial or trial
            return Ticket(self, trial)

    def retry_in(self) -> float:
        """Seconds until a request may be admitted again (0 when it may now)."""
        if self.admissible():
            return 0.0
        return max(self._retry_at - self._clock(), 0.0)

    # -- verdicts -------------------------------------------------------------------

    def succeeded(self, trial: bool = False) -> None:
        """The instance answered (or a probe passed): it is up."""
        if not trial and self._state == _UP:
            return  # nothing changes: most answers take no lock
        with self._lock:
            if trial:
                self._trial = False
            if self._state != _UP:
                log.warning(
                    "instance %s:%s is back up (it was %s: %s)", self.host, self.port, self.state, self.last_error
                )
            self._state = _UP

    def failed(self, reason: str, trial: bool = False) -> None:
        """The instance could not be reached or failed a request: skip it for the cooldown."""
        with self._lock:
            if trial:
                self._trial = False
            self._note(reason)
            if self._state == _UP:
                log.warning(
                    "instance %s:%s is down (%s); skipping it for %g s", self.host, self.port, reason, self.cooldown
                )
            elif trial:
                log.info("instance %s:%s is still down (%s)", self.host, self.port, reason)
            self._state = _FAILED
            self._retry_at = self._clock() + self.cooldown

    def mismatched(self, reason: str, trial: bool = False) -> None:
        """The instance presented a certificate other than its reference."""
        with self._lock:
            if trial:
                self._trial = False
            self._note(reason)
            if self._state != _MISMATCH and self.quarantine_mismatch:
                log.warning(
                    "instance %s:%s quarantined: %s; requests go to the other instances, "
                    "and it is tried again every %g s until its reference is fixed",
                    self.host,
                    self.port,
                    reason,
                    self.cooldown,
                )
            self._state = _MISMATCH
            self._retry_at = self._clock() + self.cooldown

    def noted(self, reason: str) -> None:
        """Remember an error that says nothing about the instance's health (an unreadable reference)."""
        with self._lock:
            self._note(reason)

    def released(self, trial: bool) -> None:
        """The request ended without a verdict: let another request have the trial."""
        if trial:
            with self._lock:
                self._trial = False

    # -- helpers --------------------------------------------------------------------

    def _refusing_mismatch(self) -> bool:
        # on_mismatch="refuse": requests still go, and get the 500 naming the instance.
        return self._state == _MISMATCH and not self.quarantine_mismatch

    def _note(self, reason: str) -> None:
        self.last_error = reason
        self.last_error_at = self._wall_clock()


class Ticket:
    """Leave to send one request to an instance; exactly one verdict counts.

    A verdict after the first, and :meth:`release` after a verdict, do nothing,
    so ``finally: ticket.release()`` never loses a trial.
    """

    def __init__(self, health: Health, trial: bool) -> None:
        self.health = health
        self.trial = trial
        self._open = True

    def _close(self) -> bool:
        was_open, self._open = self._open, False
        return was_open

    def succeeded(self) -> None:
        if self._close():
            self.health.succeeded(self.trial)

    def failed(self, reason: str) -> None:
        if self._close():
            self.health.failed(reason, self.trial)

    def mismatched(self, reason: str) -> None:
        if self._close():
            self.health.mismatched(reason, self.trial)

    def release(self) -> None:
        if self._close():
            self.health.released(self.trial)
