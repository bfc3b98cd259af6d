"""SIP003: run as a shadowsocks plugin, optionally with a secondary plugin.

::

    client:  ss-local -TCP-> [secondary] -TCP-> gkcp-local ==KCP==> SS_REMOTE_HOST:PORT
    server:  SS_REMOTE_HOST:PORT ==KCP==> gkcp-server -TCP-> [secondary] -TCP-> ss-server

The environment (SS_REMOTE_HOST, SS_REMOTE_PORT, SS_LOCAL_HOST,
SS_LOCAL_PORT, SS_PLUGIN_OPTIONS) says where to listen and connect; the role
comes from the entry point (gkcp-local / gkcp-server) or, for plain
`gkcp`, from the `server` option.  A secondary plugin (`plugin=...`,
`plugin_opts=...`) is started as our child on a fresh loopback port.

Life cycle: stop signals stop the child and exit 0; the child dying, or
our parent dying (getppid() changes), ends us too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import gevent
from gevent import subprocess

from .addresses import Address, AddressError, host_list, parse_port, resolve
from .endpoint import Endpoint
from .kcp import engine_description
from .options import Options
from .run import Fatal, Watcher, bind_error, load_options, serve

log = logging.getLogger("gkcp")

PARENT_POLL_S = 1.0
CHILD_STOP_S = 0.5


@dataclass(frozen=True)
class PluginEnv:
    remote_hosts: List[str]
    remote_port: int
    local_host: str
    local_port: int
    options: str


def read_env(environ: Dict[str, str]) -> PluginEnv:
    """The SS_* variables, checked; a problem raises Fatal naming the variable."""
    def need(name: str) -> str:
        value = environ.get(name)
        if value is None or not value.strip():
            raise Fatal(f"{name} is not set (gkcp-local/gkcp-server are meant to be "
                        "started by shadowsocks as a SIP003 plugin)")
        return value.strip()

    def port(name: str) -> int:
        try:
            return parse_port(need(name), name)
        except AddressError as exc:
            raise Fatal(str(exc)) from None

    hosts = host_list(need("SS_REMOTE_HOST"))
    if not hosts:
        raise Fatal(f"SS_REMOTE_HOST={environ['SS_REMOTE_HOST']!r}: no host in it")
    return PluginEnv(hosts, port("SS_REMOTE_PORT"), need("SS_LOCAL_HOST"),
                     port("SS_LOCAL_PORT"), environ.get("SS_PLUGIN_OPTIONS", ""))


def free_loopback_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Secondary:
    """The secondary plugin, our child process."""

    def __init__(self, command: str, options: str, remote: Address, local: Address) -> None:
        env = dict(os.environ)
        env.update(SS_REMOTE_HOST=remote[0], SS_REMOTE_PORT=str(remote[1]),
                   SS_LOCAL_HOST=local[0], SS_LOCAL_PORT=str(local[1]),
                   SS_PLUGIN_OPTIONS=options)
        self.command = command
        self.stopping = False
        try:
            self.proc = subprocess.Popen([command], env=env, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        except OSError as exc:
            raise Fatal(f"cannot start secondary plugin {command!r}: "
                        f"{exc.strerror or exc}") from None
        log.info("secondary plugin %s started (pid %d), remote %s, local %s",
                 command, self.proc.pid, remote, local)

    def watch(self, failed: Callable[[int], None]) -> None:
        code = self.proc.wait()
        if self.stopping:
            return
        print(f"gkcp: error: secondary plugin {self.command} exited with status {code}",
              file=sys.stderr)
        failed(1)

    def stop(self) -> None:
        self.stopping = True
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=CHILD_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when gkcp dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def watch_parent(failed: Callable[[int], None]) -> None:
    """Exit when shadowsocks dies (we are re-parented): SIP003 has no other signal."""
    parent = os.getppid()
    while os.getppid() == parent:
        gevent.sleep(PARENT_POLL_S)
    log.warning("parent process %d is gone: stopping", parent)
    failed(0)


def run_plugin(role: Optional[str]) -> int:
    try:
        env = read_env(dict(os.environ))
        options = load_options(env.options, server=True if role == "server" else None)
        if options.verbose:
            logging.getLogger().setLevel(logging.INFO if options.verbose == 1 else logging.DEBUG)
        server = options.server if role is None else role == "server"
        endpoint, secondary = _build(env, options, server)
    except (Fatal, AddressError) as exc:
        print(f"gkcp: error: {exc}", file=sys.stderr)
        return 2
    watchers: List[Watcher] = [watch_parent]
    if secondary is not None:
        watchers.append(secondary.watch)
    try:
        return serve(endpoint, watchers)
    finally:
        if secondary is not None:
            secondary.stop()


def _build(env: PluginEnv, options: Options, server: bool):  # type: ignore[no-untyped-def]
    from .local import LocalEndpoint
    from .server import ServerEndpoint
    secondary: Optional[Secondary] = None
    local = (env.local_host, env.local_port)
    endpoint: Endpoint
    if server:
        listen: List[Address] = []
        for host in env.remote_hosts:
            listen += resolve(host, env.remote_port, socket.SOCK_DGRAM, "SS_REMOTE_HOST",
                              passive=True)
        target = local
        if options.plugin:
            target = (env.local_host, free_loopback_port(env.local_host))
        endpoint = ServerEndpoint(options, listen, target)
        try:
            endpoint.start()
        except OSError as exc:
            raise bind_error(exc, f"UDP port {env.remote_port}",
                             " (is shadowsocks' own UDP relay on? turn it off: no '-u' for "
                             "ss-server, mode 'tcp_only' for ssserver)") from None
        if options.plugin:
            secondary = Secondary(options.plugin, options.plugin_opts or "", target, local)
    else:
        remotes: List[Address] = []
        for host in env.remote_hosts:
            remotes += resolve(host, env.remote_port, socket.SOCK_DGRAM, "SS_REMOTE_HOST")[:1]
        listen_at = local
        if options.plugin:
            listen_at = (env.local_host, free_loopback_port(env.local_host))
        endpoint = LocalEndpoint(options, [listen_at], remotes)
        try:
            endpoint.start()
        except OSError as exc:
            raise bind_error(exc, f"TCP {env.local_host}:{listen_at[1]}") from None
        if options.plugin:
            secondary = Secondary(options.plugin, options.plugin_opts or "", listen_at, local)
    log.info("gkcp %s ready; KCP engine: %s", "server" if server else "local",
             engine_description())
    return endpoint, secondary
