"""A feature whose extra is not installed says so in one line, naming the extra.

Here every extra is installed, so its absence is made the way Python itself marks a
module as unavailable: ``sys.modules[name] = None`` (``import`` raises ImportError,
``importlib.util.find_spec`` answers None). tests/test_packaging.py does the same in a
clean virtual environment where the extras really are missing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
from conftest import ROOT
from tcp_listener import free_port

from petsage_grpc import Check, HealthMonitor, MissingExtraError, StatusBoard
from petsage_grpc.server._config import ConfigError, load_config

CLI_TIMEOUT: Final = 20.0
HIDE = "import sys\nfor name in {modules!r}: sys.modules[name] = None\n"


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def serve_without(modules: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``petsage-grpc serve ARGS`` in a Python where *modules* cannot be imported."""
    code = HIDE.format(modules=modules) + (
        "from petsage_grpc.cli._main import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize(
    ("kind", "target", "extra", "module"),
    [
        ("postgres", "postgresql://petsage@127.0.0.1:5432/petsage", "postgres", "asyncpg"),
        ("redis", "redis://127.0.0.1:6379/0", "redis", "redis"),
        ("http", "http://127.0.0.1:8080/healthz", "http", "aiohttp"),
    ],
)
def test_health_monitor_refuses_a_check_whose_extra_is_missing(
    monkeypatch: pytest.MonkeyPatch, kind: str, target: str, extra: str, module: str
) -> None:
    hide(monkeypatch, module)
    check = Check(name="dep", kind=kind, target=target)  # type: ignore[arg-type]
    with pytest.raises(MissingExtraError) as raised:
        HealthMonitor(StatusBoard(), [check])
    assert str(raised.value) == (
        f"check 'dep' (kind {kind!r}) needs the {extra!r} extra: "
        f"pip install 'petsage-grpc[{extra}]'"
    )
    assert isinstance(raised.value, ImportError)


def test_reconfigure_with_a_missing_extra_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        board = StatusBoard()
        tcp = Check(name="tcp", kind="tcp", target=f"127.0.0.1:{free_port()}", interval=60)
        async with HealthMonitor(board, [tcp]) as monitor:
            hide(monkeypatch, "asyncpg")
            db = Check(name="db", kind="postgres", target="postgresql://petsage@127.0.0.1/p")
            with pytest.raises(MissingExtraError, match=r"petsage-grpc\[postgres\]"):
                await monitor.reconfigure([tcp, db])
            assert [state.check.name for state in monitor.states] == ["tcp"]
            assert board.get("check.db") is None

    asyncio.run(main())


def test_checks_without_an_extra_need_none(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "asyncpg", "redis", "aiohttp", "prometheus_client")
    checks = [
        Check(name="tcp", kind="tcp", target="127.0.0.1:1"),
        Check(name="grpc", kind="grpc", target="127.0.0.1:1"),
        Check(name="py", kind="python", target=lambda: True),
    ]
    HealthMonitor(StatusBoard(), checks)


def test_load_config_names_the_missing_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hide(monkeypatch, "asyncpg")
    path = tmp_path / "petsage.toml"
    path.write_text(
        '[[checks]]\nname = "db"\nkind = "postgres"\n'
        'target = "postgresql://petsage@127.0.0.1:5432/petsage"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems == [
        f"{path}: checks[0] ('db').kind: 'postgres' needs the 'postgres' extra: "
        "pip install 'petsage-grpc[postgres]'"
    ]


def test_serve_with_http_port_and_no_http_extra_is_one_line_and_exit_2() -> None:
    result = serve_without(
        ("aiohttp", "prometheus_client"), "--port", "0", "--http-port", str(free_port())
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "petsage-grpc serve: error: --http-port needs the 'http' extra: "
        "pip install 'petsage-grpc[http]'\n"
    )


def test_serve_with_a_config_file_check_and_no_extra_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    path = tmp_path / "petsage.toml"
    path.write_text(
        '[[checks]]\nname = "cache"\nkind = "redis"\ntarget = "redis://127.0.0.1:6379/0"\n',
        encoding="utf-8",
    )
    result = serve_without(("redis",), "--port", "0", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"petsage-grpc serve: error: {path}: checks[0] ('cache').kind: 'redis' needs the "
        "'redis' extra: pip install 'petsage-grpc[redis]'\n"
    )


def test_the_json_log_format_carries_the_missing_extra_line_too() -> None:
    result = serve_without(
        ("aiohttp",), "--port", "0", "--http-port", str(free_port()), "--log-format", "json"
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert '"event": "startup_error"' in line
    assert "--http-port needs the 'http' extra: pip install 'petsage-grpc[http]'" in line
