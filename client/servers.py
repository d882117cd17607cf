"""Where the client connects: one server, a list of servers, or a DNS name with several records.

Several lmscope servers holding the same model are used as one: the client opens a single gRPC channel
whose target lists them all, and gRPC's own `round_robin` load balancer sends each call to the next ready
server (a server that goes away drops out of the rotation until it answers again). Nothing here balances
load by hand; this module only turns what the user wrote into a gRPC target, the channel options that go
with it, and the list of individual endpoints the client checks hold the same model.

Accepted forms (see `ServerSet.parse`):

- ``"10.0.0.5:50051"``, ``"[::1]:50051"``, ``"inspect.internal:50051"``: one address (a host name may still
  resolve to several records, and then every record is a server);
- ``["10.0.0.5:50051", "10.0.0.6:50051"]`` or the same comma-separated in one string: a fixed set. IPv4
  literals become an ``ipv4:`` target, IPv6 (or mixed) literals an ``ipv6:`` target (IPv4 addresses as
  IPv4-mapped IPv6, which a dual-stack socket reaches). Host names in a list are resolved once, here;
- ``"dns:///inspect.internal:50051"``: a name whose records gRPC resolves, and re-resolves when servers
  come and go (a Kubernetes headless service, for instance);
- any other gRPC target URI (``ipv4:``, ``ipv6:``, ``unix:``) is passed through unchanged.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Sequence

from google.protobuf import descriptor_pb2

from lmscope.proto.addresses import is_loopback_host, join_host_port
from lmscope.proto.wire import lmscope_pb2 as pb

from .errors import LmscopeError, invalid_argument

DEFAULT_PORT = 50051

_SERVICE = pb.DESCRIPTOR.services_by_name["Inspector"]
# Reads that can be sent again on any server: the RPCs the proto marks `idempotency_level = NO_SIDE_EFFECTS`.
# Runs are not among them; batch runs get their own retry (`dispatch.py`), which also covers failures
# mid-stream, which a channel retry policy cannot (gRPC retries a call only before its first response).
RETRIED_METHODS = tuple(method.name for method in _SERVICE.methods
                        if method.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS)


def service_config() -> str:
    """round_robin over every resolved address, and transparent retry of idempotent reads on UNAVAILABLE."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": _SERVICE.full_name, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    })


def split_host_port(address: str) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'host' -> (host, port); IPv6 brackets removed."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, port = address.split(":")
    elif address.count(":") > 1:
        raise invalid_argument(f"IPv6 address {address!r} needs brackets: '[{address}]:{DEFAULT_PORT}'")
    else:
        host, port = address, ""
    if not host:
        raise invalid_argument(f"no host in server address {address!r}")
    try:
        return host, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise invalid_argument(f"bad port in server address {address!r}") from None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[str]:
    """Every address a host name resolves to (TCP), as 'ip:port', in resolver order without repeats."""
    try:
        records = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise invalid_argument(f"cannot resolve server host {host!r}: {exc.strerror}") from None
    seen: list[str] = []
    for _, _, _, _, sockaddr in records:
        address = join_host_port(sockaddr[0], port)
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True)
class ServerSet:
    """A gRPC channel target plus the individual servers behind it.

    target: what the channel connects to (round_robin over everything it resolves to).
    endpoints: one 'host:port' per server, each reachable on its own (for the same-model check).
    authority: the host name TLS certificates are checked against when the target is a list of IPs made
        from host names (None: gRPC's default).
    """
    target: str
    endpoints: tuple[str, ...]
    authority: str | None = None

    @property
    def local(self) -> bool:
        """Every server is on this host: a Unix socket, or loopback addresses and names only."""
        if self.target.startswith(("unix:", "unix-abstract:")):
            return True
        for endpoint in self.endpoints:
            try:
                host, _ = split_host_port(endpoint)
            except LmscopeError:  # a URI's endpoint (dns:///...): not known to be here
                return False
            if not is_loopback_host(host):
                return False
        return True

    @classmethod
    def parse(cls, address: str | Sequence[str]) -> "ServerSet":
        if isinstance(address, str):
            if "://" in address or address.split(":", 1)[0] in ("dns", "ipv4", "ipv6", "unix", "unix-abstract"):
                return cls._from_uri(address)
            parts = [a for a in address.split(",") if a.strip()]
            if len(parts) == 1:
                host, port = split_host_port(parts[0])
                return cls(target=join_host_port(host, port), endpoints=(join_host_port(host, port),))
            address = parts
        addresses = list(address)
        if not addresses:
            raise invalid_argument("no server address given")
        if len(addresses) == 1:
            return cls.parse(addresses[0])
        return cls._from_list(addresses)

    @classmethod
    def _from_list(cls, addresses: list[str]) -> "ServerSet":
        endpoints: list[str] = []
        records: list[tuple[str, int]] = []
        names = set()
        for address in addresses:
            host, port = split_host_port(address)
            endpoints.append(join_host_port(host, port))
            if _ip(host):
                records.append((host, port))
            else:
                # Every record of the name: 'localhost' is both 127.0.0.1 and ::1, and the server may listen
                # on only one of them; round_robin leaves out the records nobody answers on.
                names.add(host)
                records += [split_host_port(a) for a in resolve(host, port)]
        records = list(dict.fromkeys(records))
        if all(isinstance(_ip(h), ipaddress.IPv4Address) for h, _ in records):
            target = "ipv4:" + ",".join(join_host_port(h, p) for h, p in records)
        else:
            target = "ipv6:" + ",".join(join_host_port(_as_ipv6(h), p) for h, p in records)
        return cls(target=target, endpoints=tuple(dict.fromkeys(endpoints)),
                   authority=names.pop() if len(names) == 1 else None)

    @classmethod
    def _from_uri(cls, uri: str) -> "ServerSet":
        scheme, _, rest = uri.partition(":")
        if scheme == "dns":
            # dns:[//authority/]host[:port]
            name = rest.removeprefix("//").split("/", 1)[-1] if rest.startswith("//") else rest
            host, port = split_host_port(name)
            return cls(target=uri, endpoints=tuple(_resolve_or_keep(host, port)))
        if scheme in ("ipv4", "ipv6"):
            return cls(target=uri, endpoints=tuple(a for a in rest.split(",") if a))
        return cls(target=uri, endpoints=(uri,))


def _resolve_or_keep(host: str, port: int) -> list[str]:
    """The records of a name; the name itself when it does not resolve now (the channel retries later)."""
    try:
        return resolve(host, port)
    except ValueError:
        return [join_host_port(host, port)]


def _as_ipv6(host: str) -> str:
    ip = _ip(host)
    return f"::ffff:{ip}" if isinstance(ip, ipaddress.IPv4Address) else host
