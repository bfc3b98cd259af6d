"""Running an endpoint as a process: options, signals, exit codes.

Shared by the standalone commands and the SIP003 plugin.  SIGTERM, SIGINT
and SIGHUP stop the endpoint (conversations are reset, peers told) and the
process exits 0; a fatal error prints one line and exits non-zero.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from typing import Callable, List, Optional

import gevent
from gevent.event import Event

from . import observe
from .addresses import AddressError, resolve, split_host_port
from .crypto import OVERHEAD as CRYPTO_OVERHEAD
from .crypto import CryptoUnavailable, Sealer
from .endpoint import Endpoint
from .kcp import engine_description
from .options import OptionError, Options, parse_options
from .sockopts import SockoptError, apply_outbound

log = logging.getLogger("gkcp")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Fatal(Exception):
    """A one-line error for the user; the process exits non-zero."""


def load_options(text: str, *, server: Optional[bool] = None) -> Options:
    try:
        options, warnings = parse_options(text, server=server)
    except OptionError as exc:
        raise Fatal(str(exc)) from None
    for warning in warnings:
        print(f"gkcp: warning: {warning}", file=sys.stderr)
    check_outbound(options)
    if options.key is not None:
        if options.mtu - CRYPTO_OVERHEAD < 50:
            raise Fatal(f"option mtu={options.mtu}: with key, expected at least "
                        f"{50 + CRYPTO_OVERHEAD}")
        try:
            Sealer(bytes(32))
        except CryptoUnavailable as exc:
            raise Fatal(str(exc)) from None
    return options


def check_outbound(options: Options) -> None:
    """Try the outbound options on a throwaway socket, so errors come before listening."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        family = socket.AF_INET6 if options.outbound_bind_addr and ":" in \
            options.outbound_bind_addr else socket.AF_INET
        probe = socket.socket(family, kind)
        try:
            apply_outbound(probe, options, udp=kind == socket.SOCK_DGRAM)
        except SockoptError as exc:
            raise Fatal(str(exc)) from None
        finally:
            probe.close()


def bind_error(exc: OSError, what: str, hint: str = "") -> Fatal:
    if exc.errno == errno.EADDRINUSE:
        return Fatal(f"{what} is already in use{hint}")
    if exc.errno == errno.EACCES:
        return Fatal(f"{what}: permission denied (ports below 1024 need root)")
    return Fatal(f"{what}: {exc.strerror or exc}")


Watcher = Callable[[Callable[[int], None]], None]


def serve(endpoint: Endpoint, watchers: Optional[List[Watcher]] = None) -> int:
    """Run until a stop signal (exit 0) or until a watcher reports a failure."""
    done = Event()
    code = [0]

    def on_signal(signum: int) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    # installed even when the signal arrived ignored (SIG_IGN inherited)
    handlers = [gevent.signal_handler(sig, on_signal, sig) for sig in STOP_SIGNALS]

    def failed(exit_code: int) -> None:
        code[0] = exit_code
        done.set()

    watching = [gevent.spawn(watch, failed) for watch in watchers or []]
    observers = observe.install(endpoint)
    try:
        done.wait()
    finally:
        for handle in observers:
            if isinstance(handle, gevent.Greenlet):
                handle.kill()
            else:
                handle.cancel()  # type: ignore[attr-defined]
        gevent.killall(watching)
        for handler in handlers:
            handler.cancel()
        endpoint.stop()
    return code[0]


def run_standalone(args: argparse.Namespace) -> int:
    from .local import LocalEndpoint
    from .server import ServerEndpoint
    try:
        options = load_options(args.options, server=args.command == "server")
        listen_host, listen_port = split_host_port(args.listen, "--listen")
        if args.command == "server":
            target = split_host_port(args.target, "--target")
            listen = resolve(listen_host, listen_port, socket.SOCK_DGRAM, "--listen", passive=True)
            endpoint: Endpoint = ServerEndpoint(options, listen, target)
        else:
            host, port = split_host_port(args.remote, "--remote")
            remote = resolve(host, port, socket.SOCK_DGRAM, "--remote")[:1]
            listen = resolve(listen_host, listen_port, socket.SOCK_STREAM, "--listen",
                             passive=True)
            endpoint = LocalEndpoint(options, listen, remote)
        try:
            endpoint.start()
        except OSError as exc:
            raise bind_error(exc, f"--listen {args.listen}") from None
    except (Fatal, AddressError) as exc:
        print(f"gkcp: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s listening on %s; KCP engine: %s", endpoint.role,
             ", ".join(map(str, endpoint.bound_addresses)),  # type: ignore[attr-defined]
             engine_description())
    return serve(endpoint)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import demo
    return demo(args)
