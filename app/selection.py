"""Which instance may take a request now: round-robin, health, ``scanners_count`` slots, and the queue.

One :class:`Selection` per worker holds the worker's instances in turn. A
request asks it for a :class:`Queue`: every enabled instance once, starting
with the next in turn. :meth:`Queue.take` hands out the first instance whose
health admits a request and which has a free slot, with its slot and health
ticket; instances being skipped leave the queue with the reason, and when
every remaining one is busy it waits, up to the request's queue deadline,
for a slot any request of this worker frees.

Pure (standard library only): instances are anything with ``name``,
``health`` (:class:`app.health.Health`) and ``slots`` (:class:`Slots`), and
the clock is a parameter, so the rules are tested as plain functions.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from typing import Callable, Generic, Protocol, Sequence, TypeVar

from .health import Health, Ticket


class Slots:
    """``scanners_count``: the requests one worker has in flight to one instance.

    Releasing a slot wakes the requests waiting for one of any instance
    (*freed* is shared by all instances of a worker).
    """

    def __init__(self, count: int, freed: threading.Condition) -> None:
        self.count = count
        self.in_flight = 0
        self._freed = freed

    def try_acquire(self) -> bool:
        with self._freed:
            if self.in_flight >= self.count:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._freed:
            self.in_flight -= 1
            self._freed.notify_all()


class Candidate(Protocol):
    name: str
    health: Health
    slots: Slots


C = TypeVar("C", bound=Candidate)


class Selection(Generic[C]):
    """The instances of one worker, taken in turn."""

    def __init__(
        self,
        instances: Sequence[C],
        freed: threading.Condition,
        start: int | None = None,
        withheld: Callable[[C], str | None] | None = None,
    ) -> None:
        self.instances = list(instances)
        self.freed = freed
        #: Why an instance takes no request now apart from its health (it owes fan-out writes), or None.
        self.withheld = withheld or (lambda instance: None)
        # Each worker starts at a random place in the turn, so that workers
        # that see little traffic do not all send their first requests to
        # the first instance.
        first = random.randrange(max(len(self.instances), 1)) if start is None else start
        self._turn = itertools.count(first)

    def queue(self) -> "Queue[C]":
        """Every instance once, starting with the next in turn."""
        n = len(self.instances)
        if not n:
            return Queue(self, [])
        start = next(self._turn) % n
        return Queue(self, [self.instances[(start + i) % n] for i in range(n)])

    def retry_after(self, cooldown: float) -> int:
        """Seconds a client refused for want of an instance should wait: until one may take requests again."""
        waits = [instance.health.retry_in() for instance in self.instances]
        if not waits:
            seconds = cooldown
        elif min(waits) == 0:
            seconds = 1.0  # an instance may take requests now: busy, or the request ran out of time
        else:
            seconds = min(waits)  # every instance is skipped: until the first cooldown ends
        return max(1, math.ceil(seconds))


class Queue(Generic[C]):
    """The instances one request may still try, and why the others were passed over."""

    def __init__(self, selection: Selection[C], order: list[C]) -> None:
        self._selection = selection
        self._order = order
        #: Why instances left the queue, for the 503 that may follow.
        self.reasons: list[str] = []

    def __len__(self) -> int:
        return len(self._order)

    def again(self, instance: C) -> None:
        """Try *instance* once more, after the others."""
        self._order.append(instance)

    def admissible(self) -> int:
        """How many instances of the queue could still be tried."""
        withheld = self._selection.withheld
        return sum(1 for instance in self._order if instance.health.admissible() and withheld(instance) is None)

    def take(self, wait_until: float, clock: Callable[[], float]) -> tuple[C, Ticket] | None:
        """The first instance that may take a request now, with its slot taken and its ticket; None when none.

        Instances being skipped (cooling down, quarantined, trial in flight)
        leave the queue. When every remaining one has ``scanners_count``
        requests in flight, waits for a slot until *wait_until*.
        """
        freed = self._selection.freed
        withheld = self._selection.withheld
        with freed:
            while True:
                busy = []
                for instance in list(self._order):
                    reason = withheld(instance)
                    if reason is not None:
                        self._order.remove(instance)
                        self.reasons.append(f"{instance.name} is {reason}")
                        continue
                    if not instance.health.admissible():
                        self._order.remove(instance)
                        self.reasons.append(f"{instance.name} is {instance.health.state}")
                        continue
                    if not instance.slots.try_acquire():
                        busy.append(instance)
                        continue
                    ticket = instance.health.admit()
                    if ticket is None:  # another greenlet took the trial meanwhile
                        instance.slots.release()
                        continue
                    self._order.remove(instance)
                    return instance, ticket
                left = wait_until - clock()
                if not busy or left <= 0:
                    for instance in busy:
                        self._order.remove(instance)
                        self.reasons.append(
                            f"{instance.name} has {instance.slots.count} requests in flight (scanners_count)"
                        )
                    return None
                # A slot another worker frees wakes nobody here: look again soon (app.shared).
                poll = min((getattr(i.slots, "poll", left) for i in busy), default=left)
                freed.wait(min(left, poll))
