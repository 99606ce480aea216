"""scanners_count for the whole node: 4 gunicorn workers never have more than scanners_count requests
in flight to one instance together, and a worker killed with SIGKILL frees its slots by itself."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from werkzeug import Response

from app.shared import NodeSlots
from app.selection import Slots

from .support import Spec, get, kill_and_reap, write_config



class Counting:
    """Start and end times of the requests an instance is working on, each held for *hold* seconds."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.lock = threading.Lock()
        self.spans: list[list[float]] = []

    def handler(self, _request) -> Response:  # type: ignore[no-untyped-def]
        span = [time.monotonic(), float("inf")]
        with self.lock:
            self.spans.append(span)
        time.sleep(self.hold)
        span[1] = time.monotonic()
        return Response(b"ok")

    def peak(self, started_after: float = float("-inf"), started_before: float = float("inf")) -> int:
        """Most requests (started in the window) the instance worked on at one moment."""
        with self.lock:
            spans = [s for s in self.spans if started_after <= s[0] <= started_before]
        return max((sum(1 for o in spans if o[0] <= s[0] < o[1]) for s in spans), default=0)

    def in_flight(self) -> int:
        now = time.monotonic()
        with self.lock:
            return sum(1 for s in self.spans if s[0] <= now < s[1])


def slot_file(master: int, name: str, limit: float = 10.0) -> Path:
    """The slot file *name* a worker of *master* has open (the runtime directory is the master's choice)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
            for fd in Path(f"/proc/{child}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.endswith("/" + name):
                    return Path(target)
        time.sleep(0.05)
    raise AssertionError(f"no worker has {name} open")


def lock_holders(path: Path) -> set[int]:
    """PIDs holding a POSIX record lock on *path* (/proc/locks)."""
    inode = os.stat(path).st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "POSIX" and fields[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(fields[4]))
    return holders


def test_four_workers_share_scanners_count_and_a_killed_worker_frees_its_slots(tmp_path, make_instance, start_balancer):
    instance = make_instance()
    counting = Counting(hold=1.0)
    instance.server.expect_request("/api/v.1.1/suppliers").respond_with_handler(counting.handler)
    config = write_config(
        tmp_path, [instance], workers=4, scanners_count=3,
        extra='  <Timeouts queue="60" total="90" read="30"/>\n',
    )
    balancer = start_balancer(config)
    statuses: list[int | None] = []

    def client() -> None:
        try:
            statuses.append(get(balancer.port, "/api/v.1.1/suppliers").status)
        except OSError:
            statuses.append(None)  # its worker was killed

    clients = [threading.Thread(target=client) for _ in range(40)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 10
    while counting.in_flight() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(2.5)  # a few rounds of three
    slots = slot_file(balancer.proc.pid, f"slots-127.0.0.1_{instance.port}")
    assert slots.parent.stat().st_mode & 0o777 == 0o700

    # A worker that holds slots right now, killed: the kernel drops its locks.
    deadline = time.monotonic() + 5
    holders: set[int] = set()
    while not holders and time.monotonic() < deadline:
        holders = lock_holders(slots) - {balancer.proc.pid}
        time.sleep(0.01)
    assert holders, "no worker held a slot"
    victim = sorted(holders)[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for thread in clients:
        thread.join(120)

    # Never more than scanners_count at once from the four workers together (before the kill: after
    # it, the dead worker's requests may still be running at the instance while its slots are free).
    assert counting.peak(started_before=killed_at) == 3
    # Within 2 s of the death, three requests at once again: the dead worker's slots were freed.
    assert counting.peak(started_after=killed_at, started_before=killed_at + 2) == 3
    # Every client got 200 but those whose connection was on the killed worker; none waited out the queue.
    assert len(statuses) == 40 and set(statuses) <= {200, None} and statuses.count(200) >= 10, statuses


def test_node_slots_are_exclusive_between_processes_and_freed_by_death(tmp_path) -> None:
    """Two processes on one slot file of count 2: each gets what the other does not hold; a SIGKILL frees."""
    path = tmp_path / "slots-x"
    here = NodeSlots(path, 2, threading.Condition())
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child takes one slot and waits to be killed
        child = NodeSlots(path, 2, threading.Condition())
        ok = child.try_acquire()
        os.write(ready_w, b"1" if ok else b"0")
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert here.try_acquire() is True
        assert here.try_acquire() is False  # one byte each: the node's two slots are taken
        assert here.in_flight == 2
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert here.in_flight == 1
        assert here.try_acquire() is True
        here.release()
        here.release()
        assert here.in_flight == 0
    finally:
        kill_and_reap(pid)


def test_slots_without_a_runtime_directory_are_the_process_own() -> None:
    slots = Slots(1, threading.Condition())
    assert slots.try_acquire() and not slots.try_acquire()
    slots.release()
    assert slots.in_flight == 0


def test_a_removed_runtime_directory_is_made_again(tmp_path) -> None:
    shared = tmp_path / "run" / "shared"
    slots = NodeSlots(shared / "slots-x", 1, threading.Condition())
    assert slots.try_acquire()  # the directory did not exist: made, private
    assert shared.stat().st_mode & 0o777 == 0o700
    slots.release()


def test_a_runtime_directory_that_cannot_be_made_stops_start_up_with_one_line(tmp_path):
    import subprocess
    import sys

    from .support import ROOT

    config = write_config(tmp_path, [Spec("127.0.0.1", 9)])
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env={**os.environ, "BALANCER_CONFIG": str(config), "RUNTIME_DIRECTORY": str(blocker)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("ctbalancer:")]
    assert lines == [
        f"ctbalancer: cannot create the runtime directory for the workers' shared state: "
        f"[Errno 20] Not a directory: '{blocker}/shared'"
    ], done.stderr
    assert "Booting worker" not in done.stderr
