"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

import socket


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
