#!/usr/bin/env python3
"""Benchmark: the balancer against a direct connection and against nginx, in one run.

    make bench                                   # full run, 6 to 10 minutes
    make bench BENCH_SECONDS=2 BENCH_ROUNDS=1    # smoke run, 1 to 2 minutes
    .venv/bin/python bench/run.py --help        # options (they override BENCH_*)

Everything runs on loopback, in a fresh work directory under bench/.run/:

* one HTTPS "instance": nginx, 1 worker, TLS 1.2, keep-alive, serving a 2 KB
  and a 1 MB JSON file at /api/v.1.1/suppliers and /api/v.1.1/big, logging
  per request its connection number, the request's number on that connection
  and whether the TLS session was resumed;
* nginx as a pinned reverse proxy (1 worker, upstream keepalive 32), on plain
  HTTP and on HTTPS;
* the balancer, ``gunicorn -c gunicorn.conf.py wsgi:app`` with 2 workers
  (BENCH_WORKERS), on plain HTTP; then on HTTPS in a later phase;
* the floor (bench/floor/floor_app.py): a bare gunicorn gevent app under the
  balancer's gunicorn settings relaying over kept-alive TLS with http.client,
  the least this stack can do;
* wrk, with contenders alternating (direct, nginx, floor, balancer, direct, ...) for
  BENCH_ROUNDS rounds of BENCH_SECONDS seconds, each after a BENCH_WARMUP
  seconds warm-up run.

Per run it records requests/s, latency p50/p99 (from bench/templates/report.lua),
the CPU time of the proxy's process tree and of the instance per request
(/proc/PID/stat utime+stime), and the TLS handshakes the instance saw. It
prints a table and writes bench/results/latest.md and latest.json.

Environment: BENCH_SECONDS (5), BENCH_ROUNDS (3), BENCH_WARMUP (1),
BENCH_WORKERS (2), BENCH_TIMEOUT (900, whole-run limit in seconds),
BENCH_QUIET_WAIT (90 s) and BENCH_RETRIES (12): budgets for waiting until other
processes on the machine leave the CPUs alone and for re-doing a run they
disturbed, BENCH_PROFILE=1 (record the balancer's workers with py-spy, if
installed, during one extra 2 KB run at 16 connections), BENCH_KEEP=1 (keep
older work dirs under bench/.run/).
"""

from __future__ import annotations

import collections
import ctypes
import datetime
import json
import os
import platform
import pwd
import grp
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TEMPLATES = BENCH / "templates"
RESULTS = BENCH / "results"
RUNS = BENCH / ".run"

SECONDS = int(os.environ.get("BENCH_SECONDS") or 5)
ROUNDS = int(os.environ.get("BENCH_ROUNDS") or 3)
WARMUP = float(os.environ.get("BENCH_WARMUP") or 1)
WORKERS = int(os.environ.get("BENCH_WORKERS") or 2)
TIMEOUT = int(os.environ.get("BENCH_TIMEOUT") or 900)
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
KEEP = os.environ.get("BENCH_KEEP", "") not in ("", "0")

#: Above this many cores used by other processes during a run, it is flagged.
FOREIGN_LIMIT = 0.15
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL = "/api/v.1.1/suppliers"
BIG = "/api/v.1.1/big"
SMALL_SIZE = 2 * 1024
BIG_SIZE = 1024 * 1024
# The name the instance certificate carries and nginx checks (proxy_ssl_name).
INSTANCE_NAME = "127.0.0.1"


class Interrupted(Exception):
    """SIGINT, SIGTERM, SIGHUP or the whole-run alarm."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # If this script dies without cleaning up (SIGKILL), the children get
    # SIGTERM from the kernel instead of living on.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    """A server this run started, in its own process group."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)
        # Workers left in the group after the master (should not happen).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


STARTED: list[Proc] = []


def start(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Proc:
    logf = open(log_path, "ab")
    popen = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_child_setup,
    )
    logf.close()
    proc = Proc(name, popen, log_path)
    STARTED.append(proc)
    return proc


def stop_all() -> None:
    while STARTED:
        proc = STARTED.pop()
        try:
            proc.stop()
        except Exception as exc:  # keep stopping the others
            print(f"[bench] could not stop {proc.name} ({proc.pid}): {exc}", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: Proc, url: str, timeout: float = 30.0, expect: int = 200) -> None:
    """Until *url* answers *expect*; fails with the process log if it exits or never does."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                resp.read()
                if resp.status == expect:
                    return
                last = resp.status
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout}s ({last}):\n{proc.log_tail()}")


# -- /proc -------------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    """*pid* and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children_of(p))
    return out


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime+stime of each process, in clock ticks."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = int(fields[11]) + int(fields[12])
    return out


def system_busy_ticks() -> int:
    """Machine-wide non-idle CPU time (all CPUs), in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user].
    # irq and softirq are left out: loopback traffic is mostly softirq work done
    # for this benchmark's own processes but charged to none of them.
    return fields[0] + fields[1] + fields[2] + fields[7]


def own_ticks() -> float:
    """CPU time of this script and of its finished children (wrk), in ticks."""
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * CLK_TCK


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# -- set-up --------------------------------------------------------------------------------


def render(template: str, dest: Path, **values: object) -> Path:
    text = (TEMPLATES / template).read_text()

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"{template}: no value for {{{{{key}}}}}")
        return str(values[key])

    dest.write_text(re.sub(r"\{\{(\w+)\}\}", sub, text))
    return dest


def json_of_size(size: int, label: str) -> bytes:
    """Valid JSON of exactly *size* bytes: a list of supplier-like records, padded."""

    def doc(n: int, pad: int = 0) -> bytes:
        records = [{"name": f"Bench {label} Data Feed {i}", "format": "json", "records": 1000 + i} for i in range(n)]
        return json.dumps({"suppliers": records, "pad": "x" * pad}).encode()

    lo, hi = 0, size // 40  # largest n with len(doc(n)) <= size (a record is > 40 bytes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(doc(mid)) <= size else (lo, mid - 1)
    n = lo
    data = doc(n, size - len(doc(n)))
    assert len(data) == size, (len(data), size)
    json.loads(data)
    return data


def make_cert(cert: Path, key: Path, host: str, name: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "demo" / "instance.py"), "--make-cert", str(cert), str(key), "--host", host, "--name", name],
        check=True,
        cwd=ROOT,
    )


def user_directive() -> str:
    """As root, run nginx's workers as root too: the work dir is private."""
    if os.geteuid() != 0:
        return "# not root: workers run as the current user"
    pw = pwd.getpwuid(os.geteuid())
    return f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};"


def start_nginx(name: str, conf: Path, work: Path, probe: str) -> Proc:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run(
        [nginx, "-t", "-q", "-p", str(work), "-c", str(conf), "-e", str(work / f"{name}.error.log")],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {conf}:\n{check.stdout}{check.stderr}")
    proc = start(
        name,
        [nginx, "-p", str(work), "-c", str(conf), "-e", str(work / f"{name}.error.log")],
        work / f"{name}.out.log",
    )
    wait_ready(proc, probe)
    return proc


def start_balancer(name: str, work: Path, instance_port: int, workers: int, tls: bool) -> tuple[Proc, int, str]:
    port = free_port()
    tls_xml = ""
    if tls:
        tls_xml = (
            f"  <SSLCertificatePath>{work / 'front.pem'}</SSLCertificatePath>\n"
            f"  <SSLPrivateKeyPath>{work / 'front.key'}</SSLPrivateKeyPath>\n"
        )
    conf = render(
        "kl_balancer.conf",
        work / f"{name}.conf",
        api_port=port,
        tls=tls_xml,
        cert_dir=work / "pins",
        instance_port=instance_port,
        workers=workers,
    )
    env = {"BALANCER_CONFIG": str(conf), "BALANCER_WORKERS": str(workers), "BALANCER_LOG_LEVEL": "WARNING"}
    proc = start(
        name,
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        work / f"{name}.log",
        env=env,
    )
    scheme = "https" if tls else "http"
    base = f"{scheme}://127.0.0.1:{port}"
    wait_ready(proc, base + SMALL, timeout=60)
    # Every worker booted (each answers the probe only once it is up).
    deadline = time.monotonic() + 30
    while len(tree(proc.pid)) < workers + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc, port, base


def shared_state_cost(work: Path, pairs: int = 200_000) -> dict:
    """CPU per request of the node-wide state (app/shared.py) against a worker's own, in this process.

    One request takes and frees a slot and reads its instance's health three
    times (queue, admission, verdict); the two halves are timed separately.
    (Counts go to the metrics' per-worker memory-mapped files, as without it.)
    """
    import threading

    sys.path.insert(0, str(ROOT))
    from app.health import Health
    from app.selection import Slots
    from app.shared import NodeSlots, NodeState

    def per_pair(action) -> float:  # type: ignore[no-untyped-def]
        started = time.process_time()
        for _ in range(pairs):
            action()
        return (time.process_time() - started) / pairs * 1e6

    local_slots, node_slots = Slots(100, threading.Condition()), NodeSlots(work / "slots-bench", 100, threading.Condition())
    local_health = Health("bench", 1, 10.0)
    node_health = Health("bench", 1, 10.0, state=NodeState(work / "health-bench"))

    def slot_pair(slots):  # type: ignore[no-untyped-def]
        return lambda: (slots.try_acquire(), slots.release())

    def health_reads(health):  # type: ignore[no-untyped-def]
        return lambda: (health.admissible(), health.admit(), health.succeeded())

    result = {
        "slots_worker_us": per_pair(slot_pair(local_slots)),
        "slots_node_us": per_pair(slot_pair(node_slots)),
        "health_worker_us": per_pair(health_reads(local_health)),
        "health_node_us": per_pair(health_reads(node_health)),
    }
    result["added_us"] = (result["slots_node_us"] + result["health_node_us"]) - (
        result["slots_worker_us"] + result["health_worker_us"]
    )
    log(f"shared state: {result['added_us']:.1f} us added per request ({result})")
    return result


def scrape_time(base: str, rounds: int = 20) -> float:
    """Median milliseconds of one /_balancer/metrics scrape."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        _fetch(base + "/_balancer/metrics")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def start_floor(work: Path, instance_port: int, workers: int) -> tuple[Proc, str]:
    """The floor contender (bench/floor/floor_app.py) under the balancer's gunicorn settings, on plain HTTP."""
    port = free_port()
    conf = render(
        "kl_balancer.conf", work / "floor.conf", api_port=port, tls="", cert_dir=work / "floor-pins",
        instance_port=instance_port, workers=workers,
    )
    env = {
        "BALANCER_CONFIG": str(conf),
        "BALANCER_WORKERS": str(workers),
        "BALANCER_LOG_LEVEL": "WARNING",
        "FLOOR_ROOT": str(ROOT),
        "FLOOR_INSTANCE": f"127.0.0.1:{instance_port}",
        "PYTHONPATH": str(ROOT / "bench" / "floor"),
    }
    proc = start(
        "floor",
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "bench" / "floor" / "gunicorn.conf.py"), "floor_app:app"],
        work / "floor.log",
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + SMALL, timeout=60)
    deadline = time.monotonic() + 30
    while len(tree(proc.pid)) < workers + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc, base


# -- wrk ------------------------------------------------------------------------------------


@dataclass
class Contender:
    key: str  # direct, nginx, balancer, balancer-1w ...
    label: str
    base: str
    proc: Proc | None  # the proxy whose process tree is charged; None for direct


@dataclass
class Scenario:
    key: str
    label: str
    path: str
    conns: int
    body_size: int
    contenders: list[Contender]
    runs: dict[str, list[dict]] = field(default_factory=lambda: collections.defaultdict(list))
    discarded: list[dict] = field(default_factory=list)


def wrk(url: str, conns: int, seconds: float) -> dict:
    threads = max(1, min(2, conns))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(TEMPLATES / "report.lua"),
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=_child_setup)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line[len("WRK_RESULT ") :])
    raise RuntimeError(f"wrk gave no result for {url}:\n{out.stdout}\n{out.stderr}")


class InstanceLog:
    """The instance's access log: one line per request, read and emptied between runs."""

    FLUSH_WAIT = 0.35  # above the log's flush=100ms

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        time.sleep(self.FLUSH_WAIT)
        # nginx opened it with O_APPEND: after truncation it writes at the new end.
        os.truncate(self.path, 0)

    def collect(self) -> dict:
        time.sleep(self.FLUSH_WAIT)
        lines = new_conns = resumed = reused = ok = 0
        conns = set()
        with open(self.path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5:
                    continue
                lines += 1
                conns.add(parts[0])
                if parts[1] == "1":
                    new_conns += 1
                    if parts[2] == "r":
                        resumed += 1
                else:
                    reused += 1
                if parts[3] == "200":
                    ok += 1
        return {
            "requests": lines,
            "ok": ok,
            "connections": len(conns),
            "handshakes": new_conns,
            "resumed_handshakes": resumed,
            "reused_requests": reused,
        }


class Budget:
    """Seconds of waiting for a quiet machine and re-runs this whole run may spend.

    Shared out over the scenarios still to come, so that the first ones cannot
    use it all up; what one scenario leaves goes on to the next.
    """

    total_wait = float(os.environ.get("BENCH_QUIET_WAIT") or 90)
    total_retries = int(os.environ.get("BENCH_RETRIES") or 12)
    scenarios_left = 6  # set by bench()
    wait_left = 0.0
    retries_left = 0
    waited = 0.0
    retried = 0

    @classmethod
    def open_scenario(cls) -> None:
        n = max(1, cls.scenarios_left)
        cls.wait_left = (cls.total_wait - cls.waited) / n
        cls.retries_left = -(-(cls.total_retries - cls.retried) // n)  # ceiling
        cls.scenarios_left -= 1


def foreign_now(interval: float = 0.5) -> float:
    """Cores used by processes that are not this benchmark's, over *interval* seconds."""
    ours = sorted({p for proc in STARTED if proc.alive() for p in tree(proc.pid)})
    b_ours, b_sys, b_self = cpu_ticks(ours), system_busy_ticks(), own_ticks()
    time.sleep(interval)
    a_ours, a_sys, a_self = cpu_ticks(ours), system_busy_ticks(), own_ticks()
    mine = sum(a_ours.get(p, 0) - b_ours[p] for p in b_ours) + (a_self - b_self)
    return max(0.0, (a_sys - b_sys) - mine) / CLK_TCK / interval


def wait_quiet() -> None:
    """Wait (within the run's budget) until other processes leave the CPUs alone."""
    start = time.monotonic()
    while Budget.wait_left > 0:
        load = foreign_now()
        if load <= FOREIGN_LIMIT:
            break
        Budget.wait_left -= 0.5
        Budget.waited += 0.5
    Budget.wait_time = getattr(Budget, "wait_time", 0.0) + time.monotonic() - start


def measure(sc: Scenario, c: Contender, instance: Proc, ilog: InstanceLog) -> dict:
    url = c.base + sc.path
    if WARMUP > 0:
        wrk(url, sc.conns, WARMUP)
    ilog.reset()
    proxy_pids = tree(c.proc.pid) if c.proc else []
    inst_pids = tree(instance.pid)
    ours = sorted({p for proc in STARTED if proc.alive() for p in tree(proc.pid)})
    before_proxy, before_inst = cpu_ticks(proxy_pids), cpu_ticks(inst_pids)
    before_ours, before_sys, before_self = cpu_ticks(ours), system_busy_ticks(), own_ticks()
    res = wrk(url, sc.conns, SECONDS)
    after_proxy, after_inst = cpu_ticks(proxy_pids), cpu_ticks(inst_pids)
    after_ours, after_sys, after_self = cpu_ticks(ours), system_busy_ticks(), own_ticks()
    upstream = ilog.collect()
    n = max(res["requests"], 1)
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["avg_bytes"] = res["bytes"] / n
    if c.proc:
        vanished = set(before_proxy) - set(after_proxy)
        ticks = sum(after_proxy.get(p, 0) - before_proxy[p] for p in before_proxy)
        res["proxy_cpu_s"] = ticks / CLK_TCK
        res["proxy_cpu_us_per_req"] = ticks / CLK_TCK * 1e6 / n
        if vanished:
            res["proxy_pids_vanished"] = sorted(vanished)
        # How the work fell on the workers (the master's share is tiny): with
        # keep-alive, a connection stays on the worker that accepted it.
        workers = [p for p in before_proxy if p != c.proc.pid]
        per = {p: after_proxy.get(p, 0) - before_proxy[p] for p in workers}
        if len(per) > 1 and sum(per.values()):
            res["worker_cpu_share"] = sorted((round(v / sum(per.values()), 3) for v in per.values()), reverse=True)
    inst_ticks = sum(after_inst.get(p, 0) - before_inst[p] for p in before_inst)
    res["instance_cpu_us_per_req"] = inst_ticks / CLK_TCK * 1e6 / n
    # CPU used meanwhile by processes that are not this benchmark's (other
    # users of the machine): a run with much of it is not comparable.
    ours_ticks = sum(after_ours.get(p, 0) - before_ours[p] for p in before_ours) + (after_self - before_self)
    wall = res["duration_us"] / 1e6
    res["foreign_cpu_cores"] = max(0.0, (after_sys - before_sys) - ours_ticks) / CLK_TCK / wall
    res["machine_busy_cores"] = (after_sys - before_sys) / CLK_TCK / wall
    res["upstream"] = upstream
    up_n = max(upstream["requests"], 1)
    res["upstream_reused_pct"] = 100.0 * upstream["reused_requests"] / up_n
    res["handshakes_per_1k"] = 1000.0 * upstream["handshakes"] / up_n
    res["resumed_pct"] = (
        100.0 * upstream["resumed_handshakes"] / upstream["handshakes"] if upstream["handshakes"] else None
    )
    errs = sum(res["errors"].values())
    res["error_count"] = errs
    return res


def run_scenario(sc: Scenario, instance: Proc, ilog: InstanceLog) -> None:
    Budget.open_scenario()
    log(f"{sc.label}: {', '.join(c.key for c in sc.contenders)} x {ROUNDS} rounds of {SECONDS}s")
    for r in range(ROUNDS):
        for c in sc.contenders:
            if c.proc and not c.proc.alive():
                raise RuntimeError(f"{c.proc.name} died:\n{c.proc.log_tail()}")
            while True:
                wait_quiet()
                res = measure(sc, c, instance, ilog)
                res["round"] = r + 1
                if res["foreign_cpu_cores"] <= FOREIGN_LIMIT or Budget.retries_left <= 0:
                    break
                Budget.retries_left -= 1
                Budget.retried += 1
                sc.discarded.append({"contender": c.key, **res})
                log(
                    f"  round {r + 1} {c.key:<12} {res['rps']:>9.0f} req/s discarded: other processes used "
                    f"{res['foreign_cpu_cores']:.2f} cores; once more"
                )
            sc.runs[c.key].append(res)
            cpu = f"  cpu {res['proxy_cpu_us_per_req']:.0f} us/req" if "proxy_cpu_us_per_req" in res else ""
            if res.get("worker_cpu_share"):
                cpu += "  workers " + "/".join(f"{100 * x:.0f}%" for x in res["worker_cpu_share"])
            warn = f"  ERRORS {res['errors']}" if res["error_count"] else ""
            if res["foreign_cpu_cores"] > FOREIGN_LIMIT:
                warn += f"  OTHER LOAD {res['foreign_cpu_cores']:.2f} cores"
            log(
                f"  round {r + 1} {c.key:<12} {res['rps']:>9.0f} req/s  p50 {res['p50_us'] / 1000:.2f} ms"
                f"  p99 {res['p99_us'] / 1000:.2f} ms{cpu}  upstream reuse {res['upstream_reused_pct']:.1f}%"
                f" ({res['upstream']['handshakes']} handshakes){warn}"
            )


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(sc: Scenario) -> dict:
    out: dict = {
        "key": sc.key,
        "label": sc.label,
        "path": sc.path,
        "connections": sc.conns,
        "body_bytes": sc.body_size,
        "contenders": {},
    }
    for c in sc.contenders:
        runs = sc.runs[c.key]
        out["contenders"][c.key] = {
            "label": c.label,
            "url": c.base + sc.path,
            "median": {
                "rps": med([r["rps"] for r in runs]),
                "p50_ms": med([r["p50_us"] / 1000 for r in runs]),
                "p99_ms": med([r["p99_us"] / 1000 for r in runs]),
                "proxy_cpu_us_per_req": med([r.get("proxy_cpu_us_per_req") for r in runs]),
                "instance_cpu_us_per_req": med([r["instance_cpu_us_per_req"] for r in runs]),
                "upstream_reused_pct": med([r["upstream_reused_pct"] for r in runs]),
                "handshakes_per_1k": med([r["handshakes_per_1k"] for r in runs]),
                "handshakes": med([r["upstream"]["handshakes"] for r in runs]),
                "resumed_pct": med([r.get("resumed_pct") for r in runs]),
                "foreign_cpu_cores": med([r["foreign_cpu_cores"] for r in runs]),
                "busiest_worker_share": med([r["worker_cpu_share"][0] for r in runs if r.get("worker_cpu_share")]),
                "avg_bytes": med([r["avg_bytes"] for r in runs]),
            },
            "rps_runs": [round(r["rps"], 1) for r in runs],
            "errors": sum(r["error_count"] for r in runs),
            "runs": runs,
        }
    out["discarded_runs"] = sc.discarded
    meds = {k: v["median"] for k, v in out["contenders"].items()}
    ratios = {}
    bal = next((k for k in meds if k.startswith("balancer")), None)
    if bal:
        for other in ("nginx", "floor", "direct"):
            if other in meds and meds[other]["rps"]:
                ratios[f"{bal}/{other}"] = {
                    "rps": meds[bal]["rps"] / meds[other]["rps"],
                    "p50": meds[bal]["p50_ms"] / meds[other]["p50_ms"] if meds[other]["p50_ms"] else None,
                    "p99": meds[bal]["p99_ms"] / meds[other]["p99_ms"] if meds[other]["p99_ms"] else None,
                }
        for other in ("nginx", "floor"):
            if other in meds and meds[other]["proxy_cpu_us_per_req"] and meds[bal]["proxy_cpu_us_per_req"]:
                ratios[f"{bal}/{other}"]["cpu_per_req"] = (
                    meds[bal]["proxy_cpu_us_per_req"] / meds[other]["proxy_cpu_us_per_req"]
                )
    out["ratios"] = ratios
    return out


def memory_snapshot(proc: Proc, label: str) -> list[dict]:
    rows = []
    for pid in tree(proc.pid):
        role = "master" if pid == proc.pid else "worker"
        rows.append(
            {
                "process": label,
                "role": role,
                "pid": pid,
                "vmhwm_kib": status_kib(pid, "VmHWM"),
                "vmrss_kib": status_kib(pid, "VmRSS"),
            }
        )
    return rows


# -- profiling (optional) -----------------------------------------------------------------------


def profile_balancer(bal: Contender, work: Path) -> dict | None:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy or not bal.proc:
        log("BENCH_PROFILE: py-spy not found (pip install py-spy into .venv); skipped")
        return None
    workers = [p for p in tree(bal.proc.pid) if p != bal.proc.pid]
    secs = max(SECONDS, 5)
    spies = []
    for pid in workers:
        out = work / f"pyspy-{pid}.txt"
        spies.append(
            (
                out,
                subprocess.Popen(
                    [pyspy, "record", "--pid", str(pid), "--duration", str(secs), "--rate", "200",
                     "--format", "raw", "--output", str(out), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=_child_setup,
                ),
            )
        )
    time.sleep(0.5)
    wrk(bal.base + SMALL, 16, secs)
    for _, spy in spies:
        try:
            spy.wait(secs + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    total = 0
    self_time: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for out, _ in spies:
        if not out.exists():
            continue
        for line in out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            self_time[_frame(frames[-1])] += n
            by_package[_package(frames[-1])] += n
            for f in {_area(fr) for fr in frames}:
                incl[f] += n
    if not total:
        log("BENCH_PROFILE: py-spy recorded nothing")
        return None
    return {
        "samples": total,
        "self_by_package": [(k, round(100 * v / total, 1)) for k, v in by_package.most_common(15)],
        "self_top": [(k, round(100 * v / total, 1)) for k, v in self_time.most_common(25)],
        "inclusive_areas": [(k, round(100 * v / total, 1)) for k, v in incl.most_common(40)],
        "raw_files": [str(o) for o, _ in spies],
    }


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame or "(unknown)"
    return f"{m.group(1)} ({_short(m.group(2))})"


def _package(frame: str) -> str:
    """The package (or stdlib module) a frame's code belongs to."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return "(unknown)"
    return _short(m.group(2)).split("/")[0].removesuffix(".py") or "(unknown)"


def _area(frame: str) -> str:
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    return f"{m.group(1)} ({_short(m.group(2))})" if m else frame


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# -- report --------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)


def build_markdown(data: dict) -> str:
    m = data["meta"]
    lines = [
        "# ctbalancer benchmark",
        "",
        f"{m['date']}, commit {m['commit']}, {m['cpus']} CPUs ({m['cpu_model']}), {m['nginx']}, {m['wrk']}, "
        f"Python {m['python']}.",
        f"wrk runs of {m['seconds']} s after a {m['warmup']} s warm-up, {m['rounds']} rounds, contenders alternating; "
        f"medians over rounds. Balancer: gunicorn + gevent, {m['workers']} workers, scanners_count 100. "
        "nginx: 1 worker, upstream keepalive 32. Instance: nginx, 1 worker, TLS 1.2. All on loopback, "
        "load generator on the same 2 cores.",
        f"Other processes on the machine: before each run the benchmark waits for them to use under "
        f"{FOREIGN_LIMIT} cores, and re-does a run during which they used more (budgeted): "
        f"{m.get('reruns_for_other_load', 0)} run(s) re-done, {m.get('quiet_wait_s', 0)} s spent waiting; "
        f"whole benchmark {m.get('elapsed_s', '?')} s.",
        "",
        "CPU µs/req: utime+stime of the proxy's whole process tree (master + workers) during the run, "
        "divided by requests. Upstream reuse: share of the instance's requests that arrived on an "
        "already-open connection; handshakes/1k: new TLS connections to the instance per 1000 requests "
        "(for direct, wrk's own); resumed %: of those handshakes, the share that resumed a TLS session. "
        "Busiest worker %: the share of the balancer workers' CPU time spent by the busiest one "
        "(50 = even split over 2 workers).",
        "",
        "| scenario | contender | req/s | p50 ms | p99 ms | proxy CPU µs/req | instance CPU µs/req | upstream reuse % | handshakes/1k | resumed % | busiest worker % | errors | req/s per round |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for sc in data["scenarios"]:
        for key, c in sc["contenders"].items():
            md = c["median"]
            lines.append(
                f"| {sc['label']} | {c['label']} | {fmt(md['rps'])} | {fmt(md['p50_ms'], '.2f')} | {fmt(md['p99_ms'], '.2f')} "
                f"| {fmt(md['proxy_cpu_us_per_req'])} | {fmt(md['instance_cpu_us_per_req'])} "
                f"| {fmt(md['upstream_reused_pct'], '.1f')} | {fmt(md['handshakes_per_1k'], '.1f')} "
                f"| {fmt(md['resumed_pct'], '.0f')} | {fmt(_pct(md['busiest_worker_share']), '.0f')} | {c['errors']} "
                f"| {', '.join(f'{x:.0f}' for x in c['rps_runs'])} |"
            )
    lines += [
        "",
        "## Ratios (medians)",
        "",
        "| scenario | ratio | req/s | p50 | p99 | proxy CPU/req |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for sc in data["scenarios"]:
        for name, r in sc["ratios"].items():
            lines.append(
                f"| {sc['label']} | {name} | {fmt(r['rps'], '.3f')} | {fmt(r.get('p50'), '.2f')} | {fmt(r.get('p99'), '.2f')} "
                f"| {fmt(r.get('cpu_per_req'), '.1f')} |"
            )
    s = data.get("scaling")
    if s:
        lines += [
            "",
            "## Balancer workers: 1 vs 2 (2 KB, 16 connections, plain HTTP)",
            "",
            "| workers | req/s (median) | p50 ms | p99 ms | CPU µs/req | busiest worker % | req/s per round |",
            "|--:|--:|--:|--:|--:|--:|---|",
        ]
        for key, c in s["contenders"].items():
            md = c["median"]
            lines.append(
                f"| {c['label']} | {fmt(md['rps'])} | {fmt(md['p50_ms'], '.2f')} | {fmt(md['p99_ms'], '.2f')} "
                f"| {fmt(md['proxy_cpu_us_per_req'])} | {fmt(_pct(md['busiest_worker_share']), '.0f')} "
                f"| {', '.join(f'{x:.0f}' for x in c['rps_runs'])} |"
            )
        lines += ["", f"2 workers / 1 worker throughput: **{fmt(s['ratio_2w_1w'], '.2f')}**"]
    st = data.get("shared_state")
    if st:
        lines += [
            "",
            "## Node-wide state, CPU per request (one process, 200,000 rounds)",
            "",
            "| | a worker's own | the node's |",
            "|---|--:|--:|",
            f"| take and free a scanners_count slot | {st['slots_worker_us']:.2f} µs | {st['slots_node_us']:.2f} µs |",
            f"| health: admissible, admit, succeeded | {st['health_worker_us']:.2f} µs | {st['health_node_us']:.2f} µs |",
            "",
            f"Added per request by the node-wide state: **{st['added_us']:.1f} µs**.",
        ]
    sc = data.get("scrape")
    if sc:
        lines += [
            "",
            f"Metrics scrape (median of 20, HTTPS balancer): {sc['fresh_ms']:.1f} ms fresh, "
            f"{sc['after_restarts_ms']:.1f} ms after {sc['restarts']} workers were SIGKILLed.",
        ]
    lines += [
        "",
        "## Memory",
        "",
        "| process | role | pid | peak (VmHWM) MiB | RSS MiB | when |",
        "|---|---|--:|--:|--:|---|",
    ]
    for row in data["memory"]:
        lines.append(
            f"| {row['process']} | {row['role']} | {row['pid']} | {fmt(_mib(row['vmhwm_kib']), '.1f')} "
            f"| {fmt(_mib(row['vmrss_kib']), '.1f')} | {row['when']} |"
        )
    p = data.get("profile")
    if p:
        lines += [
            "",
            f"## Balancer profile (py-spy, both workers, 2 KB at 16 connections, {p['samples']} samples)",
            "",
            "Where the samples were (inclusive, % of samples; one frame may contain others):",
            "",
            "| frame | % |",
            "|---|--:|",
        ]
        for name, pct in p["inclusive_areas"]:
            lines.append(f"| `{name}` | {pct} |")
        lines += ["", "Self time by package (the frame on top of the stack when sampled):", "", "| package | % |", "|---|--:|"]
        for name, pct in p["self_by_package"]:
            lines.append(f"| `{name}` | {pct} |")
        lines += ["", "Self time (top frames):", "", "| frame | % |", "|---|--:|"]
        for name, pct in p["self_top"]:
            lines.append(f"| `{name}` | {pct} |")
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except Exception:
        return "?"


def meta() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "wsgi.py", "gunicorn.conf.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + ("+dirty" if dirty else ""),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "nginx": tool_version(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": tool_version(["wrk", "--version"]).split(" [")[0],
        "python": platform.python_version(),
        "seconds": SECONDS,
        "rounds": ROUNDS,
        "warmup": WARMUP,
        "workers": WORKERS,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def print_table(data: dict) -> None:
    print()
    hdr = f"{'scenario':<26} {'contender':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10} {'inst us/req':>11} {'reuse %':>8} {'hs/1k':>7} {'busy w%':>7} {'err':>5}"
    print(hdr)
    print("-" * len(hdr))
    for sc in data["scenarios"]:
        for key, c in sc["contenders"].items():
            md = c["median"]
            print(
                f"{sc['label']:<26} {c['label']:<22} {fmt(md['rps']):>9} {fmt(md['p50_ms'], '.2f'):>8} {fmt(md['p99_ms'], '.2f'):>8} "
                f"{fmt(md['proxy_cpu_us_per_req']):>10} {fmt(md['instance_cpu_us_per_req']):>11} "
                f"{fmt(md['upstream_reused_pct'], '.1f'):>8} {fmt(md['handshakes_per_1k'], '.1f'):>7} "
                f"{fmt(_pct(md['busiest_worker_share']), '.0f'):>7} {c['errors']:>5}"
            )
        for name, r in sc["ratios"].items():
            print(f"{'':<26} {'ratio ' + name:<22} {fmt(r['rps'], '.3f'):>9} {fmt(r.get('p50'), '.2f'):>8} {fmt(r.get('p99'), '.2f'):>8} {fmt(r.get('cpu_per_req'), '.1f'):>10}")
    s = data.get("scaling")
    if s:
        print()
        for key, c in s["contenders"].items():
            print(f"balancer {c['label']:<10} {fmt(c['median']['rps']):>9} req/s  (2 KB, 16 conns)")
        print(f"2 workers / 1 worker: {fmt(s['ratio_2w_1w'], '.2f')}")
    print()
    for row in data["memory"]:
        print(f"{row['process']:<22} {row['role']:<7} pid {row['pid']:<8} VmHWM {fmt(_mib(row['vmhwm_kib']), '.1f'):>7} MiB  RSS {fmt(_mib(row['vmrss_kib']), '.1f'):>7} MiB  ({row['when']})")
    print()


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> None:
    """Options override the BENCH_* environment variables (the Makefile passes those)."""
    import argparse

    global SECONDS, ROUNDS, WARMUP, WORKERS, TIMEOUT, PROFILE, KEEP
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=SECONDS, help="length of one measured run (BENCH_SECONDS)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of alternation (BENCH_ROUNDS)")
    parser.add_argument("--warmup", type=float, default=WARMUP, help="warm-up run before each run, 0 for none (BENCH_WARMUP)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="balancer workers (BENCH_WORKERS)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT, help="limit for the whole run in seconds (BENCH_TIMEOUT)")
    parser.add_argument("--profile", action="store_true", default=PROFILE, help="py-spy profile of the balancer (BENCH_PROFILE)")
    parser.add_argument("--keep", action="store_true", default=KEEP, help="keep older work dirs (BENCH_KEEP)")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1 or args.workers < 1 or args.warmup < 0:
        parser.error("--seconds, --rounds and --workers must be at least 1, --warmup at least 0")
    SECONDS, ROUNDS, WARMUP, WORKERS = args.seconds, args.rounds, args.warmup, args.workers
    TIMEOUT, PROFILE, KEEP = args.timeout, args.profile, args.keep


#: One benchmark at a time on a machine: two would load each other's CPUs.
LOCK_PATH = Path("/tmp/ctbalancer-bench.lock")


def take_lock() -> object | None:
    import fcntl

    f = open(LOCK_PATH, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        print(f"bench: another benchmark is running on this machine (pid {holder}); try again when it ends",
              file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f  # held until this process exits


def main() -> int:
    parse_args()
    lock = take_lock()
    if lock is None:
        return 3
    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGALRM:
            raise Interrupted(f"the whole run took longer than BENCH_TIMEOUT={TIMEOUT}s")
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, on_signal)
    signal.alarm(TIMEOUT)

    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not (tool == "nginx" and Path("/usr/sbin/nginx").exists()):
            print(f"bench: {tool} not found; `make bench` installs it with apt-get", file=sys.stderr)
            return 2

    RUNS.mkdir(parents=True, exist_ok=True)
    if not KEEP:
        # Earlier runs' work dirs, unless their run is still going.
        for old in RUNS.iterdir():
            m = re.fullmatch(r"run-[\d-]+-(\d+)", old.name)
            if old.is_dir() and m and not _running(int(m.group(1))):
                shutil.rmtree(old, ignore_errors=True)
    work = RUNS / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    (work / "tmp").mkdir(parents=True)
    (work / "www" / "api" / "v.1.1").mkdir(parents=True)
    log(f"work dir {work.relative_to(ROOT)}; {ROUNDS} rounds x {SECONDS}s (+{WARMUP}s warm-up), balancer workers {WORKERS}")

    t0 = time.monotonic()
    try:
        data = bench(work)
    except Interrupted as exc:
        log(f"interrupted ({exc}); stopping everything")
        return 130
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stop_all()
    RESULTS.mkdir(parents=True, exist_ok=True)
    data["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    data["meta"]["quiet_wait_s"] = round(getattr(Budget, "wait_time", 0.0), 1)
    data["meta"]["reruns_for_other_load"] = Budget.retried
    data["meta"]["work_dir"] = str(work.relative_to(ROOT))
    (RESULTS / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(build_markdown(data))
    print_table(data)
    log(f"done in {data['meta']['elapsed_s']} s; wrote bench/results/latest.md and latest.json")
    return 0


def _running(pid: int) -> bool:
    return pid != os.getpid() and Path(f"/proc/{pid}").exists() and "bench/run.py" in cmdline(pid)


def bench(work: Path) -> dict:
    started_meta = meta()
    # Certificates: the instance's (checked by nginx, pinned by the balancer) and
    # the proxies' own for their HTTPS ports.
    make_cert(work / "instance.pem", work / "instance.key", "127.0.0.1", INSTANCE_NAME)
    make_cert(work / "front.pem", work / "front.key", "127.0.0.1", "bench front")
    (work / "www" / "api" / "v.1.1" / "suppliers").write_bytes(json_of_size(SMALL_SIZE, "small"))
    (work / "www" / "api" / "v.1.1" / "big").write_bytes(json_of_size(BIG_SIZE, "big"))

    ports = {k: free_port() for k in ("instance", "proxy_http", "proxy_https")}
    common = dict(prefix=work, user=user_directive(), instance_port=ports["instance"])
    inst_conf = render(
        "instance.nginx.conf",
        work / "instance.nginx.conf",
        **common,
        instance_cert=work / "instance.pem",
        instance_key=work / "instance.key",
        www=work / "www",
    )
    proxy_conf = render(
        "proxy.nginx.conf",
        work / "proxy.nginx.conf",
        **common,
        instance_cert=work / "instance.pem",
        instance_name=INSTANCE_NAME,
        proxy_http_port=ports["proxy_http"],
        proxy_https_port=ports["proxy_https"],
        front_cert=work / "front.pem",
        front_key=work / "front.key",
    )
    direct_base = f"https://127.0.0.1:{ports['instance']}"
    instance = start_nginx("instance", inst_conf, work, direct_base + SMALL)
    proxy = start_nginx("proxy", proxy_conf, work, f"http://127.0.0.1:{ports['proxy_http']}{SMALL}")
    wait_ready(proxy, f"https://127.0.0.1:{ports['proxy_https']}{SMALL}")
    ilog = InstanceLog(work / "instance.access.log")

    # Each body arrives whole through each contender before anything is timed.
    bal, _, bal_base = start_balancer("balancer-http", work, ports["instance"], WORKERS, tls=False)
    floor_proc, floor_base = start_floor(work, ports["instance"], WORKERS)
    for base in (direct_base, f"http://127.0.0.1:{ports['proxy_http']}", floor_base, bal_base):
        for path, size in ((SMALL, SMALL_SIZE), (BIG, BIG_SIZE)):
            got = _fetch(base + path)
            if len(got) != size:
                raise RuntimeError(f"{base}{path} returned {len(got)} bytes, expected {size}")

    direct = Contender("direct", "direct (HTTPS)", direct_base, None)
    ngx = Contender("nginx", "nginx proxy", f"http://127.0.0.1:{ports['proxy_http']}", proxy)
    floor = Contender("floor", f"floor: gunicorn+gevent+http.client ({WORKERS}w)", floor_base, floor_proc)
    balc = Contender("balancer", f"balancer ({WORKERS}w)", bal_base, bal)
    trio = [direct, ngx, floor, balc]
    scenarios = [
        Scenario("small-c1", "2 KB, 1 conn", SMALL, 1, SMALL_SIZE, trio),
        Scenario("small-c16", "2 KB, 16 conns", SMALL, 16, SMALL_SIZE, trio),
        Scenario("small-c64", "2 KB, 64 conns", SMALL, 64, SMALL_SIZE, trio),
        Scenario("big-c8", "1 MB, 8 conns", BIG, 8, BIG_SIZE, trio),
    ]
    memory: list[dict] = []
    notes: list[str] = []
    profile = None
    Budget.scenarios_left = len(scenarios) + 2  # + workers, + HTTPS
    for sc in scenarios:
        run_scenario(sc, instance, ilog)
    memory += [dict(r, when="after the plain-HTTP scenarios") for r in memory_snapshot(bal, "balancer (HTTP)")]
    memory += [dict(r, when="after the plain-HTTP scenarios") for r in memory_snapshot(proxy, "nginx proxy")]
    memory += [dict(r, when="after the plain-HTTP scenarios") for r in memory_snapshot(instance, "instance (nginx)")]

    memory += [dict(r, when="after the plain-HTTP scenarios") for r in memory_snapshot(floor_proc, "floor")]
    floor_proc.stop()

    if PROFILE:
        log("profiling the balancer with py-spy (2 KB, 16 conns)")
        profile = profile_balancer(balc, work)

    # 1 vs 2 workers, alternating, with both balancers up.
    one, _, one_base = start_balancer("balancer-1w", work, ports["instance"], 1, tls=False)
    scaling_sc = Scenario(
        "scaling",
        "2 KB, 16 conns (workers)",
        SMALL,
        16,
        SMALL_SIZE,
        [Contender("balancer-1w", "1 worker", one_base, one), Contender("balancer", f"{WORKERS} workers", bal_base, bal)],
    )
    run_scenario(scaling_sc, instance, ilog)
    one.stop()
    bal.stop()
    scaling = summarize(scaling_sc)
    r1 = scaling["contenders"]["balancer-1w"]["median"]["rps"]
    r2 = scaling["contenders"]["balancer"]["median"]["rps"]
    scaling["ratio_2w_1w"] = r2 / r1 if r1 else None
    scaling["workers"] = WORKERS

    # HTTPS on the proxies' own ports, in a phase of its own (one balancer up at a time).
    bal_tls, _, bal_tls_base = start_balancer("balancer-https", work, ports["instance"], WORKERS, tls=True)
    if len(_fetch(bal_tls_base + SMALL)) != SMALL_SIZE:
        raise RuntimeError("the HTTPS balancer returned a wrong body")
    https_sc = Scenario(
        "small-c16-https",
        "2 KB, 16 conns, HTTPS",
        SMALL,
        16,
        SMALL_SIZE,
        [
            direct,
            Contender("nginx", "nginx proxy (HTTPS)", f"https://127.0.0.1:{ports['proxy_https']}", proxy),
            Contender("balancer", f"balancer ({WORKERS}w, HTTPS)", bal_tls_base, bal_tls),
        ],
    )
    run_scenario(https_sc, instance, ilog)
    memory += [dict(r, when="after the HTTPS scenario") for r in memory_snapshot(bal_tls, "balancer (HTTPS)")]

    # The metrics scrape, fresh and after 100 workers were SIGKILLed (their files folded).
    scrape = {"fresh_ms": scrape_time(bal_tls_base)}
    for _ in range(50):
        _fetch(bal_tls_base + SMALL)
        for pid in tree(bal_tls.pid):
            if pid != bal_tls.pid:
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(tree(bal_tls.pid)) < WORKERS + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_ready(bal_tls, bal_tls_base + SMALL, timeout=30)
    scrape["after_restarts_ms"] = scrape_time(bal_tls_base)
    scrape["restarts"] = 50 * WORKERS
    log(f"metrics scrape: {scrape}")

    summaries = [summarize(sc) for sc in scenarios + [https_sc]]
    for sc in summaries + [scaling]:
        for key, c in sc["contenders"].items():
            if c["errors"]:
                notes.append(f"{sc['label']} / {c['label']}: {c['errors']} wrk errors (non-2xx or socket errors) over all rounds.")
            noisy = [r["round"] for r in c["runs"] if r["foreign_cpu_cores"] > FOREIGN_LIMIT]
            if noisy:
                worst = max(r["foreign_cpu_cores"] for r in c["runs"])
                notes.append(
                    f"{sc['label']} / {c['label']}: other processes on the machine used up to {worst:.2f} cores "
                    f"during round(s) {', '.join(map(str, noisy))}."
                )
            expect = sc["body_bytes"]
            if c["median"]["avg_bytes"] and c["median"]["avg_bytes"] < expect:
                notes.append(f"{sc['label']} / {c['label']}: average response {c['median']['avg_bytes']:.0f} bytes < body {expect}.")
    return {
        "meta": started_meta,
        "shared_state": shared_state_cost(work),
        "scrape": scrape,
        "scenarios": summaries,
        "scaling": scaling,
        "memory": memory,
        "profile": profile,
        "notes": notes,
    }


def _fetch(url: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=30, context=ctx) as resp:
        return resp.read()


if __name__ == "__main__":
    sys.exit(main())
