"""Pacing: a peer's datagrams leave at a set rate, and its window follows.

Without pacing, KCP with nc=1 (every mode here) sends a whole window at
once whenever it may: on a path with a slower bottleneck the burst
overflows the bottleneck's queue, and the drops cost retransmissions (the
wire carries 3-4 bytes per payload byte on the benchmark's 1 %-loss link).
The `ratelimit` option names the path's rate; then each peer gets

* a `Pacer`: a token bucket that lets datagrams go at `ratelimit` (IP
  bytes, so UDP/IP headers and sealing count) with bursts of at most a
  few milliseconds, and queues the rest in order;
* metering: before each flush a conversation's send window is set so
  that KCP puts out no more new segments than the bucket's tokens allow
  (the rest stay in KCP's send queue, and the conversation is flushed
  again when tokens are there).  So KCP stamps a segment when it really
  leaves, its RTT samples and retransmission timers stay true, and the
  pacer's own queue only ever holds ACKs, control and retransmissions;
* a window cap (`paced_window`): segments in flight per conversation are
  held to `WINDOW_GAIN` x rate x the smallest round trip seen, which
  bounds what a rate set above the path's can pile up in the path's
  queue.

Datagrams of at most `SMALL` bytes (ACKs, control, keystrokes) are queued
ahead of full-size ones: they cost little rate and keep small requests
fast while a bulk transfer fills the queue.  KCP copes with the reordering
this can cause between its own segments.

With ``ratelimit=auto`` the rate is not given but measured, after BBR's
idea (`AutoRate`): once per round trip the bytes the peer acknowledged give
a delivery-rate sample; the largest of the last `BW_ROUNDS` samples is the
path's rate estimate; the pacer runs at a gain times that: 2.5 while the
estimate still grows by a quarter per round (start-up), then one round at
1/2.5 (drain the queue that start-up built), then cycling 1.25, 1.25,
0.75, 1, 1, 1, 1, 1 (probe for more for two rounds, since a round's
samples show the rate of the round before; drain; cruise).  A sample
lowers the estimate only if the pacer held the sender back in that round
and never sat with a full bucket (a sender short of data says little).

Nothing here does I/O or reads a clock: the caller passes `now` (seconds)
and sends what `release` returns.
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Deque, List, Optional

__all__ = ["Pacer", "AutoRate", "AUTO", "parse_rate", "paced_window", "IP_UDP_OVERHEAD"]

#: bytes the IP and UDP headers add to a datagram, by address family
IP_UDP_OVERHEAD = {4: 28, 6: 48}
BURST_S = 0.004  # bucket depth: this much time at the rate ...
BURST_MIN = 4 * 1500  # ... but at least a few full-size packets
QUEUE_S = 1.0  # queue at most this much time at the rate; drop beyond (KCP resends)
QUEUE_MIN = 256 * 1024
SMALL = 256  # datagrams this small are queued ahead of full-size ones
WINDOW_GAIN = 5.0  # a lost segment holds snd_una for about a round trip:
#                    the window must cover that round trip and the next
RTT_FLOOR_MS = 10  # a smaller round trip is clock granularity, not the path
WINDOW_LEAST = 8  # segments: enough for fast retransmission to work

SEND, QUEUED, DROPPED = 0, 1, 2

AUTO = -1.0  # Options.ratelimit for ratelimit=auto


class Pacer:
    """A token bucket in front of one peer's socket."""

    __slots__ = ("rate", "depth", "tokens", "stamp", "limit", "queued", "bulk", "small",
                 "overhead", "free_small", "largest", "idle")

    def __init__(self, rate_bps: float, overhead: int, now: float,
                 free_small: bool = False, largest: int = 1500) -> None:
        self.largest = largest  # the largest datagram on the wire: the bucket holds two
        self.idle = False  # set when tokens overflowed the bucket: rate went unused
        self.set_rate(rate_bps)
        #: small datagrams go at once, uncounted (ratelimit=auto: the measured
        #: rate is of our data; the ACKs we send for the peer's data are not in it)
        self.free_small = free_small
        self.tokens = self.depth
        self.stamp = now
        self.queued = 0  # bytes waiting, with overhead
        self.bulk: Deque[bytes] = deque()
        self.small: Deque[bytes] = deque()
        self.overhead = overhead  # per datagram on the wire, beyond len(datagram)

    def set_rate(self, rate_bps: float) -> None:
        self.rate = rate_bps / 8.0  # bytes per second
        self.depth = max(float(BURST_MIN), 2.0 * self.largest, self.rate * BURST_S)
        self.limit = max(float(QUEUE_MIN), self.rate * QUEUE_S)

    def _refill(self, now: float) -> None:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.depth:
            tokens = self.depth
            self.idle = True
        self.tokens = tokens
        self.stamp = now

    def submit(self, datagram: bytes, now: float) -> int:
        """SEND (go now, tokens taken), QUEUED (wait for `release`) or DROPPED."""
        size = len(datagram) + self.overhead
        if size <= SMALL and self.free_small:
            return SEND
        if not self.queued:
            self._refill(now)
            if self.tokens >= size:
                self.tokens -= size
                return SEND
        if self.queued + size > self.limit:
            return DROPPED
        (self.small if size <= SMALL else self.bulk).append(datagram)
        self.queued += size
        return QUEUED

    def release(self, now: float) -> List[bytes]:
        """The queued datagrams whose time has come, in sending order."""
        self._refill(now)
        out: List[bytes] = []
        overhead = self.overhead
        tokens = self.tokens
        for queue in (self.small, self.bulk):
            while queue and tokens >= len(queue[0]) + overhead:
                size = len(queue[0]) + overhead
                tokens -= size
                self.queued -= size
                out.append(queue.popleft())
            if queue:
                break
        self.tokens = tokens
        return out

    def available(self, now: float) -> float:
        """Bytes that may go at once now (nothing while datagrams wait)."""
        if self.queued:
            return 0.0
        self._refill(now)
        return self.tokens

    def wait_for(self, size: int) -> float:
        """Seconds until `size` bytes may go at once (ignoring the queue)."""
        return max((size - self.tokens) / self.rate, 0.0)

    def delay(self) -> Optional[float]:
        """Seconds until the next queued datagram may go; None if none waits."""
        if not self.queued:
            return None
        head = self.small[0] if self.small else self.bulk[0]
        missing = len(head) + self.overhead - self.tokens
        return max(missing / self.rate, 0.0)

    def take_all(self) -> List[bytes]:
        """Everything queued, in sending order, regardless of tokens; empties the queue."""
        out = list(self.small) + list(self.bulk)
        self.small.clear()
        self.bulk.clear()
        self.queued = 0
        return out


def paced_window(rate_bps: float, rtt_ms: Optional[int], segment: int) -> Optional[int]:
    """Segments a conversation may have in flight, or None (no cap yet).

    `segment` is one full datagram on the wire (mtu plus IP/UDP headers).
    Every busy conversation may use the whole cap: the pacer already holds
    their sum to the rate; the cap only bounds what a rate set above the
    path's can pile up in the path's queue.
    """
    if rtt_ms is None or rate_bps <= 0:
        return None
    rtt_s = max(rtt_ms, RTT_FLOOR_MS) / 1000.0
    return max(WINDOW_LEAST, math.ceil(WINDOW_GAIN * rate_bps / 8.0 * rtt_s / segment))


_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([kmg]?)(?:bit/s|bps|bit)?\s*$", re.I)
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> Optional[float]:
    """'50M', '2.5mbit', '800kbps', '100000000' -> bits per second; None if malformed."""
    match = _RATE.match(text)
    if not match:
        return None
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


STARTUP, DRAIN, PROBE = "startup", "drain", "probe"
STARTUP_GAIN = 2.5
CYCLE = (1.25, 1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0)
BW_ROUNDS = 10  # the estimate is the largest sample of this many rounds
ROUND_MIN_S = 0.02  # a round is the smallest RTT seen, but at least this
INITIAL_BPS = 8e6  # before the first sample
MIN_BPS = 256e3  # never pace slower than this


class AutoRate:
    """ratelimit=auto: the pacing rate from the measured delivery rate."""

    __slots__ = ("samples", "bw", "round_start", "delivered", "limited", "idle", "state",
                 "full_bw", "full_rounds", "cycle")

    def __init__(self, now: float) -> None:
        self.samples: Deque[float] = deque(maxlen=BW_ROUNDS)  # bytes/s per round
        self.bw = INITIAL_BPS / 8.0  # the estimate, bytes/s
        self.round_start = now
        self.delivered = 0  # bytes acknowledged this round
        self.limited = False  # did the pacer hold the sender back this round ...
        self.idle = False  # ... and never leave rate unused?
        self.state = STARTUP
        self.full_bw = 0.0
        self.full_rounds = 0
        self.cycle = 0

    @property
    def rate_bps(self) -> float:
        """The path's estimated rate, bits/s (without gain)."""
        return self.bw * 8.0

    def gain(self) -> float:
        if self.state == STARTUP:
            return STARTUP_GAIN
        if self.state == DRAIN:
            return 1.0 / STARTUP_GAIN
        return CYCLE[self.cycle]

    def on_acked(self, nbytes: int, now: float, rtt_s: float) -> Optional[float]:
        """`nbytes` were acknowledged.  At the end of a round, the new pacing
        rate in bits/s; else None."""
        self.delivered += nbytes
        elapsed = now - self.round_start
        if elapsed < max(rtt_s, ROUND_MIN_S):
            return None
        sample = self.delivered / elapsed
        self.delivered = 0
        self.round_start = now
        if (self.limited and not self.idle) or sample > self.bw:
            self.samples.append(sample)  # a sender short of data says little
        self.limited = self.idle = False
        if self.samples:
            self.bw = max(max(self.samples), MIN_BPS / 8.0)
        self._next_state()
        return self.gain() * self.bw * 8.0

    def _next_state(self) -> None:
        if self.state == STARTUP:
            if self.bw >= 1.25 * self.full_bw:
                self.full_bw, self.full_rounds = self.bw, 0
            else:
                self.full_rounds += 1
                if self.full_rounds >= 3:
                    self.state = DRAIN
        elif self.state == DRAIN:
            self.state, self.cycle = PROBE, 3  # cruise first
        else:
            self.cycle = (self.cycle + 1) % len(CYCLE)
