"""Helpers for the security tests (test_security.py).

Importing this module imports `tunnel_helpers` first, so gevent patches the
standard library before anything here creates a socket.

What is here
------------
* Hand-made datagrams: `segment` (one KCP segment), `opener` (what a real
  client sends first), `control` (RST / PING / PONG).
* `RawPeer`: a UDP socket on loopback that talks to an endpoint by hand and
  counts the bytes it sends and receives *on the wire*; `RawKcpClient` drives
  one KCP conversation through it (a real KCP engine) and answers the
  server's address challenge only when told to.
* `UdpRelay`: a UDP hop between a LocalEndpoint and a ServerEndpoint that
  records every datagram as it travels on the wire (sealed, in
  authenticated mode) and can inject datagrams from either side's address.
* `Recorder`: a wrapper of `UdpTransport.send` keeping samples of the plain
  datagrams both endpoints send (seed material for the fuzzers).
* `HubErrors`: every exception that killed a greenlet during a test.
* `FLOODER`: the script of the flood subprocess.
* Resource probes: `greenlets`, `fd_count`, `rss_bytes`.

Everything that starts a greenlet or opens a socket has a `close()`; the
fixtures in test_security.py call it at teardown, also after a failure.
"""

import tunnel_helpers  # noqa: F401,I001  (first: gevent patches the stdlib on import)

import gc  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
from collections import defaultdict, deque  # noqa: E402
from typing import Callable, Deque, Dict, List, Optional, Tuple  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
import psutil  # noqa: E402
from gevent.event import Event  # noqa: E402

from gkcp.crypto import Sealer  # noqa: E402
from gkcp.endpoint import now_ms  # noqa: E402
from gkcp.kcp import CMD_PUSH, KCP  # noqa: E402
from gkcp.protocol import (  # noqa: E402
    Control,
    Kind,
    classify,
    decode_control,
    encode_control,
    open_message,
)

Address = Tuple[str, int]
SEGMENT = struct.Struct("<IBBHIIII")  # a KCP segment header (docs/PROTOCOL.md 1.1)
MAX_UDP = 65507  # the largest UDP payload over IPv4


# -- hand-made datagrams ------------------------------------------------------------

def segment(conv: int, cmd: int = CMD_PUSH, *, sn: int = 0, una: int = 0, frg: int = 0,
            wnd: int = 128, ts: int = 0, data: bytes = b"") -> bytes:
    """One KCP segment: the 24-byte header and `data`."""
    return SEGMENT.pack(conv, cmd, frg, wnd, ts, sn, una, len(data)) + data


def opener(conv: int, instance: int = 0x12345678, ts: int = 0) -> bytes:
    """What a client sends first: a PUSH sn 0 carrying OPEN (88 bytes)."""
    return segment(conv, sn=0, una=0, frg=0, ts=ts, data=open_message(instance))


def control(conv: int, cmd: Control, *, ts: int = 0, echo: int = 0, extra: int = 0,
            flags: int = 0) -> bytes:
    return encode_control(conv, cmd, ts, echo, extra, flags)


def flip_bit(datagram: bytes, bit: int) -> bytes:
    out = bytearray(datagram)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


# -- a peer by hand -------------------------------------------------------------------

class RawPeer:
    """A UDP socket on loopback that sends hand-made datagrams to `remote`.

    Counts wire bytes both ways (`sent_bytes`, `received_bytes`: what crosses
    the socket, sealed or not) and keeps what arrives in `inbox` (opened
    with `sealer` if one is given; what fails to open is counted and
    dropped).
    """

    def __init__(self, remote: Address, sealer: Optional[Sealer] = None,
                 host: str = "127.0.0.1") -> None:
        self.remote = remote
        self.sealer = sealer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sent_bytes = self.sent_datagrams = 0
        self.received_bytes = self.received_datagrams = 0
        self.unopened = 0
        self.inbox: Deque[bytes] = deque()
        self.arrived = Event()
        self._reader = gevent.spawn(self._read)

    @property
    def address(self) -> Address:
        return self.sock.getsockname()[:2]

    def send(self, datagram: bytes, to: Optional[Address] = None) -> None:
        if self.sealer is not None:
            datagram = self.sealer.seal(datagram)
        self.send_raw(datagram, to)

    def send_raw(self, datagram: bytes, to: Optional[Address] = None) -> None:
        """Send `datagram` exactly as given (no sealing)."""
        self.sock.sendto(datagram, to or self.remote)
        self.sent_bytes += len(datagram)
        self.sent_datagrams += 1

    def _read(self) -> None:
        while True:
            data, _addr = self.sock.recvfrom(65536)
            self.received_bytes += len(data)
            self.received_datagrams += 1
            if self.sealer is not None:
                opened = self.sealer.open(data)
                if opened is None:
                    self.unopened += 1
                    continue
                data = opened
            self.inbox.append(data)
            self.arrived.set()

    def take(self) -> List[bytes]:
        out = list(self.inbox)
        self.inbox.clear()
        self.arrived.clear()
        return out

    def close(self) -> None:
        self._reader.kill(block=True, timeout=2)
        self.sock.close()


class RawKcpClient:
    """One conversation driven by hand: a real KCP engine, an OPEN, no answers.

    `pump()` feeds what arrived to the KCP (control datagrams are kept in
    `controls`, never answered unless `answer_challenges` is called) and
    advances its clock, which sends ACKs and retransmissions.
    """

    def __init__(self, peer: RawPeer, options, conv: Optional[int] = None,
                 instance: int = 0x0BADCAFE) -> None:
        self.peer = peer
        self.conv = conv or (int.from_bytes(os.urandom(4), "little") | 1)
        self.instance = instance
        kcp = KCP(self.conv, peer.send)
        kcp.nodelay(options.nodelay, options.interval, options.resend, int(options.nc))
        kcp.wndsize(options.sndwnd, options.rcvwnd)
        kcp.setmtu(options.mtu)
        kcp.update(now_ms())
        self.kcp = kcp
        self.controls: List = []
        self.messages: List[bytes] = []

    def open(self) -> None:
        self.kcp.send(open_message(self.instance))
        self.kcp.flush()

    def pump(self) -> None:
        kcp = self.kcp
        for datagram in self.peer.take():
            kind = classify(datagram)
            if kind is Kind.KCP:
                kcp.input(datagram)
            elif kind is Kind.CONTROL:
                self.controls.append(decode_control(datagram))
        kcp.update(now_ms())
        while True:
            msg = kcp.recv()
            if msg is None:
                break
            self.messages.append(msg)

    def challenges(self) -> List:
        return [c for c in self.controls if c.cmd is Control.PING]

    def answer_challenges(self) -> None:
        for challenge in self.challenges():
            self.peer.send(control(challenge.conv, Control.PONG, ts=now_ms(),
                                   echo=challenge.ts, extra=self.instance))


# -- a relay on the wire ---------------------------------------------------------------

class UdpRelay:
    """client <-> relay <-> server, recording every datagram in each direction.

    The LocalEndpoint is pointed at `address`; the relay forwards to
    `server` from its own socket, so the server sees the relay's
    `server_side` address as the client's.  `upstream` / `downstream` hold
    the datagrams as they crossed the wire (bounded: the first `keep` and
    the latest `keep`).
    """

    def __init__(self, server: Address, keep: int = 64) -> None:
        self.server = server
        self.client_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client_side.bind(("127.0.0.1", 0))
        self.server_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server_side.bind(("127.0.0.1", 0))
        self.server_side.connect(server)
        self.client: Optional[Address] = None
        self.keep = keep
        self.upstream_first: List[bytes] = []
        self.upstream_last: Deque[bytes] = deque(maxlen=keep)
        self.downstream_first: List[bytes] = []
        self.downstream_last: Deque[bytes] = deque(maxlen=keep)
        self._greenlets = [gevent.spawn(self._up), gevent.spawn(self._down)]

    @property
    def address(self) -> Address:
        return self.client_side.getsockname()[:2]

    def _up(self) -> None:
        while True:
            data, addr = self.client_side.recvfrom(65536)
            self.client = addr
            try:
                self.server_side.send(data)
            except OSError:
                continue
            if len(self.upstream_first) < self.keep:
                self.upstream_first.append(data)
            self.upstream_last.append(data)

    def _down(self) -> None:
        while True:
            try:
                data = self.server_side.recv(65536)
            except ConnectionRefusedError:  # the server is gone for a moment
                continue
            if self.client is None:
                continue
            self.client_side.sendto(data, self.client)
            if len(self.downstream_first) < self.keep:
                self.downstream_first.append(data)
            self.downstream_last.append(data)

    def to_server(self, datagram: bytes) -> None:
        """Inject a datagram the server sees as coming from the client."""
        self.server_side.send(datagram)

    def to_client(self, datagram: bytes) -> None:
        """Inject a datagram the client sees as coming from the server."""
        assert self.client is not None
        self.client_side.sendto(datagram, self.client)

    def close(self) -> None:
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.client_side.close()
        self.server_side.close()


# -- samples of real traffic ---------------------------------------------------------

class Recorder:
    """Wraps `UdpTransport.send`; keeps up to `per_kind` plain datagrams of each kind.

    Kinds: (role, first byte-4 command), e.g. ("local", 81) for a client's
    PUSH datagrams, ("server", 2) for the server's PINGs.
    """

    def __init__(self, original: Callable, per_kind: int = 40) -> None:
        self.original = original
        self.per_kind = per_kind
        self.samples: Dict[Tuple[str, int], List[bytes]] = defaultdict(list)

    def send(self, transport, datagram: bytes, addr) -> None:
        if len(datagram) > 4:
            bucket = self.samples[(transport.endpoint.role, datagram[4])]
            if len(bucket) < self.per_kind:
                bucket.append(bytes(datagram))
        self.original(transport, datagram, addr)

    def corpus(self) -> List[bytes]:
        return [d for bucket in self.samples.values() for d in bucket]


# -- greenlets that died -------------------------------------------------------------

class HubErrors:
    """Records every exception that ends a greenlet (the hub reports it) while installed."""

    def __init__(self) -> None:
        self.hub = gevent.get_hub()
        self.errors: List[Tuple[object, type, BaseException]] = []
        self._original = self.hub.handle_error

    def install(self) -> "HubErrors":
        self.hub.handle_error = self._handle
        return self

    def _handle(self, context, type_, value, tb) -> None:
        if type_ is not None and not issubclass(type_, greenlet.GreenletExit):
            self.errors.append((context, type_, value))
        self._original(context, type_, value, tb)

    def describe(self) -> str:
        return "; ".join(f"{type_.__name__}: {value} in {context!r}"
                         for context, type_, value in self.errors)

    def uninstall(self) -> None:
        if self.hub.__dict__.get("handle_error") == self._handle:
            del self.hub.handle_error


# -- resources -------------------------------------------------------------------------

def greenlets() -> List[greenlet.greenlet]:
    """The greenlet objects alive in this process (after a full collection).

    Only this thread's, less its main greenlet: gevent's resolver thread pool
    (workers in threads of their own) grows on demand up to its maximum size
    and stays, which is gevent's business, not a leak.
    """
    def root(g: greenlet.greenlet) -> greenlet.greenlet:
        while g.parent is not None:
            g = g.parent
        return g

    gc.collect()
    main = root(greenlet.getcurrent())  # this thread's; the pool's threads have their own
    return [obj for obj in gc.get_objects()
            if isinstance(obj, greenlet.greenlet) and obj.parent is not None
            and root(obj) is main]


def describe_greenlet(g: greenlet.greenlet) -> str:
    frame = g.gr_frame
    where = f"{frame.f_code.co_name} at {frame.f_code.co_filename}:{frame.f_lineno}" \
        if frame is not None else "no frame"
    return f"{g!r}: {where}"


def fd_count() -> int:
    return psutil.Process().num_fds()


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


# -- the flood subprocess ----------------------------------------------------------------

#: argv: host port count rate_per_s sockets seed garbage_every instances
#: Sends `count` datagrams from `sockets` UDP sockets, round robin, paced at
#: `rate_per_s`: forged openers (valid OPEN, random conv and ts), and every
#: `garbage_every`-th one random garbage of 1..1400 bytes.  `instances`:
#: "per-source" (each socket's openers name one instance id, as one client
#: would) or "per-opener" (a new instance id in every opener).  A full socket
#: buffer drops the datagram (counted).  Prints "sent N dropped M".
FLOODER = r'''
import random, socket, struct, sys, time
host, port = sys.argv[1], int(sys.argv[2])
count, rate, nsocks, seed, garbage_every = (int(a) for a in sys.argv[3:8])
per_opener = sys.argv[8] == "per-opener"
rng = random.Random(seed)
socks = []
for _ in range(nsocks):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    socks.append(s)
instances = [rng.getrandbits(32) | 1 for _ in range(nsocks)]
head = struct.Struct("<IBBHIIII")
dest = (host, port)
sent = dropped = 0
start = time.monotonic()
print("started", flush=True)
for i in range(count):
    if garbage_every and i % garbage_every == garbage_every - 1:
        datagram = rng.randbytes(rng.randint(1, 1400))
    else:
        conv = rng.getrandbits(32) | 1
        instance = rng.getrandbits(32) | 1 if per_opener else instances[i % nsocks]
        open_msg = b"GKCP\x01" + instance.to_bytes(4, "little") + bytes(55)
        datagram = head.pack(conv, 81, 0, 1024, rng.getrandbits(32), 0, 0, 64) + open_msg
    try:
        socks[i % nsocks].sendto(datagram, dest)
        sent += 1
    except OSError:
        dropped += 1
    if i % 500 == 499:
        ahead = (i + 1) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
print(f"sent {sent} dropped {dropped} in {time.monotonic() - start:.2f}s", flush=True)
'''
