#!/usr/bin/env python3
"""Soak: minutes of mixed load through the balancer while instances restart and a certificate rotates.

    make soak                                         # 10 minutes
    make soak SOAK_SECONDS=40 SOAK_RESTART_EVERY=15   # the short run the test suite does

Everything runs on loopback, in a fresh work directory under bench/.run/:

* two HTTPS instances, A and B: ``demo/instance.py`` processes (HTTP/1.1
  keep-alive, self-signed certificates);
* the balancer, ``gunicorn -c gunicorn.conf.py wsgi:app`` with SOAK_WORKERS
  gevent workers, plain HTTP in front, ``Failover cooldown`` SOAK_COOLDOWN;
* SOAK_CLIENTS client threads on keep-alive connections, SOAK_RATE requests/s
  in all, in a fixed mix: 5 in 10 ``GET /api/v.1.1/suppliers``, 3 in 10 the
  repeatable ``POST /api/v.1.1/lookup``, 2 in 10 the non-repeatable
  ``POST /api/v.1.0/lookup``. A 200 counts only with the body the instance
  sends: the suppliers, or the lookup body echoed byte for byte.

Every SOAK_RESTART_EVERY seconds one instance, A then B in turn, gets SIGTERM
and is started again on its port. The restart nearest the middle of the run
brings the instance back with a new certificate (a rotation), and
SOAK_TRUST_AFTER seconds later ``flask --app wsgi pins trust 127.0.0.1:PORT
--sha256 NEW`` accepts it, with the balancer running.

Expected, and counted apart (anything else that is not a checked 200 is an
unexpected failure, a request with no answer included):

* ``500 certificate_mismatch`` naming the rotated instance, for a request that
  started after its restart began and at most PICKUP seconds after the trust
  command returned (a worker looks at the reference every 0.5 s);
* ``502 instance_failed`` naming a restarted instance, for a non-repeatable
  POST in flight while it stopped: started at most 0.5 s after the old process
  was gone and ended after SIGTERM was sent. Such a request may have reached
  the instance, so it is never sent twice (README, High availability).

Memory: each worker's RSS (``VmRSS``) when booted, after SOAK_WARMUP seconds
of load (the baseline: pools, TLS contexts and caches are built by then), at
every tenth of the run and at the end, still under load.

Prints a table, writes SOAK_REPORT (bench/results/soak.md) and the same
numbers as JSON beside it, and exits 1 when a request failed unexpectedly,
the workers' RSS grew SOAK_MEMORY_LIMIT (10) % or more over the baseline, a
worker was replaced, the trust command failed, or the references are not the
ones the instances present at the end. Stops everything it started.

Environment (defaults): SOAK_SECONDS (600), SOAK_RESTART_EVERY (60),
SOAK_WORKERS (4), SOAK_CLIENTS (8), SOAK_RATE (200), SOAK_COOLDOWN (5),
SOAK_TRUST_AFTER (8; the instance's cooldown passes first, so its mismatch is
seen), SOAK_WARMUP (min(30, SOAK_SECONDS / 4)), SOAK_MEMORY_LIMIT (10),
SOAK_REPORT, SOAK_DIR (work directory).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.instance import SUPPLIERS, make_self_signed  # noqa: E402

#: Seconds after the trust command returned during which a mismatch is still expected.
PICKUP = 2.0
#: Seconds after an instance's old process was gone during which a request sent
#: on a connection to it may still fail (the peer's close not yet seen).
RESTART_SLACK = 0.5

GET_SUPPLIERS = ("GET", "/api/v.1.1/suppliers")
REPEATABLE_POST = ("POST", "/api/v.1.1/lookup")
ONCE_POST = ("POST", "/api/v.1.0/lookup")
#: The mix, one entry per request in a cycle of ten.
MIX = [GET_SUPPLIERS] * 5 + [REPEATABLE_POST] * 3 + [ONCE_POST] * 2
KIND = {
    GET_SUPPLIERS: "GET suppliers",
    REPEATABLE_POST: "POST lookup (repeatable)",
    ONCE_POST: "POST lookup (not repeatable)",
}

CONFIG = """<?xml version="1.0" encoding="utf-8"?>
<!-- Written by bench/soak.py -->
<Config>
  <Balancer api_port="{api_port}" matching_port="9999" cybertrace_port="9998" scanners_count="10">127.0.0.1</Balancer>
  <CertDirPath>certs</CertDirPath>
  <Instances>
    <Instance enabled="true" matching_port="9999" api_port="{port_a}">127.0.0.1</Instance>
    <Instance enabled="true" matching_port="9998" api_port="{port_b}">127.0.0.1</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="GET">/api/v.1.1/suppliers</Request>
    <Request method="POST" repeatable="true">/api/v.1.1/lookup</Request>
    <Request method="POST">/api/v.1.0/lookup</Request>
  </AllowedRequests>
  <Workers>{workers}</Workers>
  <Failover cooldown="{cooldown}"/>
</Config>
"""


def env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


@dataclass(frozen=True)
class Settings:
    seconds: float
    restart_every: float
    workers: int
    clients: int
    rate: float
    cooldown: float
    trust_after: float
    warmup: float
    memory_limit: float
    report: Path
    work: Path

    @classmethod
    def from_env(cls) -> "Settings":
        seconds = env_number("SOAK_SECONDS", 600)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return cls(
            seconds=seconds,
            restart_every=env_number("SOAK_RESTART_EVERY", 60),
            workers=int(env_number("SOAK_WORKERS", 4)),
            clients=int(env_number("SOAK_CLIENTS", 8)),
            rate=env_number("SOAK_RATE", 200),
            cooldown=env_number("SOAK_COOLDOWN", 5),
            trust_after=env_number("SOAK_TRUST_AFTER", 8),
            warmup=env_number("SOAK_WARMUP", min(30.0, seconds / 4)),
            memory_limit=env_number("SOAK_MEMORY_LIMIT", 10),
            report=Path(os.environ.get("SOAK_REPORT") or ROOT / "bench" / "results" / "soak.md").resolve(),
            work=Path(os.environ.get("SOAK_DIR") or ROOT / "bench" / ".run" / f"soak-{stamp}-{os.getpid()}").resolve(),
        )

    def check(self) -> None:
        if self.seconds <= 0 or self.restart_every <= 0 or self.rate <= 0 or self.clients < 1 or self.workers < 1:
            raise SystemExit("soak: SOAK_SECONDS, SOAK_RESTART_EVERY, SOAK_RATE, SOAK_CLIENTS, SOAK_WORKERS: above 0")
        if self.trust_after >= self.restart_every - 1:
            raise SystemExit("soak: SOAK_TRUST_AFTER must end a second before the next restart (SOAK_RESTART_EVERY)")

    def environment(self) -> str:
        return (
            f"SOAK_SECONDS={self.seconds:g} SOAK_RESTART_EVERY={self.restart_every:g} SOAK_WORKERS={self.workers} "
            f"SOAK_CLIENTS={self.clients} SOAK_RATE={self.rate:g} SOAK_COOLDOWN={self.cooldown:g} "
            f"SOAK_TRUST_AFTER={self.trust_after:g} SOAK_WARMUP={self.warmup:g} SOAK_MEMORY_LIMIT={self.memory_limit:g}"
        )


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"soak: not within {timeout:g}s: {what}")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen | None, wait: float = 30.0) -> None:
    """SIGTERM to *proc*'s process group (it was started in its own session), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def der_of(pem_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


def sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


class InstanceProcess:
    """One ``demo/instance.py`` process, restartable on its port, optionally with a new certificate."""

    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.work = work
        self.port = free_port()
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        #: Every process started for this instance, restarts included.
        self.pids: list[int] = []
        self.new_certificate()

    def new_certificate(self) -> None:
        self.generation += 1
        self.cert = self.work / f"instance_{self.name}_{self.generation}.pem"
        self.key = self.work / f"instance_{self.name}_{self.generation}.key"
        make_self_signed(self.cert, self.key, "127.0.0.1", f"soak instance {self.name} #{self.generation}")
        self.der = der_of(self.cert)

    def start(self) -> None:
        log = open(self.work / f"instance_{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo.instance", "--host", "127.0.0.1", "--port", str(self.port),
             "--cert", str(self.cert), "--key", str(self.key), "--name", self.name],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.pids.append(self.proc.pid)
        wait_until(lambda: self.proc.poll() is not None or accepts(self.port), f"instance {self.name} listening")
        if self.proc.poll() is not None:
            raise RuntimeError(f"soak: instance {self.name} exited with {self.proc.returncode}")

    def stop(self) -> tuple[float, float]:
        """SIGTERM and reap; returns (when SIGTERM was sent, when the process was gone)."""
        sent = time.monotonic()
        stop_process(self.proc, wait=10)
        return sent, time.monotonic()


BOOTED = re.compile(r"Booting worker with pid: (\d+)")


class Balancer:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on the soak's configuration."""

    def __init__(self, config: Path, port: int, workers: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.workers = workers
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(self.config)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        wait_until(lambda: self.proc.poll() is not None or self.ready(), f"{self.workers} workers ready", 60)
        if self.proc.poll() is not None:
            raise RuntimeError(f"soak: gunicorn exited with {self.proc.returncode}; see {self.log_path}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def booted(self) -> list[int]:
        return [int(pid) for pid in BOOTED.findall(self.log())]

    def ready(self) -> bool:
        # A worker logs its first line of its own (the plain-HTTP warning) once
        # its signal handlers are set: a SIGTERM before that would be lost.
        text = self.log()
        pids = self.booted()
        return len(pids) >= self.workers and accepts(self.port) and all(
            any(f"[{pid}] " in line and "Booting worker" not in line for line in text.splitlines()) for pid in pids
        )

    def worker_pids(self) -> list[int]:
        """The master's children now, from /proc."""
        assert self.proc is not None
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == self.proc.pid:
                found.append(int(entry))
        return sorted(found)

    def stop(self) -> None:
        stop_process(self.proc, wait=90)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Failure:
    """A request that did not end in a checked 200."""

    kind: str
    started: float
    ended: float
    status: int  # 0: no answer
    error: str  # the balancer's error code, or what went wrong
    port: int | None = None
    detail: str = ""
    verdict: str = "unexpected"


@dataclass
class Tally:
    sent: collections.Counter = field(default_factory=collections.Counter)  # kind -> n
    answered: collections.Counter = field(default_factory=collections.Counter)  # (kind, status) -> n
    served_by: collections.Counter = field(default_factory=collections.Counter)  # instance name -> n (checked 200)
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)


class Load:
    """Client threads, each on its own keep-alive connection, at SOAK_RATE requests/s in all."""

    def __init__(self, port: int, clients: int, rate: float, until: float, clock) -> None:
        self.port = port
        self.until = until
        self.clock = clock
        self.interval = clients / rate
        self.tally = Tally()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(120)

    def _run(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=90)
        n = index  # clients start at different places in the mix
        next_at = self.clock() + index * self.interval / max(len(self.threads), 1)
        try:
            while not self.stopping.is_set():
                now = self.clock()
                if now >= self.until:
                    return
                if next_at > now:
                    time.sleep(min(next_at - now, 0.5))
                    continue
                next_at = max(next_at + self.interval, now - 1.0)  # no burst after a stall
                method, path = MIX[n % len(MIX)]
                self._one(conn, method, path, f"{index}-{n}")
                n += 1
        finally:
            conn.close()

    def _one(self, conn: http.client.HTTPConnection, method: str, path: str, tag: str) -> None:
        kind = KIND[(method, path)]
        body = json.dumps({"url": f"http://example.com/{tag}"}).encode() if method == "POST" else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        started = self.clock()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # the next request opens a new connection
            self._record(kind, Failure(kind, started, self.clock(), 0, type(exc).__name__, detail=str(exc)[:200]))
            return
        ended = self.clock()
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status == 200 and isinstance(answer, dict) and self._checked(method, path, body, answer):
            with self.lock:
                self.tally.sent[kind] += 1
                self.tally.answered[(kind, 200)] += 1
                self.tally.served_by[answer["instance"]] += 1
                self.tally.ok += 1
            return
        if isinstance(answer, dict) and isinstance(answer.get("error"), str) and status != 200:
            port = answer.get("port") if isinstance(answer.get("port"), int) else None
            failure = Failure(kind, started, ended, status, answer["error"], port, str(answer.get("description"))[:300])
        else:
            failure = Failure(kind, started, ended, status, "unexpected answer", detail=data[:200].decode("latin-1"))
        self._record(kind, failure)

    @staticmethod
    def _checked(method: str, path: str, body: bytes | None, answer: dict) -> bool:
        if answer.get("instance") not in ("A", "B"):
            return False
        if method == "GET":
            return answer.get("suppliers") == SUPPLIERS
        return answer.get("method") == "POST" and answer.get("target") == path and answer.get("body") == body.decode()

    def _record(self, kind: str, failure: Failure) -> None:
        with self.lock:
            self.tally.sent[kind] += 1
            self.tally.answered[(kind, failure.status)] += 1
            self.tally.failures.append(failure)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Restart:
    at: float  # seconds into the run
    instance: InstanceProcess
    rotate: bool
    sent: float = 0.0  # clock when SIGTERM was sent
    gone: float = 0.0  # clock when the old process was reaped
    up: float = 0.0  # clock when the new one accepted connections
    new_sha256: str = ""


@dataclass
class Trust:
    at: float
    instance: InstanceProcess
    started: float = 0.0
    done: float = 0.0
    returncode: int | None = None
    output: str = ""


def schedule(settings: Settings, a: InstanceProcess, b: InstanceProcess) -> tuple[list[Restart], Trust | None]:
    """Restarts every restart_every seconds, A then B; the one nearest the middle rotates."""
    restarts = []
    k = 1
    while k * settings.restart_every <= settings.seconds - settings.restart_every / 2:
        restarts.append(Restart(k * settings.restart_every, a if k % 2 else b, rotate=False))
        k += 1
    if not restarts:
        return restarts, None
    middle = min(restarts, key=lambda r: abs(r.at - settings.seconds / 2))
    middle.rotate = True
    return restarts, Trust(middle.at + settings.trust_after, middle.instance)


def classify(failures: list[Failure], restarts: list[Restart], trust: Trust | None, rotated_port: int | None) -> None:
    """Set each failure's verdict: an expected reason, or unexpected."""
    rotation = next((r for r in restarts if r.rotate), None)
    for f in failures:
        if (
            f.status == 500
            and f.error == "certificate_mismatch"
            and rotation is not None
            and trust is not None
            and f.port == rotated_port
            and rotation.sent <= f.started <= trust.done + PICKUP
        ):
            f.verdict = "500 certificate_mismatch between rotation and trust"
        elif (
            f.status == 502
            and f.error == "instance_failed"
            and f.kind == KIND[ONCE_POST]
            and any(
                f.port == r.instance.port and f.started <= r.gone + RESTART_SLACK and f.ended >= r.sent
                for r in restarts
            )
        ):
            f.verdict = "502 non-repeatable POST in flight during a restart"


def run(settings: Settings) -> dict:
    settings.work.mkdir(parents=True, exist_ok=True)
    clock = time.monotonic
    a, b = InstanceProcess("A", settings.work), InstanceProcess("B", settings.work)
    original = {"A": a.der, "B": b.der}
    api_port = free_port()
    config = settings.work / "kl_balancer.conf"
    config.write_text(
        CONFIG.format(api_port=api_port, port_a=a.port, port_b=b.port, workers=settings.workers,
                      cooldown=f"{settings.cooldown:g}")
    )
    balancer = Balancer(config, api_port, settings.workers, settings.work / "balancer.log")
    restarts, trust = schedule(settings, a, b)
    load: Load | None = None
    result: dict = {"settings": settings.environment(), "failures": []}
    try:
        a.start()
        b.start()
        balancer.start()
        workers = balancer.worker_pids()
        if len(workers) != settings.workers:
            raise RuntimeError(f"soak: expected {settings.workers} workers, found {workers}")
        samples: list[tuple[float, dict[int, int | None]]] = [(0.0, {pid: rss_kib(pid) for pid in workers})]
        t0 = clock()
        load = Load(api_port, settings.clients, settings.rate, t0 + settings.seconds, clock)
        load.start()

        events: list[tuple[float, str, object]] = [(settings.warmup, "baseline", None)]
        events += [(settings.seconds * i / 10, "sample", None) for i in range(1, 10)]
        events += [(r.at, "restart", r) for r in restarts]
        if trust is not None:
            events.append((trust.at, "trust", trust))
        events.sort(key=lambda e: e[0])
        baseline: dict[int, int | None] = {}
        log_line(f"soak: {settings.environment()}; balancer on 127.0.0.1:{api_port}, "
                 f"instances A :{a.port}, B :{b.port}; work dir {settings.work}")
        for at, what, item in events:
            while clock() < t0 + at:
                time.sleep(min(0.2, t0 + at - clock()))
            if what == "baseline":
                baseline = {pid: rss_kib(pid) for pid in workers}
                samples.append((clock() - t0, baseline))
            elif what == "sample":
                samples.append((clock() - t0, {pid: rss_kib(pid) for pid in workers}))
            elif what == "restart":
                restart_instance(item)  # type: ignore[arg-type]
                r: Restart = item  # type: ignore[assignment]
                log_line(f"soak: {clock() - t0:6.1f}s {'rotated' if r.rotate else 'restarted'} instance "
                         f"{r.instance.name}, down {r.up - r.sent:.2f}s")
            elif what == "trust":
                run_trust(item, config)  # type: ignore[arg-type]
                t: Trust = item  # type: ignore[assignment]
                log_line(f"soak: {clock() - t0:6.1f}s pins trust {t.instance.name}: exit {t.returncode}, "
                         f"{t.done - t.started:.2f}s")
        while clock() < t0 + settings.seconds:
            time.sleep(min(0.2, t0 + settings.seconds - clock()))
        end = {pid: rss_kib(pid) for pid in workers}
        samples.append((clock() - t0, end))
        load.stop()
        elapsed = clock() - t0
        workers_after = balancer.worker_pids()
        references = {
            name: read_der(settings.work / "certs" / f"127.0.0.1_{9999 if name == 'A' else 9998}.pem")
            for name in ("A", "B")
        }
    finally:
        if load is not None:
            load.stop()
        balancer.stop()
        for inst in (a, b):
            inst.stop()

    rotation = next((r for r in restarts if r.rotate), None)
    classify(load.tally.failures, restarts, trust, rotation.instance.port if rotation else None)
    failures: list[str] = []
    unexpected = [f for f in load.tally.failures if f.verdict == "unexpected"]
    if unexpected:
        failures.append(f"{len(unexpected)} requests failed unexpectedly")
    if workers_after != workers:
        failures.append(f"workers replaced during the run: {workers} at the start, {workers_after} at the end")
    if trust is not None and trust.returncode != 0:
        failures.append(f"pins trust exited with {trust.returncode}: {trust.output.strip()[-300:]}")
    for name, inst in (("A", a), ("B", b)):
        if references[name] != inst.der:
            failures.append(f"the reference of instance {name} is not the certificate it presents")
    memory = memory_table(workers, samples[0][1], baseline, end)
    if memory["growth_percent"] is None or memory["growth_percent"] >= settings.memory_limit:
        failures.append(f"workers' RSS grew {memory['growth_percent']} % over the baseline "
                        f"(limit {settings.memory_limit:g} %)")
    tally = load.tally
    expected = collections.Counter(f.verdict for f in tally.failures if f.verdict != "unexpected")
    result.update(
        elapsed=round(elapsed, 1),
        sent=sum(tally.sent.values()),
        ok=tally.ok,
        expected=dict(expected),
        unexpected=len(unexpected),
        unexpected_examples=[{**vars(f), "started": round(f.started - t0, 2), "ended": round(f.ended - t0, 2)}
                             for f in unexpected[:10]],
        by_kind={kind: {str(status): n for (k, status), n in sorted(tally.answered.items()) if k == kind}
                 for kind in KIND.values()},
        sent_by_kind=dict(tally.sent),
        served_by=dict(tally.served_by),
        restarts=[{"at": r.at, "instance": r.instance.name, "rotate": r.rotate,
                   "down_seconds": round(r.up - r.sent, 2), "new_sha256": r.new_sha256} for r in restarts],
        trust=None if trust is None else {"at": trust.at, "instance": trust.instance.name,
                                          "returncode": trust.returncode,
                                          "seconds": round(trust.done - trust.started, 2)},
        references_ok=all(references[n] == i.der for n, i in (("A", a), ("B", b))),
        rotated=rotation is not None and original[rotation.instance.name] != rotation.instance.der,
        memory=memory,
        rss_over_time=[(round(t, 1), round(sum(v or 0 for v in s.values()) / 1024, 1)) for t, s in samples],
        failures=failures,
        pids=sorted([balancer.proc.pid, *workers, *a.pids, *b.pids]),
    )
    return result


def read_der(path: Path) -> bytes | None:
    try:
        return der_of(path)
    except (OSError, ValueError):
        return None


def restart_instance(r: Restart) -> None:
    if r.rotate:
        r.instance.new_certificate()
        r.new_sha256 = sha256(r.instance.der)
    r.sent, r.gone = r.instance.stop()
    r.instance.start()
    r.up = time.monotonic()


def run_trust(t: Trust, config: Path) -> None:
    t.started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "pins", "trust", f"127.0.0.1:{t.instance.port}",
         "--sha256", sha256(t.instance.der)],
        cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(config)}, capture_output=True, text=True, timeout=120,
    )
    t.done = time.monotonic()
    t.returncode = proc.returncode
    t.output = proc.stdout + proc.stderr


def memory_table(workers: list[int], boot: dict, baseline: dict, end: dict) -> dict:
    rows = []
    for pid in workers:
        base, last = baseline.get(pid), end.get(pid)
        growth = None if not base or last is None else round(100.0 * (last - base) / base, 1)
        rows.append({"pid": pid, "boot_kib": boot.get(pid), "baseline_kib": base, "end_kib": last,
                     "growth_percent": growth})
    total_base = sum(baseline.get(pid) or 0 for pid in workers)
    total_end = sum(end.get(pid) or 0 for pid in workers)
    missing = any(baseline.get(pid) is None or end.get(pid) is None for pid in workers)
    growth = None if missing or not total_base else round(100.0 * (total_end - total_base) / total_base, 1)
    return {
        "workers": rows,
        "boot_kib": sum(boot.get(pid) or 0 for pid in workers),
        "baseline_kib": total_base,
        "end_kib": total_end,
        "growth_percent": growth,
    }


# -- report -------------------------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def report(result: dict, settings: Settings) -> str:
    statuses = sorted({int(s) for rows in result["by_kind"].values() for s in rows})
    lines = [
        f"# Soak: {settings.seconds:g} s of mixed load, {settings.workers} workers, 2 instances",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, loopback. Command: `make soak` with `{result['settings']}`.",
        "",
        "| | |",
        "|---|---:|",
        f"| requests sent | {result['sent']} |",
        f"| answered 200, body checked | {result['ok']} |",
    ]
    for reason, n in sorted(result["expected"].items()):
        lines.append(f"| expected: {reason} | {n} |")
    lines += [
        f"| **failed unexpectedly** | **{result['unexpected']}** |",
        f"| 200s served by A / B | {result['served_by'].get('A', 0)} / {result['served_by'].get('B', 0)} |",
        "",
        "| request | sent | " + " | ".join("no answer" if s == 0 else str(s) for s in statuses) + " |",
        "|---|---:|" + "---:|" * len(statuses),
    ]
    for kind, rows in result["by_kind"].items():
        cells = " | ".join(str(rows.get(str(s), 0)) for s in statuses)
        lines.append(f"| {kind} | {result['sent_by_kind'].get(kind, 0)} | {cells} |")
    events = []
    for r in result["restarts"]:
        what = (f"instance {r['instance']} restarted with a new certificate (sha256 {r['new_sha256'][:16]}...)"
                if r["rotate"] else f"instance {r['instance']} restarted")
        events.append((r["at"], f"{what}; refused connections for {r['down_seconds']:.2f} s"))
    if result["trust"]:
        t = result["trust"]
        events.append((t["at"], f"`pins trust` instance {t['instance']}: exit {t['returncode']}, {t['seconds']:.2f} s"))
    lines += ["", "| at (s) | event |", "|---:|---|"]
    lines += [f"| {at:g} | {what} |" for at, what in sorted(events, key=lambda e: e[0])]
    m = result["memory"]
    lines += [
        "",
        f"Workers' RSS in MiB: at boot, after {settings.warmup:g} s of load (baseline), at the end (still under load).",
        "",
        "| worker | boot | baseline | end | growth |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in m["workers"]:
        growth = "-" if row["growth_percent"] is None else f"{row['growth_percent']:+.1f} %"
        lines.append(f"| pid {row['pid']} | {mib(row['boot_kib'])} | {mib(row['baseline_kib'])} | "
                     f"{mib(row['end_kib'])} | {growth} |")
    growth = "-" if m["growth_percent"] is None else f"{m['growth_percent']:+.1f} %"
    lines.append(f"| **all** | {mib(m['boot_kib'])} | {mib(m['baseline_kib'])} | {mib(m['end_kib'])} | **{growth}** |")
    lines += [
        "",
        "RSS of all workers over time (s: MiB): "
        + ", ".join(f"{t:g}: {v:.1f}" for t, v in result["rss_over_time"]),
        "",
    ]
    if result["unexpected_examples"]:
        lines += ["Unexpected failures (first 10):", ""]
        for f in result["unexpected_examples"]:
            lines.append(f"- {f['kind']} at {f['started']:.1f} s: {f['status'] or 'no answer'} {f['error']} "
                         f"{f['detail'][:160]}")
        lines.append("")
    verdict = "PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"])
    lines.append(f"**{verdict}**")
    return "\n".join(lines) + "\n"


def log_line(text: str) -> None:
    print(text, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    settings = Settings.from_env()
    settings.check()
    # SIGTERM (CI's timeout, kill) unwinds like Ctrl-C, through the finally that stops everything.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(settings)
    except KeyboardInterrupt:
        print("soak: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    text = report(result, settings)
    settings.report.parent.mkdir(parents=True, exist_ok=True)
    settings.report.write_text(text)
    settings.report.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(text)
    print(f"soak: report written to {settings.report}")
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
