"""The command line as a user runs it: `python -m gkcp server|local ...` in child processes.

    client (this process) --TCP--> gkcp local --UDP--> gkcp server --TCP--> echo (this process)

Readiness is polled: the local's TCP port accepts, the server holds its UDP
port (psutil).  Children are only ever signalled by the PIDs started here.
"""

# ruff: noqa: E402  (tunnel_helpers is imported before everything else)
import pytest

pytest.register_assert_rewrite("tunnel_helpers")

import tunnel_helpers  # noqa: I001  (first: gevent patches the stdlib on import)

import signal
import socket
import time

import gevent

import gkcp
from tunnel_helpers import (expected_digest, free_port, recv_exact, recv_to_eof,
                            send_random, tcp_port_open, udp_bound_by, wait_closed, wait_ready)

pytest_plugins = ["tunnel_helpers"]

EXIT_S = 5.0  # SIGTERM to exit, generous for a loaded 2-core machine
MB = 1024 * 1024


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def literal(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Pair:
    """A standalone gkcp server and local, in front of an echo target."""

    def __init__(self, processes, targets, host="127.0.0.1", options=None):
        self.processes = processes
        self.host = host
        target = targets.start(tunnel_helpers.echo_handler, host=host)
        self.udp_port = free_port(socket.SOCK_DGRAM, host)
        self.tcp_port = free_port(socket.SOCK_STREAM, host)
        extra = ["-o", options] if options else []
        self.server = processes.gkcp("server", "-l", literal(host, self.udp_port),
                                     "-t", literal(host, target[1]), *extra)
        self.local = processes.gkcp("local", "-l", literal(host, self.tcp_port),
                                    "-r", literal(host, self.udp_port), *extra)
        wait_ready(processes, self.server, lambda: udp_bound_by(self.server.pid, self.udp_port))
        wait_ready(processes, self.local, lambda: tcp_port_open(host, self.tcp_port))

    @property
    def address(self):
        return (self.host, self.tcp_port)

    def connect(self, clients):
        return clients.connect(self.address)

    def terminate(self, proc) -> float:
        """SIGTERM `proc`; returns the seconds until it exited (fails after EXIT_S)."""
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        result = self.processes.finish(proc, EXIT_S)
        elapsed = time.monotonic() - start
        assert result.returncode == 0, (
            f"{proc.args[3]} exited with {result.returncode} on SIGTERM: {result.stderr[-2000:]}")
        return elapsed


def echo_through(pair, clients, size=MB, seed=7):
    sock = pair.connect(clients)
    with gevent.Timeout(30, AssertionError(f"{size} bytes not echoed within 30s")):
        writer = clients.spawn(send_random, sock, seed, size)
        received, digest = recv_to_eof(sock)
        assert writer.get() == digest
    assert received == size
    assert digest == expected_digest(seed, size)
    sock.close()


@pytest.mark.timeout(30)
def test_version(processes):
    result = processes.run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gkcp {gkcp.__version__}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["server", "local"])
@pytest.mark.parametrize("option, key", [
    ("mtu=abc", "mtu"),
    ("mode=warp", "mode"),
    ("mode=fast2;sndwnd=0", "sndwnd"),
])
def test_bad_option_value_exits_2_naming_the_key(processes, role, option, key):
    udp = free_port(socket.SOCK_DGRAM)
    tcp = free_port(socket.SOCK_STREAM)
    if role == "server":
        args = ["server", "-l", f"127.0.0.1:{udp}", "-t", f"127.0.0.1:{tcp}"]
    else:
        args = ["local", "-l", f"127.0.0.1:{tcp}", "-r", f"127.0.0.1:{udp}"]
    result = processes.run(*args, "-o", option)
    assert result.returncode == 2, result.stderr
    bad_value = option.rsplit(";", 1)[-1].split("=", 1)[1]
    assert key in result.stderr and bad_value in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_server_port_in_use_is_a_clear_error(processes):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = processes.run("server", "-l", f"127.0.0.1:{port}", "-t", "127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert "already in use" in result.stderr and str(port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_local_port_in_use_is_a_clear_error(processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = processes.run("local", "-l", f"127.0.0.1:{port}", "-r", "127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert "already in use" in result.stderr and str(port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_standalone_pair_carries_data_and_exits_0_on_sigterm(processes, targets, clients):
    pair = Pair(processes, targets, options="mode=fast2")
    echo_through(pair, clients)
    # a half-close passes through the processes too
    sock = pair.connect(clients)
    sock.sendall(b"last words")
    sock.shutdown(socket.SHUT_WR)
    with gevent.Timeout(10, AssertionError("no echo after the half-close")):
        assert recv_to_eof(sock)[0] == len(b"last words")
    local_s = pair.terminate(pair.local)
    server_s = pair.terminate(pair.server)
    print(f"\nSIGTERM to exit: local {local_s:.2f}s, server {server_s:.2f}s")


@pytest.mark.timeout(60)
def test_sigterm_to_server_closes_open_connections(processes, targets, clients):
    pair = Pair(processes, targets, options="mode=fast2")
    sock = pair.connect(clients)
    sock.sendall(b"ping")
    with gevent.Timeout(10, AssertionError("no echo")):
        assert recv_exact(sock, 4) == b"ping"
    pair.terminate(pair.server)
    outcome, waited = wait_closed(sock, 10)
    assert outcome in ("eof", "reset"), f"client still connected {waited:.1f}s after SIGTERM"
    pair.terminate(pair.local)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["local", "server"])
def test_sigterm_during_transfers_exits_0(processes, targets, clients, which):
    """SIGTERM while data flows through 20 connections: exit 0, no client left hanging.

    The stopping side resets every conversation, but under this load its
    RSTs may be lost (full socket buffers), so the other side may only learn
    from silence: dead=3 bounds that.
    """
    pair = Pair(processes, targets, options="mode=fast2;keepalive=1;dead=3")
    echoed = [0]

    def pump(sock, seed):
        try:
            for block in tunnel_helpers.random_chunks(seed, 1 << 30):
                sock.sendall(block)
        except OSError:
            pass

    def drain(sock):
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                echoed[0] += len(data)
        except OSError:
            pass  # a reset is as good as EOF here

    readers = []
    for i in range(20):
        sock = pair.connect(clients)
        clients.spawn(pump, sock, i)
        readers.append(clients.spawn(drain, sock))
    started = tunnel_helpers.wait_until(lambda: echoed[0] >= 8 * MB, 20)
    assert started, "the transfers never got going"
    pair.terminate(pair.local if which == "local" else pair.server)
    with gevent.Timeout(10, AssertionError("clients still connected 10s after SIGTERM")):
        gevent.joinall(readers)  # dead=3, housekeeping once a second, and a margin
    pair.terminate(pair.server if which == "local" else pair.local)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_literals(processes, targets, clients):
    pair = Pair(processes, targets, host="::1", options="mode=fast2")
    echo_through(pair, clients, size=256 * 1024)
    pair.terminate(pair.local)
    pair.terminate(pair.server)
