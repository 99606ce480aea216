"""Read ``kl_balancer.conf`` once and validate it into :mod:`app.settings` objects.

Imports nothing but the standard library and lxml, so that ``gunicorn.conf.py``
can read the server settings in the master without loading ssl or urllib3
before the gevent worker patches them (docs/design.md, "Traps").

Every problem is reported as one :class:`ConfigError` naming the file, the
line, the element or attribute, the bad value and what was expected. Values
are checked by validators: pure functions from the attribute's text to its
value that raise ``ValueError`` with the rest of the sentence ("is out of
range; expected 1 to 100"), as gunicorn's ``validate_pos_int`` does; the
reader adds file, line, element and value. Each optional element is one
table of (attribute, validator); its defaults are the dataclass's.

The parser resolves no entities, loads no DTD and never touches the network;
a document type declaration is refused outright.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lxml import etree

from .settings import (
    ALLOWED_METHODS,
    DEFAULT_ADMIN_ALLOW,
    FANOUT_METHODS,
    GIB,
    MAX_BUFFER_BYTES,
    ON_MISMATCH,
    RESERVED_PREFIX,
    PIN_STORE_TYPES,
    TLS_VERSIONS,
    AllowedRequest,
    BalancerSpec,
    Config,
    Failover,
    HealthCheck,
    InstanceSpec,
    JournalSpec,
    Limits,
    PinStoreSpec,
    Timeouts,
    TLSPolicy,
)

DEFAULT_PATH = "config/kl_balancer.conf"
ENV_VAR = "BALANCER_CONFIG"

#: Larger files are refused before parsing: a real configuration is a few KiB.
MAX_CONFIG_BYTES = 1024 * 1024

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# RFC 3986 pchar without "%": a literal path in the configuration is matched
# against the decoded request path, so an escape in it would be ambiguous.
_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is the one-line reason."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


def config_path(environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    """The configuration file named by ``BALANCER_CONFIG``, or the default."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(ENV_VAR) or DEFAULT_PATH)


def load(path: Path | str | None = None) -> Config:
    """Read, parse and validate the configuration file at *path*."""
    path = Path(path) if path is not None else config_path()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            path, None, f"cannot read the configuration: {exc.strerror}; expected a readable kl_balancer.conf"
        ) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            path, None, f"file is larger than {MAX_CONFIG_BYTES} bytes; expected a configuration of a few KiB"
        )
    return _Reader(path, data).read()


# -- validators: text in, value out, ValueError with the rest of the sentence -----------------

Validator = Callable[[str], Any]


def whole(low: int, high: int, digits: int = 9) -> Validator:
    """A whole number from *low* to *high*."""

    def validate(value: str) -> int:
        if not re.fullmatch(rf"[0-9]{{1,{digits}}}", value.strip()):
            raise ValueError(f"is not a whole number; expected {low} to {high}")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"is out of range; expected {low} to {high}")
        return number

    return validate


port = whole(1, 65535)


def seconds(zero: bool = False) -> Validator:
    """Seconds up to an hour; 0 only where *zero* says it means something."""

    def validate(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not (0 <= number <= 3600 if zero else 0 < number <= 3600):
            raise ValueError(f"is not valid; expected seconds, {'from 0 to 3600' if zero else 'above 0 and at most 3600'}")
        return number

    return validate


def interval(value: str) -> float:
    """0 (off), or seconds from 1 to 3600."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number == 0 or 1 <= number <= 3600):
        raise ValueError("is not valid; expected 0 (off) or seconds from 1 to 3600")
    return number


def boolean(value: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise ValueError("is not a boolean; expected true or false")


def one_of(choices: tuple[str, ...]) -> Validator:
    def validate(value: str) -> str:
        if value not in choices:
            raise ValueError(f"is not valid; expected one of: {', '.join(choices)}")
        return value

    return validate


def statuses(value: str) -> tuple[int, ...]:
    """HTTP status codes 400-599 separated by spaces or commas; empty for none."""
    codes: list[int] = []
    for token in re.split(r"[\s,]+", value.strip()):
        if not token:
            continue
        if not re.fullmatch(r"[45][0-9][0-9]", token):
            raise ValueError(f"has {token!r}; expected HTTP statuses from 400 to 599 separated by spaces")
        if int(token) not in codes:
            codes.append(int(token))
    return tuple(codes)


def networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """IPv4 or IPv6 addresses or networks separated by spaces (or commas)."""
    result = []
    for token in re.split(r"[\s,]+", value.strip()):
        if not token:
            continue
        try:
            result.append(ipaddress.ip_network(token, strict=True))
        except ValueError:
            raise ValueError(
                f"has {token!r}; expected IPv4 or IPv6 addresses or networks (10.0.0.0/8) separated by spaces"
            ) from None
    return tuple(result)


def ciphers(value: str) -> str:
    """An OpenSSL cipher list that selects at least one TLS 1.2 suite.

    ``_ssl`` is the C module under ``ssl``: importing it does not load the
    ``ssl`` package, which the master must not import before gevent patches
    it (docs/design.md, "Traps"); it is loaded only when the attribute is set.
    """
    value = value.strip()
    expected = "expected an OpenSSL cipher list such as the default (ECDHE-ECDSA-AES128-GCM-SHA256:...)"
    if not value or not value.isascii() or not value.isprintable():
        raise ValueError(f"is empty or not printable ASCII; {expected}")
    import _ssl

    context = _ssl._SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    try:
        context.set_ciphers(value)
    except _ssl.SSLError:
        raise ValueError(f"selects no cipher OpenSSL knows; {expected}") from None
    if not any(suite.get("protocol") != "TLSv1.3" for suite in context.get_ciphers()):
        raise ValueError(f"selects no TLS 1.2 cipher; {expected}")
    return value


def endpoints(value: str) -> tuple[str, ...]:
    """etcd client URLs separated by spaces: ``http://HOST:PORT`` or ``https://HOST:PORT``, all of one scheme."""
    expected = "expected etcd client URLs separated by spaces, such as https://10.0.0.1:2379, all http or all https"
    urls = value.split()
    if not urls:
        raise ValueError(f"is empty; {expected}")
    for url in urls:
        match = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[^/:@\[\]?#]+):([0-9]{1,5})/?", url)
        if match is None or not 1 <= int(match.group(3)) <= 65535:
            raise ValueError(f"has {url!r}, which is not a URL of scheme, host and port; {expected}")
        host = match.group(2).strip("[]")
        if not _is_host(host):
            raise ValueError(f"has {url!r}, whose host is not valid; {expected}")
    if len({u.split(":", 1)[0] for u in urls}) > 1:
        raise ValueError(f"mixes http and https; {expected}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"names an endpoint twice; {expected}")
    return tuple(u.rstrip("/") for u in urls)


def key_prefix(value: str) -> str:
    """An etcd key prefix: starts with "/", no trailing "/", no white space or empty segment."""
    if not re.fullmatch(r"(/[A-Za-z0-9._\-]+)+", value) or len(value) > 200:
        raise ValueError(
            "is not valid; expected a key prefix such as /ctbalancer: segments of letters, digits, '.', '_' or '-', "
            "each after a '/', no trailing '/'"
        )
    return value


def user_name(value: str) -> str:
    if not value or value != value.strip() or len(value) > 128 or any(ord(c) < 32 for c in value):
        raise ValueError("is not valid; expected an etcd user name without surrounding white space")
    return value


# -- the optional elements of attributes only: one table each -----------------------------------


@dataclass(frozen=True)
class Table:
    """An element made of optional attributes, each read by its validator into a field of *model*."""

    model: type
    validators: dict[str, Validator]


TABLES: dict[str, Table] = {
    "Timeouts": Table(
        Timeouts,
        {
            "connect": seconds(),
            "read": seconds(),
            "total": seconds(),
            "queue": seconds(zero=True),
            "client": seconds(),
        },
    ),
    "Failover": Table(
        Failover,
        {
            "cooldown": seconds(zero=True),
            "retry_statuses": statuses,
            "buffer_bytes": whole(0, MAX_BUFFER_BYTES),
            "on_mismatch": one_of(ON_MISMATCH),
        },
    ),
    "HealthCheck": Table(HealthCheck, {"interval": interval}),
    "Limits": Table(
        Limits,
        {
            "body_bytes": whole(0, 16 * GIB, digits=12),
            "connections": whole(10, 100_000),
            "spool_bytes": whole(0, 1024 * GIB, digits=13),
            "answer_bytes": whole(0, 1024 * GIB, digits=13),
        },
    ),
    "TLS": Table(TLSPolicy, {"ciphers": ciphers, "min_version": one_of(TLS_VERSIONS)}),
}


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
    )


# Elements of the root, in the vendor's order, then this project's.
_ROOT_ELEMENTS = (
    "Balancer",
    "SSLCertificatePath",
    "SSLPrivateKeyPath",
    "CertDirPath",
    "EventDelimiter",
    "Instances",
    "AllowedRequests",
    "Timeouts",
    "Workers",
    "Failover",
    "HealthCheck",
    "Limits",
    "FrontProxy",
    "TLS",
    "Admin",
    "AccessLog",
    "PinStore",
    "Journal",
)


class _Reader:
    """Walks one parsed document and builds :class:`~app.settings.Config`, or raises."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.base = path.resolve().parent

    def fail(self, line: int | None, message: str) -> ConfigError:
        return ConfigError(self.path, line, message)

    # -- document ------------------------------------------------------------

    def parse(self) -> etree._Element:
        if not self.data.strip():
            raise self.fail(None, "file is empty; expected an XML document")
        doctype = _doctype_line(self.data)
        if doctype:
            # Refused before lxml sees it: libxml2 still parses the DTD and its internal
            # entities with resolution off, and would report a billion-laughs file as
            # "malformed" on a line that is not the DOCTYPE's.
            raise self.fail(doctype, _DOCTYPE_REFUSED)
        try:
            root = etree.fromstring(self.data, _parser())
        except etree.XMLSyntaxError as exc:
            # lxml appends ", line L, column C" to its message (the line is already in front),
            # and may quote the document, new lines included: the error stays one line.
            reason = " ".join(re.sub(r", line \d+, column \d+$", "", exc.msg or "").split())
            column = f" at column {exc.position[1]}" if exc.position and exc.position[1] else ""
            expected = "expected well-formed XML in UTF-8 or the declared encoding"
            raise self.fail(exc.lineno, f"malformed XML{column}: {reason}; {expected}") from exc
        docinfo = root.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None or docinfo.system_url or docinfo.public_id:
            # A DOCTYPE the byte scan missed (an encoding other than UTF-8 or ASCII). The parser
            # has neither loaded nor expanded anything; the declaration itself is refused.
            raise self.fail(1, _DOCTYPE_REFUSED)
        return root

    def read(self) -> Config:
        root = self.parse()
        found: dict[str, list[etree._Element]] = {}
        for el in _children(root):
            if el.tag not in _ROOT_ELEMENTS:
                raise self.fail(
                    el.sourceline,
                    f"unknown element <{el.tag}>; expected one of: {', '.join(_ROOT_ELEMENTS)}",
                )
            found.setdefault(el.tag, []).append(el)
        for tag, els in found.items():
            if len(els) > 1:
                raise self.fail(els[1].sourceline, f"<{tag}> appears twice; expected it once")

        def one(tag: str) -> etree._Element | None:
            return found.get(tag, [None])[0]

        balancer_el = one("Balancer")
        if balancer_el is None:
            raise self.fail(root.sourceline, "missing <Balancer>; expected exactly one")
        fields: dict[str, Any] = {"path": self.path, "balancer": self.balancer(balancer_el)}
        fields["tls_cert"], fields["tls_key"] = self.tls(one("SSLCertificatePath"), one("SSLPrivateKeyPath"), root)
        cert_dir_el = one("CertDirPath")
        if cert_dir_el is None:
            raise self.fail(root.sourceline, "missing <CertDirPath>; expected the directory of reference certificates")
        self.no_attributes(cert_dir_el)
        fields["cert_dir"] = self.resolve(self.text(cert_dir_el, "a directory path"))
        instances_el = one("Instances")
        if instances_el is None:
            raise self.fail(root.sourceline, "missing <Instances>; expected at least one <Instance>")
        fields["instances"] = self.instances(instances_el)
        allowed_el = one("AllowedRequests")
        fields["allowed"] = self.allowed(allowed_el) if allowed_el is not None else ()
        for tag, name in (
            ("Timeouts", "timeouts"),
            ("Failover", "failover"),
            ("HealthCheck", "health_check"),
            ("Limits", "limits"),
            ("TLS", "tls_policy"),
        ):
            el = one(tag)
            if el is not None:
                fields[name] = self.table(el, TABLES[tag])
        workers_el = one("Workers")
        if workers_el is not None:
            self.no_attributes(workers_el)
            fields["workers"] = self.value(workers_el, None, self.text(workers_el, "a number of workers"), whole(1, 64))
        front_el, admin_el = one("FrontProxy"), one("Admin")
        fields["front_proxy"] = self.networks(front_el) if front_el is not None else ()
        fields["admin_allow"] = self.networks(admin_el) if admin_el is not None else DEFAULT_ADMIN_ALLOW
        pin_store_el = one("PinStore")
        if pin_store_el is not None:
            fields["pin_store"] = self.pin_store(pin_store_el)
        journal_el = one("Journal")
        if journal_el is not None:
            attrs = self.attributes(journal_el, required=("directory",))
            self.no_text(journal_el)
            text = attrs["directory"].strip()
            if not text:
                raise self.fail(journal_el.sourceline, "<Journal> attribute directory='' is empty; expected a directory path")
            fields["journal"] = JournalSpec(directory=self.resolve(text))
        access_el = one("AccessLog")
        if access_el is not None:
            fields["access_log"] = self.access_log(access_el)
        delimiter_el = one("EventDelimiter")
        if delimiter_el is not None:
            self.no_attributes(delimiter_el)
            # Not stripped: white space may be the delimiter itself.
            fields["event_delimiter"] = self.raw_text(delimiter_el, "a regular expression")
        return Config(**fields)

    # -- elements ------------------------------------------------------------

    def table(self, el: etree._Element, table: Table) -> Any:
        """An element of optional attributes, each through its validator; absent ones keep the model's default."""
        attrs = self.attributes(el, optional=table.validators)
        self.no_text(el)
        return table.model(**{name: self.value(el, name, text, table.validators[name]) for name, text in attrs.items()})

    def access_log(self, el: etree._Element) -> str:
        """``file``: "-" (the default) for stderr, else a path whose directory exists."""
        attrs = self.attributes(el, optional=("file",))
        self.no_text(el)
        value = attrs.get("file", "-").strip()
        if value == "-":
            return value
        if not value:
            raise self.fail(el.sourceline, "<AccessLog> attribute file='' is empty; expected a file path or - for stderr")
        path = self.resolve(value)
        if not path.parent.is_dir():
            raise self.fail(
                el.sourceline,
                f"<AccessLog> attribute file={value!r} is in no existing directory; expected a file path in one, "
                "or - for stderr",
            )
        return str(path)

    def pin_store(self, el: etree._Element) -> PinStoreSpec:
        """``type="directory"`` (alone) or ``type="etcd"`` with endpoints and its optional attributes."""
        files = ("ca_file", "cert_file", "key_file", "password_file")
        attrs = self.attributes(el, optional=("type", "endpoints", "prefix", "user", "timeout") + files)
        self.no_text(el)
        kind = self.value(el, "type", attrs.get("type", "directory"), one_of(PIN_STORE_TYPES))
        if kind == "directory":
            extra = sorted(set(attrs) - {"type"})
            if extra:
                raise self.fail(
                    el.sourceline, f"<PinStore> attribute {extra[0]!r} applies to type='etcd' only; CertDirPath is the directory store"
                )
            return PinStoreSpec()
        if "endpoints" not in attrs:
            raise self.fail(el.sourceline, "<PinStore type='etcd'> is missing attribute 'endpoints'; expected etcd client URLs")
        fields: dict[str, Any] = {"type": kind, "endpoints": self.value(el, "endpoints", attrs["endpoints"], endpoints)}
        if "prefix" in attrs:
            fields["prefix"] = self.value(el, "prefix", attrs["prefix"], key_prefix)
        if "timeout" in attrs:
            fields["timeout"] = self.value(el, "timeout", attrs["timeout"], seconds())
        if "user" in attrs:
            fields["user"] = self.value(el, "user", attrs["user"], user_name)
        for name in files:
            if name in attrs:
                path = self.resolve(attrs[name].strip())
                if not attrs[name].strip() or not _readable_file(path):
                    raise self.fail(el.sourceline, f"<PinStore> attribute {name}={attrs[name]!r} is not a readable file; expected a path to one")
                fields[name] = path
        for a, b in (("cert_file", "key_file"), ("key_file", "cert_file"), ("user", "password_file"), ("password_file", "user")):
            if a in fields and b not in fields:
                raise self.fail(el.sourceline, f"<PinStore> attribute {a!r} is set but {b!r} is missing; expected both or neither")
        if fields["endpoints"][0].startswith("http:") and ("ca_file" in fields or "cert_file" in fields):
            raise self.fail(
                el.sourceline, "<PinStore> has ca_file or cert_file but its endpoints are http; expected https endpoints for TLS"
            )
        if "password_file" in fields:
            fields["password"] = self.password(el, fields["password_file"])
        return PinStoreSpec(**fields)

    def password(self, el: etree._Element, path: Path) -> str:
        """The first line of *path*, read once at start-up (the file may then be readable by root only)."""
        try:
            with open(path, "rb") as f:
                data = f.read(4097)
        except OSError as exc:
            raise self.fail(el.sourceline, f"<PinStore> password_file {str(path)!r} cannot be read: {exc.strerror}") from None
        lines = data.decode("utf-8", "replace").splitlines()
        if len(data) > 4096 or not lines or not lines[0]:
            raise self.fail(el.sourceline, f"<PinStore> password_file {str(path)!r} holds no password on its first line; expected one")
        return lines[0]

    def networks(self, el: etree._Element) -> tuple:
        attrs = self.attributes(el, required=("allow",))
        self.no_text(el)
        return self.value(el, "allow", attrs["allow"], networks)

    def balancer(self, el: etree._Element) -> BalancerSpec:
        attrs = self.attributes(el, required=("api_port", "matching_port", "cybertrace_port", "scanners_count"))
        address = self.text(el, "the address to listen on")
        if not _is_host(address):
            raise self.fail(
                el.sourceline,
                f"<Balancer> address {address!r} is not valid; expected an IPv4 or IPv6 address or a host name",
            )
        return BalancerSpec(
            address=address,
            api_port=self.value(el, "api_port", attrs["api_port"], port),
            matching_port=self.value(el, "matching_port", attrs["matching_port"], port),
            cybertrace_port=self.value(el, "cybertrace_port", attrs["cybertrace_port"], port),
            scanners_count=self.value(el, "scanners_count", attrs["scanners_count"], whole(1, 100)),
        )

    def tls(
        self, cert_el: etree._Element | None, key_el: etree._Element | None, root: etree._Element
    ) -> tuple[Path | None, Path | None]:
        if cert_el is None and key_el is None:
            return None, None
        if cert_el is None or key_el is None:
            present, missing = (cert_el, "SSLPrivateKeyPath") if cert_el is not None else (key_el, "SSLCertificatePath")
            assert present is not None
            raise self.fail(
                present.sourceline,
                f"<{present.tag}> is set but <{missing}> is missing; expected both (HTTPS) or neither (plain HTTP)",
            )
        paths = []
        for el in (cert_el, key_el):
            self.no_attributes(el)
            p = self.resolve(self.text(el, "a file path"))
            if not _readable_file(p):
                raise self.fail(el.sourceline, f"<{el.tag}> {str(p)!r} is not a readable file; expected a PEM file")
            paths.append(p)
        return paths[0], paths[1]

    def instances(self, parent: etree._Element) -> tuple[InstanceSpec, ...]:
        self.no_attributes(parent)
        result: list[InstanceSpec] = []
        seen_ref: dict[tuple[str, int], int] = {}
        seen_api: dict[tuple[str, int], int] = {}
        for el in _children(parent):
            if el.tag != "Instance":
                raise self.fail(el.sourceline, f"unknown element <{el.tag}> in <Instances>; expected <Instance>")
            attrs = self.attributes(el, required=("api_port", "matching_port"), optional=("enabled",))
            host = self.text(el, "a host name or IP address")
            if not _is_host(host):
                raise self.fail(
                    el.sourceline,
                    f"<Instance> host {host!r} is not valid; expected a host name or an IPv4 or IPv6 address",
                )
            inst = InstanceSpec(
                host=host,
                api_port=self.value(el, "api_port", attrs["api_port"], port),
                matching_port=self.value(el, "matching_port", attrs["matching_port"], port),
                enabled=self.value(el, "enabled", attrs.get("enabled", "true"), boolean),
                line=el.sourceline or 0,
            )
            for seen, key, what in (
                (seen_ref, (inst.host.lower(), inst.matching_port), f"host {host!r} and matching_port {inst.matching_port}"),
                (seen_api, (inst.host.lower(), inst.api_port), f"host {host!r} and api_port {inst.api_port}"),
            ):
                if key in seen:
                    raise self.fail(
                        el.sourceline, f"<Instance> {what} repeat the instance on line {seen[key]}; expected each once"
                    )
                seen[key] = inst.line
            result.append(inst)
        if not result:
            raise self.fail(parent.sourceline, "<Instances> is empty; expected at least one <Instance>")
        return tuple(result)

    def allowed(self, parent: etree._Element) -> tuple[AllowedRequest, ...]:
        self.no_attributes(parent)
        result: list[AllowedRequest] = []
        seen: dict[tuple[str, str], int] = {}
        for el in _children(parent):
            if el.tag != "Request":
                raise self.fail(el.sourceline, f"unknown element <{el.tag}> in <AllowedRequests>; expected <Request>")
            attrs = self.attributes(el, required=("method",), optional=("repeatable", "fanout"))
            method = attrs["method"]
            if method not in ALLOWED_METHODS:
                raise self.fail(
                    el.sourceline,
                    f"<Request> attribute method={method!r} is not allowed; "
                    f"expected one of: {', '.join(ALLOWED_METHODS)}",
                )
            path = self.text(el, "a path starting with /")
            problem = _path_problem(path)
            if problem:
                raise self.fail(el.sourceline, f"<Request> path {path!r} {problem}")
            key = (method, path)
            if key in seen:
                raise self.fail(
                    el.sourceline,
                    f"<Request> {method} {path!r} repeats the request on line {seen[key]}; expected each once",
                )
            seen[key] = el.sourceline or 0
            repeatable = self.value(el, "repeatable", attrs["repeatable"], boolean) if "repeatable" in attrs else None
            fanout = self.value(el, "fanout", attrs["fanout"], boolean) if "fanout" in attrs else False
            if fanout and method not in FANOUT_METHODS:
                raise self.fail(
                    el.sourceline,
                    f"<Request> {method} {path!r} has fanout='true', but a fan-out request must change something; "
                    f"expected method one of: {', '.join(FANOUT_METHODS)}",
                )
            if fanout and repeatable:
                raise self.fail(
                    el.sourceline,
                    f"<Request> {method} {path!r} has both fanout='true' and repeatable='true'; expected one: a fan-out "
                    "write already reaches every instance, and is never sent to one in place of another",
                )
            result.append(
                AllowedRequest(method=method, path=path, line=el.sourceline or 0, repeatable=repeatable, fanout=fanout)
            )
        return tuple(result)

    # -- values --------------------------------------------------------------

    def value(self, el: etree._Element, attr: str | None, text: str, validator: Validator) -> Any:
        """*text* through *validator*; its ValueError becomes the file's error with line, element and value."""
        try:
            return validator(text)
        except ValueError as exc:
            what = f"<{el.tag}> attribute {attr}={text!r}" if attr else f"<{el.tag}> value {text!r}"
            raise self.fail(el.sourceline, f"{what} {exc}") from None

    def attributes(
        self, el: etree._Element, required: Iterable[str] = (), optional: Iterable[str] = ()
    ) -> dict[str, str]:
        required = tuple(required)
        known = required + tuple(optional)
        attrs = {str(k): str(v) for k, v in el.attrib.items()}
        for name in attrs:
            if name not in known:
                expected = ", ".join(known) if known else "none"
                raise self.fail(
                    el.sourceline, f"<{el.tag}> has unknown attribute {name!r}; expected: {expected}"
                )
        for name in required:
            if name not in attrs:
                raise self.fail(
                    el.sourceline, f"<{el.tag}> is missing attribute {name!r}; expected all of: {', '.join(required)}"
                )
        return attrs

    def no_attributes(self, el: etree._Element) -> None:
        self.attributes(el)

    def no_text(self, el: etree._Element) -> None:
        text = self.raw_text(el, "only attributes").strip()
        if text:
            raise self.fail(el.sourceline, f"<{el.tag}> has text {text!r}; expected only attributes")

    def raw_text(self, el: etree._Element, expected: str) -> str:
        """The text of *el* as written, comments left out; child elements are refused."""
        for child in _children(el):
            raise self.fail(child.sourceline, f"unknown element <{child.tag}> in <{el.tag}>; expected {expected}")
        # itertext() joins the text around comments ("10.0.0.1<!-- x -->0" is "10.0.0.10"),
        # where el.text alone would silently stop at the first comment.
        return "".join(el.itertext())

    def text(self, el: etree._Element, expected: str) -> str:
        value = self.raw_text(el, expected).strip()
        if not value:
            raise self.fail(el.sourceline, f"<{el.tag}> is empty; expected {expected}")
        return value

    def resolve(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p


_DOCTYPE_REFUSED = "<!DOCTYPE> is not allowed (DTDs and entities are refused); expected none"


def _doctype_line(data: bytes) -> int | None:
    """The line of a ``<!DOCTYPE`` in the prolog of *data*, or None when there is none.

    Skips what may precede it (byte order mark, XML declaration, processing instructions,
    comments, white space) in one linear pass; anything else ends the prolog.
    """
    if data.startswith((b"\xff\xfe", b"<\x00")):
        text = data.decode("utf-16-le", errors="replace").removeprefix("\ufeff")
    elif data.startswith((b"\xfe\xff", b"\x00<")):
        text = data.decode("utf-16-be", errors="replace").removeprefix("\ufeff")
    else:
        # UTF-8 and the other encodings XML allows here spell the markup in ASCII.
        text = data.removeprefix(b"\xef\xbb\xbf").decode("latin-1")
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if text.startswith("<!DOCTYPE", pos):
            return text.count("\n", 0, pos) + 1
        if text.startswith("<?", pos):
            end, length = text.find("?>", pos + 2), 2
        elif text.startswith("<!--", pos):
            end, length = text.find("-->", pos + 4), 3
        else:
            return None
        if end < 0:
            return None
        pos = end + length


def _readable_file(path: Path) -> bool:
    """Whether *path* names a regular file this process may read.

    ``Path.is_file()`` raises for some errors (a name longer than the file
    system allows, ENAMETOOLONG) instead of answering False.
    """
    try:
        return path.is_file() and os.access(path, os.R_OK)
    except OSError:
        return False


def _children(el: etree._Element) -> Iterator[etree._Element]:
    """Child elements, skipping comments and processing instructions."""
    return (c for c in el if isinstance(c.tag, str))


def _is_host(value: str) -> bool:
    """True for an IP address or an RFC 1123 host name (safe as a file name part)."""
    if "%" in value:
        # An IPv6 zone (fe80::1%eth0) would put "%" in the reference file name.
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _path_problem(path: str) -> str | None:
    """Why *path* cannot be an AllowedRequests path, or None when it can."""
    if not path.startswith("/"):
        return "does not start with '/'; expected an absolute path such as /api/v.1.1/suppliers"
    if path.startswith(RESERVED_PREFIX) or path == RESERVED_PREFIX.rstrip("/"):
        return f"is reserved for the balancer ({RESERVED_PREFIX}); expected another path"
    if path == "/":
        return None
    names: list[str] = []
    body = path[1:-1] if path.endswith("/") else path[1:]
    for segment in body.split("/"):
        if segment == "":
            return "has an empty segment ('//'); expected segments separated by single '/'"
        if segment in (".", ".."):
            return "has a dot segment; expected plain segments"
        placeholder = _PLACEHOLDER.fullmatch(segment)
        if placeholder:
            if placeholder.group(1) in names:
                return f"repeats placeholder {{{placeholder.group(1)}}}; expected distinct names"
            names.append(placeholder.group(1))
            continue
        if not _LITERAL_SEGMENT.fullmatch(segment):
            return (
                f"has segment {segment!r} with characters that are not allowed; expected letters, digits, "
                "-._~!$&'()*+,;=:@ or a whole-segment {name}"
            )
    return None


