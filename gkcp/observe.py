"""Observability: the live-session table (SIGUSR1) and the periodic summary (-v).

Both only read endpoint state; neither touches traffic.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from typing import List, Optional, TextIO

import gevent

from .endpoint import Endpoint, Stats

log = logging.getLogger("gkcp")

SUMMARY_EVERY_S = 60.0


def session_table(endpoint: Endpoint) -> str:
    """One line per live conversation: conv, peer, age, bytes, srtt/rto, queue, state."""
    rows: List[List[str]] = [["conv", "peer", "age s", "up B", "down B", "srtt/rto ms",
                              "sndq", "state"]]
    now = time.monotonic()
    for conv in endpoint.conversations():
        kcp = conv.kcp
        if conv.closed:
            state = "closed"
        elif conv in endpoint.lingering:
            state = "linger"
        elif conv.fin_sent or conv.fin_received:
            state = "half-closed"
        else:
            state = "open"
        rows.append([f"{conv.conv:08x}", _addr(conv.peer.addr), f"{now - conv.started_s:.0f}",
                     str(conv.bytes_up), str(conv.bytes_down),
                     f"{kcp.rx_srtt}/{kcp.rx_rto}", str(kcp.waitsnd()), state])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    head = f"gkcp {endpoint.role}: {len(rows) - 1} conversations, {len(endpoint.peers)} peers"
    return "\n".join([head] + lines) + "\n"


def _addr(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def summary(endpoint: Endpoint, before: Stats, seconds: float) -> str:
    now = endpoint.stats
    d = {f.name: getattr(now, f.name) - getattr(before, f.name)
         for f in dataclasses.fields(Stats)}
    rate_in = d["bytes_in"] * 8 / seconds / 1e6
    rate_out = d["bytes_out"] * 8 / seconds / 1e6
    retrans = sum(c.kcp.xmit for c in endpoint.conversations())
    return (f"{len(endpoint.conversations())} conversations, {len(endpoint.peers)} peers; "
            f"last {seconds:.0f}s: in {rate_in:.2f} Mbit/s, out {rate_out:.2f} Mbit/s, "
            f"{d['opened']} opened, {d['invalid']} invalid, {d['auth_failed']} unauthenticated, "
            f"{d['send_dropped']} send drops, {d['rst_sent']}/{d['rst_received']} RST out/in; "
            f"live conversations' retransmission timeouts {retrans}")


def install(endpoint: Endpoint, out: Optional[TextIO] = None,
            every_s: float = SUMMARY_EVERY_S) -> List[object]:
    """SIGUSR1 prints the table; with INFO logging, a summary every `every_s`."""
    def dump() -> None:
        stream = out or sys.stderr
        stream.write(session_table(endpoint))
        stream.flush()

    handles: List[object] = [gevent.signal_handler(signal.SIGUSR1, dump)]
    if log.isEnabledFor(logging.INFO):
        handles.append(endpoint.group.spawn(_summaries, endpoint, every_s))
    return handles


def _summaries(endpoint: Endpoint, every_s: float) -> None:
    before = dataclasses.replace(endpoint.stats)
    while True:
        gevent.sleep(every_s)
        log.info("%s", summary(endpoint, before, every_s))
        before = dataclasses.replace(endpoint.stats)
