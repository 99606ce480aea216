"""kl_balancer.conf: every unusable file is refused with one exact line; valid ones become frozen objects.

The broken files are real files under ``tmp_path``, loaded with ``app.loader.load``; each case
asserts the whole message, file path and line number included (docs/design.md, "Configuration"). The start-up
commands are run as subprocesses, as an operator runs them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.loader import MAX_CONFIG_BYTES, ConfigError, config_path, load
from app.settings import (
    DEFAULT_CIPHERS,
    AllowedRequest,
    allows,
    BalancerSpec,
    Config,
    Failover,
    HealthCheck,
    InstanceSpec,
    Limits,
    Timeouts,
    TLSPolicy,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "kl_balancer.conf"

# The file each broken case starts from; the line numbers in the expected messages refer to it.
BASE = """\
<?xml version="1.0" encoding="utf-8"?>
<Config>
  <Balancer api_port="9443" matching_port="9999" cybertrace_port="9998" scanners_count="10">127.0.0.1</Balancer>
  <CertDirPath>certs</CertDirPath>
  <Instances>
    <Instance matching_port="9999" api_port="443">192.0.2.10</Instance>
    <Instance enabled="false" matching_port="9999" api_port="443">192.0.2.11</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="GET">/api/v.1.1/suppliers</Request>
    <Request method="GET">/api/{version}/suppliers</Request>
  </AllowedRequests>
</Config>
"""
#  line 3: Balancer    4: CertDirPath   5: Instances   6, 7: Instance
#  line 9: AllowedRequests   10, 11: Request   13: </Config>

BALANCER = BASE.splitlines(keepends=True)[2]
INSTANCE_6 = '    <Instance matching_port="9999" api_port="443">192.0.2.10</Instance>\n'
INSTANCE_7 = '    <Instance enabled="false" matching_port="9999" api_port="443">192.0.2.11</Instance>\n'
REQUEST_10 = '    <Request method="GET">/api/v.1.1/suppliers</Request>\n'
ROOT_ELEMENTS = (
    "Balancer, SSLCertificatePath, SSLPrivateKeyPath, CertDirPath, EventDelimiter, Instances, AllowedRequests, "
    "Timeouts, Workers, Failover, HealthCheck, Limits, FrontProxy, TLS, Admin, AccessLog, PinStore, Journal"
)
METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
XML_EXPECTED = "expected well-formed XML in UTF-8 or the declared encoding"
PATH_CHARS = "expected letters, digits, -._~!$&'()*+,;=:@ or a whole-segment {{name}}"


def edit(old: str, new: str, text: str = BASE) -> str:
    """*text* with the one occurrence of *old* replaced (a case that edits nothing would test nothing)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def attr(old: str, new: str) -> str:
    """BASE with an attribute or text of the Balancer line (line 3) changed."""
    return edit(BALANCER, edit(old, new, BALANCER))


def before_end(xml: str) -> str:
    """BASE with *xml* on line 13, just before </Config>."""
    return edit("</Config>", f"{xml}\n</Config>")


def request(method: str, path: str) -> str:
    """BASE with line 10 allowing *method* *path*."""
    return edit(REQUEST_10, f'    <Request method="{method}">{path}</Request>\n')


def host(name: str) -> str:
    """BASE with the first instance (line 6) on *name*."""
    return edit(">192.0.2.10<", f">{name}<")


def param(id: str, content: str | bytes, expected: str):
    return pytest.param(content, expected, id=id)


LAUGHS = """\
<?xml version="1.0"?>
<!DOCTYPE Config [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Config><CertDirPath>&lol9;</CertDirPath></Config>
"""

PASSWD = edit(
    '<?xml version="1.0" encoding="utf-8"?>\n',
    '<?xml version="1.0" encoding="utf-8"?>\n<!-- the entity would put a file into the address -->\n'
    '<!DOCTYPE Config [<!ENTITY passwd SYSTEM "file:///etc/passwd">]>\n',
    edit(">127.0.0.1<", ">&passwd;<"),
)

# A valid document padded past the limit with a comment: only its size is wrong.
OVERSIZED = before_end("<!--" + "x" * MAX_CONFIG_BYTES + "-->")

BROKEN = [
    # -- the document ------------------------------------------------------------------------------
    param("empty-file", "", "{path}: file is empty; expected an XML document"),
    param("blank-file", " \n\t\n", "{path}: file is empty; expected an XML document"),
    param(
        "larger-than-1MiB",
        OVERSIZED,
        "{path}: file is larger than 1048576 bytes; expected a configuration of a few KiB",
    ),
    param(
        "unclosed-tag",
        edit("</CertDirPath>", ""),
        "{path}:13: malformed XML at column 10: Opening and ending tag mismatch: CertDirPath line 4 and Config; "
        + XML_EXPECTED,
    ),
    param(
        "not-xml",
        "api_port=9443\n",
        "{path}:1: malformed XML at column 1: Start tag expected, '<' not found; " + XML_EXPECTED,
    ),
    param(
        "double-hyphen-in-comment-quoted-on-one-line",
        edit("<Instances>\n", "<Instances>\n    <!-- run with\n --workers 4 -->\n"),
        "{path}:7: malformed XML at column 2: Double hyphen within comment: <!-- run with; " + XML_EXPECTED,
    ),
    param(
        "latin-1-bytes-declared-utf-8",
        edit(">certs<", ">certificats-\xe9t\xe9<").encode("latin-1"),
        "{path}:4: malformed XML at column 28: Invalid bytes in character encoding; " + XML_EXPECTED,
    ),
    param(
        "billion-laughs",
        LAUGHS,
        "{path}:2: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none",
    ),
    param(
        "billion-laughs-utf-16",
        LAUGHS.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="utf-16"?>').encode("utf-16"),
        "{path}:2: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none",
    ),
    param(
        "external-entity-etc-passwd",
        PASSWD,
        "{path}:3: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none",
    ),
    param(
        "external-entity-after-utf-8-bom",
        "\ufeff" + PASSWD,
        "{path}:3: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none",
    ),
    param(
        "external-dtd",
        edit("<Config>\n", '<!DOCTYPE Config SYSTEM "http://example.com/kl_balancer.dtd">\n<Config>\n'),
        "{path}:2: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none",
    ),
    param(
        "unknown-root-element",
        before_end('  <Timeout connect="5"/>'),
        "{path}:13: unknown element <Timeout>; expected one of: " + ROOT_ELEMENTS,
    ),
    param(
        "namespaced-element",
        edit("<CertDirPath>certs</CertDirPath>", '<c:CertDirPath xmlns:c="urn:x">certs</c:CertDirPath>'),
        "{path}:4: unknown element <{{urn:x}}CertDirPath>; expected one of: " + ROOT_ELEMENTS,
    ),
    # -- Balancer ----------------------------------------------------------------------------------
    param("missing-balancer", edit(BALANCER, ""), "{path}:2: missing <Balancer>; expected exactly one"),
    param(
        "two-balancers",
        edit(BALANCER, BALANCER + BALANCER.replace("127.0.0.1", "::1")),
        "{path}:4: <Balancer> appears twice; expected it once",
    ),
    param(
        "api-port-0",
        attr('api_port="9443"', 'api_port="0"'),
        "{path}:3: <Balancer> attribute api_port='0' is out of range; expected 1 to 65535",
    ),
    param(
        "api-port-70000",
        attr('api_port="9443"', 'api_port="70000"'),
        "{path}:3: <Balancer> attribute api_port='70000' is out of range; expected 1 to 65535",
    ),
    param(
        "api-port-abc",
        attr('api_port="9443"', 'api_port="abc"'),
        "{path}:3: <Balancer> attribute api_port='abc' is not a whole number; expected 1 to 65535",
    ),
    param(
        "matching-port-negative",
        attr('matching_port="9999"', 'matching_port="-1"'),
        "{path}:3: <Balancer> attribute matching_port='-1' is not a whole number; expected 1 to 65535",
    ),
    param(
        "cybertrace-port-empty",
        attr('cybertrace_port="9998"', 'cybertrace_port=""'),
        "{path}:3: <Balancer> attribute cybertrace_port='' is not a whole number; expected 1 to 65535",
    ),
    param(
        "scanners-count-0",
        attr('scanners_count="10"', 'scanners_count="0"'),
        "{path}:3: <Balancer> attribute scanners_count='0' is out of range; expected 1 to 100",
    ),
    param(
        "scanners-count-101",
        attr('scanners_count="10"', 'scanners_count="101"'),
        "{path}:3: <Balancer> attribute scanners_count='101' is out of range; expected 1 to 100",
    ),
    param(
        "scanners-count-missing",
        attr(' scanners_count="10"', ""),
        "{path}:3: <Balancer> is missing attribute 'scanners_count'; "
        "expected all of: api_port, matching_port, cybertrace_port, scanners_count",
    ),
    param(
        "balancer-unknown-attribute",
        attr('scanners_count="10"', 'scanners_count="10" ssl="true"'),
        "{path}:3: <Balancer> has unknown attribute 'ssl'; "
        "expected: api_port, matching_port, cybertrace_port, scanners_count",
    ),
    param(
        "balancer-address-with-port",
        attr(">127.0.0.1<", ">127.0.0.1:9443<"),
        "{path}:3: <Balancer> address '127.0.0.1:9443' is not valid; expected an IPv4 or IPv6 address or a host name",
    ),
    param(
        "balancer-address-url",
        attr(">127.0.0.1<", ">https://balancer.example<"),
        "{path}:3: <Balancer> address 'https://balancer.example' is not valid; "
        "expected an IPv4 or IPv6 address or a host name",
    ),
    param(
        "balancer-address-empty",
        attr(">127.0.0.1<", "><"),
        "{path}:3: <Balancer> is empty; expected the address to listen on",
    ),
    # -- TLS -----------------------------------------------------------------------------------------
    param(
        "certificate-without-key",
        edit("  <CertDirPath>", "  <SSLCertificatePath>tls/cert.pem</SSLCertificatePath>\n  <CertDirPath>"),
        "{path}:4: <SSLCertificatePath> is set but <SSLPrivateKeyPath> is missing; "
        "expected both (HTTPS) or neither (plain HTTP)",
    ),
    param(
        "key-without-certificate",
        before_end("  <SSLPrivateKeyPath>tls/key.pem</SSLPrivateKeyPath>"),
        "{path}:13: <SSLPrivateKeyPath> is set but <SSLCertificatePath> is missing; "
        "expected both (HTTPS) or neither (plain HTTP)",
    ),
    param(
        "certificate-file-missing",
        edit(
            "  <CertDirPath>",
            "  <SSLCertificatePath>tls/cert.pem</SSLCertificatePath>\n"
            "  <SSLPrivateKeyPath>tls/key.pem</SSLPrivateKeyPath>\n  <CertDirPath>",
        ),
        "{path}:4: <SSLCertificatePath> '{dir}/tls/cert.pem' is not a readable file; expected a PEM file",
    ),
    param(
        "certificate-file-name-too-long",
        edit(
            "  <CertDirPath>",
            f"  <SSLCertificatePath>{'a' * 300}.pem</SSLCertificatePath>\n"
            "  <SSLPrivateKeyPath>tls/key.pem</SSLPrivateKeyPath>\n  <CertDirPath>",
        ),
        "{path}:4: <SSLCertificatePath> '{dir}/" + "a" * 300 + ".pem' is not a readable file; expected a PEM file",
    ),
    # -- CertDirPath, EventDelimiter -----------------------------------------------------------------
    param(
        "missing-certdirpath",
        edit("  <CertDirPath>certs</CertDirPath>\n", ""),
        "{path}:2: missing <CertDirPath>; expected the directory of reference certificates",
    ),
    param(
        "empty-certdirpath",
        edit("<CertDirPath>certs</CertDirPath>", "<CertDirPath> <!-- certs --> </CertDirPath>"),
        "{path}:4: <CertDirPath> is empty; expected a directory path",
    ),
    param(
        "certdirpath-attribute",
        edit("<CertDirPath>", '<CertDirPath create="true">'),
        "{path}:4: <CertDirPath> has unknown attribute 'create'; expected: none",
    ),
    param(
        "eventdelimiter-with-element",
        before_end("  <EventDelimiter>\n    <Regex>\\|</Regex>\n  </EventDelimiter>"),
        "{path}:14: unknown element <Regex> in <EventDelimiter>; expected a regular expression",
    ),
    # -- Instances ----------------------------------------------------------------------------------
    param(
        "no-instances",
        edit(INSTANCE_6 + INSTANCE_7, ""),
        "{path}:5: <Instances> is empty; expected at least one <Instance>",
    ),
    param(
        "missing-instances",
        edit("  <Instances>\n" + INSTANCE_6 + INSTANCE_7 + "  </Instances>\n", ""),
        "{path}:2: missing <Instances>; expected at least one <Instance>",
    ),
    param(
        "duplicate-host-and-matching-port",
        edit(INSTANCE_7, '    <Instance enabled="false" matching_port="9999" api_port="8443">192.0.2.10</Instance>\n'),
        "{path}:7: <Instance> host '192.0.2.10' and matching_port 9999 repeat the instance on line 6; "
        "expected each once",
    ),
    param(
        "duplicate-host-and-api-port",
        edit(INSTANCE_7, '    <Instance matching_port="9998" api_port="443">192.0.2.10</Instance>\n'),
        "{path}:7: <Instance> host '192.0.2.10' and api_port 443 repeat the instance on line 6; expected each once",
    ),
    param(
        "duplicate-host-differing-only-in-case",
        edit(INSTANCE_6 + INSTANCE_7, '    <Instance matching_port="9999" api_port="443">ct1.example</Instance>\n'
             '    <Instance matching_port="9999" api_port="8443">CT1.example</Instance>\n'),
        "{path}:7: <Instance> host 'CT1.example' and matching_port 9999 repeat the instance on line 6; "
        "expected each once",
    ),
    param(
        "host-with-ipv6-zone",
        host("fe80::1%eth0"),
        "{path}:6: <Instance> host 'fe80::1%eth0' is not valid; expected a host name or an IPv4 or IPv6 address",
    ),
    param(
        "enable-typo",
        edit('enabled="false"', 'enable="false"'),
        "{path}:7: <Instance> has unknown attribute 'enable'; expected: api_port, matching_port, enabled",
    ),
    param(
        "enabled-yes",
        edit('enabled="false"', 'enabled="yes"'),
        "{path}:7: <Instance> attribute enabled='yes' is not a boolean; expected true or false",
    ),
    param(
        "instance-api-port-missing",
        edit(INSTANCE_6, '    <Instance matching_port="9999">192.0.2.10</Instance>\n'),
        "{path}:6: <Instance> is missing attribute 'api_port'; expected all of: api_port, matching_port",
    ),
    param(
        "instance-port-70000",
        edit(INSTANCE_6, '    <Instance matching_port="70000" api_port="443">192.0.2.10</Instance>\n'),
        "{path}:6: <Instance> attribute matching_port='70000' is out of range; expected 1 to 65535",
    ),
    param(
        "host-with-slash",
        host("192.0.2.10/32"),
        "{path}:6: <Instance> host '192.0.2.10/32' is not valid; expected a host name or an IPv4 or IPv6 address",
    ),
    param(
        "host-dot-dot",
        host(".."),
        "{path}:6: <Instance> host '..' is not valid; expected a host name or an IPv4 or IPv6 address",
    ),
    param(
        "host-path-traversal",
        host("../../etc/cron.d/x"),
        "{path}:6: <Instance> host '../../etc/cron.d/x' is not valid; "
        "expected a host name or an IPv4 or IPv6 address",
    ),
    param(
        "host-empty",
        host(""),
        "{path}:6: <Instance> is empty; expected a host name or IP address",
    ),
    param(
        "unknown-element-in-instances",
        edit(INSTANCE_7, "    <Server>192.0.2.11</Server>\n"),
        "{path}:7: unknown element <Server> in <Instances>; expected <Instance>",
    ),
    # -- AllowedRequests ------------------------------------------------------------------------------
    param(
        "method-fetch",
        request("FETCH", "/api/v.1.1/suppliers"),
        f"{{path}}:10: <Request> attribute method='FETCH' is not allowed; expected one of: {METHODS}",
    ),
    param(
        "method-lowercase-get",
        request("get", "/api/v.1.1/suppliers"),
        f"{{path}}:10: <Request> attribute method='get' is not allowed; expected one of: {METHODS}",
    ),
    param(
        "method-trace",
        request("TRACE", "/api/v.1.1/suppliers"),
        f"{{path}}:10: <Request> attribute method='TRACE' is not allowed; expected one of: {METHODS}",
    ),
    param(
        "method-connect",
        request("CONNECT", "/api/v.1.1/suppliers"),
        f"{{path}}:10: <Request> attribute method='CONNECT' is not allowed; expected one of: {METHODS}",
    ),
    param(
        "method-missing",
        edit(' method="GET">/api/v.1.1/', ">/api/v.1.1/"),
        "{path}:10: <Request> is missing attribute 'method'; expected all of: method",
    ),
    param(
        "path-not-absolute",
        request("GET", "api/v.1.1/suppliers"),
        "{path}:10: <Request> path 'api/v.1.1/suppliers' does not start with '/'; "
        "expected an absolute path such as /api/v.1.1/suppliers",
    ),
    param(
        "path-empty-segment",
        request("GET", "/api//suppliers"),
        "{path}:10: <Request> path '/api//suppliers' has an empty segment ('//'); "
        "expected segments separated by single '/'",
    ),
    param(
        "path-dot-segment",
        request("GET", "/api/v.1.1/../admin"),
        "{path}:10: <Request> path '/api/v.1.1/../admin' has a dot segment; expected plain segments",
    ),
    param(
        "path-single-dot-segment",
        request("GET", "/api/./suppliers"),
        "{path}:10: <Request> path '/api/./suppliers' has a dot segment; expected plain segments",
    ),
    param(
        "path-percent-escape",
        request("GET", "/api/%2e%2e/admin"),
        "{path}:10: <Request> path '/api/%2e%2e/admin' has segment '%2e%2e' with characters that are not allowed; "
        + PATH_CHARS,
    ),
    param(
        "path-placeholder-inside-segment",
        request("GET", "/api/v{version}/suppliers"),
        "{path}:10: <Request> path '/api/v{{version}}/suppliers' has segment 'v{{version}}' with characters "
        "that are not allowed; " + PATH_CHARS,
    ),
    param(
        "path-reserved",
        request("GET", "/_balancer/health"),
        "{path}:10: <Request> path '/_balancer/health' is reserved for the balancer (/_balancer/); "
        "expected another path",
    ),
    param(
        "path-repeated-placeholder",
        request("GET", "/api/{version}/{version}"),
        "{path}:10: <Request> path '/api/{{version}}/{{version}}' repeats placeholder {{version}}; "
        "expected distinct names",
    ),
    param(
        "duplicate-request",
        edit(REQUEST_10, REQUEST_10 + REQUEST_10.replace('"GET"', '"POST"') + REQUEST_10),
        "{path}:12: <Request> GET '/api/v.1.1/suppliers' repeats the request on line 10; expected each once",
    ),
    param(
        "request-path-as-attribute",
        edit(REQUEST_10, '    <Request method="GET" path="/api/v.1.1/suppliers"/>\n'),
        "{path}:10: <Request> has unknown attribute 'path'; expected: method, repeatable, fanout",
    ),
    param(
        "request-repeatable-yes",
        edit(REQUEST_10, '    <Request method="POST" repeatable="yes">/api/v2/lookup</Request>\n'),
        "{path}:10: <Request> attribute repeatable='yes' is not a boolean; expected true or false",
    ),
    param(
        "request-repeatable-empty",
        edit(REQUEST_10, '    <Request method="POST" repeatable="">/api/v2/lookup</Request>\n'),
        "{path}:10: <Request> attribute repeatable='' is not a boolean; expected true or false",
    ),
    param(
        "request-repeatable-upper-case",
        edit(REQUEST_10, '    <Request method="POST" repeatable="TRUE">/api/v2/lookup</Request>\n'),
        "{path}:10: <Request> attribute repeatable='TRUE' is not a boolean; expected true or false",
    ),
    param(
        "unknown-element-in-allowedrequests",
        edit(REQUEST_10, '    <Allow method="GET">/api/v.1.1/suppliers</Allow>\n'),
        "{path}:10: unknown element <Allow> in <AllowedRequests>; expected <Request>",
    ),
    # -- fan-out writes and the Journal ---------------------------------------------------------------
    param(
        "fanout-and-repeatable",
        edit(REQUEST_10, '    <Request method="PUT" fanout="true" repeatable="true">/api/{v}/suppliers/{s}/indicators</Request>\n'),
        "{path}:10: <Request> PUT '/api/{{v}}/suppliers/{{s}}/indicators' has both fanout='true' and repeatable='true'; "
        "expected one: a fan-out write already reaches every instance, and is never sent to one in place of another",
    ),
    param(
        "fanout-get",
        edit(REQUEST_10, '    <Request method="GET" fanout="true">/api/v.1.1/suppliers</Request>\n'),
        "{path}:10: <Request> GET '/api/v.1.1/suppliers' has fanout='true', but a fan-out request must change "
        "something; expected method one of: POST, PUT, PATCH, DELETE",
    ),
    param(
        "fanout-not-boolean",
        edit(REQUEST_10, '    <Request method="PUT" fanout="yes">/api/v.1.1/suppliers</Request>\n'),
        "{path}:10: <Request> attribute fanout='yes' is not a boolean; expected true or false",
    ),
    param(
        "journal-without-directory",
        before_end("  <Journal/>"),
        "{path}:13: <Journal> is missing attribute 'directory'; expected all of: directory",
    ),
    param(
        "journal-empty-directory",
        before_end('  <Journal directory=" "/>'),
        "{path}:13: <Journal> attribute directory='' is empty; expected a directory path",
    ),
    # -- PinStore ----------------------------------------------------------------------------------------
    param(
        "pin-store-type-unknown",
        before_end('  <PinStore type="consul"/>'),
        "{path}:13: <PinStore> attribute type='consul' is not valid; expected one of: directory, etcd",
    ),
    param(
        "pin-store-directory-with-endpoints",
        before_end('  <PinStore type="directory" endpoints="http://127.0.0.1:2379"/>'),
        "{path}:13: <PinStore> attribute 'endpoints' applies to type='etcd' only; CertDirPath is the directory store",
    ),
    param(
        "pin-store-etcd-without-endpoints",
        before_end('  <PinStore type="etcd"/>'),
        "{path}:13: <PinStore type='etcd'> is missing attribute 'endpoints'; expected etcd client URLs",
    ),
    param(
        "pin-store-endpoint-not-a-url",
        before_end('  <PinStore type="etcd" endpoints="127.0.0.1:2379"/>'),
        "{path}:13: <PinStore> attribute endpoints='127.0.0.1:2379' has '127.0.0.1:2379', which is not a URL of "
        "scheme, host and port; expected etcd client URLs separated by spaces, such as https://10.0.0.1:2379, "
        "all http or all https",
    ),
    param(
        "pin-store-endpoint-with-path",
        before_end('  <PinStore type="etcd" endpoints="http://127.0.0.1:2379/v3"/>'),
        "{path}:13: <PinStore> attribute endpoints='http://127.0.0.1:2379/v3' has 'http://127.0.0.1:2379/v3', which "
        "is not a URL of scheme, host and port; expected etcd client URLs separated by spaces, such as "
        "https://10.0.0.1:2379, all http or all https",
    ),
    param(
        "pin-store-endpoints-mixed",
        before_end('  <PinStore type="etcd" endpoints="https://10.0.0.1:2379 http://10.0.0.2:2379"/>'),
        "{path}:13: <PinStore> attribute endpoints='https://10.0.0.1:2379 http://10.0.0.2:2379' mixes http and "
        "https; expected etcd client URLs separated by spaces, such as https://10.0.0.1:2379, all http or all https",
    ),
    param(
        "pin-store-endpoint-port-0",
        before_end('  <PinStore type="etcd" endpoints="http://10.0.0.1:0"/>'),
        "{path}:13: <PinStore> attribute endpoints='http://10.0.0.1:0' has 'http://10.0.0.1:0', which is not a URL "
        "of scheme, host and port; expected etcd client URLs separated by spaces, such as https://10.0.0.1:2379, "
        "all http or all https",
    ),
    param(
        "pin-store-prefix-trailing-slash",
        before_end('  <PinStore type="etcd" endpoints="http://10.0.0.1:2379" prefix="/ctbalancer/"/>'),
        "{path}:13: <PinStore> attribute prefix='/ctbalancer/' is not valid; expected a key prefix such as "
        "/ctbalancer: segments of letters, digits, '.', '_' or '-', each after a '/', no trailing '/'",
    ),
    param(
        "pin-store-timeout-0",
        before_end('  <PinStore type="etcd" endpoints="http://10.0.0.1:2379" timeout="0"/>'),
        "{path}:13: <PinStore> attribute timeout='0' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "pin-store-missing-ca-file",
        before_end('  <PinStore type="etcd" endpoints="https://10.0.0.1:2379" ca_file="nowhere/ca.pem"/>'),
        "{path}:13: <PinStore> attribute ca_file='nowhere/ca.pem' is not a readable file; expected a path to one",
    ),
    param(
        "pin-store-tls-over-http",
        before_end('  <PinStore type="etcd" endpoints="http://10.0.0.1:2379" ca_file="kl_balancer.conf"/>'),
        "{path}:13: <PinStore> has ca_file or cert_file but its endpoints are http; expected https endpoints for TLS",
    ),
    param(
        "pin-store-cert-without-key",
        before_end('  <PinStore type="etcd" endpoints="https://10.0.0.1:2379" cert_file="kl_balancer.conf"/>'),
        "{path}:13: <PinStore> attribute 'cert_file' is set but 'key_file' is missing; expected both or neither",
    ),
    param(
        "pin-store-user-without-password",
        before_end('  <PinStore type="etcd" endpoints="https://10.0.0.1:2379" user="ctbalancer"/>'),
        "{path}:13: <PinStore> attribute 'user' is set but 'password_file' is missing; expected both or neither",
    ),
    param(
        "pin-store-unknown-attribute",
        before_end('  <PinStore type="etcd" endpoints="https://10.0.0.1:2379" lease="10"/>'),
        "{path}:13: <PinStore> has unknown attribute 'lease'; expected: type, endpoints, prefix, user, timeout, "
        "ca_file, cert_file, key_file, password_file",
    ),
    # -- Timeouts, Workers ----------------------------------------------------------------------------
    param(
        "timeouts-connect-0",
        before_end('  <Timeouts connect="0"/>'),
        "{path}:13: <Timeouts> attribute connect='0' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "timeouts-read-abc",
        before_end('  <Timeouts read="abc"/>'),
        "{path}:13: <Timeouts> attribute read='abc' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "timeouts-read-nan",
        before_end('  <Timeouts read="nan"/>'),
        "{path}:13: <Timeouts> attribute read='nan' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "timeouts-unknown-attribute",
        before_end('  <Timeouts connect="5" write="5"/>'),
        "{path}:13: <Timeouts> has unknown attribute 'write'; expected: connect, read, total, queue, client",
    ),
    param(
        "timeouts-total-0",
        before_end('  <Timeouts total="0"/>'),
        "{path}:13: <Timeouts> attribute total='0' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "timeouts-total-negative",
        before_end('  <Timeouts total="-1"/>'),
        "{path}:13: <Timeouts> attribute total='-1' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "timeouts-total-over-an-hour",
        before_end('  <Timeouts total="3601"/>'),
        "{path}:13: <Timeouts> attribute total='3601' is not valid; expected seconds, above 0 and at most 3600",
    ),
    param(
        "timeouts-queue-negative",
        before_end('  <Timeouts queue="-0.5"/>'),
        "{path}:13: <Timeouts> attribute queue='-0.5' is not valid; expected seconds, from 0 to 3600",
    ),
    param(
        "timeouts-queue-inf",
        before_end('  <Timeouts queue="inf"/>'),
        "{path}:13: <Timeouts> attribute queue='inf' is not valid; expected seconds, from 0 to 3600",
    ),
    param(
        "timeouts-queue-words",
        before_end('  <Timeouts queue="five"/>'),
        "{path}:13: <Timeouts> attribute queue='five' is not valid; expected seconds, from 0 to 3600",
    ),
    param(
        "timeouts-as-elements",
        before_end("  <Timeouts>\n    <connect>5</connect>\n  </Timeouts>"),
        "{path}:14: unknown element <connect> in <Timeouts>; expected only attributes",
    ),
    param(
        "timeouts-text",
        before_end("  <Timeouts>5</Timeouts>"),
        "{path}:13: <Timeouts> has text '5'; expected only attributes",
    ),
    param(
        "timeouts-client-zero",
        before_end('  <Timeouts client="0"/>'),
        "{path}:13: <Timeouts> attribute client='0' is not valid; expected seconds, above 0 and at most 3600",
    ),
    # -- Limits, FrontProxy, Admin, TLS ------------------------------------------------------------------
    param(
        "limits-body-negative",
        before_end('  <Limits body_bytes="-1"/>'),
        "{path}:13: <Limits> attribute body_bytes='-1' is not a whole number; expected 0 to 17179869184",
    ),
    param(
        "limits-body-over-16GiB",
        before_end('  <Limits body_bytes="17179869185"/>'),
        "{path}:13: <Limits> attribute body_bytes='17179869185' is out of range; expected 0 to 17179869184",
    ),
    param(
        "limits-connections-below-10",
        before_end('  <Limits connections="9"/>'),
        "{path}:13: <Limits> attribute connections='9' is out of range; expected 10 to 100000",
    ),
    param(
        "limits-unknown-attribute",
        before_end('  <Limits header_bytes="9"/>'),
        "{path}:13: <Limits> has unknown attribute 'header_bytes'; "
        "expected: body_bytes, connections, spool_bytes, answer_bytes",
    ),
    param(
        "frontproxy-without-allow",
        before_end("  <FrontProxy/>"),
        "{path}:13: <FrontProxy> is missing attribute 'allow'; expected all of: allow",
    ),
    param(
        "frontproxy-host-name",
        before_end('  <FrontProxy allow="127.0.0.1 proxy.example"/>'),
        "{path}:13: <FrontProxy> attribute allow='127.0.0.1 proxy.example' has 'proxy.example'; expected IPv4 or IPv6 addresses or "
        "networks (10.0.0.0/8) separated by spaces",
    ),
    param(
        "admin-network-with-host-bits",
        before_end('  <Admin allow="10.20.0.1/16"/>'),
        "{path}:13: <Admin> attribute allow='10.20.0.1/16' has '10.20.0.1/16'; expected IPv4 or IPv6 addresses or "
        "networks (10.0.0.0/8) separated by spaces",
    ),
    param(
        "tls-min-version-1.1",
        before_end('  <TLS min_version="1.1"/>'),
        "{path}:13: <TLS> attribute min_version='1.1' is not valid; expected one of: 1.2, 1.3",
    ),
    param(
        "tls-unknown-cipher",
        before_end('  <TLS ciphers="NOT-A-CIPHER"/>'),
        "{path}:13: <TLS> attribute ciphers='NOT-A-CIPHER' selects no cipher OpenSSL knows; expected an OpenSSL "
        "cipher list such as the default (ECDHE-ECDSA-AES128-GCM-SHA256:...)",
    ),
    param(
        "tls-only-tls-1.3-suites",
        before_end('  <TLS ciphers="TLS_AES_128_GCM_SHA256"/>'),
        "{path}:13: <TLS> attribute ciphers='TLS_AES_128_GCM_SHA256' selects no cipher OpenSSL knows; "
        "expected an OpenSSL cipher list such as the default (ECDHE-ECDSA-AES128-GCM-SHA256:...)",
    ),
    param(
        "accesslog-directory-missing",
        before_end('  <AccessLog file="no/such/dir/access.log"/>'),
        "{path}:13: <AccessLog> attribute file='no/such/dir/access.log' is in no existing directory; "
        "expected a file path in one, or - for stderr",
    ),
    param(
        "accesslog-unknown-attribute",
        before_end('  <AccessLog path="-"/>'),
        "{path}:13: <AccessLog> has unknown attribute 'path'; expected: file",
    ),
    # -- Failover, HealthCheck -------------------------------------------------------------------------
    param(
        "failover-cooldown-negative",
        before_end('  <Failover cooldown="-1"/>'),
        "{path}:13: <Failover> attribute cooldown='-1' is not valid; expected seconds, from 0 to 3600",
    ),
    param(
        "failover-cooldown-nan",
        before_end('  <Failover cooldown="nan"/>'),
        "{path}:13: <Failover> attribute cooldown='nan' is not valid; expected seconds, from 0 to 3600",
    ),
    param(
        "failover-cooldown-units",
        before_end('  <Failover cooldown="10s"/>'),
        "{path}:13: <Failover> attribute cooldown='10s' is not valid; expected seconds, from 0 to 3600",
    ),
    param(
        "failover-retry-status-2xx",
        before_end('  <Failover retry_statuses="429 200"/>'),
        "{path}:13: <Failover> attribute retry_statuses='429 200' has '200'; "
        "expected HTTP statuses from 400 to 599 separated by spaces",
    ),
    param(
        "failover-retry-status-600",
        before_end('  <Failover retry_statuses="503,600"/>'),
        "{path}:13: <Failover> attribute retry_statuses='503,600' has '600'; "
        "expected HTTP statuses from 400 to 599 separated by spaces",
    ),
    param(
        "failover-retry-status-word",
        before_end('  <Failover retry_statuses="429 busy"/>'),
        "{path}:13: <Failover> attribute retry_statuses='429 busy' has 'busy'; "
        "expected HTTP statuses from 400 to 599 separated by spaces",
    ),
    param(
        "failover-retry-status-4-digits",
        before_end('  <Failover retry_statuses="4290"/>'),
        "{path}:13: <Failover> attribute retry_statuses='4290' has '4290'; "
        "expected HTTP statuses from 400 to 599 separated by spaces",
    ),
    param(
        "failover-buffer-negative",
        before_end('  <Failover buffer_bytes="-1"/>'),
        "{path}:13: <Failover> attribute buffer_bytes='-1' is not a whole number; expected 0 to 67108864",
    ),
    param(
        "failover-buffer-over-64MiB",
        before_end('  <Failover buffer_bytes="67108865"/>'),
        "{path}:13: <Failover> attribute buffer_bytes='67108865' is out of range; expected 0 to 67108864",
    ),
    param(
        "failover-buffer-with-unit",
        before_end('  <Failover buffer_bytes="1MiB"/>'),
        "{path}:13: <Failover> attribute buffer_bytes='1MiB' is not a whole number; expected 0 to 67108864",
    ),
    param(
        "failover-on-mismatch-unknown",
        before_end('  <Failover on_mismatch="skip"/>'),
        "{path}:13: <Failover> attribute on_mismatch='skip' is not valid; expected one of: refuse, failover",
    ),
    param(
        "failover-on-mismatch-upper-case",
        before_end('  <Failover on_mismatch="Failover"/>'),
        "{path}:13: <Failover> attribute on_mismatch='Failover' is not valid; expected one of: refuse, failover",
    ),
    param(
        "failover-unknown-attribute",
        before_end('  <Failover retries="3"/>'),
        "{path}:13: <Failover> has unknown attribute 'retries'; "
        "expected: cooldown, retry_statuses, buffer_bytes, on_mismatch",
    ),
    param(
        "failover-text",
        before_end("  <Failover>on</Failover>"),
        "{path}:13: <Failover> has text 'on'; expected only attributes",
    ),
    param(
        "failover-twice",
        before_end('  <Failover cooldown="5"/>\n  <Failover cooldown="6"/>'),
        "{path}:14: <Failover> appears twice; expected it once",
    ),
    param(
        "healthcheck-interval-below-1",
        before_end('  <HealthCheck interval="0.5"/>'),
        "{path}:13: <HealthCheck> attribute interval='0.5' is not valid; expected 0 (off) or seconds from 1 to 3600",
    ),
    param(
        "healthcheck-interval-negative",
        before_end('  <HealthCheck interval="-5"/>'),
        "{path}:13: <HealthCheck> attribute interval='-5' is not valid; expected 0 (off) or seconds from 1 to 3600",
    ),
    param(
        "healthcheck-interval-over-an-hour",
        before_end('  <HealthCheck interval="7200"/>'),
        "{path}:13: <HealthCheck> attribute interval='7200' is not valid; expected 0 (off) or seconds from 1 to 3600",
    ),
    param(
        "healthcheck-interval-word",
        before_end('  <HealthCheck interval="often"/>'),
        "{path}:13: <HealthCheck> attribute interval='often' is not valid; expected 0 (off) or seconds from 1 to 3600",
    ),
    param(
        "healthcheck-unknown-attribute",
        before_end('  <HealthCheck interval="10" path="/health"/>'),
        "{path}:13: <HealthCheck> has unknown attribute 'path'; expected: interval",
    ),
    param(
        "healthcheck-child-element",
        before_end("  <HealthCheck>\n    <Interval>10</Interval>\n  </HealthCheck>"),
        "{path}:14: unknown element <Interval> in <HealthCheck>; expected only attributes",
    ),
    param(
        "workers-0",
        before_end("  <Workers>0</Workers>"),
        "{path}:13: <Workers> value '0' is out of range; expected 1 to 64",
    ),
    param(
        "workers-65",
        before_end("  <Workers>65</Workers>"),
        "{path}:13: <Workers> value '65' is out of range; expected 1 to 64",
    ),
    param(
        "workers-two",
        before_end("  <Workers>two</Workers>"),
        "{path}:13: <Workers> value 'two' is not a whole number; expected 1 to 64",
    ),
    param(
        "two-workers-elements",
        before_end("  <Workers>2</Workers>\n  <Workers>4</Workers>"),
        "{path}:14: <Workers> appears twice; expected it once",
    ),
]


def write(directory: Path, content: str | bytes, name: str = "kl_balancer.conf") -> Path:
    path = directory / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def test_base_file_is_valid(tmp_path: Path) -> None:
    """Every broken case is BASE with one thing wrong, so BASE itself must load."""
    config = load(write(tmp_path, BASE))
    assert [i.host for i in config.enabled_instances] == ["192.0.2.10"]


@pytest.mark.parametrize(("content", "expected"), BROKEN)
def test_broken_configuration_is_refused_with_one_exact_line(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == expected.format(path=path, dir=tmp_path.resolve())
    assert "\n" not in str(info.value)


def test_there_are_at_least_25_broken_cases() -> None:
    assert len(BROKEN) >= 25
    assert len({p.id for p in BROKEN}) == len(BROKEN)


def test_config_error_carries_file_line_and_message(tmp_path: Path) -> None:
    path = write(tmp_path, before_end("  <Workers>0</Workers>"))
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (info.value.path, info.value.line, info.value.message) == (
        str(path),
        13,
        "<Workers> value '0' is out of range; expected 1 to 64",
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "kl_balancer.conf"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f"{path}: cannot read the configuration: No such file or directory; expected a readable kl_balancer.conf"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: cannot read the configuration: Is a directory; expected a readable kl_balancer.conf"
    )


def test_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A sparse 64 GiB file: reading or parsing it would take minutes and all the memory."""
    path = tmp_path / "kl_balancer.conf"
    path.write_bytes(BASE.encode())
    os.truncate(path, 64 * 1024**3)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load(path)
    assert time.monotonic() - started < 2.0
    assert str(info.value) == f"{path}: file is larger than 1048576 bytes; expected a configuration of a few KiB"


def test_file_of_exactly_the_limit_loads(tmp_path: Path) -> None:
    head = before_end("<!--")
    filler = MAX_CONFIG_BYTES - len(head.encode()) - len("-->")
    text = before_end("<!--" + "x" * filler + "-->")
    assert len(text.encode()) == MAX_CONFIG_BYTES
    assert load(write(tmp_path, text)).balancer.api_port == 9443
    assert len(OVERSIZED.encode()) > MAX_CONFIG_BYTES


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
@pytest.mark.parametrize(
    "doctype",
    [
        pytest.param('<!DOCTYPE Config [<!ENTITY e SYSTEM "{fifo}">]>\n', id="external-entity"),
        pytest.param('<!DOCTYPE Config [<!ENTITY % p SYSTEM "{fifo}"> %p;]>\n', id="parameter-entity"),
        pytest.param('<!DOCTYPE Config SYSTEM "{fifo}">\n', id="external-dtd"),
    ],
)
def test_external_entities_and_dtds_are_never_opened(tmp_path: Path, doctype: str, encoding: str) -> None:
    """The named file is a FIFO with no writer: a parser that opened it would block forever.

    Run in a subprocess so that such a regression fails on the timeout instead of hanging the suite.
    """
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    xml = f'<?xml version="1.0" encoding="{encoding}"?>\n' + doctype.format(fifo=fifo) + "<Config>&e;</Config>\n"
    path = write(tmp_path, xml.encode(encoding))
    code = textwrap.dedent(
        """\
        import sys
        from app.loader import ConfigError, load
        try:
            load(sys.argv[1])
        except ConfigError as e:
            print(e)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the parser opened {fifo} (it blocked on the FIFO)")
    assert done.stdout == f"{path}:2: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none\n"
    assert done.returncode == 0, done.stderr


# -- valid files ---------------------------------------------------------------------------------------

# A whole file in the vendor's format, with comments in odd places; no Timeouts or Workers (defaults).
FULL = """\
<?xml version="1.0" encoding="utf-8"?>
<!-- the root element's name is not checked; <!DOCTYPE> in a comment is just text -->
<KasperskyBalancer>
  <!-- text: the address to listen on -->
  <Balancer api_port="9443" matching_port="9999" cybertrace_port="9998" scanners_count="10">\
127.0.0.1<!-- loopback --></Balancer>
  <SSLCertificatePath>tls/balancer_cert.pem</SSLCertificatePath>
  <SSLPrivateKeyPath>
      tls/balancer_key.pem
  </SSLPrivateKeyPath>
  <CertDirPath>ce<!-- split -->rts</CertDirPath>
  <EventDelimiter> </EventDelimiter>
  <Instances>
    <!-- enabled defaults to true -->
    <Instance matching_port="9999" api_port="443">192.0.2.10</Instance>
    <Instance enabled="false" matching_port="9999" api_port="443">192.0.2.11</Instance>
    <Instance enabled="true" matching_port="9999" api_port="8443">2001:db8::1</Instance>
    <Instance matching_port="9998" api_port="443">ct-3.example.</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="GET">/api/v.1.1/suppliers</Request>
    <!-- {name} is one segment -->
    <Request method="GET">/api/{version}/suppliers</Request>
    <Request method="POST">/api/{version}/lookup</Request>
    <Request method="GET">/</Request>
    <Request method="OPTIONS">/api/{version}/</Request>
  </AllowedRequests>
</KasperskyBalancer>
"""


def test_full_example_parses_into_frozen_objects(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "balancer_cert.pem").write_text("cert")
    (tmp_path / "tls" / "balancer_key.pem").write_text("key")
    path = write(tmp_path, FULL)
    base = tmp_path.resolve()
    config = load(path)
    assert config == Config(
        path=path,
        balancer=BalancerSpec(
            address="127.0.0.1", api_port=9443, matching_port=9999, cybertrace_port=9998, scanners_count=10
        ),
        cert_dir=base / "certs",
        instances=(
            InstanceSpec(host="192.0.2.10", api_port=443, matching_port=9999, enabled=True),
            InstanceSpec(host="192.0.2.11", api_port=443, matching_port=9999, enabled=False),
            InstanceSpec(host="2001:db8::1", api_port=8443, matching_port=9999, enabled=True),
            InstanceSpec(host="ct-3.example.", api_port=443, matching_port=9998, enabled=True),
        ),
        allowed=(
            AllowedRequest("GET", "/api/v.1.1/suppliers"),
            AllowedRequest("GET", "/api/{version}/suppliers"),
            AllowedRequest("POST", "/api/{version}/lookup"),
            AllowedRequest("GET", "/"),
            AllowedRequest("OPTIONS", "/api/{version}/"),
        ),
        tls_cert=base / "tls" / "balancer_cert.pem",
        tls_key=base / "tls" / "balancer_key.pem",
        timeouts=Timeouts(connect=5.0, read=60.0),
        workers=2,
        event_delimiter=" ",
    )
    assert config.tls is True
    assert [i.line for i in config.instances] == [14, 15, 16, 17]
    assert [r.line for r in config.allowed] == [20, 22, 23, 24, 25]
    assert [i.host for i in config.enabled_instances] == ["192.0.2.10", "2001:db8::1", "ct-3.example."]


def test_relative_paths_are_resolved_against_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "cert.pem").write_text("cert")
    (tmp_path / "elsewhere").mkdir()
    path = write(
        tmp_path / "etc",
        edit(
            "  <CertDirPath>certs</CertDirPath>",
            "  <SSLCertificatePath>cert.pem</SSLCertificatePath>\n"
            f"  <SSLPrivateKeyPath>{tmp_path}/etc/cert.pem</SSLPrivateKeyPath>\n"
            "  <CertDirPath>../pins</CertDirPath>",
        ),
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load(os.path.relpath(path))
    assert config.cert_dir == tmp_path.resolve() / "etc" / ".." / "pins"
    assert config.tls_cert == tmp_path.resolve() / "etc" / "cert.pem"
    assert config.tls_key == tmp_path / "etc" / "cert.pem"


def test_absolute_certdirpath_is_kept(tmp_path: Path) -> None:
    config = load(write(tmp_path, edit(">certs<", ">/var/lib/ctbalancer/certs<")))
    assert config.cert_dir == Path("/var/lib/ctbalancer/certs")


def test_defaults_without_optional_elements(tmp_path: Path) -> None:
    text = edit("  <AllowedRequests>\n" + REQUEST_10, "").replace(
        '    <Request method="GET">/api/{version}/suppliers</Request>\n  </AllowedRequests>\n', ""
    )
    config = load(write(tmp_path, text))
    assert (config.allowed, config.timeouts, config.workers) == ((), Timeouts(5.0, 60.0, 75.0, 5.0), 2)
    assert config.failover == Failover(10.0, (425, 429, 503), 1024 * 1024, "refuse")
    assert config.health_check == HealthCheck(0.0)
    assert (config.tls_cert, config.tls_key, config.tls, config.event_delimiter) == (None, None, False, None)


def test_hostile_client_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, BASE))
    assert config.timeouts.client == 10.0
    assert config.limits == Limits(body_bytes=128 * 1024 * 1024, connections=1000, spool_bytes=4 << 30, answer_bytes=1 << 30)
    assert config.tls_policy == TLSPolicy(ciphers=DEFAULT_CIPHERS, min_version="1.2")
    assert "CBC" not in DEFAULT_CIPHERS and "SHA:" not in DEFAULT_CIPHERS + ":"
    assert config.front_proxy == ()
    assert [str(n) for n in config.admin_allow] == ["127.0.0.1/32", "::1/128"]
    assert config.access_log is None
    assert load(write(tmp_path, before_end("  <AccessLog/>"), "stderr.conf")).access_log == "-"
    assert load(write(tmp_path, before_end('  <AccessLog file="access.log"/>'), "file.conf")).access_log == str(
        tmp_path.resolve() / "access.log"
    )


def test_hostile_client_elements_are_read(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            before_end(
                '  <Timeouts client="3.5"/>\n'
                '  <Limits body_bytes="1000" connections="20" spool_bytes="0" answer_bytes="5"/>\n'
                '  <FrontProxy allow="127.0.0.1, 10.0.0.0/8"/>\n'
                '  <TLS ciphers="ECDHE-RSA-AES128-GCM-SHA256" min_version="1.3"/>\n'
                '  <Admin allow="::1 10.20.0.0/16"/>'
            ),
        )
    )
    assert config.timeouts.client == 3.5
    assert config.limits == Limits(body_bytes=1000, connections=20, spool_bytes=0, answer_bytes=5)
    assert [str(n) for n in config.front_proxy] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert config.tls_policy == TLSPolicy(ciphers="ECDHE-RSA-AES128-GCM-SHA256", min_version="1.3")
    assert [str(n) for n in config.admin_allow] == ["::1/128", "10.20.0.0/16"]
    assert allows(config.admin_allow, "10.20.3.4") and not allows(config.admin_allow, "127.0.0.1")
    assert allows(config.front_proxy, "::ffff:10.1.2.3") and not allows(config.front_proxy, "garbage")


def test_timeouts_and_workers_are_read(tmp_path: Path) -> None:
    config = load(write(tmp_path, before_end('  <Timeouts connect="2.5" read="300"/>\n  <Workers>8</Workers>')))
    assert (config.timeouts, config.workers) == (Timeouts(connect=2.5, read=300.0), 8)
    config = load(write(tmp_path, before_end('  <Timeouts read="1"/>'), "read-only.conf"))
    assert config.timeouts == Timeouts(connect=5.0, read=1.0)


def test_failover_healthcheck_and_timeouts_are_read(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            before_end(
                '  <Timeouts connect="1.5" total="20" queue="0"/>\n'
                '  <Failover cooldown="0" retry_statuses=" 503, 429  502 503 " buffer_bytes="0" on_mismatch="failover"/>\n'
                '  <HealthCheck interval="2.5"/>'
            ),
        )
    )
    assert config.timeouts == Timeouts(connect=1.5, read=60.0, total=20.0, queue=0.0)
    assert config.failover == Failover(cooldown=0.0, retry_statuses=(503, 429, 502), buffer_bytes=0, on_mismatch="failover")
    assert config.health_check == HealthCheck(interval=2.5)
    config = load(write(tmp_path, before_end('  <Failover retry_statuses=""/>\n  <HealthCheck/>'), "empty.conf"))
    assert (config.failover.retry_statuses, config.health_check.interval) == ((), 0.0)


@pytest.mark.parametrize(
    ("method", "attribute", "repeatable", "safe_to_repeat"),
    [
        ("GET", "", None, True),
        ("HEAD", "", None, True),
        ("POST", "", None, False),
        ("PUT", "", None, False),
        ("DELETE", "", None, False),
        ("OPTIONS", "", None, False),
        ("POST", ' repeatable="true"', True, True),
        ("POST", ' repeatable="false"', False, False),
        ("GET", ' repeatable="false"', False, False),
    ],
)
def test_request_repeatable_defaults_to_the_safe_methods(
    tmp_path: Path, method: str, attribute: str, repeatable: bool | None, safe_to_repeat: bool
) -> None:
    config = load(write(tmp_path, edit(REQUEST_10, f'    <Request method="{method}"{attribute}>/api/v2/lookup</Request>\n')))
    assert config.allowed[0] == AllowedRequest(method, "/api/v2/lookup", repeatable=repeatable)
    assert config.allowed[0].safe_to_repeat is safe_to_repeat


def test_the_objects_are_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path, BASE))
    changes = [
        (config, "workers", 3),
        (config.balancer, "api_port", 1),
        (config.instances[0], "enabled", False),
        (config.allowed[0], "path", "/"),
        (config.timeouts, "read", 1.0),
        (config.failover, "cooldown", 1.0),
        (config.health_check, "interval", 1.0),
    ]
    for obj, name, value in changes:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
    assert isinstance(config.instances, tuple) and isinstance(config.allowed, tuple)


@pytest.mark.parametrize(
    ("address", "bind"),
    [
        ("127.0.0.1", "127.0.0.1:9443"),
        ("0.0.0.0", "0.0.0.0:9443"),
        ("::1", "[::1]:9443"),
        ("::", "[::]:9443"),
        ("2001:db8::5", "[2001:db8::5]:9443"),
        ("balancer.example", "balancer.example:9443"),
    ],
)
def test_balancer_bind(tmp_path: Path, address: str, bind: str) -> None:
    config = load(write(tmp_path, attr(">127.0.0.1<", f">{address}<")))
    assert config.balancer.address == address
    assert config.balancer.bind == bind


@pytest.mark.parametrize(
    ("host", "name", "reference_name"),
    [
        ("192.0.2.10", "192.0.2.10:443", "192.0.2.10_9999.pem"),
        ("2001:db8::1", "[2001:db8::1]:443", "2001:db8::1_9999.pem"),
        ("ct-1.example", "ct-1.example:443", "ct-1.example_9999.pem"),
    ],
)
def test_instance_names(tmp_path: Path, host: str, name: str, reference_name: str) -> None:
    instance = load(write(tmp_path, edit(">192.0.2.10<", f">{host}<"))).instances[0]
    assert (instance.name, instance.base_url, instance.reference_name) == (name, f"https://{name}/", reference_name)


def test_config_path_comes_from_the_environment() -> None:
    assert config_path({"BALANCER_CONFIG": "/etc/ctbalancer/kl_balancer.conf"}) == Path(
        "/etc/ctbalancer/kl_balancer.conf"
    )
    assert config_path({"BALANCER_CONFIG": ""}) == Path("config/kl_balancer.conf")
    assert config_path({}) == Path("config/kl_balancer.conf")


def test_example_configuration_loads() -> None:
    config = load(EXAMPLE)
    assert config.balancer == BalancerSpec("127.0.0.1", 9443, 9999, 9998, 10)
    assert config.cert_dir == EXAMPLE.parent / "certs"
    assert config.instances == (
        InstanceSpec("192.0.2.10", 443, 9999, True),
        InstanceSpec("192.0.2.11", 443, 9999, False),
    )
    assert config.allowed == (
        AllowedRequest("GET", "/api/v.1.1/suppliers"),
        AllowedRequest("GET", "/api/{version}/suppliers"),
        AllowedRequest("POST", "/api/{version}/lookup", repeatable=True),
        AllowedRequest("PUT", "/api/{version}/suppliers/{supplier}/indicators", fanout=True),
        AllowedRequest("DELETE", "/api/{version}/suppliers/{supplier}/indicators", fanout=True),
    )
    assert (config.tls, config.timeouts, config.workers, config.event_delimiter) == (
        False,
        Timeouts(5.0, 60.0, 75.0, 5.0),
        2,
        "\\|",
    )
    # The example writes every default out.
    assert (config.failover, config.health_check) == (Failover(), HealthCheck())


def test_example_configuration_documents_every_root_element() -> None:
    text = EXAMPLE.read_text()
    for tag in ROOT_ELEMENTS.split(", "):
        assert f"<{tag}" in text, tag


# -- start-up commands -----------------------------------------------------------------------------------

START_COMMANDS = [
    pytest.param(["-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], id="gunicorn"),
    pytest.param(["-m", "flask", "--app", "wsgi", "routes"], id="flask-routes"),
]


def run(args: list[str], config: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    # Only the file under test: a BALANCER_WORKERS or BALANCER_LOG_LEVEL of the caller would change the outcome.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env["BALANCER_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("args", START_COMMANDS)
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(
            attr('api_port="9443"', 'api_port="0"'),
            "{path}:3: <Balancer> attribute api_port='0' is out of range; expected 1 to 65535",
            id="port-0",
        ),
        pytest.param(
            edit("</CertDirPath>", ""),
            "{path}:13: malformed XML at column 10: Opening and ending tag mismatch: CertDirPath line 4 and Config; "
            + XML_EXPECTED,
            id="malformed",
        ),
        pytest.param(
            PASSWD,
            "{path}:3: <!DOCTYPE> is not allowed (DTDs and entities are refused); expected none",
            id="external-entity",
        ),
    ],
)
def test_start_up_stops_with_one_line_on_a_bad_configuration(
    tmp_path: Path, args: list[str], content: str, reason: str
) -> None:
    path = write(tmp_path, content)
    started = time.monotonic()
    done = run(args, path)
    assert time.monotonic() - started < 20
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ctbalancer: configuration error: ")]
    assert errors == [f"ctbalancer: configuration error: {reason.format(path=path)}"]
    assert errors[0].startswith(f"ctbalancer: configuration error: {path}:")
    assert done.stderr == errors[0] + "\n"


@pytest.mark.parametrize("args", START_COMMANDS)
def test_start_up_stops_with_one_line_on_a_missing_configuration(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "missing.conf"
    done = run(args, path)
    assert done.returncode != 0
    assert done.stderr == (
        f"ctbalancer: configuration error: {path}: cannot read the configuration: No such file or directory; "
        "expected a readable kl_balancer.conf\n"
    )


def test_gunicorn_conf_loads_neither_ssl_nor_http_libraries(tmp_path: Path) -> None:
    """gunicorn.conf.py runs in the master: ssl loaded there breaks gevent's patching (docs/design.md, "Traps")."""
    path = write(tmp_path, BASE)
    code = (
        "import runpy,sys; runpy.run_path('gunicorn.conf.py'); "
        "print(sorted(m for m in ('ssl','urllib3','requests','flask','gevent') if m in sys.modules))"
    )
    assert run(["-c", code], path).stdout == "[]\n"
    # The strongest form: nothing of the app but its config loader, and no TLS or HTTP module at all.
    code = (
        "import json, runpy, sys; ns = runpy.run_path('gunicorn.conf.py'); print(json.dumps(["
        "sorted(m for m in sys.modules if m.split('.')[0] in ('ssl', '_ssl', 'urllib3', 'requests', 'flask', "
        "'werkzeug', 'gevent', 'greenlet', 'cryptography', 'filelock', 'http', 'gunicorn')), "
        "sorted(m for m in sys.modules if m.split('.')[0] == 'app'), ns['bind'], ns['workers'], "
        "'certfile' in ns]))"
    )
    done = run(["-c", code], path)
    assert json.loads(done.stdout) == [[], ["app", "app.lifecycle", "app.loader", "app.settings", "app.shared"], ["127.0.0.1:9443"], 2, False], done.stderr
