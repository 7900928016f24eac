"""An interleaved A/B of Check throughput between server kinds, to find where a gap comes from.

    python -m benchmarks.ab bare-aio bare-su petsage-embedded petsage-registered --rounds 8

Kinds: ``petsage`` (the command line server), ``grpc-js`` and every kind of
``benchmarks.peers``. Each round runs every kind once, in an order that rotates from round
to round, measured as the throughput section of ``benchmarks.run`` measures (the server on
the first CPU, h2load on the others); the figure is requests per second of server CPU,
which other load on the machine disturbs least. Prints each round, then each kind's
median ratio to the first kind's, taken within rounds. Differences under about 2 % need
8 rounds or more to stand out from the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.measure import FULL, SMOKE, Bench, rotated, throughput_once
from benchmarks.peers import KINDS
from benchmarks.procs import Processes, cpu_sets

_KINDS = ("petsage", "grpc-js", *KINDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the A/B and print each round and the median ratios."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kinds", nargs="+", choices=_KINDS, metavar="KIND")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="shorter runs (for the tests)")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, cpu_sets()[1])
    figures: dict[str, list[float]] = {kind: [] for kind in args.kinds}
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="petsage-ab-") as scratch:
        bench = Bench(SMOKE if args.smoke else FULL, procs, Path(scratch))
        try:
            for index in range(args.rounds):
                for kind in rotated(args.kinds, index):
                    proc, port = bench.start_server(kind)
                    try:
                        result = throughput_once(bench, proc, port)
                    finally:
                        procs.stop(proc)
                    figures[kind].append(result["requests_per_cpu_second"])
                base = figures[args.kinds[0]][-1]
                row = "  ".join(
                    f"{k} {figures[k][-1]:,.0f} ({figures[k][-1] / base:.3f})" for k in args.kinds
                )
                print(f"round {index + 1}: {row}", flush=True)
        finally:
            procs.stop_all()
            bench.close()
    base_figures = figures[args.kinds[0]]
    for kind in args.kinds:
        ratios = [mine / first for mine, first in zip(figures[kind], base_figures, strict=True)]
        ratio = statistics.median(ratios)
        print(f"{kind}: {ratio:.3f} of {args.kinds[0]} (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
