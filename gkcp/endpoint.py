"""What both endpoints share: UDP transports, peers, the timer, housekeeping.

Theory of operation
-------------------
An `Endpoint` owns one or more `UdpTransport`s (a non-blocking UDP socket
and the greenlet that reads it), a table of `Peer`s (remote UDP addresses)
and, per peer, its `Conversation`s keyed by conv.

* Reading: the reader greenlet drains its socket in batches; each datagram
  is classified (KCP / control / invalid), KCP datagrams go to their
  conversation's `KCP.input`, and the conversation is marked dirty.
* Flushing: dirty conversations are flushed once, in a loop callback that
  runs when the current greenlet yields.  So a batch of datagrams yields one
  batch of ACKs, and a `send()` goes out without waiting for an interval.
* Timer: one greenlet keeps a heap of (due, conv) from `KCP.check()`, only
  for conversations with something in flight, queued, or to acknowledge.
  Idle conversations have no timer at all.
* Housekeeping: once a second, keepalive, dead peers, stall and idle
  timeouts, lingering conversations.
* Pacing (option ratelimit, gkcp/pacing.py): a validated peer's datagrams
  go through its `Pacer`; what must wait leaves from a libev timer
  callback.  The peer's window cap follows the rate and the smallest round
  trip seen (PONGs, KCP's srtt).

KCP calls never yield (sends are non-blocking; a full socket buffer drops
the datagram like the network would), so no other greenlet can see a
half-updated KCP.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Set, Tuple

import gevent
from gevent import monkey
from gevent.event import Event
from gevent.pool import Group
from gevent.socket import wait_read

from .conversation import Conversation
from .crypto import OVERHEAD as CRYPTO_OVERHEAD
from .crypto import Sealer, derive_key
from .kcp import CMD_PUSH, KCP, MASK
from .options import Options
from .pacing import AUTO, DROPPED, IP_UDP_OVERHEAD, MIN_BPS, SEND, AutoRate, Pacer, paced_window
from .protocol import (
    CONTROL_LEN,
    FLAG_ECHO,
    Control,
    ControlDatagram,
    Kind,
    Limits,
    Reason,
    classify,
    conv_of,
    decode_control,
    encode_control,
)

log = logging.getLogger(__name__)

Address = Tuple  # what recvfrom returns: (host, port) or (host, port, flow, scope)

# UDP sockets are plain, non-blocking stdlib sockets even in a monkey-patched
# process: a send must never yield in the middle of a KCP flush.
_StdSocket = monkey.get_original("socket", "socket")

READ_BATCH = 256
SOCKET_BUFFER = 4 * 1024 * 1024
RST_PER_SECOND = 200
WINDOW_BUDGET = 4096  # segments in flight per endpoint, shared by busy conversations
WINDOW_MIN = 32
CHALLENGE_EVERY_MS = 200  # at most this often a PING that asks a peer to prove itself
CHALLENGES_KEPT = 8  # outstanding challenges per peer; older ones are forgotten


def udp_socket(family: int) -> socket.socket:
    return _StdSocket(family, socket.SOCK_DGRAM)


def mono_ms() -> int:
    """Milliseconds of the monotonic clock, not wrapped (timer heap keys)."""
    return int(time.monotonic() * 1000)


def now_ms() -> int:
    """The 32-bit millisecond clock every KCP here runs on."""
    return int(time.monotonic() * 1000) & MASK


def elapsed_ms(now: int, then: int) -> int:
    return (now - then) & MASK


@dataclass
class Stats:
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    invalid: int = 0  # neither KCP nor control, or rejected by KCP.input
    auth_failed: int = 0  # key set: forged, corrupt or replayed
    unknown: int = 0  # KCP for a conversation we do not have
    send_dropped: int = 0  # socket buffer full or send error
    rst_sent: int = 0
    rst_received: int = 0
    pace_dropped: int = 0  # the pacer's queue was full (also in send_dropped)
    opened: int = 0
    refused: int = 0  # openers dropped at a limit


class UdpTransport:
    """One non-blocking UDP socket, read by one greenlet."""

    def __init__(self, endpoint: "Endpoint", sock: socket.socket,
                 remote: Optional[Address] = None) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.remote = remote  # set for a client's connected socket
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
        self._sendto = sock.sendto
        self._send = sock.send
        self.sealer = endpoint.sealer

    def send(self, datagram: bytes, addr: Address) -> None:
        stats = self.endpoint.stats
        if self.sealer is not None:
            datagram = self.sealer.seal(datagram)
        try:
            if self.remote is not None:
                self._send(datagram)
            else:
                self._sendto(datagram, addr)
        except OSError as exc:
            stats.send_dropped += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED):
                log.debug("send to %s failed: %s", addr, exc)
            return
        stats.datagrams_out += 1
        stats.bytes_out += len(datagram)

    def read_forever(self) -> None:
        sock = self.sock
        fd = sock.fileno()
        on_datagram = self.endpoint.on_datagram
        recvfrom = sock.recvfrom
        remote = self.remote
        while True:
            wait_read(fd)
            now = now_ms()
            for _ in range(READ_BATCH):
                try:
                    data, addr = recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # e.g. ICMP port unreachable on a connected socket
                    log.debug("receive failed: %s", exc)
                    break
                on_datagram(self, data, remote if remote is not None else addr, now)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Peer:
    """A remote UDP address and the conversations we hold with it."""

    def __init__(self, endpoint: "Endpoint", transport: UdpTransport, addr: Address,
                 validated: bool, now: int) -> None:
        self.endpoint = endpoint
        self.transport = transport
        self.addr = addr
        self.conversations: Dict[int, Conversation] = {}
        self.last_recv_ms = now
        self.last_ping_ms = now
        self.instance: Optional[int] = None  # the remote endpoint's instance id
        self.last_pong_ms: Optional[int] = None  # when a PONG last came
        # address validation (server side): until the peer echoes our
        # challenge, send no more bytes than we received from it
        self.validated = validated
        # our outstanding challenges: random nonce (sent as the PING's ts) ->
        # when it went out; a nonce is good for one PONG
        self.challenges: Dict[int, int] = {}
        self.challenge_ms: Optional[int] = None  # when the last one went out
        self.budget = 0
        self.held: Deque[bytes] = deque()
        self.held_bytes = 0
        # pacing (ratelimit): the pacer, its pending timer, the window cap
        self.rtt_min_ms: Optional[int] = None  # smallest round trip seen
        self.wnd_cap: Optional[int] = None  # segments in flight per conversation
        self.pacer: Optional[Pacer] = None
        self._pace_timer = None
        self.starved: Dict[Conversation, None] = {}  # waiting for tokens to send new data
        self.auto: Optional[AutoRate] = None  # ratelimit=auto: the rate is measured
        rate = endpoint.options.ratelimit
        if rate:
            self.ip_overhead = IP_UDP_OVERHEAD[6 if ":" in str(addr[0]) else 4]
            self.segment = endpoint.options.mtu + self.ip_overhead  # a full datagram, wire
            if rate == AUTO:
                self.auto = AutoRate(time.monotonic())
                rate = self.auto.gain() * self.auto.rate_bps
            self.pacer = Pacer(rate, self.ip_overhead + endpoint.seal_overhead,
                               time.monotonic(), free_small=self.auto is not None,
                               largest=self.segment)

    def __repr__(self) -> str:
        return f"<Peer {self.addr} {len(self.conversations)} conversations>"

    def output(self, datagram: bytes) -> None:
        """Send a datagram to this peer (the KCP output callback)."""
        if self.validated:
            if self.pacer is None:
                self.transport.send(datagram, self.addr)
            else:
                self._paced(datagram)
            return
        size = len(datagram) + self.endpoint.seal_overhead  # bytes on the wire
        if not self.held and size <= self.budget:
            self.budget -= size
            self.transport.send(datagram, self.addr)
        elif self.held_bytes + size <= self.endpoint.limits.pending_bytes:
            self.held.append(datagram)
            self.held_bytes += size
        else:
            self.endpoint.stats.send_dropped += 1

    def _paced(self, datagram: bytes) -> None:
        verdict = self.pacer.submit(datagram, time.monotonic())  # type: ignore[union-attr]
        if verdict == SEND:
            self.transport.send(datagram, self.addr)
        elif verdict == DROPPED:
            stats = self.endpoint.stats
            stats.send_dropped += 1
            stats.pace_dropped += 1
        elif self._pace_timer is None:
            self._arm_pacer()

    def allowance(self) -> int:
        """Full-size datagrams the pacer would send at once now."""
        return int(self.pacer.available(time.monotonic()) // self.segment)  # type: ignore

    def starve(self, conv: Conversation) -> None:
        """`conv` has more to send than the tokens allow: flush it when they do."""
        self.starved[conv] = None
        if self.auto is not None:
            self.auto.limited = True
        if self._pace_timer is None:
            self._arm_pacer()

    def acked(self, segments: int) -> None:
        """ratelimit=auto: `segments` of ours were acknowledged (a delivery sample)."""
        rtt_s = (self.rtt_min_ms or 0) / 1000.0
        if self.pacer.idle:  # type: ignore[union-attr]
            self.auto.idle = True  # type: ignore[union-attr]
            self.pacer.idle = False  # type: ignore[union-attr]
        rate = self.auto.on_acked(segments * self.segment, time.monotonic(), rtt_s)  # type: ignore
        if rate is not None:
            self.pacer.set_rate(max(rate, MIN_BPS))  # type: ignore[union-attr]

    def _arm_pacer(self) -> None:
        pacer = self.pacer
        delay = pacer.delay()  # type: ignore[union-attr]
        if delay is None:
            if not self.starved:
                return
            delay = pacer.wait_for(2 * self.segment)  # type: ignore[union-attr]
        self._pace_timer = timer = self.endpoint.loop.timer(max(delay, 0.0002))
        timer.start(self._drain_pacer)

    def _drain_pacer(self) -> None:
        timer, self._pace_timer = self._pace_timer, None
        if timer is not None:
            timer.close()
        send, addr = self.transport.send, self.addr
        for datagram in self.pacer.release(time.monotonic()):  # type: ignore[union-attr]
            send(datagram, addr)
        if self.starved and not self.pacer.queued:  # type: ignore[union-attr]
            starved, self.starved = self.starved, {}
            mark_dirty = self.endpoint.mark_dirty
            for conv in starved:
                if not conv.closed:
                    mark_dirty(conv)
        else:
            self._arm_pacer()

    def stop_pacing(self) -> None:
        """Send what the pacer holds now, and from now on send unpaced."""
        if self._pace_timer is not None:
            self._pace_timer.close()
            self._pace_timer = None
        pacer, self.pacer, self.auto, self.wnd_cap = self.pacer, None, None, None
        if pacer is not None:
            for datagram in pacer.take_all():
                self.transport.send(datagram, self.addr)
        self.starved.clear()

    def note_rtt(self, rtt_ms: int) -> None:
        """A round-trip sample: the window cap follows the smallest."""
        if self.pacer is not None and 0 <= rtt_ms < 60000 and \
                (self.rtt_min_ms is None or rtt_ms < self.rtt_min_ms):
            self.rtt_min_ms = rtt_ms
            self.update_window()

    def update_window(self) -> None:
        # (not with ratelimit=auto: a window held to the estimate would keep
        # the estimate from growing whenever losses stall KCP's window)
        if self.pacer is not None and self.auto is None:
            self.wnd_cap = paced_window(self.endpoint.options.ratelimit, self.rtt_min_ms,
                                        self.segment)

    def received(self, size: int) -> None:
        """Account for a datagram of `size` plain bytes from this (unvalidated) peer."""
        self.budget += size + self.endpoint.seal_overhead
        self._release_held()

    def send_ahead(self, datagram: bytes) -> bool:
        """Send past the held queue if the budget allows (address challenges)."""
        if self.validated:
            self.transport.send(datagram, self.addr)
            return True
        size = len(datagram) + self.endpoint.seal_overhead
        if size > self.budget:
            return False
        self.budget -= size
        self.transport.send(datagram, self.addr)
        return True

    def validate(self) -> None:
        self.validated = True
        self.budget = 1 << 62
        self._release_held()

    def _release_held(self) -> None:
        held = self.held
        overhead = self.endpoint.seal_overhead
        while held and len(held[0]) + overhead <= self.budget:
            datagram = held.popleft()
            self.held_bytes -= len(datagram) + overhead
            if not self.validated:
                self.budget -= len(datagram) + overhead
                self.transport.send(datagram, self.addr)
            else:  # validated just now: as any output (so paced, with ratelimit)
                self.output(datagram)

    def control(self, conv: int, cmd: Control, echo: int = 0, extra: int = 0,
                flags: int = 0) -> None:
        self.output(encode_control(conv, cmd, now_ms(), echo, extra, flags))


class Endpoint:
    """Base of LocalEndpoint and ServerEndpoint."""

    role = "endpoint"

    def __init__(self, options: Options, limits: Optional[Limits] = None) -> None:
        self.options = options
        self.timeouts = options.timeouts
        self.limits = limits or Limits()
        self.instance = int.from_bytes(os.urandom(4), "little") or 1
        self.stats = Stats()
        self.sealer = Sealer(derive_key(options.key)) if options.key else None
        #: what sealing adds to each datagram, and KCP's mtu (the UDP payload less that)
        self.seal_overhead = CRYPTO_OVERHEAD if options.key else 0
        self.kcp_mtu = options.mtu - self.seal_overhead
        self.transports: List[UdpTransport] = []
        self._readers: List[gevent.Greenlet] = []
        self.peers: Dict[Address, Peer] = {}
        self.group = Group()
        self.lingering: Dict[Conversation, int] = {}
        self._dirty: Dict[Conversation, None] = {}  # an ordered set
        self._busy: Set[Conversation] = set()
        self.n_conversations = 0
        self.n_unproven = 0  # conversations of peers that have not proved their address
        self._snd_wnd = options.sndwnd
        self._heap: List[Tuple[int, int, Conversation]] = []
        self._heap_seq = 0
        self._timer_wake = Event()
        self.loop = gevent.get_hub().loop
        self._rst_tokens = float(RST_PER_SECOND)
        self._rst_refill_s = time.monotonic()
        self.now_ms = now_ms
        self.stopped = Event()

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Open sockets and start serving; raises OSError (e.g. EADDRINUSE)."""
        raise NotImplementedError

    def start_common(self) -> None:
        self.group.spawn(self._timer_loop)
        self.group.spawn(self._housekeeping_loop)

    def add_transport(self, transport: UdpTransport) -> None:
        self.transports.append(transport)
        self._readers.append(self.group.spawn(transport.read_forever))

    def conversations(self) -> List[Conversation]:
        return [c for p in self.peers.values() for c in p.conversations.values()]

    def stop(self) -> None:
        """Abort every conversation (telling peers), close sockets, end greenlets."""
        for peer in list(self.peers.values()):
            peer.stop_pacing()  # (the RSTs below go at once, and no timer outlives us)
        for conv in self.conversations():
            conv.abort(Reason.SHUTDOWN)
        self._flush_dirty()
        # readers first, for certain: closing a socket a greenlet waits on
        # aborts libev; then the rest (which may be many) as far as 2 s allow
        gevent.killall(self._readers, block=True)
        self.group.kill(block=True, timeout=2)
        for transport in self.transports:
            transport.close()
        self.stopped.set()

    # -- datagrams in -------------------------------------------------------------------
    def on_datagram(self, transport: UdpTransport, data: bytes, addr: Address, now: int) -> None:
        stats = self.stats
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        if self.sealer is not None:
            opened = self.sealer.open(data)
            if opened is None:
                stats.auth_failed += 1
                return
            data = opened
        kind = classify(data)
        peer = self.peers.get(addr)
        if kind is Kind.KCP:
            conv = peer.conversations.get(conv_of(data)) if peer is not None else None
            if conv is None or peer is None:
                stats.unknown += 1
                self.on_unknown(transport, data, addr, peer, now)
                return
            peer.last_recv_ms = now
            if not peer.validated:
                peer.received(len(data))
                self.unvalidated(peer, conv.conv, now)
            kcp = conv.kcp
            kcp.current = now
            in_flight = kcp.nsnd_buf if peer.auto is not None else 0
            if kcp.input(data) < 0:
                stats.invalid += 1
                return
            if in_flight and kcp.nsnd_buf < in_flight:  # ratelimit=auto: a delivery sample
                peer.acked(in_flight - kcp.nsnd_buf)
            if data[4] == CMD_PUSH:  # first segment is a PUSH: remember the peer's clock
                conv.latest_peer_ts = int.from_bytes(data[8:12], "little")
            conv.on_input()
            self.mark_dirty(conv)
        elif kind is Kind.CONTROL:
            message = decode_control(data)
            if message is not None and peer is not None:
                peer.last_recv_ms = now
                if not peer.validated:
                    peer.received(len(data))
                self.on_control(peer, message, now)
            elif message is not None:
                self.on_control_stranger(transport, message, addr, now)
        else:
            stats.invalid += 1

    def on_unknown(self, transport: UdpTransport, data: bytes, addr: Address,
                   peer: Optional[Peer], now: int) -> None:
        raise NotImplementedError

    def unvalidated(self, peer: Peer, conv: int, now: int) -> None:
        """Traffic from a peer that has not proved its address yet (server only)."""

    def on_control_stranger(self, transport: UdpTransport, message: ControlDatagram,
                            addr: Address, now: int) -> None:
        """From an address we hold nothing for: answer a PING (so a client of
        our previous incarnation learns our new instance id), ignore the rest.

        The PONG is exactly as large as the PING and shares the RST rate
        limit, so this amplifies nothing and creates no state.
        """
        if message.cmd is Control.PING and self._take_rst_token():
            transport.send(encode_control(message.conv, Control.PONG, now_ms(), message.ts,
                                          self.instance), addr)

    def on_control(self, peer: Peer, message: ControlDatagram, now: int) -> None:
        cmd = message.cmd
        if cmd is Control.RST:
            self._on_rst(peer, message, now)
        elif cmd is Control.PING:
            self.note_instance(peer, message.extra)
            self.answer_ping(peer, message, now)
        elif message.echo not in peer.challenges:
            self.note_instance(peer, message.extra)  # a PONG, but not to our PING
        else:  # the answer to our PING: the address is proven, and who speaks from it
            sent = peer.challenges.pop(message.echo)
            peer.last_pong_ms = now
            peer.note_rtt(elapsed_ms(now, sent))
            if not peer.validated:
                self.n_unproven -= len(peer.conversations)
                peer.validate()
                for conv in peer.conversations.values():
                    self.mark_dirty(conv)  # and so back on the timer
            self.adopt_instance(peer, message.extra)

    def answer_ping(self, peer: Peer, message: ControlDatagram, now: int) -> None:
        peer.control(message.conv, Control.PONG, echo=message.ts, extra=self.instance)

    def challenge(self, peer: Peer, conv: int, now: int) -> None:
        """PING `peer`, at most every CHALLENGE_EVERY_MS; the PONG that echoes
        it proves the address and tells the instance id speaking from it.

        The PING's ts is a random nonce, not our clock: an off-path attacker
        who knows (or learns, from any PONG) our clock must not be able to
        answer a challenge sent to an address it spoofs.  Ahead of held
        output (which may be what an unproven peer cannot pay for), and
        remembered only if it really went out; the last CHALLENGES_KEPT count.
        """
        if peer.challenge_ms is not None and \
                elapsed_ms(now, peer.challenge_ms) < CHALLENGE_EVERY_MS:
            return
        nonce = int.from_bytes(os.urandom(4), "little")
        if peer.send_ahead(encode_control(conv, Control.PING, nonce, 0, self.instance)):
            peer.challenge_ms = now
            challenges = peer.challenges
            challenges[nonce] = now
            if len(challenges) > CHALLENGES_KEPT:
                del challenges[next(iter(challenges))]

    def note_instance(self, peer: Peer, instance: int) -> None:
        """The peer claims to speak as `instance` (in a PING, an opener, an ACCEPT).

        The first claim is taken.  A different one is only a claim: anyone
        who knows the peer's address could send it.  So the address is
        challenged, and `adopt_instance` acts on the answer.
        """
        if peer.instance is None:
            peer.instance = instance
        elif instance != peer.instance:
            self.challenge(peer, 0, now_ms())

    def adopt_instance(self, peer: Peer, instance: int) -> None:
        """`instance` answered our challenge: conversations of any other are gone
        (an older incarnation of the peer, or forged)."""
        peer.instance = instance
        stale = [c for c in peer.conversations.values()
                 if c.peer_instance is not None and c.peer_instance != instance]
        if stale:
            log.info("%s speaks as instance %08x: dropping %d conversations of another",
                     peer.addr, instance, len(stale))
        for conv in stale:
            conv.abort(Reason.UNKNOWN_CONV, from_peer=True)

    def _on_rst(self, peer: Peer, message: ControlDatagram, now: int) -> None:
        conv = peer.conversations.get(message.conv)
        if conv is None:
            return
        if message.flags & FLAG_ECHO:
            # the echo must be a timestamp we sent in this conversation
            if elapsed_ms(now, message.echo) > elapsed_ms(now, conv.created_ms):
                return
        elif conv.kcp.snd_nxt != 0:
            return  # we did send data, so a genuine RST would echo it
        self.stats.rst_received += 1
        try:
            reason = Reason(message.extra)
        except ValueError:
            reason = Reason.ABORTED
        conv.abort(reason, from_peer=True)

    # -- datagrams out ------------------------------------------------------------
    def send_rst(self, conv: Conversation, reason: Reason) -> None:
        echo = conv.latest_peer_ts
        self.send_rst_to(conv.peer.transport, conv.peer.addr, conv.conv, reason, echo)
        self._flush_one(conv)

    def send_rst_to(self, transport: UdpTransport, addr: Address, conv: int,
                    reason: Reason, echo: Optional[int]) -> None:
        if not self._take_rst_token():
            return
        self.stats.rst_sent += 1
        datagram = encode_control(conv, Control.RST, now_ms(), echo or 0, reason,
                                  FLAG_ECHO if echo is not None else 0)
        peer = self.peers.get(addr)
        if peer is not None:
            peer.output(datagram)
        else:
            transport.send(datagram, addr)

    def _take_rst_token(self) -> bool:
        t = time.monotonic()
        self._rst_tokens = min(float(RST_PER_SECOND),
                               self._rst_tokens + (t - self._rst_refill_s) * RST_PER_SECOND)
        self._rst_refill_s = t
        if self._rst_tokens < 1:
            return False
        self._rst_tokens -= 1
        return True

    # -- flushing and timers -------------------------------------------------------
    def mark_dirty(self, conv: Conversation) -> None:
        if not self._dirty:
            self.loop.run_callback(self._flush_dirty)
        self._dirty[conv] = None

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, {}
        if not dirty:
            return
        now = now_ms()
        # (a flush moves segments from queue to buffer: waitsnd() and the
        # receive queue stay as they were, so nobody needs waking here)
        for conv in dirty:
            kcp = conv.kcp
            kcp.current = now
            kcp.snd_wnd = self._window(conv, kcp)
            kcp.flush()
            self._schedule(conv, now)

    def _window(self, conv: Conversation, kcp: KCP) -> int:
        """The send window for this flush: the conversation's share of the
        endpoint's budget, within its peer's paced cap; when pacing, also no
        more new segments than the pacer can send at once, so that KCP
        stamps a segment's send time when it really leaves."""
        peer = conv.peer
        cap = peer.wnd_cap
        wnd = self._snd_wnd if cap is None or cap > self._snd_wnd else cap
        if peer.pacer is not None and kcp.snd_queue and peer.validated:
            in_flight = (kcp.snd_nxt - kcp.snd_una) & MASK
            room = wnd - in_flight
            if room > 0:
                n = peer.allowance()
                if n < room and n < len(kcp.snd_queue):
                    peer.starve(conv)  # flushed again when the tokens are there
                    wnd = in_flight + n
        return wnd

    def _flush_one(self, conv: Conversation) -> None:
        conv.kcp.current = now_ms()
        conv.kcp.flush()

    def _share_window(self, conv: Conversation, sending: bool) -> None:
        """Split WINDOW_BUDGET segments in flight among the conversations sending.

        Without it, many conversations each sending a full window (nc=1 has
        no congestion window) overflow socket buffers and collapse into
        retransmissions.  One busy conversation still gets its full sndwnd.
        """
        busy = self._busy
        if sending == (conv in busy):
            return
        if sending:
            busy.add(conv)
        else:
            busy.discard(conv)
        share = max(WINDOW_MIN, WINDOW_BUDGET // max(1, len(busy)))
        self._snd_wnd = min(self.options.sndwnd, share)

    def _schedule(self, conv: Conversation, now: int) -> None:
        kcp = conv.kcp
        if not conv.peer.validated:
            # no timer and no window share for a peer that has not proved its
            # address: its output is held anyway; validation flushes it
            conv.timer_due = None
            return
        self._share_window(conv, bool(kcp.nsnd_buf or kcp.snd_queue) and not conv.closed)
        if conv.closed or not (kcp.nsnd_buf or kcp.snd_queue or kcp.acklist or kcp.probe):
            conv.timer_due = None
            return
        mono = mono_ms()
        key = mono + elapsed_ms(kcp.check(mono & MASK), mono & MASK)
        if conv.timer_due is not None and key >= conv.timer_due:
            return  # an earlier wake-up is already in the heap
        conv.timer_due = key
        self._heap_seq += 1
        heapq.heappush(self._heap, (key, self._heap_seq, conv))
        if self._heap[0][2] is conv:
            self._timer_wake.set()

    def _timer_loop(self) -> None:
        heap = self._heap
        while True:
            mono = mono_ms()
            wall = mono & MASK
            while heap and heap[0][0] <= mono:
                key, _, conv = heapq.heappop(heap)
                if conv.timer_due != key or conv.closed:
                    continue  # superseded by an earlier entry, or gone
                conv.timer_due = None
                conv.kcp.snd_wnd = self._window(conv, conv.kcp)
                conv.kcp.update(wall)
                self._schedule(conv, wall)
            self._timer_wake.clear()
            if heap:
                self._timer_wake.wait(max(heap[0][0] - mono, 1) / 1000.0)
            else:
                self._timer_wake.wait()

    # -- conversations come and go ---------------------------------------------------
    def register(self, peer: Peer, conv: Conversation) -> None:
        peer.conversations[conv.conv] = conv
        self.stats.opened += 1
        self.n_conversations += 1
        if not peer.validated:
            self.n_unproven += 1

    def release(self, conv: Conversation) -> None:
        """Forget a conversation (after an abort or its linger time)."""
        conv.release()
        self.lingering.pop(conv, None)
        self._share_window(conv, False)
        peer = conv.peer
        if peer.conversations.get(conv.conv) is conv:
            del peer.conversations[conv.conv]
            self.n_conversations -= 1
            if not peer.validated:
                self.n_unproven -= 1
            self.log_close(conv)
        if not peer.conversations and self.peers.get(peer.addr) is peer:
            self.forget_peer(peer)

    def forget_peer(self, peer: Peer) -> None:
        """Called when a peer has no conversations left."""

    def linger(self, conv: Conversation) -> None:
        self.lingering[conv] = now_ms()

    def log_close(self, conv: Conversation) -> None:
        kcp = conv.kcp
        log.info("%s conv %08x closed%s after %.1fs: up %d B, down %d B, srtt %d ms, "
                 "retransmissions %d", conv.peer.addr, conv.conv,
                 f" ({conv.reason.name})" if conv.reason else "",
                 time.monotonic() - conv.started_s, conv.bytes_up, conv.bytes_down,
                 kcp.rx_srtt, kcp.xmit)

    # -- housekeeping -------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        while True:
            gevent.sleep(1.0)
            self.housekeeping(now_ms())

    def housekeeping(self, now: int) -> None:
        t = self.timeouts
        dead_ms = int(t.dead_s * 1000)
        stall_ms = int(t.stall_s * 1000)
        idle_ms = int(t.idle_s * 1000)
        linger_ms = int(t.linger_s * 1000)
        for conv, since in list(self.lingering.items()):
            if elapsed_ms(now, since) >= linger_ms:
                self.release(conv)
        for peer in list(self.peers.values()):
            if peer.conversations and elapsed_ms(now, peer.last_recv_ms) >= dead_ms:
                log.info("%s silent for %.0fs: aborting its conversations", peer.addr, t.dead_s)
                for conv in list(peer.conversations.values()):
                    conv.abort(Reason.TIMEOUT)
                continue
            for conv in list(peer.conversations.values()):
                if conv.closed or conv in self.lingering:
                    continue
                kcp = conv.kcp
                if kcp.rx_srtt and peer.pacer is not None:
                    peer.note_rtt(kcp.rx_srtt)
                if kcp.snd_una != conv.last_una or not kcp.nsnd_buf:
                    conv.last_una = kcp.snd_una
                    conv.last_una_ms = now
                elif elapsed_ms(now, conv.last_una_ms) >= stall_ms:
                    log.info("%r stalled: nothing acknowledged for %.0fs", conv, t.stall_s)
                    conv.abort(Reason.TIMEOUT)
                    continue
                if idle_ms and elapsed_ms(now, conv.last_payload_ms) >= idle_ms:
                    log.info("%r idle for %.0fs", conv, t.idle_s)
                    conv.abort(Reason.TIMEOUT)
            self.keepalive(peer, now)

    def keepalive(self, peer: Peer, now: int) -> None:
        """Client side sends PINGs; the server only answers them."""


__all__ = ["Endpoint", "Peer", "UdpTransport", "Stats", "now_ms", "CONTROL_LEN"]
