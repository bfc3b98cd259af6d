"""Coverage-guided fuzzing (atheris, libFuzzer) of what parses a peer's datagrams.

Targets (`--target`):

* ``kcp``: up to 4 datagrams of arbitrary bytes into a KCP engine that has
  data in flight and data received (as a live conversation), in fast2 or
  in ikcp's normal mode with its congestion window, then
  update/check/flush and peeksize/recv until empty.  Checks: `KCP.input`
  returns 0, -1, -2 or -3 and nothing raises; the receive buffer and queue
  stay within the window; recv() stops.  The same bytes also go through
  gkcp.protocol's parsers (classify, decode_control, is_opener, push_ts,
  may_be_first_flight), which must not raise.
* ``sealer``: key mode's `Sealer.open` against a model of its replay
  window: datagrams sealed with the right key under fuzzer-chosen nonces
  (two senders' prefixes, any counters) and tampered copies.  Checks: a
  tampered datagram is never accepted and leaves the window alone; a
  genuine one is accepted exactly when its counter is new and less than
  REPLAY_WINDOW behind the newest accepted (the model: a set and a max).

atheris is not a dependency of gkcp; install it where you like:

    pip install atheris            # or: pip install --target DIR atheris; PYTHONPATH=DIR
    python bench/fuzz_engine.py [--target kcp|sealer] -max_total_time=600 [CORPUS_DIR]
    python bench/fuzz_engine.py --seeds DIR -max_total_time=600   (kcp: real datagrams
                                                                   written to DIR first)

Arguments after the options go to libFuzzer (-max_total_time, -runs,
-jobs, a corpus directory...).  It ends with libFuzzer's statistics; a
failing input raises, and libFuzzer writes it to crash-<sha1> (rerun:
`python bench/fuzz_engine.py --target kcp crash-<sha1>`).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris  # noqa: E402

# the pure-Python engine: atheris sees coverage only in Python code (the
# compiled one is the same source, and tests/test_kcp_* check both agree)
os.environ["GKCP_PURE_PYTHON"] = "1"

with atheris.instrument_imports():
    from gkcp import protocol
    from gkcp.crypto import REPLAY_WINDOW, Sealer
    from gkcp.kcp import CMD_ACK, CMD_PUSH, CMD_WASK, CMD_WINS, KCP

CONV = 0x0A0B0C0D
HEAD = struct.Struct("<IBBHIIII")  # a KCP segment header


def segment(cmd: int = CMD_PUSH, *, sn: int = 0, una: int = 0, frg: int = 0, ts: int = 0,
            data: bytes = b"") -> bytes:
    return HEAD.pack(CONV, cmd, frg, 128, ts, sn, una, len(data)) + data


#: (nodelay, interval, resend, nc): fast2 without a congestion window, and
#: ikcp's normal mode with one (slow start, fast recovery on loss)
PROFILES = ((1, 20, 2, 1), (0, 40, 0, 0))


def live_kcp(profile: int) -> KCP:
    """Data in flight (1000 bytes at mtu 300) and one message received."""
    kcp = KCP(CONV, lambda _datagram: None)
    kcp.nodelay(*PROFILES[profile % len(PROFILES)])
    kcp.wndsize(64, 64)
    kcp.setmtu(300)
    kcp.update(1000)
    kcp.send(bytes(1000))
    kcp.flush()
    kcp.input(segment(sn=0, ts=990, data=b"hello"))
    return kcp


def parse_all(datagram: bytes) -> None:
    kind = protocol.classify(datagram)
    control = protocol.decode_control(datagram)
    assert (control is not None) == (kind is protocol.Kind.CONTROL)
    protocol.is_opener(datagram)
    protocol.push_ts(datagram)
    protocol.may_be_first_flight(datagram, 64)
    protocol.conv_of(datagram)


def kcp_input(datagrams: List[bytes], later_ms: int, profile: int = 0) -> bytes:
    """The kcp target's input format: a byte choosing the profile, 3 bytes of
    `later_ms`, then each datagram after a 2-byte length (little-endian,
    taken modulo 1501); at most 4."""
    return bytes([profile]) + later_ms.to_bytes(3, "little") + b"".join(
        len(d).to_bytes(2, "little") + d for d in datagrams)


def split_kcp_input(data: bytes) -> Tuple[int, List[bytes], int]:
    profile = data[0] if data else 0
    later_ms = int.from_bytes(data[1:4], "little") % 200_001
    rest = data[4:]
    datagrams = []
    while len(datagrams) < 4 and (rest or not datagrams):
        n = int.from_bytes(rest[:2], "little") % 1501
        datagrams.append(rest[2:2 + n])
        rest = rest[2 + n:]
    return profile, datagrams, later_ms


def fuzz_kcp(data: bytes) -> None:
    profile, datagrams, later_ms = split_kcp_input(data)
    kcp = live_kcp(profile)
    for datagram in datagrams:
        parse_all(datagram)
        kcp.current = 1000
        code = kcp.input(datagram)
        assert code in (0, -1, -2, -3), f"input returned {code}"
    later = 1000 + later_ms
    kcp.flush()
    kcp.update(later)
    kcp.check(later)
    assert len(kcp.rcv_buf) <= kcp.rcv_wnd
    assert len(kcp.rcv_queue) <= kcp.rcv_wnd
    assert 0 <= kcp.nsnd_buf <= len(kcp.snd_buf)
    for _ in range(kcp.rcv_wnd + 2):
        kcp.peeksize()
        if kcp.recv() is None:
            break
    else:
        raise AssertionError("recv() never ran dry")


KEY = bytes(range(32))
PREFIXES = (b"\x01\x02\x03\x04", b"\xfe\xfd\xfc\xfb")


def fuzz_sealer(data: bytes) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    fdp = atheris.FuzzedDataProvider(data)
    aead = ChaCha20Poly1305(KEY)
    opener = Sealer(KEY)
    model = {p: (set(), -1) for p in PREFIXES}  # prefix -> (accepted counters, newest)
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        prefix = PREFIXES[fdp.ConsumeIntInRange(0, 1)]
        seen, top = model[prefix]
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:  # anywhere
            counter = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        elif choice == 1:  # near the newest, behind or ahead
            counter = max(0, top + fdp.ConsumeIntInRange(-2 * REPLAY_WINDOW, 2 * REPLAY_WINDOW))
        else:  # small
            counter = fdp.ConsumeIntInRange(0, 3 * REPLAY_WINDOW)
        counter = min(counter, (1 << 64) - 1)
        nonce = prefix + counter.to_bytes(8, "little")
        plain = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        sealed = nonce + aead.encrypt(nonce, plain, None)
        if fdp.ConsumeBool():  # a tampered copy first: never accepted, window untouched
            bit = fdp.ConsumeIntInRange(0, len(sealed) * 8 - 1)
            tampered = bytearray(sealed)
            tampered[bit // 8] ^= 1 << (bit % 8)
            assert opener.open(bytes(tampered)) is None, "a tampered datagram was accepted"
        fresh = counter not in seen and (counter > top or top - counter < REPLAY_WINDOW)
        got = opener.open(sealed)
        assert (got == plain) if fresh else (got is None), (
            f"counter {counter} (newest {top}, seen before: {counter in seen}): "
            f"expected {'accepted' if fresh else 'dropped'}, got {got!r}")
        if fresh:
            seen.add(counter)
            model[prefix] = (seen, max(top, counter))


TARGETS = {"kcp": fuzz_kcp, "sealer": fuzz_sealer}


def write_seeds(directory: str) -> None:
    """Real datagrams for the kcp target to start from (libFuzzer mutates them)."""
    from gkcp.protocol import Control, encode_control, open_message
    os.makedirs(directory, exist_ok=True)
    ack = HEAD.pack(CONV, CMD_ACK, 0, 128, 995, 0, 1, 0)
    seeds = {
        "push": [segment(sn=1, ts=995, data=b"world")],
        "ack": [ack],
        "ack-una": [HEAD.pack(CONV, CMD_ACK, 0, 128, 995, 2, 3, 0)],
        "wask-wins": [segment(CMD_WASK) + segment(CMD_WINS)],
        "fragments": [segment(sn=1, frg=2, data=b"a") + segment(sn=2, frg=1, data=b"b")
                      + segment(sn=3, frg=0, data=b"c")],
        "out-of-order": [segment(sn=3, data=b"x"), segment(sn=1, data=b"y") + ack],
        "opener": [HEAD.pack(CONV, CMD_PUSH, 0, 128, 0, 0, 0, 64) + open_message(0x1234)],
        "controls": [encode_control(CONV, Control.PING, 5, 0, 7),
                     encode_control(CONV, Control.RST, 5, 9, 1, 1)],
    }
    for name, datagrams in seeds.items():
        for profile in range(len(PROFILES)):
            with open(os.path.join(directory, f"seed-{name}-{profile}"), "wb") as f:
                f.write(kcp_input(datagrams, 30, profile))


def main() -> None:
    argv = sys.argv[:]
    target = "kcp"
    if "--target" in argv:
        i = argv.index("--target")
        target = argv[i + 1]
        del argv[i:i + 2]
    if target not in TARGETS:
        sys.exit(f"--target: one of {', '.join(TARGETS)}")
    if "--seeds" in argv:
        i = argv.index("--seeds")
        write_seeds(argv[i + 1])
        del argv[i]  # the directory stays: libFuzzer's corpus
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
