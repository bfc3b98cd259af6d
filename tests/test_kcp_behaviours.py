"""The behaviours of ikcp that independent KCP implementations tend to get
wrong (docs: KCP-NOTES.md, "Behaviours an independent implementation tends
to get wrong", items 1-14), one scripted test each.

Every call goes through ``kcpsim.Twin``: gkcp's engine and ikcp (siokcp) get
the same call, and the return value, the datagrams output during the call and
every control-block field must be identical after it.  On top of that each
test asserts the behaviour itself from ikcp's rules, so a test that stopped
exercising its behaviour would fail rather than pass vacuously.

Clocks start at ``T0``, a few hundred ms below 2**32, so most scripts run
across the 32-bit wrap.
"""

from __future__ import annotations

import pytest

from kcpsim import (
    CMD_ACK,
    CMD_PUSH,
    CMD_WASK,
    CMD_WINS,
    CONV,
    MASK32,
    Twin,
    parse,
    parse_all,
    seg,
)

# every test runs against each engine: compiled, pure (conftest.kcp_engine)
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("kcp_engine")]

T0 = 2**32 - 300


def make(name="kcp", *, nodelay=None, wnd=None, mtu=None, stream=False):
    wire: list[bytes] = []
    k = Twin(CONV, wire.append, name=name)
    if mtu is not None:
        assert k.setmtu(mtu) == 0
    if wnd is not None:
        k.wndsize(*wnd)
    if nodelay is not None:
        k.nodelay(*nodelay)
    if stream:
        k.stream = 1
    return k, wire


def take(wire: list[bytes]) -> list[bytes]:
    out = list(wire)
    wire.clear()
    return out


def sender(n, *, nodelay=(1, 10, 0, 1), now=T0, size=1, **kw):
    """An engine with n one-segment messages sent (nc=1: all go out at once)."""
    k, wire = make("sender", nodelay=nodelay, **kw)
    for i in range(n):
        assert k.send(bytes([i]) * size) == size
    k.update(now)
    pushes = [s for s in parse_all(take(wire)) if s.cmd == CMD_PUSH]
    assert [s.sn for s in pushes] == list(range(n))
    return k, wire


def at(t: int) -> int:
    return t & MASK32


def cmds(datagrams):
    return [[s.cmd for s in parse(d)] for d in datagrams]


# --- 1 -----------------------------------------------------------------------


def test_b01_una_and_rmt_wnd_applied_from_every_segment():
    a, wire = sender(8)
    assert (a.snd_una, a.snd_nxt, a.nsnd_buf, a.rmt_wnd) == (0, 8, 8, 128)

    # a WINS acknowledges up to its una and sets rmt_wnd
    assert a.input(seg(CMD_WINS, una=2, wnd=77)) == 0
    assert (a.rmt_wnd, a.snd_una, a.nsnd_buf) == (77, 2, 6)

    # a WASK too, and it owes the peer a WINS
    assert a.input(seg(CMD_WASK, una=3, wnd=60)) == 0
    assert (a.rmt_wnd, a.snd_una, a.nsnd_buf, a.probe) == (60, 3, 5, 2)

    # a PUSH far beyond the receive window is dropped (not acked, not
    # stored), yet its una and wnd apply; a zero window is taken as is
    assert a.input(seg(CMD_PUSH, sn=5000, una=4, wnd=0, data=b"zz")) == 0
    assert (a.rmt_wnd, a.snd_una, a.nrcv_buf, a.nrcv_que) == (0, 4, 0, 0)

    # an ACK for an unknown sn with a stale una: no freshness check, the
    # window of the segment that arrived last wins
    assert a.input(seg(CMD_ACK, sn=900, una=1, wnd=300, ts=T0)) == 0
    assert (a.rmt_wnd, a.snd_una, a.nsnd_buf) == (300, 4, 4)

    # every segment of one datagram, in order: the last wnd stays
    datagram = (
        seg(CMD_ACK, sn=6, una=5, wnd=11, ts=T0)
        + seg(CMD_WINS, una=4, wnd=12)
        + seg(CMD_WASK, una=5, wnd=13)
    )
    assert a.input(datagram) == 0
    assert (a.rmt_wnd, a.snd_una, a.nsnd_buf) == (13, 5, 2)  # 5 and 7 left

    # a segment with an unknown cmd is rejected before its header applies
    assert a.input(seg(0x55, una=8, wnd=99)) == -3
    assert (a.rmt_wnd, a.snd_una, a.nsnd_buf) == (13, 5, 2)

    # una beyond snd_nxt empties the send buffer: snd_una = snd_nxt
    assert a.input(seg(CMD_WINS, una=50, wnd=20)) == 0
    assert (a.snd_una, a.snd_nxt, a.nsnd_buf, a.rmt_wnd) == (8, 8, 0, 20)

    # the owed WINS goes out at the next flush; nothing else (the PUSH
    # beyond the window was not acked, everything is acknowledged)
    a.update(at(T0 + 10))
    out = take(wire)
    assert cmds(out) == [[CMD_WINS]]
    assert a.probe == 0


# --- 2 -----------------------------------------------------------------------


def test_b02_push_below_window_end_always_acked_stored_only_if_new():
    b, wire = make("receiver")
    b.update(T0)

    def push(sn, data=b"d"):
        assert b.input(seg(CMD_PUSH, sn=sn, ts=T0 - sn, data=data)) == 0
        return sn

    acked = []
    acked.append(push(0))  # in order: to the receive queue
    assert (b.rcv_nxt, b.nrcv_que, b.nrcv_buf) == (1, 1, 0)
    acked.append(push(0))  # old duplicate: acked again, not stored
    assert (b.rcv_nxt, b.nrcv_que, b.nrcv_buf) == (1, 1, 0)
    acked.append(push(5))  # out of order: kept in the receive buffer
    acked.append(push(5))  # duplicate of a buffered one: acked, kept once
    assert (b.nrcv_que, b.nrcv_buf) == (1, 1)
    last = b.rcv_nxt + b.rcv_wnd - 1
    acked.append(push(last))  # the last sn inside the window
    assert b.nrcv_buf == 2
    push(last + 1)  # first sn beyond the window: dropped, no ack
    assert b.nrcv_buf == 2
    # sequence numbers compare as int32 differences: 2**31 ahead reads as behind
    behind = at(b.rcv_nxt + 0x80000000 + 200)
    acked.append(push(behind))  # "old": acked, not stored
    push(at(b.rcv_nxt + 0x80000000 - 200))  # far ahead: dropped
    assert (b.rcv_nxt, b.nrcv_que, b.nrcv_buf) == (1, 1, 2)

    b.update(at(T0 + 100))
    acks = [(s.sn, s.ts) for s in parse_all(take(wire)) if s.cmd == CMD_ACK]
    assert acks == [(sn, at(T0 - sn)) for sn in acked]

    # the same across the sequence-number wrap
    c, wire = make("receiver-wrap")
    c.rcv_nxt = MASK32 - 1
    c.update(T0)
    for sn in (MASK32, MASK32 - 1, 1, 0):
        assert c.input(seg(CMD_PUSH, sn=sn, ts=T0, data=bytes([sn & 0xFF]))) == 0
    assert (c.rcv_nxt, c.nrcv_que, c.nrcv_buf) == (2, 4, 0)
    assert [c.recv() for _ in range(5)] == [b"\xfe", b"\xff", b"\x00", b"\x01", None]


# --- 3 -----------------------------------------------------------------------


def test_b03_rtt_sample_from_every_ack_before_the_sn_check():
    a, wire = sender(3)
    a.update(at(T0 + 50))
    assert take(wire) == []

    # sn outside [snd_una, snd_nxt): nothing acknowledged, but rtt 50 sampled
    assert a.input(seg(CMD_ACK, sn=7000, ts=T0)) == 0
    assert (a.rx_srtt, a.rx_rttval, a.nsnd_buf) == (50, 25, 3)

    # ts ahead of current: no sample, the segment is still acknowledged
    assert a.input(seg(CMD_ACK, sn=0, ts=T0 + 51)) == 0
    assert (a.rx_srtt, a.rx_rttval, a.nsnd_buf) == (50, 25, 2)

    # current is the time of the last update call, not of the input:
    # rtt = (T0 + 50) - (T0 + 30) = 20 however late this input is
    assert a.input(seg(CMD_ACK, sn=1, ts=T0 + 30)) == 0
    assert a.rx_srtt == (7 * 50 + 20) // 8
    assert a.rx_rttval == (3 * 25 + 30) // 4

    # a zero rtt leaves srtt 0, so the next sample is taken as the first one
    z, _ = sender(2)
    assert z.input(seg(CMD_ACK, sn=0, ts=T0)) == 0
    assert (z.rx_srtt, z.rx_rttval, z.rx_rto) == (0, 0, 30)  # max(minrto, 0 + interval)
    z.update(at(T0 + 340))  # across the wrap
    assert z.input(seg(CMD_ACK, sn=1, ts=T0 + 300)) == 0
    assert (z.rx_srtt, z.rx_rttval) == (40, 20)


# --- 4 -----------------------------------------------------------------------


def _i32(x: int) -> int:
    x &= MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


class RtoModel:
    """ikcp_update_ack with ikcp's 32-bit signed fields."""

    def __init__(self, minrto, interval):
        self.srtt = self.rttval = 0
        self.rto = 200
        self.minrto, self.interval = minrto, interval

    def sample(self, rtt):
        if self.srtt == 0:
            self.srtt, self.rttval = rtt, _cdiv(rtt, 2)
        else:
            delta = abs(rtt - self.srtt)
            self.rttval = _i32(_cdiv(_i32(3 * self.rttval) + delta, 4))
            self.srtt = max(1, _cdiv(_i32(7 * self.srtt + rtt), 8))
        rto = (self.srtt + max(self.interval, (4 * self.rttval) & MASK32)) & MASK32
        self.rto = min(max(self.minrto, rto), 60000)

    def fields(self):
        return (self.srtt & MASK32, self.rttval & MASK32, self.rto)


@pytest.mark.parametrize("nd,interval", [(0, 100), (0, 10), (1, 10), (2, 40)])
def test_b04_rto_estimator(nd, interval):
    a, _ = make(nodelay=(nd, interval, 0, 0))
    assert (a.rx_rto, a.rx_minrto) == (200, 30 if nd else 100)
    model = RtoModel(a.rx_minrto, interval)
    now = T0
    a.update(now)
    samples = [100, 20, 300, 5, 5, 5, 1, 0, 2, 1, 70000, 200000, 60, 60, 60, 60, 60, 60, 60, 60]
    samples += [0, 0, 3, 7, 2**20, 2**31 - 1, 2**31 - 1, 5, 2**30, 2**31 - 1, 100, 100]
    rtos = set()
    for rtt in samples:
        now = at(now + 7)
        a.update(now)
        # any ACK gives a sample, even for an sn never sent
        assert a.input(seg(CMD_ACK, sn=0xABCD, ts=now - rtt)) == 0
        model.sample(rtt)
        fields = (a.rx_srtt & MASK32, a.rx_rttval & MASK32, a.rx_rto)
        assert fields == model.fields(), f"after rtt {rtt}"
        rtos.add(a.rx_rto)
    assert 60000 in rtos  # the upper clamp was hit

    # from below: srtt + max(interval, 4 * rttval), at least minrto
    b, _ = make(nodelay=(nd, interval, 0, 0))
    b.update(now)
    for _ in range(12):
        b.input(seg(CMD_ACK, sn=9, ts=now - 1))
    assert (b.rx_srtt, b.rx_rttval) == (1, 0)
    assert b.rx_rto == max(b.rx_minrto, 1 + interval)

    # nodelay() changes rx_minrto but does not recompute rx_rto
    before = b.rx_rto
    b.nodelay(0 if nd else 1, interval, 0, 0)
    assert b.rx_minrto == (100 if nd else 30)
    assert b.rx_rto == before


# --- 5 -----------------------------------------------------------------------


def test_b05_fastack_counted_once_per_input_call():
    a, wire = sender(6, nodelay=(1, 10, 2, 1))
    a.update(at(T0 + 10))
    assert take(wire) == []

    # two ACKs in one datagram: fast acks counted once, from the largest sn
    assert a.input(seg(CMD_ACK, sn=3, ts=T0) + seg(CMD_ACK, sn=1, ts=T0)) == 0
    a.update(at(T0 + 20))
    assert take(wire) == []  # sn 0 and 2 have fastack 1 < resend 2

    assert a.input(seg(CMD_ACK, sn=4, ts=T0)) == 0
    a.update(at(T0 + 30))
    resent = [s.sn for s in parse_all(take(wire)) if s.cmd == CMD_PUSH]
    assert resent == [0, 2]  # fastack 2: fast retransmit, both in one datagram

    # FASTACK_CONSERVE: an ACK whose ts is older than a segment's last send
    # does not count against it
    for _ in range(3):
        assert a.input(seg(CMD_ACK, sn=5, ts=T0)) == 0
    a.update(at(T0 + 40))
    assert take(wire) == []
    for _ in range(2):
        assert a.input(seg(CMD_ACK, sn=5, ts=T0 + 30)) == 0
    a.update(at(T0 + 50))
    assert [s.sn for s in parse_all(take(wire)) if s.cmd == CMD_PUSH] == [0, 2]

    # within one datagram, maxack only moves to a later sn with a newer ts
    b, wire = sender(6, nodelay=(1, 10, 1, 1))
    b.update(at(T0 + 10))
    b.update(at(T0 + 20))
    assert b.input(seg(CMD_ACK, sn=1, ts=T0) + seg(CMD_ACK, sn=4, ts=T0 - 5)) == 0
    b.update(at(T0 + 30))
    assert [s.sn for s in parse_all(take(wire)) if s.cmd == CMD_PUSH] == [0]


def _grown_cwnd(acks_in_one_datagram: bool):
    a, wire = make("cwnd", nodelay=(0, 10, 0, 0))
    for i in range(10):
        a.send(bytes([i]))
    a.update(T0)
    assert take(wire) == [] and a.cwnd == 1
    a.update(at(T0 + 10))
    assert [s.sn for s in parse_all(take(wire))] == [0]
    a.input(seg(CMD_ACK, sn=0, ts=T0 + 10))
    assert a.cwnd == 2  # slow start: +1 for an input call that moved una
    a.update(at(T0 + 20))
    assert [s.sn for s in parse_all(take(wire))] == [1, 2]
    acks = [seg(CMD_ACK, sn=sn, ts=T0 + 20) for sn in (1, 2)]
    if acks_in_one_datagram:
        a.input(b"".join(acks))
    else:
        for d in acks:
            a.input(d)
    assert a.snd_una == 3
    return a.cwnd, a.incr, a.mss


def test_b05_cwnd_grows_once_per_input_call():
    one_cwnd, one_incr, mss = _grown_cwnd(True)
    two_cwnd, two_incr, _ = _grown_cwnd(False)
    # congestion avoidance (cwnd 2 >= ssthresh 2): one step per input call
    incr = 2 * mss + mss * mss // (2 * mss) + mss // 16
    assert (one_cwnd, one_incr) == (2, incr)
    incr += mss * mss // incr + mss // 16
    assert (two_cwnd, two_incr) == ((incr + mss - 1) // mss, incr)


# --- 6 -----------------------------------------------------------------------


def test_b06_initial_cwnd_zero_first_flush_sends_no_data():
    a, wire = make("nc0", nodelay=(0, 10, 0, 0))
    assert a.cwnd == 0
    for i in range(3):
        a.send(bytes([i]) * 10)
    a.update(T0)
    assert take(wire) == []  # cwnd 0: nothing leaves
    assert (a.cwnd, a.nsnd_que, a.nsnd_buf) == (1, 3, 0)
    a.update(at(T0 + 10))
    assert [s.sn for s in parse_all(take(wire))] == [0]

    b, wire = make("nc1", nodelay=(0, 10, 0, 1))
    for i in range(3):
        b.send(bytes([i]) * 10)
    b.update(T0)
    assert [s.sn for s in parse_all(take(wire))] == [0, 1, 2]
    assert b.cwnd == 1


# --- 7 -----------------------------------------------------------------------


def test_b07_flush_order_acks_then_probes_then_data():
    b, wire = make("flush", mtu=100, nodelay=(1, 10, 0, 1))
    b.update(T0)
    for i in range(2):
        b.send(bytes([i]) * 30)
    for sn in range(6):
        assert b.input(seg(CMD_PUSH, sn=sn, ts=T0 - 10 * sn, data=b"p")) == 0
    assert b.input(seg(CMD_WASK, una=0, wnd=128)) == 0
    b.update(at(T0 + 10))
    out = take(wire)
    # ACKs packed to the mtu (4 x 24 = 96 <= 100), the WINS after them in the
    # same datagram, data segments (54 bytes) each when they no longer fit
    assert cmds(out) == [[CMD_ACK] * 4, [CMD_ACK, CMD_ACK, CMD_WINS], [CMD_PUSH], [CMD_PUSH]]
    assert all(len(d) <= 100 for d in out)
    wins = parse(out[1])[2]
    # the WINS reuses the ACK template: last ack's sn and ts
    assert (wins.sn, wins.ts, wins.una, wins.wnd) == (5, at(T0 - 50), 6, 128 - 6)

    # a WASK (probe due) and a WINS in one flush: ACKs, WASK, WINS, data
    assert b.input(seg(CMD_WINS, una=2, wnd=0)) == 0
    b.send(b"q")
    b.update(at(T0 + 20))  # starts the probe timer
    assert take(wire) == []
    t = T0 + 20
    while not wire:
        t += 10
        if b.check(at(t)) == at(t) and at(t - T0 - 20) >= 7000:
            assert b.input(seg(CMD_PUSH, sn=6, ts=t, data=b"p")) == 0
            assert b.input(seg(CMD_WASK, una=2, wnd=0)) == 0
        b.update(at(t))
    assert t - (T0 + 20) == 7000
    assert cmds(take(wire)) == [[CMD_ACK, CMD_WASK, CMD_WINS]]


def _expected_resends(nd: int, count: int, interval: int = 10, rx_rto: int = 200):
    """Send times (ms after the first) of one unacknowledged segment."""
    times = [0]
    rto = rx_rto
    resendts = rto + (rx_rto >> 3 if nd == 0 else 0)
    while len(times) < count:
        t = -(-resendts // interval) * interval  # flushes happen every interval
        times.append(t)
        if nd == 0:
            rto += max(rto, rx_rto)
        else:
            rto += (rto if nd == 1 else rx_rto) // 2
        resendts = t + rto
    return times


@pytest.mark.parametrize("nd", [0, 1, 2])
def test_b07_resend_timers_and_backoff(nd):
    a, wire = make("timer", nodelay=(nd, 10, 0, 1))
    a.send(b"x")
    sends = []
    for ms in range(0, 13000):
        a.update(at(T0 + ms))
        if take(wire):
            sends.append(ms)
    expected = _expected_resends(nd, len(sends))
    assert sends == expected
    assert a.xmit == len(sends) - 1  # kcp.xmit counts timeouts only
    assert len(sends) >= 6


def test_b07_timeout_checked_before_fast_retransmit():
    a, wire = sender(3, nodelay=(1, 10, 1, 1))
    assert a.input(seg(CMD_ACK, sn=2, ts=T0)) == 0  # sn 0, 1: fastack 1 >= resend
    assert a.input(seg(CMD_ACK, sn=2, ts=T0)) == 0
    cwnd_before = min(a.snd_wnd, a.rmt_wnd)  # nc=1: cwnd not in the window
    a.update(at(T0 + 400))  # both timed out (rto 200) and fast-acked
    assert [s.sn for s in parse_all(take(wire))] == [0, 1]
    assert a.xmit == 2  # counted as timeouts
    assert (a.cwnd, a.ssthresh) == (1, max(cwnd_before // 2, 2))
    # a fast retransmit does not back off: rto stays, resendts = now + rto
    b, wire = sender(3, nodelay=(1, 10, 1, 1))
    b.update(at(T0 + 10))
    assert b.input(seg(CMD_ACK, sn=2, ts=T0)) == 0
    b.update(at(T0 + 20))
    assert [s.sn for s in parse_all(take(wire))] == [0, 1]
    t = T0 + 20
    while not wire:
        t += 10
        b.update(at(t))
    assert t - (T0 + 20) == 200 and b.xmit == 0 + 2


def test_b07_fastlimit_caps_fast_retransmits():
    a, wire = sender(2, nodelay=(1, 10, 1, 1))
    a.fastlimit = 2
    t = T0
    fast = 0
    for _ in range(6):
        assert a.input(seg(CMD_ACK, sn=1, ts=t)) == 0
        t += 10
        a.update(at(t))
        fast += len(take(wire))
    assert fast == 2  # xmit 1 and 2 may be fast-resent, not 3
    assert a.xmit == 0


def test_b07_per_segment_rto_uncapped():
    # backoff keeps growing past RTO_MAX and past 2**31: resendts then lies
    # "in the past" as an int32 difference.  Big clock jumps get there.
    for nd in (0, 1, 2):
        a, wire = make(f"uncapped{nd}", nodelay=(nd, 10, 0, 1))
        a.dead_link = 1000
        a.send(b"x")
        now = T0
        a.update(now)
        take(wire)
        resends = 0
        for k in range(70):
            now = at(now + min(2 ** (k % 40), 2**31 - 1) + 7 * k)
            a.check(now)
            a.update(now)
            resends += len(take(wire))
        assert resends >= 20
        assert a.xmit == resends


# --- 8 -----------------------------------------------------------------------


def test_b08_xmit_counts_and_dead_link_state():
    a, wire = make("dead", nodelay=(2, 10, 0, 1))
    a.send(b"x")
    t = T0
    sends = 0
    while a.state == 0:
        a.update(at(t))
        sends += len(take(wire))
        t += 10
        assert t - T0 < 60000
    assert type(a.new.state) is int and a.new.state == 0xFFFFFFFF
    assert sends == a.dead_link == 20 and a.xmit == 19
    assert 20000 <= t - T0 <= 22000  # ~21 s at nodelay 2
    # KCP never acts on it: the segment keeps being retransmitted
    for _ in range(3000):
        a.update(at(t))
        sends += len(take(wire))
        t += 10
    assert sends > 20 and a.state == 0xFFFFFFFF and a.nsnd_buf == 1

    # fast retransmits count towards dead_link too (seg.xmit), not kcp.xmit
    b, wire = sender(2, nodelay=(1, 10, 1, 1))
    b.dead_link = 4
    b.fastlimit = 0  # no limit
    t = T0
    while b.state == 0:
        assert b.input(seg(CMD_ACK, sn=1, ts=t)) == 0
        t += 10
        b.update(at(t))
        assert len(take(wire)) == 1
        assert t - T0 < 100
    assert (b.state, b.xmit, t - T0) == (0xFFFFFFFF, 0, 30)


# --- 9 -----------------------------------------------------------------------


def _ack_all(k, datagrams, ts):
    sns = [s.sn for s in parse_all(datagrams) if s.cmd == CMD_PUSH]
    if sns:
        k.input(b"".join(seg(CMD_ACK, sn=sn, ts=ts) for sn in sns))
    return sns


def test_b09_ssthresh_and_cwnd_after_fast_retransmit_and_timeout():
    a, wire = make("cc", nodelay=(1, 10, 2, 0), wnd=(64, 128))
    for i in range(200):
        a.send(bytes([i]) * 20)
    t = T0
    # grow cwnd by acknowledging everything promptly
    while a.cwnd < 10:
        a.update(at(t))
        _ack_all(a, take(wire), t)
        t += 10
    # one more flush puts cwnd segments in flight; ack the last two only
    a.update(at(t))
    flight = [s.sn for s in parse_all(take(wire)) if s.cmd == CMD_PUSH]
    assert len(flight) >= 4
    for sn in flight[-2:]:
        a.input(seg(CMD_ACK, sn=sn, ts=t))
    t += 10
    a.update(at(t))
    resent = [s.sn for s in parse_all(take(wire)) if s.cmd == CMD_PUSH]
    assert resent[: len(flight) - 2] == flight[:-2]  # fast retransmits first
    inflight = (a.snd_nxt - a.snd_una) & MASK32
    assert a.ssthresh == max(inflight // 2, 2)
    assert a.cwnd == a.ssthresh + 2 and a.incr == a.cwnd * a.mss

    # stop acknowledging: the first timeout sets ssthresh from the window
    # actually used by that flush and cwnd to 1
    xmit = a.xmit
    while a.xmit == xmit:
        window = min(a.snd_wnd, a.rmt_wnd, a.cwnd)
        t += 10
        a.update(at(t))
        take(wire)
        assert t - T0 < 5000
    assert a.ssthresh == max(window // 2, 2)
    assert (a.cwnd, a.incr) == (1, a.mss)


def test_b09_nc_only_removes_cwnd_from_the_window():
    a, wire = make("nc1", nodelay=(0, 10, 0, 1), wnd=(20, 128))
    for i in range(50):
        a.send(bytes([i]))
    a.update(T0)
    assert len([s for s in parse_all(take(wire)) if s.cmd == CMD_PUSH]) == 20
    assert a.cwnd == 1  # still maintained
    a.input(seg(CMD_ACK, sn=0, ts=T0, wnd=5))
    a.update(at(T0 + 10))
    # the peer's window limits: snd_una 1 + 5 -> sn up to 5, all already sent
    assert take(wire) == [] and a.cwnd == 2


# --- 10 ----------------------------------------------------------------------


def test_b10_window_probe_backoff():
    a, wire = sender(1, nodelay=(0, 100, 0, 1))
    a.send(b"waiting")
    assert a.input(seg(CMD_ACK, sn=0, ts=T0, wnd=0)) == 0
    assert (a.rmt_wnd, a.nsnd_que) == (0, 1)
    t = T0
    probes = []
    while len(probes) < 12:
        t += 100
        a.update(at(t))
        for s in parse_all(take(wire)):
            assert s.cmd == CMD_WASK
            probes.append(t - T0)
        assert t - T0 < 1_200_000
    gaps = [b - a_ for a_, b in zip(probes, probes[1:])]
    assert probes[0] == 7100  # first flush at T0+100 starts the 7000 ms wait
    want = 7000
    for gap in gaps:
        want = min(want + want // 2, 120000)
        assert want <= gap < want + 100
    assert gaps[-1] in (120000, 120100) and a.probe_wait == 120000


def test_b10_wins_when_a_full_receive_queue_drains():
    b, wire = make("full")
    b.update(T0)
    for sn in range(b.rcv_wnd):
        b.input(seg(CMD_PUSH, sn=sn, ts=T0, data=bytes([sn])))
    b.input(seg(CMD_PUSH, sn=b.rcv_wnd, ts=T0, data=b"x"))  # acked, buffered
    assert (b.nrcv_que, b.nrcv_buf) == (128, 1)
    b.update(at(T0 + 100))
    acks = parse_all(take(wire))
    assert acks[-1].wnd == 0  # full queue: window 0
    # reading one moves the buffered segment up: the queue is full again,
    # so no WINS yet
    assert b.recv() == b"\x00"
    assert (b.nrcv_que, b.nrcv_buf, b.probe) == (128, 0, 0)
    assert b.recv() == b"\x01"
    assert (b.nrcv_que, b.probe) == (127, 2)
    b.update(at(T0 + 200))
    (wins,) = parse_all(take(wire))
    assert (wins.cmd, wins.wnd) == (CMD_WINS, 1)


# --- 11 ----------------------------------------------------------------------


def test_b11_update_and_check_schedule():
    k, wire = make("sched", nodelay=(1, 30, 0, 1))
    k.send(b"early")
    assert k.check(T0) == T0  # never updated: due now
    k.flush()  # flush before the first update does nothing
    assert take(wire) == []
    k.update(T0)  # the first update flushes at once
    assert len(take(wire)) == 1
    assert k.ts_flush == at(T0 + 30)
    assert k.check(at(T0 + 1)) == at(T0 + 30)  # next flush, the resend is later

    # update keeps the interval phase when less than an interval late,
    # re-phases when later than that
    for late, ts_flush in ((47, 60), (95, 125), (131, 155), (190, 220)):
        k.update(at(T0 + late))
        assert k.ts_flush == at(T0 + ts_flush)
    assert take(wire) == []  # "early" is not due before T0 + 200

    # check ignores queued sends and pending acks: not "now"
    k.update(at(T0 + 220))
    assert len(take(wire)) == 1  # the timeout resend of "early"
    k.send(b"queued")
    assert k.input(seg(CMD_PUSH, sn=0, ts=T0, data=b"d")) == 0
    assert k.check(at(T0 + 221)) == at(T0 + 250)

    # |current - ts_flush| >= 10000 resets ts_flush (both directions);
    # a small step back only skips flushes
    k.update(at(T0 + 20000))
    assert take(wire) and k.ts_flush == at(T0 + 20030)
    k.update(at(T0 + 19950))
    assert take(wire) == [] and k.ts_flush == at(T0 + 20030)
    assert k.check(at(T0 + 19950)) == at(T0 + 19980)  # capped at interval
    k.update(at(T0 + 5000))
    assert k.ts_flush == at(T0 + 5030)
    assert k.check(at(T0 - 5000)) == at(T0 - 5000)  # more than 10 s back
    assert k.check(at(T0)) == at(T0 + 30)  # 5 s back: not due

    # check returns the nearest resend when it is closer than the interval
    r, wire = make("resend-check", nodelay=(1, 5000, 0, 1))
    r.send(b"x")
    r.update(T0)
    assert r.check(at(T0 + 31)) == at(T0 + 200)

    # the wrap: updates every 7 ms through 2**32
    w, wire = make("wrap", nodelay=(1, 10, 0, 1))
    t = 2**32 - 200
    for i in range(80):
        if i % 10 == 0:
            w.send(bytes([i]) * 100)
        w.check(at(t))
        w.update(at(t))
        t += 7
    assert w.current == at(t - 7) < 400
    assert len(take(wire)) > 10


# --- 12 ----------------------------------------------------------------------


def test_b12_send_limits_and_empty_messages():
    k, wire = make("limits")
    mss = k.mss
    assert k.send(b"m" * (127 * mss)) == 127 * mss
    assert k.nsnd_que == 127
    assert k.send(b"m" * (127 * mss + 1)) == -2  # 128 fragments: refused
    assert k.nsnd_que == 127
    # the limit is the constant 128, not rcv_wnd
    k.wndsize(512, 512)
    assert k.send(b"m" * (128 * mss)) == -2
    # a zero-length message is a real message
    assert k.send(b"") == 0
    assert k.nsnd_que == 128

    small, _ = make("small", mtu=50)
    assert small.mss == 26
    assert small.send(b"s" * (127 * 26)) == 127 * 26
    assert small.send(b"s" * (127 * 26 + 1)) == -2

    # stream mode: appends to the last queued segment first; when the rest
    # would take 128 segments, only the appended bytes are taken
    s, _ = make("stream", stream=True)
    assert s.send(b"") == 0 and s.nsnd_que == 0  # nothing queued
    assert s.send(b"a" * 10) == 10
    assert s.send(b"") == 0 and s.nsnd_que == 1
    assert s.send(b"b" * (128 * mss)) == mss - 10
    assert s.nsnd_que == 1
    assert s.send(b"c" * (127 * mss)) == 127 * mss
    assert s.nsnd_que == 128
    assert s.send(b"d" * (128 * mss)) == -2

    # the empty message is delivered as an empty message
    a, wire = make("empty-a", nodelay=(1, 10, 0, 1))
    b, back = make("empty-b", nodelay=(1, 10, 0, 1))
    for m in (b"", b"x", b"", b""):
        assert a.send(m) == len(m)
    a.update(T0)
    b.update(T0)
    for d in take(wire):
        assert b.input(d) == 0
    assert [b.recv() for _ in range(5)] == [b"", b"x", b"", b"", None]


# --- 13 ----------------------------------------------------------------------


def test_b13_recv_returns_one_message_or_one_stream_segment():
    b, _ = make("recv")
    b.update(T0)
    assert (b.recv(), b.peeksize()) == (None, -1)
    # a 3-fragment message, last fragment missing: incomplete
    b.input(seg(CMD_PUSH, sn=0, frg=2, data=b"AA"))
    b.input(seg(CMD_PUSH, sn=1, frg=1, data=b"BBB"))
    assert (b.peeksize(), b.recv(), b.nrcv_que) == (-1, None, 2)
    b.input(seg(CMD_PUSH, sn=3, frg=0, data=b"next"))  # buffered behind sn 2
    b.input(seg(CMD_PUSH, sn=2, frg=0, data=b"C"))
    assert b.peeksize() == 6
    assert b.recv() == b"AABBBC"  # exactly one message
    assert b.peeksize() == 4
    assert (b.recv(), b.recv()) == (b"next", None)

    # frg is taken from the wire as is: a first segment claiming 3 more
    # fragments holds the queue until 4 segments are queued, then the
    # message ends at the first frg 0
    b.input(seg(CMD_PUSH, sn=4, frg=3, data=b"x"))
    b.input(seg(CMD_PUSH, sn=5, frg=0, data=b"y"))
    assert (b.peeksize(), b.recv()) == (-1, None)
    b.input(seg(CMD_PUSH, sn=6, frg=0, data=b"z"))
    b.input(seg(CMD_PUSH, sn=7, frg=0, data=b""))
    assert [b.recv() for _ in range(4)] == [b"xy", b"z", b"", None]

    # stream mode: one segment per call (frg is 0 on the wire)
    a, wire = make("stream-a", stream=True, nodelay=(1, 10, 0, 1))
    s, _ = make("stream-b", stream=True)
    a.send(b"1" * 3000)
    a.send(b"2" * 10)
    a.update(T0)
    s.update(T0)
    for d in take(wire):
        s.input(d)
    mss = a.mss
    got = [s.recv() for _ in range(4)]
    assert got == [b"1" * mss, b"1" * mss, b"1" * (3000 - 2 * mss) + b"2" * 10, None]


# --- 14 ----------------------------------------------------------------------


def test_b14_parameter_clamps():
    k, wire = make("params")
    k.wndsize(0, 0)
    k.wndsize(-5, -5)
    assert (k.snd_wnd, k.rcv_wnd) == (32, 128)
    k.wndsize(16, 64)
    assert (k.snd_wnd, k.rcv_wnd) == (16, 128)  # rcv_wnd >= 128
    k.wndsize(300, 1000)
    assert (k.snd_wnd, k.rcv_wnd) == (300, 1000)

    for bad in (49, 24, 0, -1):
        assert k.setmtu(bad) == -1
    assert (k.mtu, k.mss) == (1400, 1376)
    assert k.setmtu(50) == 0 and (k.mtu, k.mss) == (50, 26)
    assert k.setmtu(1500) == 0 and (k.mtu, k.mss) == (1500, 1476)

    k.nodelay(-1, -1, -1, -1)
    assert (k.nodelay_, k.interval, k.fastresend, k.nocwnd, k.rx_minrto) == (0, 100, 0, 0, 100)
    k.nodelay(1, 5, 3, 1)
    assert (k.nodelay_, k.interval, k.fastresend, k.nocwnd, k.rx_minrto) == (1, 10, 3, 1, 30)
    k.nodelay(2, 6000, -1, -1)
    assert (k.nodelay_, k.interval, k.fastresend, k.nocwnd, k.rx_minrto) == (2, 5000, 3, 1, 30)
    k.nodelay(0, 0, 0, 0)
    assert (k.nodelay_, k.interval, k.rx_minrto) == (0, 10, 100)

    # the advertised window is rcv_wnd - nrcv_que, truncated to 16 bits
    k.wndsize(32, 70000)
    k.update(T0)
    k.input(seg(CMD_PUSH, sn=0, data=b"q"))
    k.update(at(T0 + 10))
    (ack,) = parse_all(take(wire))
    assert ack.wnd == (70000 - 1) & 0xFFFF


def test_b14_transfer_across_the_clock_wrap():
    a, to_b = make("wrap-a", nodelay=(0, 10, 0, 0), wnd=(64, 128))
    b, to_a = make("wrap-b", nodelay=(0, 10, 0, 0), wnd=(64, 128))
    msgs = [bytes([i % 256]) * (i * 37 % 2000) for i in range(120)]
    for m in msgs:
        assert a.send(m) == len(m)
    got = []
    t = 2**32 - 2000
    for step in range(4000):
        t += 5
        for d in take(to_b):
            if step % 9 != 4:  # lose some
                assert b.input(d) == 0
        for d in take(to_a):
            if step % 11 != 7:
                assert a.input(d) == 0
        a.update(at(t))
        b.update(at(t))
        while (m := b.recv()) is not None:
            got.append(m)
        if len(got) == len(msgs) and a.waitsnd() == 0:
            break
    assert got == msgs
    assert t > 2**32  # the clock wrapped during the transfer
    assert a.current < 2**31
