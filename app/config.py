"""Read ``kl_balancer.conf`` once, validate it, and return frozen objects.

This module imports nothing but the standard library and lxml, so that
``gunicorn.conf.py`` can read the server settings in the master process
without loading ssl or urllib3 before the gevent worker patches them
(docs/design.md, "Traps").

Every problem is reported as one :class:`ConfigError` naming the file, the
line, the element or attribute, the bad value and what was expected.
The parser resolves no entities, loads no DTD and never touches the network;
a document type declaration is refused outright.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from lxml import etree

DEFAULT_PATH = "config/kl_balancer.conf"
ENV_VAR = "BALANCER_CONFIG"

#: Larger files are refused before parsing: a real configuration is a few KiB.
MAX_CONFIG_BYTES = 1024 * 1024

#: Upper bound of Failover buffer_bytes: request bodies held in a worker's memory.
MAX_BUFFER_BYTES = 64 * 1024 * 1024

#: Methods an AllowedRequests entry may name. CONNECT and TRACE are not
#: forwardable through a reverse proxy and are refused on purpose.
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: Paths under this prefix belong to the balancer itself (docs/design.md, "Reserved paths").
RESERVED_PREFIX = "/_balancer/"

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


@dataclass(frozen=True)
class BalancerSpec:
    """The ``Balancer`` element: where the REST front door listens."""

    address: str
    api_port: int
    matching_port: int
    cybertrace_port: int
    scanners_count: int

    @property
    def bind(self) -> str:
        """The address in the form gunicorn's ``bind`` takes."""
        if ":" in self.address:
            return f"[{self.address}]:{self.api_port}"
        return f"{self.address}:{self.api_port}"


@dataclass(frozen=True)
class InstanceSpec:
    """One ``Instances/Instance`` element."""

    host: str
    api_port: int
    matching_port: int
    enabled: bool
    line: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        """``HOST:PORT`` with the port the balancer connects to."""
        if ":" in self.host:
            return f"[{self.host}]:{self.api_port}"
        return f"{self.host}:{self.api_port}"

    @property
    def base_url(self) -> str:
        """The URL prefix requests to this instance start with."""
        return f"https://{self.name}/"

    @property
    def reference_name(self) -> str:
        """File name of the reference certificate (the seed's INSTANCE_CT_PORT.pem)."""
        return f"{self.host}_{self.matching_port}.pem"


#: Methods whose requests may be sent again after an instance failed (docs/design.md, "Failover"):
#: safe methods (RFC 9110 section 9.2.1) that AllowedRequests can name.
REPEATABLE_METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class AllowedRequest:
    """One ``AllowedRequests/Request`` element."""

    method: str
    path: str
    line: int = field(default=0, compare=False)
    #: The ``repeatable`` attribute as written; None when absent.
    repeatable: bool | None = None

    @property
    def safe_to_repeat(self) -> bool:
        """Whether a request that reached an instance may be sent again to another one."""
        return self.method in REPEATABLE_METHODS if self.repeatable is None else self.repeatable


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for the hop to an instance."""

    #: Budget for reaching an instance (TCP and TLS handshake), shared by the
    #: instances one request tries.
    connect: float = 5.0
    #: Longest silence while waiting for an instance's answer.
    read: float = 60.0
    #: Deadline of one request, from its arrival to the start of the answer,
    #: failovers included.
    total: float = 75.0
    #: Longest wait for a free scanners_count slot; 0: do not wait.
    queue: float = 5.0
    #: Longest a client may take to finish its TLS handshake and request head,
    #: and longest it may stay silent while sending its body or reading the
    #: answer (docs/design.md, "Hostile clients").
    client: float = 10.0


#: Statuses that mean "try another instance" (RFC 8470, RFC 6585, RFC 9110).
DEFAULT_RETRY_STATUSES = (425, 429, 503)

#: What a certificate mismatch does: the seed's 500 (refuse), or quarantine
#: the instance and send the request to another one (failover).
ON_MISMATCH = ("refuse", "failover")


@dataclass(frozen=True)
class Failover:
    """The ``Failover`` element: passive health and what is sent again (docs/design.md, "Failover")."""

    #: Seconds a failed instance is skipped before one request tries it again.
    cooldown: float = 10.0
    #: Instance answers after which a repeatable request goes to another instance.
    retry_statuses: tuple[int, ...] = DEFAULT_RETRY_STATUSES
    #: Request bodies up to this size are held so that they can be sent again.
    buffer_bytes: int = 1024 * 1024
    on_mismatch: str = "refuse"


@dataclass(frozen=True)
class HealthCheck:
    """The ``HealthCheck`` element: active probes of the enabled instances."""

    #: Seconds between two probes of one instance by one worker; 0: off.
    interval: float = 0.0


#: Mozilla's "intermediate" TLS 1.2 suites: forward secrecy and AEAD only, no CBC.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
TLS_VERSIONS = ("1.2", "1.3")

GIB = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The ``Limits`` element: what one client may make a worker hold."""

    #: Largest request body accepted; a larger one is refused with 413.
    body_bytes: int = 128 * 1024 * 1024
    #: Client connections one worker holds at once; further ones wait in the
    #: listen queue until one closes (gunicorn's worker_connections).
    connections: int = 1000
    #: Disk one worker may use at once for held request bodies and answers.
    spool_bytes: int = 4 * GIB
    #: Part of one answer held on disk while its client reads slowly (nginx's
    #: proxy_max_temp_file_size); beyond it the answer streams at the client's pace.
    answer_bytes: int = GIB


@dataclass(frozen=True)
class TLSPolicy:
    """The ``TLS`` element: the API port's protocol versions and TLS 1.2 suites."""

    ciphers: str = DEFAULT_CIPHERS
    min_version: str = "1.2"


#: Addresses that may read the balancer's own pages by default: loopback.
DEFAULT_ADMIN_ALLOW = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))



def allows(networks: tuple, address: str) -> bool:
    """Whether the peer *address* lies in one of *networks* (an IPv4-mapped IPv6 peer counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip in net for net in networks)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    balancer: BalancerSpec
    cert_dir: Path
    instances: tuple[InstanceSpec, ...]
    allowed: tuple[AllowedRequest, ...]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeouts: Timeouts = Timeouts()
    workers: int = 2
    failover: Failover = Failover()
    health_check: HealthCheck = HealthCheck()
    event_delimiter: str | None = None
    limits: Limits = Limits()
    tls_policy: TLSPolicy = TLSPolicy()
    #: Peers trusted to send X-Forwarded-* (FrontProxy allow); none by default.
    front_proxy: tuple = ()
    #: Peers that may read /_balancer/status and metrics (Admin allow).
    admin_allow: tuple = DEFAULT_ADMIN_ALLOW

    @property
    def enabled_instances(self) -> tuple[InstanceSpec, ...]:
        return tuple(i for i in self.instances if i.enabled)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


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


# -- the configuration this process serves ------------------------------------------
#
# gunicorn re-executes gunicorn.conf.py in the master on SIGHUP and then forks
# new workers, which import wsgi.py and call create_app(). Were create_app() to
# read the file itself, a broken edit would reach the new workers even though
# the master refused it. So the master loads the file, and only a configuration
# that loaded becomes the active one; the workers inherit it with the rest of
# the master's memory (docs/design.md, "Failover").

_active: Config | None = None


def activate(config: Config) -> None:
    """Make *config* the one this process, and every process it forks from now on, serves."""
    global _active
    _active = config


def active() -> Config | None:
    """The configuration :func:`activate` set in this process (or its parent before the fork), if any."""
    return _active


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
    )


# Elements of the root, in the vendor's order, with the reader of each.
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
)


class _Reader:
    """Walks one parsed document and builds :class:`Config`, or raises."""

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
        balancer = self.balancer(balancer_el)
        tls_cert, tls_key = self.tls(one("SSLCertificatePath"), one("SSLPrivateKeyPath"), root)
        cert_dir_el = one("CertDirPath")
        if cert_dir_el is None:
            raise self.fail(root.sourceline, "missing <CertDirPath>; expected the directory of reference certificates")
        self.no_attributes(cert_dir_el)
        cert_dir = self.resolve(self.text(cert_dir_el, "a directory path"))
        instances_el = one("Instances")
        if instances_el is None:
            raise self.fail(root.sourceline, "missing <Instances>; expected at least one <Instance>")
        instances = self.instances(instances_el)
        allowed_el = one("AllowedRequests")
        allowed = self.allowed(allowed_el) if allowed_el is not None else ()
        timeouts = self.timeouts(one("Timeouts"))
        failover = self.failover(one("Failover"))
        health_check = self.health_check(one("HealthCheck"))
        workers_el = one("Workers")
        workers = 2
        if workers_el is not None:
            self.no_attributes(workers_el)
            workers = self.integer(workers_el, None, self.text(workers_el, "a number of workers"), 1, 64)
        limits = self.limits(one("Limits"))
        tls_policy = self.tls_policy(one("TLS"))
        front_proxy = self.networks(one("FrontProxy"), ())
        admin_allow = self.networks(one("Admin"), DEFAULT_ADMIN_ALLOW)
        delimiter_el = one("EventDelimiter")
        delimiter = None
        if delimiter_el is not None:
            self.no_attributes(delimiter_el)
            # Not stripped: white space may be the delimiter itself.
            delimiter = self.raw_text(delimiter_el, "a regular expression")
        return Config(
            path=self.path,
            balancer=balancer,
            cert_dir=cert_dir,
            instances=instances,
            allowed=allowed,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeouts=timeouts,
            workers=workers,
            failover=failover,
            health_check=health_check,
            event_delimiter=delimiter,
            limits=limits,
            tls_policy=tls_policy,
            front_proxy=front_proxy,
            admin_allow=admin_allow,
        )

    # -- elements ------------------------------------------------------------

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
            api_port=self.port(el, "api_port", attrs["api_port"]),
            matching_port=self.port(el, "matching_port", attrs["matching_port"]),
            cybertrace_port=self.port(el, "cybertrace_port", attrs["cybertrace_port"]),
            scanners_count=self.integer(el, "scanners_count", attrs["scanners_count"], 1, 100),
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
                api_port=self.port(el, "api_port", attrs["api_port"]),
                matching_port=self.port(el, "matching_port", attrs["matching_port"]),
                enabled=self.boolean(el, "enabled", attrs.get("enabled", "true")),
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
            attrs = self.attributes(el, required=("method",), optional=("repeatable",))
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
            repeatable = self.boolean(el, "repeatable", attrs["repeatable"]) if "repeatable" in attrs else None
            result.append(AllowedRequest(method=method, path=path, line=el.sourceline or 0, repeatable=repeatable))
        return tuple(result)

    def timeouts(self, el: etree._Element | None) -> Timeouts:
        if el is None:
            return Timeouts()
        attrs = self.attributes(el, optional=("connect", "read", "total", "queue", "client"))
        self.no_text(el)
        defaults = Timeouts()
        return Timeouts(
            connect=self.seconds(el, "connect", attrs.get("connect"), defaults.connect),
            read=self.seconds(el, "read", attrs.get("read"), defaults.read),
            total=self.seconds(el, "total", attrs.get("total"), defaults.total),
            queue=self.seconds(el, "queue", attrs.get("queue"), defaults.queue, zero=True),
            client=self.seconds(el, "client", attrs.get("client"), defaults.client),
        )

    def limits(self, el: etree._Element | None) -> Limits:
        if el is None:
            return Limits()
        attrs = self.attributes(el, optional=("body_bytes", "connections", "spool_bytes", "answer_bytes"))
        self.no_text(el)
        defaults = Limits()

        def number(attr: str, low: int, high: int) -> int:
            value = attrs.get(attr)
            return getattr(defaults, attr) if value is None else self.integer(el, attr, value, low, high, digits=12)

        limits = Limits(
            body_bytes=number("body_bytes", 0, 16 * GIB),
            connections=number("connections", 10, 100_000),
            spool_bytes=number("spool_bytes", 0, 1024 * GIB),
            answer_bytes=number("answer_bytes", 0, 1024 * GIB),
        )
        return limits

    def tls_policy(self, el: etree._Element | None) -> TLSPolicy:
        if el is None:
            return TLSPolicy()
        attrs = self.attributes(el, optional=("ciphers", "min_version"))
        self.no_text(el)
        defaults = TLSPolicy()
        min_version = attrs.get("min_version", defaults.min_version)
        if min_version not in TLS_VERSIONS:
            raise self.fail(
                el.sourceline,
                f"<TLS> attribute min_version={min_version!r} is not valid; expected one of: {', '.join(TLS_VERSIONS)}",
            )
        ciphers = attrs.get("ciphers", defaults.ciphers).strip()
        problem = _cipher_problem(ciphers)
        if problem:
            raise self.fail(
                el.sourceline,
                f"<TLS> attribute ciphers={ciphers!r} {problem}; expected an OpenSSL cipher list such as the default "
                "(ECDHE-ECDSA-AES128-GCM-SHA256:...)",
            )
        return TLSPolicy(ciphers=ciphers, min_version=min_version)

    def networks(self, el: etree._Element | None, default: tuple) -> tuple:
        """The ``allow`` attribute: addresses and networks separated by spaces (or commas)."""
        if el is None:
            return default
        attrs = self.attributes(el, required=("allow",))
        self.no_text(el)
        result = []
        for token in re.split(r"[\s,]+", attrs["allow"].strip()):
            if not token:
                continue
            try:
                result.append(ipaddress.ip_network(token, strict=True))
            except ValueError:
                raise self.fail(
                    el.sourceline,
                    f"<{el.tag}> attribute allow has {token!r}; expected IPv4 or IPv6 addresses or networks "
                    "(10.0.0.0/8) separated by spaces",
                ) from None
        return tuple(result)

    def failover(self, el: etree._Element | None) -> Failover:
        if el is None:
            return Failover()
        attrs = self.attributes(el, optional=("cooldown", "retry_statuses", "buffer_bytes", "on_mismatch"))
        self.no_text(el)
        defaults = Failover()
        on_mismatch = attrs.get("on_mismatch", defaults.on_mismatch)
        if on_mismatch not in ON_MISMATCH:
            raise self.fail(
                el.sourceline,
                f"<Failover> attribute on_mismatch={on_mismatch!r} is not valid; expected one of: {', '.join(ON_MISMATCH)}",
            )
        buffer_bytes = attrs.get("buffer_bytes")
        return Failover(
            cooldown=self.seconds(el, "cooldown", attrs.get("cooldown"), defaults.cooldown, zero=True),
            retry_statuses=self.statuses(el, "retry_statuses", attrs.get("retry_statuses"), defaults.retry_statuses),
            buffer_bytes=(
                defaults.buffer_bytes
                if buffer_bytes is None
                else self.integer(el, "buffer_bytes", buffer_bytes, 0, MAX_BUFFER_BYTES)
            ),
            on_mismatch=on_mismatch,
        )

    def health_check(self, el: etree._Element | None) -> HealthCheck:
        if el is None:
            return HealthCheck()
        attrs = self.attributes(el, optional=("interval",))
        self.no_text(el)
        interval = attrs.get("interval")
        if interval is None:
            return HealthCheck()
        try:
            number = float(interval)
        except ValueError:
            number = float("nan")
        if not (number == 0 or 1 <= number <= 3600):
            raise self.fail(
                el.sourceline,
                f"<HealthCheck> attribute interval={interval!r} is not valid; "
                "expected 0 (off) or seconds from 1 to 3600",
            )
        return HealthCheck(interval=number)

    # -- values --------------------------------------------------------------

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

    def integer(
        self, el: etree._Element, attr: str | None, value: str, low: int, high: int, digits: int = 9
    ) -> int:
        what = f"<{el.tag}> attribute {attr}={value!r}" if attr else f"<{el.tag}> value {value!r}"
        if not re.fullmatch(rf"[0-9]{{1,{digits}}}", value.strip()):
            raise self.fail(el.sourceline, f"{what} is not a whole number; expected {low} to {high}")
        number = int(value)
        if not low <= number <= high:
            raise self.fail(el.sourceline, f"{what} is out of range; expected {low} to {high}")
        return number

    def port(self, el: etree._Element, attr: str, value: str) -> int:
        return self.integer(el, attr, value, 1, 65535)

    def boolean(self, el: etree._Element, attr: str, value: str) -> bool:
        if value in ("true", "false"):
            return value == "true"
        raise self.fail(
            el.sourceline, f"<{el.tag}> attribute {attr}={value!r} is not a boolean; expected true or false"
        )

    def seconds(
        self, el: etree._Element, attr: str, value: str | None, default: float, zero: bool = False
    ) -> float:
        """A number of seconds up to an hour; 0 only where *zero* says it means something."""
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not (0 <= number <= 3600 if zero else 0 < number <= 3600):
            expected = "from 0 to 3600" if zero else "above 0 and at most 3600"
            raise self.fail(
                el.sourceline, f"<{el.tag}> attribute {attr}={value!r} is not valid; expected seconds, {expected}"
            )
        return number

    def statuses(
        self, el: etree._Element, attr: str, value: str | None, default: tuple[int, ...]
    ) -> tuple[int, ...]:
        """HTTP status codes 400-599 separated by spaces or commas; empty for none."""
        if value is None:
            return default
        codes: list[int] = []
        for token in re.split(r"[\s,]+", value.strip()):
            if not token:
                continue
            if not re.fullmatch(r"[45][0-9][0-9]", token):
                raise self.fail(
                    el.sourceline,
                    f"<{el.tag}> attribute {attr}={value!r} has {token!r}; "
                    "expected HTTP statuses from 400 to 599 separated by spaces",
                )
            if int(token) not in codes:
                codes.append(int(token))
        return tuple(codes)


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


def _cipher_problem(ciphers: str) -> str | None:
    """Why OpenSSL refuses *ciphers* as a TLS 1.2 cipher list, or None.

    ``_ssl`` is the C module under ``ssl``: importing it does not load the
    ``ssl`` package, which the master must not import before gevent patches
    it (docs/design.md, "Traps").
    """
    if not ciphers or not ciphers.isascii() or not ciphers.isprintable():
        return "is empty or not printable ASCII"
    import _ssl

    context = _ssl._SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    try:
        context.set_ciphers(ciphers)
    except _ssl.SSLError:
        return "selects no cipher OpenSSL knows"
    names = [suite["name"] for suite in context.get_ciphers() if suite.get("protocol") != "TLSv1.3"]
    if not names:
        return "selects no TLS 1.2 cipher"
    return None


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


__all__ = [
    "ALLOWED_METHODS",
    "AllowedRequest",
    "BalancerSpec",
    "Config",
    "ConfigError",
    "DEFAULT_RETRY_STATUSES",
    "Failover",
    "HealthCheck",
    "InstanceSpec",
    "Limits",
    "TLSPolicy",
    "allows",
    "ON_MISMATCH",
    "REPEATABLE_METHODS",
    "RESERVED_PREFIX",
    "Timeouts",
    "activate",
    "active",
    "config_path",
    "load",
]
