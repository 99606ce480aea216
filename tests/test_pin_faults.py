"""The pin store under faults (docs/design.md, "Reference certificates"): processes killed while saving, CertDirPath unusable, damaged references.

A save is stopped at each of its steps by :mod:`tests.savepause` (installed
in a forked child, or as ``sitecustomize`` in a gunicorn started with
``CTBALANCER_TEST_SAVE_PAUSE``): the saving process sends itself SIGSTOP
there, and the test kills it with SIGKILL. The app carries no test hook. What is guaranteed after such a kill:

* the reference is absent, or holds the whole certificate (DER equal);
* at most one temporary file is left, the dead process's own
  ``.<reference>.<pid>.<hex>.tmp``, which never ends in ``.pem``; the next
  save of that reference (a first contact, or ``pins trust``) removes it, so
  they never pile up;
* the next contact learns, or checks against what was saved.

Read-only and full file systems are real tmpfs mounts, made in a private
mount namespace (``unshare -m``) that the balancer runs in, and looked at
from here through ``/proc/PID/root``; where mounting is not permitted those
cases are skipped. Each is then fixed while the balancer runs, and the next
request learns the reference.

Damaged references (empty, truncated, two certificates, a private key) are
refused through gunicorn and left byte for byte as they were.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from app.settings import InstanceSpec
from app.errors import CertificateMismatch
from app.pins import (
    DirectoryStore,
    delete_reference,
    der_to_pem,
    read_reference,
    reference_lock,
    replace_reference,
)

from .savepause.sitecustomize import AFTER_LINK, BEFORE_LINK, install
from .savepause.sitecustomize import STEPS as SAVE_STEPS
from .support import ROOT, Gunicorn, RawResponse, Spec, config_port, get, leaf_der, write_config

INSTANCE = InstanceSpec(host="192.0.2.10", api_port=443, matching_port=9999, enabled=True)
NAME = "192.0.2.10_9999.pem"
LOCK = f".{NAME}.lock"
#: The temporary file a save of NAME writes: ``.<name>.<pid>.<8 hex>.tmp``.
TEMPORARY = re.compile(rf"\.{re.escape(NAME)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
#: Where the save-pause hook of a gunicorn started by these tests lives.
SAVEPAUSE = Path(__file__).resolve().parent / "savepause"


@pytest.fixture(scope="module")
def ders(ca: trustme.CA) -> list[bytes]:
    return [leaf_der(ca.issue_cert("instance.test")) for _ in range(3)]


def test_the_hook_names_every_step_of_a_save():
    assert SAVE_STEPS == BEFORE_LINK + AFTER_LINK
    assert "CTBALANCER_TEST_SAVE_PAUSE" not in os.environ  # the suite runs without it


# -- killed while saving ---------------------------------------------------------------------------


def stopped_then_killed(pid: int, timeout: float = 20.0) -> None:
    """Wait until child *pid* has stopped itself at the hook, then SIGKILL it and reap it."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not reach the hook within {timeout}s")
        time.sleep(0.001)
    assert os.WIFSTOPPED(status), f"child {pid} ended instead of stopping at the hook (status {status:#x})"
    assert os.WSTOPSIG(status) == signal.SIGSTOP
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def fork(action) -> int:
    """Run *action* in a forked child that exits 0 when it returns, 1 on any exception."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    return pid


def first_contact_stopped_at(cert_dir: Path, der: bytes, step: str) -> int:
    def action() -> None:
        install(step)
        DirectoryStore(cert_dir).check(INSTANCE, der)

    pid = fork(action)
    stopped_then_killed(pid)
    return pid


def strays(cert_dir: Path) -> list[str]:
    """What CertDirPath holds besides the reference and its lock: a temporary file by its PID, else its name."""
    left = sorted(n for n in os.listdir(cert_dir) if n not in (NAME, LOCK))
    return [m.group(1) if (m := TEMPORARY.fullmatch(n)) else n for n in left]


def test_first_contact_killed_at_every_step_100_times(tmp_path, ders):
    """SIGKILL in the middle of saving a reference, cycling through the steps: never a partial file."""
    cert_dir = tmp_path / "certs"
    reference = cert_dir / NAME
    seen = {step: 0 for step in SAVE_STEPS}
    for i in range(100):
        step = SAVE_STEPS[i % len(SAVE_STEPS)]
        der, other = ders[i % 3], ders[(i + 1) % 3]
        pid = first_contact_stopped_at(cert_dir, der, step)
        seen[step] += 1

        # The reference: whole or absent.
        if step in AFTER_LINK:
            assert read_reference(reference) == der, (i, step)
        else:
            assert not reference.exists(), (i, step)
        # One stray, the dead process's own temporary file; the one the
        # previous iteration's victim left was removed by this save.
        assert strays(cert_dir) == [str(pid)], (i, step)
        # Nothing but the reference can be taken for one.
        assert fnmatch.filter(os.listdir(cert_dir), "*.pem") == ([NAME] if step in AFTER_LINK else [])
        assert DirectoryStore(cert_dir).names() == ([reference.name] if step in AFTER_LINK else [])

        # The next contact (a new worker) learns, or checks against what was saved.
        if step in AFTER_LINK:
            assert DirectoryStore(cert_dir).check(INSTANCE, der).der == der
            with pytest.raises(CertificateMismatch):
                DirectoryStore(cert_dir).check(INSTANCE, other)
            assert strays(cert_dir) == [str(pid)]  # only a save cleans up
        else:
            assert DirectoryStore(cert_dir).check(INSTANCE, other).der == other
            assert read_reference(reference) == other
            assert strays(cert_dir) == []
        # An operator forgets it, so the next iteration saves again.
        with reference_lock(reference):
            assert delete_reference(reference)
    assert seen == {step: 20 for step in SAVE_STEPS}
    # A last first contact leaves exactly the reference and its lock.
    assert DirectoryStore(cert_dir).check(INSTANCE, ders[0]).der == ders[0]
    assert sorted(os.listdir(cert_dir)) == [LOCK, NAME]


def test_trust_killed_while_replacing_keeps_the_old_reference(tmp_path, ders):
    """``pins trust`` (replace_reference) killed before its rename: the old reference stays whole."""
    cert_dir = tmp_path / "certs"
    reference = cert_dir / NAME
    with reference_lock(reference):
        replace_reference(reference, ders[0])
    for i in range(30):
        step = BEFORE_LINK[i % len(BEFORE_LINK)]

        def action() -> None:
            install(step)
            with reference_lock(reference):
                replace_reference(reference, ders[1])

        pid = fork(action)
        stopped_then_killed(pid)
        assert read_reference(reference) == ders[0], (i, step)
        assert strays(cert_dir) == [str(pid)], (i, step)
        assert DirectoryStore(cert_dir).names() == [reference.name]
        # The lock died with the process: the next command takes it at once.
        with reference_lock(reference, timeout=5):
            pass
    with reference_lock(reference):
        replace_reference(reference, ders[2])
    assert read_reference(reference) == ders[2]
    assert sorted(os.listdir(cert_dir)) == [LOCK, NAME]


# -- a gunicorn worker killed while saving -------------------------------------------------------

BOOTED = re.compile(r"Booting worker with pid: (\d+)")


def worker_pids(balancer: Gunicorn) -> list[int]:
    """PIDs of the workers the master booted, in order (from its log)."""
    return [int(pid) for pid in BOOTED.findall(balancer.log())]


def worker_ready(balancer: Gunicorn, pid: int) -> bool:
    """Whether worker *pid* has logged past its boot: its signal handlers are set by then.

    A SIGTERM that reaches a worker before that is lost, and the master then
    waits graceful_timeout for it.
    """
    return any(f"[{pid}] " in line and "Booting worker" not in line for line in balancer.log().splitlines())


def process_state(pid: int) -> str:
    """The state letter of *pid* in /proc (``T`` stopped), or ``gone``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2]


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def answer_or_none(port: int) -> RawResponse | None:
    """One GET through the balancer; None when the connection closes without an answer."""
    try:
        return get(port, "/api/v.1.1/suppliers")
    except OSError:
        return None


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_worker_killed_while_saving_leaves_no_partial_reference(tmp_path, make_instance, start_balancer, step):
    """A gunicorn worker SIGKILLed in the middle of its first contact: the client gets no answer,
    the instance nothing, and the next worker learns or checks correctly."""
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    config = write_config(tmp_path, [Spec("127.0.0.1", inst.port, 9999)], workers=1)
    cert_dir = tmp_path / "certs"
    reference = cert_dir / "127.0.0.1_9999.pem"
    temporary = re.compile(r"\.127\.0\.0\.1_9999\.pem\.(\d+)\.[0-9a-f]{8}\.tmp")
    pythonpath = os.pathsep.join(filter(None, [str(SAVEPAUSE), os.environ.get("PYTHONPATH")]))
    balancer = start_balancer(config, CTBALANCER_TEST_SAVE_PAUSE=step, PYTHONPATH=pythonpath)
    [worker] = worker_pids(balancer)

    answers: list[RawResponse | None] = []
    client = threading.Thread(target=lambda: answers.append(answer_or_none(balancer.port)))
    client.start()
    wait_until(lambda: process_state(worker) == "T", f"worker {worker} stopped itself at {step}")
    os.kill(worker, signal.SIGKILL)
    client.join(30)
    assert answers == [None]
    assert inst.requests == []
    if step in AFTER_LINK:
        assert read_reference(reference) == inst.der
    else:
        assert not reference.exists()
    left = [n for n in os.listdir(cert_dir) if n not in (reference.name, f".{reference.name}.lock")]
    assert [temporary.fullmatch(n).group(1) if temporary.fullmatch(n) else n for n in left] == [str(worker)]
    assert fnmatch.filter(os.listdir(cert_dir), "*.pem") == ([reference.name] if step in AFTER_LINK else [])

    # The master replaces the worker. Where the reference was saved, the new
    # worker checks against it (and saves nothing, so it does not stop).
    wait_until(lambda: len(worker_pids(balancer)) == 2, "a new worker booted")
    wait_until(lambda: worker_ready(balancer, worker_pids(balancer)[1]), "the new worker ready")
    if step in AFTER_LINK:
        resp = get(balancer.port, "/api/v.1.1/suppliers")
        assert (resp.status, resp.json()) == (200, {"port": inst.port})
    balancer.stop()

    # Without the hook: learned (or checked), and the dead worker's file is
    # gone once a save happened.
    again = start_balancer(config)
    resp = get(again.port, "/api/v.1.1/suppliers")
    assert (resp.status, resp.json()) == (200, {"port": inst.port})
    assert read_reference(reference) == inst.der
    left = sorted(os.listdir(cert_dir))
    if step in AFTER_LINK:
        assert len(left) == 3 and temporary.fullmatch(left[0]).group(1) == str(worker)
        assert "learned reference certificate" not in again.log()
    else:
        assert left == [f".{reference.name}.lock", reference.name]
        assert f"left by process {worker} that died while saving {reference}" in again.log()


# -- CertDirPath not creatable, read-only, full ----------------------------------------------------


@pytest.fixture(scope="module")
def mounts_allowed() -> None:
    """Skip unless this process may mount a tmpfs in a private mount namespace (root, util-linux)."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("read-only and full CertDirPath need unshare and nsenter (util-linux)")
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", d],
            capture_output=True,
            text=True,
            timeout=30,
        )
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")


@dataclass
class NamespacedGunicorn(Gunicorn):
    """gunicorn in a private mount namespace where *setup* (shell) has run first.

    Its mounts vanish with it; the test sees its files through ``/proc/PID/root``.
    """

    setup: str = "true"

    def start(self, timeout: float = 30.0) -> "NamespacedGunicorn":
        env = {**os.environ, "BALANCER_CONFIG": str(self.config), **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
             f'{self.setup}\nexec "$0" -m gunicorn -c gunicorn.conf.py wsgi:app', sys.executable],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: self.proc.poll() is not None or len(worker_pids(self)) >= 1, "gunicorn started", timeout)
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        wait_until(lambda: worker_ready(self, worker_pids(self)[0]), "the worker ready", timeout)
        return self

    def seen(self, path: Path) -> Path:
        """*path* as the balancer sees it, in its mount namespace."""
        return Path(f"/proc/{self.proc.pid}/root{path}")

    def run_inside(self, *command: str) -> None:
        subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", *command], check=True, timeout=30)


@pytest.fixture
def namespaced(tmp_path, mounts_allowed):
    started: list[NamespacedGunicorn] = []

    def start(config: Path, setup: str) -> NamespacedGunicorn:
        g = NamespacedGunicorn(config, config_port(config), tmp_path / f"ns-gunicorn-{len(started)}.log", setup=setup)
        started.append(g)
        return g.start()

    yield start
    for g in started:
        g.stop()


def refused_unsaved(port: int, inst, reference: Path) -> str:
    """One request through the balancer, which must refuse it as unsaved; returns the reason it gives."""
    resp = get(port, "/api/v.1.1/suppliers")
    assert resp.status == 500
    body = resp.json()
    assert {k: v for k, v in body.items() if k != "description"} == {
        "error": "reference_certificate_unsaved",
        "host": "127.0.0.1",
        "port": inst.port,
        "reference": str(reference),
    }
    prefix = f"The certificate of the instance 127.0.0.1:{inst.port} could not be saved as {reference}: "
    suffix = ". Nothing was forwarded; make CertDirPath writable by the balancer."
    assert body["description"].startswith(prefix) and body["description"].endswith(suffix)
    return body["description"][len(prefix) : -len(suffix)]


def test_cert_dir_not_creatable_refuses_until_fixed(tmp_path, make_instance, start_balancer):
    """CertDirPath's parent is a regular file: 500 saying so, nothing forwarded; fixed, learned at once."""
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where CertDirPath's parent should be")
    reference = blocker / "certs" / "127.0.0.1_9999.pem"
    balancer = start_balancer(write_config(tmp_path, [Spec("127.0.0.1", inst.port, 9999)], cert_dir="blocker/certs"))
    for _ in range(3):
        reason = refused_unsaved(balancer.port, inst, reference)
        assert reason == (
            f"Not a directory ({blocker / 'certs'}); a part of that path is a file, not a directory: "
            "move it or set CertDirPath elsewhere"
        )
    assert inst.requests == []
    assert blocker.read_text() == "a file where CertDirPath's parent should be"

    blocker.unlink()
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert (resp.status, resp.json()) == (200, {"port": inst.port})
    assert read_reference(reference) == inst.der
    assert (reference.parent.stat().st_mode & 0o777) == 0o700
    assert len(inst.requests) == 1


def test_read_only_cert_dir_refuses_until_remounted(tmp_path, make_instance, namespaced):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    reference = cert_dir / "127.0.0.1_9999.pem"
    config = write_config(tmp_path, [Spec("127.0.0.1", inst.port, 9999)], workers=1)
    balancer = namespaced(config, f"mount -t tmpfs -o ro,size=16k,mode=0700 tmpfs '{cert_dir}'")
    for _ in range(3):
        reason = refused_unsaved(balancer.port, inst, reference)
        assert reason == (
            f"Read-only file system ({cert_dir}/.127.0.0.1_9999.pem.lock); that file system is mounted "
            "read-only: remount it read-write or set CertDirPath elsewhere"
        )
    assert inst.requests == []
    assert os.listdir(balancer.seen(cert_dir)) == []

    balancer.run_inside("mount", "-o", "remount,rw", str(cert_dir))
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert (resp.status, resp.json()) == (200, {"port": inst.port})
    assert read_reference(balancer.seen(reference)) == inst.der
    assert len(inst.requests) == 1
    assert os.listdir(cert_dir) == []  # it was all on the tmpfs, which goes with the balancer


def test_full_cert_dir_refuses_until_space_is_freed(tmp_path, make_instance, namespaced):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    reference = cert_dir / "127.0.0.1_9999.pem"
    config = write_config(tmp_path, [Spec("127.0.0.1", inst.port, 9999)], workers=1)
    balancer = namespaced(
        config,
        f"mount -t tmpfs -o size=16k,mode=0700 tmpfs '{cert_dir}'\n"
        f"head -c 65536 /dev/zero > '{cert_dir}/filler' 2>/dev/null || true",
    )
    seen = balancer.seen(cert_dir)
    assert (seen / "filler").stat().st_size == 16 * 1024
    for _ in range(3):
        reason = refused_unsaved(balancer.port, inst, reference)
        assert reason == (
            f"No space left on device ({reference}); free space on the file system that holds CertDirPath"
        )
        # No partial reference, no temporary file: only the (empty) lock file beside the filler.
        assert sorted(os.listdir(seen)) == [".127.0.0.1_9999.pem.lock", "filler"]
    assert inst.requests == []

    (seen / "filler").unlink()
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert (resp.status, resp.json()) == (200, {"port": inst.port})
    assert read_reference(seen / reference.name) == inst.der
    assert sorted(os.listdir(seen)) == [".127.0.0.1_9999.pem.lock", "127.0.0.1_9999.pem"]
    assert len(inst.requests) == 1


# -- damaged references ------------------------------------------------------------------------------


def file_version(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


def test_damaged_references_are_refused_and_never_replaced(tmp_path, ca, make_instance, start_balancer):
    """Empty, truncated, two certificates, a private key: 500 unreadable, through gunicorn, file untouched."""
    instances = [make_instance() for _ in range(4)]
    for inst in instances:
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    pem = der_to_pem(instances[0].der)
    damaged = {
        "empty": b"",
        "truncated": pem[: len(pem) // 2],
        "two certificates": pem + der_to_pem(instances[1].der),
        "private key": ca.issue_cert("127.0.0.1").private_key_pem.bytes(),
    }
    reasons = {
        "empty": "the file is empty",
        "truncated": "the file is not one PEM certificate (BEGIN/END CERTIFICATE)",
        "two certificates": "the file holds more than one PEM block; expected one certificate",
        "private key": "the file is not one PEM certificate (BEGIN/END CERTIFICATE)",
    }
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir(mode=0o700)
    files: dict[int, tuple[str, Path]] = {}
    specs = []
    for i, (inst, (kind, content)) in enumerate(zip(instances, damaged.items())):
        specs.append(Spec("127.0.0.1", inst.port, 9000 + i))
        path = cert_dir / f"127.0.0.1_{9000 + i}.pem"
        path.write_bytes(content)
        files[inst.port] = (kind, path)
    before = {path: file_version(path) for _, path in files.values()}
    # One worker takes the instances in turn: 12 requests, 3 per instance.
    balancer = start_balancer(write_config(tmp_path, specs, workers=1))
    answers = [get(balancer.port, "/api/v.1.1/suppliers") for _ in range(12)]

    refused = Counter()
    for resp in answers:
        body = resp.json()
        kind, path = files[body["port"]]
        assert resp.status == 500, kind
        assert body == {
            "error": "reference_certificate_unreadable",
            "description": f"The reference certificate {path} of the instance 127.0.0.1:{body['port']} cannot be "
            f"used: {reasons[kind]}. It was left untouched; fix or remove it.",
            "host": "127.0.0.1",
            "port": body["port"],
            "reference": str(path),
        }
        refused[kind] += 1
    assert refused == {kind: 3 for kind in damaged}
    assert [inst.requests for inst in instances] == [[]] * 4
    assert {path: file_version(path) for _, path in files.values()} == before
    # Not even a lock file: a reference that exists is only read.
    assert sorted(os.listdir(cert_dir)) == sorted(path.name for _, path in files.values())
    assert "learned reference certificate" not in balancer.log()
