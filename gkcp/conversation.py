"""One tunnelled TCP connection: a KCP conversation glued to a TCP socket.

Data directions (one greenlet each)::

    TCP socket --recv--> upload()   --kcp.send-->  KCP --output--> UDP (Endpoint)
    TCP socket <-send--- download() <--kcp.recv--  KCP <--input--- UDP (Endpoint)

Back-pressure: `upload` reads from TCP only while the KCP send queue holds
less than `send_limit` segments; `download` takes the next message only
after the previous one was written to TCP, so an unread TCP socket fills
the KCP receive queue and closes the window the peer sees.

Closing: an empty KCP message is FIN.  TCP EOF becomes FIN, a received FIN
becomes `shutdown(SHUT_WR)`: half-close passes through.  Once both FINs have
passed and all our data is acknowledged, the conversation lingers for
`linger_s` (to acknowledge retransmissions) and is then released.  Any
error, a peer's RST or a timeout aborts: the TCP socket is reset, an RST
goes to the peer (unless the abort came from it), both greenlets end.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Callable, Optional

import gevent
from gevent.hub import Waiter

from .kcp import KCP
from .protocol import FIN_MESSAGE, Reason

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint, Peer

log = logging.getLogger(__name__)


class _Upload(gevent.Greenlet):
    """The upload greenlet.  (A subclass instead of spawn(conv.upload, sock):
    gevent keeps a `run` argument in a per-greenlet __dict__, ~100 bytes.)"""

    def _run(self, conv: "Conversation", sock: socket.socket) -> None:
        conv.upload(sock)


_LINGER_RESET = struct.pack("ii", 1, 0)


class Conversation:
    """KCP state plus the I/O state of one tunnelled connection."""

    __slots__ = (
        "endpoint", "peer", "conv", "kcp", "send_limit", "chunk", "sock", "_down",
        "_up", "fin_sent", "fin_received", "closed", "reason",
        "started_s", "created_ms", "last_payload_ms", "last_una", "last_una_ms",
        "latest_peer_ts", "peer_instance", "greeting", "timer_due", "bytes_up",
        "bytes_down", "__weakref__",
    )

    def __init__(self, endpoint: "Endpoint", peer: "Peer", conv: int, now_ms: int) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.conv = conv
        opts = endpoint.options
        kcp = KCP(conv, peer.output)
        kcp.nodelay(opts.nodelay, opts.interval, opts.resend, int(opts.nc))
        kcp.wndsize(opts.sndwnd, opts.rcvwnd)
        kcp.setmtu(endpoint.kcp_mtu)
        kcp.update(now_ms)  # first update: arms the clock, cwnd becomes 1
        self.kcp = kcp
        self.send_limit = max(2 * opts.sndwnd, 64)
        # largest TCP read we turn into one message: well under 127 fragments
        self.chunk = min(65536, kcp.mss * 64)
        self.sock: Optional[socket.socket] = None
        # the Waiter a greenlet is parked on, if it is: `_down` for the
        # download/run greenlet (a message came, all was acknowledged, or
        # closed), `_up` for the upload greenlet (room in the send queue)
        self._down: Optional[Waiter] = None
        self._up: Optional[Waiter] = None
        self.fin_sent = False
        self.fin_received = False
        self.closed = False
        self.reason: Optional[Reason] = None
        self.started_s = time.monotonic()
        self.created_ms = now_ms
        self.last_payload_ms = now_ms
        self.last_una = kcp.snd_una
        self.last_una_ms = now_ms
        self.latest_peer_ts: Optional[int] = None  # newest PUSH ts seen from the peer
        self.peer_instance: Optional[int] = None  # the instance id in OPEN/ACCEPT
        # the first message from the peer, if it is a greeting to check:
        self.greeting: Optional[Callable[[bytes], bool]] = None
        self.timer_due: Optional[int] = None
        self.bytes_up = 0  # TCP -> KCP
        self.bytes_down = 0  # KCP -> TCP

    def __repr__(self) -> str:
        return f"<Conversation {self.conv:08x} {self.peer.addr}>"

    # -- called by the endpoint -------------------------------------------------
    def on_input(self) -> None:
        """After datagrams were fed to the KCP: wake whoever can proceed."""
        kcp = self.kcp
        if kcp.rcv_queue:
            self._wake_down()
        waiting = kcp.waitsnd()
        if waiting < self.send_limit:
            self._wake_up()
            if not waiting:
                self._wake_down()

    # -- parking: a Waiter per wait; a wake-up only tells the greenlet to look again
    def _wait_down(self) -> None:
        waiter = self._down = Waiter()
        try:
            waiter.get()
        finally:
            self._down = None

    def _wait_up(self) -> None:
        waiter = self._up = Waiter()
        try:
            waiter.get()
        finally:
            self._up = None

    def _wake_down(self) -> None:
        waiter = self._down
        if waiter is not None:
            self._down = None
            self.endpoint.loop.run_callback(waiter.switch, None)

    def _wake_up(self) -> None:
        waiter = self._up
        if waiter is not None:
            self._up = None
            self.endpoint.loop.run_callback(waiter.switch, None)

    # -- greenlets --------------------------------------------------------------------
    def upload(self, sock: socket.socket) -> None:
        """TCP -> KCP until EOF (then FIN) or an error (then abort)."""
        kcp = self.kcp
        endpoint = self.endpoint
        # read the non-blocking socket under gevent's wrapper, and wait on the
        # wrapper's own read watcher: less stack to keep while idle than
        # gevent's sock.recv (close() still wakes us, with an error)
        recv = sock._sock.recv  # type: ignore[attr-defined]
        read_event = sock._read_event  # type: ignore[attr-defined]
        while not self.closed:
            if kcp.waitsnd() >= self.send_limit:
                self._wait_up()
                continue
            try:
                data = recv(self.chunk)
            except BlockingIOError:
                data = None
            except OSError as exc:
                if not self.closed:
                    log.debug("%r: TCP read failed: %s", self, exc)
                    self.abort(Reason.ABORTED)
                return
            if data is None:  # park outside the except clause: nothing kept alive
                waiter = Waiter()
                read_event.start(waiter.switch, None)
                try:
                    waiter.get()
                except OSError as exc:  # closed under us
                    if not self.closed:
                        log.debug("%r: TCP read failed: %s", self, exc)
                        self.abort(Reason.ABORTED)
                    return
                finally:
                    read_event.stop()
                continue
            if self.closed:
                return
            if not data:
                self.fin_sent = True
                kcp.send(FIN_MESSAGE)
                endpoint.mark_dirty(self)
                return
            self.bytes_up += len(data)
            self.last_payload_ms = endpoint.now_ms()
            kcp.send(data)
            endpoint.mark_dirty(self)

    def download(self, sock: socket.socket) -> None:
        """KCP -> TCP until FIN (then shutdown(SHUT_WR)) or an abort."""
        kcp = self.kcp
        endpoint = self.endpoint
        while True:
            msg = kcp.recv()
            if msg is None:
                if self.closed:
                    return
                self._wait_down()
                continue
            if kcp.probe:  # the receive window reopened: tell the peer now
                endpoint.mark_dirty(self)
            greeting, self.greeting = self.greeting, None
            if greeting is not None:
                if not greeting(msg):
                    self.abort(Reason.ABORTED)
                    return
                continue
            if not msg:
                self.fin_received = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            self.bytes_down += len(msg)
            self.last_payload_ms = endpoint.now_ms()
            try:
                sock.sendall(msg)
            except OSError as exc:
                if not self.closed:
                    log.debug("%r: TCP write failed: %s", self, exc)
                    self.abort(Reason.ABORTED)
                return

    def run(self, sock: socket.socket) -> None:
        """Carry `sock` until both directions end, then close and linger.

        The calling greenlet (the accept handler, or the server's) does the
        download itself and spawns one for the upload: two greenlets per
        connection, not three (a parked greenlet costs ~8 KiB).
        """
        self.sock = sock
        up = _Upload(None, self, sock)
        up.start()
        try:
            self.download(sock)
            up.join()
            if not self.closed:
                # wait until the peer has everything we sent, then linger
                while not self.closed and self.kcp.waitsnd():
                    self._wait_down()
        finally:
            up.kill(block=True)
            self._close_socket(reset=self.closed)
        if not self.closed:
            self.endpoint.linger(self)

    # -- endings ------------------------------------------------------------------
    def abort(self, reason: Reason, *, from_peer: bool = False) -> None:
        """End now: reset TCP, tell the peer (unless it told us), release."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        log.debug("%r aborted: %s%s", self, reason.name, " (by peer)" if from_peer else "")
        if not from_peer:
            self.endpoint.send_rst(self, reason)
        self._close_socket(reset=True)
        self.endpoint.release(self)
        self._wake()

    def release(self) -> None:
        """End quietly (after linger, or when the endpoint stops)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._wake_down()
        self._wake_up()

    def _close_socket(self, *, reset: bool) -> None:
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        except OSError:
            pass
