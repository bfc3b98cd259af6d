"""Host/port parsing and resolution for the command line and SIP003 variables."""

from __future__ import annotations

import socket
from typing import List, Tuple

Address = Tuple[str, int]


class AddressError(ValueError):
    """An address we cannot parse or resolve."""


def parse_port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise AddressError(f"{what}={text!r}: expected a port number from 1 to 65535")
    return int(text)


def split_host_port(text: str, what: str) -> Tuple[str, int]:
    """'host:port', '[v6]:port' or 'v4:port' -> (host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError(f"{what}={text!r}: expected [IPv6]:port")
        return host, parse_port(rest[1:], what)
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise AddressError(f"{what}={text!r}: expected host:port (IPv6 as [addr]:port)")
    return host, parse_port(port, what)


def resolve(host: str, port: int, kind: int, what: str, *, passive: bool = False) -> List[Address]:
    """Resolve to numeric (host, port) pairs, IPv4 and IPv6, duplicates dropped."""
    try:
        infos = socket.getaddrinfo(host or None, port, 0, kind, 0,
                                   socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as exc:
        raise AddressError(f"{what}: cannot resolve {host!r}: {exc.strerror}") from None
    found: List[Address] = []
    for _family, _kind, _proto, _name, sockaddr in infos:
        addr = (str(sockaddr[0]), int(sockaddr[1]))
        if addr not in found:
            found.append(addr)
    return found


def host_list(text: str) -> List[str]:
    """SS_REMOTE_HOST may list hosts joined with '|'; empty items are ignored."""
    return [h.strip() for h in text.split("|") if h.strip()]
