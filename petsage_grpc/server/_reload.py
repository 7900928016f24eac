"""Re-reading the configuration file while the server runs (SIGHUP, or a file poll).

Only the dependency checks change without a restart: the watchers of every name that
still exists keep their streams. An invalid file is reported and the running
configuration stays.
"""

from __future__ import annotations

import asyncio
import logging
import os

from petsage_grpc.board._monitor import HealthMonitor
from petsage_grpc.server._config import ConfigError, load_config

__all__ = ["ConfigReloader"]

_log = logging.getLogger("petsage_grpc.config")


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class ConfigReloader:
    """Applies the configuration file at *path* to *monitor* on request."""

    def __init__(self, path: str, monitor: HealthMonitor) -> None:
        self._path = path
        self._monitor = monitor
        self._lock = asyncio.Lock()
        self._stamp = _stamp(path)

    async def reload(self) -> bool:
        """Read the file and apply its checks; return whether the new file was applied."""
        async with self._lock:
            self._stamp = _stamp(self._path)
            try:
                config = load_config(self._path)
                changes = await self._monitor.reconfigure(config.checks)
            except ConfigError as error:
                for problem in error.problems:
                    _log.error("configuration not reloaded: %s", problem)
                return False
            except ValueError as error:
                _log.error("configuration not reloaded: %s: %s", self._path, error)
                return False
            _log.info(
                "configuration reloaded: %s (server settings change only on restart)",
                changes,
                extra={"event": "config_reloaded"},
            )
            return True

    async def poll(self, interval: float) -> None:
        """Reload whenever the file changes, looking every *interval* seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if _stamp(self._path) != self._stamp:
                await self.reload()
