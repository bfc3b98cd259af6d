"""Outbound socket options (fwmark, user cookie, bound interface, source address).

They apply to the client's UDP socket toward the server and to the
server's TCP sockets toward its target.  Each option fails with a
`SockoptError` that names the option and says why: not available on this
platform, or not permitted (and which privilege would permit it).
"""

from __future__ import annotations

import errno
import socket
import sys

from .options import Options

# Constants Python's socket module may not export.
SO_MARK = getattr(socket, "SO_MARK", 36)  # Linux
SO_USER_COOKIE = 0x1015  # FreeBSD
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)  # Linux
IP_BOUND_IF = 25  # macOS
IPV6_BOUND_IF = 125  # macOS
IP_UNICAST_IF = 31  # Windows
IPV6_UNICAST_IF = 31  # Windows


class SockoptError(OSError):
    """An outbound option could not be applied."""


def _fail(option: str, value: object, exc: OSError, privilege: str) -> SockoptError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return SockoptError(f"option {option}={value}: not permitted ({privilege})")
    return SockoptError(f"option {option}={value}: {exc.strerror or exc}")


def _unsupported(option: str) -> SockoptError:
    return SockoptError(f"option {option} is not supported on this platform ({sys.platform})")


def apply_outbound(sock: socket.socket, options: Options, *, udp: bool) -> None:
    """Apply the outbound_* options to a fresh, unconnected socket."""
    v6 = sock.family == socket.AF_INET6
    if options.outbound_fwmark is not None:
        if not sys.platform.startswith("linux"):
            raise _unsupported("outbound_fwmark")
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, options.outbound_fwmark)
        except OSError as exc:
            raise _fail("outbound_fwmark", options.outbound_fwmark, exc,
                        "needs CAP_NET_ADMIN, e.g. run as root") from None
    if options.outbound_user_cookie is not None:
        if not sys.platform.startswith("freebsd"):
            raise _unsupported("outbound_user_cookie")
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_USER_COOKIE, options.outbound_user_cookie)
        except OSError as exc:
            raise _fail("outbound_user_cookie", options.outbound_user_cookie, exc,
                        "needs root") from None
    name = options.outbound_bind_interface
    if name is not None:
        try:
            if sys.platform.startswith("linux"):
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode() + b"\0")
            elif sys.platform == "darwin":
                index = socket.if_nametoindex(name)
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_BOUND_IF, index)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BOUND_IF, index)
            elif sys.platform == "win32":
                index = socket.if_nametoindex(name)
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_IF, index)
                else:  # IPv4 wants the index in network byte order
                    sock.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, socket.htonl(index))
            else:
                raise _unsupported("outbound_bind_interface")
        except SockoptError:
            raise
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise SockoptError(f"option outbound_bind_interface={name}: "
                                   "no such network interface") from None
            raise _fail("outbound_bind_interface", name, exc,
                        "needs CAP_NET_RAW on older Linux kernels, e.g. run as root") from None
    if options.outbound_bind_addr is not None:
        try:
            sock.bind((options.outbound_bind_addr, 0))
        except OSError as exc:
            raise _fail("outbound_bind_addr", options.outbound_bind_addr, exc,
                        "binding to that address is not allowed") from None
