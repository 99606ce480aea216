"""``flask --app wsgi pins ...``: look at, check and change the reference certificates without downtime.

The commands read the configuration the server reads (``BALANCER_CONFIG``)
and act on the pin store it names (CertDirPath, or etcd with ``<PinStore
type="etcd">``) through the one interface the server uses
(:class:`app.pins.PinStore`): a change is made only if the reference still
holds what the command showed, atomically. Running workers, of every
balancer sharing the store, notice a replaced or deleted reference within a
second and close the keep-alive connections checked against the old one
(docs/design.md, "Reference certificates" and "Fleet").

An instance is named ``HOST:PORT`` with PORT its ``api_port`` (``[v6]:PORT``
for an IPv6 address), or ``HOST`` alone when only one instance has that host.
Errors are one line on stderr, with an exit status per cause:

====  ==========================================================
0     done (check: every instance matches or would be learned)
1     configuration error; or a confirmation was declined
2     usage error: bad fingerprint format, bad name, bad PEM file
3     unknown instance (the message lists the configured names)
4     ambiguous HOST (the message lists the candidates)
5     instance unreachable
6     certificate mismatch (check), or fingerprint mismatch (trust)
7     reference file unreadable (check)
8     the pin store cannot be reached; or the reference changed
      since it was shown (nothing was changed)
====  ==========================================================
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import click
from flask import current_app
from flask.cli import AppGroup

from . import pinning
from .pins import (
    DirectoryStore,
    Entry,
    NotACertificate,
    PinStore,
    StoreUnavailable,
    TRUST_COMMAND,
    open_store,
    pem_to_der,
    same_fingerprint,
    sha256,
)
from .settings import Config, InstanceSpec

EXIT_DECLINED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_AMBIGUOUS = 4
EXIT_UNREACHABLE = 5
EXIT_MISMATCH = 6
EXIT_UNREADABLE = 7
EXIT_STORE = 8

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")

pins = AppGroup("pins", help="Reference certificates of the instances: list, check, trust, forget, prune, push, pull.")


class PinsError(click.ClickException):
    """A one-line error with its own exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unreachable(Exception):
    """No TLS handshake with the instance; ``str()`` says why."""


# -- naming instances ------------------------------------------------------------


def parse_name(name: str) -> tuple[str, int | None]:
    """``HOST:PORT``, ``[v6]:PORT``, ``HOST`` or a bare IPv6 address, as (host, port or None)."""
    text = name.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise PinsError(f"{name!r} is not HOST, HOST:PORT or [IPv6]:PORT", EXIT_USAGE)
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text  # a host name, or an IPv6 address without a port
    if not host:
        raise PinsError(f"{name!r} is not HOST, HOST:PORT or [IPv6]:PORT", EXIT_USAGE)
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise PinsError(f"{name!r}: the port must be the instance's api_port, 1 to 65535", EXIT_USAGE)
    return host, int(port_text)


def same_host(a: str, b: str) -> bool:
    """Host names compare case-insensitively, IP addresses by value (``::1`` equals ``0::1``)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower().rstrip(".") == b.lower().rstrip(".")


def resolve(config: Config, name: str) -> InstanceSpec:
    """The configured instance *name* designates; unknown or ambiguous names are errors."""
    host, port = parse_name(name)
    found = [i for i in config.instances if same_host(i.host, host) and port in (None, i.api_port)]
    if not found:
        known = ", ".join(i.name for i in config.instances)
        raise PinsError(f"unknown instance {name!r}; configured in {config.path}: {known}", EXIT_UNKNOWN)
    if len(found) > 1:
        candidates = ", ".join(i.name for i in found)
        raise PinsError(f"{name!r} is ambiguous: {candidates}; name one as HOST:PORT", EXIT_AMBIGUOUS)
    return found[0]


def parse_fingerprint(text: str) -> str:
    """Lower-case hex of a SHA-256 fingerprint given with or without colons, in any case."""
    digits = text.strip().replace(":", "").lower()
    if not _FINGERPRINT.fullmatch(digits):
        raise PinsError(
            f"--sha256 {text!r} is not a SHA-256 fingerprint: expected 64 hexadecimal digits, colons allowed",
            EXIT_USAGE,
        )
    return digits


# -- talking to instances, reading files ----------------------------------------------


def presented_certificate(instance: InstanceSpec, timeout: float) -> bytes:
    """DER of the certificate *instance* presents now: a TLS handshake, no request, nothing written."""
    try:
        return pinning.presented_certificate(instance.host, instance.api_port, timeout)
    except pinning.NotConnected as exc:
        raise Unreachable(exc.reason) from exc


def describe(der: bytes) -> tuple[str, str]:
    """(subject, not-after) of a certificate, for people."""
    # Imported here: a worker, which registers these commands, never needs it (8 MB).
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    not_after = cert.not_valid_after_utc
    when = not_after.strftime("%Y-%m-%d %H:%M:%S UTC")
    if not_after < datetime.now(timezone.utc):
        when += " (expired; the balancer does not check expiry)"
    return cert.subject.rfc4514_string() or "(empty)", when


def _config() -> Config:
    return current_app.config["BALANCER"]


def _store(config: Config) -> PinStore:
    return open_store(config)


def _where(store: PinStore) -> str:
    """The store, for people: CertDirPath, or etcd's endpoints and key prefix."""
    if isinstance(store, DirectoryStore):
        return str(store.cert_dir)
    spec = store.spec  # type: ignore[attr-defined]
    return f"etcd {spec.pins_prefix} at {' '.join(spec.endpoints)}"


def _look(store: PinStore, name: str) -> Entry:
    try:
        return store.look(name)
    except StoreUnavailable as exc:
        raise PinsError(f"the pin store cannot be reached: {exc}", EXIT_STORE) from exc


def _names(store: PinStore) -> list[str]:
    try:
        return store.names()
    except StoreUnavailable as exc:
        raise PinsError(f"the pin store cannot be reached: {exc}", EXIT_STORE) from exc


def _warn_if_not_owner(store: PinStore) -> None:
    if isinstance(store, DirectoryStore):
        _warn_if_not_owner_of(store.cert_dir)


def _warn_if_not_owner_of(cert_dir: Path) -> None:
    """Files written by another user (root) may be unusable by the service user: say so."""
    try:
        owner = cert_dir.stat().st_uid
    except OSError:
        return
    if owner != os.geteuid():
        click.echo(
            f"warning: {cert_dir} belongs to {_user(owner)} but this command runs as {_user(os.geteuid())}; "
            f"files it creates may be unusable by the balancer: run it as {_user(owner)} (sudo -u)",
            err=True,
        )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _out(label: str, value: str) -> None:
    click.echo(f"  {label + ':':<11} {value}")


# -- commands --------------------------------------------------------------------------


@pins.command("list")
def list_command() -> None:
    """Every configured instance with its reference, then references no instance uses."""
    config = _config()
    store = _store(config)
    click.echo(f"configuration: {config.path}")
    click.echo(f"{'CertDirPath:' if store.kind == 'directory' else 'pin store:':<14} {_where(store)}")
    used = set()
    for instance in config.instances:
        name = instance.reference_name
        used.add(name)
        click.echo("")
        click.echo(f"{instance.name} ({'enabled' if instance.enabled else 'disabled'})")
        _out("reference", store.location(name))
        entry = _look(store, name)
        _out("state", entry.state)
        if entry.der is not None:
            subject, not_after = describe(entry.der)
            _out("sha256", sha256(entry.der))
            _out("subject", subject)
            _out("not after", not_after)
    others = [n for n in _names(store) if n not in used]
    click.echo("")
    if not others:
        click.echo("unconfigured references: none")
        return
    click.echo(f"unconfigured references ({len(others)}; flask --app wsgi pins prune deletes them):")
    for name in others:
        entry = _look(store, name)
        click.echo(f"  {store.location(name)}  {'sha256 ' + sha256(entry.der) if entry.der is not None else entry.state}")


@pins.command("check")
@click.argument("name", metavar="[HOST[:PORT]]", required=False)
def check_command(name: str | None) -> None:
    """Connect now and compare each presented certificate with its reference; writes nothing.

    Without a name, every enabled instance; a disabled one only when named.
    """
    config = _config()
    instances = [resolve(config, name)] if name else list(config.enabled_instances)
    if not instances:
        click.echo(f"no enabled instance in {config.path}; name one to check it")
        return
    worst = 0
    for i, instance in enumerate(instances):
        if i:
            click.echo("")
        worst = max(worst, _check_one(config, _store(config), instance), key=_severity)
    if worst:
        raise SystemExit(worst)


def _severity(code: int) -> int:
    # A mismatch matters most, then a damaged reference, then a stopped instance.
    return {0: 0, EXIT_UNREACHABLE: 1, EXIT_UNREADABLE: 2, EXIT_MISMATCH: 3}[code]


def _check_one(config: Config, store: PinStore, instance: InstanceSpec) -> int:
    entry = _look(store, instance.reference_name)
    expected, state = entry.der, entry.state
    try:
        presented: bytes | None = presented_certificate(instance, config.timeouts.connect)
        problem = None
    except Unreachable as exc:
        presented, problem = None, str(exc)
    click.echo(f"{instance.name}{'' if instance.enabled else ' (disabled)'}")
    _out("host", instance.host)
    _out("port", str(instance.api_port))
    _out("reference", store.location(instance.reference_name))
    _out("expected", sha256(expected) if expected is not None else f"- ({state})")
    _out("presented", sha256(presented) if presented is not None else "-")
    if state.startswith("unreadable"):
        _out("verdict", f"reference {state}")
        return EXIT_UNREADABLE
    if problem is not None:
        _out("verdict", f"unreachable: {problem}")
        return EXIT_UNREACHABLE
    assert presented is not None
    if expected is None:
        _out("verdict", "not yet pinned (would be learned)")
        return 0
    if same_fingerprint(sha256(expected), sha256(presented)):
        _out("verdict", "match")
        return 0
    _out("verdict", "MISMATCH")
    _out("to accept", f"{TRUST_COMMAND} {instance.name} --sha256 {sha256(presented)}")
    return EXIT_MISMATCH


def _fingerprint_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else parse_fingerprint(value)


@pins.command("trust")
@click.argument("name", metavar="HOST[:PORT]")
@click.option("--sha256", "fingerprint", callback=_fingerprint_option, metavar="FINGERPRINT",
              help="The SHA-256 the new certificate must have (hex, colons allowed, any case).")
@click.option("--from-file", "pem_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Install this PEM certificate (the instance's httpsrv/kl_feed_service_cert.pem) instead of "
                   "fetching what the instance presents.")
@click.option("--yes", is_flag=True, help="With --from-file: accept the fingerprint shown without --sha256.")
def trust_command(name: str, fingerprint: str | None, pem_file: Path | None, yes: bool) -> None:
    """Replace the reference of HOST[:PORT] with a certificate whose SHA-256 you confirm.

    Without --from-file, the certificate the instance presents now, only if
    its SHA-256 equals --sha256. Running workers use it within a second.
    """
    config = _config()
    instance = resolve(config, name)
    store = _store(config)
    path = store.location(instance.reference_name)
    click.echo(instance.name)
    _out("reference", path)
    seen = _look(store, instance.reference_name)  # what the operator decides on
    if pem_file is not None:
        der = _read_pem_file(pem_file)
        _out("file", str(pem_file))
        _out("file sha256", sha256(der))
        if fingerprint is None and not yes:
            if not click.confirm(f"Install this certificate as the reference of {instance.name}?"):
                raise PinsError(f"declined; the reference {path} was not changed", EXIT_DECLINED)
        elif fingerprint is not None and not same_fingerprint(fingerprint, sha256(der)):
            raise PinsError(
                f"{pem_file} has sha256 {sha256(der)}, not the {fingerprint} given; "
                f"the reference {path} was not changed",
                EXIT_MISMATCH,
            )
    else:
        if fingerprint is None:
            raise PinsError(
                "give --sha256 FINGERPRINT (as shown by pins check and on the instance), or --from-file PEM; "
                f"the reference {path} was not changed",
                EXIT_USAGE,
            )
        try:
            der = presented_certificate(instance, config.timeouts.connect)
        except Unreachable as exc:
            raise PinsError(
                f"{instance.name} is unreachable: {exc}; the reference {path} was not changed", EXIT_UNREACHABLE
            ) from exc
        _out("presented", sha256(der))
        if not same_fingerprint(fingerprint, sha256(der)):
            raise PinsError(
                f"{instance.name} presents sha256 {sha256(der)}, not the {fingerprint} given; "
                f"the reference {path} was not changed",
                EXIT_MISMATCH,
            )
    _install(store, instance.reference_name, der, seen)


def _read_pem_file(pem_file: Path) -> bytes:
    try:
        with open(pem_file, "rb") as f:
            return pem_to_der(f.read(64 * 1024 + 1))
    except NotACertificate as exc:
        raise PinsError(f"{pem_file} cannot be used: {exc}", EXIT_USAGE) from exc
    except OSError as exc:
        raise PinsError(f"{pem_file} cannot be read: {exc.strerror or exc}", EXIT_USAGE) from exc


def _install(store: PinStore, name: str, der: bytes, seen: Entry) -> None:
    """Replace reference *name* with *der* if it still holds what was *seen* when the command started."""
    _warn_if_not_owner(store)
    path = store.location(name)
    _out("previous", sha256(seen.der) if seen.der is not None else seen.state)
    if seen.der == der:
        click.echo(f"unchanged: {path} already holds sha256 {sha256(der)}")
        return
    try:
        replaced = store.replace(name, der, seen)
    except StoreUnavailable as exc:
        raise PinsError(f"the pin store cannot be reached: {exc}; the reference {path} was not changed", EXIT_STORE) from exc
    if not replaced:
        now = _look(store, name)
        raise PinsError(
            f"the reference {path} changed while this command ran (it now holds "
            f"{'sha256 ' + sha256(now.der) if now.der is not None else now.state}); it was not changed: look again",
            EXIT_STORE,
        )
    click.echo(f"trusted: {path} now holds sha256 {sha256(der)}; running workers use it within a second")


@pins.command("forget")
@click.argument("name", metavar="HOST[:PORT]")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def forget_command(name: str, yes: bool) -> None:
    """Delete the reference of HOST[:PORT]: the next contact learns the certificate again (trust on first use)."""
    config = _config()
    instance = resolve(config, name)
    store = _store(config)
    path = store.location(instance.reference_name)
    click.echo(instance.name)
    _out("reference", path)
    seen = _look(store, instance.reference_name)
    _out("sha256", sha256(seen.der) if seen.der is not None else seen.state)
    if seen.der is None and seen.problem is None:
        click.echo(f"nothing to delete: {path} does not exist")
        return
    if not yes and not click.confirm(
        f"Delete it? The next contact trusts whatever certificate {instance.name} presents then."
    ):
        raise PinsError(f"declined; the reference {path} was not changed", EXIT_DECLINED)
    _warn_if_not_owner(store)
    _delete(store, instance.reference_name, seen)
    click.echo(f"deleted: {path}; the next contact with {instance.name} learns its certificate again")


def _delete(store: PinStore, name: str, seen: Entry) -> None:
    """Delete reference *name* if it still holds what was *seen*."""
    path = store.location(name)
    try:
        deleted = store.delete(name, seen)
    except StoreUnavailable as exc:
        raise PinsError(f"the pin store cannot be reached: {exc}; the reference {path} was not changed", EXIT_STORE) from exc
    if not deleted:
        now = _look(store, name)
        raise PinsError(
            f"the reference {path} changed while this command ran (it now holds "
            f"{'sha256 ' + sha256(now.der) if now.der is not None else now.state}); it was not deleted: look again",
            EXIT_STORE,
        )


@pins.command("prune")
@click.option("--yes", is_flag=True, help="Delete; without it, only show what would be deleted.")
def prune_command(yes: bool) -> None:
    """Delete references in CertDirPath that no configured instance (enabled or not) uses."""
    config = _config()
    store = _store(config)
    used = {i.reference_name for i in config.instances}
    unused = [n for n in _names(store) if n not in used]
    if not unused:
        click.echo(f"no unconfigured references in {_where(store)}")
        return
    if yes:
        _warn_if_not_owner(store)
    for name in unused:
        seen = _look(store, name)
        if seen.der is None and seen.problem is None:
            continue  # deleted meanwhile
        fingerprint = f"sha256 {sha256(seen.der)}" if seen.der is not None else seen.state
        if not yes:
            click.echo(f"would delete: {store.location(name)}  {fingerprint}")
            continue
        _delete(store, name, seen)
        click.echo(f"deleted: {store.location(name)}  {fingerprint}")
    if not yes:
        click.echo(f"{len(unused)} unconfigured reference(s); run again with --yes to delete them")


# -- moving references between CertDirPath and the shared store ------------------------------------


def _shared_store(config: Config, command: str) -> PinStore:
    store = _store(config)
    if store.kind == "directory":
        raise PinsError(
            f"pins {command} copies between CertDirPath and the shared store, and {config.path} names none: "
            'add <PinStore type="etcd" endpoints="..."/> (README "Fleet")',
            EXIT_USAGE,
        )
    return store


def _plan(source: PinStore, target: PinStore) -> tuple[dict[str, bytes], list[str], list[str]]:
    """(references to copy, unchanged names, conflicts) for copying every reference of *source* into *target*.

    A conflict is a reference *target* holds with another certificate (or
    unusable), or one *source* holds unusable: nothing is ever overwritten.
    """
    copy: dict[str, bytes] = {}
    unchanged: list[str] = []
    conflicts: list[str] = []
    for name in _names(source):
        have = _look(source, name)
        if have.der is None:
            if have.problem is not None:
                conflicts.append(f"{source.location(name)} cannot be used: {have.problem}")
            continue
        there = _look(target, name)
        if there.der == have.der:
            unchanged.append(name)
        elif there.der is None and there.problem is None:
            copy[name] = have.der
        else:
            holds = f"sha256 {sha256(there.der)}" if there.der is not None else there.state
            conflicts.append(
                f"{target.location(name)} holds {holds}, {source.location(name)} holds sha256 {sha256(have.der)}"
            )
    return copy, unchanged, conflicts


def _copy(source: PinStore, target: PinStore, command: str) -> None:
    copy, unchanged, conflicts = _plan(source, target)
    click.echo(f"from: {_where(source)}")
    click.echo(f"to:   {_where(target)}")
    for name in unchanged:
        click.echo(f"unchanged: {target.location(name)} already holds sha256 {sha256(_look(target, name).der or b'')}")
    if conflicts:
        for conflict in conflicts:
            click.echo(f"CONFLICT: {conflict}")
        raise PinsError(
            f"{len(conflicts)} conflict(s): nothing was copied; settle each with pins trust or pins forget, "
            f"then run pins {command} again",
            EXIT_MISMATCH,
        )
    if not copy:
        click.echo("nothing to copy")
        return
    if isinstance(target, DirectoryStore):
        _warn_if_not_owner(target)
        for name, der in copy.items():
            created, now = target.create(name, der)
            if not created and now.der != der:
                raise PinsError(f"{target.location(name)} was created by someone else meanwhile; run pins {command} again", EXIT_STORE)
    else:
        try:
            done = target.create_all(copy)  # type: ignore[attr-defined]
        except StoreUnavailable as exc:
            raise PinsError(f"the pin store cannot be reached: {exc}; nothing was copied", EXIT_STORE) from exc
        if not done:
            raise PinsError(
                "a reference was learned or changed in the store while this command ran; nothing was copied: "
                f"run pins {command} again",
                EXIT_STORE,
            )
    for name, der in copy.items():
        click.echo(f"copied: {target.location(name)} holds sha256 {sha256(der)}")


@pins.command("push")
def push_command() -> None:
    """Copy the references in CertDirPath into the shared store, all or none; never overwrite one."""
    config = _config()
    store = _shared_store(config, "push")
    _copy(DirectoryStore(config.cert_dir), store, "push")


@pins.command("pull")
def pull_command() -> None:
    """Copy the shared store's references into CertDirPath, all or none; never overwrite a file."""
    config = _config()
    store = _shared_store(config, "pull")
    _copy(store, DirectoryStore(config.cert_dir), "pull")


# -- the fan-out journal ------------------------------------------------------------------------------

journal = AppGroup("journal", help="Fan-out writes the instances still owe: list, show, retry, drop.")


def _journal(config: Config):
    from .journal import Journal  # here: the pins commands never need it

    if not config.fanout:
        click.echo(f"note: no <Request fanout=\"true\"> in {config.path}; showing the journal {config.journal_dir} anyway")
    return Journal(config.journal_dir)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@journal.command("list")
def journal_list_command() -> None:
    """Every enabled instance: up to date, catching up (and how many writes it owes), or diverged."""
    config = _config()
    book = _journal(config)
    click.echo(f"journal: {book.directory}")
    counts, diverged = book.counts(), book.diverged()
    for instance in config.enabled_instances:
        name = instance.name
        owed = counts.get(name, 0)
        if name in diverged:
            state = f"diverged at write {diverged[name]['seq']}"
        elif owed:
            state = "catching up"
        else:
            state = "up to date"
        click.echo(f"{name}  {state}, owes {owed} write(s)")
    enabled = {i.name for i in config.enabled_instances}
    for name in sorted((set(counts) | set(diverged)) - enabled):
        # Disabled or removed since: a disabled one gets them when enabled again.
        click.echo(f"{name}  not an enabled instance, owes {counts.get(name, 0)} write(s); "
                   f"flask --app wsgi journal drop {name} forgets them")


@journal.command("show")
@click.argument("name", metavar="HOST[:PORT]")
def journal_show_command(name: str) -> None:
    """The writes HOST[:PORT] owes, oldest first, and why it diverged if it did."""
    config = _config()
    book = _journal(config)
    instance = _journaled(config, book, name)
    diverged = book.diverged().get(instance.name)
    owed = book.owed(instance.name)
    click.echo(f"{instance.name}: owes {len(owed)} write(s)")
    if diverged is not None:
        click.echo(
            f"  diverged:  write {diverged['seq']} ({diverged['method']} {diverged['target']}) was answered "
            f"{diverged['answer']}, the other instances answered {diverged['expected']} ({_when(diverged['at'])})"
        )
        click.echo(f"  settle it: make {instance.name} hold what the others hold, then "
                   f"flask --app wsgi journal drop {instance.name} (or journal retry {instance.name} to replay again)")
    for write in owed:
        agreed = write.status if write.status is not None else "not yet known"
        click.echo(f"  write {write.seq}  {_when(write.accepted_at)}  {write.method} {write.target}  "
                   f"{write.size} bytes  answered {agreed} by the others")


@journal.command("retry")
@click.argument("name", metavar="HOST[:PORT]")
def journal_retry_command(name: str) -> None:
    """Replay to a diverged HOST[:PORT] again, from the write it refused (after fixing the instance)."""
    config = _config()
    book = _journal(config)
    instance = _journaled(config, book, name)
    with _journal_lock(book, config):
        cleared = book.clear_diverged(instance.name)
    if not cleared:
        click.echo(f"{instance.name} is not diverged: nothing to retry")
        return
    click.echo(f"{instance.name}: replays start again within a second, oldest write first")


@journal.command("drop")
@click.argument("name", metavar="HOST[:PORT]")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def journal_drop_command(name: str, yes: bool) -> None:
    """Drop every write HOST[:PORT] owes and let it take requests again: you made it identical by hand."""
    config = _config()
    book = _journal(config)
    instance = _journaled(config, book, name)
    owed = book.owed(instance.name)
    diverged = instance.name in book.diverged()
    if not owed and not diverged:
        click.echo(f"{instance.name} owes nothing: nothing to drop")
        return
    if not yes and not click.confirm(
        f"Drop the {len(owed)} write(s) {instance.name} owes? It will take requests again without them."
    ):
        raise PinsError(f"declined; the journal of {instance.name} was not changed", EXIT_DECLINED)
    with _journal_lock(book, config):
        dropped = book.owed(instance.name)
        for write in dropped:
            book.settle(write, [instance.name])
        book.clear_diverged(instance.name)
    click.echo(f"dropped {len(dropped)} write(s) owed by {instance.name}; it takes requests again")


def _journaled(config: Config, book: Any, name: str) -> InstanceSpec:
    """The configured instance *name* designates, or, for one no longer configured, its name in the journal."""
    try:
        return resolve(config, name)
    except PinsError as exc:
        if exc.exit_code != EXIT_UNKNOWN:
            raise
        host, port = parse_name(name)
        if port is not None:
            gone = InstanceSpec(host=host, api_port=port, matching_port=0, enabled=False)
            if gone.name in book.counts() or gone.name in book.diverged():
                return gone
        raise


@contextlib.contextmanager
def _journal_lock(book: Any, config: Config) -> Iterator[None]:
    """The node's fan-out lock, as running workers take it; a journal that cannot be used is exit 8."""
    from .journal import JournalUnavailable

    try:
        with book.lock(config.timeouts.total):
            yield
    except JournalUnavailable as exc:
        raise PinsError(str(exc), EXIT_STORE) from exc
