"""Small helpers shared by the benchmark scripts (run from the repository root as benchmarks/NAME.py)."""

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

