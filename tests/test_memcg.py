"""scripts/memcg.py: a real memory cgroup, and the kernel's verdict read back."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import load_script

memcg = load_script("memcg")
pytestmark = pytest.mark.skipif(
    memcg.unavailable_reason() is not None, reason=str(memcg.unavailable_reason())
)


def test_parse_size_reads_kubernetes_quantities() -> None:
    assert memcg.parse_size("128Mi") == 128 * 2**20
    assert memcg.parse_size("1Gi") == 2**30
    assert memcg.parse_size("500M") == 500_000_000
    with pytest.raises(ValueError, match="not a memory size"):
        memcg.parse_size("128 MB")


def test_a_process_over_the_limit_is_oom_killed_and_counted() -> None:
    with memcg.memory_cgroup(48 * 2**20, prefix="petsage-test") as cgroup:
        over = subprocess.run(
            cgroup.wrap([sys.executable, "-c", "x = bytearray(160 * 2**20)"]), check=False
        )
        assert over.returncode == -9
        assert cgroup.oom_kills() == 1
        assert cgroup.peak_bytes() >= 40 * 2**20
        path = cgroup.path
    assert not path.exists()


def test_a_process_under_the_limit_runs_inside_the_cgroup() -> None:
    with memcg.memory_cgroup(64 * 2**20, prefix="petsage-test") as cgroup:
        inside = subprocess.run(
            cgroup.wrap(["cat", "/proc/self/cgroup"]), capture_output=True, text=True, check=True
        )
        assert f":memory:/{cgroup.path.name}" in inside.stdout or (
            cgroup.version == 2 and cgroup.path.name in inside.stdout
        )
        assert cgroup.oom_kills() == 0
        assert cgroup.peak_bytes() < 64 * 2**20
