"""Observability as a user sees it: -v logs, SIGUSR1 session table, quiet default."""

# ruff: noqa: E402  (tunnel_helpers is imported before everything else)
import pytest

pytest.register_assert_rewrite("tunnel_helpers")

import tunnel_helpers  # noqa: I001  (first: gevent patches the stdlib on import)

import re
import signal
import socket
import time

import gevent

from tunnel_helpers import (free_port, recv_exact, tcp_port_open, udp_bound_by, wait_ready,
                            wait_until)

pytest_plugins = ["tunnel_helpers"]


def start_pair(processes, targets, *flags):
    target = targets.start(tunnel_helpers.echo_handler)
    udp = free_port(socket.SOCK_DGRAM, "127.0.0.1")
    tcp = free_port(socket.SOCK_STREAM, "127.0.0.1")
    server = processes.gkcp("server", "-l", f"127.0.0.1:{udp}", "-t", f"127.0.0.1:{target[1]}",
                            *flags)
    local = processes.gkcp("local", "-l", f"127.0.0.1:{tcp}", "-r", f"127.0.0.1:{udp}", *flags)
    wait_ready(processes, server, lambda: udp_bound_by(server.pid, udp))
    wait_ready(processes, local, lambda: tcp_port_open("127.0.0.1", tcp))
    return server, local, ("127.0.0.1", tcp)


def echo(clients, address, payload):
    sock = clients.connect(address)
    with gevent.Timeout(10, AssertionError("no echo within 10s")):
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
    return sock


@pytest.mark.timeout(60)
def test_sigusr1_prints_live_sessions_without_disturbing_them(processes, targets, clients):
    server, local, address = start_pair(processes, targets)
    sock = echo(clients, address, b"before the signal")
    for proc in (server, local):
        proc.send_signal(signal.SIGUSR1)
    for proc in (server, local):
        # (the readiness probe's own connection may still be listed, lingering)
        assert wait_until(lambda p=proc: " conversations, 1 peers" in processes.output(p)[1], 10), \
            processes.output(proc)[1]
        table = processes.output(proc)[1]
        assert re.search(r"^conv\s+peer\s+age s\s+up B\s+down B\s+srtt/rto ms\s+sndq\s+state",
                         table, re.M), table
        row = r"^[0-9a-f]{8}\s+127\.0\.0\.1:\d+\s+\d+\s+17\s+17\s+\d+/\d+\s+\d+\s+open$"
        assert re.search(row, table, re.M), table
    # the connection still works after the dump
    with gevent.Timeout(10, AssertionError("no echo after SIGUSR1")):
        sock.sendall(b"after the signal")
        assert recv_exact(sock, len(b"after the signal")) == b"after the signal"


@pytest.mark.timeout(60)
def test_quiet_by_default_and_one_line_per_session_with_v(processes, targets, clients):
    quiet_server, quiet_local, quiet_address = start_pair(processes, targets)
    echo(clients, quiet_address, b"x" * 1000).close()
    server, local, address = start_pair(processes, targets, "-v", "-o", "linger=0.5")
    echo(clients, address, b"y" * 1000).close()
    # one line per session at close, with peer, duration, bytes, srtt, retransmissions
    pattern = re.compile(r"conv [0-9a-f]{8} closed.* after [\d.]+s: up \d+ B, down \d+ B, "
                         r"srtt \d+ ms, retransmissions \d+")
    for proc in (server, local):
        assert wait_until(lambda p=proc: pattern.search(processes.output(p)[1]), 10), \
            processes.output(proc)[1]
    time.sleep(0.5)  # give the quiet pair the same time to (not) log
    for proc in (quiet_server, quiet_local):
        assert processes.output(proc)[1] == "", processes.output(proc)[1]
