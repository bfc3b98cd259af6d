"""Plugin options: parsing both option syntaxes into a validated `Options`.

Two syntaxes reach a plugin and both are accepted, even mixed:

* SIP003: ``key=value;key2=value2`` with ``\\;``, ``\\=`` and ``\\\\``
  escapes; a bare key means true;
* URL-encoded (sskcp's examples): ``key=value&key2=value2`` with
  percent-escapes.

A ``;``-separated item that contains an unescaped ``&`` is taken as a
URL-encoded run.  Unknown keys are returned as warnings, never fatal.  A bad
value for a known key raises `OptionError` naming the key, the value and
what is accepted.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote

from .pacing import AUTO, parse_rate
from .protocol import Timeouts


class OptionError(ValueError):
    """A known option with a value we cannot accept."""


#: kcptun's presets: (nodelay, interval, resend, nc).  kcptun's fast2/fast3
#: say nodelay 1, but its KCP (kcp-go) backs off a timed-out segment by
#: rx_rto/2, which is ikcp's nodelay=2 (ikcp's 1 multiplies by 1.5): so 2
#: here gives kcptun's behaviour (measured in docs/BENCHMARKS.md).
MODES: Dict[str, Tuple[int, int, int, int]] = {
    "normal": (0, 40, 2, 1),
    "fast": (0, 30, 2, 1),
    "fast2": (2, 20, 2, 1),
    "fast3": (2, 10, 2, 1),
}
DEFAULT_MODE = "fast"


@dataclass(frozen=True)
class Options:
    """Everything a user can set with -o / SS_PLUGIN_OPTIONS."""

    mode: str = DEFAULT_MODE
    nodelay: int = MODES[DEFAULT_MODE][0]
    interval: int = MODES[DEFAULT_MODE][1]
    resend: int = MODES[DEFAULT_MODE][2]
    nc: bool = bool(MODES[DEFAULT_MODE][3])
    mtu: int = 1350
    sndwnd: int = 1024
    rcvwnd: int = 1024
    ratelimit: float = 0.0  # bits/s of IP packets each peer may be sent; 0: none; AUTO
    timeouts: Timeouts = field(default_factory=Timeouts)
    server: bool = False
    verbose: int = 0
    key: Optional[str] = None
    plugin: Optional[str] = None
    plugin_opts: Optional[str] = None
    outbound_fwmark: Optional[int] = None
    outbound_user_cookie: Optional[int] = None
    outbound_bind_interface: Optional[str] = None
    outbound_bind_addr: Optional[str] = None


# -- splitting ------------------------------------------------------------------

def _unescape_pair(segment: str) -> Tuple[str, Optional[str]]:
    """One SIP003 item -> (key, value or None for a bare key), escapes removed."""
    key: List[str] = []
    value: Optional[List[str]] = None
    chars = iter(segment)
    for ch in chars:
        if ch == "\\":
            ch = next(chars, "")
        elif ch == "=" and value is None:
            value = []
            continue
        (key if value is None else value).append(ch)
    return "".join(key), None if value is None else "".join(value)


_FORM_RUN = re.compile(r"(?<!\\)&[^&=]*=")


def _split_form(raw: str) -> List[Tuple[str, Optional[str]]]:
    pairs: List[Tuple[str, Optional[str]]] = []
    for part in raw.split("&"):
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            pairs.append((unquote(key), unquote(value)))
        else:
            pairs.append((unquote(part), None))
    return pairs


def _raw_items(text: str) -> List[Tuple[str, Optional[str]]]:
    pairs: List[Tuple[str, Optional[str]]] = []
    for segment in _split_unescaped(text):
        if _FORM_RUN.search(segment):
            pairs.extend(_split_form(segment))
            continue
        key, value = _unescape_pair(segment)
        if key or value:
            pairs.append((key, value))
    return pairs


def _split_unescaped(text: str) -> List[str]:
    """Split on ';' not preceded by a backslash, keeping escapes in place."""
    parts: List[str] = []
    cur: List[str] = []
    escaped = False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == ";":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


# -- values -----------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on", ""}
_FALSE = {"false", "0", "no", "off"}


def _bool(key: str, value: Optional[str]) -> bool:
    v = "" if value is None else value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise OptionError(f"option {key}={value!r}: expected true/false (also 1/0, yes/no, on/off)")


def _int_range(lo: int, hi: int) -> Callable[[str, Optional[str]], int]:
    def parse(key: str, value: Optional[str]) -> int:
        try:
            n = int((value or "").strip(), 10)
        except ValueError:
            n = None
        if n is None or not lo <= n <= hi:
            raise OptionError(f"option {key}={value!r}: expected an integer from {lo} to {hi}")
        return n
    return parse


def _seconds(lo: float, hi: float) -> Callable[[str, Optional[str]], float]:
    def parse(key: str, value: Optional[str]) -> float:
        try:
            n = float((value or "").strip())
        except ValueError:
            n = float("nan")
        if not lo <= n <= hi:
            raise OptionError(f"option {key}={value!r}: expected seconds from {lo:g} to {hi:g}")
        return n
    return parse


def _text(key: str, value: Optional[str]) -> str:
    if not value:
        raise OptionError(f"option {key}: expected a non-empty value")
    return value


RATE_MIN, RATE_MAX = 64e3, 100e9


def _rate(key: str, value: Optional[str]) -> float:
    v = (value or "").strip().lower()
    if v in ("0", "off", "none", "no", "false"):
        return 0.0
    if v == "auto":
        return AUTO
    bps = parse_rate(v)
    if bps is None or not RATE_MIN <= bps <= RATE_MAX:
        raise OptionError(f"option {key}={value!r}: expected a rate in bits per second from "
                          f"64k to 100G, e.g. 50M, 800k or 1.5G (k, M, G = 10^3, 10^6, 10^9), "
                          f"auto to measure it, or 0/off for no pacing")
    return bps


def _mode(key: str, value: Optional[str]) -> str:
    v = (value or "").strip().lower()
    if v not in MODES:
        raise OptionError(f"option {key}={value!r}: expected one of {', '.join(MODES)}")
    return v


_PARSERS: Dict[str, Callable[[str, Optional[str]], object]] = {
    "mode": _mode,
    "nodelay": lambda k, v: int(_bool_or_int(k, v, 0, 2)),
    "interval": _int_range(10, 5000),
    "resend": _int_range(0, 1000),
    "nc": _bool,
    "mtu": _int_range(50, 65000),
    "sndwnd": _int_range(1, 65535),
    "rcvwnd": _int_range(1, 65535),
    "ratelimit": _rate,
    "server": _bool,
    "verbose": _int_range(0, 2),
    "key": _text,
    "plugin": _text,
    "plugin_opts": lambda k, v: v or "",
    "outbound_fwmark": _int_range(0, 0xFFFFFFFF),
    "outbound_user_cookie": _int_range(0, 0xFFFFFFFF),
    "outbound_bind_interface": _text,
    "outbound_bind_addr": _text,
    "keepalive": _seconds(1, 3600),
    "dead": _seconds(1, 86400),
    "stall": _seconds(1, 86400),
    "idle": _seconds(0, 10 ** 7),
    "linger": _seconds(0, 600),
    "connect_timeout": _seconds(0.1, 600),
}
_TIMEOUT_FIELDS = {"keepalive": "keepalive_s", "dead": "dead_s", "stall": "stall_s",
                   "idle": "idle_s", "linger": "linger_s", "connect_timeout": "connect_s"}
KNOWN_KEYS = tuple(_PARSERS)


def _bool_or_int(key: str, value: Optional[str], lo: int, hi: int) -> int:
    """nodelay accepts true/false (1/0) and 2, as kcptun's users write it."""
    v = (value or "").strip().lower()
    if v in _TRUE - {""}:
        return 1
    if v in _FALSE:
        return 0
    if v.isdigit() and lo <= int(v) <= hi:
        return int(v)
    raise OptionError(f"option {key}={value!r}: expected 0, 1, 2, true or false")


def parse_options(text: Optional[str], *,
                  server: Optional[bool] = None) -> Tuple[Options, List[str]]:
    """Parse an option string. Returns (options, warnings about unknown keys)."""
    values: Dict[str, object] = {}
    warnings: List[str] = []
    for raw_key, value in _raw_items(text or ""):
        key = raw_key.strip().replace("-", "_")
        parser = _PARSERS.get(key)
        if parser is None:
            warnings.append(f"ignoring unknown option {raw_key!r}")
            continue
        values[key] = parser(key, value)
    kwargs: Dict[str, object] = {}
    if "mode" in values:
        mode = str(values["mode"])
        kwargs["mode"] = mode
        kwargs["nodelay"], kwargs["interval"], kwargs["resend"], nc = MODES[mode]
        kwargs["nc"] = bool(nc)
    timeouts = {}
    for key, parsed in values.items():
        if key in _TIMEOUT_FIELDS:
            timeouts[_TIMEOUT_FIELDS[key]] = parsed
        elif key != "mode":
            kwargs[key] = parsed
    if timeouts:
        kwargs["timeouts"] = dataclasses.replace(Timeouts(), **timeouts)  # type: ignore[arg-type]
    if server is not None and "server" not in values:
        kwargs["server"] = server
    return Options(**kwargs), warnings  # type: ignore[arg-type]
