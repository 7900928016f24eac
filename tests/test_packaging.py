"""The package an embedder installs: the wheel and sdist, built, checked and installed.

``python -m build`` builds the sdist from a copy of the checkout's files (what git would
commit, nothing the working tree has lying around) and the wheel from that sdist, so a
file the sdist leaves out breaks the wheel too. ``twine check --strict`` checks both.
The wheel is then installed without extras into a clean virtual environment (pip may
reach the package index for grpcio and the rest; its cache makes that fast), where the
package imports, the server starts and answers, the README's embedding program runs,
and every feature that needs an extra says which, as the documentation shows.
"""

from __future__ import annotations

import email.parser
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from conftest import ROOT
from hardening import wait_until
from tcp_listener import free_port
from test_readme import run_embedding_program

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BUILD_TIMEOUT: Final = 600.0
RUN_TIMEOUT: Final = 60.0
CORE: Final = {
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "hpack",
    "hyperframe",
    "protobuf",
}
EXTRAS: Final = {
    "postgres": {"asyncpg"},
    "redis": {"redis"},
    "http": {"aiohttp", "prometheus-client"},
    "fleet": {"aiohttp", "dnspython"},
}
OPTIONAL_MODULES: Final = ("asyncpg", "redis", "aiohttp", "prometheus_client", "dns")
HTTP_PORT_ERROR: Final = (
    "petsage-grpc serve: error: --http-port needs the 'http' extra: "
    "pip install 'petsage-grpc[http]'"
)


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path
    python: Path
    """The clean virtual environment's interpreter, with the wheel and no extras."""
    bin: Path


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


def checkout_copy(destination: Path) -> Path:
    """Copy the files git would commit (tracked, or new and not ignored) to *destination*."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a deleted, not yet committed file is still listed
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("packaging")
    source = checkout_copy(base / "source")
    dist = base / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, source)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    environment = base / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)
    return Built(wheel=wheel, sdist=sdist, python=python, bin=environment / "bin")


def test_twine_check_passes_on_the_wheel_and_the_sdist(built: Built) -> None:
    result = run(sys.executable, "-m", "twine", "check", "--strict", built.wheel, built.sdist)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_wheel_holds_the_package_and_only_the_package(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = wheel.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(wheel.read(metadata_name).decode())
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"petsage_grpc"}
    for needed in (
        "petsage_grpc/py.typed",
        "petsage_grpc/__main__.py",
        "petsage_grpc/_generated/petsage/v1/smoke_test_service_pb2.py",
        "petsage_grpc/_generated/petsage/v1/smoke_test_service_pb2.pyi",
        "petsage_grpc/server/status_page/index.html",
    ):
        assert needed in names, needed
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert entry_points

    def requirement_name(line: str) -> str:
        match = re.match(r"[A-Za-z0-9._-]+", line)
        assert match, line
        return match.group(0).lower()

    requires = metadata.get_all("Requires-Dist") or []
    core = {requirement_name(r) for r in requires if "extra ==" not in r}
    assert core == CORE
    for extra, packages in EXTRAS.items():
        marker = f'extra == "{extra}"'
        assert {requirement_name(r) for r in requires if marker in r} == packages, extra
    assert set(metadata.get_all("Provides-Extra") or []) >= {*EXTRAS, "all", "dev"}
    assert metadata["Description-Content-Type"] == "text/markdown"


def test_the_sdist_builds_the_package_from_its_own_files(built: Built) -> None:
    with tarfile.open(built.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "PKG-INFO", "petsage_grpc/py.typed"} <= names
    assert "petsage_grpc/server/status_page/index.html" in names
    assert "petsage_grpc/fleet/page/index.html" in names


def test_the_clean_environment_has_the_core_and_no_extra(built: Built) -> None:
    code = textwrap.dedent(
        f"""
        import importlib.util
        import petsage_grpc
        for name in petsage_grpc.__all__:
            getattr(petsage_grpc, name)
        missing = [m for m in {OPTIONAL_MODULES!r} if importlib.util.find_spec(m) is None]
        print(petsage_grpc.__file__)
        print(" ".join(missing))
        """
    )
    result = run(built.python, "-c", code, cwd=built.bin)
    where, missing = result.stdout.splitlines()
    assert where.startswith(str(built.python.parent.parent)), "imported from the venv"
    assert missing.split() == list(OPTIONAL_MODULES)


def test_the_installed_server_starts_answers_and_stops(built: Built) -> None:
    port, probe_port = free_port(), free_port()
    ports = ["--port", str(port), "--probe-port", str(probe_port)]
    process = subprocess.Popen(
        [
            built.bin / "petsage-grpc",
            "serve",
            "--host",
            "127.0.0.1",
            *ports,
            "--drain-seconds",
            "0",
        ],
        cwd=built.bin,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def probe(address: int, service: str) -> subprocess.CompletedProcess[str]:
            flags = [f"-addr=127.0.0.1:{address}", f"-service={service}"]
            return subprocess.run(
                [built.bin / "petsage-grpc", "probe", *flags],
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )

        wait_until(
            lambda: process.poll() is not None or probe(port, "readiness").returncode == 0,
            "the installed server to answer",
            timeout=RUN_TIMEOUT,
        )
        assert process.poll() is None
        for address, service in ((port, "readiness"), (probe_port, "liveness")):
            answer = probe(address, service)
            assert (answer.returncode, answer.stderr) == (0, "status: SERVING\n")
        status = subprocess.run(
            [built.bin / "petsage-grpc", "status", "--addr", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert status.returncode == 0, status
        assert "readiness" in status.stdout
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
        assert process.returncode == 0, stderr
        assert "serving on 127.0.0.1:" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=RUN_TIMEOUT)


def test_the_readme_program_runs_with_the_core_alone(built: Built, tmp_path: Path) -> None:
    run_embedding_program(str(built.python), tmp_path)


def test_http_port_without_the_extra_reads_as_documented(built: Built) -> None:
    http = ["--http-port", str(free_port())]
    result = subprocess.run(
        [built.bin / "petsage-grpc", "serve", "--host", "127.0.0.1", "--port", "0", *http],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stderr) == (2, HTTP_PORT_ERROR + "\n")
    documented = (ROOT / "docs" / "embedding.md").read_text(encoding="utf-8")
    assert HTTP_PORT_ERROR in documented


def test_a_postgres_check_without_the_extra_is_refused_by_the_cli_and_in_code(
    built: Built, tmp_path: Path
) -> None:
    config = tmp_path / "petsage.toml"
    config.write_text(
        '[[checks]]\nname = "db"\nkind = "postgres"\n'
        'target = "postgresql://petsage@127.0.0.1:5432/petsage"\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [built.bin / "petsage-grpc", "serve", "--port", "0", "--config", config],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"petsage-grpc serve: error: {config}: checks[0] ('db').kind: 'postgres' needs the "
        "'postgres' extra: pip install 'petsage-grpc[postgres]'\n"
    )
    code = textwrap.dedent(
        """
        import petsage_grpc
        check = petsage_grpc.Check(name="db", kind="postgres", target="postgresql://db/petsage")
        try:
            petsage_grpc.HealthMonitor(petsage_grpc.StatusBoard(), [check])
        except ImportError as error:
            print(type(error).__name__, error)
        """
    )
    answer = run(built.python, "-c", code, cwd=tmp_path)
    assert answer.stdout == (
        "MissingExtraError check 'db' (kind 'postgres') needs the 'postgres' extra: "
        "pip install 'petsage-grpc[postgres]'\n"
    )
