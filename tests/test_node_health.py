"""Passive health for the whole node: one worker's failure takes the instance out for every worker,
exactly one request of the node is the trial after each cooldown, and a dead trial holder frees it."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from app.health import COOLING_DOWN, DOWN, UP, Health
from app.shared import NodeState

from .peers import Peer
from .support import Spec, get, kill_and_reap, write_config


class Refusing(Peer):
    """Accepts TCP connections and closes them at once: every TLS handshake fails (nothing is sent)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.times.append(time.monotonic())


def test_one_failure_takes_the_instance_out_for_all_workers_and_one_trial_per_cooldown(
    tmp_path, make_instance, start_balancer
):
    refusing = Refusing()
    healthy = make_instance()
    healthy.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"ok": True})
    cooldown = 1.5
    config = write_config(
        tmp_path,
        [Spec("127.0.0.1", refusing.port, 9001), Spec("127.0.0.1", healthy.port, 9002)],
        workers=4,
        extra=f'  <Failover cooldown="{cooldown}"/>\n',
    )
    balancer = start_balancer(config)
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        while not stop.is_set():
            statuses.append(get(balancer.port, "/api/v.1.1/suppliers").status)

    try:
        clients = [threading.Thread(target=load) for _ in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(7.0)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        refusing.close()
    assert set(statuses) == {200} and len(statuses) > 100
    times = refusing.times
    assert times, "the refusing instance was never tried"
    # The first failure, and the requests that were already on their way to it at that moment.
    burst = [t for t in times if t - times[0] < 0.3]
    assert len(burst) <= 8
    # Then one trial per cooldown for the whole node: with each worker on its own, every
    # window would hold up to four.
    trials = [t for t in times if t - times[0] >= 0.3]
    assert 3 <= len(trials) <= 5, [round(t - times[0], 2) for t in times]
    gaps = [b - a for a, b in zip([burst[-1]] + trials, trials)]
    assert all(gap >= cooldown * 0.9 for gap in gaps), [round(g, 2) for g in gaps]
    log = balancer.log()
    assert log.count(f"instance 127.0.0.1:{refusing.port} is down") == 1


def test_node_state_is_shared_and_a_dead_trial_holder_frees_the_trial(tmp_path) -> None:
    path = tmp_path / "health-x"
    clock = [100.0]
    here = Health("x", 443, cooldown=10.0, clock=lambda: clock[0], state=NodeState(path))
    here.failed("connection refused")
    there = Health("x", 443, cooldown=10.0, clock=lambda: clock[0], state=NodeState(path))
    assert (there.state, there.last_error) == (COOLING_DOWN, "connection refused")
    clock[0] += 10
    assert there.state == DOWN

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child takes the trial and waits to be killed
        child = Health("x", 443, cooldown=10.0, clock=lambda: clock[0], state=NodeState(path))
        ticket = child.admit()
        os.write(ready_w, b"1" if ticket is not None and ticket.trial else b"0")
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert here.admit() is None  # another process holds the trial
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ticket = here.admit()
        assert ticket is not None and ticket.trial  # freed by the kernel
        assert there.admit() is None
        ticket.succeeded()
        assert (there.state, here.state) == (UP, UP)
        assert there.admit() is not None
    finally:
        kill_and_reap(pid)


def test_status_is_the_node_view_whichever_worker_answers(tmp_path, make_instance, start_balancer):
    from .support import free_port

    up = make_instance()
    up.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"ok": True})
    refused = free_port()
    config = write_config(
        tmp_path, [Spec("127.0.0.1", up.port, 9001), Spec("127.0.0.1", refused, 9002)], workers=4,
        extra='  <Failover cooldown="60"/>\n',
    )
    balancer = start_balancer(config)
    assert {get(balancer.port, "/api/v.1.1/suppliers").status for _ in range(30)} == {200}
    answers = [get(balancer.port, "/_balancer/status").json() for _ in range(20)]
    views = {
        (
            tuple(a["workers"]),
            tuple((i["state"], i["requests_total"], i["in_flight"], i["last_error"]) for i in a["instances"]),
        )
        for a in answers
    }
    assert len(views) == 1, views
    (workers, instances), = views
    assert len(workers) == 4 and all(a["scope"] == "node" for a in answers)
    assert instances == (("up", 30, 0, None), ("cooling down", 0, 0, "connection refused"))


def test_probes_run_once_per_node_and_another_worker_takes_over(tmp_path, ca, start_balancer):
    from .peers import RecordingPeer, context_from_pem

    cert = ca.issue_cert("127.0.0.1")
    handshakes: list[float] = []

    class Counting(RecordingPeer):
        def serve(self, conn: socket.socket) -> None:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                with self._lock:
                    handshakes.append(time.monotonic())
                self.drain(tls)

    peer = Counting(context_from_pem(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes(), tmp_path))
    try:
        config = write_config(
            tmp_path, [Spec("127.0.0.1", peer.port, 9001)], workers=4, extra='  <HealthCheck interval="1"/>\n'
        )
        balancer = start_balancer(config)
        deadline = time.monotonic() + 10
        while not handshakes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handshakes, "no probe came"
        start = handshakes[0]
        time.sleep(10.05 - (time.monotonic() - start))
        in_ten_seconds = [t for t in handshakes if t - start < 10]
        # One probe per interval for the whole node; each of the 4 workers on its own would make ~40.
        assert 9 <= len(in_ten_seconds) <= 11, len(in_ten_seconds)

        # The probing worker dies: another takes over within one interval.
        prober = next(
            pid for pid in (int(p) for p in Path(f"/proc/{balancer.proc.pid}/task/{balancer.proc.pid}/children").read_text().split())
            if any(l.split()[4] == str(pid) and l.split()[1] == "POSIX" for l in Path("/proc/locks").read_text().splitlines()
                   if len(l.split()) > 7 and l.split()[6] == "4098")
        )
        os.kill(prober, signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(3.5)
        after = [t for t in handshakes if t > killed]
        assert after and after[0] - killed <= 2.1, [round(t - killed, 2) for t in after]
        assert 2 <= len(after) <= 5
    finally:
        peer.close()


def test_a_reload_that_adds_an_instance_keeps_the_state_of_the_others(tmp_path, make_instance, start_balancer):
    from .support import free_port

    up, added = make_instance(), make_instance()
    for inst in (up, added):
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    refused = free_port()
    specs = [Spec("127.0.0.1", up.port, 9001), Spec("127.0.0.1", refused, 9002)]
    config = write_config(tmp_path, specs, workers=2, extra='  <Failover cooldown="120"/>\n')
    balancer = start_balancer(config)
    assert {get(balancer.port, "/api/v.1.1/suppliers").status for _ in range(10)} == {200}
    before = get(balancer.port, "/_balancer/status").json()
    assert [i["state"] for i in before["instances"]] == ["up", "cooling down"]

    write_config(tmp_path, specs + [Spec("127.0.0.1", added.port, 9003)], workers=2, extra='  <Failover cooldown="120"/>\n',
                 api_port=balancer.port)
    old_workers = set(before["workers"])
    os.kill(balancer.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = get(balancer.port, "/_balancer/status").json()
        if len(after["instances"]) == 3 and not set(after["workers"]) & old_workers:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the reload did not happen")
    states = {i["api_port"]: (i["state"], i["last_error"], i["requests_total"]) for i in after["instances"]}
    # New workers, same node state: the refused instance is still cooling down, the counts carry on.
    assert states[refused] == ("cooling down", "connection refused", 0)
    assert states[up.port] == ("up", None, 10)
    assert states[added.port] == ("not yet pinned", None, 0)
