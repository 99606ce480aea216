"""Real etcd clusters on loopback for the fleet tests (docs/design.md, "Fleet").

Each member is an ``etcd`` process (Debian's ``etcd-server``, installed by
``make test`` when missing) with its own data directory under the test's
temporary directory and free loopback ports; :meth:`EtcdCluster.close`
kills every member it started.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def require_etcd() -> None:
    """Skip on a developer machine without etcd; fail under CI, where ``make test`` installs it."""
    if not os.access(ETCD, os.X_OK):
        message = "etcd is not installed: make test installs Debian's etcd-server when missing"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class Member:
    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int, scheme: str = "http") -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.scheme = scheme
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """*size* etcd members on 127.0.0.1; optionally TLS for clients (*tls*: dict of server cert, key, CA paths)."""

    def __init__(
        self,
        directory: Path,
        size: int = 3,
        tls: dict[str, Path] | None = None,
        client_cert_auth: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        require_etcd()
        self.extra_args = extra_args
        self.directory = directory
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        directory.mkdir(parents=True, exist_ok=True)
        scheme = "https" if tls else "http"
        self.members = [
            Member(f"m{i}", directory / f"m{i}", free_port(), free_port(), scheme) for i in range(size)
        ]
        self.token = f"ctb-{os.getpid()}-{free_port()}"
        for member in self.members:
            self._spawn(member, state="new")
        self.wait_healthy()

    @property
    def endpoints(self) -> str:
        return " ".join(m.url for m in self.members)

    def _spawn(self, member: Member, state: str) -> None:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        args = [
            ETCD,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.url,
            "--advertise-client-urls", member.url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--logger", "zap",
            "--log-level", "warn",
            "--log-outputs", str(member.log),
        ]
        if self.tls:
            args += ["--cert-file", str(self.tls["cert"]), "--key-file", str(self.tls["key"])]
            if self.client_cert_auth:
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls["ca"])]
        args += list(self.extra_args)
        member.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- state --------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], member: Member | None = None, timeout: float = 2.0, token: str | None = None) -> dict[str, Any]:
        """POST to the gateway of *member* (the first running one by default)."""
        targets = [member] if member else [m for m in self.members if self.running(m)]
        last: Exception | None = None
        for m in targets:
            request = urllib.request.Request(m.url + path, data=json.dumps(body).encode(), method="POST")
            if token:
                request.add_header("Authorization", token)
            try:
                with urllib.request.urlopen(request, timeout=timeout, context=self._context()) as f:
                    return json.loads(f.read())
            except (OSError, urllib.error.URLError) as exc:
                last = exc
        raise AssertionError(f"no etcd member answered {path}: {last}")

    def _context(self) -> Any:
        if not self.tls:
            return None
        import ssl

        context = ssl.create_default_context(cafile=str(self.tls["ca"]))
        if self.client_cert_auth:
            context.load_cert_chain(str(self.tls["client_cert"]), str(self.tls["client_key"]))
        return context

    def running(self, member: Member) -> bool:
        return member.proc is not None and member.proc.poll() is None and not getattr(member, "stopped", False)

    def healthy(self, member: Member) -> bool:
        try:
            self.call("/v3/kv/range", {"key": b64("/health-check")}, member=member, timeout=1.0)
            return True
        except AssertionError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(m) for m in self.members if self.running(m)):
                return
            time.sleep(0.1)
        logs = "\n".join(m.log.read_text()[-2000:] for m in self.members if m.log.exists())
        raise AssertionError(f"etcd cluster not healthy within {timeout} s:\n{logs}")

    def leader(self) -> Member:
        """The member that leads now (asked of every running member until one knows)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for m in self.members:
                if not self.running(m):
                    continue
                try:
                    status = self.call("/v3/maintenance/status", {}, member=m, timeout=1.0)
                except AssertionError:
                    continue
                leader = status.get("leader")
                if leader and leader == status["header"]["member_id"]:
                    return m
            time.sleep(0.1)
        raise AssertionError("no etcd leader within 30 s")

    def kvs(self, prefix: str) -> list[dict[str, Any]]:
        """Every key under *prefix* with its value decoded, create/mod revision and version."""
        end = bytearray(prefix.encode())
        end[-1] += 1
        answer = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(bytes(end))}, token=self.root_token)
        return [
            {
                "key": base64.b64decode(kv["key"]).decode(),
                "value": _json(base64.b64decode(kv.get("value", ""))),
                "raw": base64.b64decode(kv.get("value", "")),
                "create_revision": int(kv["create_revision"]),
                "mod_revision": int(kv["mod_revision"]),
                "version": int(kv["version"]),
            }
            for kv in answer.get("kvs", [])
        ]

    def put(self, key: str, value: bytes) -> None:
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)}, token=self.root_token)

    auth = False

    @property
    def root_token(self) -> str | None:
        """A fresh root token once auth is on (tokens may be made to expire within a second)."""
        if not self.auth:
            return None
        return self.call("/v3/auth/authenticate", {"name": "root", "password": "root-password"})["token"]

    def enable_auth(self, user: str, password: str, prefix: str) -> None:
        """A root user, and *user* whose role may read and write the keys under *prefix* only; then auth on.

        What the README's "Fleet" section tells operators to set up.
        """
        end = bytearray(prefix.encode())
        end[-1] += 1
        for path, body in (
            ("/v3/auth/user/add", {"name": "root", "password": "root-password"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/role/add", {"name": "ctbalancer"}),
            ("/v3/auth/role/grant", {"name": "ctbalancer", "perm": {"permType": "READWRITE", "key": b64(prefix), "range_end": b64(bytes(end))}}),
            ("/v3/auth/user/add", {"name": user, "password": password}),
            ("/v3/auth/user/grant", {"user": user, "role": "ctbalancer"}),
            ("/v3/auth/enable", {}),
        ):
            self.call(path, body)
        self.auth = True

    def compact(self) -> None:
        """Compact the history up to now: a watch from an older revision is cancelled."""
        revision = int(self.call("/v3/kv/range", {"key": b64("/")}, token=self.root_token)["header"]["revision"])
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, token=self.root_token)

    # -- faults -------------------------------------------------------------------

    def kill(self, member: Member) -> None:
        assert member.proc is not None
        member.proc.kill()
        member.proc.wait(10)

    def restart(self, member: Member) -> None:
        self._spawn(member, state="existing")

    def stop(self, member: Member) -> None:
        assert member.proc is not None
        os.kill(member.proc.pid, signal.SIGSTOP)
        member.stopped = True  # type: ignore[attr-defined]

    def cont(self, member: Member) -> None:
        assert member.proc is not None
        os.kill(member.proc.pid, signal.SIGCONT)
        member.stopped = False  # type: ignore[attr-defined]

    def close(self) -> None:
        for member in self.members:
            if member.proc is None or member.proc.poll() is not None:
                continue
            try:
                os.kill(member.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            member.proc.kill()
            member.proc.wait(10)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def pin_store_element(cluster: EtcdCluster, prefix: str = "/ctbalancer", extra: str = "") -> str:
    """The ``<PinStore>`` line of a configuration using *cluster*."""
    return f'  <PinStore type="etcd" endpoints="{cluster.endpoints}" prefix="{prefix}"{extra}/>\n'
