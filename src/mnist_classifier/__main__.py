"""``python -m mnist_classifier`` is the same as the ``mnist`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
