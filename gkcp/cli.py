"""Command line: `gkcp server|local ...` standalone, or a SIP003 plugin.

    gkcp server -l 0.0.0.0:29900 -t 127.0.0.1:8388 [-o OPTIONS]
    gkcp local  -l 127.0.0.1:1080 -r server.example:29900 [-o OPTIONS]
    gkcp-local / gkcp-server / gkcp     (SIP003: reads SS_* variables)

`main()` only parses and wires parts together; the endpoints live in
gkcp.local and gkcp.server, SIP003 in gkcp.plugin.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

from . import __version__

log = logging.getLogger("gkcp")


def _patch() -> None:
    import gevent
    # no spawn-tree bookkeeping (parent weakref, spawning stack) per greenlet
    gevent.config.track_greenlet_tree = False
    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s gkcp[%(process)d] %(levelname)s %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gkcp", description="Carry TCP connections over KCP (UDP). Without a "
        "subcommand, runs as a SIP003 plugin configured by SS_* environment variables.")
    parser.add_argument("--version", action="version", version=f"gkcp {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--options", default="", metavar="OPTIONS",
                        help="plugin options, e.g. 'mode=fast2;mtu=1350' (see README)")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: sessions and summaries, -vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    server = sub.add_parser("server", parents=[common], help="listen for KCP, forward to TCP")
    server.add_argument("-l", "--listen", required=True, metavar="HOST:PORT",
                        help="UDP address to listen on, e.g. 0.0.0.0:29900 or [::]:29900")
    server.add_argument("-t", "--target", required=True, metavar="HOST:PORT",
                        help="TCP address each conversation is forwarded to")
    local = sub.add_parser("local", parents=[common], help="listen on TCP, carry over KCP")
    local.add_argument("-l", "--listen", required=True, metavar="HOST:PORT",
                       help="TCP address to listen on, e.g. 127.0.0.1:1080")
    local.add_argument("-r", "--remote", required=True, metavar="HOST:PORT",
                       help="the gkcp server's UDP address")
    demo = sub.add_parser("demo", parents=[common],
                          help="run a server, a local and a lossy link in one process")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long to push data")
    demo.add_argument("--loss", type=float, default=1.0, help="loss per direction, percent")
    demo.add_argument("--rtt", type=float, default=40.0, help="round-trip time, ms")
    return parser


def fail(message: str) -> int:
    print(f"gkcp: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("server", "local", "demo", "-h", "--help", "--version")
               for a in args_list) and "SS_REMOTE_HOST" in os.environ:
        return _plugin(None, args_list)
    args = build_parser().parse_args(args_list)
    if args.command is None:
        return fail("no command: use 'gkcp server', 'gkcp local' or 'gkcp demo', "
                    "or start gkcp as a SIP003 plugin (SS_REMOTE_HOST etc. unset)")
    setup_logging(-1 if args.quiet else args.verbose)
    _patch()
    from .run import run_demo, run_standalone
    if args.command == "demo":
        return run_demo(args)
    return run_standalone(args)


def _plugin(role: Optional[str], argv: List[str]) -> int:
    verbose = sum(a.count("v") for a in argv if a.startswith("-v") and set(a[1:]) == {"v"})
    setup_logging(verbose)
    _patch()
    from .plugin import run_plugin
    return run_plugin(role)


def main_local() -> int:
    return _plugin("local", sys.argv[1:])


def main_server() -> int:
    return _plugin("server", sys.argv[1:])
