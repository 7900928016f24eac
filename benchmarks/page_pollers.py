"""Open status pages, as the page's script polls: ``GET /status.json`` on keep-alive connections.

    python -m benchmarks.page_pollers --port 8080 --pages 50 --interval 0.5

Each page is one connection polling every *interval* seconds (the page's own pace), all
on one asyncio loop so that the pages cost the client CPU little, until a line arrives
on stdin or it closes; then one JSON line with the polls made and the failures seen is
printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

_REQUEST = b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n"


async def _page(port: int, interval: float, counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        next_poll = time.monotonic()
        while True:
            writer.write(_REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), 5)
            counts["polls" if status == 200 else "failures"] += 1
            next_poll += interval
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        counts["failures"] += 1
    finally:
        writer.close()


async def _run(port: int, pages: int, interval: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    counts = [{"polls": 0, "failures": 0} for _ in range(pages)]
    started = time.monotonic()
    tasks = [asyncio.create_task(_page(port, interval, c)) for c in counts]
    print("polling", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    seconds = time.monotonic() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "polls": sum(c["polls"] for c in counts),
        "failures": sum(c["failures"] for c in counts),
        "seconds": seconds,
    }


def main() -> None:
    """Poll until stdin has a line or closes; print the counts as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_run(args.port, args.pages, args.interval))), flush=True)


if __name__ == "__main__":
    main()
