"""Randomised differential runs of gkcp's engine against ikcp (siokcp).

* ``test_differential``: per seed, a random configuration (nodelay 0/1/2,
  interval, fast resend, fastlimit, nc, stream or message mode per side,
  windows 32..4096, mtu 50..1500, a lossy/reordering/duplicating link, a
  clock that usually starts just below 2**32) and random traffic in both
  directions.  Each endpoint is a ``kcpsim.Twin`` (ikcp and gkcp in lock
  step), so the ikcp pair and the gkcp pair go through the same seeded link
  with the same sends and clock steps; every datagram, every recv, every
  return code and the control blocks after every tick must be identical, and
  at the end each side must have received exactly what the other sent.
  ``--kcp-seeds N`` sets the number of seeds (default in conftest.py).
* ``test_mixed_pair``: gkcp on one side, plain ikcp on the other, data intact.
* ``test_malformed``: truncated, wrong conv, length overflow, unknown cmd,
  random bytes, multi-segment datagrams with a bad later segment: same code
  as ikcp, no exception, identical state and output afterwards.
* ``test_engine_imports_no_io``: ``gkcp.kcp`` imports neither gevent nor
  socket.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

import kcpsim
from kcpsim import (
    CMD_ACK,
    CMD_PUSH,
    CMD_WASK,
    CMD_WINS,
    CONV,
    HEADER,
    MASK32,
    OVERHEAD,
    Link,
    OracleKCP,
    Pair,
    Twin,
    assert_delivered,
    engine_factory,
    oracle_factory,
    parse,
    seg,
    twin_factory,
)

# every test runs against each engine: compiled, pure (conftest.kcp_engine)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kcp_engine")]


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        n = metafunc.config.getoption("--kcp-seeds")
        metafunc.parametrize("seed", range(n), ids=[f"seed={s}" for s in range(n)])
    if "mixed_seed" in metafunc.fixturenames:
        n = max(1, metafunc.config.getoption("--kcp-seeds") // 10)
        metafunc.parametrize("mixed_seed", range(n), ids=[f"seed={s}" for s in range(n)])


# ---------------------------------------------------------------------------
# Random configurations
# ---------------------------------------------------------------------------


def _window(rng: random.Random) -> int:
    return min(4096, int(32 * 2 ** rng.uniform(0, 7)))


def random_config(rng: random.Random) -> dict:
    cfg = {
        "nodelay": rng.choice([0, 1, 2]),
        "interval": rng.choice([10, 10, 10, 20, 40, 100]),
        "resend": rng.choice([0, 0, 1, 2, 3, 5]),
        "nc": rng.choice([0, 1]),
        "stream": (rng.random() < 0.4, rng.random() < 0.4),
        "wnd": ((_window(rng), _window(rng)), (_window(rng), _window(rng))),
        "mtu": rng.choice([50, 51, 76, 200, 576, 1200, 1400, 1500, rng.randint(50, 1500)]),
        "fastlimit": rng.choice([5, 5, 5, 0, -1, 1, 3, 20]),
        "start_ms": rng.choice(
            [MASK32 - rng.randint(0, 5000), MASK32 - rng.randint(0, 60000), rng.randrange(1 << 32)]
        ),
        "minrto": rng.choice([None, None, None, 10, 50]),
        "dead_link": rng.choice([20, 20, 20, 3, 10]),
        # first sequence number a->b and b->a: sometimes just below 2**32
        "sn_start": tuple(rng.choice([0, 0, MASK32 - rng.randint(0, 400)]) for _ in range(2)),
    }
    lo = rng.choice([0, 1, 5, 20, 50])
    cfg["link"] = {
        "loss": rng.choice([0.0, 0.0, 0.01, 0.05, 0.1, 0.2]),
        "delay_ms": (lo, lo + rng.choice([0, 0, 5, 30, 100])),
        "jitter_ms": rng.choice([0, 0, 3, 20]),
        "reorder": rng.choice([0.0, 0.0, 0.02, 0.1]),
        "reorder_ms": rng.choice([5, 50]),
        "duplicate": rng.choice([0.0, 0.0, 0.01, 0.05]),
        "queue_limit": rng.choice([None, None, 64, 500]),
        "rate": rng.choice([None, None, None, 50.0, 500.0]),
    }
    if cfg["link"]["rate"]:
        # a bounded queue in front of the bottleneck (else a backlog of minutes)
        cfg["link"]["queue_limit"] = rng.choice([8, 16, 64])
    return cfg


def configure(kcp, cfg: dict, side: int) -> None:
    assert kcp.setmtu(cfg["mtu"]) == 0
    kcp.wndsize(*cfg["wnd"][side])
    kcp.nodelay(cfg["nodelay"], cfg["interval"], cfg["resend"], cfg["nc"])
    if cfg["stream"][side]:
        kcp.stream = 1
    kcp.fastlimit = cfg["fastlimit"]
    kcp.dead_link = cfg["dead_link"]
    if cfg["minrto"] is not None:
        kcp.rx_minrto = cfg["minrto"]


def random_message(rng: random.Random, mss: int) -> bytes:
    r = rng.random()
    if r < 0.05:
        n = 0
    elif r < 0.55:
        n = rng.randint(1, mss)
    elif r < 0.88:
        n = rng.randint(mss, 4 * mss)
    elif r < 0.985:
        n = rng.randint(4 * mss, 16 * mss)
    elif r < 0.993:
        n = 127 * mss  # the largest message
    else:
        n = 127 * mss + rng.randint(1, mss)  # one fragment too many
    return rng.randbytes(n)


def make_pair(cfg: dict, seed: int, make_a, make_b) -> Pair:
    pair = Pair(
        make_a,
        make_b,
        Link(seed * 2 + 1, **cfg["link"]),
        Link(seed * 2 + 2, **cfg["link"]),
        start_ms=cfg["start_ms"],
    )
    configure(pair.a.kcp, cfg, 0)
    configure(pair.b.kcp, cfg, 1)
    for sender, receiver, sn in ((pair.a, pair.b, cfg["sn_start"][0]), (pair.b, pair.a, cfg["sn_start"][1])):
        if sn:
            sender.kcp.snd_una = sender.kcp.snd_nxt = sn
            receiver.kcp.rcv_nxt = sn
    return pair


def exercise(pair: Pair, cfg: dict, rng: random.Random, *, steps: int, after_tick=None) -> None:
    """Random traffic, clock steps, receive pauses, direct flushes, checks."""
    interval = cfg["interval"]
    ends = (pair.a, pair.b)
    for _ in range(steps):
        for ep in ends:
            if rng.random() < 0.25 and ep.kcp.waitsnd() < 256:
                ep.send(random_message(rng, ep.kcp.mss))
            if rng.random() < 0.03:
                ep.receiving = not ep.receiving
        r = rng.random()
        if r < 0.03:
            rng.choice(ends).kcp.flush()
        elif r < 0.15:
            rng.choice(ends).kcp.check(pair.clock)
        elif r < 0.17:
            rng.choice(ends).kcp.peeksize()
        r = rng.random()
        if r < 0.004:
            pair.skew_ms += rng.choice([-20000, -3000, -30, 15000])
        if r < 0.01:
            step = rng.choice([3000, 10000, 12000, 70000])
        elif r < 0.5:
            step = pair.next_event_ms(3 * interval)
        else:
            step = rng.randint(1, 2 * interval)
        pair.tick(step)
        if after_tick:
            after_tick()


def drain(pair: Pair, cfg: dict, rng: random.Random, *, max_rounds: int = 6000, after_tick=None) -> None:
    """Everyone reads, the link heals; run until both directions are
    delivered and acknowledged.  (Backoff is uncapped per segment, so after
    a congestion collapse a segment may wait minutes: idle stretches are
    crossed in jumps of up to 30 s.)"""
    pair.a.receiving = pair.b.receiving = True
    for link in (pair.ab, pair.ba):
        link.loss, link.loss_deck, link.duplicate = 0.0, None, 0.0
        link.rate = link.queue_limit = None
    interval = cfg["interval"]
    for _ in range(max_rounds):
        if pair.ab or pair.ba:
            step = pair.next_event_ms(1000)
        else:
            step = rng.choice([interval, 2 * interval, rng.randint(interval, 30000)])
        pair.tick(step)
        if after_tick:
            after_tick()
        if pair.quiet():
            return
    raise AssertionError(
        f"not quiet after {max_rounds} rounds: waitsnd {pair.a.kcp.waitsnd()}/"
        f"{pair.b.kcp.waitsnd()}, state {pair.a.kcp.state:#x}/{pair.b.kcp.state:#x}"
    )


# ---------------------------------------------------------------------------
# ikcp pair vs gkcp pair, datagram by datagram
# ---------------------------------------------------------------------------


def test_differential(seed):
    rng = random.Random(seed)
    cfg = random_config(rng)
    pair = make_pair(cfg, seed, twin_factory("a", fields=False), twin_factory("b", fields=False))
    twins = (pair.a.kcp, pair.b.kcp)

    def compare():
        for t in twins:
            t.compare_fields()

    exercise(pair, cfg, rng, steps=rng.randint(50, 250), after_tick=compare)
    drain(pair, cfg, rng, after_tick=compare)
    for sender, receiver, side in ((pair.a, pair.b, 0), (pair.b, pair.a, 1)):
        stream = cfg["stream"][side] or cfg["stream"][1 - side]
        assert_delivered(sender, receiver, stream=stream)
    assert all(code == 0 for code in pair.a.input_codes + pair.b.input_codes)


@pytest.mark.slow
def test_bulk_transfer_large_windows():
    """Megabytes through windows of 4096 on a lossy, reordering link."""
    rng = random.Random(4096)
    cfg = random_config(rng)
    cfg.update(
        nodelay=1, interval=10, resend=2, nc=1, stream=(True, False), wnd=((4096, 4096), (4096, 4096)),
        mtu=1400, fastlimit=5, minrto=None, dead_link=20, start_ms=MASK32 - 3000,
        sn_start=(MASK32 - 2000, 0),
        link={"loss": 0.01, "delay_ms": (10, 30), "reorder": 0.01, "reorder_ms": 20, "duplicate": 0.01},
    )
    pair = make_pair(cfg, 4096, twin_factory("a", fields=False), twin_factory("b", fields=False))
    chunk = rng.randbytes(65536)
    target = 24 * 1024 * 1024
    sent = received = 0
    for _ in range(20000):
        while sent < target and pair.a.kcp.waitsnd() < 8192:
            sent += pair.a.send(chunk)
        if rng.random() < 0.05:
            pair.b.send(rng.randbytes(rng.randint(0, 3000)))
        before = len(pair.b.received)
        pair.tick(pair.next_event_ms(10))
        received += sum(map(len, pair.b.received[before:]))
        pair.a.kcp.compare_fields()
        pair.b.kcp.compare_fields()
        if received >= target:
            break
    assert received >= target
    assert pair.ab.stats.lost > 50 and pair.ab.stats.reordered > 50
    drain(pair, cfg, rng)
    assert_delivered(pair.a, pair.b, stream=True)
    assert_delivered(pair.b, pair.a, stream=False)
    assert pair.a.kcp.snd_nxt < 2**20  # started at 2**32 - 2001: wrapped


# ---------------------------------------------------------------------------
# Mixed pairs: gkcp talking to ikcp
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gkcp_side", ["a", "b"])
def test_mixed_pair(mixed_seed, gkcp_side):
    seed = 100_000 + mixed_seed
    rng = random.Random(seed)
    cfg = random_config(rng)
    cfg["dead_link"] = 20
    factories = (engine_factory, oracle_factory) if gkcp_side == "a" else (oracle_factory, engine_factory)
    pair = make_pair(cfg, seed, *factories)
    assert type(getattr(pair, gkcp_side).kcp) is kcpsim.engine_class()
    exercise(pair, cfg, rng, steps=rng.randint(100, 300))
    drain(pair, cfg, rng)
    for sender, receiver, side in ((pair.a, pair.b, 0), (pair.b, pair.a, 1)):
        stream = cfg["stream"][side] or cfg["stream"][1 - side]
        assert_delivered(sender, receiver, stream=stream)
    assert sum(map(len, pair.a.sent + pair.b.sent)) > 0


# ---------------------------------------------------------------------------
# Malformed datagrams
# ---------------------------------------------------------------------------


def _live_twins(seed: int):
    """Two Twins after a short random exchange (both have state to lose)."""
    rng = random.Random(seed)
    cfg = random_config(rng)
    cfg["link"] = {"loss": 0.1, "delay_ms": (5, 30), "reorder": 0.1}
    cfg["dead_link"] = 20
    pair = make_pair(cfg, seed, twin_factory("a"), twin_factory("b"))
    exercise(pair, cfg, rng, steps=40)
    captured: list[bytes] = []
    # datagrams in flight make good templates
    captured += [d for _, _, d in pair.ab._queue] + [d for _, _, d in pair.ba._queue]
    return pair, cfg, rng, captured


def _mutations(rng: random.Random, valid: bytes, conv: int):
    """(description, datagram, ikcp code we expect) for one valid datagram."""
    out = []
    first_len = OVERHEAD + HEADER.unpack_from(valid)[7]
    n = len(valid)
    cut = rng.randint(0, OVERHEAD - 1)
    out.append(("shorter than a header", valid[:cut], -1))
    if first_len > OVERHEAD:
        cut = rng.randint(OVERHEAD, first_len - 1)
        out.append(("truncated inside the first payload", valid[:cut], -2))
    out.append(("valid plus trailing junk", valid + rng.randbytes(rng.randint(1, OVERHEAD - 1)), 0))
    wrong = bytearray(valid)
    wrong[0:4] = ((conv + rng.randint(1, 1000)) & MASK32).to_bytes(4, "little")
    out.append(("wrong conv", bytes(wrong), -1))
    for bad_len in (first_len - OVERHEAD + 1, 0x7FFFFFFF, 0x80000000, MASK32, rng.randrange(1 << 32)):
        b = bytearray(valid)
        b[20:24] = (bad_len & MASK32).to_bytes(4, "little")
        remaining = n - OVERHEAD
        expected = -2 if bad_len > remaining else None
        out.append((f"len field {bad_len:#x}", bytes(b), expected))
    cmd = rng.choice([c for c in range(256) if c not in (81, 82, 83, 84)])
    b = bytearray(valid)
    b[4] = cmd
    out.append((f"unknown cmd {cmd}", bytes(b), -3))
    # a later segment goes bad after earlier ones were applied
    tail_kinds = [
        ("then wrong conv", seg(CMD_ACK, conv=conv ^ 1), -1),
        ("then unknown cmd", seg(0, conv=conv), -3),
        ("then length overflow", seg(CMD_PUSH, conv=conv, data=b"abc", length=100), -2),
        ("then a header cut short", seg(CMD_WINS, conv=conv)[: rng.randint(1, 23)], 0),
    ]
    for desc, tail, code in tail_kinds:
        out.append((f"valid, {desc}", valid + tail, code))
    out.append(("random bytes", rng.randbytes(rng.randint(0, 300)), None))
    after_conv = conv.to_bytes(4, "little") + rng.randbytes(rng.randint(0, 120))
    out.append(("random bytes after the right conv", after_conv, None))
    return out


@pytest.mark.parametrize("case", range(12))
def test_malformed(case):
    pair, cfg, rng, captured = _live_twins(50_000 + case)
    a, b = pair.a.kcp, pair.b.kcp
    conv = CONV
    crafted = [
        seg(CMD_PUSH, sn=a.rcv_nxt, ts=pair.clock, una=a.snd_una, data=b"hello"),
        seg(CMD_ACK, sn=a.snd_una, ts=pair.clock) + seg(CMD_WASK, una=a.snd_una, wnd=3),
        seg(CMD_WINS, una=a.snd_una, wnd=0) + seg(CMD_PUSH, sn=a.rcv_nxt + 1, data=b"x" * 40),
    ]
    templates = captured[:6] + crafted
    seen_codes = set()
    for valid in templates:
        for desc, datagram, expected in _mutations(rng, valid, conv):
            target = rng.choice((a, b))
            code = target.input(datagram)  # Twin: same code, no exception, same fields
            seen_codes.add(code)
            if expected is not None:
                assert code == expected, desc
            if rng.random() < 0.3:
                pair.tick(rng.randint(1, cfg["interval"]))
    # state after the abuse still matches, traffic still flows the same way
    drain(pair, cfg, rng)
    assert {-1, -2, -3, 0} <= seen_codes


def test_malformed_random_datagrams_fuzz():
    rng = random.Random(7)
    t = Twin(CONV, name="fuzz")
    t.update(MASK32 - 50)
    t.send(b"x" * 3000)
    t.update(MASK32 - 40)
    cmds = [CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS]
    for i in range(3000):
        parts = []
        for _ in range(rng.randint(1, 4)):
            cmd = rng.choice(cmds) if rng.random() < 0.9 else rng.randrange(256)
            data = rng.randbytes(rng.choice([0, 0, 1, 10, 100]))
            length = len(data) if rng.random() < 0.9 else rng.randrange(1 << 32)
            parts.append(
                seg(
                    cmd,
                    conv=CONV if rng.random() < 0.97 else rng.randrange(1 << 32),
                    frg=rng.choice([0, 0, 1, 5, 255]),
                    wnd=rng.choice([0, 1, 128, 65535, rng.randrange(65536)]),
                    ts=t.current - rng.choice([0, 1, 50, 1000, 1 << 31, rng.randrange(1 << 32)]),
                    sn=(t.rcv_nxt if cmd == CMD_PUSH else t.snd_una) + rng.randint(-5, 200),
                    una=t.snd_una + rng.randint(-3, 5),
                    data=data,
                    length=length,
                )
            )
        datagram = b"".join(parts)
        if rng.random() < 0.2:
            datagram = datagram[: rng.randrange(len(datagram) + 1)]
        t.input(datagram)
        if i % 7 == 0:
            t.update((t.current + rng.randint(1, 40)) & MASK32)
        if i % 13 == 0:
            while t.recv() is not None:
                pass
        if i % 50 == 0:
            t.send(b"y" * rng.randint(0, 5000))


# ---------------------------------------------------------------------------
# The harness and the engine's boundaries
# ---------------------------------------------------------------------------


def test_oracle_adapter_passes_empty_messages_to_ikcp():
    """siokcp 0.0.5 hands send(b"") to ikcp_send: a real empty message."""
    out: list[bytes] = []
    k = OracleKCP(CONV, out.append)
    assert k.send(b"") == 0 and k.nsnd_que == 1
    assert k.send(b"z" * (128 * k.mss)) == -2  # error codes come back as ints
    k.nodelay(1, 10, 0, 1)
    k.update(0)
    (segment,) = parse(out[0])
    assert (segment.cmd, segment.frg, segment.data) == (CMD_PUSH, 0, b"")
    peer = OracleKCP(CONV, lambda d: None)
    assert peer.input(out[0]) == 0
    assert peer.recv() == b"" and peer.recv() is None
    assert peer.input(b"") == -1


def test_link_is_deterministic_and_shapes_traffic():
    def run(seed):
        link = Link(seed, loss=0.2, delay_ms=(10, 30), jitter_ms=5, reorder=0.1, duplicate=0.1, rate=10.0)
        got = []
        for t in range(2000):
            link.send(t, t.to_bytes(4, "little") * 5)
            got += [(t, d) for d in link.deliver(t)]
        got += [(None, d) for d in link.deliver(10**9)]
        return got, link.stats

    a, stats = run(3)
    b, _ = run(3)
    c, _ = run(4)
    assert a == b and a != c
    assert 0.15 < stats.lost / stats.sent < 0.25
    assert stats.duplicated and stats.reordered
    sent_order = [int.from_bytes(d[:4], "little") for _, d in a]
    assert sent_order != sorted(sent_order)  # reordered
    # rate 10 bytes/ms: 20-byte datagrams leave one every 2 ms
    paced = Link(1, rate=10.0)
    for _ in range(100):
        paced.send(0, bytes(20))
    assert [len(paced.deliver(t)) for t in (1, 2, 100, 199, 200)] == [0, 1, 49, 49, 1]
    limited = Link(1, delay_ms=(10, 10), queue_limit=30)
    for _ in range(100):
        limited.send(0, bytes(1))
    assert (len(limited.deliver(10)), limited.stats.overflowed) == (30, 70)
    fifo = Link(1, delay_ms=(0, 50))
    for t in range(500):
        fifo.send(t, t.to_bytes(2, "little"))
    order = [int.from_bytes(d, "little") for d in fifo.deliver(10**6)]
    assert order == list(range(500))  # no reorder unless asked
    deck = Link(9, loss=0.05, loss_deck=100)
    for t in range(1000):
        deck.send(t, b"x")
    assert deck.stats.lost == 50  # exactly 5 of every 100


def test_twin_detects_divergence():
    class OffByOne(OracleKCP):
        __slots__ = ()

        def check(self, current):
            return (super().check(current) + 1) & MASK32

    t = Twin(CONV, engine=OffByOne, name="bad")
    t.update(5)
    with pytest.raises(kcpsim.Mismatch, match="check"):
        t.check(6)
    shrunk = kcpsim.minimize(t.history, engine=OffByOne)
    assert [c[1] for c in shrunk[1:]] == ["check"]


def test_engine_imports_no_io():
    import gkcp

    root = os.path.dirname(os.path.dirname(os.path.abspath(gkcp.__file__)))
    code = (
        "import sys\n"
        "import gkcp.kcp\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('gevent', 'greenlet', 'socket', '_socket', 'selectors', 'asyncio'))\n"
        "print(','.join(bad))\n"
    )
    env = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
