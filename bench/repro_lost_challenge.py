"""Repro: one lost address-validation PING starves a gkcp server's downloads.

Found by bench/links.py on the 5 %-loss link (a 10 s echo stall, then a
bulk download of 0 bytes).  The server sends a new client address a single
PING challenge; until the PONG echo comes back it sends that address no
more bytes than it received from it (gkcp/server.py `_admit`,
gkcp/endpoint.py `Peer.output`).  The challenge is never repeated, so when
that one PING (or its PONG) is lost, the peer stays unvalidated for as long
as it has conversations: downloads are limited to the client's own upload
(mostly ACKs), i.e. they stall.

This runs a gkcp server and local in one process, joined by a UDP relay on
loopback that drops exactly one datagram: the first server->client PING.
It downloads for --seconds and prints the bytes received, with and without
that drop.

    python bench/repro_lost_challenge.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from gevent import socket as gsocket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gkcp.endpoint import udp_socket  # noqa: E402
from gkcp.local import LocalEndpoint  # noqa: E402
from gkcp.options import parse_options  # noqa: E402
from gkcp.protocol import Control  # noqa: E402
from gkcp.server import ServerEndpoint  # noqa: E402

PATTERN = os.urandom(1 << 16)


class Relay:
    """client <-> relay <-> server on loopback, dropping the first server PING if asked."""

    def __init__(self, server: tuple, drop_first_ping: bool) -> None:
        self.server = server
        self.drop = drop_first_ping
        self.dropped = 0
        self.front = udp_socket(socket.AF_INET)
        self.front.bind(("127.0.0.1", 0))
        self.back = udp_socket(socket.AF_INET)
        self.back.bind(("127.0.0.1", 0))
        self.client = None
        self.tasks = [gevent.spawn(self._pump, self.front, True),
                      gevent.spawn(self._pump, self.back, False)]

    def _pump(self, sock: socket.socket, from_client: bool) -> None:
        sock.setblocking(False)
        while True:
            gsocket.wait_read(sock.fileno())
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if from_client:
                    self.client = addr
                    self.back.sendto(data, self.server)
                    continue
                if self.drop and len(data) == 20 and data[4] == Control.PING:
                    self.drop = False
                    self.dropped += 1
                    continue
                if self.client:
                    self.front.sendto(data, self.client)

    def close(self) -> None:
        gevent.killall(self.tasks)
        self.front.close()
        self.back.close()


def bulk_target(sock: socket.socket, _addr: object) -> None:
    try:
        while True:
            sock.sendall(PATTERN)
    except OSError:
        pass


def trial(drop: bool, seconds: float) -> dict:
    options, _ = parse_options("mode=fast2")
    target = StreamServer(("127.0.0.1", 0), bulk_target)
    target.start()
    server = ServerEndpoint(options, [("127.0.0.1", 0)], target.address)
    server.start()
    relay = Relay(server.bound_addresses[0], drop)
    local = LocalEndpoint(options, [("127.0.0.1", 0)], [relay.front.getsockname()])
    local.start()
    got = 0
    try:
        sock = gsocket.create_connection(local.bound_addresses[0])
        sock.settimeout(0.5)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            got += len(data)
        sock.close()
        peers = list(server.peers.values())
        validated = peers[0].validated if peers else None
        held = peers[0].held_bytes if peers else None
    finally:
        local.stop()
        server.stop()
        relay.close()
        target.stop()
    return {"drop_first_ping": drop, "dropped": relay.dropped, "bytes": got,
            "mbit": round(got * 8 / seconds / 1e6, 2), "server_peer_validated": validated,
            "server_held_bytes": held, "server_send_dropped": server.stats.send_dropped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    for drop in (False, True):
        print(trial(drop, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
