"""Errors the balancer answers itself, each with its status and stable code.

::

    BalancerError                      any failure the client is told about
    +-- RequestRefused                 the request itself cannot pass (4xx)
    |   +-- InvalidPath                400 a path that could mean another path
    |   +-- RequestNotAllowed          404 not in AllowedRequests
    |   +-- MethodNotAllowed           405 path allowed, method not
    |   +-- RequestBodyInvalid         400 the body could not be read as framed
    |   +-- InvalidHost                400 a Host header that names no host
    |   +-- Forbidden                  403 the balancer's own page, from an address not allowed
    |   +-- RequestTooLarge            413 a body over Limits body_bytes, or no room to hold it
    |   +-- CodingNotImplemented       501 a transfer coding other than chunked
    +-- NoInstanceAvailable            503 no enabled instance could be reached
    +-- InstanceError                  anything tied to one instance (host, port)
        +-- InstanceFailed             502 failed after the request was sent
        +-- InstanceTimeout            504 did not answer in time
        +-- CertificateMismatch        500 certificate differs from the reference
        +-- ReferenceUnreadable        500 reference file cannot be read or parsed
        +-- ReferenceUnsaved           500 first certificate could not be saved

None of these derives from :class:`OSError`: raised from
``HTTPSConnection.connect()`` they travel through urllib3 and requests
untouched (docs/design.md, "Traps"), so the pin check can refuse a connection and
still reach the client as its own 500.

Errors render themselves, as werkzeug's do (:meth:`BalancerError.get_response`):
every answer the balancer writes itself, from the Flask blueprint, the
``/_balancer/`` pages or the worker's refusals, is :func:`json_body` of the
same fields.
"""

from __future__ import annotations

import json
from typing import Any

from werkzeug.wrappers import Response


def json_body(fields: dict[str, Any]) -> bytes:
    """The one JSON rendering of the balancer's own answers: keys in the order written, one line."""
    return json.dumps(fields).encode() + b"\n"


class BalancerError(Exception):
    """A failure the client receives as a JSON body with ``error`` and ``description``."""

    status = 500
    code = "internal_error"
    #: Whether the client connection must close after this answer: the
    #: request's body was not read to its end, so the next bytes on the
    #: connection are not a request head.
    closes_connection = False

    def __init__(self, description: str, retry_after: int | None = None, **fields: Any) -> None:
        super().__init__(description)
        self.description = description
        self.fields = fields
        #: Seconds after which the client may try again (``Retry-After``), when the refusal is temporary.
        self.retry_after = retry_after
        #: Instances tried before this error, for the access log (0: none).
        self.attempts = 0

    def body(self) -> dict[str, Any]:
        """The JSON object sent to the client."""
        return {"error": self.code, "description": self.description, **self.fields}

    def headers(self) -> list[tuple[str, str]]:
        """Extra response headers (``Retry-After``; subclasses add ``Allow``)."""
        return [] if self.retry_after is None else [("Retry-After", str(self.retry_after))]

    def get_response(self) -> Response:
        """This error as the answer the client gets: status, JSON body, extra headers."""
        response = Response(json_body(self.body()), status=self.status, mimetype="application/json")
        for name, value in self.headers():
            response.headers[name] = value
        if self.closes_connection:
            response.headers["Connection"] = "close"  # for servers that read it (flask run)
        return response


class RequestRefused(BalancerError):
    """The request cannot pass, whatever the instances do."""

    status = 400


class InvalidPath(RequestRefused):
    """The path could mean another path to an instance (dot segments, %2F, //...)."""

    status = 400
    code = "invalid_path"


class RequestNotAllowed(RequestRefused):
    """No AllowedRequests entry has this path."""

    status = 404
    code = "request_not_allowed"


class MethodNotAllowed(RequestRefused):
    """The path is allowed, but not with this method."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, description: str, allow: list[str]) -> None:
        super().__init__(description, allowed_methods=allow)
        self.allow = allow

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allow))]


class RequestBodyInvalid(RequestRefused):
    """The request body ended before its announced length."""

    status = 400
    code = "invalid_request_body"
    closes_connection = True


class InvalidHost(RequestRefused):
    """The Host header is not a host name or address with an optional port (RFC 9112 section 3.2)."""

    status = 400
    code = "invalid_host"


class Forbidden(RequestRefused):
    """The balancer's own page (status, metrics) asked from an address ``Admin allow`` does not list."""

    status = 403
    code = "forbidden"


class RequestTooLarge(RequestRefused):
    """The body is larger than ``Limits body_bytes``, or the worker has no room left to hold it now."""

    status = 413
    code = "request_too_large"
    closes_connection = True



class CodingNotImplemented(RequestRefused):
    """The body is sent with a transfer coding other than chunked (RFC 9112 section 6.1: 501)."""

    status = 501
    code = "transfer_coding_not_implemented"
    closes_connection = True


class NoInstanceAvailable(BalancerError):
    """No enabled instance could be reached; nothing was sent."""

    status = 503
    code = "no_instance_available"

    def __init__(self, description: str, retry_after: int = 5, **fields: Any) -> None:
        super().__init__(description, retry_after=retry_after, **fields)


class InstanceError(BalancerError):
    """A failure tied to one instance; the body names its host and port."""

    def __init__(self, description: str, host: str, port: int, **fields: Any) -> None:
        super().__init__(description, host=host, port=port, **fields)
        self.host = host
        self.port = port

    @property
    def instance(self) -> str:
        """``HOST:PORT`` (``[v6]:PORT``), as the ``pins`` commands name instances."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class InstanceFailed(InstanceError):
    """The instance failed after the request was sent."""

    status = 502
    code = "instance_failed"


class InstanceTimeout(InstanceError):
    """The instance did not answer within the read timeout."""

    status = 504
    code = "instance_timeout"


class CertificateMismatch(InstanceError):
    """The instance presented a certificate other than its reference."""

    status = 500
    code = "certificate_mismatch"

    def __init__(self, host: str, port: int, expected_sha256: str, received_sha256: str, reference: str) -> None:
        # The seed's wording, prefixed with the instance so the sentence stands alone.
        super().__init__(
            f"HTTPS connection with the CyberTrace instance {host}:{port} has not been established, "
            "since the server certificate does not match the one expected.",
            host,
            port,
            expected_sha256=expected_sha256,
            received_sha256=received_sha256,
            reference=reference,
        )


class ReferenceUnreadable(InstanceError):
    """The reference file exists but cannot be read or is not one PEM certificate."""

    status = 500
    code = "reference_certificate_unreadable"

    def __init__(self, host: str, port: int, reference: str, reason: str) -> None:
        super().__init__(
            f"The reference certificate {reference} of the instance {host}:{port} cannot be used: {reason}. "
            "It was left untouched; fix or remove it.",
            host,
            port,
            reference=reference,
        )


class ReferenceUnsaved(InstanceError):
    """The first certificate of an instance could not be written to CertDirPath."""

    status = 500
    code = "reference_certificate_unsaved"

    def __init__(self, host: str, port: int, reference: str, reason: str) -> None:
        super().__init__(
            f"The certificate of the instance {host}:{port} could not be saved as {reference}: {reason}. "
            "Nothing was forwarded; make CertDirPath writable by the balancer.",
            host,
            port,
            reference=reference,
        )


class PinStoreUnavailable(InstanceError):
    """The shared pin store holds no reference the worker knows for the instance, and cannot be asked."""

    status = 503
    code = "pin_store_unavailable"

    def __init__(self, host: str, port: int, reference: str, reason: str, retry_after: int) -> None:
        super().__init__(
            f"The certificate of the instance {host}:{port} cannot be checked: the shared pin store cannot be "
            f"reached to read or save its reference {reference} ({reason}). Nothing was sent to the instance.",
            host,
            port,
            retry_after=retry_after,
            reference=reference,
        )


class FanoutInconsistent(BalancerError):
    """The instances answered a fan-out write with different statuses; nothing was journaled."""

    status = 502
    code = "fanout_inconsistent"

    def __init__(self, instances: list[dict[str, Any]]) -> None:
        super().__init__(
            "The instances answered this fan-out write differently, so they no longer hold the same data; "
            "the write was not journaled for anyone. Compare the instances, then send it again.",
            instances=instances,
        )


class JournalFailed(BalancerError):
    """A fan-out write could not be journaled (disk, permissions, a lock held too long); nothing was sent."""

    status = 503
    code = "journal_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"The fan-out write could not be journaled, so it was sent to no instance: {reason}.", retry_after=5
        )
