"""``flask --app wsgi pins ...`` against real HTTPS instances and real reference files (docs/design.md, "Reference certificates")."""

from __future__ import annotations

import logging
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509

from app.loader import load
from app.factory import create_app
from app.pins import der_to_pem, sha256

from .support import ROOT, Spec, leaf_der, write_config

EXIT_DECLINED, EXIT_USAGE, EXIT_UNKNOWN, EXIT_AMBIGUOUS, EXIT_UNREACHABLE, EXIT_MISMATCH, EXIT_UNREADABLE = (
    1, 2, 3, 4, 5, 6, 7,
)


def pins(config: Path, *args: str, input: str | None = None) -> Result:
    """Run ``flask pins ARGS`` in-process on the app for *config*."""
    app = create_app(load(config))
    return app.test_cli_runner().invoke(args=["pins", *args], input=input)


def lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def colons(fingerprint: str) -> str:
    """AB:CD:... as openssl prints it."""
    return ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()


@pytest.fixture
def two(tmp_path, make_instance):
    """Two instances on one host (so the host alone is ambiguous), a pinned, b not yet."""
    a, b = make_instance(), make_instance()
    config = write_config(tmp_path, [Spec("127.0.0.1", a.port, 9999), Spec("127.0.0.1", b.port, 9998)])
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o700)
    (certs / "127.0.0.1_9999.pem").write_bytes(der_to_pem(a.der))
    return config, certs, a, b


# -- list ---------------------------------------------------------------------------------


def test_list_shows_every_instance_and_unconfigured_references(tmp_path, ca, make_instance):
    a = make_instance()
    specs = [
        Spec("127.0.0.1", a.port, 9999),
        Spec("127.0.0.1", a.port + 1, 9998, enabled=False),
        Spec("192.0.2.10", 443, 9999),
    ]
    config = write_config(tmp_path, specs)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "127.0.0.1_9999.pem").write_bytes(der_to_pem(a.der))
    (certs / "192.0.2.10_9999.pem").write_bytes(b"")
    old = ca.issue_cert("old.test")
    old_der = leaf_der(old)
    (certs / "10.0.0.9_9999.pem").write_bytes(der_to_pem(old_der))
    (certs / ".127.0.0.1_9999.pem.lock").write_bytes(b"")
    (certs / ".hidden.pem").write_bytes(b"")
    result = pins(config, "list")
    assert result.exit_code == 0, result.output
    subject = x509.load_der_x509_certificate(a.der).subject.rfc4514_string()
    assert lines(result.stdout) == [
        f"configuration: {config}",
        f"CertDirPath:   {certs}",
        "",
        f"127.0.0.1:{a.port} (enabled)",
        f"  reference:  {certs}/127.0.0.1_9999.pem",
        "  state:      pinned",
        f"  sha256:     {sha256(a.der)}",
        f"  subject:    {subject}",
        "  not after:  3000-01-01 00:00:00 UTC",
        "",
        f"127.0.0.1:{a.port + 1} (disabled)",
        f"  reference:  {certs}/127.0.0.1_9998.pem",
        "  state:      not yet pinned",
        "",
        "192.0.2.10:443 (enabled)",
        f"  reference:  {certs}/192.0.2.10_9999.pem",
        "  state:      unreadable: the file is empty",
        "",
        "unconfigured references (1; flask --app wsgi pins prune deletes them):",
        f"  {certs}/10.0.0.9_9999.pem  sha256 {sha256(old_der)}",
    ]


def test_list_without_cert_dir(tmp_path):
    config = write_config(tmp_path, [Spec("192.0.2.10", 443)])
    result = pins(config, "list")
    assert result.exit_code == 0
    assert lines(result.stdout)[-4:] == [
        f"  reference:  {tmp_path}/certs/192.0.2.10_9999.pem",
        "  state:      not yet pinned",
        "",
        "unconfigured references: none",
    ]
    assert not (tmp_path / "certs").exists()


# -- check ---------------------------------------------------------------------------------


def test_check_match_and_not_yet_pinned_writes_nothing(two):
    config, certs, a, b = two
    before = sorted(p.name for p in certs.iterdir())
    result = pins(config, "check")
    assert result.exit_code == 0, result.output
    assert lines(result.stdout) == [
        f"127.0.0.1:{a.port}",
        "  host:       127.0.0.1",
        f"  port:       {a.port}",
        f"  reference:  {certs}/127.0.0.1_9999.pem",
        f"  expected:   {sha256(a.der)}",
        f"  presented:  {sha256(a.der)}",
        "  verdict:    match",
        "",
        f"127.0.0.1:{b.port}",
        "  host:       127.0.0.1",
        f"  port:       {b.port}",
        f"  reference:  {certs}/127.0.0.1_9998.pem",
        "  expected:   - (not yet pinned)",
        f"  presented:  {sha256(b.der)}",
        "  verdict:    not yet pinned (would be learned)",
    ]
    assert sorted(p.name for p in certs.iterdir()) == before
    assert a.requests == [] and b.requests == []  # a handshake only, no request


def test_check_mismatch_exits_6_and_shows_the_trust_command(two, ca):
    config, certs, a, b = two
    old = a.der
    a.restart(ca.issue_cert("127.0.0.1"))
    result = pins(config, "check", f"127.0.0.1:{a.port}")
    assert result.exit_code == EXIT_MISMATCH
    assert lines(result.stdout) == [
        f"127.0.0.1:{a.port}",
        "  host:       127.0.0.1",
        f"  port:       {a.port}",
        f"  reference:  {certs}/127.0.0.1_9999.pem",
        f"  expected:   {sha256(old)}",
        f"  presented:  {sha256(a.der)}",
        "  verdict:    MISMATCH",
        f"  to accept:  flask --app wsgi pins trust 127.0.0.1:{a.port} --sha256 {sha256(a.der)}",
    ]
    assert (certs / "127.0.0.1_9999.pem").read_bytes() == der_to_pem(old)


def test_check_unreachable_exits_5(two):
    config, certs, a, b = two
    b.stop()
    result = pins(config, "check", f"127.0.0.1:{b.port}")
    assert result.exit_code == EXIT_UNREACHABLE
    assert lines(result.stdout)[-2:] == ["  presented:  -", "  verdict:    unreachable: connection refused"]
    # Every instance: a matches, b is down; the worst problem decides the status.
    result = pins(config, "check")
    assert result.exit_code == EXIT_UNREACHABLE
    assert "  verdict:    match" in lines(result.stdout)


def test_check_unreadable_reference_exits_7_and_mismatch_wins(two, ca):
    config, certs, a, b = two
    (certs / "127.0.0.1_9998.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n")
    result = pins(config, "check", f"127.0.0.1:{b.port}")
    assert result.exit_code == EXIT_UNREADABLE
    assert lines(result.stdout)[-3:] == [
        "  expected:   - (unreadable: the file is not one PEM certificate (BEGIN/END CERTIFICATE))",
        f"  presented:  {sha256(b.der)}",
        "  verdict:    reference unreadable: the file is not one PEM certificate (BEGIN/END CERTIFICATE)",
    ]
    a.restart(ca.issue_cert("127.0.0.1"))
    assert pins(config, "check").exit_code == EXIT_MISMATCH


def test_check_skips_disabled_instances_unless_named(tmp_path, make_instance):
    on, off = make_instance(), make_instance()
    config = write_config(tmp_path, [Spec("127.0.0.1", on.port, 9999), Spec("127.0.0.1", off.port, 9998, False)])
    result = pins(config, "check")
    assert result.exit_code == 0
    assert f"127.0.0.1:{off.port}" not in result.stdout
    result = pins(config, "check", f"127.0.0.1:{off.port}")
    assert result.exit_code == 0
    assert lines(result.stdout)[0] == f"127.0.0.1:{off.port} (disabled)"
    assert not (tmp_path / "certs").exists()


def test_check_connect_timeout_comes_from_the_configuration(tmp_path):
    # A port that completes TCP but never answers the TLS ClientHello.
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    config = write_config(tmp_path, [Spec("127.0.0.1", port)], extra='  <Timeouts connect="0.3" read="5"/>\n')
    started = time.monotonic()
    result = pins(config, "check")
    elapsed = time.monotonic() - started
    silent.close()
    assert result.exit_code == EXIT_UNREACHABLE
    assert lines(result.stdout)[-1] == "  verdict:    unreachable: no TLS handshake within the connect timeout (0.3 s)"
    assert elapsed < 3


# -- naming --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["check"], ["trust", "--sha256", "0" * 64], ["forget", "--yes"]])
def test_unknown_instance_exits_3_and_lists_the_configured_names(two, command):
    config, certs, a, b = two
    result = pins(config, *command[:1], "192.0.2.99:443", *command[1:])
    assert result.exit_code == EXIT_UNKNOWN
    assert result.stderr == (
        f"Error: unknown instance '192.0.2.99:443'; configured in {config}: "
        f"127.0.0.1:{a.port}, 127.0.0.1:{b.port}\n"
    )
    assert result.stdout == ""


def test_ambiguous_host_exits_4_and_host_alone_works_when_unique(tmp_path, two, make_instance):
    config, certs, a, b = two
    result = pins(config, "check", "127.0.0.1")
    assert result.exit_code == EXIT_AMBIGUOUS
    assert result.stderr == (
        f"Error: '127.0.0.1' is ambiguous: 127.0.0.1:{a.port}, 127.0.0.1:{b.port}; name one as HOST:PORT\n"
    )
    c = make_instance("127.0.0.2")
    config = write_config(tmp_path, [Spec("127.0.0.1", a.port, 9999), Spec("127.0.0.2", c.port, 9999)])
    result = pins(config, "check", "127.0.0.2")
    assert result.exit_code == 0
    assert lines(result.stdout)[0] == f"127.0.0.2:{c.port}"


@pytest.mark.parametrize("name", ["127.0.0.1:http", "127.0.0.1:0", ":443", "[::1"])
def test_bad_instance_name_is_a_usage_error(two, name):
    config, *_ = two
    result = pins(config, "check", name)
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


# -- trust ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "0" * 63, "sha256:" + "0" * 64, "0" * 65])
def test_trust_bad_fingerprint_exits_2_before_connecting(two, bad):
    config, certs, a, b = two
    a.stop()  # a format error is reported first, whatever the instance does
    result = pins(config, "trust", f"127.0.0.1:{a.port}", "--sha256", bad)
    assert result.exit_code == EXIT_USAGE
    assert result.stderr == (
        f"Error: --sha256 {bad!r} is not a SHA-256 fingerprint: expected 64 hexadecimal digits, colons allowed\n"
    )


def test_trust_wrong_fingerprint_exits_6_and_leaves_the_reference(two, ca):
    config, certs, a, b = two
    old = (certs / "127.0.0.1_9999.pem").read_bytes()
    a.restart(ca.issue_cert("127.0.0.1"))
    wrong = sha256(b"something else")
    result = pins(config, "trust", f"127.0.0.1:{a.port}", "--sha256", wrong)
    assert result.exit_code == EXIT_MISMATCH
    assert lines(result.stdout) == [
        f"127.0.0.1:{a.port}",
        f"  reference:  {certs}/127.0.0.1_9999.pem",
        f"  presented:  {sha256(a.der)}",
    ]
    assert result.stderr == (
        f"Error: 127.0.0.1:{a.port} presents sha256 {sha256(a.der)}, not the {wrong} given; "
        f"the reference {certs}/127.0.0.1_9999.pem was not changed\n"
    )
    assert (certs / "127.0.0.1_9999.pem").read_bytes() == old


def test_trust_replaces_the_reference_atomically(two, ca):
    config, certs, a, b = two
    old = a.der
    a.restart(ca.issue_cert("127.0.0.1"))
    path = certs / "127.0.0.1_9999.pem"
    inode = path.stat().st_ino
    # As openssl prints it: upper case with colons.
    result = pins(config, "trust", f"127.0.0.1:{a.port}", "--sha256", colons(sha256(a.der)))
    assert result.exit_code == 0, result.output
    assert lines(result.stdout) == [
        f"127.0.0.1:{a.port}",
        f"  reference:  {path}",
        f"  presented:  {sha256(a.der)}",
        f"  previous:   {sha256(old)}",
        f"trusted: {path} now holds sha256 {sha256(a.der)}; running workers use it within a second",
    ]
    assert path.read_bytes() == der_to_pem(a.der)
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(p.name for p in certs.iterdir()) == [".127.0.0.1_9999.pem.lock", "127.0.0.1_9999.pem"]
    # Trusting it again changes nothing.
    again = pins(config, "trust", f"127.0.0.1:{a.port}", "--sha256", sha256(a.der))
    assert again.exit_code == 0
    assert lines(again.stdout)[-1] == f"unchanged: {path} already holds sha256 {sha256(a.der)}"
    assert path.read_bytes() == der_to_pem(a.der)


def test_trust_unreachable_exits_5(two):
    config, certs, a, b = two
    b.stop()
    result = pins(config, "trust", f"127.0.0.1:{b.port}", "--sha256", sha256(b.der))
    assert result.exit_code == EXIT_UNREACHABLE
    assert result.stderr == (
        f"Error: 127.0.0.1:{b.port} is unreachable: connection refused; "
        f"the reference {certs}/127.0.0.1_9998.pem was not changed\n"
    )
    assert not (certs / "127.0.0.1_9998.pem").exists()


def test_trust_without_fingerprint_is_a_usage_error(two):
    config, certs, a, b = two
    result = pins(config, "trust", f"127.0.0.1:{b.port}")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith("Error: give --sha256 FINGERPRINT")
    assert not (certs / "127.0.0.1_9998.pem").exists()


def test_trust_from_file_the_seeds_step_5(two, ca, tmp_path):
    """The instance's httpsrv/kl_feed_service_cert.pem copied to the balancer, installed without a restart."""
    config, certs, a, b = two
    path = certs / "127.0.0.1_9999.pem"
    old = path.read_bytes()
    new = ca.issue_cert("127.0.0.1")
    copied = tmp_path / "kl_feed_service_cert.pem"
    new.cert_chain_pems[0].write_to_path(str(copied))
    new_der = leaf_der(new)
    name = f"127.0.0.1:{a.port}"
    shown = [name, f"  reference:  {path}", f"  file:       {copied}", f"  file sha256: {sha256(new_der)}"]

    # Wrong --sha256: refused, unchanged.
    result = pins(config, "trust", name, "--from-file", str(copied), "--sha256", sha256(a.der))
    assert result.exit_code == EXIT_MISMATCH
    assert lines(result.stdout) == shown
    assert result.stderr == (
        f"Error: {copied} has sha256 {sha256(new_der)}, not the {sha256(a.der)} given; "
        f"the reference {path} was not changed\n"
    )
    assert path.read_bytes() == old
    # Neither --sha256 nor --yes: asks; no means no.
    result = pins(config, "trust", name, "--from-file", str(copied), input="n\n")
    assert result.exit_code == EXIT_DECLINED
    assert path.read_bytes() == old
    # --sha256 that matches: installed (the instance is not contacted).
    a.stop()
    result = pins(config, "trust", name, "--from-file", str(copied), "--sha256", sha256(new_der))
    assert result.exit_code == 0, result.output
    assert lines(result.stdout) == shown + [
        f"  previous:   {sha256(a.der)}",
        f"trusted: {path} now holds sha256 {sha256(new_der)}; running workers use it within a second",
    ]
    assert path.read_bytes() == der_to_pem(new_der)
    # --yes accepts what is shown; and the confirmation prompt accepts "y".
    path.write_bytes(old)
    assert pins(config, "trust", name, "--from-file", str(copied), "--yes").exit_code == 0
    assert path.read_bytes() == der_to_pem(new_der)
    path.write_bytes(old)
    result = pins(config, "trust", name, "--from-file", str(copied), input="y\n")
    assert result.exit_code == 0
    assert path.read_bytes() == der_to_pem(new_der)


def test_trust_from_file_that_is_not_one_certificate_is_a_usage_error(two, ca, tmp_path):
    config, certs, a, b = two
    key = tmp_path / "key.pem"
    ca.issue_cert("x.test").private_key_pem.write_to_path(str(key))
    result = pins(config, "trust", f"127.0.0.1:{a.port}", "--from-file", str(key), "--yes")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr == (
        f"Error: {key} cannot be used: the file is not one PEM certificate (BEGIN/END CERTIFICATE)\n"
    )
    assert (certs / "127.0.0.1_9999.pem").read_bytes() == der_to_pem(a.der)


# -- forget and prune -----------------------------------------------------------------------------


def test_forget_asks_then_deletes(two):
    config, certs, a, b = two
    path = certs / "127.0.0.1_9999.pem"
    name = f"127.0.0.1:{a.port}"
    result = pins(config, "forget", name, input="n\n")
    assert result.exit_code == EXIT_DECLINED
    assert lines(result.stdout)[:3] == [name, f"  reference:  {path}", f"  sha256:     {sha256(a.der)}"]
    assert result.stderr.endswith(f"Error: declined; the reference {path} was not changed\n")
    assert path.exists()
    result = pins(config, "forget", name, input="y\n")
    assert result.exit_code == 0
    assert lines(result.stdout)[-1] == f"deleted: {path}; the next contact with {name} learns its certificate again"
    assert not path.exists()
    result = pins(config, "forget", name, "--yes")
    assert result.exit_code == 0
    assert lines(result.stdout) == [
        name,
        f"  reference:  {path}",
        "  sha256:     not yet pinned",
        f"nothing to delete: {path} does not exist",
    ]


def test_forget_yes_deletes_an_unreadable_reference(two):
    config, certs, a, b = two
    path = certs / "127.0.0.1_9998.pem"
    path.write_bytes(b"garbage")
    result = pins(config, "forget", f"127.0.0.1:{b.port}", "--yes")
    assert result.exit_code == 0
    assert "  sha256:     unreadable: the file is not one PEM certificate (BEGIN/END CERTIFICATE)" in result.stdout
    assert not path.exists()


def test_prune_shows_then_deletes_only_unconfigured_references(tmp_path, make_instance):
    a = make_instance()
    config = write_config(tmp_path, [Spec("127.0.0.1", a.port, 9999), Spec("127.0.0.1", a.port + 1, 9998, False)])
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("127.0.0.1_9999.pem", "127.0.0.1_9998.pem", "127.0.0.1_7777.pem", "old-host_9999.pem"):
        (certs / name).write_bytes(der_to_pem(a.der))
    (certs / "broken_1.pem").write_bytes(b"")
    (certs / ".old-host_9999.pem.lock").write_bytes(b"")
    (certs / "notes.txt").write_text("kept")
    fp = sha256(a.der)
    result = pins(config, "prune")
    assert result.exit_code == 0
    assert lines(result.stdout) == [
        f"would delete: {certs}/127.0.0.1_7777.pem  sha256 {fp}",
        f"would delete: {certs}/broken_1.pem  unreadable: the file is empty",
        f"would delete: {certs}/old-host_9999.pem  sha256 {fp}",
        "3 unconfigured reference(s); run again with --yes to delete them",
    ]
    assert len(list(certs.glob("*.pem"))) == 5
    result = pins(config, "prune", "--yes")
    assert result.exit_code == 0
    assert lines(result.stdout) == [
        f"deleted: {certs}/127.0.0.1_7777.pem  sha256 {fp}",
        f"deleted: {certs}/broken_1.pem  unreadable: the file is empty",
        f"deleted: {certs}/old-host_9999.pem  sha256 {fp}",
    ]
    # The disabled instance is still configured: its reference stays.
    assert sorted(p.name for p in certs.glob("*.pem")) == ["127.0.0.1_9998.pem", "127.0.0.1_9999.pem"]
    assert (certs / "notes.txt").read_text() == "kept"
    result = pins(config, "prune")
    assert lines(result.stdout) == [f"no unconfigured references in {certs}"]


# -- the real entry point and start-up ------------------------------------------------------------


def test_flask_entry_point_with_balancer_config(two):
    """As an operator runs it: ``flask --app wsgi pins check`` in the install directory."""
    config, certs, a, b = two
    env = {**os.environ, "BALANCER_CONFIG": str(config)}
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "pins", "check", f"127.0.0.1:{a.port}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout)[-1] == "  verdict:    match"
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "pins", "check", "nowhere"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == EXIT_UNKNOWN
    assert proc.stderr.splitlines()[-1].startswith("Error: unknown instance 'nowhere'; configured in ")


def test_startup_warns_about_writable_cert_dir_and_references(two, caplog):
    config, certs, a, b = two
    create_app(load(config))
    assert not [r for r in caplog.records if "writable by group or others" in r.getMessage()]
    certs.chmod(0o775)
    (certs / "127.0.0.1_9999.pem").chmod(0o666)
    with caplog.at_level(logging.WARNING, logger="app"):
        create_app(load(config))
    warnings = [r.getMessage() for r in caplog.records if "writable by group or others" in r.getMessage()]
    assert [w.split(" is writable")[0] for w in warnings] == [
        f"{certs} (mode 0775)",
        f"{certs}/127.0.0.1_9999.pem (mode 0666)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "writable by group" in r.getMessage())


def test_pins_commands_are_listed(two):
    config, *_ = two
    result = pins(config, "--help")
    assert result.exit_code == 0
    for command in ("check", "forget", "list", "prune", "trust"):
        assert f"  {command} " in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give CertDirPath to another user")
def test_writing_as_another_user_than_the_cert_dir_owner_warns(two, ca):
    config, certs, a, b = two
    os.chown(certs, 65534, 65534)
    result = pins(config, "forget", f"127.0.0.1:{a.port}", "--yes")
    assert result.exit_code == 0
    owner = pwd.getpwuid(65534).pw_name
    assert result.stderr == (
        f"warning: {certs} belongs to {owner} but this command runs as root; files it creates may be unusable "
        f"by the balancer: run it as {owner} (sudo -u)\n"
    )
    assert not (certs / "127.0.0.1_9999.pem").exists()
