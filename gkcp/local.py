"""The local (client) endpoint: TCP in, KCP out to the server.

Each accepted TCP connection opens a conversation at once: a fresh random
conv, the OPEN message queued first, then whatever the application sends.
No round trip is spent before data flows, and a server that speaks first
(SSH, SMTP) is reached even if the client never writes.

One connected UDP socket per server address carries all conversations to
it; with several server addresses, new connections take them in turn.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import partial
from typing import List, Optional, Sequence, Tuple

import gevent
from gevent.server import StreamServer

from .conversation import Conversation
from .endpoint import Address, Endpoint, Peer, UdpTransport, elapsed_ms, now_ms, udp_socket
from .options import Options
from .protocol import ACCEPT_LEN, Limits, Reason, open_message, parse_greeting, push_ts
from .sockopts import apply_outbound

log = logging.getLogger(__name__)

HELLO_BACKOFF_S = (0.2, 0.4, 0.8, 1.6, 3.2)


class _Handle(gevent.Greenlet):
    """endpoint._handle(sock, addr), without gevent's per-greenlet __dict__ for `run`."""

    def _run(self, endpoint: "LocalEndpoint", sock: socket.socket,
             addr: Address) -> None:
        endpoint._handle(sock, addr)


class LocalEndpoint(Endpoint):
    """Listens on TCP, carries each connection to a gkcp server over KCP."""

    role = "local"

    def __init__(self, options: Options, listen: Sequence[Address],
                 remotes: Sequence[Address], limits: Optional[Limits] = None) -> None:
        super().__init__(options, limits)
        self.listen_addrs = list(listen)
        self.remote_addrs = list(remotes)
        self.servers: List[StreamServer] = []
        self._next_remote = 0

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Open the UDP sockets and the TCP listener(s); return at once."""
        for remote in self.remote_addrs:
            family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
            sock = udp_socket(family)
            apply_outbound(sock, self.options, udp=True)
            sock.connect(remote)
            peer_addr = tuple(sock.getpeername())
            transport = UdpTransport(self, sock, remote=peer_addr)
            self.add_transport(transport)
            peer = Peer(self, transport, peer_addr, validated=True, now=now_ms())
            self.peers[peer.addr] = peer
        for addr in self.listen_addrs:
            server = StreamServer(addr, self._handle, spawn=self._spawn_handler)
            server.start()
            self.servers.append(server)
        self.start_common()

    @property
    def bound_addresses(self) -> List[Tuple]:
        return [s.address for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop(timeout=0)
        super().stop()

    # -- connections -----------------------------------------------------------------
    def _spawn_handler(self, _wrapper: object, _handle: object, _close: object,
                       args: Tuple[socket.socket, Address]) -> gevent.Greenlet:
        """StreamServer's spawn: run `_handle(sock, addr)` itself, not gevent's
        close-when-done wrapper, whose f(*args) call costs each parked
        connection another interpreter C frame (~370 B of saved stack).
        `_handle` closes the socket itself."""
        glet = _Handle(None, self, *args)
        self.group.start(glet)
        return glet

    def _pick_peer(self) -> Peer:
        peers = list(self.peers.values())
        peer = peers[self._next_remote % len(peers)]
        self._next_remote += 1
        return peer

    def _fresh_conv(self, peer: Peer) -> int:
        while True:
            conv = int.from_bytes(os.urandom(4), "little")
            if conv and conv not in peer.conversations:
                return conv

    def _handle(self, sock: socket.socket, addr: Address) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return
        peer = self._pick_peer()
        first = not peer.conversations
        if first:
            peer.last_recv_ms = now_ms()  # silence is counted from now
        conv = Conversation(self, peer, self._fresh_conv(peer), now_ms())
        self.register(peer, conv)
        conv.kcp.send(open_message(self.instance))
        conv.greeting = partial(self._accepted, conv)  # (a lambda: 2 cells kept by this frame)
        self.mark_dirty(conv)
        if first:  # after the opener: the server answers PINGs only from known peers
            self.group.spawn(self._hello, peer, now_ms())
        log.debug("%s -> %r opened", addr, conv)
        conv.run(sock)

    # -- the server's datagrams ----------------------------------------------------
    def on_unknown(self, transport: UdpTransport, data: bytes, addr: Address,
                   peer: Optional[Peer], now: int) -> None:
        """KCP for a conversation we closed: reset it, if it carries data."""
        ts = push_ts(data)
        if ts is not None:
            conv = int.from_bytes(data[:4], "little")
            self.send_rst_to(transport, addr, conv, Reason.UNKNOWN_CONV, ts)

    def forget_peer(self, peer: Peer) -> None:
        """A client keeps its server peers (and sockets) for the next connection."""

    def _accepted(self, conv: Conversation, message: bytes) -> bool:
        """The server's ACCEPT: remember which server instance owns `conv`."""
        instance = parse_greeting(message, ACCEPT_LEN)
        if instance is None:
            log.warning("%r: the server's first message is not ACCEPT", conv)
            return False
        conv.peer_instance = instance
        self.note_instance(conv.peer, instance)
        return True

    def _hello(self, peer: Peer, opened: int) -> None:
        """PING a server we start talking to until it answers with a PONG.

        A server answers with a PONG only once it has validated our address
        (before that, with a challenge we answer): this is what gets us
        validated even when challenges or our answers are lost and we have
        nothing else to send.
        """
        for delay_s in HELLO_BACKOFF_S:
            if not peer.conversations:
                return
            now = now_ms()
            if peer.last_pong_ms is not None and \
                    elapsed_ms(now, peer.last_pong_ms) <= elapsed_ms(now, opened):
                return  # a PONG since we opened: the server knows our address
            peer.last_ping_ms = now
            self.challenge(peer, 0, now)
            gevent.sleep(delay_s)

    def keepalive(self, peer: Peer, now: int) -> None:
        if peer.conversations and \
                elapsed_ms(now, peer.last_ping_ms) >= int(self.timeouts.keepalive_s * 1000):
            peer.last_ping_ms = now
            self.challenge(peer, 0, now)
