"""gkcp: a shadowsocks SIP003 plugin that carries TCP connections over KCP."""

__version__ = "0.1.0"
