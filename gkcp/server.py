"""The server endpoint: KCP in on UDP, one TCP connection to the target each.

Admission: a datagram for an unknown (address, conv) creates state only if
it is a real opener (`protocol.is_opener`) and the limits allow it; else
it is dropped, or answered with one RST when it carries data that cannot
be a reordered opening (a conversation from before a restart).

A new address must prove it can receive: the server sends it a PING
challenge and, until the echo comes back, sends it no more bytes than it
received from it (the rest is held, bounded).  That keeps a forged source
address from turning the server into an amplifier.
"""

from __future__ import annotations

import logging
import socket
from typing import List, Optional, Sequence, Tuple

from gevent import Greenlet
from gevent import socket as gsocket

from .conversation import Conversation
from .endpoint import Address, Endpoint, Peer, UdpTransport, udp_socket
from .kcp import OVERHEAD
from .options import Options
from .protocol import (
    OPEN_LEN,
    ControlDatagram,
    Limits,
    Reason,
    accept_message,
    is_opener,
    may_be_first_flight,
    parse_greeting,
    push_ts,
)
from .sockopts import apply_outbound

log = logging.getLogger(__name__)



class _Serve(Greenlet):
    """endpoint._serve(conv), without gevent's per-greenlet __dict__ for `run`."""

    def _run(self, endpoint: "ServerEndpoint", conv: Conversation) -> None:
        endpoint._serve(conv)


class ServerEndpoint(Endpoint):
    """Listens for KCP on UDP, forwards each conversation to a TCP target."""

    role = "server"

    def __init__(self, options: Options, listen: Sequence[Address], target: Address,
                 limits: Optional[Limits] = None) -> None:
        super().__init__(options, limits)
        self.listen_addrs = list(listen)
        self.target = target
        self._target_infos: Optional[List[Tuple]] = None

    def start(self) -> None:
        """Bind the UDP socket(s); raises OSError (e.g. EADDRINUSE) at once."""
        socks = []
        try:
            for addr in self.listen_addrs:
                family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
                sock = udp_socket(family)
                socks.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        for sock in socks:
            self.add_transport(UdpTransport(self, sock))
        self.start_common()

    @property
    def bound_addresses(self) -> List[Tuple]:
        return [t.sock.getsockname() for t in self.transports]

    # -- admission -------------------------------------------------------------
    def on_unknown(self, transport: UdpTransport, data: bytes, addr: Address,
                   peer: Optional[Peer], now: int) -> None:
        if is_opener(data):
            self._admit(transport, data, addr, peer, now)
            return
        ts = push_ts(data)
        if ts is None or may_be_first_flight(data, self.options.sndwnd):
            return
        self.send_rst_to(transport, addr, int.from_bytes(data[:4], "little"),
                         Reason.UNKNOWN_CONV, ts)

    def _admit(self, transport: UdpTransport, data: bytes, addr: Address,
               peer: Optional[Peer], now: int) -> None:
        instance = parse_greeting(data[OVERHEAD:OVERHEAD + OPEN_LEN], OPEN_LEN)
        unproven = peer is None or not peer.validated
        if (unproven and self.n_unproven >= self.limits.half_open) \
                or (peer is not None and unproven and peer.instance is not None
                    and instance != peer.instance) \
                or not self._room_for(peer):
            # (an unproven address may not claim a restart: that would let
            # forged openers free their own slots)
            self.stats.refused += 1
            return
        if peer is None:
            peer = Peer(self, transport, addr, validated=False, now=now)
            self.peers[addr] = peer
        if not peer.validated:
            peer.received(len(data))
        conv = Conversation(self, peer, int.from_bytes(data[:4], "little"), now)
        self.register(peer, conv)
        kcp = conv.kcp
        kcp.current = now
        kcp.input(data)
        conv.latest_peer_ts = push_ts(data)
        kcp.recv()  # the OPEN message, checked by is_opener
        conv.peer_instance = instance
        self.note_instance(peer, instance or 0)
        self.mark_dirty(conv)
        if not peer.validated:
            self.unvalidated(peer, conv.conv, now)
        self.group.start(_Serve(None, self, conv))

    def answer_ping(self, peer: Peer, message: ControlDatagram, now: int) -> None:
        """A PING from an unproven address is answered with a challenge instead."""
        if peer.validated:
            super().answer_ping(peer, message, now)
        else:
            peer.challenge_ms = None
            self.unvalidated(peer, message.conv, now)

    def unvalidated(self, peer: Peer, conv: int, now: int) -> None:
        """(Re)send the address challenge (at most every CHALLENGE_EVERY_MS).

        Challenges or their answers get lost like any datagram; the peer's
        own retransmissions bring us here again and pay for the next one.
        """
        self.challenge(peer, conv, now)

    def _room_for(self, peer: Optional[Peer]) -> bool:
        """Is there room for one more conversation (from `peer`)?

        Lingering conversations (closed cleanly, still acknowledging) hold a
        slot only until it is needed: then the oldest one makes room.
        """
        limits = self.limits
        total = self.n_conversations
        mine = len(peer.conversations) if peer is not None else 0
        while total >= limits.sessions or mine >= limits.per_peer:
            if total >= limits.sessions:
                victim = next(iter(self.lingering), None)
            else:
                victim = next((c for c in self.lingering if c.peer is peer), None)
            if victim is None:
                return False
            self.release(victim)
            total -= 1
            if victim.peer is peer:
                mine -= 1
        return True

    def forget_peer(self, peer: Peer) -> None:
        del self.peers[peer.addr]

    # -- one conversation -----------------------------------------------------------
    def _serve(self, conv: Conversation) -> None:
        if conv.closed:
            return
        try:
            sock = self._connect()
        except OSError as exc:
            log.info("%s conv %08x: cannot connect to %s: %s", conv.peer.addr, conv.conv,
                     self.target, exc)
            conv.abort(Reason.REFUSED)
            return
        if conv.closed:
            sock.close()
            return
        # ACCEPT only now: a refused connection costs the client's address
        # no more than ACK, challenge and RST, less than the opener it sent
        conv.kcp.send(accept_message(self.instance))
        self.mark_dirty(conv)
        conv.run(sock)

    def _connect(self) -> socket.socket:
        host, port = self.target[0], self.target[1]
        timeout = self.timeouts.connect_s
        infos = self._target_infos
        if infos is None:  # resolved once; a failed lookup is tried again next time
            infos = self._target_infos = gsocket.getaddrinfo(host, port, 0,
                                                              socket.SOCK_STREAM)
        last: Optional[OSError] = None
        for family, kind, proto, _, sockaddr in infos:
            sock = gsocket.socket(family, kind, proto)
            try:
                apply_outbound(sock, self.options, udp=False)
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last or OSError(f"cannot resolve {host}")
