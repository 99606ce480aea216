"""Failover through a real gunicorn balancer (docs/design.md, "Failover"): what is sent again, what is not, and when.

Instances are real TLS servers on loopback: pytest-httpserver, scripted servers that misbehave on
purpose (tests/ha_support.py), and instance processes killed with SIGKILL. Waits are bounded, never
measured as benchmarks: "within the connect timeout plus 3 s" is a bound, not a speed claim.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from werkzeug import Request, Response

from .ha_support import (
    BAD_RECORD,
    CLOSE,
    CUT,
    GARBLED,
    RESET,
    InstanceProcess,
    Load,
    Received,
    ScriptedInstance,
    SilentInstance,
    answer,
    failures,
)
from .support import Spec, free_port, get, write_config

LOOKUP = ("POST", "/api/{version}/lookup")
ALLOWED = (
    ("GET", "/api/v.1.1/suppliers"),
    ("POST", "/api/{version}/submit"),
    ("GET", "/api/v.1.1/slow"),
)
# The read-only lookup is marked safe to send again; submit is not.
ALLOWED_XML = '    <Request method="POST" repeatable="true">/api/{version}/lookup</Request>\n'


def config(tmp_path, specs, extra="", allowed=ALLOWED, **kwargs):
    path = write_config(tmp_path, specs, allowed, extra=extra, **kwargs)
    text = path.read_text().replace("  </AllowedRequests>", ALLOWED_XML + "  </AllowedRequests>")
    path.write_text(text)
    return path


def json_answer(port: int, status: int = 200, close: bool = False) -> bytes:
    return answer(status, f'{{"port": {port}}}'.encode(), close=close, reason="Whatever")


# -- instance lost under load -------------------------------------------------------------------


def test_instance_killed_under_load_costs_no_request_and_comes_back_after_the_cooldown(tmp_path, ca, start_balancer):
    a = InstanceProcess(ca, tmp_path, "a").start()
    b = InstanceProcess(ca, tmp_path, "b").start()
    try:
        balancer = start_balancer(
            config(
                tmp_path,
                [Spec("127.0.0.1", a.port, 9001), Spec("127.0.0.1", b.port, 9002)],
                extra='  <Timeouts connect="2" read="10"/>\n  <Failover cooldown="2"/>\n',
                workers=2,
            )
        )
        load = Load(balancer.port, threads=4, max_seconds=40).start()
        try:
            time.sleep(2)
            a.kill()
            killed_at = time.monotonic()
            time.sleep(4)
            a.start()
            restarted_at = time.monotonic()
            # Back within the cooldown (2 s) after each worker's next trial; bounded generously.
            deadline = restarted_at + 2 + 10
            while time.monotonic() < deadline and not any(o.at > restarted_at and o.port == a.port for o in load.outcomes):
                time.sleep(0.2)
            time.sleep(1)
        finally:
            outcomes = load.stop()
    finally:
        a.kill()
        b.kill()

    assert failures(outcomes) == []
    served = Counter((o.port, o.method) for o in outcomes)
    assert served[(a.port, "GET")] and served[(a.port, "POST")], served
    down = [o for o in outcomes if killed_at + 0.5 < o.at < restarted_at]
    assert len(down) >= 50, "too little load while the instance was down to show anything"
    assert {o.port for o in down} == {b.port}
    back = [o for o in outcomes if o.at > restarted_at and o.port == a.port]
    assert back, "the restarted instance took no traffic again"
    log = balancer.log()
    assert f"instance 127.0.0.1:{a.port} is down (" in log
    assert f"instance 127.0.0.1:{a.port} is back up" in log


# -- every instance down ------------------------------------------------------------------------


def test_all_instances_unreachable_gives_503_within_the_connect_timeout(tmp_path, start_balancer):
    silent = [SilentInstance(), SilentInstance(), SilentInstance()]
    refused = free_port()
    try:
        specs = [Spec("127.0.0.1", s.port, 9001 + i) for i, s in enumerate(silent)]
        specs.append(Spec("127.0.0.1", refused, 9010))
        balancer = start_balancer(config(tmp_path, specs, extra='  <Timeouts connect="2" read="30"/>\n'))
        for attempt in range(3):
            started = time.monotonic()
            resp = get(balancer.port, "/api/v.1.1/suppliers")
            elapsed = time.monotonic() - started
            # Three instances that never finish a handshake and one that refuses: one connect
            # budget (2 s) for the whole request, not one per instance. Bound, not benchmark.
            assert elapsed < 2 + 3, f"attempt {attempt}: {elapsed:.1f} s"
            assert resp.status == 503
            assert resp.header("Content-Type") == "application/json"
            assert int(resp.header("Retry-After") or 0) >= 1
            body = resp.json()
            assert body["error"] == "no_instance_available"
            for spec in specs:
                assert f"127.0.0.1:{spec.api_port}" in body["description"]
        assert all(s.connections for s in silent), "an instance was never tried"
    finally:
        for s in silent:
            s.close()


# -- slow instance ------------------------------------------------------------------------------


def test_slow_instance_gives_504_after_the_read_timeout_while_the_worker_serves_others(
    tmp_path, make_instance, start_balancer
):
    slow, fast = make_instance(), make_instance()
    released = threading.Event()

    def sleepy(_request: Request) -> Response:
        released.wait(8)
        return Response("late")

    for inst in (slow, fast):
        inst.server.expect_request("/api/v.1.1/slow").respond_with_handler(sleepy)
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    balancer = start_balancer(
        config(tmp_path, [Spec("127.0.0.1", slow.port, 9001), Spec("127.0.0.1", fast.port, 9002)],
               extra='  <Timeouts connect="2" read="2"/>\n', workers=1)
    )
    result: dict[str, object] = {}

    def call_slow() -> None:
        started = time.monotonic()
        result["resp"] = get(balancer.port, "/api/v.1.1/slow")
        result["elapsed"] = time.monotonic() - started

    try:
        pending = threading.Thread(target=call_slow)
        pending.start()
        time.sleep(0.5)
        # The one worker is waiting on an instance: it still answers another request at once.
        other = get(balancer.port, "/api/v.1.1/suppliers")
        assert other.status == 200
        assert pending.is_alive(), "the slow request should still be pending"
        pending.join(10)
    finally:
        released.set()
    resp = result["resp"]
    assert resp.status == 504  # type: ignore[attr-defined]
    body = resp.json()  # type: ignore[attr-defined]
    assert body["error"] == "instance_timeout"
    assert body["port"] in (slow.port, fast.port)
    # After the read timeout (2 s), and not much later; bounds, not a benchmark.
    assert 2 - 0.2 <= result["elapsed"] < 2 + 3  # type: ignore[operator]
    # A read timeout is not retried: exactly one instance received the slow request
    # (pytest-httpserver records a request once its handler has returned).
    def slow_requests() -> int:
        return len([r for inst in (slow, fast) for r in inst.requests if r.path == "/api/v.1.1/slow"])

    deadline = time.monotonic() + 5
    while slow_requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert slow_requests() == 1
    # A read timeout is a failure: that instance is skipped for the cooldown (10 s by default).
    states = {i["api_port"]: (i["state"], i["last_error"]) for i in get(balancer.port, "/_balancer/status").json()["instances"]}
    assert states[body["port"]] == ("cooling down", "no answer within the read timeout")


# -- not sent twice -----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [CLOSE, RESET, GARBLED, BAD_RECORD, CUT])
def test_post_not_repeatable_is_never_sent_twice(tmp_path, ca, make_instance, start_balancer, failure):
    broken = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: failure)
    healthy = make_instance()
    healthy.server.expect_request("/api/v2/submit", method="POST").respond_with_json({"port": healthy.port})
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", broken.port, 9001), Spec("127.0.0.1", healthy.port, 9002)],
                   extra='  <Failover cooldown="0"/>\n', workers=1)
        )
        answers = [get(balancer.port, "/api/v2/submit", method="POST", body=b"order-%d" % i) for i in range(6)]
    finally:
        broken.close()
    statuses = Counter(r.status for r in answers)
    assert set(statuses) <= {200, 502}
    assert statuses[502] >= 1, "no request reached the broken instance: the test proves nothing"
    # Every request was received exactly once, by one instance or the other.
    sent = [r.body for r in broken.received] + [r.get_data() for r in healthy.requests]
    assert sorted(sent) == sorted(b"order-%d" % i for i in range(6))
    assert broken.count() == statuses[502]
    for r in answers:
        if r.status == 502:
            assert r.json()["error"] == "instance_failed"
            assert r.json()["port"] == broken.port
            if failure == CUT:  # the head came, the body did not: nothing of it was relayed
                assert r.json()["description"] == (
                    f"The instance 127.0.0.1:{broken.port} failed while sending its answer: IncompleteRead."
                )


@pytest.mark.parametrize("failure", [CLOSE, RESET, GARBLED, BAD_RECORD, CUT])
def test_repeatable_requests_go_to_the_next_instance_when_one_fails_mid_request(
    tmp_path, ca, make_instance, start_balancer, failure
):
    broken = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: failure)
    healthy = make_instance()
    healthy.server.expect_request("/api/v2/lookup", method="POST").respond_with_json({"port": healthy.port})
    healthy.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": healthy.port})
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", broken.port, 9001), Spec("127.0.0.1", healthy.port, 9002)],
                   extra='  <Failover cooldown="0"/>\n', workers=1)
        )
        answers = [get(balancer.port, "/api/v2/lookup", method="POST", body=b"q-%d" % i) for i in range(4)]
        answers += [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(4)]
    finally:
        broken.close()
    assert [(r.status, r.json()) for r in answers] == [(200, {"port": healthy.port})] * 8
    assert broken.count() >= 1, "no request reached the broken instance: the test proves nothing"
    # The lookups the broken instance swallowed were sent again, each to the healthy one.
    assert sorted(r.get_data() for r in healthy.requests if r.method == "POST") == [b"q-0", b"q-1", b"q-2", b"q-3"]


def test_keep_alive_connection_closed_by_the_instance_is_retried_for_get_not_for_post(tmp_path, ca, start_balancer):
    """The instance answers the first request of each connection, then closes it on the next one unanswered."""

    def script(request: Received) -> bytes | str:
        return json_answer(port) if request.index == 0 else CLOSE

    instance = ScriptedInstance(ca.issue_cert("127.0.0.1"), script)
    port = instance.port
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", port, 9001)], extra='  <Failover cooldown="30"/>\n', workers=1)
        )
        first = get(balancer.port, "/api/v.1.1/suppliers")
        # Reuses the kept-alive connection, which the instance closes: sent again on a new one.
        second = get(balancer.port, "/api/v.1.1/suppliers")
        lookup = get(balancer.port, "/api/v1/lookup", method="POST", body=b"q")
        submit = get(balancer.port, "/api/v1/submit", method="POST", body=b"s")
        after = get(balancer.port, "/api/v.1.1/suppliers")
    finally:
        instance.close()
    assert [(r.status, r.json()) for r in (first, second, lookup)] == [(200, {"port": port})] * 3
    assert (submit.status, submit.json()["error"]) == (502, "instance_failed")
    # A dropped keep-alive connection says nothing about the instance: it was not put in cooldown.
    assert after.status == 200
    assert [(r.connection, r.index, r.method) for r in instance.received] == [
        (0, 0, "GET"),
        (0, 1, "GET"),
        (1, 0, "GET"),
        (1, 1, "POST"),
        (2, 0, "POST"),
        (2, 1, "POST"),
        (3, 0, "GET"),
    ]


# -- answers that mean "try another instance" ---------------------------------------------------


@pytest.mark.parametrize("status", [425, 429, 503])
def test_try_another_answer_is_replaced_by_the_healthy_instance_answer(tmp_path, ca, make_instance, start_balancer, status):
    busy = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: json_answer(busy.port, status))
    healthy = make_instance()
    for method, path in (("GET", "/api/v.1.1/suppliers"), ("POST", "/api/v2/lookup"), ("POST", "/api/v2/submit")):
        healthy.server.expect_request(path, method=method).respond_with_json({"port": healthy.port})
    try:
        balancer = start_balancer(
            # One slot per instance: a discarded answer that kept its slot would block the next request.
            config(tmp_path, [Spec("127.0.0.1", busy.port, 9001), Spec("127.0.0.1", healthy.port, 9002)],
                   extra='  <Timeouts queue="1"/>\n', workers=1, scanners_count=1)
        )
        gets = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(4)]
        lookups = [get(balancer.port, "/api/v2/lookup", method="POST", body=b"q") for _ in range(4)]
        submits = [get(balancer.port, "/api/v2/submit", method="POST", body=b"s") for _ in range(4)]
    finally:
        busy.close()
    assert [(r.status, r.json()) for r in gets + lookups] == [(200, {"port": healthy.port})] * 8
    assert busy.count("GET") >= 1 and busy.count("POST") >= 1, "the busy instance was never asked"
    # Not repeatable: the instance's answer is relayed as it is, whatever its status.
    relayed = [r for r in submits if r.status == status]
    assert relayed, "no submit reached the busy instance: the test proves nothing"
    assert all(r.json() == {"port": busy.port} for r in relayed)
    assert len([r for r in busy.received if r.path == "/api/v2/submit"]) == len(relayed)
    assert len(relayed) + len([r for r in healthy.requests if r.path == "/api/v2/submit"]) == 4


def test_last_try_another_answer_is_relayed_when_no_instance_is_left(tmp_path, ca, start_balancer):
    one = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: json_answer(one.port, 429))
    two = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: json_answer(two.port, 503))
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", one.port, 9001), Spec("127.0.0.1", two.port, 9002)],
                   workers=1, scanners_count=1, extra='  <Timeouts queue="1"/>\n')
        )
        answers = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(4)]
    finally:
        one.close()
        two.close()
    # Each request asked both instances once and got the second one's answer.
    assert (one.count(), two.count()) == (4, 4)
    assert sorted((r.status, r.json()["port"]) for r in answers) == sorted(
        [(429, one.port), (503, two.port)] * 2
    )


def test_try_another_answer_is_relayed_when_the_other_instance_times_out(tmp_path, ca, make_instance, start_balancer):
    busy = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: json_answer(busy.port, 429))
    slow = make_instance()
    released = threading.Event()

    def sleepy(_request: Request) -> Response:
        released.wait(5)
        return Response("late")

    slow.server.expect_request("/api/v.1.1/suppliers").respond_with_handler(sleepy)
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", busy.port, 9001), Spec("127.0.0.1", slow.port, 9002)],
                   extra='  <Timeouts read="1"/>\n  <Failover cooldown="0"/>\n', workers=1)
        )
        answers = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(2)]
    finally:
        released.set()
        busy.close()
    # One request started with the busy instance: its 429 beats our 504. The other started with the
    # slow one: a read timeout is not retried.
    assert sorted((r.status, r.json().get("port"), r.json().get("error")) for r in answers) == [
        (429, busy.port, None),
        (504, slow.port, "instance_timeout"),
    ]
    assert busy.count() == 1


# -- scanners_count -----------------------------------------------------------------------------


def _slow_and_fast(make_instance, released: threading.Event):
    def sleepy(_request: Request) -> Response:
        released.wait(10)
        return Response("late")

    instances = [make_instance(), make_instance()]
    for inst in instances:
        inst.server.expect_request("/api/v.1.1/slow").respond_with_handler(sleepy)
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    return instances


def test_a_busy_instance_is_passed_over_for_one_with_a_free_slot(tmp_path, make_instance, start_balancer):
    released = threading.Event()
    a, b = _slow_and_fast(make_instance, released)
    balancer = start_balancer(
        config(tmp_path, [Spec("127.0.0.1", a.port, 9001), Spec("127.0.0.1", b.port, 9002)],
               extra='  <Timeouts queue="0" read="20"/>\n', workers=1, scanners_count=1)
    )
    pending = threading.Thread(target=get, args=(balancer.port, "/api/v.1.1/slow"))
    try:
        pending.start()
        time.sleep(0.5)
        # One instance holds the slow request in its only slot; every request, whichever
        # instance is next in turn, goes to the other one and does not wait.
        answers = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(4)]
        assert pending.is_alive()
    finally:
        released.set()
        pending.join(15)
    ports = {r.json()["port"] for r in answers}
    assert [r.status for r in answers] == [200] * 4
    assert len(ports) == 1 and ports <= {a.port, b.port}


def test_requests_over_scanners_count_wait_for_a_slot_then_get_503(tmp_path, make_instance, start_balancer):
    released = threading.Event()
    inst = make_instance()

    def sleepy(_request: Request) -> Response:
        released.wait(10)
        return Response("late")

    inst.server.expect_request("/api/v.1.1/slow").respond_with_handler(sleepy)
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    balancer = start_balancer(
        config(tmp_path, [inst], extra='  <Timeouts queue="1" read="20"/>\n', workers=1, scanners_count=2)
    )
    pending = [threading.Thread(target=get, args=(balancer.port, "/api/v.1.1/slow")) for _ in range(2)]
    try:
        for t in pending:
            t.start()
        time.sleep(0.5)
        started = time.monotonic()
        refused = get(balancer.port, "/api/v.1.1/suppliers")
        waited = time.monotonic() - started
        # Waits for the queue time (1 s), not for ever; bounds, not a benchmark.
        assert 1 - 0.2 <= waited < 1 + 3
        assert refused.status == 503
        assert refused.header("Retry-After") == "1"
        assert refused.json() == {
            "error": "no_instance_available",
            "description": f"No instance could take the request: 127.0.0.1:{inst.port} has 2 requests in flight "
            "(scanners_count).",
        }
        # A request that finds a slot freed while it waits goes through.
        waiting: dict[str, object] = {}
        late = threading.Thread(target=lambda: waiting.update(resp=get(balancer.port, "/api/v.1.1/suppliers")))
        late.start()
        time.sleep(0.3)
        released.set()
        late.join(10)
        assert waiting["resp"].status == 200  # type: ignore[attr-defined]
    finally:
        released.set()
        for t in pending:
            t.join(15)
    # The instance never had more than scanners_count requests of this worker at once.
    assert len([r for r in inst.requests if r.path == "/api/v.1.1/suppliers"]) == 1


# -- certificate mismatch -----------------------------------------------------------------------


def test_mismatch_with_on_mismatch_failover_quarantines_the_instance_until_its_reference_is_fixed(
    tmp_path, ca, make_instance, start_balancer
):
    from app.pins import der_to_pem, replace_reference, sha256

    from .support import leaf_der

    wrong, right = make_instance(), make_instance()
    for inst in (wrong, right):
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    certs = tmp_path / "certs"
    certs.mkdir()
    reference = certs / "127.0.0.1_9001.pem"
    stale = der_to_pem(leaf_der(ca.issue_cert("127.0.0.1")))
    reference.write_bytes(stale)
    balancer = start_balancer(
        config(tmp_path, [Spec("127.0.0.1", wrong.port, 9001), Spec("127.0.0.1", right.port, 9002)],
               extra='  <Failover on_mismatch="failover" cooldown="1"/>\n', workers=1)
    )
    answers = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(6)]
    assert [(r.status, r.json()) for r in answers] == [(200, {"port": right.port})] * 6
    assert wrong.requests == []
    assert reference.read_bytes() == stale
    log = balancer.log()
    assert f"certificate mismatch for instance 127.0.0.1:{wrong.port}" in log
    assert f"instance 127.0.0.1:{wrong.port} quarantined: certificate mismatch (received sha256 {sha256(wrong.der)})" in log
    status = get(balancer.port, "/_balancer/status").json()["instances"][0]
    assert status["state"] == "certificate mismatch"

    # The operator accepts the instance's certificate: after the cooldown it takes requests again.
    replace_reference(reference, wrong.der)
    deadline = time.monotonic() + 10
    while not wrong.requests and time.monotonic() < deadline:
        assert get(balancer.port, "/api/v.1.1/suppliers").status == 200
        time.sleep(0.2)
    assert wrong.requests, "the instance stayed quarantined after its reference was fixed"
    assert f"instance 127.0.0.1:{wrong.port} is back up" in balancer.log()


# -- what a failure says about the instance -----------------------------------------------------


def test_a_malformed_answer_does_not_take_the_instance_out_of_rotation(tmp_path, ca, start_balancer):
    def script(request: Received) -> bytes | str:
        return GARBLED if request.path == "/api/v2/garbled" else json_answer(instance.port)

    instance = ScriptedInstance(ca.issue_cert("127.0.0.1"), script)
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", instance.port, 9001)], allowed=ALLOWED + (("GET", "/api/v2/garbled"),),
                   extra='  <Failover cooldown="60"/>\n', workers=1)
        )
        garbled = get(balancer.port, "/api/v2/garbled")
        after = get(balancer.port, "/api/v.1.1/suppliers")
        state = get(balancer.port, "/_balancer/status").json()["instances"][0]["state"]
    finally:
        instance.close()
    assert (garbled.status, garbled.json()["error"]) == (502, "instance_failed")
    assert (after.status, state) == (200, "up")
    # A GET is repeatable, but there was no other instance, and a malformed answer gets no second chance.
    assert [r.path for r in instance.received] == ["/api/v2/garbled", "/api/v.1.1/suppliers"]


def test_a_connection_closed_twice_without_answer_takes_the_instance_out(tmp_path, ca, start_balancer):
    instance = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: CLOSE)
    try:
        balancer = start_balancer(
            config(tmp_path, [Spec("127.0.0.1", instance.port, 9001)], extra='  <Failover cooldown="60"/>\n', workers=1)
        )
        first = get(balancer.port, "/api/v.1.1/suppliers")
        second = get(balancer.port, "/api/v.1.1/suppliers")
        state = get(balancer.port, "/_balancer/status").json()["instances"][0]
    finally:
        instance.close()
    assert (first.status, first.json()["error"]) == (502, "instance_failed")
    assert first.json()["description"] == (
        f"The instance 127.0.0.1:{instance.port} failed after the request was sent: connection closed before an answer."
    )
    assert (second.status, second.json()["error"]) == (503, "no_instance_available")
    assert (state["state"], state["last_error"]) == ("cooling down", "connection closed before an answer")
    # Sent, sent again once over a new connection, then never again during the cooldown.
    assert [(r.connection, r.path) for r in instance.received] == [(0, "/api/v.1.1/suppliers"), (1, "/api/v.1.1/suppliers")]
