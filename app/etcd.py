"""A small etcd v3 client over etcd's JSON gateway, for the shared pin store.

Why not a library: the gRPC client (``etcd3``) does not import with
protobuf 4 and gRPC does not cooperate with gevent's workers; ``etcd3gw``
adds three dependencies and does not handle a compacted watch. The gateway
(``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/watch``, ``/v3/auth/authenticate``)
is plain HTTP+JSON that ``requests`` already speaks, greenlet-friendly under
gevent (docs/design.md, "Fleet").

What the store needs, and nothing else:

* :meth:`Etcd.range`: one key or every key under a prefix, with the
  revision of the read (linearizable: a member cut off from the quorum fails
  it rather than answer from its stale copy);
* :meth:`Etcd.create`, :meth:`Etcd.replace`, :meth:`Etcd.delete`: each one
  transaction whose condition is the key's revision, so that a change never
  overwrites what the caller did not see. etcd's locks are not used
  (leases can expire while the holder still acts);
* :meth:`Etcd.watch`: the changes under a prefix after a revision, as a
  hint: the caller re-reads everything when the watch ends, and periodically;
* several endpoints: a request that finds one unreachable, without a leader
  or timing out goes to the next; the one that answered is used first next
  time. A transaction that timed out may have been applied: the conditions
  above make sending it again safe, and callers compare what the key holds.

Keys and values are bytes on the wire as base64; int64 fields arrive as
strings, and fields at their default (0, false, empty) are left out.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import requests

log = logging.getLogger(__name__)

#: gRPC status codes the gateway returns in ``code`` that mean "try another
#: member or later": cancelled, deadline exceeded, resource exhausted, unavailable.
_RETRY_ELSEWHERE = {1, 4, 8, 14}
#: Unauthenticated: the token expired (etcd's simple tokens live 5 minutes unused) or was revoked.
_UNAUTHENTICATED = 16


class EtcdUnavailable(Exception):
    """No endpoint could carry out the request; ``str()`` says what each one did."""


class EtcdRefused(Exception):
    """etcd answered, and refused the request (permission denied, bad request); another try will not help."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: ``kv`` holds the new value, or only the key and revision for a delete."""

    deleted: bool
    kv: KeyValue


class Compacted(Exception):
    """The watch started before etcd's compacted revision: events were lost; re-read everything."""


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode("ascii")


def _prefix_end(prefix: str) -> str:
    """The ``range_end`` that makes a range cover every key starting with *prefix*."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here end in "/", never in 0xff
    return _b64(bytes(raw))


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(item.get("key", "")).decode("utf-8", "replace"),
        value=base64.b64decode(item.get("value", "")),
        create_revision=int(item.get("create_revision", 0)),
        mod_revision=int(item.get("mod_revision", 0)),
    )


class Etcd:
    """Requests to an etcd cluster through any of *endpoints*; safe to share between greenlets and threads."""

    def __init__(
        self,
        endpoints: tuple[str, ...],
        timeout: float,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.timeout = timeout
        self._user = user
        self._password = password
        self._token: str | None = None
        self._first = 0  # the endpoint that answered last: asked first
        self._auth_lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False  # no HTTP(S)_PROXY or .netrc between the balancer and its store
        if ca_file:
            self._session.verify = ca_file
        if cert_file:
            self._session.cert = (cert_file, key_file) if key_file else cert_file
        adapter = requests.adapters.HTTPAdapter(pool_connections=len(self.endpoints), pool_maxsize=16, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    # -- key-value operations ---------------------------------------------------------------

    def range(self, key: str, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The key (or every key under the prefix *key*) and the store's revision at the read."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _prefix_end(key)
        answer = self._call("/v3/kv/range", body)
        return [_kv(item) for item in answer.get("kvs", [])], int(answer.get("header", {}).get("revision", 0))

    def create(self, key: str, value: bytes) -> tuple[bool, KeyValue]:
        """Create *key* holding *value* only if it does not exist: (created, what the key holds now)."""
        answer = self._txn(
            [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
            [{"request_range": {"key": _b64(key)}}],
        )
        if answer.get("succeeded"):
            revision = int(answer["header"]["revision"])
            return True, KeyValue(key, value, revision, revision)
        kvs = answer["responses"][0]["response_range"].get("kvs", [])
        if not kvs:  # deleted between the compare and the read: cannot happen within one transaction
            raise EtcdUnavailable(f"etcd returned no value for {key} after refusing to create it")
        return False, _kv(kvs[0])

    def create_all(self, items: dict[str, bytes]) -> bool:
        """Create every key of *items*, all in one transaction, only if none of them exists."""
        answer = self._txn(
            [{"key": _b64(k), "result": "EQUAL", "target": "CREATE", "create_revision": "0"} for k in items],
            [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in items.items()],
            [],
        )
        return bool(answer.get("succeeded"))

    def replace(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Make *key* hold *value* if its last change is still *mod_revision* (0: if it does not exist)."""
        return bool(self._txn([self._unchanged(key, mod_revision)], [{"request_put": {"key": _b64(key), "value": _b64(value)}}], [])
                    .get("succeeded"))

    def delete(self, key: str, mod_revision: int) -> bool:
        """Delete *key* if its last change is still *mod_revision*."""
        return bool(self._txn([self._unchanged(key, mod_revision)], [{"request_delete_range": {"key": _b64(key)}}], [])
                    .get("succeeded"))

    @staticmethod
    def _unchanged(key: str, mod_revision: int) -> dict[str, Any]:
        if mod_revision == 0:
            return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}
        return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}

    def _txn(self, compare: list, success: list, failure: list) -> dict[str, Any]:
        return self._call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure})

    # -- watching ------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, seconds: float) -> Iterator[list[Event]]:
        """Batches of changes under *prefix* from *start_revision* on, for about *seconds*.

        Ends quietly when *seconds* have passed with nothing to report (the
        caller re-reads, then watches again). Raises :class:`Compacted` when
        the start is older than etcd keeps, :class:`EtcdUnavailable` when the
        member serving it has no leader, stops, or cannot be reached.
        ``Grpc-Metadata-hasleader`` makes a member cut off from the quorum end
        the watch instead of keeping it silently open.
        """
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        deadline = time.monotonic() + seconds
        response = self._call("/v3/watch", body, stream_seconds=seconds)
        try:
            for line in response.iter_lines(chunk_size=None):
                if not line:
                    continue
                result = json.loads(line).get("result")
                if result is None:  # {"error": ...}: the member lost its leader, or shut down
                    raise EtcdUnavailable(f"watch ended by etcd: {json.loads(line).get('error', {}).get('message', line[:200])}")
                if result.get("compact_revision"):
                    raise Compacted(f"revision {start_revision} was compacted (now {result['compact_revision']})")
                if result.get("canceled"):
                    raise EtcdUnavailable(f"watch cancelled by etcd: {result.get('cancel_reason', 'no reason given')}")
                events = [Event(e.get("type") == "DELETE", _kv(e.get("kv", {}))) for e in result.get("events", [])]
                if events:
                    yield events
                if time.monotonic() >= deadline:
                    return
        except requests.exceptions.ConnectionError as exc:
            if time.monotonic() >= deadline - 0.05:
                return  # the read timeout that ends a quiet watch
            raise EtcdUnavailable(f"watch cut off: {_why(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise EtcdUnavailable(f"watch cut off: {_why(exc)}") from exc
        finally:
            response.close()

    # -- one request, endpoint after endpoint ------------------------------------------------------

    def _call(self, path: str, body: dict[str, Any], stream_seconds: float | None = None) -> Any:
        """POST *body* to the first endpoint that answers it; a JSON answer, or the streaming response."""
        failures = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._first + step) % count
            endpoint = self.endpoints[index]
            try:
                answer = self._post(endpoint, path, body, stream_seconds)
            except _TryElsewhere as exc:
                failures.append(f"{endpoint}: {exc}")
                continue
            self._first = index
            return answer
        raise EtcdUnavailable("; ".join(failures))

    def _post(self, endpoint: str, path: str, body: dict[str, Any], stream_seconds: float | None) -> Any:
        for attempt in (1, 2):
            headers = {"Grpc-Metadata-hasleader": "true"}
            token = self._authenticate(endpoint) if self._user else None
            if token:
                headers["Authorization"] = token
            read = self.timeout if stream_seconds is None else stream_seconds
            try:
                response = self._session.post(
                    endpoint + path, json=body, headers=headers, timeout=(self.timeout, read), stream=stream_seconds is not None
                )
            except requests.exceptions.RequestException as exc:
                raise _TryElsewhere(_why(exc)) from exc
            if response.status_code == 200:
                if stream_seconds is not None:
                    return response
                try:
                    return response.json()
                except ValueError as exc:
                    raise _TryElsewhere(f"answer is not JSON (HTTP {response.status_code})") from exc
            code, message = _error(response)
            response.close()
            if code == _UNAUTHENTICATED and self._user and attempt == 1:
                self._forget_token(token)
                continue
            if code in _RETRY_ELSEWHERE or response.status_code >= 500 and code is None:
                raise _TryElsewhere(message)
            raise EtcdRefused(f"{endpoint}: {message}")
        raise EtcdRefused(f"{endpoint}: authentication refused after a new token")

    def _authenticate(self, endpoint: str) -> str:
        """The token for user/password, asked for when there is none (docs/design.md, "Fleet")."""
        with self._auth_lock:
            if self._token is None:
                try:
                    response = self._session.post(
                        endpoint + "/v3/auth/authenticate",
                        json={"name": self._user, "password": self._password},
                        timeout=self.timeout,
                    )
                except requests.exceptions.RequestException as exc:
                    raise _TryElsewhere(_why(exc)) from exc
                if response.status_code != 200:
                    code, message = _error(response)
                    if code in _RETRY_ELSEWHERE or response.status_code >= 500 and code is None:
                        raise _TryElsewhere(message)
                    raise EtcdRefused(f"{endpoint}: user {self._user!r} not authenticated: {message}")
                self._token = response.json().get("token")
            return self._token or ""

    def _forget_token(self, token: str | None) -> None:
        with self._auth_lock:
            if self._token == token:
                self._token = None


class _TryElsewhere(Exception):
    """This endpoint could not carry out the request; the next one may."""


def _error(response: requests.Response) -> tuple[int | None, str]:
    """(gRPC code or None, message) of a gateway error answer."""
    try:
        data = response.json()
        return int(data.get("code")) if data.get("code") is not None else None, str(data.get("message") or data.get("error"))
    except (ValueError, AttributeError, TypeError):
        return None, f"HTTP {response.status_code}: {response.text[:200]!r}"


def _why(exc: BaseException) -> str:
    """The innermost reason of a requests exception, in a few words."""
    inner: BaseException = exc
    while inner.__cause__ is not None or (inner.__context__ is not None and not inner.__suppress_context__):
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = str(inner) or type(inner).__name__
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "no connection within the timeout"
    if isinstance(exc, (requests.exceptions.ReadTimeout,)):
        return "no answer within the timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failed ({text[:160]})"
    if "Connection refused" in text:
        return "connection refused"
    return text[:200]
