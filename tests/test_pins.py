"""The pin store on real files: reading, learning, refusing; races between threads and processes."""

from __future__ import annotations

import multiprocessing
import os
import ssl
import threading
from pathlib import Path

import pytest
import trustme

from app.settings import InstanceSpec
from app.errors import CertificateMismatch, ReferenceUnreadable, ReferenceUnsaved
from app.pins import (
    NotACertificate,
    DirectoryStore,
    delete_reference,
    der_to_pem,
    loose_permissions,
    pem_to_der,
    read_reference,
    reference_lock,
    replace_reference,
    sha256,
)

from .support import leaf_der

INSTANCE = InstanceSpec(host="192.0.2.10", api_port=443, matching_port=9999, enabled=True)


@pytest.fixture(scope="module")
def ders(ca: trustme.CA) -> list[bytes]:
    return [leaf_der(ca.issue_cert("instance.test")) for _ in range(3)]


def test_pem_round_trip_matches_the_standard_library(ders):
    pem = der_to_pem(ders[0])
    assert pem.decode() == ssl.DER_cert_to_PEM_cert(ders[0])
    assert pem_to_der(pem) == ders[0]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the file is empty"),
        (b"\n  \n", "the file is empty"),
        (b"hello", "the file is not one PEM certificate (BEGIN/END CERTIFICATE)"),
        ("TRUNCATED", "the file is not one PEM certificate (BEGIN/END CERTIFICATE)"),
        ("TWO", "the file holds more than one PEM block; expected one certificate"),
        ("KEY", "the file is not one PEM certificate (BEGIN/END CERTIFICATE)"),
        ("CERT+KEY", "the file holds more than one PEM block; expected one certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "the certificate cannot be parsed"),
        (b"-----BEGIN CERTIFICATE-----\nA*AA\n-----END CERTIFICATE-----\n", "the file is not one PEM certificate"),
    ],
    ids=["empty", "blank", "text", "truncated", "two-certificates", "private-key", "cert-and-key", "not-x509",
         "bad-base64"],
)
def test_unusable_reference_contents_are_refused(ders, ca, content, reason):
    pem = der_to_pem(ders[0])
    key = ca.issue_cert("x.test").private_key_pem.bytes()
    content = {
        "TRUNCATED": pem[: len(pem) // 2],
        "TWO": pem + der_to_pem(ders[1]),
        "KEY": key,
        "CERT+KEY": pem + key,
    }.get(content, content)
    with pytest.raises(NotACertificate) as exc:
        pem_to_der(content)
    assert str(exc.value).startswith(reason)


def test_first_contact_creates_directory_and_file(tmp_path, ders):
    store = DirectoryStore(tmp_path / "a" / "b")
    ref = store.check(INSTANCE, ders[0])
    path = tmp_path / "a" / "b" / "192.0.2.10_9999.pem"
    assert ref.location == str(path)
    assert read_reference(path) == ders[0]
    assert ref.sha256 == sha256(ders[0])
    # Only the reference and its lock file; no temporary file is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [".192.0.2.10_9999.pem.lock", "192.0.2.10_9999.pem"]
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_mismatch_names_instance_and_both_fingerprints(tmp_path, ders):
    store = DirectoryStore(tmp_path)
    store.check(INSTANCE, ders[0])
    with pytest.raises(CertificateMismatch) as exc:
        store.check(INSTANCE, ders[1])
    assert exc.value.body() == {
        "error": "certificate_mismatch",
        "description": "HTTPS connection with the CyberTrace instance 192.0.2.10:443 has not been established, "
        "since the server certificate does not match the one expected.",
        "host": "192.0.2.10",
        "port": 443,
        "expected_sha256": sha256(ders[0]),
        "received_sha256": sha256(ders[1]),
        "reference": str(tmp_path / "192.0.2.10_9999.pem"),
    }
    assert exc.value.status == 500


def test_unreadable_reference_is_refused_and_left_untouched(tmp_path, ders):
    path = tmp_path / "192.0.2.10_9999.pem"
    path.write_bytes(b"not a certificate\n")
    with pytest.raises(ReferenceUnreadable) as exc:
        DirectoryStore(tmp_path).check(INSTANCE, ders[0])
    assert exc.value.status == 500
    assert exc.value.body()["error"] == "reference_certificate_unreadable"
    assert path.read_bytes() == b"not a certificate\n"


def test_directory_that_cannot_be_created_refuses_with_unsaved(tmp_path, ders):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(ReferenceUnsaved) as exc:
        DirectoryStore(blocker / "certs").check(INSTANCE, ders[0])
    body = exc.value.body()
    assert body["error"] == "reference_certificate_unsaved"
    assert body["host"] == "192.0.2.10" and body["port"] == 443
    assert "Not a directory" in body["description"]
    assert blocker.read_text() == "I am a file"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reference_is_read_once_then_restated_at_most_every_interval(tmp_path, ders, monkeypatch):
    clock = FakeClock()
    store = DirectoryStore(tmp_path, recheck_interval=0.5, clock=clock)
    first = store.check(INSTANCE, ders[0])
    path = tmp_path / "192.0.2.10_9999.pem"
    looks: list[str] = []
    real_stat, real_open = os.stat, open

    def counting_stat(p, *args, **kwargs):
        looks.append(f"stat {p}")
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    # Within the interval: no stat, no read, however many connections.
    for _ in range(100):
        assert store.check(INSTANCE, ders[0]) is first
        assert first.is_current()
    assert looks == []
    # Replaced by hand (os.replace, as pins trust does): seen at the next look.
    tmp = tmp_path / "new.pem"
    tmp.write_bytes(der_to_pem(ders[1]))
    os.replace(tmp, path)
    clock.now += 0.4
    assert first.is_current() and looks == []
    clock.now += 0.2
    assert not first.is_current()
    assert looks == [f"stat {path}"]
    second = store.check(INSTANCE, ders[1])
    assert (second.sha256, second.generation) == (sha256(ders[1]), first.generation + 1)
    with pytest.raises(CertificateMismatch):
        store.check(INSTANCE, ders[0])
    # Deleted: forgotten, and the next contact learns again (with whatever it is shown).
    path.unlink()
    clock.now += 1
    assert not second.is_current()
    third = store.check(INSTANCE, ders[2])
    assert read_reference(path) == ders[2]
    assert third.generation == second.generation + 1 and third.is_current()


def test_same_certificate_written_again_keeps_connections(tmp_path, ders):
    clock = FakeClock()
    store = DirectoryStore(tmp_path, clock=clock)
    ref = store.check(INSTANCE, ders[0])
    path = tmp_path / "192.0.2.10_9999.pem"
    path.unlink()
    path.write_bytes(der_to_pem(ders[0]))  # same certificate, new inode
    clock.now += 1
    assert ref.is_current()
    assert store.check(INSTANCE, ders[0]) is ref


def test_reference_made_unreadable_is_refused_at_the_next_look(tmp_path, ders):
    clock = FakeClock()
    store = DirectoryStore(tmp_path, clock=clock)
    ref = store.check(INSTANCE, ders[0])
    (tmp_path / "192.0.2.10_9999.pem").write_bytes(b"damaged")
    clock.now += 1
    assert not ref.is_current()
    with pytest.raises(ReferenceUnreadable):
        store.check(INSTANCE, ders[0])
    assert (tmp_path / "192.0.2.10_9999.pem").read_bytes() == b"damaged"


def test_replace_reference_is_atomic_and_leaves_no_temporary_file(tmp_path, ders):
    path = tmp_path / "certs" / "192.0.2.10_9999.pem"
    with reference_lock(path):
        replace_reference(path, ders[0])
    with reference_lock(path):
        replace_reference(path, ders[1])
    assert read_reference(path) == ders[1]
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == [".192.0.2.10_9999.pem.lock", "192.0.2.10_9999.pem"]
    with reference_lock(path):
        assert delete_reference(path) is True
        assert delete_reference(path) is False


def test_reference_lock_is_the_one_first_contacts_take(tmp_path, ders):
    """A first contact waits while an operator command holds the lock, then compares with what it wrote."""
    path = tmp_path / "192.0.2.10_9999.pem"
    store = DirectoryStore(tmp_path)
    results: list[object] = []
    with reference_lock(path):
        t = threading.Thread(target=lambda: results.append(_outcome(store, ders[0])))
        t.start()
        t.join(0.3)
        assert t.is_alive() and results == []
        replace_reference(path, ders[1])
    t.join(10)
    assert results == ["mismatch"]


def _outcome(store: DirectoryStore, der: bytes) -> str:
    try:
        store.check(INSTANCE, der)
        return "accepted"
    except CertificateMismatch:
        return "mismatch"


def test_loose_permissions_are_reported(tmp_path, ders):
    cert_dir = tmp_path / "certs"
    assert loose_permissions(cert_dir) == []
    DirectoryStore(cert_dir).check(INSTANCE, ders[0])
    assert loose_permissions(cert_dir) == []
    path = cert_dir / "192.0.2.10_9999.pem"
    path.chmod(0o664)
    cert_dir.chmod(0o777)
    assert loose_permissions(cert_dir) == [f"{cert_dir} (mode 0777)", f"{path} (mode 0664)"]


def test_threads_racing_on_first_contact_save_one_file(tmp_path, ders):
    store = DirectoryStore(tmp_path)
    results: list[object] = []
    barrier = threading.Barrier(32)

    def contact(i: int) -> None:
        barrier.wait()
        try:
            results.append(store.check(INSTANCE, ders[i % 2]).sha256)
        except CertificateMismatch as exc:
            results.append(exc)

    threads = [threading.Thread(target=contact, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = read_reference(tmp_path / "192.0.2.10_9999.pem")
    accepted = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, CertificateMismatch)]
    assert len(accepted) == 16 and len(refused) == 16
    assert set(accepted) == {sha256(winner)}
    assert {r.fields["received_sha256"] for r in refused} == {sha256(d) for d in ders[:2] if d != winner}


def _race_in_process(cert_dir: str, der: bytes, start: multiprocessing.synchronize.Event, out) -> None:
    start.wait()
    try:
        out.put(DirectoryStore(Path(cert_dir)).check(INSTANCE, der).sha256)
    except CertificateMismatch as exc:
        out.put("mismatch:" + exc.fields["received_sha256"])


def test_processes_racing_on_first_contact_save_one_file(tmp_path, ders):
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race_in_process, args=(str(tmp_path), ders[i % 3], start, out)) for i in range(12)]
    for p in procs:
        p.start()
    start.set()
    results = sorted(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    winner = read_reference(tmp_path / "192.0.2.10_9999.pem")
    assert results.count(sha256(winner)) == 4
    assert len([r for r in results if r.startswith("mismatch:")]) == 8
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
