"""The KCP engine: sans-I/O, byte-for-byte compatible with ikcp.c v1.

Theory of operation
-------------------
`KCP` is the control block of one conversation.  The caller owns every
side effect: it passes datagrams in (`input`), takes datagrams out through
the `output` callback, and drives time by calling `update(current)` with a
32-bit millisecond clock.  Nothing here reads a clock, touches a socket or
imports gevent.

Given the same calls and the same clock the engine emits the same
datagrams (bytes, order, boundaries), returns the same codes and holds the
same control-block fields as the reference ikcp.c (skywind3000/kcp, 2024
release, built with IKCP_FASTACK_CONSERVE).  Method and field names follow
ikcp so the two can be read side by side; the reference's `nodelay` field
is `nodelay_` here because `nodelay()` is the method.

Where the data structures differ from ikcp's linked lists, the observable
behaviour does not:

* the send buffer is an OrderedDict from sequence number to segment, in
  sequence order: an ACK removes its segment in O(1) instead of a list
  walk, and iteration order is ikcp's.
* the receive buffer is a dict keyed by sequence number: ikcp keeps it
  sorted and unique, and only ever asks "is sn present" and "is rcv_nxt
  next", which a dict answers directly.

Rules this module keeps: all sequence/time arithmetic is modulo 2**32 and
compared with `_diff` (ikcp's `_itimediff`); no per-call allocation beyond
the datagrams themselves on the hot paths.

Compiled engine
---------------
setup.py compiles this same file with Cython into the optional extension
`gkcp._kcp_compiled` (C types from `kcp.pxd`, everything above the "engine
selection" section at the end).  That section makes `KCP` the compiled class
when the extension is there, was built from this very source, and
GKCP_PURE_PYTHON is not set; `IMPLEMENTATION` says which one it is.
"""

from __future__ import annotations

import importlib
import os
import struct
from collections import OrderedDict, deque
from types import MappingProxyType
from typing import Any, Callable, Deque, Dict, List, Optional

__all__ = ["KCP", "CMD_PUSH", "CMD_ACK", "CMD_WASK", "CMD_WINS", "OVERHEAD"]

CMD_PUSH = 81  # data
CMD_ACK = 82  # acknowledgement
CMD_WASK = 83  # window probe: please tell me your window
CMD_WINS = 84  # window tell

ASK_SEND = 1  # we need to send a WASK
ASK_TELL = 2  # we need to send a WINS

OVERHEAD = 24
RTO_NDL = 30  # minimum rto with nodelay
RTO_MIN = 100
RTO_DEF = 200
RTO_MAX = 60000
WND_SND = 32
WND_RCV = 128  # also the largest fragment count of one message
MTU_DEF = 1400
INTERVAL = 100
DEADLINK = 20
THRESH_INIT = 2
THRESH_MIN = 2
PROBE_INIT = 7000
PROBE_LIMIT = 120000
FASTACK_LIMIT = 5

MASK = 0xFFFFFFFF
HALF = 0x80000000  # (a - b) & MASK < HALF  <=>  _diff(a, b) >= 0
_HEADER = struct.Struct("<IBBHIIII")
_pack_header = _HEADER.pack
_unpack_header_from = _HEADER.unpack_from


# An idle KCP holds no containers: empty queues and an empty send buffer are
# these shared, immutable stand-ins (an empty deque alone costs ~760 bytes).
_EMPTY: Any = ()
_NO_ACKS: List[int] = []  # never appended to: input() replaces it first
_NO_SEGMENTS: Any = MappingProxyType({})


def _diff(later: int, earlier: int) -> int:
    """ikcp's _itimediff: signed 32-bit difference of two u32 values."""
    return ((later - earlier + HALF) & MASK) - HALF


def _i32(value: int) -> int:
    """Wrap to a C int32."""
    return ((value + HALF) & MASK) - HALF


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // b
    return q if a >= 0 else -q


class _Segment:
    """A data segment in the send buffer (the receive side keeps tuples)."""

    __slots__ = ("sn", "frg", "ts", "resendts", "rto", "fastack", "xmit", "data")

    def __init__(self, frg: int, data: bytes) -> None:
        self.frg = frg
        self.data = data
        self.sn = 0
        self.ts = 0
        self.resendts = 0
        self.rto = 0
        self.fastack = 0
        self.xmit = 0


class KCP:
    """One KCP conversation (ikcp's ikcpcb)."""

    __slots__ = (
        "conv",
        "output",
        "snd_una",
        "snd_nxt",
        "rcv_nxt",
        "ts_recent",
        "ts_lastack",
        "ts_probe",
        "probe_wait",
        "snd_wnd",
        "rcv_wnd",
        "rmt_wnd",
        "cwnd",
        "incr",
        "probe",
        "mtu",
        "mss",
        "stream",
        "state",
        "rx_srtt",
        "rx_rttval",
        "rx_rto",
        "rx_minrto",
        "current",
        "interval",
        "ts_flush",
        "nodelay_",
        "updated",
        "ssthresh",
        "fastresend",
        "fastlimit",
        "nocwnd",
        "xmit",
        "dead_link",
        "snd_queue",
        "snd_buf",
        "rcv_queue",
        "rcv_buf",
        "acklist",
    )

    def __init__(self, conv: int, output: Callable[[bytes], object]) -> None:
        self.conv = conv & MASK
        self.output = output
        self.snd_una = 0
        self.snd_nxt = 0
        self.rcv_nxt = 0
        self.ts_recent = 0
        self.ts_lastack = 0
        self.ts_probe = 0
        self.probe_wait = 0
        self.snd_wnd = WND_SND
        self.rcv_wnd = WND_RCV
        self.rmt_wnd = WND_RCV
        self.cwnd = 0
        self.incr = 0
        self.probe = 0
        self.mtu = MTU_DEF
        self.mss = MTU_DEF - OVERHEAD
        self.stream = 0
        self.state = 0
        self.rx_srtt = 0
        self.rx_rttval = 0
        self.rx_rto = RTO_DEF
        self.rx_minrto = RTO_MIN
        self.current = 0
        self.interval = INTERVAL
        self.ts_flush = INTERVAL
        self.nodelay_ = 0
        self.updated = 0
        self.ssthresh = THRESH_INIT
        self.fastresend = 0
        self.fastlimit = FASTACK_LIMIT
        self.nocwnd = 0
        self.xmit = 0
        self.dead_link = DEADLINK
        self.snd_queue: Deque[_Segment] = _EMPTY
        # sn -> segment, in sn order: the unacknowledged segments in flight
        self.snd_buf: "OrderedDict[int, _Segment]" = _NO_SEGMENTS
        self.rcv_queue: Deque[tuple] = _EMPTY  # (frg, data)
        self.rcv_buf: Dict[int, tuple] = {}  # sn -> (frg, data)
        self.acklist: List[int] = _NO_ACKS  # flat: sn, ts, sn, ts, ...

    # -- counters ikcp keeps as fields --------------------------------------
    @property
    def nsnd_buf(self) -> int:
        return len(self.snd_buf)

    @property
    def nsnd_que(self) -> int:
        return len(self.snd_queue)

    @property
    def nrcv_que(self) -> int:
        return len(self.rcv_queue)

    @property
    def nrcv_buf(self) -> int:
        return len(self.rcv_buf)

    @property
    def ackcount(self) -> int:
        return len(self.acklist) >> 1

    # -- user side ------------------------------------------------------------
    def peeksize(self) -> int:
        """Size of the next whole message, or -1 if none is complete."""
        queue = self.rcv_queue
        if not queue:
            return -1
        frg, data = queue[0]
        if frg == 0:
            return len(data)
        if len(queue) < frg + 1:
            return -1
        length = 0
        for frg, data in queue:
            length += len(data)
            if frg == 0:
                break
        return length

    def recv(self) -> Optional[bytes]:
        """Return the next whole message (one segment in stream mode), or None."""
        queue = self.rcv_queue
        if not queue or self.peeksize() < 0:
            return None
        recover = len(queue) >= self.rcv_wnd
        popleft = queue.popleft
        frg, data = popleft()
        if frg:
            parts = [data]
            while frg and queue:  # a hostile peer may never send frg 0
                frg, data = popleft()
                parts.append(data)
            data = b"".join(parts)
        self._move_rcv_buf()
        if not queue:
            self.rcv_queue = _EMPTY
        if recover and len(queue) < self.rcv_wnd:
            self.probe |= ASK_TELL  # the window reopened: tell the peer
        return data

    def send(self, data: bytes) -> int:
        """Queue `data` (one message, or bytes of a stream).

        Returns the number of bytes queued, or -2 when a message would need
        128 fragments or more (in stream mode: the bytes appended to the last
        queued segment before that, if any).
        """
        mss = self.mss
        length = len(data)
        offset = 0
        queue = self.snd_queue
        if self.stream:
            if queue:
                last = queue[-1]
                room = mss - len(last.data)
                if room > 0:
                    offset = min(length, room)
                    queue.pop()
                    queue.append(_Segment(0, last.data + data[:offset]))
            if offset >= length:
                return offset
        rest = length - offset
        count = (rest + mss - 1) // mss if rest > mss else 1
        if count >= WND_RCV:
            return offset if offset > 0 else -2
        if queue is _EMPTY:
            queue = self.snd_queue = deque()
        if offset == 0 and count == 1:
            queue.append(_Segment(0, bytes(data)))
            return length
        stream = self.stream
        for i in range(count):
            end = offset + mss
            queue.append(_Segment(0 if stream else count - i - 1, bytes(data[offset:end])))
            offset = end
        return length

    def waitsnd(self) -> int:
        return self.nsnd_buf + len(self.snd_queue)

    # -- configuration --------------------------------------------------------
    def setmtu(self, mtu: int) -> int:
        if mtu < 50 or mtu < OVERHEAD:
            return -1
        self.mtu = mtu
        self.mss = mtu - OVERHEAD
        return 0

    def wndsize(self, sndwnd: int, rcvwnd: int) -> int:
        if sndwnd > 0:
            self.snd_wnd = sndwnd
        if rcvwnd > 0:
            self.rcv_wnd = max(rcvwnd, WND_RCV)
        return 0

    def nodelay(self, nodelay: int, interval: int, resend: int, nc: int) -> int:
        if nodelay >= 0:
            self.nodelay_ = nodelay
            self.rx_minrto = RTO_NDL if nodelay else RTO_MIN
        if interval >= 0:
            self.interval = min(max(interval, 10), 5000)
        if resend >= 0:
            self.fastresend = resend
        if nc >= 0:
            self.nocwnd = nc
        return 0

    # -- network side ---------------------------------------------------------
    def input(self, datagram: bytes) -> int:
        """Feed one datagram from the peer. 0, or -1 (short/wrong conv), -2, -3."""
        size = len(datagram)
        if size < OVERHEAD:
            return -1
        prev_una = self.snd_una
        have_ack = False
        maxack = latest_ts = 0
        conv = self.conv
        offset = 0
        unpack = _unpack_header_from
        while size - offset >= OVERHEAD:
            sconv, cmd, frg, wnd, ts, sn, una, length = unpack(datagram, offset)
            if sconv != conv:
                return -1
            offset += OVERHEAD
            if size - offset < length or length > 0x7FFFFFFF:
                return -2
            if cmd < CMD_PUSH or cmd > CMD_WINS:
                return -3
            self.rmt_wnd = wnd
            self._parse_una(una)
            if cmd == CMD_PUSH:
                if _diff(sn, self.rcv_nxt + self.rcv_wnd) < 0:
                    acks = self.acklist
                    if acks is _NO_ACKS:
                        self.acklist = [sn, ts]
                    else:
                        acks += (sn, ts)
                    if _diff(sn, self.rcv_nxt) >= 0:
                        self._parse_data(sn, frg, datagram[offset:offset + length])
            elif cmd == CMD_ACK:
                rtt = _diff(self.current, ts)
                if rtt >= 0:
                    self._update_ack(rtt)
                self._parse_ack(sn)
                if not have_ack:
                    have_ack = True
                    maxack, latest_ts = sn, ts
                elif _diff(sn, maxack) > 0 and _diff(ts, latest_ts) > 0:
                    maxack, latest_ts = sn, ts
            elif cmd == CMD_WASK:
                self.probe |= ASK_TELL
            offset += length
        if have_ack:
            self._parse_fastack(maxack, latest_ts)
        if _diff(self.snd_una, prev_una) > 0 and self.cwnd < self.rmt_wnd:
            self._grow_cwnd()
        return 0

    def _grow_cwnd(self) -> None:
        mss = self.mss
        if self.cwnd < self.ssthresh:
            self.cwnd += 1
            self.incr += mss
        else:
            if self.incr < mss:
                self.incr = mss
            self.incr += (mss * mss) // self.incr + (mss // 16)
            if (self.cwnd + 1) * mss <= self.incr:
                self.cwnd = (self.incr + mss - 1) // (mss if mss > 0 else 1)
        if self.cwnd > self.rmt_wnd:
            self.cwnd = self.rmt_wnd
            self.incr = self.rmt_wnd * mss

    def _update_ack(self, rtt: int) -> None:
        # ikcp does this in C int32 arithmetic; absurd RTTs (a forged ts)
        # overflow there, so the same wrapping is reproduced here.
        srtt = self.rx_srtt
        if srtt == 0:
            self.rx_srtt = rtt
            self.rx_rttval = rtt // 2
        elif rtt < 0x4000000 and srtt < 0x4000000 and 0 <= self.rx_rttval < 0x4000000:
            self.rx_rttval = (3 * self.rx_rttval + abs(rtt - srtt)) // 4
            self.rx_srtt = max((7 * srtt + rtt) // 8, 1)
        else:
            delta = abs(_i32(rtt - srtt))
            self.rx_rttval = _i32(_cdiv(_i32(3 * self.rx_rttval) + delta, 4))
            self.rx_srtt = max(_cdiv(_i32(7 * srtt + rtt), 8), 1)
        rto = (self.rx_srtt + max(self.interval, (4 * self.rx_rttval) & MASK)) & MASK
        self.rx_rto = min(max(self.rx_minrto, rto), RTO_MAX)

    def _shrink_buf(self) -> None:
        buf = self.snd_buf
        if buf:
            self.snd_una = next(iter(buf))
        else:
            self.snd_una = self.snd_nxt
            self.snd_buf = _NO_SEGMENTS

    def _parse_una(self, una: int) -> None:
        buf = self.snd_buf
        if not buf:
            return
        popitem = buf.popitem
        changed = False
        while buf:
            d = (una - next(iter(buf))) & MASK
            if d == 0 or d >= HALF:  # una <= first sn
                break
            popitem(last=False)
            changed = True
        if changed:
            self._shrink_buf()

    def _parse_ack(self, sn: int) -> None:
        # every key in snd_buf lies in [snd_una, snd_nxt): ikcp's range check
        buf = self.snd_buf
        if buf and buf.pop(sn, None) is not None and sn == self.snd_una:
            self._shrink_buf()

    def _parse_fastack(self, sn: int, ts: int) -> None:
        una = self.snd_una
        limit = (sn - una) & MASK  # sn's distance from snd_una
        if limit >= (self.snd_nxt - una) & MASK:
            return  # sn outside [snd_una, snd_nxt)
        for seg in self.snd_buf.values():
            if (seg.sn - una) & MASK >= limit:
                break  # sn == seg.sn is not counted, sn < seg.sn ends the walk
            if (ts - seg.ts) & MASK < HALF:  # seg.ts <= ts
                seg.fastack += 1

    def _parse_data(self, sn: int, frg: int, data: bytes) -> None:
        rcv_buf = self.rcv_buf
        if sn == self.rcv_nxt and not rcv_buf and len(self.rcv_queue) < self.rcv_wnd:
            # in order, nothing buffered: straight to the queue, as
            # _move_rcv_buf would move it (and rcv_buf never grows a table)
            queue = self.rcv_queue
            if queue is _EMPTY:
                queue = self.rcv_queue = deque()
            queue.append((frg, data))
            self.rcv_nxt = (sn + 1) & MASK
            return
        if sn not in rcv_buf:
            rcv_buf[sn] = (frg, data)
        self._move_rcv_buf()

    def _move_rcv_buf(self) -> None:
        rcv_buf = self.rcv_buf
        queue = self.rcv_queue
        rcv_wnd = self.rcv_wnd
        while rcv_buf and len(queue) < rcv_wnd:
            seg = rcv_buf.pop(self.rcv_nxt, None)
            if seg is None:
                break
            if queue is _EMPTY:
                queue = self.rcv_queue = deque()
            queue.append(seg)
            self.rcv_nxt = (self.rcv_nxt + 1) & MASK

    # -- time -------------------------------------------------------------------
    def update(self, current: int) -> None:
        """Advance the clock to `current` and flush when an interval is due."""
        current &= MASK
        self.current = current
        if not self.updated:
            self.updated = 1
            self.ts_flush = current
        slap = _diff(current, self.ts_flush)
        if slap >= 10000 or slap < -10000:
            self.ts_flush = current
            slap = 0
        if slap >= 0:
            self.ts_flush = (self.ts_flush + self.interval) & MASK
            if _diff(current, self.ts_flush) >= 0:
                self.ts_flush = (current + self.interval) & MASK
            self.flush()

    def check(self, current: int) -> int:
        """When to call update next (a clock value), ignoring pending acks/sends."""
        current &= MASK
        if not self.updated:
            return current
        ts_flush = self.ts_flush
        slap = _diff(current, ts_flush)
        if slap >= 10000 or slap <= -10000:
            ts_flush = current
            slap = 0
        if slap >= 0:
            return current
        minimal = -slap
        for seg in self.snd_buf.values():
            diff = (seg.resendts - current) & MASK
            if diff == 0 or diff >= HALF:  # due now or overdue
                return current
            if diff < minimal:
                minimal = diff
        if minimal >= self.interval:
            minimal = self.interval
        return (current + minimal) & MASK

    def flush(self) -> None:
        """Send pending acks, window probes and due data segments now."""
        if not self.updated:
            return
        current = self.current
        mtu = self.mtu
        conv = self.conv
        output = self.output
        rcv_nxt = self.rcv_nxt
        wnd = self.rcv_wnd - len(self.rcv_queue)
        if wnd < 0:
            wnd = 0
        wnd &= 0xFFFF
        parts: List[bytes] = []
        size = 0

        # acknowledgements, in arrival order
        acklist = self.acklist
        sn = ts = 0
        if acklist:
            for i in range(0, len(acklist), 2):
                if size + OVERHEAD > mtu:
                    output(b"".join(parts))
                    parts = []
                    size = 0
                sn = acklist[i]
                ts = acklist[i + 1]
                parts.append(_pack_header(conv, CMD_ACK, 0, wnd, ts, sn, rcv_nxt, 0))
                size += OVERHEAD
            self.acklist = _NO_ACKS

        # window probing
        if self.rmt_wnd == 0:
            if self.probe_wait == 0:
                self.probe_wait = PROBE_INIT
                self.ts_probe = (current + self.probe_wait) & MASK
            elif _diff(current, self.ts_probe) >= 0:
                if self.probe_wait < PROBE_INIT:
                    self.probe_wait = PROBE_INIT
                self.probe_wait += self.probe_wait // 2
                if self.probe_wait > PROBE_LIMIT:
                    self.probe_wait = PROBE_LIMIT
                self.ts_probe = (current + self.probe_wait) & MASK
                self.probe |= ASK_SEND
        else:
            self.ts_probe = 0
            self.probe_wait = 0
        if self.probe:
            for flag, cmd in ((ASK_SEND, CMD_WASK), (ASK_TELL, CMD_WINS)):
                if self.probe & flag:
                    if size + OVERHEAD > mtu:
                        output(b"".join(parts))
                        parts = []
                        size = 0
                    parts.append(_pack_header(conv, cmd, 0, wnd, ts, sn, rcv_nxt, 0))
                    size += OVERHEAD
            self.probe = 0

        # move data from the queue into the window
        cwnd = min(self.snd_wnd, self.rmt_wnd)
        if not self.nocwnd:
            cwnd = min(self.cwnd, cwnd)
        queue = self.snd_queue
        snd_buf = self.snd_buf
        if queue:
            limit = (self.snd_una + cwnd) & MASK
            snd_nxt = self.snd_nxt
            rx_rto = self.rx_rto
            if snd_buf is _NO_SEGMENTS and _diff(snd_nxt, limit) < 0:
                snd_buf = self.snd_buf = OrderedDict()
            while queue and _diff(snd_nxt, limit) < 0:
                seg = queue.popleft()
                seg.sn = snd_nxt
                seg.ts = current
                seg.resendts = current
                seg.rto = rx_rto
                snd_buf[snd_nxt] = seg
                snd_nxt = (snd_nxt + 1) & MASK
            self.snd_nxt = snd_nxt
            if not queue:
                self.snd_queue = _EMPTY

        # data segments: new, timed out, fast retransmit
        resent = self.fastresend if self.fastresend > 0 else MASK
        rtomin = (self.rx_rto >> 3) if self.nodelay_ == 0 else 0
        change = 0
        lost = False
        if snd_buf:
            nodelay = self.nodelay_
            fastlimit = self.fastlimit
            dead_link = self.dead_link
            rx_rto = self.rx_rto
            for seg in snd_buf.values():
                if seg.xmit == 0:
                    seg.rto = rx_rto
                    seg.resendts = (current + rx_rto + rtomin) & MASK
                elif (current - seg.resendts) & MASK < HALF:  # resendts <= current
                    self.xmit += 1
                    if nodelay == 0:
                        seg.rto = (seg.rto + max(seg.rto, rx_rto)) & MASK
                    else:
                        step = _i32(seg.rto) if nodelay < 2 else rx_rto
                        seg.rto = (seg.rto + _cdiv(step, 2)) & MASK
                    seg.resendts = (current + seg.rto) & MASK
                    lost = True
                elif seg.fastack >= resent and (seg.xmit <= fastlimit or fastlimit <= 0):
                    seg.fastack = 0
                    seg.resendts = (current + seg.rto) & MASK
                    change += 1
                else:
                    continue
                seg.xmit += 1
                seg.ts = current
                data = seg.data
                need = OVERHEAD + len(data)
                if size + need > mtu and size:
                    output(b"".join(parts))
                    parts = []
                    size = 0
                parts.append(_pack_header(conv, CMD_PUSH, seg.frg, wnd, current, seg.sn,
                                          rcv_nxt, len(data)))
                if data:
                    parts.append(data)
                size += need
                if seg.xmit >= dead_link:
                    self.state = MASK
        if size:
            output(b"".join(parts))

        if change:
            inflight = (self.snd_nxt - self.snd_una) & MASK
            self.ssthresh = max(inflight // 2, THRESH_MIN)
            self.cwnd = (self.ssthresh + resent) & MASK
            self.incr = (self.cwnd * self.mss) & MASK
        if lost:
            self.ssthresh = max(cwnd // 2, THRESH_MIN)
            self.cwnd = 1
            self.incr = self.mss
        if self.cwnd < 1:
            self.cwnd = 1
            self.incr = self.mss


# -- engine selection -----------------------------------------------------------
# setup.py compiles only what precedes this section (it looks for the line
# above), so the compiled copy holds no selection code.

PURE_KCP = KCP
"""The pure-Python engine class, whichever engine `KCP` is."""
IMPLEMENTATION = "pure"
"""Which engine `KCP` is: "compiled" (gkcp._kcp_compiled) or "pure"."""
ENGINE_NOTE = ""
"""Why `KCP` is the pure-Python engine, when it is."""


def engine_description() -> str:
    """Which engine `KCP` is, and why when pure, for logs and reports."""
    return f"{IMPLEMENTATION} ({ENGINE_NOTE})" if ENGINE_NOTE else IMPLEMENTATION


def source_digest(directory: str) -> str:
    """SHA-256 of what the compiled engine is built from: kcp.py and kcp.pxd
    in `directory`.  setup.py stores it in the extension as SOURCE_DIGEST."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("kcp.py", "kcp.pxd"):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        digest.update(b"%s %d\n" % (name.encode(), len(data)))
        digest.update(data)
    return digest.hexdigest()


def _compiled_engine() -> "tuple[Any, str]":
    """The compiled KCP class and "", or None and why not."""
    if os.environ.get("GKCP_PURE_PYTHON", "") not in ("", "0"):
        return None, "GKCP_PURE_PYTHON is set"
    try:
        compiled = importlib.import_module("gkcp._kcp_compiled")
    except ImportError as exc:
        return None, f"the compiled engine is not built: {exc}"
    try:
        digest = source_digest(os.path.dirname(os.path.abspath(__file__)))
    except OSError as exc:
        return None, f"cannot check the compiled engine against its source: {exc}"
    if getattr(compiled, "SOURCE_DIGEST", None) != digest:
        return None, ("the compiled engine is stale, built from another kcp.py or kcp.pxd: "
                      "rebuild it with pip install -e . or python setup.py build_ext --inplace")
    return compiled.KCP, ""


if __name__ == "gkcp.kcp":  # not when setup.py runs this file for source_digest
    _compiled_kcp, ENGINE_NOTE = _compiled_engine()
    if _compiled_kcp is not None:
        KCP = _compiled_kcp  # type: ignore[misc]
        IMPLEMENTATION = "compiled"
    del _compiled_kcp
