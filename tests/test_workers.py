"""Several gunicorn gevent workers racing on first contact, then a certificate change."""

from __future__ import annotations

import threading
from collections import Counter

from app.pins import der_to_pem, sha256

from .support import get, write_config

CONCURRENT = 200


def test_concurrent_first_contacts_across_workers_save_one_file_each(tmp_path, ca, make_instance, start_balancer):
    a, b = make_instance(), make_instance()
    for inst in (a, b):
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    balancer = start_balancer(write_config(tmp_path, [a, b], workers=4))
    assert balancer.log().count("Booting worker") == 4
    assert not (tmp_path / "certs").exists()

    barrier = threading.Barrier(CONCURRENT)
    results: list[tuple[int, object]] = []
    lock = threading.Lock()

    def call() -> None:
        barrier.wait()
        resp = get(balancer.port, "/api/v.1.1/suppliers")
        with lock:
            results.append((resp.status, resp.json()))

    threads = [threading.Thread(target=call) for _ in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert Counter(status for status, _ in results) == {200: CONCURRENT}
    served = Counter(body["port"] for _, body in results)  # type: ignore[index]
    assert set(served) == {a.port, b.port}
    files = sorted((tmp_path / "certs").iterdir())
    assert [f.name for f in files if not f.name.startswith(".")] == ["127.0.0.1_9998.pem", "127.0.0.1_9999.pem"]
    assert (tmp_path / "certs" / "127.0.0.1_9999.pem").read_bytes() == der_to_pem(a.der)
    assert (tmp_path / "certs" / "127.0.0.1_9998.pem").read_bytes() == der_to_pem(b.der)
    assert not [f for f in files if f.name.endswith(".tmp")]
    # Each reference is learned exactly once, by one worker, whoever won.
    assert balancer.log().count("learned reference certificate") == 2

    # Instance a comes back with another certificate: whatever worker a request
    # lands on, a refuses with a's host and port, and a receives nothing.
    a.restart(ca.issue_cert("127.0.0.1", "localhost"))
    a.server.clear_log()
    b.server.clear_log()
    answers = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(40)]
    refused = [r.json() for r in answers if r.status == 500]
    statuses = Counter(r.status for r in answers)
    assert set(statuses) == {200, 500}
    # Each worker alternates on its own; over 40 requests a gets close to half.
    assert statuses[500] >= 16
    assert [r.json()["port"] for r in answers if r.status == 200] == [b.port] * statuses[200]
    for body in refused:
        assert body["error"] == "certificate_mismatch"  # type: ignore[index]
        assert (body["host"], body["port"]) == ("127.0.0.1", a.port)  # type: ignore[index]
        assert body["received_sha256"] == sha256(a.der)  # type: ignore[index]
    assert a.requests == []
    assert len(b.requests) == statuses[200]
