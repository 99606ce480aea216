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

One :class:`Health` per instance per worker, shared by all its greenlets; its
fields live in a state store, this process's (:class:`LocalState`) or the
node's (:class:`app.shared.NodeState`), so one worker's failure takes the
instance out for every worker. This module is pure (standard library only),
so the rules are tested as plain functions with a fake clock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from .shared import NodeState

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


class LocalState:
    """The health of one instance kept in this process: what a single-process server shares."""

    def __init__(self) -> None:
        self.state = _UP
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._trial = False

    def read(self) -> None:
        """Refresh from where the state is kept (nothing to do here)."""

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """Read, let the caller change the fields, and keep them (under :class:`Health`'s lock)."""
        yield

    def claim_trial(self) -> bool:
        if self._trial:
            return False
        self._trial = True
        return True

    def end_trial(self) -> None:
        self._trial = False

    def trial_taken(self) -> bool:
        return self._trial

    def count_answer(self) -> None:
        self._answers = getattr(self, "_answers", 0) + 1

    def claim_prober(self) -> bool:
        return True  # one process: it probes

    @property
    def answers(self) -> int:
        return getattr(self, "_answers", 0)


class Health:
    """Whether requests may go to one instance now, and what happened to it last.

    *state* keeps the fields: :class:`LocalState` in this process, or
    :class:`app.shared.NodeState` for every worker of the node, where the
    trial is a lock the kernel drops if its holder dies.
    """

    def __init__(
        self,
        host: str,
        port: int,
        cooldown: float,
        quarantine_mismatch: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        state: "LocalState | NodeState | None" = None,
    ) -> None:
        self.host = host
        self.port = port
        self.cooldown = cooldown
        self.quarantine_mismatch = quarantine_mismatch
        self._clock = clock
        self._wall_clock = wall_clock
        # Created in the worker, after gevent has patched threading; the
        # critical sections never block on the network, so greenlets only pass through.
        self._lock = threading.Lock()
        self._s: LocalState | NodeState = state if state is not None else LocalState()

    @property
    def last_error(self) -> str | None:
        """The last failure's reason."""
        return self._s.last_error

    @property
    def last_error_at(self) -> float | None:
        """The last failure's wall-clock time (seconds since the epoch)."""
        return self._s.last_error_at

    # -- what requests see ----------------------------------------------------------

    @property
    def state(self) -> str:
        """UP, COOLING_DOWN, DOWN or MISMATCH."""
        self._s.read()
        return self._state_name()

    def _state_name(self) -> str:
        if self._s.state == _UP:
            return UP
        if self._s.state == _MISMATCH:
            return MISMATCH
        return COOLING_DOWN if self._clock() < self._s.retry_at else DOWN

    def admissible(self) -> bool:
        """Whether a request could be sent now (without claiming the trial)."""
        self._s.read()
        return self._admissible()

    def _admissible(self) -> bool:
        if self._s.state == _UP or self._refusing_mismatch():
            return True
        return not self._s.trial_taken() and self._clock() >= self._s.retry_at

    def admit(self) -> Ticket | None:
        """A ticket to send one request, or None while the instance must be skipped.

        Past the cooldown, the first caller gets the trial and every other
        caller is refused until the trial has a verdict.
        """
        with self._lock:
            self._s.read()
            if not self._admissible():
                return None
            if self._s.state == _UP or self._refusing_mismatch():
                return Ticket(self, False)
            if not self._s.claim_trial():
                return None
            return Ticket(self, True)

    def retry_in(self) -> float:
        """Seconds until a request may be admitted again (0 when it may now)."""
        if self.admissible():
            return 0.0
        return max(self._s.retry_at - self._clock(), 0.0)

    def claim_prober(self) -> bool:
        """Whether this worker's probe loop probes the instance: one worker of the node does."""
        return self._s.claim_prober()

    # -- verdicts -------------------------------------------------------------------

    def succeeded(self, trial: bool = False) -> None:
        """The instance answered (or a probe passed): it is up."""
        if not trial:
            self._s.read()
            if self._s.state == _UP:
                return  # nothing changes: most answers take no lock
        with self._lock:
            with self._s.update():
                if self._s.state != _UP:
                    log.warning(
                        "instance %s:%s is back up (it was %s: %s)",
                        self.host, self.port, self._state_name(), self._s.last_error,
                    )
                self._s.state = _UP
            if trial:  # after the verdict is kept: another worker must not see an ended trial and the old state
                self._s.end_trial()

    def failed(self, reason: str, trial: bool = False) -> None:
        """The instance could not be reached or failed a request: skip it for the cooldown."""
        with self._lock:
            with self._s.update():
                self._note(reason)
                if self._s.state == _UP:
                    log.warning(
                        "instance %s:%s is down (%s); skipping it for %g s", self.host, self.port, reason, self.cooldown
                    )
                elif trial:
                    log.info("instance %s:%s is still down (%s)", self.host, self.port, reason)
                self._s.state = _FAILED
                self._s.retry_at = self._clock() + self.cooldown
            if trial:
                self._s.end_trial()

    def mismatched(self, reason: str, trial: bool = False) -> None:
        """The instance presented a certificate other than its reference."""
        with self._lock:
            with self._s.update():
                self._mismatch(reason)
            if trial:
                self._s.end_trial()

    def _mismatch(self, reason: str) -> None:
        self._note(reason)
        if self._s.state != _MISMATCH and self.quarantine_mismatch:
            log.warning(
                "instance %s:%s quarantined: %s; requests go to the other instances, "
                "and it is tried again every %g s until its reference is fixed",
                self.host,
                self.port,
                reason,
                self.cooldown,
            )
        self._s.state = _MISMATCH
        self._s.retry_at = self._clock() + self.cooldown

    def noted(self, reason: str) -> None:
        """Remember an error that says nothing about the instance's health (an unreadable reference)."""
        with self._lock, self._s.update():
            self._note(reason)

    def released(self, trial: bool) -> None:
        """The request ended without a verdict: let another request have the trial."""
        if trial:
            with self._lock:
                self._s.end_trial()

    # -- helpers --------------------------------------------------------------------

    def _refusing_mismatch(self) -> bool:
        # on_mismatch="refuse": requests still go, and get the 500 naming the instance.
        return self._s.state == _MISMATCH and not self.quarantine_mismatch

    def _note(self, reason: str) -> None:
        self._s.last_error = reason
        self._s.last_error_at = self._wall_clock()


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
