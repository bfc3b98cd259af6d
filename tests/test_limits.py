"""Server limits: what happens at the caps on conversations."""

# ruff: noqa: E402  (tunnel_helpers is imported before everything else)
import pytest

pytest.register_assert_rewrite("tunnel_helpers")

import tunnel_helpers  # noqa: F401, I001  (first: gevent patches the stdlib on import)

import gevent

from gkcp.protocol import Limits
from tunnel_helpers import fast_options, recv_exact, wait_until

pytest_plugins = ["tunnel_helpers"]


def echo_once(clients, address, payload=b"ping"):
    sock = clients.connect(address)
    with gevent.Timeout(10, AssertionError("no echo within 10s")):
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
    return sock


@pytest.mark.timeout(60)
def test_lingering_conversations_make_room_for_new_ones(targets, tunnels, clients):
    """At the per-client cap, closed (lingering) conversations give way at once."""
    target = targets.echo()
    srv = tunnels.server(target)
    srv.limits = Limits(per_peer=5)
    loc = tunnels.local(srv.bound_addresses[0][:2])
    address = loc.bound_addresses[0][:2]
    for sock in [echo_once(clients, address) for _ in range(5)]:
        sock.close()
    # all five close cleanly and linger on the server (3 s by default)
    assert wait_until(lambda: len(srv.lingering) == 5, 10), len(srv.lingering)
    # five new ones get in without waiting for the lingering ones to expire
    with gevent.Timeout(10, AssertionError("new connections never got in")):
        for _ in range(5):
            echo_once(clients, address, b"new")
    assert srv.stats.refused == 0, "openers were refused while closed conversations lingered"
    assert len(srv.conversations()) <= 5


@pytest.mark.timeout(60)
def test_open_conversations_beyond_the_cap_are_refused_silently(targets, tunnels, clients):
    target = targets.echo()
    srv = tunnels.server(target)
    srv.limits = Limits(per_peer=3)
    loc = tunnels.local(srv.bound_addresses[0][:2], fast_options())
    address = loc.bound_addresses[0][:2]
    kept = [echo_once(clients, address) for _ in range(3)]
    extra = clients.connect(address)
    extra.sendall(b"over the cap")
    assert wait_until(lambda: srv.stats.refused > 0, 10)
    assert len(srv.conversations()) == 3
    # the open ones still work; when one closes, the waiting one gets in
    kept[0].close()
    with gevent.Timeout(15, AssertionError("the waiting connection never got in")):
        assert recv_exact(extra, len(b"over the cap")) == b"over the cap"
    for sock in kept[1:]:
        with gevent.Timeout(10, AssertionError("an open connection stopped working")):
            sock.sendall(b"x")
            assert recv_exact(sock, 1) == b"x"
