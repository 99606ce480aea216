"""The configuration as frozen objects: what ``kl_balancer.conf`` says, validated.

The model only: :mod:`app.loader` reads the XML into these objects, and
:mod:`app.lifecycle` keeps the one a process serves. Like them it imports
nothing but the standard library, so ``gunicorn.conf.py`` can use it in the
master (docs/design.md, "Traps"). Every default is written once, here, as a
field default.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

#: Upper bound of Failover buffer_bytes: request bodies held in a worker's memory.
MAX_BUFFER_BYTES = 64 * 1024 * 1024

#: Methods an AllowedRequests entry may name. CONNECT and TRACE are not
#: forwardable through a reverse proxy and are refused on purpose.
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: Paths under this prefix belong to the balancer itself (docs/design.md, "Reserved paths").
RESERVED_PREFIX = "/_balancer/"


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
    #: ``fanout="true"``: sent to every enabled instance, journaled for those
    #: that miss it (docs/design.md, "Fan-out writes").
    fanout: bool = False

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


#: Methods a ``fanout="true"`` request may have: it must change something on the instances.
FANOUT_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class JournalSpec:
    """The ``Journal`` element: where fan-out writes wait for the instances that missed them."""

    #: None: ``journal`` beside CertDirPath (``<CertDirPath>/../journal``).
    directory: Path | None = None


#: Values of ``<PinStore type>``.
PIN_STORE_TYPES = ("directory", "etcd")


@dataclass(frozen=True)
class PinStoreSpec:
    """The ``PinStore`` element: where reference certificates are kept (docs/design.md, "Fleet").

    ``directory`` (the default) is CertDirPath; ``etcd`` is one store shared
    by every balancer of a fleet.
    """

    type: str = "directory"
    #: etcd client URLs, all http or all https.
    endpoints: tuple[str, ...] = ()
    #: Keys live under ``<prefix>/pins/``.
    prefix: str = "/ctbalancer"
    #: CA that signed the etcd members' certificates (https endpoints).
    ca_file: Path | None = None
    #: Client certificate and key the balancer presents to etcd.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: etcd user; its password is read from ``password_file`` at start-up.
    user: str | None = None
    password_file: Path | None = None
    password: str | None = field(default=None, repr=False)
    #: Seconds one request to one endpoint may take.
    timeout: float = 2.0

    @property
    def pins_prefix(self) -> str:
        return f"{self.prefix}/pins/"


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
    #: Where the access log goes (AccessLog file): a path, "-" for stderr, None for none.
    access_log: str | None = None
    #: Where reference certificates are kept (PinStore).
    pin_store: PinStoreSpec = PinStoreSpec()
    #: Where fan-out writes are journaled (Journal).
    journal: JournalSpec = JournalSpec()

    @property
    def journal_dir(self) -> Path:
        return self.journal.directory or self.cert_dir.parent / "journal"

    @property
    def fanout(self) -> bool:
        """Whether any allowed request is fanned out (then the journal is used)."""
        return any(a.fanout for a in self.allowed)

    @property
    def enabled_instances(self) -> tuple[InstanceSpec, ...]:
        return tuple(i for i in self.instances if i.enabled)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
