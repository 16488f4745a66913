"""``python -m qless_pool``: the same as the ``qless-pool`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
