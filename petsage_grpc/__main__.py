"""``python -m petsage_grpc``: the same command line as ``petsage-grpc``."""

from __future__ import annotations

import sys

from petsage_grpc.cli._main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
