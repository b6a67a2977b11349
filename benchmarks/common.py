"""Small helpers shared by the benchmark scripts (run from the repository root as benchmarks/NAME.py)."""

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_overrides(spec: str) -> dict:
    """"batch_size=512,lr=0.04" -> {"batch_size": 512, "lr": 0.04}, typed like TrainConfig's fields."""
    from mnist_classifier.config import TrainConfig

    defaults = TrainConfig()
    out = {}
    for key, value in (item.split("=", 1) for item in spec.split(",") if item):
        kind = type(getattr(defaults, key))
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out
