"""Generate the Python stubs for proto/ into petsage_grpc/_generated, or check they are current.

Usage:
    python scripts/generate_stubs.py          # write the stubs
    python scripts/generate_stubs.py --check  # exit 1 if the committed stubs differ

grpcio-tools writes absolute imports (``from petsage.v1 import ...``) that only work
with proto/ on sys.path; they are rewritten to the package path so the stubs live in
one place inside petsage_grpc.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "petsage_grpc" / "_generated"
PACKAGE = "petsage_grpc._generated"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pattern = re.compile(r"^from (petsage(?:\.\w+)*) import ", re.MULTILINE)
    for path in out.rglob("*.py*"):
        if not path.name.endswith(GENERATED_SUFFIXES):
            continue  # e.g. __pycache__/*.pyc once the stubs have been imported
        text = path.read_text()
        fixed = pattern.sub(lambda m: f"from {PACKAGE}.{m.group(1)} import ", text)
        path.write_text(fixed)


def _generated_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        for path in _generated_files(OUT):
            (OUT / path).unlink()
        _generate(OUT)
        print(f"stubs written to {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        _generate(Path(tmp))
        expected = _generated_files(Path(tmp))
    actual = _generated_files(OUT)
    if expected == actual:
        print("stubs are current")
        return 0
    for name in sorted(expected.keys() | actual.keys()):
        diff = difflib.unified_diff(
            actual.get(name, "").splitlines(keepends=True),
            expected.get(name, "").splitlines(keepends=True),
            f"committed/{name}",
            f"generated/{name}",
        )
        sys.stdout.writelines(diff)
    print("stubs are stale: run `python scripts/generate_stubs.py` and commit the result")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
