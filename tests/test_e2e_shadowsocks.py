"""End to end: gkcp as a SIP003 plugin of real shadowsocks-libev, fetched through by curl.

::

    curl -SOCKS5-> ss-local -TCP-> [obfs-local] -TCP-> gkcp-local
                                                           || KCP over UDP, loopback
    http.server <-TCP- ss-server <-TCP- [obfs-server] <-TCP- gkcp-server

Every chain is checked by downloading a random file and comparing SHA-256.
The life-cycle tests signal shadowsocks or the secondary plugin and check,
with psutil, that nothing of the chain is left behind.  The last group runs
gkcp directly with SS_* variables, as a plugin host would.

Processes are started and cleaned up by `e2e_helpers.ProcessTracker`; each
test kills only what it started (and what those started), also on failure.
Needs shadowsocks-libev, simple-obfs, shadowsocks-v2ray-plugin and curl
(scripts/install-test-deps.sh); a test whose binaries are missing is skipped.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from typing import Dict, Iterator, List, Optional, Tuple

import psutil
import pytest

from e2e_helpers import (
    BIN_DIR,
    EXIT_S,
    ProcessTracker,
    Started,
    WebSite,
    assert_all_gone,
    catches_signal,
    cmdline_has,
    fetch_big,
    free_port,
    gkcp_complaints,
    gkcp_entry_points,
    host_port,
    ipv6_loopback_works,
    missing_binaries,
    process_env,
    start_ss_local,
    start_ss_server,
    start_website,
    stop_website_process,
    udp_ports,
    wait_ready,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

BIG_FILE_BYTES = 4 * 1024 * 1024
BAD_OPTION_EXIT_S = 10.0  # "fail fast": gkcp's start-up (imports) plus ss noticing

OBFS_CLIENT = "plugin=obfs-local&plugin_opts=obfs%3dhttp%3bobfs-host%3dwww.example.com"
OBFS_SERVER = "plugin=obfs-server&plugin_opts=obfs%3dhttp"
V2RAY_CLIENT = "plugin=ss-v2ray-plugin"
V2RAY_SERVER = "plugin=ss-v2ray-plugin&plugin_opts=server"
FURIOUS_KCPTUN = "mode=fast3;nodelay=1;interval=10;resend=2;nc=1"
FURIOUS_SSKCP = "nodelay=true&interval=10&resend=2&nc=true"  # sskcp's README example


def require(*binaries: str) -> None:
    missing = missing_binaries(*binaries)
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/install-test-deps.sh)")
    absent = gkcp_entry_points()
    assert not absent, f"gkcp is not installed next to {BIN_DIR}: {absent} missing"


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebSite]:
    site = start_website(tmp_path_factory.mktemp("www"), BIG_FILE_BYTES)
    try:
        yield site
    finally:
        stop_website_process(site.popen)


@pytest.fixture
def tracker(tmp_path) -> Iterator[ProcessTracker]:
    tracker = ProcessTracker(tmp_path)
    try:
        yield tracker
    finally:
        stubborn = tracker.cleanup()
        assert not stubborn, f"processes that would not die: {stubborn}"


class Chain:
    """ss-server + ss-local with their plugins, on one loopback address."""

    def __init__(self, tracker: ProcessTracker, host: str = "127.0.0.1",
                 server_plugin: str = "gkcp-server", server_opts: Optional[str] = None,
                 local_plugin: str = "gkcp-local", local_opts: Optional[str] = None,
                 socks_bind: str = "127.0.0.1") -> None:
        self.tracker = tracker
        self.host = host
        self.port = free_port(host)
        self.socks_port = free_port(socks_bind, udp=False)
        self.socks = host_port(socks_bind, self.socks_port)
        self.server = start_ss_server(tracker, host, self.port, server_plugin, server_opts)
        self.local = start_ss_local(tracker, host, self.port, self.socks_port, local_plugin,
                                    local_opts, bind=socks_bind)

    def wait_ready(self, site: WebSite) -> None:
        wait_ready(site, self.tracker, socks=self.socks, watch=[self.server, self.local])

    def fetch(self, site: WebSite) -> float:
        self.wait_ready(site)
        return fetch_big(site, self.tracker, socks=self.socks)

    def complaints(self) -> List[str]:
        return gkcp_complaints(self.server.stderr()) + gkcp_complaints(self.local.stderr())

    def side(self, side: str) -> Tuple[Started, str, str]:
        """(shadowsocks process, gkcp's name, obfs' name) of one side."""
        if side == "local":
            return self.local, "gkcp-local", "obfs-local"
        return self.server, "gkcp-server", "obfs-server"

    def assert_kcp_on_server_port(self, gkcp_server_name: str) -> None:
        """gkcp-server holds the UDP side of ss-server's public port: KCP really is used."""
        gkcp = self.tracker.wait_descendant(self.server, gkcp_server_name)
        assert (self.host, self.port) in udp_ports(gkcp), self.tracker.report()


# -- fetching through the chain ---------------------------------------------------------

@pytest.mark.parametrize("server_plugin, server_opts, local_plugin, local_opts", [
    pytest.param("gkcp-server", None, "gkcp-local", None, id="defaults"),
    pytest.param("gkcp-server", FURIOUS_KCPTUN, "gkcp-local", FURIOUS_KCPTUN,
                 id="furious-kcptun-style"),
    pytest.param("gkcp-server", FURIOUS_SSKCP, "gkcp-local", FURIOUS_SSKCP, id="form-encoded"),
    pytest.param("gkcp-server", "nodelay=1;interval=10", "gkcp-local", "nodelay=1;interval=10",
                 id="sip003"),
    # plain `gkcp` on both sides: the `server` option alone picks the role
    pytest.param("gkcp", "server", "gkcp", None, id="gkcp-with-server-option"),
])
def test_fetch_through_gkcp(tracker, site, server_plugin, server_opts, local_plugin, local_opts):
    require("curl", "ss-server", "ss-local")
    chain = Chain(tracker, server_plugin=server_plugin, server_opts=server_opts,
                  local_plugin=local_plugin, local_opts=local_opts)
    chain.fetch(site)
    chain.assert_kcp_on_server_port(server_plugin)
    # every option understood: no "unknown option" warning, no error
    assert chain.complaints() == [], tracker.report()


@pytest.mark.parametrize("server_opts, local_opts, server_word, local_word", [
    pytest.param(OBFS_SERVER, OBFS_CLIENT, "obfs-server", "obfs-local", id="obfs"),
    pytest.param(V2RAY_SERVER, V2RAY_CLIENT, "ss-v2ray-plugin", "ss-v2ray-plugin", id="v2ray"),
])
def test_fetch_through_gkcp_with_secondary_plugin(tracker, site, server_opts, local_opts,
                                                  server_word, local_word):
    require("curl", "ss-server", "ss-local", server_word, local_word)
    chain = Chain(tracker, server_opts=server_opts, local_opts=local_opts)
    chain.fetch(site)
    chain.assert_kcp_on_server_port("gkcp-server")
    # the secondary really runs, as a child of gkcp, on both sides
    for ss, gkcp, word in ((chain.server, "gkcp-server", server_word),
                           (chain.local, "gkcp-local", local_word)):
        secondary = tracker.wait_descendant(ss, word)
        assert cmdline_has(secondary.parent(), gkcp), tracker.report()
    assert chain.complaints() == [], tracker.report()


def test_fetch_over_ipv6_loopback(tracker, site):
    require("curl", "ss-server", "ss-local")
    if not ipv6_loopback_works():
        pytest.skip("no IPv6 loopback here")
    chain = Chain(tracker, host="::1", socks_bind="127.0.0.1")
    chain.fetch(site)
    chain.assert_kcp_on_server_port("gkcp-server")
    assert chain.complaints() == [], tracker.report()


# -- life cycle --------------------------------------------------------------------------

SIDES = [pytest.param("local", id="ss-local"), pytest.param("server", id="ss-server")]


@pytest.fixture
def obfs_chain(tracker, site) -> Chain:
    """A ready gkcp+obfs chain (the token file came through)."""
    require("curl", "ss-server", "ss-local", "obfs-local", "obfs-server")
    chain = Chain(tracker, server_opts=OBFS_SERVER, local_opts=OBFS_CLIENT)
    chain.wait_ready(site)
    return chain


@pytest.mark.parametrize("side", SIDES)
def test_sigterm_to_shadowsocks_stops_gkcp_and_secondary(tracker, obfs_chain, side):
    ss, gkcp_name, obfs_name = obfs_chain.side(side)
    plugins = [tracker.wait_descendant(ss, gkcp_name), tracker.wait_descendant(ss, obfs_name)]
    ss.popen.send_signal(signal.SIGTERM)
    assert ss.wait_exit(EXIT_S) is not None, f"{ss.name} ignored SIGTERM\n" + tracker.report()
    assert_all_gone(tracker, plugins, EXIT_S, f"after SIGTERM to {ss.name}")


@pytest.mark.parametrize("side", SIDES)
def test_killed_secondary_ends_gkcp_and_shadowsocks(tracker, obfs_chain, side):
    ss, gkcp_name, obfs_name = obfs_chain.side(side)
    gkcp = tracker.wait_descendant(ss, gkcp_name)
    obfs = tracker.wait_descendant(ss, obfs_name)
    obfs.send_signal(signal.SIGKILL)
    assert_all_gone(tracker, [gkcp], EXIT_S, f"gkcp after SIGKILL of {obfs_name}")
    assert ss.wait_exit(EXIT_S) is not None, \
        f"{ss.name} kept running without its plugin\n" + tracker.report()
    # gkcp's exit status is reaped by ss (not shown): see the direct test below
    assert f"secondary plugin {obfs_name} exited" in ss.stderr(), tracker.report()


@pytest.mark.parametrize("side", SIDES)
def test_sigkill_of_shadowsocks_lets_gkcp_and_secondary_exit(tracker, obfs_chain, side):
    ss, gkcp_name, obfs_name = obfs_chain.side(side)
    plugins = [tracker.wait_descendant(ss, gkcp_name), tracker.wait_descendant(ss, obfs_name)]
    ss.popen.send_signal(signal.SIGKILL)
    ss.popen.wait(timeout=EXIT_S)
    assert_all_gone(tracker, plugins, EXIT_S, f"orphans of SIGKILLed {ss.name}")


@pytest.mark.parametrize("side", SIDES)
def test_bad_option_makes_shadowsocks_fail_fast(tracker, side):
    require("ss-server", "ss-local")
    host, port = "127.0.0.1", free_port("127.0.0.1")
    if side == "local":
        ss = start_ss_local(tracker, host, port, free_port(host, udp=False), "gkcp-local",
                            "mtu=abc")
    else:
        ss = start_ss_server(tracker, host, port, "gkcp-server", "mtu=abc")
    code = ss.wait_exit(BAD_OPTION_EXIT_S)
    assert code is not None, f"{ss.name} still runs with mtu=abc\n" + tracker.report()
    assert code != 0, tracker.report()
    errors = [line for line in ss.stderr().splitlines() if line.startswith("gkcp: error")]
    assert len(errors) == 1 and "mtu" in errors[0], tracker.report()


def test_ss_server_udp_relay_makes_gkcp_server_fail_with_hint(tracker):
    """`ss-server -u` binds UDP on the public port, the port the KCP server needs."""
    require("ss-server")
    port = free_port()
    ss = start_ss_server(tracker, "127.0.0.1", port, "gkcp-server", extra=["-u"])
    assert ss.wait_exit(BAD_OPTION_EXIT_S) is not None, tracker.report()
    errors = [line for line in ss.stderr().splitlines() if line.startswith("gkcp: error")]
    assert len(errors) == 1, tracker.report()
    assert f"UDP port {port}" in errors[0] and "relay" in errors[0], errors[0]


# -- gkcp run directly with SS_* variables -------------------------------------------------

def ss_env(remote_host: str, remote_port: Optional[int], local_host: str, local_port: int,
           options: Optional[str] = None) -> Dict[str, str]:
    env = process_env(SS_REMOTE_HOST=remote_host, SS_LOCAL_HOST=local_host,
                      SS_LOCAL_PORT=str(local_port))
    if remote_port is not None:
        env["SS_REMOTE_PORT"] = str(remote_port)
    if options is not None:
        env["SS_PLUGIN_OPTIONS"] = options
    return env


def run_briefly(argv: List[str], env: Dict[str, str], timeout_s: float = 15.0) -> \
        subprocess.CompletedProcess:
    """Run a gkcp that should exit by itself (killed by subprocess.run if it does not)."""
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout_s)


@pytest.mark.parametrize("entry", ["gkcp-local", "gkcp-server", "gkcp"])
def test_missing_remote_port_is_one_line_and_exit_2(entry):
    require()
    env = ss_env("127.0.0.1", None, "127.0.0.1", free_port(udp=False))
    result = run_briefly([str(BIN_DIR / entry)], env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1 and "SS_REMOTE_PORT" in lines[0], result.stderr


def test_gkcp_with_server_option_serves_and_ignores_flags(tracker, site):
    """`gkcp -V --fast-open`: SS_PLUGIN_OPTIONS=server makes the server end, else local."""
    require("curl")
    kcp_port = free_port(tcp=False)
    local_port = free_port(udp=False)
    argv = [str(BIN_DIR / "gkcp"), "-V", "--fast-open"]
    # the server forwards straight to the web site: no shadowsocks in between
    server = tracker.start("gkcp-as-server", argv,
                           ss_env("127.0.0.1", kcp_port, "127.0.0.1", site.port, "server"))
    local = tracker.start("gkcp-as-local", argv,
                          ss_env("127.0.0.1", kcp_port, "127.0.0.1", local_port))
    base = f"http://127.0.0.1:{local_port}"
    wait_ready(site, tracker, url_base=base, watch=[server, local])
    fetch_big(site, tracker, url_base=base)
    assert ("127.0.0.1", kcp_port) in udp_ports(server.proc), tracker.report()
    assert gkcp_complaints(server.stderr() + local.stderr()) == [], tracker.report()


def start_with_secondary(tracker: ProcessTracker, entry: str, options: str,
                         secondary: str) -> Tuple[Started, psutil.Process]:
    """gkcp run directly with a secondary plugin, once it serves (handles SIGTERM)."""
    gkcp = tracker.start(entry, [str(BIN_DIR / entry)],
                         ss_env("127.0.0.1", free_port(), "127.0.0.1", free_port(udp=False),
                                options))
    child = tracker.wait_descendant(gkcp, secondary)
    assert wait_until(lambda: catches_signal(gkcp.pid, signal.SIGTERM) or gkcp.exited(),
                      EXIT_S) and not gkcp.exited(), tracker.report()
    return gkcp, child


DIRECT_SECONDARIES = [
    pytest.param("gkcp-local", OBFS_CLIENT, "obfs-local", id="gkcp-local"),
    pytest.param("gkcp-server", OBFS_SERVER, "obfs-server", id="gkcp-server"),
]


@pytest.mark.parametrize("entry, options, secondary", DIRECT_SECONDARIES)
def test_sigterm_stops_gkcp_and_secondary_quietly(tracker, entry, options, secondary):
    """A requested stop exits 0, stops the child, and is not reported as an error."""
    require(secondary)
    gkcp, child = start_with_secondary(tracker, entry, options, secondary)
    gkcp.popen.send_signal(signal.SIGTERM)
    assert gkcp.wait_exit(EXIT_S) == 0, tracker.report()
    assert_all_gone(tracker, [child], EXIT_S, f"{secondary} after SIGTERM to {entry}")
    assert gkcp_complaints(gkcp.stderr()) == [], (
        "a requested stop is reported as an error\n" + tracker.report())


@pytest.mark.parametrize("entry, options, secondary", DIRECT_SECONDARIES)
def test_killed_secondary_makes_gkcp_exit_non_zero(tracker, entry, options, secondary):
    require(secondary)
    gkcp, child = start_with_secondary(tracker, entry, options, secondary)
    child.send_signal(signal.SIGKILL)
    code = gkcp.wait_exit(EXIT_S)
    assert code not in (None, 0), f"{entry} exit {code}\n" + tracker.report()
    assert f"secondary plugin {secondary} exited" in gkcp.stderr(), tracker.report()


def test_udp_port_taken_exits_with_relay_hint():
    require()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        env = ss_env("127.0.0.1", port, "127.0.0.1", free_port(udp=False))
        result = run_briefly([str(BIN_DIR / "gkcp-server")], env)
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"UDP port {port}" in lines[0] and "relay" in lines[0], lines[0]
