"""Pacing (option ratelimit): the token bucket alone, then the tunnel
through a user-space bottleneck.

The bottleneck (tunnel_helpers.Link.bottleneck) forwards each sender's
datagrams one at a time at a fixed rate and drops what overflows a short
drop-tail queue, like a slow router.  Unpaced KCP (nc=1) bursts whole
windows into it and loses many; paced at the bottleneck's rate it loses
(almost) none, and the bytes arrive intact either way.
"""

# ruff: noqa: E402  (tunnel_helpers is imported before everything else)
import pytest

pytest.register_assert_rewrite("tunnel_helpers")

import tunnel_helpers  # noqa: F401,I001  (first: gevent patches the stdlib on import)

import gevent

from gkcp.options import OptionError, parse_options
from gkcp.pacing import (AUTO, DROPPED, QUEUED, SEND, SMALL, AutoRate, Pacer, paced_window,
                         parse_rate)
from tunnel_helpers import recv_to_eof, send_random

pytest_plugins = ["tunnel_helpers"]

MBIT = 1e6


# -- the token bucket ------------------------------------------------------------------

def drain(pacer, start, stop, step):
    """Call release every `step` seconds from start to stop; all datagrams released."""
    out = []
    t = start
    while t <= stop + 1e-9:
        out.extend(pacer.release(t))
        t += step
    return out


def test_burst_then_queue_in_order():
    pacer = Pacer(8 * MBIT, 28, now=0.0)  # 1 MB/s, 6 KB burst
    datagrams = [bytes([i]) * 1000 for i in range(50)]
    verdicts = [pacer.submit(d, 0.0) for d in datagrams]
    sent_now = verdicts.count(SEND)
    assert verdicts[:sent_now] == [SEND] * sent_now
    assert verdicts[sent_now:] == [QUEUED] * (50 - sent_now)
    assert 1 <= sent_now <= 6  # the burst: BURST_MIN bytes, 1028 each
    released = drain(pacer, 0.0, 0.1, 0.001)
    assert released == datagrams[sent_now:]  # every one, in order
    assert pacer.delay() is None and not pacer.queued


@pytest.mark.parametrize("rate_mbit", [1, 10, 100])
def test_rate_is_kept_over_time(rate_mbit):
    rate = rate_mbit * MBIT
    pacer = Pacer(rate, 28, now=0.0)
    size, t, sent_bytes, step = 1350, 0.0, 0, 0.001
    for _ in range(2000):  # offer far more than the rate allows, 1 ms apart
        for _ in range(20):
            if pacer.submit(b"x" * size, t) == SEND:
                sent_bytes += size + 28
        sent_bytes += sum(len(d) + 28 for d in pacer.release(t))
        t += step
    allowed = rate / 8 * t + pacer.depth
    assert sent_bytes <= allowed
    assert sent_bytes >= 0.95 * rate / 8 * t  # and the rate is used


def test_small_datagrams_go_ahead_of_full_ones():
    pacer = Pacer(1 * MBIT, 28, now=0.0)
    for _ in range(20):
        pacer.submit(b"d" * 1350, 0.0)
    ack = b"a" * 40
    assert len(ack) + 28 <= SMALL
    assert pacer.submit(ack, 0.0) == QUEUED
    first = []
    t = 0.0
    while not first:
        t += 0.001
        first = pacer.release(t)
    assert first[0] == ack


def test_queue_is_bounded():
    pacer = Pacer(1 * MBIT, 28, now=0.0)
    verdicts = [pacer.submit(b"x" * 1350, 0.0) for _ in range(1000)]
    assert DROPPED in verdicts
    assert pacer.queued <= pacer.limit


def test_paced_window():
    # 50 Mbit/s x 40 ms = 250 KB = 182 datagrams of 1378 B; the cap is a few of those
    cap = paced_window(50 * MBIT, 40, 1378)
    assert 182 * 3 <= cap <= 182 * 8
    assert paced_window(50 * MBIT, None, 1378) is None  # no round trip seen yet
    assert paced_window(64e3, 1, 1378) >= 8  # never below what fast retransmit needs


def feed(auto, rate_bytes, rounds, rtt_s=0.05, limited=True, start=0.0):
    """`rounds` round trips of acknowledgements at `rate_bytes`/s, 10 per round."""
    t, rates = start, []
    for _ in range(rounds):
        auto.limited = limited
        for _ in range(10):
            t += rtt_s / 10
            rate = auto.on_acked(int(rate_bytes * rtt_s / 10), t, rtt_s)
            if rate is not None:
                rates.append(rate)
    return t, rates


def test_auto_rate_measures_starts_up_and_settles():
    auto = AutoRate(now=0.0)
    t, rates = feed(auto, 2.5e6, 12)  # a 20 Mbit/s path
    assert auto.rate_bps == pytest.approx(20e6, rel=0.1)
    assert auto.state != "startup"  # three rounds without growth ended it
    assert max(rates) > 1.5 * 20e6  # start-up probed well above ...
    t, rates = feed(auto, 2.5e6, 16, start=t)
    assert sum(rates) / len(rates) == pytest.approx(20e6, rel=0.15)  # ... cruise around it
    assert max(rates) >= 1.2 * 20e6 and min(rates) <= 0.8 * 20e6  # probing up and down


def test_auto_rate_is_not_lowered_by_a_sender_short_of_data():
    auto = AutoRate(now=0.0)
    t, _ = feed(auto, 2.5e6, 12)
    feed(auto, 0.1e6, 20, limited=False, start=t)  # an interactive lull
    assert auto.rate_bps == pytest.approx(20e6, rel=0.1)


@pytest.mark.parametrize("text, bps", [("50M", 50e6), ("2.5mbit", 2.5e6), ("800kbps", 8e5),
                                       ("1G", 1e9), ("100000", 1e5), ("20Mbit/s", 20e6)])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps
    assert parse_options(f"ratelimit={text}")[0].ratelimit == bps


@pytest.mark.parametrize("text", ["fast", "50MB", "-5M", "10k", "1T", "", "automatic"])
def test_bad_ratelimit_is_named(text):
    with pytest.raises(OptionError, match=r"ratelimit=.*bits per second"):
        parse_options(f"ratelimit={text}")


def test_ratelimit_off_by_default():
    assert parse_options("")[0].ratelimit == 0
    assert parse_options("ratelimit=off")[0].ratelimit == 0
    assert parse_options("ratelimit=auto")[0].ratelimit == AUTO


# -- the tunnel through a bottleneck ----------------------------------------------------

SIZE = 1024 * 1024
RATE = 8 * MBIT
QUEUE = 30


def download_through_bottleneck(targets, tunnels, clients, link, options_text, size=SIZE,
                                after=None):
    """`size` bytes target -> client across an 8 Mbit/s bottleneck; returns the link
    counts.  `after(tunnel)` runs once the download is complete."""
    link.bottleneck(RATE, QUEUE)
    sent = gevent.event.AsyncResult()

    def handler(sock, _addr):
        sent.set(send_random(sock, 77, size))
        recv_to_eof(sock)

    opts = tunnel_helpers.fast_options(text=options_text)
    tunnel = tunnels(targets.start(handler), opts)
    sock = clients.connect(tunnel.address)
    with gevent.Timeout(60, AssertionError("download through the bottleneck: no end in 60 s")):
        received, digest = recv_to_eof(sock)
    assert received == size
    assert digest == sent.get(timeout=5)
    if after is not None:
        after(tunnel)
    return dict(link.counts)


def test_unpaced_bursts_overflow_the_bottleneck(targets, tunnels, clients, link):
    """The control case: without ratelimit the bottleneck's queue overflows."""
    counts = download_through_bottleneck(targets, tunnels, clients, link, "mode=fast2")
    print(f"\nunpaced: {counts}")
    assert counts.get("queue_drops", 0) > 0.05 * counts["through_bottleneck"]


@pytest.mark.parametrize("extra", ["", ";key=pacing-test"], ids=["plain", "key"])
def test_paced_transfer_keeps_the_queue(targets, tunnels, clients, link, extra):
    """(In key mode the pacer must count the 28 sealing bytes per datagram too.)"""
    counts = download_through_bottleneck(targets, tunnels, clients, link,
                                         "mode=fast2;ratelimit=7.6M" + extra)
    print(f"\npaced: {counts}")
    # (the bar: under 5 % self-caused drops; 0 here since what the server
    # held for a not-yet-validated client is released through the pacer: before,
    # that release was one burst and cost 166 drops whenever the download
    # started before the address was proven)
    assert counts.get("queue_drops", 0) < 0.05 * counts["through_bottleneck"]


def test_auto_rate_finds_the_bottleneck(targets, tunnels, clients, link):
    """ratelimit=auto: the rate is measured, not given.  It loses a small
    fraction of what unpaced KCP loses at the bottleneck (compare
    test_unpaced_bursts_overflow_the_bottleneck: there, more drops than
    datagrams through; here, mostly the start-up overshoot into a 30-packet
    queue), and its estimate ends near the bottleneck's rate."""
    estimates = []

    def estimate(tunnel):
        estimates.extend(p.auto.rate_bps for p in tunnel.server.peers.values())

    counts = download_through_bottleneck(targets, tunnels, clients, link,
                                         "mode=fast2;ratelimit=auto", size=4 * SIZE,
                                         after=estimate)
    print(f"\nauto: {counts}, estimate {[f'{e / MBIT:.1f}' for e in estimates]} Mbit/s")
    assert counts.get("queue_drops", 0) <= 0.25 * counts["through_bottleneck"]
    # (wide: a loaded machine handles ACKs in bursts, which inflates some samples)
    assert len(estimates) == 1 and 0.6 * RATE <= estimates[0] <= 1.6 * RATE


@pytest.mark.parametrize("rate", ["10M", "auto"])
def test_datagrams_larger_than_a_burst_still_go(targets, tunnels, clients, rate):
    """mtu=9000: the bucket must hold whole datagrams (it holds two of the
    largest), or nothing could ever leave."""
    sent = gevent.event.AsyncResult()

    def handler(sock, _addr):
        sent.set(send_random(sock, 78, SIZE // 4))
        recv_to_eof(sock)

    opts = tunnel_helpers.fast_options(text=f"mode=fast2;mtu=9000;ratelimit={rate}")
    tunnel = tunnels(targets.start(handler), opts)
    sock = clients.connect(tunnel.address)
    with gevent.Timeout(30, AssertionError("jumbo datagrams never left the pacer")):
        received, digest = recv_to_eof(sock)
    assert received == SIZE // 4
    assert digest == sent.get(timeout=5)
