"""Virtual-clock tools for testing KCP engines against ikcp.

Theory of operation
-------------------
Everything here runs on a virtual clock: nothing sleeps and nothing reads the
wall clock, so a run is a pure function of its seed.

``Link``
    One direction of a datagram path.  Each link owns a seeded
    ``random.Random``; loss, delay, jitter, reordering, duplication, a queue
    limit and a rate limit are drawn from it, and only for the features that
    are switched on, so two links built with the same arguments behave the same
    for the same sequence of datagrams.  Links keep FIFO order unless
    ``reorder`` is set (like ikcp's test.h ``LatencySimulator``: a datagram
    that is due waits behind an earlier one that is not).

``OracleKCP``
    The reference: PyPI ``siokcp`` (a thin Cython wrapper of ikcp.c v1 with
    ``IKCP_FASTACK_CONSERVE``) behind the interface of ``gkcp.kcp.KCP``.

``Twin``
    Drives an ``OracleKCP`` and a ``gkcp`` engine in lock step.  Every call
    goes to both; return values, the datagrams each engine output during the
    call (bytes and boundaries) and, by default, every control-block field are
    compared; the first difference raises ``Mismatch`` with a replayable
    history of the calls.  Because the two engines must agree datagram for
    datagram, one ``Twin`` pair behind one link *is* "an ikcp pair and a gkcp
    pair through the same seeded link": the link sees a single sequence of
    datagrams, and the run stops at the first datagram where they would have
    parted.

``Pair``
    Two endpoints (any engine with the KCP interface, or ``Twin``) joined by
    two links, with helpers that advance the clock, deliver, update, receive
    and run until quiet within a bounded number of rounds.

``echo_latency`` / ``CRand``
    ikcp's test.cpp latency scenario on the virtual clock; with a ``CRand``
    (glibc ``rand()``) shared by both links it reproduces a virtual-clock
    build of test.cpp exactly.

``KCPSIM_SELF_CHECK=1``
    Makes ``engine_class()`` return ``OracleKCP``: the suite then runs ikcp
    against itself, which checks the tests, not gkcp.

Clocks
------
Engines see 32-bit millisecond clocks: ``(start_ms + now_ms) & MASK32``;
``now_ms`` (virtual time since the start, unbounded) is what the links use.
Tests start just below 2**32 so the engine clock wraps during the run.

Rules kept
----------
* Nothing here imports gevent or sockets.
* ``OracleKCP`` never emulates ikcp: every call goes to ikcp.c.  The only
  translation is of siokcp's error *reporting* (see ``OracleKCP.send``).
"""

from __future__ import annotations

import heapq
import math
import operator
import os
import random
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import siokcp

MASK32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------

HEADER = struct.Struct("<IBBHIIII")  # conv cmd frg wnd ts sn una len
OVERHEAD = HEADER.size  # 24

CMD_PUSH = 81
CMD_ACK = 82
CMD_WASK = 83
CMD_WINS = 84

CONV = 0x11223344


def seg(
    cmd: int,
    *,
    conv: int = CONV,
    frg: int = 0,
    wnd: int = 128,
    ts: int = 0,
    sn: int = 0,
    una: int = 0,
    data: bytes = b"",
    length: int | None = None,
) -> bytes:
    """One handcrafted segment; ``length`` overrides the ``len`` field."""
    return (
        HEADER.pack(
            conv & MASK32,
            cmd & 0xFF,
            frg & 0xFF,
            wnd & 0xFFFF,
            ts & MASK32,
            sn & MASK32,
            una & MASK32,
            (len(data) if length is None else length) & MASK32,
        )
        + data
    )


class Segment(NamedTuple):
    conv: int
    cmd: int
    frg: int
    wnd: int
    ts: int
    sn: int
    una: int
    data: bytes


def parse(datagram: bytes) -> list[Segment]:
    """Split a well-formed datagram (as KCP outputs them) into segments."""
    out = []
    pos = 0
    while pos < len(datagram):
        conv, cmd, frg, wnd, ts, sn, una, length = HEADER.unpack_from(datagram, pos)
        pos += OVERHEAD
        data = datagram[pos : pos + length]
        if len(data) != length:
            raise ValueError(f"truncated segment at offset {pos - OVERHEAD}")
        pos += length
        out.append(Segment(conv, cmd, frg, wnd, ts, sn, una, data))
    return out


def parse_all(datagrams: Iterable[bytes]) -> list[Segment]:
    return [s for d in datagrams for s in parse(d)]


# ---------------------------------------------------------------------------
# Control block fields
# ---------------------------------------------------------------------------

FIELDS = (
    "conv", "mtu", "mss", "state", "stream",
    "snd_una", "snd_nxt", "rcv_nxt", "ts_recent", "ts_lastack", "ssthresh",
    "rx_rttval", "rx_srtt", "rx_rto", "rx_minrto",
    "snd_wnd", "rcv_wnd", "rmt_wnd", "cwnd", "probe",
    "current", "interval", "ts_flush", "xmit", "updated",
    "ts_probe", "probe_wait", "dead_link", "incr",
    "fastresend", "fastlimit", "nocwnd", "nodelay_",
    "nsnd_que", "nrcv_que", "nsnd_buf", "nrcv_buf",
)  # fmt: skip

# Fields that are signed in ikcp.h (IINT32 rx_*, int fastresend...).  siokcp
# shows the rx_* ones as uint32; they are compared as 32-bit patterns.  Every
# other field is an IUINT32 and must match exactly, in 0..2**32-1.
SIGNED_FIELDS = frozenset(
    {"rx_rttval", "rx_srtt", "rx_rto", "rx_minrto", "fastresend", "fastlimit", "nocwnd", "stream"}
)
_snapshot = operator.attrgetter(*FIELDS)


def snapshot(kcp) -> dict[str, int]:
    return dict(zip(FIELDS, _snapshot(kcp)))


def field_differences(ref, new) -> list[str]:
    """Fields where engine ``new`` differs from the oracle ``ref``."""
    diffs = []
    for name, r, n in zip(FIELDS, _snapshot(ref), _snapshot(new)):
        if name in SIGNED_FIELDS:
            same = type(n) is int and (r & MASK32) == (n & MASK32)
        else:
            same = type(n) is int and r == n
        if not same:
            diffs.append(f"{name}: ikcp={r!r} engine={n!r}")
    return diffs


# ---------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------

_SEND_ERROR = re.compile(r"kcp send error: (-?\d+)")


def _ignore_log(_message: str) -> None:
    pass


class OracleKCP:
    """ikcp.c (through siokcp) with the interface of ``gkcp.kcp.KCP``.

    Translations, all of error reporting only:

    * ``send`` returns ikcp_send's code.  siokcp raises
      ``ValueError("kcp send error: <code>")`` for a negative return; the code
      is parsed back out of that message.
    * Empty sends are passed straight to ikcp_send: siokcp 0.0.5 is built with
      ``boundscheck=False``, so ``send(b"")`` calls ``ikcp_send(kcp, p, 0)``,
      which returns 0 and (message mode) queues a real zero-length segment.
      (Older notes say the wrapper raises here; it does not in this build.
      ``test_oracle_adapter_passes_empty_messages_to_ikcp`` pins that down.)
    * ``recv`` is siokcp's ``next_event``: ``ikcp_peeksize`` then
      ``ikcp_recv`` into a buffer of exactly that size; ``None`` for any
      negative result (empty or incomplete).
    * ``state`` is shown as ikcp's IUINT32 (siokcp shows it as a signed int).
    * Output: siokcp requires the callback to return an int and swallows
      exceptions raised in it; the adapter returns 0 and re-raises them after
      the call.
    """

    __slots__ = ("_c", "_output", "_error")

    def __init__(self, conv: int, output: Callable[[bytes], object]):
        self._output = output
        self._error: BaseException | None = None
        self._c = siokcp.KCPConnection(conv, self._send_cb, _ignore_log)

    def _send_cb(self, data: bytes) -> int:
        try:
            self._output(data)
        except BaseException as exc:  # re-raised by _reraise
            if self._error is None:
                self._error = exc
        return 0

    def _reraise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def send(self, data: bytes) -> int:
        try:
            return self._c.send(bytes(data))
        except ValueError as exc:
            m = _SEND_ERROR.fullmatch(str(exc))
            if m is None:
                raise
            return int(m.group(1))

    def recv(self) -> bytes | None:
        return self._c.next_event()

    def input(self, datagram: bytes) -> int:
        return self._c.receive_data(bytes(datagram))

    def update(self, current: int) -> None:
        self._c.update(current & MASK32)
        self._reraise()

    def check(self, current: int) -> int:
        return self._c.check(current & MASK32)

    def flush(self) -> None:
        self._c.flush()
        self._reraise()

    def peeksize(self) -> int:
        return self._c.peeksize()

    def setmtu(self, mtu: int) -> int:
        return self._c.setmtu(mtu)

    def wndsize(self, sndwnd: int, rcvwnd: int) -> int:
        return self._c.wndsize(sndwnd, rcvwnd)

    def nodelay(self, nodelay: int, interval: int, resend: int, nc: int) -> int:
        return self._c.nodelay(nodelay, interval, resend, nc)

    def waitsnd(self) -> int:
        return self._c.waitsnd()

    @property
    def state(self) -> int:
        return self._c.state & MASK32

    @state.setter
    def state(self, value: int) -> None:
        value &= MASK32
        self._c.state = value - (1 << 32) if value >= 1 << 31 else value


def _passthrough(name: str) -> property:
    return property(
        lambda self: getattr(self._c, name),
        lambda self, value: setattr(self._c, name, value),
    )


for _name in FIELDS:
    if _name != "state":
        setattr(OracleKCP, _name, _passthrough(_name))
del _name


def engine_class():
    """gkcp's engine class (imported lazily: the oracle works without it).

    With KCPSIM_SELF_CHECK=1 in the environment this returns ``OracleKCP``
    instead: the whole suite then runs ikcp against itself, which checks the
    tests and the harness, not gkcp.
    """
    if os.environ.get("KCPSIM_SELF_CHECK") == "1":
        return OracleKCP
    from gkcp.kcp import KCP

    return KCP


# ---------------------------------------------------------------------------
# Lock-step comparison
# ---------------------------------------------------------------------------


class Mismatch(AssertionError):
    """gkcp's engine and ikcp parted ways."""


# Calls whose return values are part of the contract.
_COMPARED = frozenset({"send", "recv", "input", "check", "peeksize", "setmtu", "waitsnd"})
_FIELD_SET = frozenset(FIELDS)


def _short(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...<{len(text)} chars>"


class Twin:
    """ikcp and gkcp's engine driven call by call, compared after every call.

    Reading a control-block field returns the common value (after checking
    both agree); assigning one assigns it on both.  ``history`` records every
    call so a failure can be replayed with ``replay`` and shrunk with
    ``minimize``.
    """

    def __init__(
        self,
        conv: int,
        output: Callable[[bytes], object] | None = None,
        *,
        engine=None,
        fields: bool = True,
        name: str = "kcp",
    ):
        d = self.__dict__
        d["name"] = name
        d["output"] = output
        d["fields"] = fields
        d["history"] = [("create", conv)]
        d["_ref_out"] = []
        d["_new_out"] = []
        d["ref"] = OracleKCP(conv, self._ref_out.append)
        try:
            d["new"] = (engine or engine_class())(conv, self._new_out.append)
        except Exception as exc:
            self._fail(f"KCP({conv:#x}, output) raised {exc!r}")
        self.compare_fields()

    # -- failure reporting ---------------------------------------------------

    def _fail(self, what: str) -> None:
        lines = [f"{self.name}: {what}", f"after {len(self.history)} calls; last ones:"]
        lines += ["    " + _format_call(c) for c in self.history[-12:]]
        lines.append("reproduce with kcpsim.replay(<twin>.history) / kcpsim.minimize(...)")
        raise Mismatch("\n".join(lines))

    def compare_fields(self) -> None:
        diffs = field_differences(self.ref, self.new)
        if diffs:
            self._fail("control block differs: " + "; ".join(diffs))

    # -- the calls -----------------------------------------------------------

    def _call(self, method: str, *args):
        self.history.append(("call", method, args))
        ref_out, new_out = self._ref_out, self._new_out
        ref_result = getattr(self.ref, method)(*args)
        try:
            new_result = getattr(self.new, method)(*args)
        except Exception as exc:
            self._fail(f"{method}{_short(args)} raised {exc!r}; ikcp returned {ref_result!r}")
        if method in _COMPARED:
            if method == "recv":
                same = new_result is None if ref_result is None else (
                    type(new_result) is bytes and new_result == ref_result
                )
            else:
                same = type(new_result) is int and new_result == ref_result
            if not same:
                self._fail(
                    f"{method}{_short(args)} returned {_short(new_result)}; "
                    f"ikcp returned {_short(ref_result)}"
                )
        if ref_out != new_out or any(type(d) is not bytes for d in new_out):
            self._fail(
                f"{method}{_short(args)} output differs:\n"
                f"  ikcp   {len(ref_out)} datagrams {_describe(ref_out)}\n"
                f"  engine {len(new_out)} datagrams {_describe(new_out)}"
            )
        if self.fields:
            self.compare_fields()
        if ref_out:
            datagrams = list(ref_out)
            ref_out.clear()
            new_out.clear()
            if self.output is not None:
                for d in datagrams:
                    self.output(d)
        return ref_result

    def send(self, data: bytes) -> int:
        return self._call("send", bytes(data))

    def recv(self) -> bytes | None:
        return self._call("recv")

    def input(self, datagram: bytes) -> int:
        return self._call("input", bytes(datagram))

    def update(self, current: int) -> None:
        self._call("update", current)

    def check(self, current: int) -> int:
        return self._call("check", current)

    def flush(self) -> None:
        self._call("flush")

    def peeksize(self) -> int:
        return self._call("peeksize")

    def setmtu(self, mtu: int) -> int:
        return self._call("setmtu", mtu)

    def wndsize(self, sndwnd: int, rcvwnd: int) -> None:
        self._call("wndsize", sndwnd, rcvwnd)

    def nodelay(self, nodelay: int, interval: int, resend: int, nc: int) -> None:
        self._call("nodelay", nodelay, interval, resend, nc)

    def waitsnd(self) -> int:
        return self._call("waitsnd")

    # -- fields --------------------------------------------------------------

    def __getattr__(self, name: str):
        if name not in _FIELD_SET:
            raise AttributeError(name)
        ref_value = getattr(self.ref, name)
        new_value = getattr(self.new, name)
        mask = MASK32 if name in SIGNED_FIELDS else -1
        if type(new_value) is not int or (ref_value & mask) != (new_value & mask):
            self._fail(f"field {name}: ikcp={ref_value!r} engine={new_value!r}")
        return ref_value

    def __setattr__(self, name: str, value: int) -> None:
        if name not in _FIELD_SET:
            raise AttributeError(f"Twin has no settable field {name!r}")
        self.history.append(("set", name, value))
        setattr(self.ref, name, value)
        try:
            setattr(self.new, name, value)
        except Exception as exc:
            self._fail(f"setting {name} = {value!r} raised {exc!r}")
        if self.fields:
            self.compare_fields()


def _describe(datagrams: list) -> str:
    parts = []
    for d in datagrams[:6]:
        try:
            segs = parse(bytes(d))
            desc = ",".join(
                f"{s.cmd}/sn{s.sn}/ts{s.ts}/una{s.una}/wnd{s.wnd}/frg{s.frg}/len{len(s.data)}"
                for s in segs
            )
        except Exception:
            desc = "unparseable"
        parts.append(f"[{type(d).__name__} {len(d)}B: {desc}]")
    if len(datagrams) > 6:
        parts.append("...")
    return " ".join(parts)


def _format_call(call: tuple) -> str:
    if call[0] == "create":
        return f"k = KCP({call[1]:#x}, output)"
    if call[0] == "set":
        return f"k.{call[1]} = {call[2]!r}"
    return f"k.{call[1]}({', '.join(_short(a, 120) for a in call[2])})"


def replay(history: list[tuple], *, engine=None, fields: bool = True) -> Twin:
    """Re-run a Twin history on fresh engines; raises Mismatch where they part."""
    twin = Twin(history[0][1], engine=engine, fields=fields)
    for call in history[1:]:
        if call[0] == "set":
            setattr(twin, call[1], call[2])
        else:
            twin._call(call[1], *call[2])
    return twin


def minimize(history: list[tuple], *, engine=None, max_tests: int = 2000) -> list[tuple]:
    """Shrink a failing history (delta debugging over its calls).

    Keeps the creation call; returns a history that still raises Mismatch.
    """

    def fails(calls: list[tuple]) -> bool:
        try:
            replay([history[0], *calls], engine=engine)
        except Mismatch:
            return True
        except Exception:
            return False
        return False

    calls = list(history[1:])
    if not fails(calls):
        raise ValueError("history does not fail")
    tests = 0
    chunks = 2
    while len(calls) >= 1 and tests < max_tests:
        size = math.ceil(len(calls) / chunks)
        removed = False
        for start in range(0, len(calls), size):
            candidate = calls[:start] + calls[start + size :]
            tests += 1
            if candidate != calls and fails(candidate):
                calls = candidate
                chunks = max(chunks - 1, 2)
                removed = True
                break
        if not removed:
            if size == 1:
                break
            chunks = min(chunks * 2, len(calls))
    return [history[0], *calls]


def format_history(history: list[tuple]) -> str:
    return "\n".join(_format_call(c) for c in history)


# ---------------------------------------------------------------------------
# The link
# ---------------------------------------------------------------------------


@dataclass
class LinkStats:
    sent: int = 0
    lost: int = 0
    overflowed: int = 0
    duplicated: int = 0
    reordered: int = 0
    delivered: int = 0
    bytes_delivered: int = 0


class Link:
    """One direction of a lossy, delaying datagram path on a virtual clock.

    loss         probability a datagram is dropped (drawn for every datagram)
    loss_deck    if set, loss is drawn without replacement from a shuffled deck
                 of this many cards of which round(loss * loss_deck) lose (as
                 test.h's ``Random``: exactly 5 of every 100 at 5 %)
    delay_ms     (lo, hi): one-way delay, uniform integer in [lo, hi]
    jitter_ms    extra delay, uniform integer in [0, jitter_ms]
    queue_limit  datagrams in the link (not yet delivered) beyond which new
                 ones are dropped
    reorder      probability a datagram leaves the FIFO and takes an extra
                 delay in [1, reorder_ms], so later datagrams may overtake it
    duplicate    probability a second copy is scheduled (its own delay)
    rate         bytes per ms the link serialises (None: unlimited)
    rng          a random source to use instead of ``random.Random(seed)``
                 (anything with random/randrange/randint; links may share one)

    Otherwise FIFO: a datagram is never delivered before one sent earlier.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        loss: float = 0.0,
        loss_deck: int | None = None,
        delay_ms: tuple[int, int] = (0, 0),
        jitter_ms: int = 0,
        queue_limit: int | None = None,
        reorder: float = 0.0,
        reorder_ms: int = 50,
        duplicate: float = 0.0,
        rate: float | None = None,
        rng=None,
    ):
        self.rng = rng if rng is not None else random.Random(seed)
        self.loss = loss
        self.loss_deck = loss_deck
        self._deck: list[int] = []
        self._deck_size = 0
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self.queue_limit = queue_limit
        self.reorder = reorder
        self.reorder_ms = reorder_ms
        self.duplicate = duplicate
        self.rate = rate
        self.stats = LinkStats()
        self._queue: list[tuple[int, int, bytes]] = []  # heap (arrival, seq, datagram)
        self._seq = 0
        self._fifo_ms = 0  # arrival time of the last FIFO datagram
        self._busy_until = 0.0

    def __len__(self) -> int:
        return len(self._queue)

    def _lost(self) -> bool:
        if self.loss_deck:
            if self._deck_size == 0:
                self._deck = list(range(self.loss_deck))
                self._deck_size = self.loss_deck
            i = self.rng.randrange(self._deck_size)
            card = self._deck[i]
            self._deck_size -= 1
            self._deck[i] = self._deck[self._deck_size]
            return card < round(self.loss * self.loss_deck)
        return self.loss > 0 and self.rng.random() < self.loss

    def send(self, now_ms: int, datagram: bytes) -> None:
        self.stats.sent += 1
        if self._lost():
            self.stats.lost += 1
            return
        copies = 1
        if self.duplicate and self.rng.random() < self.duplicate:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            self._schedule(now_ms, bytes(datagram))

    def _schedule(self, now_ms: int, datagram: bytes) -> None:
        if self.queue_limit is not None and len(self._queue) >= self.queue_limit:
            self.stats.overflowed += 1
            return
        start = float(now_ms)
        if self.rate:
            start = max(start, self._busy_until) + len(datagram) / self.rate
            self._busy_until = start
        lo, hi = self.delay_ms
        arrival = math.ceil(start) + (self.rng.randint(lo, hi) if hi > lo else lo)
        if self.jitter_ms:
            arrival += self.rng.randint(0, self.jitter_ms)
        if self.reorder and self.rng.random() < self.reorder:
            arrival += self.rng.randint(1, max(1, self.reorder_ms))
            self.stats.reordered += 1
        else:
            arrival = max(arrival, self._fifo_ms)
            self._fifo_ms = arrival
        heapq.heappush(self._queue, (arrival, self._seq, datagram))
        self._seq += 1

    def next_arrival(self) -> int | None:
        return self._queue[0][0] if self._queue else None

    def deliver(self, now_ms: int) -> list[bytes]:
        """Datagrams due by ``now_ms``, in arrival order."""
        out = []
        queue = self._queue
        while queue and queue[0][0] <= now_ms:
            out.append(heapq.heappop(queue)[2])
        self.stats.delivered += len(out)
        self.stats.bytes_delivered += sum(map(len, out))
        return out


# ---------------------------------------------------------------------------
# Two endpoints
# ---------------------------------------------------------------------------

EngineFactory = Callable[[int, Callable[[bytes], object]], object]


def oracle_factory(conv: int, output: Callable[[bytes], object]) -> OracleKCP:
    return OracleKCP(conv, output)


def engine_factory(conv: int, output: Callable[[bytes], object]):
    return engine_class()(conv, output)


def twin_factory(name: str, *, fields: bool = True) -> EngineFactory:
    def make(conv: int, output: Callable[[bytes], object]) -> Twin:
        return Twin(conv, output, fields=fields, name=name)

    return make


@dataclass
class Endpoint:
    name: str
    kcp: object = None
    sent: list[bytes] = field(default_factory=list)  # what send() accepted
    received: list[bytes] = field(default_factory=list)
    input_codes: list[int] = field(default_factory=list)
    receiving: bool = True

    def send(self, data: bytes) -> int:
        """Send, and record what the engine accepted."""
        r = self.kcp.send(data)
        if r >= 0:
            # stream mode may accept a prefix; message mode all or nothing
            self.sent.append(bytes(data[:r]) if r < len(data) else bytes(data))
        return r

    def drain(self) -> None:
        while (m := self.kcp.recv()) is not None:
            self.received.append(m)


class Pair:
    """Endpoints a and b joined by links ab and ba, on one virtual clock.

    ``tick(ms)`` advances the clock, delivers what is due to each side
    (a first), updates a then b at the new time, and drains both receive
    queues (unless an endpoint's ``receiving`` is False).
    """

    def __init__(
        self,
        make_a: EngineFactory,
        make_b: EngineFactory,
        ab: Link | None = None,
        ba: Link | None = None,
        *,
        conv: int = CONV,
        start_ms: int = 0,
    ):
        self.now_ms = 0
        self.start_ms = start_ms
        self.skew_ms = 0  # extra offset of the engines' clock (may go backwards)
        self.ab = ab if ab is not None else Link()
        self.ba = ba if ba is not None else Link()
        self.a = Endpoint("a")
        self.b = Endpoint("b")
        self.a.kcp = make_a(conv, lambda d: self.ab.send(self.now_ms, d))
        self.b.kcp = make_b(conv, lambda d: self.ba.send(self.now_ms, d))

    @property
    def clock(self) -> int:
        """The engines' 32-bit clock."""
        return (self.start_ms + self.now_ms + self.skew_ms) & MASK32

    def deliver(self) -> None:
        for d in self.ab.deliver(self.now_ms):
            self.b.input_codes.append(self.b.kcp.input(d))
        for d in self.ba.deliver(self.now_ms):
            self.a.input_codes.append(self.a.kcp.input(d))

    def update(self) -> None:
        self.a.kcp.update(self.clock)
        self.b.kcp.update(self.clock)

    def drain(self) -> None:
        for ep in (self.a, self.b):
            if ep.receiving:
                ep.drain()

    def tick(self, ms: int = 1) -> None:
        self.now_ms += ms
        self.deliver()
        self.update()
        self.drain()

    def next_event_ms(self, limit_ms: int) -> int:
        """Milliseconds to the next check() deadline or arrival (1..limit)."""
        clock = self.clock
        due = [
            (self.a.kcp.check(clock) - clock) & MASK32,
            (self.b.kcp.check(clock) - clock) & MASK32,
        ]
        for link in (self.ab, self.ba):
            arrival = link.next_arrival()
            if arrival is not None:
                due.append(arrival - self.now_ms)
        return max(1, min(min(due), limit_ms))

    def quiet(self) -> bool:
        return (
            not self.ab
            and not self.ba
            and self.a.kcp.waitsnd() == 0
            and self.b.kcp.waitsnd() == 0
            and self.a.kcp.peeksize() < 0
            and self.b.kcp.peeksize() < 0
        )

    def run_until_quiet(self, max_rounds: int = 10000, step_ms: int | None = None) -> int:
        """Tick until quiet; returns rounds used, raises if not quiet in time.

        With ``step_ms`` None the step is taken from check() and the links
        (bounded by 1000 ms), so idle stretches cost few rounds.
        """
        for rounds in range(1, max_rounds + 1):
            self.tick(step_ms if step_ms else self.next_event_ms(1000))
            if self.quiet():
                return rounds
        raise AssertionError(
            f"not quiet after {max_rounds} rounds: waitsnd a={self.a.kcp.waitsnd()} "
            f"b={self.b.kcp.waitsnd()}, in links ab={len(self.ab)} ba={len(self.ba)}"
        )


def assert_delivered(sender: Endpoint, receiver: Endpoint, *, stream: bool) -> None:
    """receiver got exactly what sender's engine accepted, in order."""
    if stream:
        got, want = b"".join(receiver.received), b"".join(sender.sent)
        assert got == want, f"stream differs: got {len(got)} bytes, sent {len(want)}"
    else:
        assert len(receiver.received) == len(sender.sent), (
            f"got {len(receiver.received)} messages, sent {len(sender.sent)}"
        )
        for i, (got, want) in enumerate(zip(receiver.received, sender.sent)):
            assert got == want, f"message {i} differs ({len(got)} vs {len(want)} bytes)"


# ---------------------------------------------------------------------------
# ikcp's test.cpp, on the virtual clock
# ---------------------------------------------------------------------------


class CRand:
    """The C library's ``rand()`` as glibc implements it (TYPE_3 additive
    feedback generator), after ``srand(seed)``; 1 is the unseeded default.

    With one CRand shared by both links, ``echo_latency`` draws the same
    numbers in the same order as test.cpp's LatencySimulator, so it
    reproduces a build of test.cpp whose iclock()/isleep() run on a virtual
    millisecond counter, figure for figure.
    """

    def __init__(self, seed: int = 1):
        r = [seed]
        for i in range(1, 31):
            hi, lo = divmod(r[i - 1], 127773)
            word = 16807 * lo - 2836 * hi
            r.append(word + 2147483647 if word < 0 else word)
        r += r[0:3]
        for i in range(34, 344):
            r.append((r[i - 31] + r[i - 3]) & MASK32)
        self._r = r[-34:]

    def rand(self) -> int:
        r = self._r
        value = (r[-31] + r[-3]) & MASK32
        r.append(value)
        del r[0]
        return value >> 1

    def randrange(self, n: int) -> int:
        return self.rand() % n

    def randint(self, lo: int, hi: int) -> int:
        return lo + self.rand() % (hi - lo + 1)

    def random(self) -> float:
        return self.rand() / 2147483648.0

# test.cpp's three modes: ikcp_nodelay arguments, plus fields it sets on kcp1
ECHO_MODES = {
    "default": ((0, 10, 0, 0), {}),
    "normal": ((0, 10, 0, 1), {}),
    "fast": ((2, 10, 2, 1), {"rx_minrto": 10, "fastresend": 1}),
}
# published results in test.cpp (avg/max RTT, ms)
ECHO_PUBLISHED = {"default": (740, 1507), "normal": (156, 571), "fast": (138, 392)}
_ECHO_MESSAGE = struct.Struct("<II")  # index, send time


@dataclass
class EchoResult:
    mode: str
    rtts: list[int]
    tx1: int  # datagrams kcp1 handed to the network (test.cpp's vnet->tx1)
    tx2: int
    elapsed_ms: int

    @property
    def avg(self) -> int:
        return sum(self.rtts) // len(self.rtts)

    @property
    def max(self) -> int:
        return max(self.rtts)


def echo_latency(
    factory: EngineFactory,
    mode: str,
    *,
    seed: int = 1,
    start_ms: int = 0,
    messages: int = 1000,
    max_ms: int = 600_000,
    rng=None,
) -> EchoResult:
    """ikcp's test.cpp ``test(mode)`` with its LatencySimulator(10, 60, 125).

    LatencySimulator(lostrate=10, rttmin=60, rttmax=125) halves each figure
    per direction: 5 % loss each way, drawn from a deck of 100 (exactly 5 of
    every 100 datagrams), a one-way delay of 30 + rand() % 32 ms (30..61),
    FIFO delivery (a due datagram waits behind an earlier one), at most
    1000 datagrams queued per direction.  The loop, every virtual 1 ms:
    update kcp1 and kcp2; kcp1 sends an 8-byte message (index, send time)
    every 20 ms; deliver p1->p2 then p2->p1; kcp2 echoes what it receives;
    kcp1 records ``current - ts``.  It stops once message index 1000 has
    come back (1001 messages, as test.cpp's ``next > 1000``).

    One deliberate difference: test.cpp compares ``current >= slap`` as
    unsigned numbers, which stalls when the clock wraps; here the wrapping
    difference is used so the run can start just below 2**32.

    ``rng``: one random source for both directions instead of a seeded one
    each (test.cpp draws everything from the C library's ``rand()``).
    """
    nodelay, kcp1_fields = ECHO_MODES[mode]
    now = 0
    shape = dict(loss=0.05, loss_deck=100, delay_ms=(30, 61), queue_limit=1000, rng=rng)
    link12 = Link(seed * 2 + 1, **shape)
    link21 = Link(seed * 2 + 2, **shape)
    kcp1 = factory(0x11223344, lambda d: link12.send(now, d))
    kcp2 = factory(0x11223344, lambda d: link21.send(now, d))
    for k in (kcp1, kcp2):
        k.wndsize(128, 128)
        k.nodelay(*nodelay)
    for name, value in kcp1_fields.items():
        setattr(kcp1, name, value)

    current = start_ms & MASK32
    slap = (current + 20) & MASK32
    index = 0
    expected = 0
    rtts: list[int] = []
    pack, unpack = _ECHO_MESSAGE.pack, _ECHO_MESSAGE.unpack
    while expected <= messages:
        now += 1
        if now > max_ms:
            raise AssertionError(f"{mode}: only {expected} echoes after {max_ms} ms")
        current = (start_ms + now) & MASK32
        kcp1.update(current)
        kcp2.update(current)
        while ((current - slap) & MASK32) < 0x80000000:  # current >= slap, wrapping
            kcp1.send(pack(index, current))
            index += 1
            slap = (slap + 20) & MASK32
        for d in link12.deliver(now):
            kcp2.input(d)
        for d in link21.deliver(now):
            kcp1.input(d)
        while (m := kcp2.recv()) is not None:
            kcp2.send(m)
        while (m := kcp1.recv()) is not None:
            sn, ts = unpack(m)
            if sn != expected:
                raise AssertionError(f"{mode}: echo {sn} arrived, expected {expected}")
            expected += 1
            rtts.append((current - ts) & MASK32)
    return EchoResult(mode, rtts, link12.stats.sent, link21.stats.sent, now)
