"""The gkcp session protocol: wire constants and rules, sans-I/O.

Theory of operation (docs/PROTOCOL.md is the normative text)
-------------------------------------------------------------
One KCP conversation (message mode) carries one TCP connection.  On the
wire there are two kinds of datagram, told apart by the byte at offset 4:

* KCP datagrams (cmd 81..84, at least 24 bytes), handed to `gkcp.kcp.KCP`;
* control datagrams (cmd 1..3, exactly 20 bytes): RST, PING and PONG.

Inside a conversation the client's first message is OPEN (64 bytes:
b"GKCP", the version, the client's instance id, zero padding) and the
server's first message is ACCEPT (9 bytes: b"GKCP", the version, the
server's instance id).  Then every non-empty message is stream data and an
empty message is FIN: no more data in that direction.

This module holds what both roles and any I/O layer share: encoding and
decoding of control datagrams, the rule that decides whether an unknown
conversation may create server state, and `Timeouts`.  It never imports
gevent or socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional

from .kcp import CMD_ACK, CMD_PUSH, CMD_WASK, CMD_WINS, MASK, OVERHEAD

VERSION = 1
MAGIC = b"GKCP"
GREETING = MAGIC + bytes([VERSION])
OPEN_LEN = 64
ACCEPT_LEN = 9
FIN_MESSAGE = b""


def open_message(instance: int) -> bytes:
    """The client's first message: magic, version, its instance id, zero padding."""
    head = GREETING + (instance & MASK).to_bytes(4, "little")
    return head + bytes(OPEN_LEN - len(head))


def accept_message(instance: int) -> bytes:
    """The server's first message: magic, version, its instance id."""
    return GREETING + (instance & MASK).to_bytes(4, "little")


def parse_greeting(message: bytes, length: int) -> Optional[int]:
    """The instance id in an OPEN (length 64) or ACCEPT (9) message, or None."""
    if len(message) != length or not message.startswith(GREETING):
        return None
    if any(message[ACCEPT_LEN:]):
        return None
    return int.from_bytes(message[5:9], "little")

CONTROL_LEN = 20
_CONTROL = struct.Struct("<IBBHIII")
_KCP_HEAD = struct.Struct("<IBBHIIII")

#: a window in which an echoed timestamp is plausible (ms)
ECHO_WINDOW_MS = 120_000


class Control(enum.IntEnum):
    RST = 1
    PING = 2
    PONG = 3


class Reason(enum.IntEnum):
    """Why a conversation was reset (carried in RST's last field)."""

    UNKNOWN_CONV = 1  # no such conversation here (e.g. after a restart)
    REFUSED = 2  # the server could not connect to its target
    ABORTED = 3  # a TCP side was reset, or the endpoint gave up on it
    TIMEOUT = 4  # stall or idle timeout
    SHUTDOWN = 5  # the endpoint is stopping


FLAG_ECHO = 1  # RST: the echo field holds a timestamp of the receiver's clock


class ControlDatagram(NamedTuple):
    conv: int
    cmd: Control
    flags: int
    ts: int
    echo: int
    extra: int  # PING/PONG: sender's instance id; RST: Reason


class Kind(enum.Enum):
    KCP = "kcp"
    CONTROL = "control"
    INVALID = "invalid"


def classify(datagram: bytes) -> Kind:
    """Tell a KCP datagram from a control datagram from garbage (cheap)."""
    size = len(datagram)
    if size >= OVERHEAD and CMD_PUSH <= datagram[4] <= CMD_WINS:
        return Kind.KCP
    if size == CONTROL_LEN and 1 <= datagram[4] <= 3 and datagram[6] == 0 == datagram[7]:
        return Kind.CONTROL
    return Kind.INVALID


def encode_control(conv: int, cmd: Control, ts: int, echo: int = 0,
                   extra: int = 0, flags: int = 0) -> bytes:
    return _CONTROL.pack(conv & MASK, cmd, flags, 0, ts & MASK, echo & MASK, extra & MASK)


def decode_control(datagram: bytes) -> Optional[ControlDatagram]:
    if classify(datagram) is not Kind.CONTROL:
        return None
    conv, cmd, flags, _, ts, echo, extra = _CONTROL.unpack(datagram)
    return ControlDatagram(conv, Control(cmd), flags, ts, echo, extra)


def conv_of(datagram: bytes) -> int:
    return int.from_bytes(datagram[:4], "little")


def is_opener(datagram: bytes) -> bool:
    """May this KCP datagram for an unknown conversation create server state?

    Only what a real client sends first: its first segment is a PUSH with
    sn 0, una 0, frg 0 carrying exactly the OPEN message.
    """
    if len(datagram) < OVERHEAD + OPEN_LEN:
        return False
    conv, cmd, frg, _wnd, _ts, sn, una, length = _KCP_HEAD.unpack_from(datagram)
    return (conv != 0 and cmd == CMD_PUSH and frg == 0 and sn == 0 and una == 0
            and length == OPEN_LEN
            and parse_greeting(datagram[OVERHEAD:OVERHEAD + OPEN_LEN], OPEN_LEN) is not None)


def push_ts(datagram: bytes) -> Optional[int]:
    """The sender's clock from the first PUSH segment of a KCP datagram, if any."""
    offset = 0
    size = len(datagram)
    while size - offset >= OVERHEAD:
        _conv, cmd, _frg, _wnd, ts, _sn, _una, length = _KCP_HEAD.unpack_from(datagram, offset)
        if cmd == CMD_PUSH:
            return ts
        if cmd not in (CMD_ACK, CMD_WASK, CMD_WINS):
            return None
        offset += OVERHEAD + length
    return None


def may_be_first_flight(datagram: bytes, window: int) -> bool:
    """A PUSH-only datagram with una 0 and small sn: maybe a reordered opening.

    Such a datagram for an unknown conversation is dropped silently rather
    than answered with RST, so reordering cannot kill a connection that is
    just being opened.
    """
    offset = 0
    size = len(datagram)
    while size - offset >= OVERHEAD:
        _conv, cmd, _frg, _wnd, _ts, sn, una, length = _KCP_HEAD.unpack_from(datagram, offset)
        if cmd != CMD_PUSH or una != 0 or sn >= window:
            return False
        offset += OVERHEAD + length
    return True


def echo_plausible(now_ms: int, echo: int) -> bool:
    """Is `echo` a value our own clock had in the last ECHO_WINDOW_MS?"""
    age = (now_ms - echo) & MASK
    return age <= ECHO_WINDOW_MS


@dataclass(frozen=True)
class Timeouts:
    """Session-protocol timers, in seconds (0 disables the idle timeout)."""

    keepalive_s: float = 10.0  # client PINGs each server this often while it has sessions
    dead_s: float = 30.0  # a peer silent this long: all its sessions are aborted
    stall_s: float = 30.0  # data in flight and nothing acknowledged this long: abort
    idle_s: float = 7200.0  # no payload either way this long: abort (0 = never)
    linger_s: float = 3.0  # after a clean close, keep acking retransmissions this long
    connect_s: float = 10.0  # server: connecting to the target may take this long


@dataclass(frozen=True)
class Limits:
    """Caps on server state; beyond them, openers are dropped silently."""

    sessions: int = 4096  # in total, per endpoint
    per_peer: int = 1024  # per source address (ip, port)
    half_open: int = 256  # sessions whose peer has not yet proved its address
    pending_bytes: int = 262144  # output held for an unproven peer
