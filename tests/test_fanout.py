"""Fan-out writes through real gunicorn balancers to real HTTPS instances that keep what they are sent.

docs/design.md, "Fan-out writes"; README "Keeping instances identical".
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.pins import sha256

from .support import ROOT, Gunicorn, config_port, get, write_config
from .write_support import CatalogInstance

SUPPLIERS = "/api/v1/suppliers"
INDICATORS = "/api/v1/suppliers/feed/indicators"
LOOKUP = "/api/v.1.1/suppliers"
ALLOWED = (
    ("GET", LOOKUP),
    ("POST", "/api/{version}/suppliers"),
    ("PUT", "/api/{version}/suppliers/{supplier}/indicators"),
    ("DELETE", "/api/{version}/suppliers/{supplier}/indicators"),
)
FANOUT = {"POST", "PUT", "DELETE"}


def fanout_config(directory: Path, instances, workers: int = 2, extra: str = "", allowed=ALLOWED) -> Path:
    path = write_config(directory, instances, allowed=allowed, workers=workers, extra=extra)
    text = path.read_text()
    for method in FANOUT:
        text = text.replace(f'<Request method="{method}">', f'<Request method="{method}" fanout="true">')
    path.write_text(text)
    return path


def write(port: int, method: str, target: str, payload: dict):
    return get(port, target, method=method, headers={"Content-Type": "application/json"},
               body=json.dumps(payload).encode())


def indicators(*values: str) -> dict:
    return {"indicators": list(values)}


def status_of(port: int) -> dict:
    return json.loads(get(port, "/_balancer/status").body)


def wait_until(predicate, seconds: float = 30.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(step)


@pytest.fixture
def catalogs(ca):
    made: list[CatalogInstance] = []

    def make(count: int) -> list[CatalogInstance]:
        for i in range(count):
            made.append(CatalogInstance(ca, name="abc"[i] if i < 3 else f"i{i}"))
        return made[-count:]

    yield make
    for inst in made:
        inst.stop()


def seed_supplier(instances) -> None:
    """The supplier every test writes to, created on every instance directly (as an administrator would)."""
    for inst in instances:
        assert inst.catalog.handle("POST", SUPPLIERS, b'{"name": "feed"}')[0] == 201


def test_a_write_reaches_every_instance_once(tmp_path, catalogs, start_balancer):
    instances = catalogs(3)
    seed_supplier(instances)
    balancer = start_balancer(fanout_config(tmp_path, instances))
    resp = write(balancer.port, "PUT", INDICATORS, indicators("192.0.2.1", "evil.example"))
    assert resp.status == 200, resp.body
    assert resp.header("X-CTBalancer-Fanout") == "applied=3; pending=0"
    # The answer relayed is the first instance's, in configuration order.
    assert resp.header("X-Instance") == "a"
    assert resp.json() == {"supplier": "feed", "count": 2}
    for inst in instances:
        assert inst.writes() == [("PUT", INDICATORS, b'{"indicators": ["192.0.2.1", "evil.example"]}')]
    assert instances[0].contents() == instances[1].contents() == instances[2].contents() == {
        "feed": {"format": "json", "indicators": ["192.0.2.1", "evil.example"]}
    }
    # Nothing is left in the journal.
    assert sorted(p.name for p in (tmp_path / "journal").iterdir() if p.name.endswith((".json", ".body"))) == []
    # A lookup is not fanned out: it goes to one instance.
    assert get(balancer.port, LOOKUP).status == 200
    assert sum(inst.served("GET") for inst in instances) == 1


def test_an_instance_down_gets_every_write_in_order_before_any_other_request(tmp_path, catalogs, start_balancer):
    a, b, c = catalogs(3)
    seed_supplier((a, b, c))
    balancer = start_balancer(fanout_config(tmp_path, (a, b, c), extra='  <Failover cooldown="0.5"/>\n'))
    c.stop()
    for i in range(50):
        resp = write(balancer.port, "PUT", INDICATORS, indicators(f"w-{i}"))
        assert resp.status == 200, resp.body
        assert resp.header("X-CTBalancer-Fanout") == "applied=2; pending=1"
    view = status_of(balancer.port)["instances"]
    assert [(i["state"], i["journal_pending"]) for i in view] == [("up", 0), ("up", 0), ("catching up", 50)]
    metrics = get(balancer.port, "/_balancer/metrics").body.decode()
    assert f'ctbalancer_journal_pending{{instance="127.0.0.1:{c.port}"}} 50.0' in metrics
    assert f'ctbalancer_instance_up{{instance="127.0.0.1:{c.port}"}} 0.0' in metrics

    # Lookups keep coming while C comes back and catches up.
    stop = threading.Event()
    answers: list[int] = []

    def lookups() -> None:
        while not stop.is_set():
            answers.append(get(balancer.port, LOOKUP).status)

    clients = [threading.Thread(target=lookups) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        c.restart()
        wait_until(lambda: len(c.writes()) >= 50 and c.served("GET") > 0)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert set(answers) == {200}
    log = [(method, body) for method, _, body in c.log]
    puts = [i for i, (method, _) in enumerate(log) if method == "PUT"]
    gets = [i for i, (method, _) in enumerate(log) if method == "GET"]
    assert [json.loads(log[i][1])["indicators"][0] for i in puts] == [f"w-{i}" for i in range(50)]
    assert max(puts) < min(gets)  # no lookup before the last write it owed
    assert a.contents() == b.contents() == c.contents()
    assert len(a.contents()["feed"]["indicators"]) == 50
    view = status_of(balancer.port)["instances"]
    assert [(i["state"], i["journal_pending"]) for i in view] == [("up", 0), ("up", 0), ("up", 0)]
    metrics = get(balancer.port, "/_balancer/metrics").body.decode()
    assert f'ctbalancer_journal_replays_total{{instance="127.0.0.1:{c.port}",result="delivered"}} 50.0' in metrics
    assert "instance 127.0.0.1:%d caught up" % c.port in balancer.log()


def test_instances_that_answer_differently_get_502_and_nothing_is_journaled(tmp_path, make_instance, start_balancer):
    ok, refusing = make_instance(), make_instance()
    ok.server.expect_request(INDICATORS).respond_with_json({"ok": True})
    refusing.server.expect_request(INDICATORS).respond_with_json({"error": "bad indicator"}, status=400)
    balancer = start_balancer(fanout_config(tmp_path, (ok, refusing)))
    resp = write(balancer.port, "PUT", INDICATORS, indicators("x"))
    assert resp.status == 502
    body = resp.json()
    assert body["error"] == "fanout_inconsistent"
    assert body["instances"] == [
        {"host": "127.0.0.1", "port": ok.port, "status": 200},
        {"host": "127.0.0.1", "port": refusing.port, "status": 400},
    ]
    assert [p.name for p in (tmp_path / "journal").iterdir() if p.name.endswith((".json", ".body"))] == []
    assert "fan-out PUT %s answered differently" % INDICATORS in balancer.log()


def test_no_instance_reached_is_503_and_nothing_is_journaled(tmp_path, catalogs, start_balancer):
    a, b = catalogs(2)
    balancer = start_balancer(fanout_config(tmp_path, (a, b)))
    a.stop()
    b.stop()
    resp = write(balancer.port, "PUT", INDICATORS, indicators("x"))
    assert resp.status == 503
    assert resp.json()["error"] == "no_instance_available"
    assert resp.header("Retry-After") is not None
    assert [p.name for p in (tmp_path / "journal").iterdir() if p.name.endswith((".json", ".body"))] == []


def test_a_refused_replay_leaves_the_instance_diverged_until_journal_drop(tmp_path, catalogs, start_balancer):
    a, b, c = catalogs(3)
    config = fanout_config(tmp_path, (a, b, c), extra='  <Failover cooldown="0.5"/>\n')
    balancer = start_balancer(config)
    c.stop()
    resp = write(balancer.port, "POST", SUPPLIERS, {"name": "late"})
    assert (resp.status, resp.header("X-CTBalancer-Fanout")) == (201, "applied=2; pending=1")
    # Meanwhile someone created the supplier on C directly: the replay will be answered 409.
    assert c.catalog.handle("POST", SUPPLIERS, b'{"name": "late"}')[0] == 201
    c.restart()
    wait_until(lambda: status_of(balancer.port)["instances"][2]["state"] == "diverged")
    assert f"instance 127.0.0.1:{c.port} diverged: it answered 409 to the replay of write 1" in balancer.log()
    served = c.served("GET")
    for _ in range(12):
        assert get(balancer.port, LOOKUP).status == 200
    assert c.served("GET") == served  # out of rotation

    env = {**os.environ, "BALANCER_CONFIG": str(config)}
    journal = [sys.executable, "-m", "flask", "--app", "wsgi", "journal"]
    shown = subprocess.run([*journal, "show", f"127.0.0.1:{c.port}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"127.0.0.1:{c.port}: owes 1 write(s)" in shown.stdout
    assert f"diverged:  write 1 (POST {SUPPLIERS}) was answered 409, the other instances answered 201" in shown.stdout
    listed = subprocess.run([*journal, "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert f"127.0.0.1:{c.port}  diverged at write 1, owes 1 write(s)" in listed.stdout
    dropped = subprocess.run([*journal, "drop", f"127.0.0.1:{c.port}", "--yes"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.splitlines()[-1] == f"dropped 1 write(s) owed by 127.0.0.1:{c.port}; it takes requests again"
    wait_until(lambda: status_of(balancer.port)["instances"][2]["state"] == "up")
    for _ in range(12):
        assert get(balancer.port, LOOKUP).status == 200
    assert c.served("GET") > served
    assert a.contents() == b.contents() == c.contents()


def test_concurrent_writes_through_four_workers_reach_every_instance_in_one_order(tmp_path, catalogs, start_balancer):
    instances = catalogs(3)
    seed_supplier(instances)
    balancer = start_balancer(fanout_config(tmp_path, instances, workers=4))

    def one(i: int):
        # Adding and removing the same indicator: the end state depends on the order.
        if i % 2:
            return write(balancer.port, "DELETE", INDICATORS, indicators("shared"))
        return write(balancer.port, "PUT", INDICATORS, indicators("shared", f"w-{i}"))

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert [(r.status, r.header("X-CTBalancer-Fanout")) for r in answers] == [(200, "applied=3; pending=0")] * 20
    orders = [inst.writes() for inst in instances]
    assert len(orders[0]) == 20
    assert orders[0] == orders[1] == orders[2]
    assert instances[0].contents() == instances[1].contents() == instances[2].contents()


def test_sigkill_at_random_moments_loses_no_accepted_write(tmp_path, catalogs):
    a, b, c = catalogs(3)
    seed_supplier((a, b, c))
    config = fanout_config(tmp_path, (a, b, c), extra='  <Failover cooldown="0.5"/>\n')
    port = config_port(config)
    c.stop()
    rng = random.Random(1402)
    accepted: list[int] = []
    kills = 0
    balancer = Gunicorn(config, port, tmp_path / "gunicorn-0.log").start()
    try:
        i = 0
        while i < 200:
            if rng.random() < 0.04:  # now and then, a kill in the middle of the next write
                target = rng.choice(["worker", "worker", "all"])
                delay = rng.uniform(0.0, 0.01)
                threading.Timer(delay, _kill, args=(balancer, target)).start()
                kills += 1
                resp = _try_write(port, i)
                time.sleep(0.05)
                if balancer.proc.poll() is not None or target == "all":
                    balancer.stop()
                    balancer = Gunicorn(config, port, tmp_path / f"gunicorn-{kills}.log").start()
            else:
                resp = _try_write(port, i)
            if resp is not None and resp.status == 200:
                accepted.append(i)
            i += 1
        assert kills >= 3
        assert len(accepted) >= 100
        c.restart()
        wait_until(lambda: all(s["journal_pending"] == 0 and s["state"] == "up" for s in status_of(port)["instances"]),
                   seconds=60)
    finally:
        balancer.stop()
    wanted = {f"w-{i}" for i in accepted}
    for inst in (a, b, c):
        got = set(inst.contents()["feed"]["indicators"])
        assert wanted <= got, sorted(wanted - got)[:5]
        # In order: the first delivery of each write comes in the order the writes were accepted.
        seen: list[int] = []
        for _, _, body in inst.writes():
            n = int(json.loads(body)["indicators"][0][2:])
            if n not in seen:
                seen.append(n)
        assert seen == sorted(seen)
        # A write applied twice only where a kill came between sending it and recording its answer.
        duplicates = len(inst.writes()) - len(seen)
        assert duplicates <= kills
    assert a.contents() == b.contents() == c.contents()


def _try_write(port: int, i: int):
    try:
        return write(port, "PUT", INDICATORS, indicators(f"w-{i}"))
    except OSError:
        return None  # the balancer was killed under this request: not accepted


def _kill(balancer: Gunicorn, target: str) -> None:
    proc = balancer.proc
    if proc is None or proc.poll() is not None:
        return
    if target == "all":
        os.killpg(proc.pid, signal.SIGKILL)  # the master and every worker at once
        return
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    if workers:
        os.kill(int(random.choice(workers)), signal.SIGKILL)


def test_retry_after_the_operator_fixed_a_diverged_instance(tmp_path, catalogs, start_balancer):
    a, b, c = catalogs(3)
    config = fanout_config(tmp_path, (a, b, c), extra='  <Failover cooldown="0.5"/>\n')
    balancer = start_balancer(config)
    c.stop()
    assert write(balancer.port, "POST", SUPPLIERS, {"name": "late"}).status == 201
    c.catalog.handle("POST", SUPPLIERS, b'{"name": "late", "format": "csv"}')
    c.restart()
    wait_until(lambda: status_of(balancer.port)["instances"][2]["state"] == "diverged")
    # The operator removes what was created by hand, then asks for the replay again.
    del c.catalog.suppliers["late"]
    env = {**os.environ, "BALANCER_CONFIG": str(config)}
    retried = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "journal", "retry", f"127.0.0.1:{c.port}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.splitlines()[-1] == f"127.0.0.1:{c.port}: replays start again within a second, oldest write first"
    wait_until(lambda: status_of(balancer.port)["instances"][2]["state"] == "up")
    assert [(m, p) for m, p, _ in c.writes()] == [("POST", SUPPLIERS), ("POST", SUPPLIERS)]  # refused, then applied
    assert a.contents() == b.contents() == c.contents() == {"late": {"format": "json", "indicators": []}}


def test_a_journal_that_cannot_be_written_refuses_the_write_with_nothing_sent(tmp_path, catalogs, start_balancer):
    a, b = catalogs(2)
    seed_supplier((a, b))
    (tmp_path / "blocker").write_text("a file where the journal's parent directory should be")
    balancer = start_balancer(fanout_config(tmp_path, (a, b), extra='  <Journal directory="blocker/journal"/>\n'))
    resp = write(balancer.port, "PUT", INDICATORS, indicators("x"))
    assert resp.status == 503
    assert resp.json()["error"] == "journal_unavailable"
    assert resp.header("Retry-After") == "5"
    assert "blocker/journal cannot be used: Not a directory" in resp.json()["description"]
    assert a.writes() == [] and b.writes() == []
    # Lookups are not affected.
    assert get(balancer.port, LOOKUP).status == 200


def test_a_certificate_mismatch_counts_as_not_received_until_the_reference_is_settled(tmp_path, ca, catalogs, start_balancer):
    a, b = catalogs(2)
    seed_supplier((a, b))
    config = fanout_config(tmp_path, (a, b), extra='  <Failover cooldown="0.5"/>\n')
    balancer = start_balancer(config)
    assert write(balancer.port, "PUT", INDICATORS, indicators("first")).header("X-CTBalancer-Fanout") == "applied=2; pending=0"
    b.restart(ca.issue_cert("127.0.0.1"))  # B's certificate changes: refused before any byte
    resp = write(balancer.port, "PUT", INDICATORS, indicators("second"))
    assert (resp.status, resp.header("X-CTBalancer-Fanout")) == (200, "applied=1; pending=1")
    time.sleep(1.5)  # replays keep being refused by the pin check: nothing reaches B
    assert [json.loads(body)["indicators"] for _, _, body in b.writes()] == [["first"]]
    assert status_of(balancer.port)["instances"][1]["state"] == "catching up"

    env = {**os.environ, "BALANCER_CONFIG": str(config)}
    trusted = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "pins", "trust", f"127.0.0.1:{b.port}",
         "--sha256", sha256(b.der)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert trusted.returncode == 0, trusted.stderr
    wait_until(lambda: status_of(balancer.port)["instances"][1]["state"] == "up")
    assert [json.loads(body)["indicators"] for _, _, body in b.writes()] == [["first"], ["second"]]
    assert a.contents() == b.contents()
