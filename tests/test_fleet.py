"""A fleet of balancers on one etcd store: real etcd clusters, real gunicorn balancers, real HTTPS instances.

docs/design.md, "Fleet"; README "Fleet".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.pins import der_to_pem, pem_to_der, sha256

from .etcd_support import EtcdCluster, pin_store_element
from .peers import InterceptingRelay, context_from_pem
from .support import ROOT, Spec, get, leaf_der, write_config

TARGET = "/api/v.1.1/suppliers"
PREFIX = "/ctbalancer/pins/"
EXIT_MISMATCH = 6


@pytest.fixture
def cluster(tmp_path):
    c = EtcdCluster(tmp_path / "etcd", size=3)
    yield c
    c.close()


def serve(instance):
    """Make *instance* answer the allowed path with its own port, so that answers show who served them."""
    instance.server.expect_request(TARGET).respond_with_json({"port": instance.port})
    return instance


def balancer_config(directory: Path, cluster: EtcdCluster, specs, workers: int = 2, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, specs, workers=workers, extra=pin_store_element(cluster) + extra)


def stored(cluster: EtcdCluster) -> dict[str, dict]:
    """The keys under the pin prefix: name -> the key's value and revisions."""
    return {kv["key"][len(PREFIX) :]: kv for kv in cluster.kvs(PREFIX)}


def stored_der(kv: dict) -> bytes:
    der = pem_to_der(kv["value"]["pem"].encode())
    assert kv["value"]["sha256"] == sha256(der)
    return der


def pins_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``flask --app wsgi pins ARGS`` as an operator runs it."""
    env = {**os.environ, "BALANCER_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "pins", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def answer(port: int) -> tuple[int, object]:
    resp = get(port, TARGET)
    body = resp.json() if resp.body else None
    return resp.status, body


def test_two_balancers_learn_each_instance_once_for_the_fleet(tmp_path, cluster, make_instance, start_balancer):
    x, y = serve(make_instance()), serve(make_instance())
    specs = [Spec("127.0.0.1", x.port, 9101), Spec("127.0.0.1", y.port, 9102)]
    a = start_balancer(balancer_config(tmp_path / "a", cluster, specs))
    b = start_balancer(balancer_config(tmp_path / "b", cluster, specs))
    assert stored(cluster) == {}

    ports = [a.port, b.port] * 100
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(answer, ports))
    assert [status for status, _ in answers] == [200] * 200
    assert {body["port"] for _, body in answers} == {x.port, y.port}

    keys = stored(cluster)
    assert sorted(keys) == ["127.0.0.1_9101", "127.0.0.1_9102"]
    assert stored_der(keys["127.0.0.1_9101"]) == x.der
    assert stored_der(keys["127.0.0.1_9102"]) == y.der
    # Created once, never written again.
    assert [kv["version"] for kv in keys.values()] == [1, 1]
    # No balancer wrote a file: the store is etcd.
    assert not (tmp_path / "a" / "certs").exists() and not (tmp_path / "b" / "certs").exists()
    learned = a.log().count("learned reference certificate") + b.log().count("learned reference certificate")
    assert learned == 2


def test_an_impostor_seen_by_one_balancer_only_is_refused_with_nothing_sent(tmp_path, cluster, ca, make_instance, start_balancer):
    x = serve(make_instance())
    a = start_balancer(balancer_config(tmp_path / "a", cluster, [Spec("127.0.0.1", x.port, 9101)], workers=1))
    assert answer(a.port) == (200, {"port": x.port})

    # B's route to X goes through an intercepting TLS relay with a certificate of its own.
    own = ca.issue_cert("127.0.0.1", "localhost")
    relay = InterceptingRelay(context_from_pem(own.cert_chain_pems[0].bytes(), own.private_key_pem.bytes(), tmp_path), x.port)
    try:
        b = start_balancer(balancer_config(tmp_path / "b", cluster, [Spec("127.0.0.1", relay.port, 9101)], workers=1))
        served_before = len(x.requests)
        resp = get(b.port, TARGET)
        assert relay.wait_idle()
        assert resp.status == 500
        body = resp.json()
        assert body["error"] == "certificate_mismatch"
        assert (body["host"], body["port"]) == ("127.0.0.1", relay.port)
        assert body["expected_sha256"] == sha256(x.der)
        assert body["received_sha256"] == sha256(leaf_der(own))
        assert body["reference"] == f"etcd:{PREFIX}127.0.0.1_9101"
        assert bytes(relay.received) == b""
        assert bytes(relay.relayed) == b""
        assert len(x.requests) == served_before
    finally:
        relay.close()
    # The store still holds A's first contact, unchanged.
    assert stored_der(stored(cluster)["127.0.0.1_9101"]) == x.der
    assert "learned first by" in b.log() and "shared by the fleet" in b.log()


def test_pins_trust_on_one_machine_reaches_the_other_within_a_second(tmp_path, cluster, ca, make_instance, start_balancer):
    x = serve(make_instance())
    specs = [Spec("127.0.0.1", x.port, 9101)]
    config_a = balancer_config(tmp_path / "a", cluster, specs)
    b = start_balancer(balancer_config(tmp_path / "b", cluster, specs))
    # B's two workers hold checked keep-alive connections to X.
    for _ in range(10):
        assert answer(b.port) == (200, {"port": x.port})

    new = ca.issue_cert("127.0.0.1", "localhost")
    new_pem = tmp_path / "new.pem"
    new.cert_chain_pems[0].write_to_path(str(new_pem))
    result = pins_cli(config_a, "trust", f"127.0.0.1:{x.port}", "--from-file", str(new_pem), "--yes")
    assert result.returncode == 0, result.stderr
    trusted_at = time.monotonic()
    assert result.stdout.splitlines()[-1] == (
        f"trusted: etcd:{PREFIX}127.0.0.1_9101 now holds sha256 {sha256(leaf_der(new))}; "
        "running workers use it within a second"
    )
    time.sleep(max(0.0, trusted_at + 1.0 - time.monotonic()))
    # X still presents the old certificate: on old connections and new, every worker of B refuses it now.
    for _ in range(10):
        resp = get(b.port, TARGET)
        assert resp.status == 500, resp.body
        assert resp.json()["error"] == "certificate_mismatch"
        assert resp.json()["expected_sha256"] == sha256(leaf_der(new))
        assert resp.json()["received_sha256"] == sha256(x.der)
    # X presents the certificate that was trusted: served again.
    x.restart(new)
    for _ in range(10):
        assert answer(b.port) == (200, {"port": x.port})


def test_leader_killed_during_first_contacts_never_gives_a_key_two_values(tmp_path, cluster, make_instance, start_balancer):
    instances = [serve(make_instance()) for _ in range(8)]
    specs = [Spec("127.0.0.1", inst.port, 9100 + i) for i, inst in enumerate(instances)]
    balancers = [
        start_balancer(balancer_config(tmp_path / name, cluster, specs, extra='  <Failover cooldown="0.5"/>\n'))
        for name in ("a", "b")
    ]
    leader = cluster.leader()
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def storm(port: int) -> None:
        while not stop.is_set():
            resp = get(port, TARGET)
            error = resp.json().get("error") if resp.status != 200 else None
            with lock:
                results.append((resp.status, error))

    threads = [threading.Thread(target=storm, args=(b.port,)) for b in balancers for _ in range(8)]
    # The storm starts as the leader dies: first contacts meet the election.
    cluster.kill(leader)
    for t in threads:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(60)

    assert results, "no request was answered"
    assert {r for r in results if r[0] != 200} <= {(503, "pin_store_unavailable")}
    cluster.leader()  # a new one is elected
    for b in balancers:
        for _ in range(16):
            assert get(b.port, TARGET).status == 200
    keys = stored(cluster)
    assert sorted(keys) == sorted(f"127.0.0.1_{9100 + i}" for i in range(8))
    for i, inst in enumerate(instances):
        kv = keys[f"127.0.0.1_{9100 + i}"]
        assert kv["version"] == 1 and kv["create_revision"] == kv["mod_revision"]
        assert stored_der(kv) == inst.der


def test_quorum_lost_known_instances_served_new_ones_refused_then_learned(tmp_path, cluster, make_instance, start_balancer):
    known, new = serve(make_instance()), serve(make_instance())
    new.stop()  # not reachable yet: the balancer learns only the known one
    specs = [Spec("127.0.0.1", known.port, 9101), Spec("127.0.0.1", new.port, 9102)]
    balancer = start_balancer(balancer_config(tmp_path / "a", cluster, specs, extra='  <Failover cooldown="0.5"/>\n'))
    for _ in range(4):
        assert answer(balancer.port) == (200, {"port": known.port})
    assert sorted(stored(cluster)) == ["127.0.0.1_9101"]

    survivor, *stopped = cluster.members
    for member in stopped:
        cluster.stop(member)
    new.restart()
    time.sleep(0.6)  # the new instance's cooldown passes: it gets requests again
    seen = []
    for _ in range(12):
        status, body = answer(balancer.port)
        seen.append(status)
        if status == 200:
            assert body == {"port": known.port}
        else:
            assert status == 503
            assert body["error"] == "pin_store_unavailable"
            assert (body["host"], body["port"]) == ("127.0.0.1", new.port)
        time.sleep(0.3)
    assert 503 in seen and 200 in seen
    assert new.requests == []  # handshakes only: nothing sent to an instance that could not be checked
    status = json.loads(get(balancer.port, "/_balancer/status").body)
    assert status["pin_store"]["type"] == "etcd"
    assert status["pin_store"]["state"] == "unreachable"
    metrics = get(balancer.port, "/_balancer/metrics").body.decode()
    assert 'ctbalancer_errors_total{error="pin_store_unavailable"}' in metrics
    assert "\nctbalancer_pin_store_up 0.0\n" in metrics
    assert 'ctbalancer_pin_store_failures_total{operation="learn"}' in metrics

    for member in stopped:
        cluster.cont(member)
    deadline = time.monotonic() + 30
    ports = set()
    while time.monotonic() < deadline and new.port not in ports:
        status_code, body = answer(balancer.port)
        if status_code == 200:
            ports.add(body["port"])
        time.sleep(0.2)
    assert new.port in ports  # learned without a restart
    assert stored_der(stored(cluster)["127.0.0.1_9102"]) == new.der
    # Every worker's watcher finds the store again (each asks on its own; the next read is within seconds).
    deadline = time.monotonic() + 15
    views = []
    while time.monotonic() < deadline:
        views = [json.loads(get(balancer.port, "/_balancer/status").body)["pin_store"]["state"] for _ in range(6)]
        if views == ["reachable"] * 6:
            break
        time.sleep(0.2)
    assert views == ["reachable"] * 6
    assert "\nctbalancer_pin_store_up 1.0\n" in get(balancer.port, "/_balancer/metrics").body.decode()


def test_pins_push_with_a_conflict_changes_nothing_and_push_pull_copy_the_rest(tmp_path, cluster, ca, make_instance):
    x, y = make_instance(), make_instance()
    specs = [Spec("127.0.0.1", x.port, 9101), Spec("127.0.0.1", y.port, 9102)]
    config = balancer_config(tmp_path / "a", cluster, specs)
    certs = tmp_path / "a" / "certs"
    certs.mkdir(mode=0o700)
    (certs / "127.0.0.1_9101.pem").write_bytes(der_to_pem(x.der))
    (certs / "127.0.0.1_9102.pem").write_bytes(der_to_pem(y.der))
    other = leaf_der(ca.issue_cert("127.0.0.1"))
    cluster.put(PREFIX + "127.0.0.1_9101", json.dumps({"pem": der_to_pem(other).decode(), "sha256": sha256(other)}).encode())
    before = cluster.kvs(PREFIX)

    result = pins_cli(config, "push")
    assert result.returncode == EXIT_MISMATCH, result.stdout + result.stderr
    assert f"CONFLICT: etcd:{PREFIX}127.0.0.1_9101 holds sha256 {sha256(other)}, {certs}/127.0.0.1_9101.pem holds sha256 {sha256(x.der)}" in result.stdout
    assert result.stderr.splitlines()[-1] == (
        "Error: 1 conflict(s): nothing was copied; settle each with pins trust or pins forget, then run pins push again"
    )
    assert cluster.kvs(PREFIX) == before  # 9102 was not copied either

    # Settled: the store's reference is removed, and push copies both in one transaction.
    forget = pins_cli(config, "forget", f"127.0.0.1:{x.port}", "--yes")
    assert forget.returncode == 0, forget.stderr
    result = pins_cli(config, "push")
    assert result.returncode == 0, result.stderr
    assert sorted(stored(cluster)) == ["127.0.0.1_9101", "127.0.0.1_9102"]
    assert stored_der(stored(cluster)["127.0.0.1_9102"]) == y.der
    assert pins_cli(config, "push").stdout.splitlines()[-1] == "nothing to copy"

    # pull writes the store's references into an empty CertDirPath.
    for path in certs.glob("*.pem"):
        path.unlink()
    result = pins_cli(config, "pull")
    assert result.returncode == 0, result.stderr
    assert (certs / "127.0.0.1_9101.pem").read_bytes() == der_to_pem(x.der)
    assert (certs / "127.0.0.1_9102.pem").read_bytes() == der_to_pem(y.der)

    # list reads the store.
    listed = pins_cli(config, "list")
    assert listed.returncode == 0, listed.stderr
    assert f"pin store:     etcd {PREFIX} at {cluster.endpoints}" in listed.stdout
    assert f"  reference:  etcd:{PREFIX}127.0.0.1_9101" in listed.stdout
    assert f"  sha256:     {sha256(x.der)}" in listed.stdout
