"""Authenticated mode (`key` option): every datagram sealed with an AEAD.

Wire format of a sealed datagram::

    nonce (12 bytes) | ciphertext of the plain datagram | tag (16 bytes)
    nonce = sender's random 4-byte prefix | u64 LE counter, +1 per datagram

The cipher is ChaCha20-Poly1305 (the `cryptography` package) with a
256-bit key derived from the passphrase by PBKDF2-HMAC-SHA256 (salt
"gkcp-v1-key", 100,000 iterations).  A datagram that fails
authentication, or whose nonce was already seen from that address
(replay), is dropped before any state is touched.  Replay windows are kept
per nonce prefix (that is, per sending endpoint, whatever address a replay
comes from) and only for authenticated datagrams, at most `MAX_WINDOWS` of
them (least recently used evicted).

Sans-I/O: no sockets, no gevent.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Optional

OVERHEAD = 12 + 16
SALT = b"gkcp-v1-key"
ITERATIONS = 100_000
REPLAY_WINDOW = 1024  # counters this far behind the newest are still accepted once
MAX_WINDOWS = 65536


class CryptoUnavailable(RuntimeError):
    """The `cryptography` package is missing."""


def derive_key(passphrase: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode(), SALT, ITERATIONS)


class _Window:
    __slots__ = ("top", "seen")

    def __init__(self) -> None:
        self.top = -1  # highest counter accepted
        self.seen = 0  # bit i: counter top - i was accepted

    def check_and_set(self, counter: int) -> bool:
        if counter > self.top:
            shift = counter - self.top
            self.seen = ((self.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) \
                if shift < REPLAY_WINDOW else 1
            self.top = counter
            return True
        age = self.top - counter
        if age >= REPLAY_WINDOW or self.seen >> age & 1:
            return False
        self.seen |= 1 << age
        return True


class Sealer:
    """Seals outgoing and opens incoming datagrams for one endpoint."""

    def __init__(self, key: bytes) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        except ImportError:  # pragma: no cover - depends on the installation
            raise CryptoUnavailable("option key needs the 'cryptography' package "
                                    "(pip install 'gkcp[crypto]')") from None
        from cryptography.exceptions import InvalidTag
        self._aead = ChaCha20Poly1305(key)
        self._invalid = InvalidTag
        self._prefix = os.urandom(4)
        self._counter = 0
        self._windows: "OrderedDict[bytes, _Window]" = OrderedDict()

    def seal(self, datagram: bytes) -> bytes:
        self._counter += 1
        nonce = self._prefix + self._counter.to_bytes(8, "little")
        return nonce + self._aead.encrypt(nonce, datagram, None)

    def open(self, sealed: bytes) -> Optional[bytes]:
        """The plain datagram, or None if forged, corrupt or replayed."""
        if len(sealed) < OVERHEAD:
            return None
        nonce = sealed[:12]
        try:
            plain = self._aead.decrypt(nonce, sealed[12:], None)
        except self._invalid:
            return None
        key = nonce[:4]
        windows = self._windows
        window = windows.get(key)
        if window is None:
            window = windows[key] = _Window()
            if len(windows) > MAX_WINDOWS:
                windows.popitem(last=False)
        else:
            windows.move_to_end(key)
        if not window.check_and_set(int.from_bytes(nonce[4:], "little")):
            return None
        return plain
