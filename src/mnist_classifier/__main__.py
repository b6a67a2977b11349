"""``python -m mnist_classifier`` is the same as the ``mnist`` command."""

from .cli import entry

if __name__ == "__main__":
    raise SystemExit(entry())
